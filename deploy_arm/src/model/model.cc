// Model: builds the conv layers of a parsed packed file and executes its
// graphs (NCHW float32), then the detection post-processing.
#include "dgms_rt/model.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <new>

#include "loader.h"
#include "ops.h"

namespace dgms_rt {
namespace {

Status invalid(const std::string& message) {
  return Status(StatusCode::kInvalidArgument, message);
}

// A graph input: a shape and the caller's `size` floats.
struct InputView {
  const std::vector<int64_t>* shape;
  const float* data;
  int64_t size;
};

struct BuiltConv {
  std::unique_ptr<Conv2d> conv;
  int layer = -1;
};

Status check_elements(int64_t count, const std::string& what) {
  if (count <= 0 || count > ConvLimits::kMaxElements)
    return invalid(what + " would have " + std::to_string(count) +
                   " elements; the runtime supports 1 to 2^31 - 1");
  return Status::Ok();
}

// The buffers of values that died earlier in one graph run, handed to
// later outputs. A new buffer is page-faulted on first touch, which costs
// more than a small layer's arithmetic. A reused one is not, and growing
// a FloatVector within its capacity writes nothing. Every operator and
// Conv2d::run writes all elements of its output, so the stale contents
// never show.
class BufferPool {
 public:
  // Returns a vector of `count` floats, contents unspecified: the smallest
  // free buffer with the capacity, or a new one.
  FloatVector take(size_t count) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      const size_t capacity = free_[i].capacity();
      if (capacity >= count &&
          (best == free_.size() || capacity < free_[best].capacity()))
        best = i;
    }
    if (best == free_.size()) return FloatVector(count);
    FloatVector buffer = std::move(free_[best]);
    free_[best] = std::move(free_.back());
    free_.pop_back();
    buffer.resize(count);
    return buffer;
  }

  // Takes over the buffer of a value that is no longer needed.
  void give(FloatVector* buffer) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (buffer->capacity() > 0) free_.push_back(std::move(*buffer));
    *buffer = FloatVector();
  }

  // Moves all free buffers to or from `other` (appending).
  void adopt(std::vector<FloatVector>* other) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& buffer : *other) free_.push_back(std::move(buffer));
    other->clear();
  }
  void release(std::vector<FloatVector>* other) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& buffer : free_) other->push_back(std::move(buffer));
    free_.clear();
  }

 private:
  std::mutex mutex_;  // the nodes of a section take and give concurrently
  std::vector<FloatVector> free_;
};

// Counts the readers of each value: the node inputs and graph outputs
// that use it.
std::vector<int> count_readers(const GraphData& graph) {
  std::vector<int> readers(size_t(graph.num_values), 0);
  for (const NodeData& node : graph.nodes)
    for (int v : node.inputs) ++readers[size_t(v)];
  for (const auto& output : graph.outputs) ++readers[size_t(output.second)];
  return readers;
}

// Returns the index of the node that defines each value, -1 for inputs.
std::vector<int> find_producers(const GraphData& graph) {
  std::vector<int> producer(size_t(graph.num_values), -1);
  for (size_t i = 0; i < graph.nodes.size(); ++i)
    producer[size_t(graph.nodes[i].output)] = int(i);
  return producer;
}

// Removes the nodes marked in `dropped` and recomputes the last uses.
void drop_nodes(const std::vector<bool>& dropped, GraphData* graph) {
  std::vector<NodeData> kept;
  for (size_t i = 0; i < graph->nodes.size(); ++i)
    if (!dropped[i]) kept.push_back(std::move(graph->nodes[i]));
  graph->nodes = std::move(kept);
  compute_last_use(graph);
}

// Merges each relu or relu6 node into the add before it when the add has
// no activation and the relu is the only reader of the sum. The merged add
// applies the activation to the same rounded sum, so the result is the
// same, in one pass over the tensor instead of two.
void fuse_add_activation(GraphData* graph) {
  const std::vector<int> readers = count_readers(*graph);
  const std::vector<int> producer = find_producers(*graph);

  std::vector<bool> dropped(graph->nodes.size(), false);
  bool changed = false;
  for (NodeData& node : graph->nodes) {
    if (node.op != OpType::kRelu && node.op != OpType::kRelu6) continue;
    const int v = node.inputs[0];
    if (readers[size_t(v)] != 1 || producer[size_t(v)] < 0) continue;
    NodeData& add = graph->nodes[size_t(producer[size_t(v)])];
    if (add.op != OpType::kAdd || add.activation != Activation::kNone)
      continue;
    add.activation = node.op == OpType::kRelu ? Activation::kReLU
                                              : Activation::kReLU6;
    // The add now defines the activation's output value. It runs before
    // the activation node did, so the value is still defined before every
    // reader.
    add.output = node.output;
    dropped[size_t(&node - graph->nodes.data())] = true;
    changed = true;
  }
  if (changed) drop_nodes(dropped, graph);
}

bool is_flat_1x1(const ConvGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 &&
         g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0 && g.groups == 1;
}

// Returns whether a conv with a window larger than 1x1 can start a conv
// chain (MobileNetV2's 3x3 stride-2 stem). It has no groups or dilation,
// and each output row comes from its own window of input rows.
bool is_window_expand(const ConvGeometry& g) {
  return g.groups == 1 && g.dilation_h == 1 && g.dilation_w == 1 &&
         g.kernel_h > g.pad_h && g.kernel_h >= g.stride_h;
}

bool is_depthwise(const ConvGeometry& g) {
  return g.groups == g.in_channels && g.groups == g.out_channels &&
         g.dilation_h == 1 && g.kernel_h > g.pad_h;
}

// Fills graph->sections: each maximal run of consecutive conv2d nodes in
// which some node does not read the output of the node before it, and so
// does not depend on it (a node can only depend on earlier nodes).
void find_sections(GraphData* graph) {
  graph->sections.clear();
  const std::vector<int> producer = find_producers(*graph);
  const int count = int(graph->nodes.size());
  for (int begin = 0; begin < count;) {
    int end = begin;
    while (end < count && graph->nodes[size_t(end)].op == OpType::kConv2d)
      ++end;
    if (end - begin >= 2) {
      NodeSection section;
      section.begin = begin;
      section.end = end;
      bool independent = false;
      for (int i = begin; i < end; ++i) {
        std::vector<int> waits;
        for (int v : graph->nodes[size_t(i)].inputs) {
          const int p = producer[size_t(v)];
          if (p >= begin && p < i &&
              std::find(waits.begin(), waits.end(), p - begin) == waits.end())
            waits.push_back(p - begin);
        }
        if (i > begin &&
            std::find(waits.begin(), waits.end(), i - 1 - begin) ==
                waits.end())
          independent = true;
        section.waits_for.push_back(std::move(waits));
      }
      if (independent) graph->sections.push_back(std::move(section));
    }
    begin = std::max(end, begin + 1);
  }
}


}  // namespace

// A section runs as a task graph when its longest path of dependent nodes
// takes at most this many times a thread's share of its work. Above 1,
// because a node on one thread wastes nothing on hand-overs, and nodes
// split over all threads do. With 1.25, RetinaNet-R50's FPN and head
// (ratio 1.01) took a median of 438 ms on two threads against 476 ms one
// node after the other (alternating runs in one process).
// NOTE: tuned on 2 cores only.
constexpr double kSectionSlack = 1.25;

class ModelImpl {
 public:
  PackedContent content;
  std::vector<BuiltConv> convs;
  std::unique_ptr<ThreadPool> pool;
  DenseHeadSettings head;
  int64_t chain_band_bytes = 0;  // see ModelOptions

  // Buffers of the last graph run, reused by the next one, so that runs
  // after the first neither page-fault nor zero-fill their intermediate
  // tensors (about 10 ms per run on the 416 x 416 demo detector). Runs in
  // parallel each take what is there; the cache keeps about the peak
  // activation memory of one run between runs.
  mutable std::mutex cache_mutex;
  mutable std::vector<FloatVector> cached_buffers;

  // Returns the buffers of graph outputs that the caller no longer needs
  // to the cache.
  void recycle(std::vector<std::pair<std::string, Tensor>>* outputs) const {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (auto& output : *outputs) {
      if (output.second.data.capacity() > 0) {
        cached_buffers.push_back(std::move(output.second.data));
      }
    }
    outputs->clear();
  }

