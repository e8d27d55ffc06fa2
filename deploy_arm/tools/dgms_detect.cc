// dgms_detect: run a packed detector on one image and print detections.
//
//   dgms_detect MODEL.dgms INPUT [--threads N] [--output dets.json]
//               [--dump-input tensor.bin] [--repeat R] [--warmup W]
//               [--profile] [--dense-algorithm auto|direct]
//               [--isa auto|scalar|avx2|avx512|neon] [--chain-band KIB]
//               [--quant-winograd KIB] [--sibling-convs merge|separate]
//
// INPUT is a binary PPM (P6, 8-bit RGB) that the program resizes,
// normalises and pads as the model's META `preprocess` says, or a tensor
// file (magic DGMSTENS) holding an already preprocessed image; the layout
// is in docs/deploy_arm.md. Detections are JSON, boxes in original-image
// pixels. --repeat R times R runs of detection after W warm-up runs and
// reports the median and minimum latency on stderr; --profile prints the
// main graph's time per operator kind (one more run) on stderr.
// --dense-algorithm direct turns Winograd off for the full-precision 3x3
// stride-1 layers (ModelOptions::dense_algorithm). --isa picks the
// kernels' instruction set (ModelOptions::isa); one the build or the CPU
// lacks is an error. --chain-band sets the working set of a band of a
// conv chain in KiB (ModelOptions::chain_band_bytes; 0 runs every conv on
// its whole input). --quant-winograd sets the largest Winograd filters,
// in KiB, that a quantized 3x3 stride-1 layer keeps
// (ModelOptions::quant_winograd_max_bytes; 0 runs the codebook kernels
// only). --sibling-convs separate runs full-precision convs that read the
// same input one by one rather than merged
// (ModelOptions::merge_sibling_convs). --dump-input writes the
// network input (after resizing, channel order, normalisation and padding)
// as a tensor file before detection runs.
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "dgms_rt/model.h"

namespace {

using dgms_rt::Status;
using dgms_rt::StatusCode;

Status invalid(const std::string& message) {
  return Status(StatusCode::kInvalidArgument, message);
}

Status read_file(const std::string& path, std::vector<uint8_t>* out) {
  struct stat info;
  if (::stat(path.c_str(), &info) == 0 && !S_ISREG(info.st_mode))
    return invalid(path + " is not a regular file (a folder?): give the "
                   "path of an image or tensor file");
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    return invalid("cannot open " + path + ": " + std::strerror(errno) +
                   "; check the path");
  }
  out->assign(std::istreambuf_iterator<char>(file),
              std::istreambuf_iterator<char>());
  return Status::Ok();
}

// Returns the absolute path of an existing file, or "" when it has none.
std::string resolved_path(const std::string& path) {
  char buffer[PATH_MAX];
  return ::realpath(path.c_str(), buffer) != nullptr ? std::string(buffer)
                                                     : std::string();
}

// Checks an output path (`option` names it in messages) before any work:
// its folder must exist and be writable, it must not be a folder, and it
// must not be the model, the input or the other output. *target gets the
// resolved path, so "./a.json" and "a.json" compare equal.
Status check_output_path(const char* option, const std::string& path,
                         const std::vector<std::string>& inputs,
                         std::string* target) {
  const size_t slash = path.find_last_of('/');
  const std::string folder =
      slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const std::string name =
      slash == std::string::npos ? path : path.substr(slash + 1);
  const std::string resolved_folder = resolved_path(folder);
  if (name.empty() || name == "." || name == "..")
    return invalid(std::string(option) + " '" + path +
                   "' names a folder: give a file path");
  if (resolved_folder.empty())
    return invalid(std::string(option) + " '" + path + "': the folder " +
                   folder + " does not exist");
  if (::access(resolved_folder.c_str(), W_OK) != 0)
    return invalid(std::string(option) + " '" + path + "': the folder " +
                   folder + " is not writable");
  *target = resolved_folder + "/" + name;
  const std::string existing = resolved_path(*target);
  struct stat info;
  if (!existing.empty() && ::stat(existing.c_str(), &info) == 0 &&
      S_ISDIR(info.st_mode))
    return invalid(std::string(option) + " '" + path +
                   "' is a folder: give a file path");
  if (!existing.empty()) *target = existing;
  for (const std::string& input : inputs) {
    if (!input.empty() && resolved_path(input) == *target)
      return invalid(std::string(option) + " '" + path + "' is the file " +
                     input + " that this run reads: give another path");
  }
  return Status::Ok();
}

