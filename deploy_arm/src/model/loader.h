// Internal: the parsed, validated content of a packed file.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dgms_rt/conv.h"
#include "dgms_rt/json.h"
#include "dgms_rt/model.h"

namespace dgms_rt {

// kConvChain is built by the executor (see ModelImpl::build), never read
// from a file.
enum class OpType { kConv2d, kLinear, kAdd, kRelu, kRelu6, kMaxPool2d,
                    kResizeNearest, kFlatten, kConvChain };

struct LayerData {
  bool is_conv = true;
  std::string name;
  // conv
  ConvGeometry geometry;
  int bits = 0;                    // 0 for a dense layer
  std::vector<float> codebook;     // padded to 2^bits with zeros
  int64_t codebook_entries = 0;    // K as stored
  std::vector<uint8_t> packed;     // LSB-first bit stream (quantized)
  std::vector<float> weights;      // dense conv or linear weights, f32
  std::vector<float> scale;        // empty when null
  std::vector<float> bias;         // empty when null
  // linear
  int64_t in_features = 0, out_features = 0;
};

struct NodeData {
  OpType op = OpType::kAdd;
  std::vector<int> inputs;  // value ids
  int output = -1;
  int layer = -1;
  Activation activation = Activation::kNone;
  int conv = -1;  // index into the built conv objects
  // conv_chain: built convs {expand or -1, depthwise, the depthwise
  // without row padding, project 1x1, the expand without row padding or
  // -1} and the layers of the first, second and fourth. The expand is a
  // 1x1 conv or, at the start of a network, a conv with a larger window
  // (MobileNetV2's 3x3 stem). A merged conv2d (see
  // ModelImpl::merge_sibling_convs): the layers whose outputs it computes,
  // in channel order.
  int chain[5] = {-1, -1, -1, -1, -1};
  std::vector<int> chain_layers;
  // conv2d: -1 where the conv reads its whole input, else the first of
  // the input channels it reads, where a merged conv wrote the outputs of
  // several layers into the input value.
  int64_t input_channel_offset = -1;
  // max_pool2d
  int64_t kernel[2] = {1, 1}, stride[2] = {1, 1}, padding[2] = {0, 0},
          dilation[2] = {1, 1};
  bool ceil_mode = false;
  // resize_nearest
  bool size_of = true;
  int64_t scale[2] = {1, 1};
};

// A run of consecutive conv2d nodes [begin, end) in which some nodes do
// not depend on each other, so that they can run at the same time on
// different threads (see the executor in model.cc). waits_for[j] lists the
// nodes of the run whose outputs node begin + j reads, as offsets from
// begin.
struct NodeSection {
  int begin = 0;
  int end = 0;
  std::vector<std::vector<int>> waits_for;
};

struct GraphData {
  std::vector<int> inputs;                               // value ids
  std::vector<NodeData> nodes;
  std::vector<std::pair<std::string, int>> outputs;      // name, value id
  int num_values = 0;
  std::vector<int> last_use;  // per value: last node index reading it
  std::vector<NodeSection> sections;  // by begin; set by the executor
};

struct PackedContent {
  Json meta;
  std::string detector_type, kind;
  int64_t num_levels = 0;
  std::vector<std::string> classes;
  PreprocessSettings preprocess;
  std::vector<LayerData> layers;
  std::map<std::string, GraphData> graphs;
};

// Fills graph->last_use from the nodes and outputs.
void compute_last_use(GraphData* graph);

// Parses and validates the whole file.
Status parse_packed(const uint8_t* data, size_t size, const std::string& name,
                    PackedContent* out);

uint32_t crc32(const uint8_t* data, size_t size);

}  // namespace dgms_rt