  Status build(const ModelOptions& options) {
    pool.reset(new ThreadPool(options.threads));
    for (auto& entry : content.graphs) fuse_add_activation(&entry.second);
    std::map<std::pair<int, int>, int> made;
    for (auto& entry : content.graphs) {
      for (NodeData& node : entry.second.nodes) {
        if (node.op != OpType::kConv2d) continue;
        const auto key = std::make_pair(node.layer, int(node.activation));
        auto it = made.find(key);
        if (it != made.end()) {
          node.conv = it->second;
          continue;
        }
        BuiltConv built;
        Status s = make_conv(content.layers[size_t(node.layer)],
                             node.activation, options, &built);
        if (!s.ok())
          return Status(s.code(), "layer " + std::to_string(node.layer) +
                                      " (" +
                                      content.layers[size_t(node.layer)].name +
                                      "): " + s.message());
        built.layer = node.layer;
        node.conv = int(convs.size());
        made[key] = node.conv;
        convs.push_back(std::move(built));
      }
    }
    chain_band_bytes = options.chain_band_bytes;
    if (chain_band_bytes > 0) {
      for (auto& entry : content.graphs) {
        Status s = fuse_conv_chains(options, &entry.second);
        if (!s.ok()) return s;
      }
    }
    if (options.merge_sibling_convs) {
      for (auto& entry : content.graphs) {
        Status s = merge_sibling_convs(options, &entry.second);
        if (!s.ok()) return s;
      }
    }
    if (options.threads > 1) {
      for (auto& entry : content.graphs) find_sections(&entry.second);
    }
    // Parsed weights are now repacked inside the kernels; keep only what
    // the executor reads itself.
    for (LayerData& layer : content.layers) {
      if (!layer.is_conv) continue;
      layer.packed.clear();
      layer.packed.shrink_to_fit();
      layer.weights.clear();
      layer.weights.shrink_to_fit();
    }
    if (content.kind == "single_stage") {
      const Json* config = content.meta.find("model_config");
      Status s = parse_dense_head_settings(*config, content.num_levels, &head);
      if (!s.ok()) return s;
    }
    return Status::Ok();
  }

  // Replaces each chain of conv nodes "expand (optional) -> depthwise ->
  // 1x1" whose intermediate values have no other reader by one conv_chain
  // node (see run_chain). The expand is a 1x1 conv or a conv with a larger
  // window (is_window_expand). The depthwise layer, and an expand with a
  // larger window, get a twin without row padding for windows of rows
  // that carry their own padding rows.
  Status fuse_conv_chains(const ModelOptions& options, GraphData* graph) {
    // A value with one reader that is a graph output has no node reader,
    // so the checks below never take a graph output as an inner value.
    const std::vector<int> readers = count_readers(*graph);
    const std::vector<int> producer = find_producers(*graph);
    std::vector<int> reader(size_t(graph->num_values), -1);  // the last one
    for (size_t i = 0; i < graph->nodes.size(); ++i)
      for (int v : graph->nodes[i].inputs) reader[size_t(v)] = int(i);
    const auto conv_layer = [&](int i) -> const LayerData* {
      if (i < 0) return nullptr;
      const NodeData& node = graph->nodes[size_t(i)];
      if (node.op != OpType::kConv2d) return nullptr;
      return &content.layers[size_t(node.layer)];
    };

    std::vector<bool> dropped(graph->nodes.size(), false);
    bool changed = false;
    // Builds (once per layer and activation) the twin of a node's layer
    // without row padding and sets *index to it.
    std::map<std::pair<int, int>, int> twins;
    const auto rows_twin = [&](const NodeData& node, int* index) {
      const auto key = std::make_pair(node.layer, int(node.activation));
      auto twin = twins.find(key);
      if (twin == twins.end()) {
        const LayerData& layer = content.layers[size_t(node.layer)];
        LayerData rows = layer;
        rows.geometry.pad_h = 0;
        BuiltConv built;
        Status s = make_conv(rows, node.activation, options, &built);
        if (!s.ok())
          return Status(s.code(), "layer " + std::to_string(node.layer) +
                                      " (" + layer.name + "): " + s.message());
        built.layer = node.layer;
        twin = twins.emplace(key, int(convs.size())).first;
        convs.push_back(std::move(built));
      }
      *index = twin->second;
      return Status::Ok();
    };
    for (size_t d = 0; d < graph->nodes.size(); ++d) {
      const LayerData* dw = conv_layer(int(d));
      if (dw == nullptr || !is_depthwise(dw->geometry)) continue;
      NodeData& dw_node = graph->nodes[d];
      const int dw_out = dw_node.output;
      if (readers[size_t(dw_out)] != 1) continue;
      const int p = reader[size_t(dw_out)];
      const LayerData* project = conv_layer(p);
      if (project == nullptr || !is_flat_1x1(project->geometry) ||
          dropped[size_t(p)])
        continue;
      const int dw_in = dw_node.inputs[0];
      int e = producer[size_t(dw_in)];
      const LayerData* expand = conv_layer(e);
      if (expand == nullptr ||
          !(is_flat_1x1(expand->geometry) ||
            is_window_expand(expand->geometry)) ||
          readers[size_t(dw_in)] != 1 || dropped[size_t(e)])
        e = -1;
      // A window expand runs on windows of input rows that carry their
      // own padding rows, through a twin without row padding.
      int rows_expand = -1;
      if (e >= 0 && !is_flat_1x1(expand->geometry)) {
        Status s = rows_twin(graph->nodes[size_t(e)], &rows_expand);
        if (!s.ok()) return s;
      }
      int rows_dw = -1;
      Status s = rows_twin(dw_node, &rows_dw);
      if (!s.ok()) return s;

      NodeData& last = graph->nodes[size_t(p)];
      NodeData chain;
      chain.op = OpType::kConvChain;
      chain.inputs = {e >= 0 ? graph->nodes[size_t(e)].inputs[0] : dw_in};
      chain.output = last.output;
      chain.chain[0] = e >= 0 ? graph->nodes[size_t(e)].conv : -1;
      chain.chain[1] = dw_node.conv;
      chain.chain[2] = rows_dw;
      chain.chain[3] = last.conv;
      chain.chain[4] = rows_expand;
      if (e >= 0) chain.chain_layers.push_back(graph->nodes[size_t(e)].layer);
      chain.chain_layers.push_back(dw_node.layer);
      chain.chain_layers.push_back(last.layer);
      // The chain runs where its last conv did: its input is defined
      // earlier and, with last_use recomputed, stays alive until then.
      last = std::move(chain);
      dropped[d] = true;
      if (e >= 0) dropped[size_t(e)] = true;
      changed = true;
    }
    if (changed) drop_nodes(dropped, graph);
    return Status::Ok();
  }