// Reads one PPM header token, skipping whitespace and # comments.
bool ppm_token(const std::vector<uint8_t>& d, size_t* pos, long* value) {
  while (*pos < d.size()) {
    if (d[*pos] == '#') {
      while (*pos < d.size() && d[*pos] != '\n') ++*pos;
    } else if (std::isspace(d[*pos])) {
      ++*pos;
    } else {
      break;
    }
  }
  long v = 0;
  size_t digits = 0;
  while (*pos < d.size() && d[*pos] >= '0' && d[*pos] <= '9' && digits < 9) {
    v = v * 10 + (d[*pos] - '0');
    ++*pos;
    ++digits;
  }
  *value = v;
  return digits > 0;
}

Status load_ppm(const std::vector<uint8_t>& d, const std::string& path,
                const dgms_rt::PreprocessSettings& settings,
                dgms_rt::Tensor* tensor, dgms_rt::ImageInfo* info) {
  size_t pos = 2;
  long width, height, maxval;
  if (!ppm_token(d, &pos, &width) || !ppm_token(d, &pos, &height) ||
      !ppm_token(d, &pos, &maxval) || pos >= d.size() ||
      !std::isspace(d[pos]))
    return invalid(path + ": malformed PPM header");
  ++pos;
  if (maxval != 255)
    return invalid(path + ": PPM maxval is " + std::to_string(maxval) +
                   ", only 8-bit (255) images are supported");
  if (width < 1 || height < 1 || width > 16384 || height > 16384)
    return invalid(path + ": PPM size " + std::to_string(width) + "x" +
                   std::to_string(height) + " is outside 1 to 16384");
  const size_t bytes = size_t(width) * size_t(height) * 3;
  if (d.size() - pos < bytes)
    return invalid(path + ": PPM pixel data is truncated");
  return dgms_rt::preprocess_rgb_image(settings, d.data() + pos, height,
                                       width, tensor, info);
}

uint32_t rd32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) |
         (uint32_t(p[3]) << 24);
}

// Tensor file: "DGMSTENS", u32 version 1, u32 C, H, W, u32 img_height,
// img_width, f64 scale_w, scale_h, then C*H*W float32, all little-endian.
Status load_tensor(const std::vector<uint8_t>& d, const std::string& path,
                   dgms_rt::Tensor* tensor, dgms_rt::ImageInfo* info) {
  const size_t header = 48;
  if (d.size() < header)
    return invalid(path + ": tensor file shorter than its 48-byte header");
  if (rd32(d.data() + 8) != 1)
    return invalid(path + ": tensor file version " +
                   std::to_string(rd32(d.data() + 8)) + " is not 1");
  const uint32_t c = rd32(d.data() + 12), h = rd32(d.data() + 16),
                 w = rd32(d.data() + 20);
  if (c != 3 || h < 1 || w < 1 || h > 16384 || w > 16384)
    return invalid(path + ": tensor shape (" + std::to_string(c) + ", " +
                   std::to_string(h) + ", " + std::to_string(w) +
                   ") must be (3, H, W) with H and W in 1 to 16384");
  info->img_height = rd32(d.data() + 24);
  info->img_width = rd32(d.data() + 28);
  std::memcpy(&info->scale_w, d.data() + 32, 8);
  std::memcpy(&info->scale_h, d.data() + 40, 8);
  const size_t count = size_t(c) * h * w;
  if (d.size() != header + 4 * count)
    return invalid(path + ": tensor file has " + std::to_string(d.size()) +
                   " bytes, expected " + std::to_string(header + 4 * count));
  tensor->shape = {1, int64_t(c), int64_t(h), int64_t(w)};
  tensor->data.resize(count);
  std::memcpy(tensor->data.data(), d.data() + header, 4 * count);
  return Status::Ok();
}

void put32(std::vector<uint8_t>* out, uint32_t v) {
  for (int shift = 0; shift < 32; shift += 8)
    out->push_back(uint8_t((v >> shift) & 0xff));
}

// Serialises a (1, 3, H, W) tensor and its image geometry in the layout
// that load_tensor reads. Floats and doubles are copied in host byte order,
// as load_tensor reads them, which is little-endian on x86-64 and AArch64.
std::vector<uint8_t> encode_tensor(const dgms_rt::Tensor& tensor,
                                   const dgms_rt::ImageInfo& info) {
  std::vector<uint8_t> out(std::begin("DGMSTENS"), std::end("DGMSTENS") - 1);
  put32(&out, 1);
  for (size_t i = 1; i < 4; ++i) put32(&out, uint32_t(tensor.shape[i]));
  put32(&out, uint32_t(info.img_height));
  put32(&out, uint32_t(info.img_width));
  const double scales[2] = {info.scale_w, info.scale_h};
  const size_t header = out.size();
  out.resize(header + sizeof(scales) + 4 * tensor.data.size());
  std::memcpy(out.data() + header, scales, sizeof(scales));
  std::memcpy(out.data() + header + sizeof(scales), tensor.data.data(),
              4 * tensor.data.size());
  return out;
}

