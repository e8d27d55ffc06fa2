// Per-layer benchmark of a quantized (codebook) conv kernel, chosen with
// --kernel, against the dense FP32 conv of the same runtime, over the conv
// shapes of ResNet-50 and of a MobileNetV2 backbone.
//
// Each layer is timed as the best of --repeat runs after one warm-up run,
// for every thread count. The quantized layers use random indices, and
// index 0 (pruned) has the given probability. Before timing, each quantized
// layer's output is checked against the dense layer built from its decoded
// weights.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "dgms_rt/conv.h"
#include "reference.h"

using namespace dgms_rt;

namespace {

struct Layer {
  std::string name;
  int64_t in_channels, out_channels, groups, kernel, stride, height;
  int count;  // occurrences in the network

  ConvGeometry geometry() const {
    ConvGeometry g;
    g.in_channels = in_channels;
    g.out_channels = out_channels;
    g.groups = groups;
    g.kernel_h = g.kernel_w = kernel;
    g.stride_h = g.stride_w = stride;
    g.pad_h = g.pad_w = kernel / 2;
    return g;
  }
  double macs() const {
    const int64_t out = (height + 2 * (kernel / 2) - kernel) / stride + 1;
    return static_cast<double>(out_channels) * (in_channels / groups) *
           kernel * kernel * out * out;
  }
};

// Unique conv shapes of MMDetection's ResNet-50 (style 'pytorch', stride on
// the 3x3 conv) for a size x size input; height is the layer's input size.
std::vector<Layer> resnet50(int64_t size) {
  const int64_t s2 = size / 2, s4 = size / 4, s8 = size / 8, s16 = size / 16;
  const int64_t s32 = size / 32;
  return {
      {"stem 7x7/2", 3, 64, 1, 7, 2, size, 1},
      {"l1 1x1 64-64", 64, 64, 1, 1, 1, s4, 1},
      {"l1 3x3 64", 64, 64, 1, 3, 1, s4, 3},
      {"l1 1x1 64-256", 64, 256, 1, 1, 1, s4, 4},  // 3 blocks + downsample
      {"l1 1x1 256-64", 256, 64, 1, 1, 1, s4, 2},
      {"l2 1x1 256-128", 256, 128, 1, 1, 1, s4, 1},
      {"l2 3x3/2 128", 128, 128, 1, 3, 2, s4, 1},
      {"l2 1x1 128-512", 128, 512, 1, 1, 1, s8, 4},
      {"l2 down 1x1/2 256-512", 256, 512, 1, 1, 2, s4, 1},
      {"l2 1x1 512-128", 512, 128, 1, 1, 1, s8, 3},
      {"l2 3x3 128", 128, 128, 1, 3, 1, s8, 3},
      {"l3 1x1 512-256", 512, 256, 1, 1, 1, s8, 1},
      {"l3 3x3/2 256", 256, 256, 1, 3, 2, s8, 1},
      {"l3 1x1 256-1024", 256, 1024, 1, 1, 1, s16, 6},
      {"l3 down 1x1/2 512-1024", 512, 1024, 1, 1, 2, s8, 1},
      {"l3 1x1 1024-256", 1024, 256, 1, 1, 1, s16, 5},
      {"l3 3x3 256", 256, 256, 1, 3, 1, s16, 5},
      {"l4 1x1 1024-512", 1024, 512, 1, 1, 1, s16, 1},
      {"l4 3x3/2 512", 512, 512, 1, 3, 2, s16, 1},
      {"l4 1x1 512-2048", 512, 2048, 1, 1, 1, s32, 3},
      {"l4 down 1x1/2 1024-2048", 1024, 2048, 1, 1, 2, s16, 1},
      {"l4 1x1 2048-512", 2048, 512, 1, 1, 1, s32, 2},
      {"l4 3x3 512", 512, 512, 1, 3, 1, s32, 2},
  };
  (void)s2;
}

// Unique conv shapes of MobileNetV2 (width 1.0, the torchvision and
// MMDetection layout) up to the 320-channel block plus the final 1x1 to
// 1280 channels.
std::vector<Layer> mobilenet_v2(int64_t size) {
  const int64_t s2 = size / 2, s4 = size / 4, s8 = size / 8, s16 = size / 16;
  const int64_t s32 = size / 32;
  return {
      {"stem 3x3/2", 3, 32, 1, 3, 2, size, 1},
      {"b1 dw 3x3 32", 32, 32, 32, 3, 1, s2, 1},
      {"b1 1x1 32-16", 32, 16, 1, 1, 1, s2, 1},
      {"b2 1x1 16-96", 16, 96, 1, 1, 1, s2, 1},
      {"b2 dw 3x3/2 96", 96, 96, 96, 3, 2, s2, 1},
      {"b2 1x1 96-24", 96, 24, 1, 1, 1, s4, 1},
      {"b2 1x1 24-144", 24, 144, 1, 1, 1, s4, 2},
      {"b2 dw 3x3 144", 144, 144, 144, 3, 1, s4, 1},
      {"b2 1x1 144-24", 144, 24, 1, 1, 1, s4, 1},
      {"b3 dw 3x3/2 144", 144, 144, 144, 3, 2, s4, 1},
      {"b3 1x1 144-32", 144, 32, 1, 1, 1, s8, 1},
      {"b3 1x1 32-192", 32, 192, 1, 1, 1, s8, 3},
      {"b3 dw 3x3 192", 192, 192, 192, 3, 1, s8, 2},
      {"b3 1x1 192-32", 192, 32, 1, 1, 1, s8, 2},
      {"b4 dw 3x3/2 192", 192, 192, 192, 3, 2, s8, 1},
      {"b4 1x1 192-64", 192, 64, 1, 1, 1, s16, 1},
      {"b4 1x1 64-384", 64, 384, 1, 1, 1, s16, 4},
      {"b4 dw 3x3 384", 384, 384, 384, 3, 1, s16, 4},
      {"b4 1x1 384-64", 384, 64, 1, 1, 1, s16, 3},
      {"b5 1x1 384-96", 384, 96, 1, 1, 1, s16, 1},
      {"b5 1x1 96-576", 96, 576, 1, 1, 1, s16, 3},
      {"b5 dw 3x3 576", 576, 576, 576, 3, 1, s16, 2},
      {"b5 1x1 576-96", 576, 96, 1, 1, 1, s16, 2},
      {"b6 dw 3x3/2 576", 576, 576, 576, 3, 2, s16, 1},
      {"b6 1x1 576-160", 576, 160, 1, 1, 1, s32, 1},
      {"b6 1x1 160-960", 160, 960, 1, 1, 1, s32, 3},
      {"b6 dw 3x3 960", 960, 960, 960, 3, 1, s32, 3},
      {"b6 1x1 960-160", 960, 160, 1, 1, 1, s32, 2},
      {"b7 1x1 960-320", 960, 320, 1, 1, 1, s32, 1},
      {"final 1x1 320-1280", 320, 1280, 1, 1, 1, s32, 1},
  };
}

// The full-precision convs of a RetinaNet head (256 channels, 4 stacked
// convs per branch, 9 anchors, 80 classes) on the five FPN levels of a
// size x size input, strides 8 to 128.
std::vector<Layer> retinanet_head(int64_t size) {
  std::vector<Layer> layers;
  for (int level = 3; level <= 7; ++level) {
    const int64_t side = size >> level;
    if (side < 1) break;
    const std::string p = "P" + std::to_string(level) + " ";
    layers.push_back({p + "3x3 256", 256, 256, 1, 3, 1, side, 8});
    layers.push_back({p + "cls 3x3 256-720", 256, 720, 1, 3, 1, side, 1});
    layers.push_back({p + "reg 3x3 256-36", 256, 36, 1, 3, 1, side, 1});
  }
  return layers;
}

struct Options {
  std::string net = "all";
  int64_t size = 512;
  std::vector<int> threads = {1, 2};
  std::vector<int> bits = {2, 4};
  std::vector<double> sparsities = {0.1, 0.4};
  int repeat = 3;
  Isa isa = Isa::kAuto;
  std::string filter;
  QuantKernel kernel = QuantKernel::kAccumulate;
  bool thread_clock = false;
  bool smoke = false;
};

[[noreturn]] void usage(const char* message) {
  std::fprintf(stderr,
               "error: %s\n"
               "usage: dgms_runtime_bench [--net resnet50|mobilenetv2|head|all] "
               "[--size PIXELS] [--threads 1,2] [--bits 2,4]\n"
               "       [--sparsity 0.1,0.4] [--repeat N] "
               "[--isa auto|scalar|avx2|avx512|neon] [--filter TEXT]\n"
               "       [--kernel accumulate|lookup|auto] [--clock wall|thread] "
               "[--smoke]\n"
               "  --sparsity  fractions of weights with index 0 (pruned)\n"
               "  --filter    only layers whose name contains TEXT\n"
               "  --kernel    quantized kernel (default accumulate)\n"
               "  --clock     wall time (default) or the CPU time of the "
               "calling thread,\n"
               "              which other processes do not inflate "
               "(needs --threads 1)\n"
               "  --smoke     one small layer, one run: checks that the "
               "program works\n",
               message);
  std::exit(2);
}

template <class T>
std::vector<T> parse_list(const char* text, const char* option) {
  std::vector<T> values;
  std::string item;
  std::string all = std::string(text) + ",";
  for (char ch : all) {
    if (ch != ',') {
      item += ch;
      continue;
    }
    char* end = nullptr;
    const double value = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0') {
      usage((std::string("invalid value '") + item + "' for " + option).c_str());
    }
    values.push_back(static_cast<T>(value));
    item.clear();
  }
  return values;
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage((arg + " needs a value").c_str());
      return argv[++i];
    };
    if (arg == "--net") {
      options.net = value();
    } else if (arg == "--size") {
      options.size = std::atoll(value());
    } else if (arg == "--threads") {
      options.threads = parse_list<int>(value(), "--threads");
    } else if (arg == "--bits") {
      options.bits = parse_list<int>(value(), "--bits");
    } else if (arg == "--sparsity") {
      options.sparsities = parse_list<double>(value(), "--sparsity");
    } else if (arg == "--repeat") {
      options.repeat = std::atoi(value());
    } else if (arg == "--isa") {
      const std::string name = value();
      if (name == "auto") options.isa = Isa::kAuto;
      else if (name == "scalar") options.isa = Isa::kScalar;
      else if (name == "avx2") options.isa = Isa::kAvx2;
      else if (name == "avx512") options.isa = Isa::kAvx512;
      else if (name == "neon") options.isa = Isa::kNeon;
      else usage(("unknown isa " + name).c_str());
    } else if (arg == "--kernel") {
      const std::string name = value();
      if (name == "accumulate") options.kernel = QuantKernel::kAccumulate;
      else if (name == "lookup") options.kernel = QuantKernel::kLookup;
      else if (name == "auto") options.kernel = QuantKernel::kAuto;
      else usage(("unknown kernel " + name).c_str());
    } else if (arg == "--clock") {
      const std::string name = value();
      if (name != "wall" && name != "thread") usage("--clock is wall or thread");
      options.thread_clock = name == "thread";
    } else if (arg == "--filter") {
      options.filter = value();
    } else if (arg == "--smoke") {
      options.smoke = true;
    } else {
      usage(("unknown option " + arg).c_str());
    }
  }
  if (options.net != "resnet50" && options.net != "mobilenetv2" &&
      options.net != "head" && options.net != "all") {
    usage(("unknown net " + options.net).c_str());
  }
  if (options.size < 32 || options.size % 32 != 0) {
    usage("--size must be a positive multiple of 32");
  }
  if (options.repeat < 1) usage("--repeat must be at least 1");
  for (int t : options.threads) {
    if (t < 1 || t > ThreadPool::kMaxThreads) {
      usage(("--threads value " + std::to_string(t) + " is not in [1, " +
             std::to_string(ThreadPool::kMaxThreads) + "]").c_str());
    }
  }
  for (int b : options.bits) {
    if (b < 1 || b > 8) usage("--bits values must be in [1, 8]");
  }
  for (double s : options.sparsities) {
    if (!(s >= 0.0 && s <= 1.0)) usage("--sparsity values must be in [0, 1]");
  }
  if (!isa_supported(options.isa)) usage("the requested isa is not supported");
  if (options.thread_clock &&
      (options.threads.size() != 1 || options.threads[0] != 1)) {
    usage("--clock thread measures one thread only: use --threads 1");
  }
  return options;
}