  // Replaces the conv2d nodes that read the same value, where their layers
  // can run as one conv, by one conv over all their output channels. The
  // readers of their outputs then take their channels of the merged
  // output (NodeData::input_channel_offset). In a RetinaNet head the
  // first convs of the class and box branches read one input. Merged,
  // they share its Winograd transform and run as one wider product. Two
  // 3x3 convs from 64 to 64 channels at 52 x 52 took 1.72 ms, merged 1.52
  // (one thread, AVX2). Each output gets the same operations, so the
  // results are the same bits.
  Status merge_sibling_convs(const ModelOptions& options, GraphData* graph) {
    const std::vector<int> readers = count_readers(*graph);
    std::vector<std::vector<int>> reading(size_t(graph->num_values));
    for (size_t i = 0; i < graph->nodes.size(); ++i)
      for (int v : graph->nodes[i].inputs) reading[size_t(v)].push_back(int(i));
    // A node whose output only whole-input conv2d nodes read, as their
    // only input, so that they can read a slice of a merged output.
    const auto slice_readers = [&](const NodeData& node) {
      const int v = node.output;
      if (int(reading[size_t(v)].size()) != readers[size_t(v)]) return false;
      for (int r : reading[size_t(v)]) {
        const NodeData& reader = graph->nodes[size_t(r)];
        if (reader.op != OpType::kConv2d || reader.inputs.size() != 1 ||
            reader.input_channel_offset >= 0)
          return false;
      }
      return true;
    };
    const auto mergeable = [&](const NodeData& a, const NodeData& b) {
      const LayerData& la = content.layers[size_t(a.layer)];
      const LayerData& lb = content.layers[size_t(b.layer)];
      const ConvGeometry& ga = la.geometry;
      const ConvGeometry& gb = lb.geometry;
      return la.bits == 0 && lb.bits == 0 && ga.groups == 1 &&
             gb.groups == 1 && a.activation == b.activation &&
             ga.in_channels == gb.in_channels &&
             ga.kernel_h == gb.kernel_h && ga.kernel_w == gb.kernel_w &&
             ga.stride_h == gb.stride_h && ga.stride_w == gb.stride_w &&
             ga.pad_h == gb.pad_h && ga.pad_w == gb.pad_w &&
             ga.dilation_h == gb.dilation_h &&
             ga.dilation_w == gb.dilation_w &&
             la.scale.empty() == lb.scale.empty() &&
             la.bias.empty() == lb.bias.empty();
    };

    std::vector<bool> dropped(graph->nodes.size(), false);
    bool changed = false;
    // Layers and activation of each merged conv built, to its index.
    std::map<std::vector<int>, int> merged_convs;
    const int values = graph->num_values;  // merged outputs are new values
    // The readers of each value that can merge, in groups of mergeable
    // ones.
    std::vector<std::vector<int>> groups;
    for (int v = 0; v < values; ++v) {
      std::vector<std::vector<int>> of_value;
      for (int i : reading[size_t(v)]) {
        const NodeData& node = graph->nodes[size_t(i)];
        if (node.op != OpType::kConv2d || node.inputs.size() != 1 ||
            node.input_channel_offset >= 0 || !node.chain_layers.empty() ||
            !slice_readers(node))
          continue;
        auto group = std::find_if(
            of_value.begin(), of_value.end(), [&](const std::vector<int>& g) {
              return mergeable(graph->nodes[size_t(g[0])], node);
            });
        if (group == of_value.end()) {
          of_value.push_back({i});
        } else {
          group->push_back(i);
        }
      }
      for (auto& group : of_value)
        if (group.size() >= 2) groups.push_back(std::move(group));
    }
    for (const std::vector<int>& group : groups) {
      std::vector<int> key;
      for (int i : group) key.push_back(graph->nodes[size_t(i)].layer);
      key.push_back(int(graph->nodes[size_t(group[0])].activation));
      auto it = merged_convs.find(key);
      if (it == merged_convs.end()) {
        LayerData merged = content.layers[size_t(key[0])];
        merged.geometry.out_channels = 0;
        merged.weights.clear();
        merged.scale.clear();
        merged.bias.clear();
        for (size_t k = 0; k + 1 < key.size(); ++k) {
          const LayerData& layer = content.layers[size_t(key[k])];
          merged.geometry.out_channels += layer.geometry.out_channels;
          merged.weights.insert(merged.weights.end(), layer.weights.begin(),
                                layer.weights.end());
          merged.scale.insert(merged.scale.end(), layer.scale.begin(),
                              layer.scale.end());
          merged.bias.insert(merged.bias.end(), layer.bias.begin(),
                             layer.bias.end());
        }
        BuiltConv built;
        Status s = make_conv(merged, graph->nodes[size_t(group[0])].activation,
                             options, &built);
        if (!s.ok())
          return Status(s.code(), "layers " + merged.name + " and " +
                                      std::to_string(key.size() - 2) +
                                      " more, merged: " + s.message());
        built.layer = key[0];
        it = merged_convs.emplace(key, int(convs.size())).first;
        convs.push_back(std::move(built));
      }

      // The merged conv runs where the first of the group did, and its
      // output is a new value. Every reader of the group's outputs comes
      // after the first of the group.
      const int output = graph->num_values++;
      int64_t offset = 0;
      for (int i : group) {
        NodeData& node = graph->nodes[size_t(i)];
        for (int r : reading[size_t(node.output)]) {
          graph->nodes[size_t(r)].inputs[0] = output;
          graph->nodes[size_t(r)].input_channel_offset = offset;
        }
        offset += content.layers[size_t(node.layer)].geometry.out_channels;
        if (i != group[0]) dropped[size_t(i)] = true;
      }
      NodeData& first = graph->nodes[size_t(group[0])];
      first.conv = it->second;
      first.output = output;
      first.chain_layers.assign(key.begin(), key.end() - 1);
      changed = true;
    }
    if (changed) drop_nodes(dropped, graph);
    return Status::Ok();
  }

  Status make_conv(const LayerData& layer, Activation act,
                   const ModelOptions& options, BuiltConv* out) {
    const int64_t channels = layer.geometry.out_channels;
    if (layer.bits > 0) {
      std::vector<float> ones, zeros;
      QuantConvDesc desc;
      desc.geometry = layer.geometry;
      desc.bits = layer.bits;
      desc.codebook = layer.codebook.data();
      desc.codebook_size = int64_t(layer.codebook.size());
      desc.indices = layer.packed.data();
      desc.indices_size = int64_t(layer.packed.size());
      if (layer.scale.empty()) ones.assign(size_t(channels), 1.0f);
      if (layer.bias.empty()) zeros.assign(size_t(channels), 0.0f);
      desc.scale = layer.scale.empty() ? ones.data() : layer.scale.data();
      desc.scale_size = channels;
      desc.bias = layer.bias.empty() ? zeros.data() : layer.bias.data();
      desc.bias_size = channels;
      desc.activation = act;
      std::unique_ptr<QuantConv2d> conv;
      Status s = QuantConv2d::create(desc, options.isa, &conv,
                                     options.quant_kernel,
                                     options.quant_winograd_max_bytes);
      if (!s.ok()) return s;
      out->conv = std::move(conv);
      return Status::Ok();
    }
    DenseConvDesc desc;
    desc.geometry = layer.geometry;
    desc.weights = layer.weights.data();
    desc.weights_size = int64_t(layer.weights.size());
    // A folded scale is applied in the kernel as fma(sum, scale, bias).
    std::vector<float> zeros;
    if (!layer.scale.empty()) {
      desc.scale = layer.scale.data();
      desc.scale_size = channels;
      if (layer.bias.empty()) zeros.assign(size_t(channels), 0.0f);
    }
    if (!layer.bias.empty()) {
      desc.bias = layer.bias.data();
      desc.bias_size = channels;
    } else if (!layer.scale.empty()) {
      desc.bias = zeros.data();
      desc.bias_size = channels;
    }
    desc.activation = act;
    desc.algorithm = options.dense_algorithm;
    std::unique_ptr<DenseConv2d> conv;
    Status s = DenseConv2d::create(desc, options.isa, &conv);
    if (!s.ok()) return s;
    out->conv = std::move(conv);
    return Status::Ok();
  }

  // Runs a conv node on `threads`: the model's pool, or null for the
  // calling thread alone.
  Status run_conv(const NodeData& node, const Tensor& x, BufferPool* buffers,
                  Tensor* y, ThreadPool* threads) const {
    return run_conv_with(*convs[size_t(node.conv)].conv, x, buffers, y,
                         threads, node.input_channel_offset);
  }

  // Runs conv on `threads`: the model's pool, or null for the calling
  // thread alone.
  Status run_conv_with(const Conv2d& conv, const Tensor& x,
                       BufferPool* buffers, Tensor* y) const {
    return run_conv_with(conv, x, buffers, y, pool.get());
  }
  // With channel_offset >= 0, reads the input channels [channel_offset,
  // channel_offset + in_channels) of x, else all of them.
  Status run_conv_with(const Conv2d& conv, const Tensor& x,
                       BufferPool* buffers, Tensor* y, ThreadPool* threads,
                       int64_t channel_offset = -1) const {
    const ConvGeometry& g = conv.geometry();
    if (x.shape.size() != 4 ||
        (channel_offset < 0 ? x.shape[1] != g.in_channels
                            : x.shape[1] < channel_offset + g.in_channels))
      return invalid("expects input (N, " + std::to_string(g.in_channels) +
                     ", H, W), got " + x.shape_string());
    if (channel_offset < 0) channel_offset = 0;
    int64_t oh, ow;
    Status s = conv_output_size(g, x.shape[2], x.shape[3], &oh, &ow);
    if (!s.ok()) return s;
    const int64_t n = x.shape[0];
    y->shape = {n, g.out_channels, oh, ow};
    s = check_elements(y->numel(), "the output " + y->shape_string());
    if (!s.ok()) return s;
    y->data = buffers->take(size_t(y->numel()));
    const int64_t plane = x.shape[2] * x.shape[3];
    const int64_t in_size = g.in_channels * plane;
    const int64_t out_size = g.out_channels * oh * ow;
    for (int64_t b = 0; b < n; ++b) {
      s = conv.run(x.data.data() + (b * x.shape[1] + channel_offset) * plane,
                   in_size, x.shape[2], x.shape[3],
                   y->data.data() + b * out_size, out_size, threads);
      if (!s.ok()) return s;
    }
    return Status::Ok();
  }

  // Output rows per thread below which a chain too small for bands runs
  // conv by conv rather than one band per thread (see run_chain). With 6,
  // the demo's 13 x 13 blocks ran as bands of 7 and 6 rows, whose shared
  // rows made the first thread expand 8 of the 13 rows. Conv by conv, on
  // two threads, layer6.2 took 0.64 ms against 0.70 ms and layer7.0 0.92
  // ms against 0.99 ms (best of 15 graph runs each).
  static constexpr int64_t kMinRowsPerThread = 7;