// Writes data to a new file beside path, flushes it to disk and renames it
// to path, so that path is either replaced whole or left as it was. On any
// failure the temporary file is removed and the error names the file.
Status write_file_atomically(const std::string& path, const void* data,
                             size_t size) {
  const std::string tmp = path + ".tmp" + std::to_string(getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                        0666);
  if (fd < 0) {
    const int code = errno;
    std::string message = "cannot create " + tmp +
                          ", the temporary file for " + path + ": " +
                          std::strerror(code);
    if (code == ENOENT || code == EACCES)
      message += " (check that the folder exists and is writable)";
    return invalid(message);
  }
  const char* bytes = static_cast<const char*>(data);
  size_t written = 0;
  std::string error;
  while (written < size && error.empty()) {
    const ssize_t n = ::write(fd, bytes + written, size - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) error = std::strerror(n < 0 ? errno : EIO);
    else written += size_t(n);
  }
  if (error.empty() && ::fsync(fd) != 0) error = std::strerror(errno);
  if (::close(fd) != 0 && error.empty()) error = std::strerror(errno);
  if (!error.empty()) {
    std::remove(tmp.c_str());
    return invalid("cannot write " + tmp + ": " + error);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    error = std::strerror(errno);
    std::remove(tmp.c_str());
    return invalid("cannot rename " + tmp + " to " + path + ": " + error);
  }
  return Status::Ok();
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

// Prints the usage to `stream`; returns `code`, the exit status.
int usage(FILE* stream = stderr, int code = 2) {
  std::fprintf(stream,
               "usage: dgms_detect MODEL.dgms INPUT [--threads N] "
               "[--output dets.json] [--repeat R] [--warmup W] [--profile]\n"
               "                   [--dense-algorithm auto|direct] "
               "[--dump-input tensor.bin]\n"
               "                   [--isa auto|scalar|avx2|avx512|neon] "
               "[--chain-band KIB]\n"
               "                   [--quant-winograd KIB] "
               "[--sibling-convs merge|separate]\n"
               "INPUT: a binary PPM (P6) image or a DGMSTENS tensor file\n"
               "--threads: conv threads (default 1); --repeat: time R "
               "detect runs after W\n"
               "  warm-up runs (default W 1); --profile: time per operator "
               "kind of one run\n"
               "--dump-input: write the preprocessed network input (resized, "
               "normalised, padded)\n"
               "  to this file as a DGMSTENS tensor file\n"
               "--dense-algorithm: how full-precision 3x3 stride-1 layers "
               "run: auto (Winograd\n"
               "  where faster, default) or direct (no Winograd, 4x less "
               "filter memory)\n"
               "--isa: instruction set of the conv kernels (default auto: "
               "NEON on AArch64,\n"
               "  AVX2 on x86-64 CPUs with AVX2 and FMA, else scalar)\n"
               "--chain-band: working set of one band of a depthwise conv "
               "chain in KiB\n"
               "  (0 to 1048576, default 1024, about a core's L2 cache); 0 "
               "runs each conv\n"
               "  on its whole input.\n"
               "  It changes speed, not results.\n"
               "--quant-winograd: largest Winograd filters a quantized 3x3 "
               "stride-1 layer keeps\n"
               "  and runs on its decoded weights, in KiB (0 to 1048576, "
               "default 1024); 0 runs\n"
               "  the codebook kernels only\n"
               "--sibling-convs: full-precision convs that read the same "
               "input with the same\n"
               "  geometry run as one conv (merge, default) or one by one "
               "(separate).\n"
               "  It changes speed, not results.\n");
  return code;
}

int fail(const Status& s) {
  std::fprintf(stderr, "dgms_detect: error: %s\n", s.message().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  int threads = 1, repeat = 0, warmup = 1, chain_band_kib = 1024;
  int quant_winograd_kib = 1024;
  bool profile = false, merge_sibling_convs = true;
  std::string output, dump_input;
  dgms_rt::DenseAlgorithm dense_algorithm = dgms_rt::DenseAlgorithm::kAuto;
  dgms_rt::Isa isa = dgms_rt::Isa::kAuto;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* name) -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "dgms_detect: %s needs a value\n", name);
        std::exit(2);
      }
      return argv[++i];
    };
    auto integer = [&](const char* name, int low, int high) {
      const char* text = value(name);
      char* end = nullptr;
      const long v = std::strtol(text, &end, 10);
      if (*text == '\0' || *end != '\0' || v < low || v > high) {
        std::fprintf(stderr, "dgms_detect: %s is '%s', expected an integer "
                     "in [%d, %d]\n", name, text, low, high);
        std::exit(2);
      }
      return int(v);
    };
    if (arg == "--threads") threads = integer("--threads", 1, 256);
    else if (arg == "--repeat") repeat = integer("--repeat", 1, 100000);
    else if (arg == "--warmup") warmup = integer("--warmup", 0, 100000);
    else if (arg == "--output") output = value("--output");
    else if (arg == "--dump-input") dump_input = value("--dump-input");
    else if (arg == "--profile") profile = true;
    else if (arg == "--chain-band")
      chain_band_kib = integer("--chain-band", 0, 1 << 20);
    else if (arg == "--quant-winograd")
      quant_winograd_kib = integer("--quant-winograd", 0, 1 << 20);
    else if (arg == "--dense-algorithm") {
      const std::string name = value("--dense-algorithm");
      if (name == "auto") {
        dense_algorithm = dgms_rt::DenseAlgorithm::kAuto;
      } else if (name == "direct") {
        dense_algorithm = dgms_rt::DenseAlgorithm::kDirect;
      } else {
        std::fprintf(stderr, "dgms_detect: --dense-algorithm is '%s', "
                     "expected auto or direct\n", name.c_str());
        return 2;
      }
    }
    else if (arg == "--sibling-convs") {
      const std::string name = value("--sibling-convs");
      if (name == "merge" || name == "separate") {
        merge_sibling_convs = name == "merge";
      } else {
        std::fprintf(stderr, "dgms_detect: --sibling-convs is '%s', "
                     "expected merge or separate\n", name.c_str());
        return 2;
      }
    }
    else if (arg == "--isa") {
      const std::string name = value("--isa");
      bool known = false;
      for (dgms_rt::Isa candidate :
           {dgms_rt::Isa::kAuto, dgms_rt::Isa::kScalar, dgms_rt::Isa::kAvx2,
            dgms_rt::Isa::kAvx512, dgms_rt::Isa::kNeon}) {
        if (name == dgms_rt::isa_name(candidate)) {
          isa = candidate;
          known = true;
        }
      }
      if (!known) {
        std::fprintf(stderr, "dgms_detect: --isa is '%s', expected auto, "
                     "scalar, avx2, avx512 or neon\n", name.c_str());
        return 2;
      }
    }
    else if (arg == "-h" || arg == "--help") return usage(stdout, 0);
    else if (arg.rfind("--", 0) == 0) {
      std::fprintf(stderr, "dgms_detect: unknown option %s\n", arg.c_str());
      return usage();
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) {
    std::fprintf(stderr, "dgms_detect: expected two arguments, MODEL.dgms "
                 "and INPUT, got %zu\n", positional.size());
    return usage();
  }
  // Output paths are checked before any work, so a bad one neither
  // overwrites an input nor leaves the other output behind.
  std::string output_target, dump_target;
  if (!output.empty()) {
    Status s = check_output_path("--output", output, positional,
                                 &output_target);
    if (!s.ok()) return fail(s);
  }
  if (!dump_input.empty()) {
    Status s = check_output_path("--dump-input", dump_input, positional,
                                 &dump_target);
    if (!s.ok()) return fail(s);
  }
  if (!output.empty() && output_target == dump_target) {
    return fail(invalid("--output '" + output + "' and --dump-input '" +
                        dump_input + "' are the same file; give them "
                        "different files"));
  }

  if (!dgms_rt::isa_supported(isa)) {
    std::fprintf(stderr, "dgms_detect: --isa %s is not available in this "
                 "build or on this CPU; use --isa auto\n",
                 dgms_rt::isa_name(isa));
    return 1;
  }

  dgms_rt::ModelOptions options;
  options.threads = threads;
  options.dense_algorithm = dense_algorithm;
  options.isa = isa;
  options.chain_band_bytes = int64_t(chain_band_kib) * 1024;
  options.quant_winograd_max_bytes = int64_t(quant_winograd_kib) * 1024;
  options.merge_sibling_convs = merge_sibling_convs;
  std::unique_ptr<dgms_rt::Model> model;
  const auto load_start = std::chrono::steady_clock::now();
  Status s = dgms_rt::Model::load_file(positional[0], options, &model);
  if (!s.ok()) return fail(s);
  const double load_ms = std::chrono::duration<double, std::milli>(
      std::chrono::steady_clock::now() - load_start).count();

  std::vector<uint8_t> input;
  s = read_file(positional[1], &input);
  if (!s.ok()) return fail(s);
  dgms_rt::Tensor tensor;
  dgms_rt::ImageInfo info;
  if (input.size() >= 2 && input[0] == 'P' && input[1] == '6') {
    s = load_ppm(input, positional[1], model->preprocess(), &tensor, &info);
  } else if (input.size() >= 8 && std::memcmp(input.data(), "DGMSTENS", 8) ==
                                      0) {
    s = load_tensor(input, positional[1], &tensor, &info);
  } else {
    s = invalid(positional[1] + " is neither a binary PPM (P6) nor a "
                "DGMSTENS tensor file");
  }
  if (!s.ok()) return fail(s);
  if (!dump_input.empty()) {
    const std::vector<uint8_t> bytes = encode_tensor(tensor, info);
    s = write_file_atomically(dump_input, bytes.data(), bytes.size());
    if (!s.ok()) return fail(s);
  }

  std::vector<std::vector<dgms_rt::Detection>> dets;
  for (int i = 0; i < (repeat > 0 ? warmup : 0); ++i) {
    s = model->detect(tensor, {info}, true, &dets);
    if (!s.ok()) return fail(s);
  }
  std::vector<double> times;
  for (int i = 0; i < std::max(repeat, 1); ++i) {
    const auto start = std::chrono::steady_clock::now();
    s = model->detect(tensor, {info}, true, &dets);
    if (!s.ok()) return fail(s);
    times.push_back(std::chrono::duration<double, std::milli>(
        std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  std::fprintf(stderr,
               "dgms_detect: load %.1f ms; detect on %s input, %d thread(s), "
               "isa %s: median %.2f ms, min %.2f ms over %zu run(s)\n",
               load_ms, tensor.shape_string().c_str(), threads,
               dgms_rt::isa_name(dgms_rt::resolve_isa(isa)),
               times[times.size() / 2], times[0], times.size());

  if (profile) {
    std::vector<dgms_rt::Model::NodeTime> node_times;
    const auto graph_start = std::chrono::steady_clock::now();
    s = model->profile_graph("main", {tensor}, &node_times);
    const double graph_ms = std::chrono::duration<double, std::milli>(
                                std::chrono::steady_clock::now() - graph_start)
                                .count();
    if (!s.ok()) return fail(s);
    std::map<std::string, std::pair<double, int>> by_op;
    double total = 0;
    int concurrent = 0;
    for (const auto& t : node_times) {
      by_op[t.op].first += t.ms;
      by_op[t.op].second += 1;
      total += t.ms;
      concurrent += t.concurrent ? 1 : 0;
    }
    std::vector<std::pair<double, std::string>> rows;
    for (const auto& entry : by_op)
      rows.emplace_back(entry.second.first, entry.first);
    std::sort(rows.rbegin(), rows.rend());
    if (concurrent > 0) {
      // Node times of concurrent nodes overlap, so they add up to more
      // than the graph's time.
      std::fprintf(stderr,
                   "dgms_detect: main graph %.2f ms; %d nodes ran "
                   "concurrently with others, so node times add up to "
                   "%.2f ms. By operator:\n",
                   graph_ms, concurrent, total);
    } else {
      std::fprintf(stderr, "dgms_detect: main graph %.2f ms by operator:\n",
                   total);
    }
    for (const auto& row : rows)
      std::fprintf(stderr, "  %-24s %4d nodes %9.2f ms %5.1f%%\n",
                   row.second.c_str(), by_op[row.second].second, row.first,
                   100.0 * row.first / total);
  }

  std::ostringstream json;
  json << "{\"model\": " << json_string(positional[0])
       << ", \"input\": " << json_string(positional[1])
       << ", \"detections\": [";
  const auto& classes = model->classes();
  for (size_t i = 0; i < dets[0].size(); ++i) {
    const auto& d = dets[0][i];
    json << (i ? ",\n  " : "\n  ") << "{\"bbox\": [" << number(d.x1) << ", "
         << number(d.y1) << ", " << number(d.x2) << ", " << number(d.y2)
         << "], \"score\": " << number(d.score) << ", \"label\": " << d.label
         << ", \"class\": "
         << (d.label < int64_t(classes.size())
                 ? json_string(classes[size_t(d.label)])
                 : std::string("null"))
         << "}";
  }
  json << "]}\n";
  const std::string text = json.str();
  if (output.empty()) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    return 0;
  }
  s = write_file_atomically(output, text.data(), text.size());
  if (!s.ok()) return fail(s);
  return 0;
}
