// Reader of the packed format: container, JSON sections, layer table,
// index streams and graphs, with every check of docs/packed-format.md.
#include "loader.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <set>

namespace dgms_rt {
namespace {

// What a checksum mismatch means for the user.
const std::string kDamaged =
    ": the file was damaged after it was written; copy or pack it again";

constexpr uint64_t kHeaderSize = 64;
constexpr uint64_t kAlignment = 64;
constexpr uint64_t kEntrySize = 32;
constexpr uint64_t kMaxSections = uint64_t(1) << 20;
constexpr int kMajorVersion = 1;
// Limits of the reference reader: no detector reaches them.
constexpr int64_t kMaxChannels = int64_t(1) << 16;
constexpr int64_t kMaxKernel = 64;
constexpr int64_t kMaxStride = 64;
constexpr int64_t kMaxPadding = int64_t(1) << 12;
constexpr int64_t kMaxFeatures = int64_t(1) << 24;
constexpr uint32_t kRansPrecision = 16;
constexpr uint32_t kRansTotal = uint32_t(1) << kRansPrecision;
constexpr uint32_t kRansLow = uint32_t(1) << 16;
constexpr uint32_t kRansMaxLanes = 4096;

uint16_t rd16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
uint32_t rd32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) |
         (uint32_t(p[3]) << 24);
}
uint64_t rd64(const uint8_t* p) {
  return uint64_t(rd32(p)) | (uint64_t(rd32(p + 4)) << 32);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31;
  const uint32_t exponent = (h >> 10) & 0x1F;
  const uint32_t mantissa = h & 0x3FF;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = mantissa;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((m & 0x3FF) << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Section {
  std::string tag;
  const uint8_t* data;
  uint64_t size;
};

class Reader {
 public:
  explicit Reader(const std::string& source) : source_(source) {}

  Status fail(const std::string& where, const std::string& message) const {
    return Status(StatusCode::kInvalidArgument,
                  source_ + ": " + where + ": " + message);
  }
  Status fail_file(const std::string& message) const {
    return Status(StatusCode::kInvalidArgument, source_ + " " + message);
  }
  // "FILE: WHERE MESSAGE", for a message that continues a sentence about
  // `where` ("is corrupt").
  Status fail_part(const std::string& where, const std::string& message) const {
    return Status(StatusCode::kInvalidArgument,
                  source_ + ": " + where + " " + message);
  }

  // ---- JSON field access ----
  Status field(const Json& obj, const char* key, const std::string& where,
               const Json** out) const {
    const Json* v = obj.find(key);
    if (v == nullptr)
      return fail(where, std::string("missing field '") + key + "'");
    *out = v;
    return Status::Ok();
  }
  Status get_int(const Json& obj, const char* key, int64_t low, int64_t high,
                 const std::string& where, int64_t* out,
                 const int64_t* fallback = nullptr) const {
    if (fallback && obj.is_object() && obj.find(key) == nullptr) {
      *out = *fallback;
      return Status::Ok();
    }
    const Json* v;
    Status s = field(obj, key, where, &v);
    if (!s.ok()) return s;
    if (!v->is_int())
      return fail(where, std::string(key) + " must be an integer, got " +
                             v->describe());
    if (v->as_int() < low || v->as_int() > high)
      return fail(where, std::string(key) + "=" +
                             std::to_string(v->as_int()) + " is outside [" +
                             std::to_string(low) + ", " +
                             std::to_string(high) + "]");
    *out = v->as_int();
    return Status::Ok();
  }
  Status get_pair(const Json& obj, const char* key, int64_t low, int64_t high,
                  const std::string& where, int64_t out[2],
                  const int64_t* fallback = nullptr) const {
    if (fallback && obj.is_object() && obj.find(key) == nullptr) {
      out[0] = fallback[0];
      out[1] = fallback[1];
      return Status::Ok();
    }
    const Json* v;
    Status s = field(obj, key, where, &v);
    if (!s.ok()) return s;
    bool ok = v->is_array() && v->items().size() == 2;
    for (size_t i = 0; ok && i < 2; ++i) {
      const Json& item = v->items()[i];
      ok = item.is_int() && item.as_int() >= low && item.as_int() <= high;
      if (ok) out[i] = item.as_int();
    }
    if (!ok)
      return fail(where, std::string(key) + "=" + v->describe() +
                             " must be two integers in [" +
                             std::to_string(low) + ", " +
                             std::to_string(high) + "]");
    return Status::Ok();
  }
  Status get_string(const Json& obj, const char* key, const std::string& where,
                    std::string* out) const {
    const Json* v;
    Status s = field(obj, key, where, &v);
    if (!s.ok()) return s;
    if (!v->is_string())
      return fail(where, std::string(key) + " must be a string, got " +
                             v->describe());
    *out = v->as_string();
    return Status::Ok();
  }

  // ---- container ----
  Status container(const uint8_t* data, uint64_t size,
                   std::vector<Section>* sections) const {
    // The magic first, so that a short file of another kind is named as
    // such rather than as a truncated model.
    const size_t magic_bytes = size < 8 ? static_cast<size_t>(size) : 8;
    if (magic_bytes > 0 && std::memcmp(data, "DGMSPACK", magic_bytes) != 0)
      return fail_file(
          "is not a packed DGMS model: its magic is not DGMSPACK. Create one "
          "with tools/pack.py");
    if (size < kHeaderSize)
      return fail_file("is truncated: " + std::to_string(size) +
                       " bytes, shorter than the 64-byte header; copy or "
                       "pack it again");
    const int major = rd16(data + 8), minor = rd16(data + 10);
    const std::string version = std::to_string(major) + "." +
                                std::to_string(minor);
    if (major > kMajorVersion)
      return fail_file("has format version " + version +
                       ", newer than the 1.0 this runtime reads; update the "
                       "runtime to read it");
    if (major < 1)
      return fail_file("has an invalid format version " + version);
    uint8_t header[kHeaderSize];
    std::memcpy(header, data, kHeaderSize);
    std::memset(header + 44, 0, 4);
    if (crc32(header, kHeaderSize) != rd32(data + 44))
      return fail_file("has a corrupt header (CRC-32 mismatch)" + kDamaged);
    if (rd32(data + 12) != kHeaderSize || rd32(data + 28) != kAlignment)
      return fail_file("has header size " + std::to_string(rd32(data + 12)) +
                       " and alignment " + std::to_string(rd32(data + 28)) +
                       "; version " + version + " requires 64 and 64");
    const uint64_t file_size = rd64(data + 16);
    if (file_size != size)
      return fail_file("is " + std::to_string(size) +
                       " bytes but its header records " +
                       std::to_string(file_size) +
                       ": the file is truncated or has trailing data; "
                       "copy or pack it again");
    const uint64_t count = rd32(data + 24);
    if (count > kMaxSections)
      return fail_file("declares " + std::to_string(count) +
                       " sections, more than the limit " +
                       std::to_string(kMaxSections));
    const uint64_t table_offset = rd64(data + 32);
    if (table_offset > size || count * kEntrySize > size - table_offset)
      return fail_file("has a section table outside the file");
    const uint64_t table_end = table_offset + count * kEntrySize;
    if (table_offset < kHeaderSize)
      return fail_file("has its section table inside the header");
    if (crc32(data + table_offset, count * kEntrySize) != rd32(data + 40))
      return fail_file("has a corrupt section table (CRC-32 mismatch)" +
                       kDamaged);
    Status s = padding(data, kHeaderSize, table_offset);
    if (!s.ok()) return s;
    uint64_t previous_end = table_end;
    for (uint64_t i = 0; i < count; ++i) {
      const uint8_t* e = data + table_offset + i * kEntrySize;
      std::string tag;
      for (int k = 0; k < 4; ++k) {
        const char c = char(e[k]);
        tag += (c >= 32 && c < 127) ? c : '?';
      }
      const std::string where = "section " + std::to_string(i) + " (" + tag +
                                ")";
      const uint64_t offset = rd64(e + 8), length = rd64(e + 16);
      if (offset % kAlignment)
        return fail_part(where, "starts at byte " + std::to_string(offset) +
                                    ", which is not a multiple of 64");
      if (offset < previous_end || offset > size || length > size - offset)
        return fail_part(where, "spans bytes " + std::to_string(offset) +
                                    "+" + std::to_string(length) +
                                    ", which overlaps another part or lies "
                                    "outside the " + std::to_string(size) +
                                    "-byte file");
      if (rd32(e + 4) != 0 || rd32(e + 28) != 0)
        return fail_part(where, "has non-zero flags or reserved bytes");
      s = padding(data, previous_end, offset);
      if (!s.ok()) return s;
      if (crc32(data + offset, length) != rd32(e + 24))
        return fail_part(where, "is corrupt (CRC-32 mismatch)" + kDamaged);
      sections->push_back(Section{tag, data + offset, length});
      previous_end = offset + length;
    }
    return padding(data, previous_end, size);
  }

  Status padding(const uint8_t* data, uint64_t start, uint64_t end) const {
    for (uint64_t i = start; i < end; ++i)
      if (data[i] != 0)
        return fail_file("has non-zero bytes in the alignment padding at "
                         "byte " + std::to_string(i) + ": the file is "
                         "corrupt");
    return Status::Ok();
  }

  Status parse_json(const Section& section, Json* out) const {
    Status s = Json::parse(reinterpret_cast<const char*>(section.data),
                           size_t(section.size), out);
    if (!s.ok())
      return fail(section.tag, "the section is not valid JSON: " +
                                   s.message());
    if (!out->is_object())
      return fail(section.tag, "the section must hold a JSON object");
    return Status::Ok();
  }

  // ---- arrays inside a LAYR section ----
  Status raw(const Section& section, const Json& entry, const char* key,
             const std::string& where, const uint8_t** data,
             uint64_t* nbytes) const {
    const Json* ref;
    Status s = field(entry, key, where, &ref);
    if (!s.ok()) return s;
    if (!ref->is_array() || ref->items().size() != 2 ||
        !ref->items()[0].is_int() || !ref->items()[1].is_int())
      return fail(where, std::string(key) + " must be [offset, nbytes], got " +
                             ref->describe());
    const int64_t offset = ref->items()[0].as_int();
    const int64_t length = ref->items()[1].as_int();
    if (offset < 0 || length < 0 || uint64_t(offset) > section.size ||
        uint64_t(length) > section.size - uint64_t(offset))
      return fail(where, std::string(key) + " spans bytes " +
                             std::to_string(offset) + "+" +
                             std::to_string(length) + ", outside its " +
                             std::to_string(section.size) + "-byte section");
    *data = section.data + offset;
    *nbytes = uint64_t(length);
    return Status::Ok();
  }

  Status array(const Section& section, const Json& entry, const char* key,
               int64_t count, const std::string& dtype,
               const std::string& where, std::vector<float>* out) const {
    const uint8_t* data;
    uint64_t nbytes;
    Status s = raw(section, entry, key, where, &data, &nbytes);
    if (!s.ok()) return s;
    const uint64_t item = dtype == "f32" ? 4 : 2;
    if (nbytes != uint64_t(count) * item)
      return fail(where, std::string(key) + " of " + std::to_string(count) +
                             " values in " + dtype + " takes " +
                             std::to_string(uint64_t(count) * item) +
                             " bytes, but " + std::to_string(nbytes) +
                             " are stored");
    out->resize(size_t(count));
    for (int64_t i = 0; i < count; ++i) {
      float v;
      if (item == 4) {
        const uint32_t bits = rd32(data + 4 * i);
        std::memcpy(&v, &bits, 4);
      } else {
        v = half_to_float(rd16(data + 2 * i));
      }
      if (!std::isfinite(v))
        return fail(where, std::string(key) + " contains NaN or infinity");
      (*out)[size_t(i)] = v;
    }
    return Status::Ok();
  }

  Status optional_array(const Section& section, const Json& entry,
                        const char* key, int64_t count,
                        const std::string& where,
                        std::vector<float>* out) const {
    const Json* v = entry.find(key);
    if (v == nullptr || v->is_null()) return Status::Ok();
    return array(section, entry, key, count, "f32", where, out);
  }

  Status dtype(const Json& entry, const std::string& where,
               std::string* out) const {
    Status s = get_string(entry, "dtype", where, out);
    if (!s.ok()) return s;
    if (*out != "f32" && *out != "f16")
      return fail(where, "dtype '" + *out + "' is not f32 or f16");
    return Status::Ok();
  }

  // ---- index streams ----
  Status rans_decode(const uint8_t* data, uint64_t size, uint32_t symbols,
                     uint64_t count, const std::string& where,
                     std::vector<uint8_t>* out) const {
    if (size < 16)
      return fail(where, "an rANS stream needs a 16-byte header, got " +
                             std::to_string(size) + " bytes");
    const uint32_t lanes = rd32(data), precision = rd32(data + 4);
    const uint32_t table = rd32(data + 8), words = rd32(data + 12);
    const uint64_t max_lanes = std::min<uint64_t>(kRansMaxLanes,
                                                  std::max<uint64_t>(count, 1));
    if (lanes < 1 || lanes > max_lanes || precision != kRansPrecision)
      return fail(where, "an rANS stream of " + std::to_string(count) +
                             " indices must use 1 to " +
                             std::to_string(max_lanes) +
                             " lanes and 16-bit frequencies, got " +
                             std::to_string(lanes) + " and " +
                             std::to_string(precision));
    if (table != symbols)
      return fail(where, "an rANS frequency table has " +
                             std::to_string(table) + " entries for a "
                             "codebook of " + std::to_string(symbols));
    const uint64_t expected = 16 + 4 * uint64_t(table) + 4 * uint64_t(lanes) +
                              2 * uint64_t(words);
    if (size != expected)
      return fail(where, "an rANS stream with " + std::to_string(lanes) +
                             " lanes, " + std::to_string(table) +
                             " symbols and " + std::to_string(words) +
                             " words takes " + std::to_string(expected) +
                             " bytes, but " + std::to_string(size) +
                             " are stored");
    const uint8_t* freq_data = data + 16;
    const uint8_t* state_data = freq_data + 4 * table;
    const uint8_t* word_data = state_data + 4 * lanes;
    std::vector<uint32_t> freq(table), start(table);
    uint64_t total = 0;
    for (uint32_t k = 0; k < table; ++k) {
      freq[k] = rd32(freq_data + 4 * k);
      start[k] = uint32_t(std::min<uint64_t>(total, 0xFFFFFFFFu));
      total += freq[k];
    }
    if (total != kRansTotal)
      return fail(where, "rANS frequencies sum to " + std::to_string(total) +
                             ", not 65536");
    std::vector<uint32_t> state(lanes);
    for (uint32_t l = 0; l < lanes; ++l) {
      state[l] = rd32(state_data + 4 * l);
      if (state[l] < kRansLow)
        return fail(where, "an rANS lane state is below 2**16");
    }
    std::vector<uint8_t> slot_symbol(kRansTotal);
    for (uint32_t k = 0; k < table; ++k)
      for (uint32_t j = 0; j < freq[k]; ++j) slot_symbol[start[k] + j] =
          uint8_t(k);
    out->resize(size_t(count));
    uint64_t position = 0;
    for (uint64_t j = 0; j < count; ++j) {
      const uint32_t lane = uint32_t(j % lanes);
      uint64_t x = state[lane];
      const uint32_t slot = uint32_t(x & (kRansTotal - 1));
      const uint8_t symbol = slot_symbol[slot];
      (*out)[size_t(j)] = symbol;
      x = uint64_t(freq[symbol]) * (x >> kRansPrecision) + slot -
          start[symbol];
      if (x < kRansLow) {
        if (position >= words)
          return fail(where,
                      "an rANS stream ends before all indices are decoded");
        x = (x << 16) | rd16(word_data + 2 * position);
        ++position;
      }
      state[lane] = uint32_t(x);
    }
    bool end_ok = position == words;
    for (uint32_t l = 0; l < lanes && end_ok; ++l) end_ok = state[l] ==
                                                           kRansLow;
    if (!end_ok)
      return fail(where, "an rANS stream does not decode to its recorded end "
                         "state: the index data is corrupt");
    return Status::Ok();
  }

  Status conv(const Json& entry, const Section& section,
              const std::string& where, LayerData* layer) const {
    ConvGeometry& g = layer->geometry;
    Status s = get_int(entry, "in_channels", 1, kMaxChannels, where,
                       &g.in_channels);
    if (s.ok()) s = get_int(entry, "out_channels", 1, kMaxChannels, where,
                            &g.out_channels);
    const int64_t one = 1;
    if (s.ok()) s = get_int(entry, "groups", 1, kMaxChannels, where,
                            &g.groups, &one);
    if (!s.ok()) return s;
    if (g.in_channels % g.groups || g.out_channels % g.groups)
      return fail(where, "groups=" + std::to_string(g.groups) +
                             " does not divide " +
                             std::to_string(g.in_channels) + " input and " +
                             std::to_string(g.out_channels) +
                             " output channels");
    int64_t pair[2];
    const int64_t ones[2] = {1, 1}, zeros[2] = {0, 0};
    s = get_pair(entry, "kernel", 1, kMaxKernel, where, pair);
    if (!s.ok()) return s;
    g.kernel_h = pair[0];
    g.kernel_w = pair[1];
    s = get_pair(entry, "stride", 1, kMaxStride, where, pair, ones);
    if (!s.ok()) return s;
    g.stride_h = pair[0];
    g.stride_w = pair[1];
    s = get_pair(entry, "padding", 0, kMaxPadding, where, pair, zeros);
    if (!s.ok()) return s;
    g.pad_h = pair[0];
    g.pad_w = pair[1];
    s = get_pair(entry, "dilation", 1, kMaxKernel, where, pair, ones);
    if (!s.ok()) return s;
    g.dilation_h = pair[0];
    g.dilation_w = pair[1];
    const int64_t count = g.out_channels * (g.in_channels / g.groups) *
                          g.kernel_h * g.kernel_w;
    if (count > ConvLimits::kMaxElements)
      return fail(where, "the layer has " + std::to_string(count) +
                             " weights, more than the runtime limit of "
                             "2^31 - 1");
    if (entry.find("bits") != nullptr) {
      int64_t bits;
      s = get_int(entry, "bits", 1, 8, where, &bits);
      if (!s.ok()) return s;
      layer->bits = int(bits);
      const uint8_t* cb;
      uint64_t cb_bytes;
      s = raw(section, entry, "codebook", where, &cb, &cb_bytes);
      if (!s.ok()) return s;
      const uint64_t entries = cb_bytes / 4;
      if (cb_bytes % 4 || entries < 2 || entries > (uint64_t(1) << bits))
        return fail(where, "a " + std::to_string(bits) +
                               "-bit codebook must have 2 to " +
                               std::to_string(1 << bits) +
                               " float32 entries, got " +
                               std::to_string(cb_bytes) + " bytes");
      s = array(section, entry, "codebook", int64_t(entries), "f32", where,
                &layer->codebook);
      if (!s.ok()) return s;
      if (layer->codebook[0] != 0.0f)
        return fail(where, "codebook[0] is " +
                               std::to_string(layer->codebook[0]) +
                               ", expected 0.0 (the pruned component)");
      layer->codebook_entries = int64_t(entries);
      s = indices(entry, section, where, count, layer);
      if (!s.ok()) return s;
      // The kernels take a full 2^bits codebook; entries past K are never
      // indexed (every index was checked to be below K).
      layer->codebook.resize(size_t(1) << bits, 0.0f);
    } else {
      std::string type;
      s = dtype(entry, where, &type);
      if (s.ok()) s = array(section, entry, "data", count, type, where,
                            &layer->weights);
      if (!s.ok()) return s;
    }
    s = optional_array(section, entry, "scale", g.out_channels, where,
                       &layer->scale);
    if (s.ok()) s = optional_array(section, entry, "bias", g.out_channels,
                                   where, &layer->bias);
    if (!s.ok()) return s;
    if (!layer->scale.empty() && layer->bias.empty())
      return fail(where, "a folded scale needs a bias");
    return Status::Ok();
  }

  Status indices(const Json& entry, const Section& section,
                 const std::string& where, int64_t count,
                 LayerData* layer) const {
    const uint8_t* data;
    uint64_t nbytes;
    Status s = raw(section, entry, "indices", where, &data, &nbytes);
    if (!s.ok()) return s;
    std::string encoding = "bitpack";
    if (entry.find("encoding") != nullptr) {
      s = get_string(entry, "encoding", where, &encoding);
      if (!s.ok()) return s;
    }
    const int bits = layer->bits;
    const uint64_t packed_size = (uint64_t(count) * bits + 7) / 8;
    std::vector<uint8_t> unpacked;
    if (encoding == "bitpack") {
      if (nbytes != packed_size)
        return fail(where, "a " + std::to_string(bits) + "-bit index stream "
                               "of " + std::to_string(count) +
                               " indices takes " +
                               std::to_string(packed_size) + " bytes, but " +
                               std::to_string(nbytes) + " are stored");
      layer->packed.assign(data, data + nbytes);
      const uint64_t used = (uint64_t(count) * bits) % 8;
      if (used && (data[nbytes - 1] >> used) != 0)
        return fail(where, "the unused bits of the last index byte are not "
                           "zero: the index data is corrupt");
      // Every index must be below the codebook size K.
      const uint32_t mask = (1u << bits) - 1;
      for (int64_t j = 0; j < count; ++j) {
        const uint64_t bit = uint64_t(j) * bits;
        uint32_t v = data[bit / 8];
        if (bit / 8 + 1 < nbytes) v |= uint32_t(data[bit / 8 + 1]) << 8;
        const uint32_t index = (v >> (bit % 8)) & mask;
        if (index >= uint32_t(layer->codebook_entries))
          return fail(where, "index " + std::to_string(index) +
                                 " is outside its codebook of " +
                                 std::to_string(layer->codebook_entries) +
                                 " entries");
      }
      return Status::Ok();
    }
    if (encoding != "rans")
      return fail(where, "unknown index encoding '" + encoding + "'");
    s = rans_decode(data, nbytes, uint32_t(layer->codebook_entries),
                    uint64_t(count), where, &unpacked);
    if (!s.ok()) return s;
    // Re-pack LSB first at `bits` bits for the kernels.
    layer->packed.assign(size_t(packed_size), 0);
    for (int64_t j = 0; j < count; ++j) {
      const uint32_t index = unpacked[size_t(j)];
      if (index >= uint32_t(layer->codebook_entries))
        return fail(where, "index " + std::to_string(index) +
                               " is outside its codebook of " +
                               std::to_string(layer->codebook_entries) +
                               " entries");
      const uint64_t bit = uint64_t(j) * bits;
      const uint32_t shifted = index << (bit % 8);
      layer->packed[size_t(bit / 8)] |= uint8_t(shifted & 0xFF);
      if (shifted >> 8) layer->packed[size_t(bit / 8 + 1)] |=
          uint8_t(shifted >> 8);
    }
    return Status::Ok();
  }

  Status linear(const Json& entry, const Section& section,
                const std::string& where, LayerData* layer) const {
    layer->is_conv = false;
    Status s = get_int(entry, "in_features", 1, kMaxFeatures, where,
                       &layer->in_features);
    if (s.ok()) s = get_int(entry, "out_features", 1, kMaxFeatures, where,
                            &layer->out_features);
    if (!s.ok()) return s;
    if (layer->in_features * layer->out_features > ConvLimits::kMaxElements)
      return fail(where, "the layer has more than 2^31 - 1 weights");
    std::string type;
    s = dtype(entry, where, &type);
    if (s.ok()) s = array(section, entry, "data",
                          layer->in_features * layer->out_features, type,
                          where, &layer->weights);
    if (s.ok()) s = optional_array(section, entry, "bias",
                                   layer->out_features, where, &layer->bias);
    return s;
  }

  Status layer_table(const Json& table, const std::vector<Section>& sections,
                     std::vector<LayerData>* layers) const {
    if (!table.is_array()) return fail("GRPH", "layers must be a list");
    for (size_t i = 0; i < table.items().size(); ++i) {
      const Json& entry = table.items()[i];
      std::string where = "layer " + std::to_string(i);
      if (!entry.is_object()) return fail(where, "must be an object");
      std::string type, name;
      Status s = get_string(entry, "type", where, &type);
      if (s.ok()) s = get_string(entry, "name", where, &name);
      if (!s.ok()) return s;
      where += " (" + name + ")";
      const size_t section_index = 2 + i;
      if (section_index >= sections.size() ||
          sections[section_index].tag != "LAYR")
        return fail(where, "section " + std::to_string(section_index) +
                               " must be its LAYR section");
      LayerData layer;
      layer.name = name;
      if (type == "conv2d") {
        s = conv(entry, sections[section_index], where, &layer);
      } else if (type == "linear") {
        s = linear(entry, sections[section_index], where, &layer);
      } else {
        return fail(where, "unknown layer type '" + type + "'");
      }
      if (!s.ok()) return s;
      layers->push_back(std::move(layer));
    }
    if (sections.size() > 2 + table.items().size())
      return fail("layers", "sections " +
                                std::to_string(2 + table.items().size()) +
                                " to " + std::to_string(sections.size() - 1) +
                                " belong to no layer");
    return Status::Ok();
  }

  Status activation(const Json& entry, const std::string& where,
                    Activation* out) const {
    std::string name;
    Status s = get_string(entry, "activation", where, &name);
    if (!s.ok()) return s;
    if (name == "none") *out = Activation::kNone;
    else if (name == "relu") *out = Activation::kReLU;
    else if (name == "relu6") *out = Activation::kReLU6;
    else return fail(where, "unknown activation '" + name + "'");
    return Status::Ok();
  }

  Status graph(const std::string& name, const Json& obj,
               const std::vector<LayerData>& layers, GraphData* out) const {
    const std::string where = "graph '" + name + "'";
    if (!obj.is_object()) return fail(where, "must be an object");
    std::map<std::string, int> ids;
    const Json* inputs;
    Status s = field(obj, "inputs", where, &inputs);
    if (!s.ok()) return s;
    if (!inputs->is_array()) return fail(where, "inputs must be a list");
    for (const Json& value : inputs->items()) {
      if (!value.is_string() || ids.count(value.as_string()))
        return fail(where, "invalid input name " + value.describe());
      const int id = int(ids.size());
      ids[value.as_string()] = id;
      out->inputs.push_back(id);
    }
    const Json* nodes;
    s = field(obj, "nodes", where, &nodes);
    if (!s.ok()) return s;
    if (!nodes->is_array()) return fail(where, "nodes must be a list");
    for (size_t i = 0; i < nodes->items().size(); ++i) {
      NodeData node;
      s = this->node(nodes->items()[i],
                     where + " node " + std::to_string(i), layers, &ids,
                     &node);
      if (!s.ok()) return s;
      out->nodes.push_back(node);
    }
    const Json* outputs;
    s = field(obj, "outputs", where, &outputs);
    if (!s.ok()) return s;
    if (!outputs->is_array()) return fail(where, "outputs must be a list");
    for (const Json& entry : outputs->items()) {
      if (!entry.is_array() || entry.items().size() != 2 ||
          !entry.items()[0].is_string() || !entry.items()[1].is_string())
        return fail(where, "an output must be [name, value], got " +
                               entry.describe());
      auto it = ids.find(entry.items()[1].as_string());
      if (it == ids.end())
        return fail(where, "output '" + entry.items()[0].as_string() +
                               "' refers to undefined value '" +
                               entry.items()[1].as_string() + "'");
      out->outputs.emplace_back(entry.items()[0].as_string(), it->second);
    }
    out->num_values = int(ids.size());
    compute_last_use(out);
    return Status::Ok();
  }

  Status node(const Json& entry, const std::string& where,
              const std::vector<LayerData>& layers,
              std::map<std::string, int>* ids, NodeData* node) const {
    if (!entry.is_object()) return fail(where, "must be an object");
    std::string op;
    Status s = get_string(entry, "op", where, &op);
    if (!s.ok()) return s;
    size_t min_inputs = 1, max_inputs = 1;
    if (op == "conv2d") node->op = OpType::kConv2d;
    else if (op == "linear") node->op = OpType::kLinear;
    else if (op == "add") { node->op = OpType::kAdd; min_inputs = max_inputs = 2; }
    else if (op == "relu") node->op = OpType::kRelu;
    else if (op == "relu6") node->op = OpType::kRelu6;
    else if (op == "max_pool2d") node->op = OpType::kMaxPool2d;
    else if (op == "resize_nearest") { node->op = OpType::kResizeNearest; max_inputs = 2; }
    else if (op == "flatten") node->op = OpType::kFlatten;
    else
      return fail(where, "unknown operator '" + op + "'; this runtime "
                         "supports add, conv2d, flatten, linear, max_pool2d, "
                         "relu, relu6, resize_nearest");
    const Json* inputs;
    s = field(entry, "inputs", where, &inputs);
    if (!s.ok()) return s;
    if (!inputs->is_array()) return fail(where, "inputs must be a list");
    const size_t n = inputs->items().size();
    if (n < min_inputs || n > max_inputs)
      return fail(where, op + " takes " + std::to_string(min_inputs) +
                             (max_inputs != min_inputs
                                  ? " or " + std::to_string(max_inputs)
                                  : std::string()) +
                             " inputs, got " + std::to_string(n));
    for (const Json& value : inputs->items()) {
      auto it = value.is_string() ? ids->find(value.as_string()) : ids->end();
      if (it == ids->end())
        return fail(where, "input " + value.describe() +
                               " is not defined before this node");
      node->inputs.push_back(it->second);
    }
    std::string output;
    s = get_string(entry, "output", where, &output);
    if (!s.ok()) return s;
    if (ids->count(output))
      return fail(where, "output '" + output + "' is defined twice");
    node->output = int(ids->size());
    (*ids)[output] = node->output;

    if (node->op == OpType::kConv2d || node->op == OpType::kLinear) {
      int64_t index;
      s = get_int(entry, "layer", std::numeric_limits<int64_t>::min(),
                  std::numeric_limits<int64_t>::max(), where, &index);
      if (!s.ok()) return s;
      if (index < 0 || index >= int64_t(layers.size()))
        return fail(where, "layer " + std::to_string(index) +
                               " is not in the layer table of " +
                               std::to_string(layers.size()) + " layers");
      if (layers[size_t(index)].is_conv != (node->op == OpType::kConv2d))
        return fail(where, "layer " + std::to_string(index) + " is a " +
                               (layers[size_t(index)].is_conv ? "conv2d"
                                                              : "linear") +
                               ", not a " + op);
      node->layer = int(index);
    }
    if (node->op == OpType::kConv2d || node->op == OpType::kLinear ||
        node->op == OpType::kAdd) {
      s = activation(entry, where, &node->activation);
      if (!s.ok()) return s;
    }
    if (node->op == OpType::kMaxPool2d) {
      s = get_pair(entry, "kernel", 1, kMaxKernel, where, node->kernel);
      if (s.ok()) s = get_pair(entry, "stride", 1, kMaxStride, where,
                               node->stride);
      if (s.ok()) s = get_pair(entry, "padding", 0, kMaxKernel, where,
                               node->padding);
      if (s.ok()) s = get_pair(entry, "dilation", 1, kMaxKernel, where,
                               node->dilation);
      if (!s.ok()) return s;
      const Json* ceil = entry.find("ceil_mode");
      if (ceil == nullptr || !ceil->is_bool())
        return fail(where, "ceil_mode must be true or false");
      node->ceil_mode = ceil->as_bool();
      for (int k = 0; k < 2; ++k)
        if (node->padding[k] * 2 > node->kernel[k])
          return fail(where, "max_pool2d padding " +
                                 std::to_string(node->padding[k]) +
                                 " is more than half the kernel " +
                                 std::to_string(node->kernel[k]));
    } else if (node->op == OpType::kResizeNearest) {
      std::string mode;
      s = get_string(entry, "mode", where, &mode);
      if (!s.ok()) return s;
      size_t expected;
      if (mode == "scale") {
        s = get_pair(entry, "scale", 1, kMaxStride, where, node->scale);
        if (!s.ok()) return s;
        node->size_of = false;
        expected = 1;
      } else if (mode == "size_of") {
        expected = 2;
      } else {
        return fail(where, "unknown resize mode '" + mode + "'");
      }
      if (n != expected)
        return fail(where, "resize mode '" + mode + "' takes " +
                               std::to_string(expected) + " inputs");
    }
    return Status::Ok();
  }

  Status meta(const Json& meta, PackedContent* out) const {
    std::string format;
    Status s = get_string(meta, "format", "META", &format);
    if (!s.ok()) return s;
    if (format != "mmdgms-packed-detector")
      return fail("META", "format is '" + format +
                              "', expected 'mmdgms-packed-detector'");
    const Json* detector;
    s = field(meta, "detector", "META", &detector);
    if (!s.ok()) return s;
    s = get_string(*detector, "type", "META detector", &out->detector_type);
    if (s.ok()) s = get_string(*detector, "kind", "META detector",
                               &out->kind);
    if (s.ok()) s = get_int(*detector, "num_levels", 1, 16, "META detector",
                            &out->num_levels);
    if (!s.ok()) return s;
    if (out->kind != "single_stage" && out->kind != "two_stage")
      return fail("META detector", "kind '" + out->kind +
                                       "' is not single_stage or two_stage");
    const Json* classes = meta.find("classes");
    if (classes != nullptr && !classes->is_null()) {
      if (!classes->is_array())
        return fail("META", "classes must be a list of strings or null");
      for (const Json& c : classes->items()) {
        if (!c.is_string())
          return fail("META", "classes must be a list of strings, got " +
                                  c.describe());
        out->classes.push_back(c.as_string());
      }
    }
    const Json* pre;
    s = field(meta, "preprocess", "META", &pre);
    if (!s.ok()) return s;
    PreprocessSettings& p = out->preprocess;
    const char* keys[2] = {"mean", "std"};
    float* targets[2] = {p.mean, p.std};
    for (int k = 0; k < 2; ++k) {
      const Json* v = pre->find(keys[k]);
      bool ok = v && v->is_array() && v->items().size() == 3;
      for (size_t i = 0; ok && i < 3; ++i) {
        ok = v->items()[i].is_number() &&
             std::isfinite(v->items()[i].as_double()) &&
             (k == 0 || v->items()[i].as_double() > 0);
        if (ok) targets[k][i] = float(v->items()[i].as_double());
      }
      if (!ok)
        return fail("META preprocess",
                    std::string(keys[k]) + " must be 3 finite numbers" +
                        (k ? " above 0" : "") + ", got " +
                        (v ? v->describe() : std::string("nothing")));
    }
    const Json* flag = pre->find("bgr_to_rgb");
    if (flag == nullptr || !flag->is_bool())
      return fail("META preprocess", "bgr_to_rgb must be true or false");
    p.bgr_to_rgb = flag->as_bool();
    s = get_int(*pre, "pad_size_divisor", 1, 4096, "META preprocess",
                &p.pad_size_divisor);
    if (!s.ok()) return s;
    const Json* pad = pre->find("pad_value");
    if (pad == nullptr || !pad->is_number() || !std::isfinite(pad->as_double()))
      return fail("META preprocess", "pad_value must be a finite number");
    p.pad_value = float(pad->as_double());
    const Json* resize = pre->find("resize");
    if (resize != nullptr && !resize->is_null()) {
      int64_t scale[2];
      s = get_pair(*resize, "scale", 1, 1 << 16, "META preprocess resize",
                   scale);
      if (!s.ok()) return s;
      const Json* keep = resize->find("keep_ratio");
      if (keep == nullptr || !keep->is_bool())
        return fail("META preprocess resize",
                    "keep_ratio must be true or false");
      p.has_resize = true;
      p.resize_width = scale[0];
      p.resize_height = scale[1];
      p.keep_ratio = keep->as_bool();
    }
    const Json* config = meta.find("model_config");
    if (config == nullptr || !config->is_object())
      return fail("META", "model_config must be an object");
    return Status::Ok();
  }

 private:
  std::string source_;
};

uint32_t crc_table_entry(uint32_t c) {
  for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
  return c;
}

}  // namespace

void compute_last_use(GraphData* graph) {
  graph->last_use.assign(size_t(graph->num_values), -1);
  for (size_t i = 0; i < graph->nodes.size(); ++i)
    for (int v : graph->nodes[i].inputs) graph->last_use[size_t(v)] = int(i);
  // Graph outputs live to the end.
  for (const auto& o : graph->outputs)
    graph->last_use[size_t(o.second)] = int(graph->nodes.size());
}

uint32_t crc32(const uint8_t* data, size_t size) {
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> t(256);
    for (uint32_t i = 0; i < 256; ++i) t[i] = crc_table_entry(i);
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) c = table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

Status parse_packed(const uint8_t* data, size_t size, const std::string& name,
                    PackedContent* out) {
  Reader reader(name);
  std::vector<Section> sections;
  Status s = reader.container(data, size, &sections);
  if (!s.ok()) return s;
  if (sections.size() < 2 || sections[0].tag != "META" ||
      sections[1].tag != "GRPH")
    return reader.fail("sections",
                       "the first two sections must be META and GRPH");
  s = reader.parse_json(sections[0], &out->meta);
  if (s.ok()) s = reader.meta(out->meta, out);
  if (!s.ok()) return s;
  Json grph;
  s = reader.parse_json(sections[1], &grph);
  if (!s.ok()) return s;
  const Json* layers;
  s = reader.field(grph, "layers", "GRPH", &layers);
  if (s.ok()) s = reader.layer_table(*layers, sections, &out->layers);
  if (!s.ok()) return s;
  const Json* graphs = grph.find("graphs");
  if (graphs == nullptr || !graphs->is_object())
    return reader.fail("GRPH", "graphs must be an object");
  for (const auto& member : graphs->members()) {
    GraphData graph;
    s = reader.graph(member.first, member.second, out->layers, &graph);
    if (!s.ok()) return s;
    out->graphs[member.first] = std::move(graph);
  }
  if (!out->graphs.count("main"))
    return reader.fail("GRPH", "there is no 'main' graph");
  const GraphData& main = out->graphs["main"];
  std::set<std::string> names;
  for (const auto& o : main.outputs) names.insert(o.first);
  if (out->kind == "single_stage") {
    for (int64_t i = 0; i < out->num_levels; ++i)
      for (const char* prefix : {"cls_score.", "bbox_pred."})
        if (!names.count(prefix + std::to_string(i)))
          return reader.fail("graph 'main'",
                             std::string("missing output ") + prefix +
                                 std::to_string(i) + " for level " +
                                 std::to_string(i) + " of " +
                                 std::to_string(out->num_levels));
  }
  return Status::Ok();
}

}  // namespace dgms_rt