  // Runs a conv_chain node. Where its expanded tensor is at least 4 bands
  // in size, it runs band by band of output rows. A band computes the
  // expanded rows it needs into a per-thread buffer, with zero rows for
  // the padding at the top and bottom. Then the depthwise twin without
  // row padding runs on them, and the project conv writes the band's
  // output rows. A thread runs consecutive bands and keeps the rows that
  // the next band shares. Each output gets the same operations as conv by
  // conv, so the results are the same bits. Smaller chains run as one band
  // per thread on more than one thread, where each thread gets at least
  // kMinRowsPerThread rows, and otherwise conv by conv.
  Status run_chain(const NodeData& node, const Tensor& x, BufferPool* buffers,
                   Tensor* y) const {
    const Conv2d* expand =
        node.chain[0] >= 0 ? convs[size_t(node.chain[0])].conv.get() : nullptr;
    const Conv2d& dw = *convs[size_t(node.chain[1])].conv;
    const Conv2d& rows_dw = *convs[size_t(node.chain[2])].conv;
    const Conv2d& project = *convs[size_t(node.chain[3])].conv;
    const Conv2d* rows_expand =
        node.chain[4] >= 0 ? convs[size_t(node.chain[4])].conv.get() : nullptr;
    const ConvGeometry& dg = dw.geometry();
    const int64_t in_channels =
        expand != nullptr ? expand->geometry().in_channels : dg.in_channels;
    if (x.shape.size() != 4 || x.shape[1] != in_channels)
      return invalid("expects input (N, " + std::to_string(in_channels) +
                     ", H, W), got " + x.shape_string());
    const int64_t n = x.shape[0], in_h = x.shape[2], in_w = x.shape[3];
    // h x w: the depthwise conv's input, the expand's output.
    int64_t h = in_h, w = in_w;
    Status s;
    if (rows_expand != nullptr) {
      s = conv_output_size(expand->geometry(), in_h, in_w, &h, &w);
      if (!s.ok()) return s;
    }
    const int64_t mid = dg.in_channels;
    int64_t oh, ow;
    s = conv_output_size(dg, h, w, &oh, &ow);
    if (!s.ok()) return s;
    const int64_t out_channels = project.geometry().out_channels;
    y->shape = {n, out_channels, oh, ow};
    s = check_elements(y->numel(), "the output " + y->shape_string());
    if (!s.ok()) return s;
    s = check_elements(mid * h * w, "the expanded tensor (" +
                                        std::to_string(mid) + ", " +
                                        std::to_string(h) + ", " +
                                        std::to_string(w) + ")");
    if (!s.ok()) return s;

    const int threads = pool->num_threads();
    const int64_t stride = dg.stride_h, kh = dg.kernel_h;
    // Bytes per band: kh - stride shared rows plus, per output row, stride
    // expanded rows and one depthwise output row.
    const int64_t per_row = 4 * mid * (stride * w + ow);
    const int64_t shared = 4 * mid * (kh - stride > 0 ? kh - stride : 0) * w;
    int64_t band = std::max<int64_t>(
        1, std::min(oh, (chain_band_bytes - shared) / per_row));
    int64_t bands = (oh + band - 1) / band;
    const bool small = mid * h * w < chain_band_bytes || bands < 2 * threads;
    if (small && threads > 1 && chain_band_bytes > 0 &&
        oh >= kMinRowsPerThread * threads) {
      // One band per thread: each thread runs its rows through all three
      // convs, which saves two of the three loops' hand-overs and the
      // expanded rows moving between cores, at the cost of computing the
      // rows where bands meet twice. On two threads the demo detector took
      // 22.4-24.5 against 23.2-23.4 ms, and 33.4-33.8 against 42.6 ms while
      // the VM's second core was slow: fewer hand-overs wait on it.
      // NOTE: tuned on 2 cores only. With more threads the recomputed
      // rows are a larger share of each band.
      band = (oh + threads - 1) / threads;
      bands = (oh + band - 1) / band;
    } else if (small) {
      Tensor expanded, depthwise;
      const Tensor* dw_input = &x;
      if (expand != nullptr) {
        s = run_conv_with(*expand, x, buffers, &expanded);
        if (!s.ok()) return s;
        dw_input = &expanded;
      }
      s = run_conv_with(dw, *dw_input, buffers, &depthwise);
      buffers->give(&expanded.data);
      if (!s.ok()) return s;
      s = run_conv_with(project, depthwise, buffers, y);
      buffers->give(&depthwise.data);
      return s;
    }

    y->data = buffers->take(size_t(y->numel()));
    ChainBands chain{expand, rows_expand, rows_dw, project, dg, in_channels,
                     in_h, in_w, mid, out_channels, h, w, oh, ow, band};
    // Each thread takes an equal range of output rows. Whole bands per
    // thread gave one thread a band more than the other where the count
    // was odd. On two threads that was 113 against 95 rows of the demo
    // detector's first chain.
    const int64_t items = std::min<int64_t>(threads, bands);
    std::vector<Status> failures(static_cast<size_t>(items));
    for (int64_t b = 0; b < n; ++b) {
      const float* input = x.data.data() + b * in_channels * in_h * in_w;
      float* output = y->data.data() + b * out_channels * oh * ow;
      pool->parallel_for(items, [&](int64_t item) {
        failures[size_t(item)] = run_chain_bands(
            chain, input, output, item * oh / items, (item + 1) * oh / items);
      });
      for (const Status& f : failures)
        if (!f.ok()) return f;
    }
    return Status::Ok();
  }

  // The convs and shapes of a conv chain that runs in bands.
  struct ChainBands {
    const Conv2d* expand;  // null when the chain starts at the depthwise
    // The expand without row padding where its window is larger than
    // 1x1, else null.
    const Conv2d* rows_expand;
    const Conv2d& rows_dw;
    const Conv2d& project;
    const ConvGeometry& dw;
    int64_t in_channels, in_h, in_w;  // the chain's input
    int64_t mid, out_channels;
    int64_t h, w;                     // the depthwise conv's input
    int64_t oh, ow;
    int64_t band;  // output rows per band
  };