void die(const Status& status, const std::string& context) {
  std::fprintf(stderr, "error: %s: %s\n", context.c_str(),
               status.message().c_str());
  std::exit(1);
}

// Milliseconds on the wall clock or the calling thread's CPU clock.
double now_ms(bool thread_clock) {
  timespec now;
  clock_gettime(thread_clock ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC,
                &now);
  return now.tv_sec * 1e3 + now.tv_nsec * 1e-6;
}

// Shortest time of `repeat` runs, in milliseconds, after one warm-up.
// The minimum rather than the median, because on a shared machine the
// other processes only ever add time.
double time_ms(const Conv2d& conv, const std::vector<float>& input,
               int64_t height, std::vector<float>* output, ThreadPool* pool,
               int repeat, bool thread_clock) {
  auto run = [&] {
    Status status = conv.run(input.data(), static_cast<int64_t>(input.size()),
                             height, height, output->data(),
                             static_cast<int64_t>(output->size()), pool);
    if (!status.ok()) die(status, "run");
  };
  run();
  std::vector<double> times;
  for (int r = 0; r < repeat; ++r) {
    const double start = now_ms(thread_clock);
    run();
    times.push_back(now_ms(thread_clock) - start);
  }
  return *std::min_element(times.begin(), times.end());
}

// Checks a quantized layer against the dense layer of its decoded,
// scaled weights; exits when they disagree beyond float rounding.
void check_against_dense(const testing::QuantLayer& layer,
                         const QuantConv2d& quant, int64_t height,
                         const std::vector<float>& input, ThreadPool* pool) {
  const ConvGeometry g = layer.geometry;
  std::vector<float> weights = layer.decoded_weights();
  const int64_t taps = (g.in_channels / g.groups) * g.kernel_h * g.kernel_w;
  for (int64_t i = 0; i < static_cast<int64_t>(weights.size()); ++i) {
    weights[i] *= layer.scale[i / taps];
  }
  DenseConvDesc desc;
  desc.geometry = g;
  desc.weights = weights.data();
  desc.weights_size = static_cast<int64_t>(weights.size());
  desc.bias = layer.bias.data();
  desc.bias_size = static_cast<int64_t>(layer.bias.size());
  desc.algorithm = DenseAlgorithm::kDirect;
  std::unique_ptr<DenseConv2d> dense;
  Status status = DenseConv2d::create(desc, quant.isa(), &dense);
  if (!status.ok()) die(status, "dense create");

  int64_t out_h = 0, out_w = 0;
  conv_output_size(g, height, height, &out_h, &out_w);
  std::vector<float> a(g.out_channels * out_h * out_w);
  std::vector<float> b(a.size());
  const int64_t in_size = static_cast<int64_t>(input.size());
  if (!(status = quant.run(input.data(), in_size, height, height, a.data(),
                           static_cast<int64_t>(a.size()), pool)).ok() ||
      !(status = dense->run(input.data(), in_size, height, height, b.data(),
                            static_cast<int64_t>(b.size()), pool)).ok()) {
    die(status, "check run");
  }
  double max_error = 0.0, max_value = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_error = std::max(max_error, static_cast<double>(std::fabs(a[i] - b[i])));
    max_value = std::max(max_value, static_cast<double>(std::fabs(b[i])));
  }
  if (max_error > 1e-4 * (max_value + 1.0)) {
    std::fprintf(stderr,
                 "error: quantized and dense outputs differ by %g (max |y| "
                 "%g)\n", max_error, max_value);
    std::exit(1);
  }
}