  // Runs the output rows [row_begin, row_end) of a conv chain on one
  // image, band by band in order, on the calling thread (see run_chain).
  Status run_chain_bands(const ChainBands& c, const float* input,
                         float* output, int64_t row_begin,
                         int64_t row_end) const {
    const int64_t stride = c.dw.stride_h, kh = c.dw.kernel_h;
    const int64_t rows_max = (c.band - 1) * stride + kh;
    const int64_t in_plane = c.h * c.w, out_plane = c.oh * c.ow;
    const int64_t input_size = c.in_channels * in_plane;
    const int64_t output_size = c.out_channels * out_plane;
    // Each thread keeps its buffers between runs (see BufferPool).
    thread_local FloatVector rows_buffer, dw_buffer;
    try {
      rows_buffer.resize(size_t(c.mid * rows_max * c.w));
      dw_buffer.resize(size_t(c.mid * c.band * c.ow));
    } catch (const std::bad_alloc&) {
      return Status(StatusCode::kOutOfMemory,
                    "out of memory for the band buffers of a conv chain");
    }
    float* rows = rows_buffer.data();
    const int64_t rows_size = int64_t(rows_buffer.size());
    const int64_t rows_plane = rows_max * c.w;
    const int64_t w = c.w;
    int64_t have_lo = 0, have_hi = -1;  // input rows of the depthwise conv
                                        // kept in the buffer
    // Bands of at most c.band rows, their sizes differing by one at most.
    const int64_t count = (row_end - row_begin + c.band - 1) / c.band;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t y0 = row_begin + k * (row_end - row_begin) / count;
      const int64_t y1 = row_begin + (k + 1) * (row_end - row_begin) / count;
      const int64_t lo = y0 * stride - c.dw.pad_h;
      const int64_t hi = (y1 - 1) * stride - c.dw.pad_h + kh - 1;
      Status st;
      if (c.expand == nullptr && lo >= 0 && hi < c.h) {
        // The depthwise conv reads the rows in place.
        st = c.rows_dw.run_view(input + lo * w, input_size - lo * w,
                                in_plane, hi - lo + 1, w, dw_buffer.data(),
                                int64_t(dw_buffer.size()), c.band * c.ow,
                                nullptr);
        have_hi = -1;
      } else {
        st = fill_chain_rows(c, input, lo, hi, rows, rows_plane, &have_lo,
                             &have_hi);
        if (st.ok())
          st = c.rows_dw.run_view(rows, rows_size, rows_plane, hi - lo + 1, w,
                                  dw_buffer.data(), int64_t(dw_buffer.size()),
                                  c.band * c.ow, nullptr);
      }
      if (st.ok())
        st = c.project.run_view(dw_buffer.data(), int64_t(dw_buffer.size()),
                                c.band * c.ow, y1 - y0, c.ow,
                                output + y0 * c.ow,
                                output_size - y0 * c.ow, out_plane, nullptr);
      if (!st.ok()) return st;
    }
    return Status::Ok();
  }

  // Fills the rows buffer (planes rows_plane floats apart) with the
  // depthwise conv's input rows [lo, hi]. Rows outside the image are
  // zeros, and rows kept from the previous band (*have_lo to *have_hi)
  // move to the top. The expand conv computes the others, or they are
  // copied from the input.
  Status fill_chain_rows(const ChainBands& c, const float* input, int64_t lo,
                         int64_t hi, float* rows, int64_t rows_plane,
                         int64_t* have_lo, int64_t* have_hi) const {
    const int64_t w = c.w, in_plane = c.h * c.w;
    int64_t first_new = lo;
    if (*have_hi >= lo && *have_lo <= lo) {
      const int64_t count = *have_hi - lo + 1;
      for (int64_t ch = 0; ch < c.mid; ++ch) {
        float* plane = rows + ch * rows_plane;
        std::memmove(plane, plane + (lo - *have_lo) * w,
                     size_t(count * w) * sizeof(float));
      }
      first_new = *have_hi + 1;
    }
    *have_lo = lo;
    *have_hi = hi;
    for (int64_t r = first_new; r <= hi; ++r) {
      if (r >= 0 && r < c.h) continue;
      for (int64_t ch = 0; ch < c.mid; ++ch)
        std::fill_n(rows + ch * rows_plane + (r - lo) * w, w, 0.0f);
    }
    const int64_t valid_lo = std::max<int64_t>(first_new, 0);
    const int64_t valid_hi = std::min(hi, c.h - 1);
    if (valid_lo > valid_hi) return Status::Ok();
    const int64_t count = valid_hi - valid_lo + 1;
    float* dst = rows + (valid_lo - lo) * w;
    const float* src = input + valid_lo * w;
    if (c.expand == nullptr) {
      for (int64_t ch = 0; ch < c.mid; ++ch)
        std::copy_n(src + ch * in_plane, count * w, dst + ch * rows_plane);
      return Status::Ok();
    }
    const int64_t rows_size = c.mid * rows_plane;
    const int64_t dst_size = rows_size - (valid_lo - lo) * w;
    if (c.rows_expand == nullptr) {
      return c.expand->run_view(src, c.in_channels * in_plane - valid_lo * w,
                                in_plane, count, w, dst, dst_size, rows_plane,
                                nullptr);
    }
    return fill_window_rows(c, input, valid_lo, valid_hi, dst, dst_size,
                            rows_plane);
  }

  // Computes the expanded rows [first, last] of a chain whose expand has a
  // window larger than 1x1 into dst (planes dst_plane floats apart). The
  // twin without row padding runs on the input rows under them, in place,
  // or at the image's top and bottom on a copy with zero rows for the
  // padding.
  Status fill_window_rows(const ChainBands& c, const float* input,
                          int64_t first, int64_t last, float* dst,
                          int64_t dst_size, int64_t dst_plane) const {
    const ConvGeometry& g = c.expand->geometry();
    const int64_t in_plane = c.in_h * c.in_w;
    const int64_t top = first * g.stride_h - g.pad_h;
    const int64_t bottom = last * g.stride_h - g.pad_h + g.kernel_h - 1;
    const int64_t window = bottom - top + 1;
    if (top >= 0 && bottom < c.in_h) {
      return c.rows_expand->run_view(
          input + top * c.in_w, c.in_channels * in_plane - top * c.in_w,
          in_plane, window, c.in_w, dst, dst_size, dst_plane, nullptr);
    }
    thread_local FloatVector padded;
    try {
      padded.resize(size_t(c.in_channels * window * c.in_w));
    } catch (const std::bad_alloc&) {
      return Status(StatusCode::kOutOfMemory,
                    "out of memory for the input rows of a conv chain");
    }
    for (int64_t ch = 0; ch < c.in_channels; ++ch) {
      for (int64_t r = top; r <= bottom; ++r) {
        float* row = padded.data() + (ch * window + r - top) * c.in_w;
        if (r < 0 || r >= c.in_h) {
          std::fill_n(row, c.in_w, 0.0f);
        } else {
          std::copy_n(input + ch * in_plane + r * c.in_w, c.in_w, row);
        }
      }
    }
    return c.rows_expand->run_view(padded.data(), int64_t(padded.size()),
                                   window * c.in_w, window, c.in_w, dst,
                                   dst_size, dst_plane, nullptr);
  }

  Status run_linear(const NodeData& node, const Tensor& x,
                    BufferPool* buffers, Tensor* y) const {
    const LayerData& layer = content.layers[size_t(node.layer)];
    const int64_t in = layer.in_features, out = layer.out_features;
    if (x.shape.size() != 2 || x.shape[1] != in)
      return invalid("expects input (N, " + std::to_string(in) + "), got " +
                     x.shape_string());
    const int64_t n = x.shape[0];
    y->shape = {n, out};
    Status s = check_elements(y->numel(), "the output " + y->shape_string());
    if (!s.ok()) return s;
    y->data = buffers->take(size_t(n * out));
    pool->parallel_for(n * out, [&](int64_t item) {
      const int64_t r = item / out, o = item % out;
      const float* a = x.data.data() + r * in;
      const float* w = layer.weights.data() + o * in;
      float sum = 0.0f;
      for (int64_t i = 0; i < in; ++i) sum += a[i] * w[i];
      if (!layer.bias.empty()) sum += layer.bias[size_t(o)];
      y->data[size_t(item)] = activate(sum, node.activation);
    });
    return Status::Ok();
  }

  Status run_max_pool(const NodeData& node, const Tensor& x,
                      BufferPool* buffers, Tensor* y) const {
    if (x.shape.size() != 4)
      return invalid("expects an (N, C, H, W) input, got " +
                     x.shape_string());
    int64_t out_size[2];
    for (int k = 0; k < 2; ++k) {
      const int64_t in = x.shape[size_t(2 + k)];
      const int64_t span = in + 2 * node.padding[k] -
                           node.dilation[k] * (node.kernel[k] - 1) - 1;
      if (span < 0)
        return invalid("the input " + x.shape_string() +
                       " is smaller than the pooling window");
      int64_t o = (span + (node.ceil_mode ? node.stride[k] - 1 : 0)) /
                      node.stride[k] + 1;
      // With ceil_mode the last window must start inside the input or
      // its left padding.
      if (node.ceil_mode && (o - 1) * node.stride[k] >= in + node.padding[k])
        --o;
      out_size[k] = o;
    }
    y->shape = {x.shape[0], x.shape[1], out_size[0], out_size[1]};
    Status s = check_elements(y->numel(), "the output " + y->shape_string());
    if (!s.ok()) return s;
    y->data = buffers->take(size_t(y->numel()));
    PoolWindow window;
    for (int k = 0; k < 2; ++k) {
      window.kernel[k] = node.kernel[k];
      window.stride[k] = node.stride[k];
      window.padding[k] = node.padding[k];
      window.dilation[k] = node.dilation[k];
    }
    max_pool2d(x.data.data(), x.shape[0] * x.shape[1], x.shape[2], x.shape[3],
               window, out_size[0], out_size[1], y->data.data(), pool.get());
    return Status::Ok();
  }

  Status run_resize(const NodeData& node, const Tensor& x, const Tensor* ref,
                    BufferPool* buffers, Tensor* y) const {
    if (x.shape.size() != 4)
      return invalid("expects an (N, C, H, W) input, got " +
                     x.shape_string());
    const int64_t h = x.shape[2], w = x.shape[3];
    int64_t oh, ow;
    float sh, sw;
    if (node.size_of) {
      if (ref->shape.size() != 4)
        return invalid("expects an (N, C, H, W) size reference, got " +
                       ref->shape_string());
      oh = ref->shape[2];
      ow = ref->shape[3];
      sh = float(h) / float(oh);
      sw = float(w) / float(ow);
    } else {
      oh = h * node.scale[0];
      ow = w * node.scale[1];
      sh = 1.0f / float(node.scale[0]);
      sw = 1.0f / float(node.scale[1]);
    }
    y->shape = {x.shape[0], x.shape[1], oh, ow};
    Status s = check_elements(y->numel(), "the output " + y->shape_string());
    if (!s.ok()) return s;
    y->data = buffers->take(size_t(y->numel()));
    std::vector<int64_t> src_x(static_cast<size_t>(ow));
    for (int64_t j = 0; j < ow; ++j)
      src_x[size_t(j)] = std::min(int64_t(std::floor(float(j) * sw)), w - 1);
    // Work items of whole planes with about 16384 outputs, at least one
    // per thread.
    const int64_t planes = x.shape[0] * x.shape[1];
    const int64_t threads = pool->num_threads();
    const int64_t per_item = std::max<int64_t>(
        1, std::min(16384 / std::max<int64_t>(1, oh * ow),
                    (planes + threads - 1) / threads));
    pool->parallel_for((planes + per_item - 1) / per_item, [&](int64_t item) {
      const int64_t end = std::min(planes, (item + 1) * per_item);
      for (int64_t p = item * per_item; p < end; ++p) {
        for (int64_t i = 0; i < oh; ++i) {
          const int64_t iy = std::min(int64_t(std::floor(float(i) * sh)),
                                      h - 1);
          const float* in = x.data.data() + (p * h + iy) * w;
          float* out = y->data.data() + (p * oh + i) * ow;
          for (int64_t j = 0; j < ow; ++j) out[j] = in[src_x[size_t(j)]];
        }
      }
    });
    return Status::Ok();
  }

  // Runs one node. An input whose value dies at this node (dies[k] for
  // node.inputs[k]) may hand its buffer to the output: add, relu, relu6
  // and flatten then work in place.
  Status run_node(const NodeData& node, const bool dies[2],
                  std::vector<Tensor>* values, BufferPool* buffers,
                  Tensor* y) const {
    Tensor& x = (*values)[size_t(node.inputs[0])];
    switch (node.op) {
      case OpType::kConv2d:
        return run_conv(node, x, buffers, y, pool.get());
      case OpType::kConvChain:
        return run_chain(node, x, buffers, y);
      case OpType::kLinear:
        return run_linear(node, x, buffers, y);
      case OpType::kAdd: {
        Tensor& b = (*values)[size_t(node.inputs[1])];
        if (x.shape != b.shape)
          return invalid("adds tensors of different shapes " +
                         x.shape_string() + " and " + b.shape_string());
        y->shape = x.shape;
        // The pointers stay valid when a buffer moves to y.
        const float* pa = x.data.data();
        const float* pb = b.data.data();
        if (dies[0]) {
          y->data = std::move(x.data);
        } else if (dies[1]) {
          y->data = std::move(b.data);
        } else {
          y->data = buffers->take(size_t(y->numel()));
        }
        add_activate(pa, pb, y->numel(), node.activation, y->data.data(),
                     pool.get());
        return Status::Ok();
      }
      case OpType::kRelu:
      case OpType::kRelu6: {
        const Activation act = node.op == OpType::kRelu ? Activation::kReLU
                                                        : Activation::kReLU6;
        y->shape = x.shape;
        const float* px = x.data.data();
        y->data = dies[0] ? std::move(x.data)
                          : buffers->take(size_t(y->numel()));
        apply_activation(px, y->numel(), act, y->data.data(), pool.get());
        return Status::Ok();
      }
      case OpType::kMaxPool2d:
        return run_max_pool(node, x, buffers, y);
      case OpType::kResizeNearest:
        return run_resize(node, x,
                          node.size_of ? &(*values)[size_t(node.inputs[1])]
                                       : nullptr,
                          buffers, y);
      case OpType::kFlatten: {
        if (x.shape.size() < 2)
          return invalid("flattens an input of rank 2 or more, got " +
                         x.shape_string());
        y->shape = {x.shape[0], x.numel() / std::max<int64_t>(x.shape[0], 1)};
        if (dies[0]) {
          y->data = std::move(x.data);
        } else {
          y->data = x.data;
        }
        return Status::Ok();
      }
    }
    return invalid("unknown operator");
  }

  // Describes node i for profiles: operator, kernel size and weight type.
  std::string node_label(const NodeData& node) const {
    static const char* names[] = {"conv2d", "linear", "add", "relu", "relu6",
                                  "max_pool2d", "resize_nearest", "flatten",
                                  "conv_chain"};
    std::string label = names[int(node.op)];
    if (node.op == OpType::kConv2d) {
      const LayerData& layer = content.layers[size_t(node.layer)];
      const ConvGeometry& g = layer.geometry;
      label += " " + std::to_string(g.kernel_h) + "x" +
               std::to_string(g.kernel_w);
      if (g.groups > 1) label += g.groups == g.in_channels ? " dw" : " grouped";
      label += layer.bits ? " q" + std::to_string(layer.bits) : " f32";
    }
    if (node.op == OpType::kConvChain) {
      // e.g. "conv_chain 3 q4": three convs, 4-bit (mixed: "q4/f32").
      std::vector<std::string> kinds;
      for (int l : node.chain_layers) {
        const int bits = content.layers[size_t(l)].bits;
        const std::string kind = bits ? "q" + std::to_string(bits) : "f32";
        if (std::find(kinds.begin(), kinds.end(), kind) == kinds.end())
          kinds.push_back(kind);
      }
      label += " " + std::to_string(node.chain_layers.size());
      for (size_t k = 0; k < kinds.size(); ++k)
        label += (k ? "/" : " ") + kinds[k];
    }
    return label;
  }

  // Names the layers of node i for profiles.
  std::string node_layers(const NodeData& node) const {
    if (node.chain_layers.empty())
      return node.layer >= 0 ? content.layers[size_t(node.layer)].name : "";
    std::string names;
    for (int l : node.chain_layers)
      names += (names.empty() ? "" : " + ") + content.layers[size_t(l)].name;
    return names;
  }

  // Returns the profile entry of a node that took `ms` milliseconds.
  Model::NodeTime node_time(const NodeData& node, double ms,
                            bool concurrent) const {
    Model::NodeTime t;
    t.op = node_label(node);
    t.layer = node_layers(node);
    t.ms = ms;
    t.concurrent = concurrent;
    return t;
  }

  // Estimated work of a conv on an input of `shape`: multiply-adds, 0.4 of
  // them with Winograd. Sets *out_shape, or returns false when the input
  // does not fit the layer (the node then reports it when it runs).
  bool conv_work(const NodeData& node, const std::vector<int64_t>& shape,
                 std::vector<int64_t>* out_shape, double* work) const {
    const Conv2d& conv = *convs[size_t(node.conv)].conv;
    const ConvGeometry& g = conv.geometry();
    int64_t oh = 0, ow = 0;
    const int64_t offset = node.input_channel_offset;
    if (shape.size() != 4 ||
        (offset < 0 ? shape[1] != g.in_channels
                    : shape[1] < offset + g.in_channels) ||
        !conv_output_size(g, shape[2], shape[3], &oh, &ow).ok())
      return false;
    *out_shape = {shape[0], g.out_channels, oh, ow};
    bool winograd = false;
    if (const auto* dense = dynamic_cast<const DenseConv2d*>(&conv))
      winograd = dense->uses_winograd(shape[2], shape[3]);
    else if (const auto* quant = dynamic_cast<const QuantConv2d*>(&conv))
      winograd = quant->uses_winograd(shape[2], shape[3]);
    *work = double(shape[0]) * double(g.out_channels) *
            double(g.in_channels / g.groups) * double(g.kernel_h) *
            double(g.kernel_w) * double(oh) * double(ow) *
            (winograd ? 0.4 : 1.0);
    return true;
  }

  // Runs the nodes of `section` as a task graph: each node on one thread,
  // the pool's threads taking the ready node with the most work left on
  // its longest path of dependent nodes. It does so, and sets *ran, only
  // when that path takes at most kSectionSlack times a thread's share of
  // the section's estimated work. Otherwise the caller runs the nodes one
  // after the other on all threads. Buffers return to the pool when the
  // last reader of their value in the section has finished, if no node
  // after the section reads it.
  Status run_section(const GraphData& graph, const NodeSection& section,
                     std::vector<Tensor>* values, BufferPool* buffers,
                     std::vector<Model::NodeTime>* times, bool* ran) const {
    *ran = false;
    const int n = section.end - section.begin;
    std::vector<std::vector<int64_t>> shapes(static_cast<size_t>(n));
    std::vector<double> work(static_cast<size_t>(n), 0.0);
    std::vector<std::vector<int>> readers(static_cast<size_t>(n));
    for (int j = 0; j < n; ++j) {
      const NodeData& node = graph.nodes[size_t(section.begin + j)];
      const std::vector<int64_t>* shape =
          &(*values)[size_t(node.inputs[0])].shape;
      for (int k : section.waits_for[size_t(j)]) {
        readers[size_t(k)].push_back(j);
        shape = &shapes[size_t(k)];
      }
      if (!conv_work(node, *shape, &shapes[size_t(j)], &work[size_t(j)]))
        return Status::Ok();
    }
    // Work left on the longest path from each node (nodes only wait for
    // earlier ones, so a backward pass suffices).
    std::vector<double> path(static_cast<size_t>(n), 0.0);
    double total = 0.0, longest = 0.0;
    for (int j = n - 1; j >= 0; --j) {
      double after = 0.0;
      for (int r : readers[size_t(j)]) after = std::max(after, path[size_t(r)]);
      path[size_t(j)] = work[size_t(j)] + after;
      total += work[size_t(j)];
      longest = std::max(longest, path[size_t(j)]);
    }
    const int threads = pool->num_threads();
    if (threads < 2 || longest > kSectionSlack * total / threads)
      return Status::Ok();
    *ran = true;

    // Readers left in the section per value it reads.
    std::map<int, int> readers_left;
    for (int j = 0; j < n; ++j)
      for (int v : graph.nodes[size_t(section.begin + j)].inputs)
        ++readers_left[v];
    std::vector<int> waiting(static_cast<size_t>(n));
    std::vector<int> ready;
    for (int j = 0; j < n; ++j) {
      waiting[size_t(j)] = int(section.waits_for[size_t(j)].size());
      if (waiting[size_t(j)] == 0) ready.push_back(j);
    }
    std::vector<Status> status(static_cast<size_t>(n));
    std::vector<double> ms(static_cast<size_t>(n), 0.0);
    std::mutex mutex;
    std::condition_variable changed;
    int unstarted = n;
    bool failed = false;
    pool->parallel_for(threads, [&](int64_t) {
      std::unique_lock<std::mutex> lock(mutex);
      int last = -1;  // the node this thread ran last
      while (unstarted > 0 && !failed) {
        if (ready.empty()) {
          changed.wait(lock);
          continue;
        }
        // A reader of the last node's output finds it in this core's
        // cache, so it goes first; then the most work on the path.
        const auto rank = [&](int a) {
          const bool local =
              last >= 0 && std::find(readers[size_t(last)].begin(),
                                     readers[size_t(last)].end(),
                                     a) != readers[size_t(last)].end();
          return std::make_pair(local, path[size_t(a)]);
        };
        auto best = std::max_element(
            ready.begin(), ready.end(),
            [&](int a, int b) { return rank(a) < rank(b); });
        const int j = *best;
        last = j;
        ready.erase(best);
        if (--unstarted == 0) changed.notify_all();
        lock.unlock();
        const NodeData& node = graph.nodes[size_t(section.begin + j)];
        Tensor y;
        const auto start = std::chrono::steady_clock::now();
        Status s;
        // A pool thread must not throw (see ThreadPool::parallel_for).
        try {
          s = run_conv(node, (*values)[size_t(node.inputs[0])], buffers, &y,
                       nullptr);
        } catch (const std::bad_alloc&) {
          s = Status(StatusCode::kOutOfMemory,
                     "out of memory running layer " + node_layers(node));
        }
        ms[size_t(j)] = std::chrono::duration<double, std::milli>(
                            std::chrono::steady_clock::now() - start).count();
        if (s.ok()) (*values)[size_t(node.output)] = std::move(y);
        lock.lock();
        status[size_t(j)] = s;
        if (!s.ok()) {
          failed = true;
        } else {
          for (int v : node.inputs) {
            if (--readers_left[v] == 0 &&
                graph.last_use[size_t(v)] < section.end)
              buffers->give(&(*values)[size_t(v)].data);
          }
          for (int r : readers[size_t(j)])
            if (--waiting[size_t(r)] == 0) ready.push_back(r);
        }
        changed.notify_all();
      }
    });
    for (int j = 0; j < n; ++j) {
      const NodeData& node = graph.nodes[size_t(section.begin + j)];
      if (times != nullptr && !failed) {
        times->push_back(node_time(node, ms[size_t(j)], true));
      }
      if (!status[size_t(j)].ok())
        return Status(status[size_t(j)].code(),
                      "node " + std::to_string(section.begin + j) + ": " +
                          status[size_t(j)].message());
    }
    return Status::Ok();
  }

  // Runs a graph on `inputs`, which it copies into reused buffers (so the
  // caller's data is copied once on the way in).
  Status run_graph(const std::string& name,
                   const std::vector<InputView>& inputs,
                   std::vector<std::pair<std::string, Tensor>>* outputs,
                   std::vector<Model::NodeTime>* times = nullptr) const {
    auto it = content.graphs.find(name);
    if (it == content.graphs.end())
      return invalid("the model has no graph '" + name + "'");
    const GraphData& graph = it->second;
    if (inputs.size() != graph.inputs.size())
      return invalid("graph '" + name + "' takes " +
                     std::to_string(graph.inputs.size()) + " inputs, got " +
                     std::to_string(inputs.size()));
    std::vector<Tensor> values(static_cast<size_t>(graph.num_values));
    for (size_t i = 0; i < inputs.size(); ++i) {
      const InputView& t = inputs[i];
      Tensor shape;
      shape.shape = *t.shape;
      bool ok = !t.shape->empty() && t.data != nullptr;
      for (int64_t d : *t.shape) ok = ok && d > 0;
      ok = ok && shape.numel() <= ConvLimits::kMaxElements &&
           t.size == shape.numel();
      if (!ok)
        return invalid("input " + std::to_string(i) + " of graph '" + name +
                       "' has shape " + shape.shape_string() + " and " +
                       std::to_string(t.size) +
                       " values; expected positive dimensions and a matching "
                       "value count");
    }
    BufferPool buffers;
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      buffers.adopt(&cached_buffers);
    }
    // The inputs are copied into reused buffers: new ones would be
    // page-faulted on every run.
    for (size_t i = 0; i < inputs.size(); ++i) {
      Tensor& value = values[size_t(graph.inputs[i])];
      value.shape = *inputs[i].shape;
      value.data = buffers.take(size_t(inputs[i].size));
      std::copy_n(inputs[i].data, inputs[i].size, value.data.begin());
    }
    size_t next_section = 0;
    for (size_t i = 0; i < graph.nodes.size(); ++i) {
      if (next_section < graph.sections.size() &&
          graph.sections[next_section].begin == int(i)) {
        const NodeSection& section = graph.sections[next_section++];
        bool ran = false;
        Status s = run_section(graph, section, &values, &buffers, times, &ran);
        if (!s.ok())
          return Status(s.code(), "graph '" + name + "' " + s.message());
        if (ran) {
          i = size_t(section.end) - 1;
          continue;
        }
      }
      const NodeData& node = graph.nodes[i];
      // An input dies here when this node is its last reader (graph
      // outputs never die) and it is not read twice by this node.
      bool dies[2] = {false, false};
      for (size_t k = 0; k < node.inputs.size() && k < 2; ++k) {
        const int v = node.inputs[k];
        dies[k] = graph.last_use[size_t(v)] == int(i) &&
                  std::count(node.inputs.begin(), node.inputs.end(), v) == 1;
      }
      Tensor y;
      const auto start = std::chrono::steady_clock::now();
      Status s = run_node(node, dies, &values, &buffers, &y);
      if (times != nullptr) {
        times->push_back(node_time(
            node,
            std::chrono::duration<double, std::milli>(
                std::chrono::steady_clock::now() - start).count(),
            false));
      }
      if (!s.ok())
        return Status(s.code(), "graph '" + name + "' node " +
                                    std::to_string(i) + ": " + s.message());
      values[size_t(node.output)] = std::move(y);
      for (int v : node.inputs)
        if (graph.last_use[size_t(v)] == int(i))
          buffers.give(&values[size_t(v)].data);
    }
    outputs->clear();
    for (size_t k = 0; k < graph.outputs.size(); ++k) {
      const auto& o = graph.outputs[k];
      Tensor& value = values[size_t(o.second)];
      // Move each output out, except a value listed again later.
      bool listed_again = false;
      for (size_t j = k + 1; j < graph.outputs.size(); ++j)
        listed_again = listed_again || graph.outputs[j].second == o.second;
      if (listed_again) {
        outputs->emplace_back(o.first, value);
      } else {
        outputs->emplace_back(o.first, std::move(value));
      }
    }
    std::lock_guard<std::mutex> lock(cache_mutex);
    buffers.release(&cached_buffers);
    return Status::Ok();
  }
};

namespace {

// Returns the index of the first NaN or infinity among n floats, or -1.
// Chunks of an OR over the exponent bits, which the compiler vectorises,
// then a search in the chunk that has one.
int64_t first_non_finite(const float* data, int64_t n) {
  constexpr int64_t kChunk = 4096;
  constexpr uint32_t kExponent = 0x7f800000u;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t end = std::min(n, begin + kChunk);
    uint32_t found = 0;
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, data + i, sizeof(bits));
      found |= uint32_t((bits & kExponent) == kExponent);
    }
    if (found == 0) continue;
    for (int64_t i = begin; i < end; ++i) {
      if (!std::isfinite(data[i])) return i;
    }
  }
  return -1;
}

// Computes the value count of an input of `shape`, or rejects a shape
// whose count passes ConvLimits::kMaxElements (before it could overflow).
Status input_count(const std::vector<int64_t>& shape, int64_t* count) {
  *count = 1;
  for (int64_t d : shape) {
    if (d > 0 && *count > ConvLimits::kMaxElements / d) {
      Tensor t;
      t.shape = shape;
      return invalid("the input " + t.shape_string() + " has more than " +
                     std::to_string(ConvLimits::kMaxElements) +
                     " values: use a smaller image");
    }
    *count *= d;
  }
  return Status::Ok();
}