void bench_net(const char* title, std::vector<Layer> layers,
               const Options& options, std::mt19937* rng) {
  if (options.smoke) {
    layers = {{"smoke 3x3 16-24", 16, 24, 1, 3, 1, 32, 1}};
  }
  std::printf("\n## %s, input %lldx%lld, isa %s, quantized kernel %s, "
              "best of %d runs, %s\n",
              title, static_cast<long long>(options.size),
              static_cast<long long>(options.size),
              isa_name(resolve_isa(options.isa)),
              quant_kernel_name(options.kernel), options.repeat,
              options.thread_clock ? "thread CPU time" : "wall time");

  struct Variant {
    int bits;
    double sparsity;
  };
  std::vector<Variant> variants;
  for (int b : options.bits) {
    for (double s : options.sparsities) variants.push_back({b, s});
  }

  for (int threads : options.threads) {
    ThreadPool pool(threads);
    std::printf("\nthreads %d: time in ms (speed-up over the direct dense "
                "FP32 kernel)\n", threads);
    std::printf("%-24s %5s %8s %9s %16s", "layer", "count", "MMAC", "fp32",
                "fp32 winograd");
    for (const Variant& v : variants) {
      char head[32];
      std::snprintf(head, sizeof(head), "%db@%.0f%%", v.bits, v.sparsity * 100);
      std::printf(" %16s", head);
    }
    std::printf("\n");

    double total_dense = 0.0;
    double total_auto = 0.0;
    std::vector<double> total_quant(variants.size(), 0.0);
    double total_macs = 0.0;
    for (const Layer& layer : layers) {
      if (layer.name.find(options.filter) == std::string::npos) continue;
      const ConvGeometry g = layer.geometry();
      int64_t out_h = 0, out_w = 0;
      Status status = conv_output_size(g, layer.height, layer.height, &out_h,
                                       &out_w);
      if (!status.ok()) die(status, layer.name);
      const std::vector<float> input = testing::random_floats(
          g.in_channels * layer.height * layer.height, -1.0f, 1.0f, rng);
      std::vector<float> output(g.out_channels * out_h * out_w);

      const std::vector<float> weights =
          testing::random_floats(testing::weight_count(g), -0.1f, 0.1f, rng);
      DenseConvDesc dense_desc;
      dense_desc.geometry = g;
      dense_desc.weights = weights.data();
      dense_desc.weights_size = static_cast<int64_t>(weights.size());
      dense_desc.algorithm = DenseAlgorithm::kDirect;
      std::unique_ptr<DenseConv2d> dense;
      status = DenseConv2d::create(dense_desc, options.isa, &dense);
      if (!status.ok()) die(status, layer.name);
      const double dense_ms = time_ms(*dense, input, layer.height, &output,
                                      &pool, options.repeat, options.thread_clock);
      total_dense += dense_ms * layer.count;
      total_macs += layer.macs() * layer.count;
      std::printf("%-24s %5d %8.1f %9.3f", layer.name.c_str(), layer.count,
                  layer.macs() / 1e6, dense_ms);

      // The dense layer as the runtime runs it by default: Winograd where
      // DenseAlgorithm::kAuto picks it, else the same direct kernel.
      dense_desc.algorithm = DenseAlgorithm::kAuto;
      std::unique_ptr<DenseConv2d> automatic;
      status = DenseConv2d::create(dense_desc, options.isa, &automatic);
      if (!status.ok()) die(status, layer.name);
      double auto_ms = dense_ms;
      if (automatic->uses_winograd(layer.height, layer.height)) {
        auto_ms = time_ms(*automatic, input, layer.height, &output, &pool,
                          options.repeat, options.thread_clock);
        std::printf(" %9.3f (%4.2fx)", auto_ms, dense_ms / auto_ms);
      } else {
        std::printf(" %16s", "-");
      }
      total_auto += auto_ms * layer.count;

      for (size_t v = 0; v < variants.size(); ++v) {
        const testing::QuantLayer quant_layer = testing::random_quant_layer(
            g, variants[v].bits, variants[v].sparsity, Activation::kNone, rng);
        std::unique_ptr<QuantConv2d> quant;
        status = QuantConv2d::create(quant_layer.desc(), options.isa, &quant,
                                     options.kernel);
        if (!status.ok()) die(status, layer.name);
        check_against_dense(quant_layer, *quant, layer.height, input, &pool);
        const double ms = time_ms(*quant, input, layer.height, &output, &pool,
                                  options.repeat, options.thread_clock);
        total_quant[v] += ms * layer.count;
        std::printf(" %9.3f (%4.2fx)", ms, dense_ms / ms);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
    std::printf("%-24s %5s %8.1f %9.2f %9.2f (%4.2fx)",
                "network total (x count)", "", total_macs / 1e6, total_dense,
                total_auto, total_dense / total_auto);
    for (double total : total_quant) {
      std::printf(" %9.2f (%4.2fx)", total, total_dense / total);
    }
    std::printf("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  std::mt19937 rng(7);
  std::printf("dgms_runtime_bench: isa %s\n",
              isa_name(resolve_isa(options.isa)));
  if (options.net == "resnet50" || options.net == "all") {
    bench_net("ResNet-50", resnet50(options.size), options, &rng);
  }
  if (options.smoke) return 0;
  if (options.net == "mobilenetv2" || options.net == "all") {
    bench_net("MobileNetV2", mobilenet_v2(options.size), options, &rng);
  }
  if (options.net == "head" || options.net == "all") {
    bench_net("RetinaNet head (FP32 in the DGMS configs)",
              retinanet_head(options.size), options, &rng);
  }
  return 0;
}