std::vector<InputView> views_of(const std::vector<Tensor>& tensors) {
  std::vector<InputView> views;
  for (const Tensor& t : tensors)
    views.push_back({&t.shape, t.data.data(), int64_t(t.data.size())});
  return views;
}

}  // namespace

Model::Model(std::unique_ptr<ModelImpl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;

Status Model::load_buffer(const uint8_t* data, size_t size,
                          const std::string& name, const ModelOptions& options,
                          std::unique_ptr<Model>* out) {
  if (options.threads < 1 || options.threads > ThreadPool::kMaxThreads)
    return invalid("threads is " + std::to_string(options.threads) +
                   ", expected 1 to " +
                   std::to_string(ThreadPool::kMaxThreads));
  if (options.chain_band_bytes < 0)
    return invalid("chain_band_bytes is " +
                   std::to_string(options.chain_band_bytes) +
                   ", expected 0 (run chains conv by conv) or a byte count");
  if (options.quant_winograd_max_bytes < 0)
    return invalid("quant_winograd_max_bytes is " +
                   std::to_string(options.quant_winograd_max_bytes) +
                   ", expected 0 (codebook kernels only) or a byte count");
  std::unique_ptr<ModelImpl> impl(new ModelImpl);
  Status s = parse_packed(data, size, name, &impl->content);
  if (!s.ok()) return s;
  s = impl->build(options);
  if (!s.ok()) return Status(s.code(), name + ": " + s.message());
  out->reset(new Model(std::move(impl)));
  return Status::Ok();
}

Status Model::load_file(const std::string& path, const ModelOptions& options,
                        std::unique_ptr<Model>* out) {
  struct stat info;
  if (::stat(path.c_str(), &info) == 0 && !S_ISREG(info.st_mode))
    return invalid(path + " is not a regular file (a folder?): give the "
                   "path of a packed .dgms file");
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file)
    return invalid("cannot open " + path + ": " + std::strerror(errno) +
                   "; check the path");
  const std::streamoff size = file.tellg();
  if (size < 0) return invalid("cannot read " + path);
  std::vector<uint8_t> data(static_cast<size_t>(size));
  file.seekg(0);
  if (size > 0 && !file.read(reinterpret_cast<char*>(data.data()), size))
    return invalid("cannot read " + path);
  return load_buffer(data.data(), data.size(), path, options, out);
}

const std::string& Model::detector_type() const {
  return impl_->content.detector_type;
}
const std::string& Model::kind() const { return impl_->content.kind; }
int64_t Model::num_levels() const { return impl_->content.num_levels; }
const std::vector<std::string>& Model::classes() const {
  return impl_->content.classes;
}
const PreprocessSettings& Model::preprocess() const {
  return impl_->content.preprocess;
}
const Json& Model::meta() const { return impl_->content.meta; }

Status Model::run_graph(
    const std::string& name, const std::vector<Tensor>& inputs,
    std::vector<std::pair<std::string, Tensor>>* outputs) const {
  return impl_->run_graph(name, views_of(inputs), outputs);
}

Status Model::profile_graph(const std::string& name,
                            const std::vector<Tensor>& inputs,
                            std::vector<NodeTime>* times) const {
  std::vector<std::pair<std::string, Tensor>> outputs;
  times->clear();
  Status s = impl_->run_graph(name, views_of(inputs), &outputs, times);
  impl_->recycle(&outputs);
  return s;
}

Status Model::detect(const Tensor& input, const std::vector<ImageInfo>& images,
                     bool rescale,
                     std::vector<std::vector<Detection>>* detections) const {
  int64_t count = 0;
  Status s = input_count(input.shape, &count);
  if (!s.ok()) return s;
  if (int64_t(input.data.size()) != count)
    return invalid("the input tensor has shape " + input.shape_string() +
                   " but " + std::to_string(input.data.size()) + " values");
  return detect(input.data.data(), input.shape, images, rescale, detections);
}

Status Model::detect(const float* data, const std::vector<int64_t>& shape,
                     const std::vector<ImageInfo>& images, bool rescale,
                     std::vector<std::vector<Detection>>* detections) const {
  Tensor input;  // the shape only
  input.shape = shape;
  if (impl_->content.kind != "single_stage")
    return Status(StatusCode::kUnsupported,
                  "detect supports single_stage detectors (RetinaNet); this "
                  "model is " + impl_->content.kind);
  if (input.shape.size() != 4 || input.shape[1] != 3 ||
      int64_t(images.size()) != input.shape[0])
    return invalid("detect takes an (N, 3, H, W) tensor and N image "
                   "descriptions, got " + input.shape_string() + " and " +
                   std::to_string(images.size()));
  for (size_t i = 0; i < images.size(); ++i) {
    const ImageInfo& image = images[i];
    if (image.img_height < 1 || image.img_height > input.shape[2] ||
        image.img_width < 1 || image.img_width > input.shape[3])
      return invalid(
          "image " + std::to_string(i) + " has img_shape (" +
          std::to_string(image.img_height) + ", " +
          std::to_string(image.img_width) + "), expected 1 to (" +
          std::to_string(input.shape[2]) + ", " +
          std::to_string(input.shape[3]) +
          "), the input's size: give the resized size before padding");
  }
  int64_t count = 0;
  Status s = input_count(shape, &count);
  if (!s.ok()) return s;
  // NaN and infinity are rejected: the SIMD kernels' ReLU (max with 0)
  // turns NaN into 0, so such an input gave boxes where PyTorch gives
  // none.
  if (data != nullptr) {
    const int64_t bad = first_non_finite(data, count);
    if (bad >= 0) {
      const int64_t h = shape[2], w = shape[3];
      return invalid("the input value at (image " +
                     std::to_string(bad / (3 * h * w)) + ", channel " +
                     std::to_string(bad / (h * w) % 3) + ", row " +
                     std::to_string(bad / w % h) + ", column " +
                     std::to_string(bad % w) + ") is " +
                     std::to_string(data[bad]) +
                     ": pass a finite, preprocessed image");
    }
  }
  std::vector<std::pair<std::string, Tensor>> outputs;
  // A view: a copy of the input tensor cost about 0.4 ms per call on a
  // 416 x 416 image (a new 2 MB allocation, page-faulted each time).
  s = impl_->run_graph("main", {{&shape, data, data != nullptr ? count : 0}},
                       &outputs);
  if (!s.ok()) return s;
  const int64_t levels = impl_->content.num_levels;
  std::vector<const Tensor*> cls(static_cast<size_t>(levels)), bbox(static_cast<size_t>(levels));
  for (const auto& o : outputs)
    for (int64_t i = 0; i < levels; ++i) {
      if (o.first == "cls_score." + std::to_string(i)) cls[size_t(i)] =
          &o.second;
      if (o.first == "bbox_pred." + std::to_string(i)) bbox[size_t(i)] =
          &o.second;
    }
  detections->assign(images.size(), {});
  for (size_t b = 0; b < images.size(); ++b) {
    s = postprocess_dense_head(impl_->head, cls, bbox, int64_t(b), images[b],
                               rescale, &(*detections)[b]);
    if (!s.ok()) return s;
  }
  impl_->recycle(&outputs);
  return Status::Ok();
}

}  // namespace dgms_rt
