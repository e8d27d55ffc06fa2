// Model: builds the conv layers of a parsed packed file and executes its
// graphs (NCHW float32), then the detection post-processing.
#include "dgms_rt/model.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>

#include "loader.h"
#include "ops.h"

namespace dgms_rt {
namespace {

Status invalid(const std::string& message) {
  return Status(StatusCode::kInvalidArgument, message);
}

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
    if (buffer->capacity() > 0) free_.push_back(std::move(*buffer));
    *buffer = FloatVector();
  }

  // Moves all free buffers to or from `other` (appending).
  void adopt(std::vector<FloatVector>* other) {
    for (auto& buffer : *other) free_.push_back(std::move(buffer));
    other->clear();
  }
  void release(std::vector<FloatVector>* other) {
    for (auto& buffer : free_) other->push_back(std::move(buffer));
    free_.clear();
  }

 private:
  std::vector<FloatVector> free_;
};

// Merges each relu or relu6 node into the add before it when the add has
// no activation and the relu is the only reader of the sum. The merged add
// applies the activation to the same rounded sum, so the result is the
// same, in one pass over the tensor instead of two.
void fuse_add_activation(GraphData* graph) {
  std::vector<int> readers(size_t(graph->num_values), 0);
  for (const NodeData& node : graph->nodes)
    for (int v : node.inputs) ++readers[size_t(v)];
  for (const auto& output : graph->outputs) ++readers[size_t(output.second)];
  std::vector<int> producer(size_t(graph->num_values), -1);
  for (size_t i = 0; i < graph->nodes.size(); ++i)
    producer[size_t(graph->nodes[i].output)] = int(i);

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
  if (!changed) return;

  std::vector<NodeData> kept;
  for (size_t i = 0; i < graph->nodes.size(); ++i)
    if (!dropped[i]) kept.push_back(std::move(graph->nodes[i]));
  graph->nodes = std::move(kept);
  compute_last_use(graph);
}

}  // namespace

class ModelImpl {
 public:
  PackedContent content;
  std::vector<BuiltConv> convs;
  std::unique_ptr<ThreadPool> pool;
  DenseHeadSettings head;

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
                                     options.quant_kernel);
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

  Status run_conv(const NodeData& node, const Tensor& x, BufferPool* buffers,
                  Tensor* y) const {
    const BuiltConv& built = convs[size_t(node.conv)];
    const ConvGeometry& g = built.conv->geometry();
    if (x.shape.size() != 4 || x.shape[1] != g.in_channels)
      return invalid("expects input (N, " + std::to_string(g.in_channels) +
                     ", H, W), got " + x.shape_string());
    int64_t oh, ow;
    Status s = conv_output_size(g, x.shape[2], x.shape[3], &oh, &ow);
    if (!s.ok()) return s;
    const int64_t n = x.shape[0];
    y->shape = {n, g.out_channels, oh, ow};
    s = check_elements(y->numel(), "the output " + y->shape_string());
    if (!s.ok()) return s;
    y->data = buffers->take(size_t(y->numel()));
    const int64_t in_size = g.in_channels * x.shape[2] * x.shape[3];
    const int64_t out_size = g.out_channels * oh * ow;
    for (int64_t b = 0; b < n; ++b) {
      s = built.conv->run(x.data.data() + b * in_size, in_size, x.shape[2],
                          x.shape[3], y->data.data() + b * out_size, out_size,
                          pool.get());
      if (!s.ok()) return s;
    }
    return Status::Ok();
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

  static Status run_resize(const NodeData& node, const Tensor& x,
                           const Tensor* ref, BufferPool* buffers, Tensor* y) {
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
    const int64_t planes = x.shape[0] * x.shape[1];
    for (int64_t p = 0; p < planes; ++p)
      for (int64_t i = 0; i < oh; ++i) {
        const int64_t iy = std::min(int64_t(std::floor(float(i) * sh)),
                                    h - 1);
        const float* in = x.data.data() + (p * h + iy) * w;
        float* out = y->data.data() + (p * oh + i) * ow;
        for (int64_t j = 0; j < ow; ++j) out[j] = in[src_x[size_t(j)]];
      }
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
        return run_conv(node, x, buffers, y);
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
                                  "max_pool2d", "resize_nearest", "flatten"};
    std::string label = names[int(node.op)];
    if (node.op == OpType::kConv2d) {
      const LayerData& layer = content.layers[size_t(node.layer)];
      const ConvGeometry& g = layer.geometry;
      label += " " + std::to_string(g.kernel_h) + "x" +
               std::to_string(g.kernel_w);
      if (g.groups > 1) label += g.groups == g.in_channels ? " dw" : " grouped";
      label += layer.bits ? " q" + std::to_string(layer.bits) : " f32";
    }
    return label;
  }

  Status run_graph(const std::string& name, const std::vector<Tensor>& inputs,
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
      const Tensor& t = inputs[i];
      bool ok = !t.shape.empty();
      for (int64_t d : t.shape) ok = ok && d > 0;
      ok = ok && t.numel() <= ConvLimits::kMaxElements &&
           int64_t(t.data.size()) == t.numel();
      if (!ok)
        return invalid("input " + std::to_string(i) + " of graph '" + name +
                       "' has shape " + t.shape_string() + " and " +
                       std::to_string(t.data.size()) +
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
      value.shape = inputs[i].shape;
      value.data = buffers.take(inputs[i].data.size());
      std::copy(inputs[i].data.begin(), inputs[i].data.end(),
                value.data.begin());
    }
    for (size_t i = 0; i < graph.nodes.size(); ++i) {
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
        Model::NodeTime t;
        t.op = node_label(node);
        if (node.layer >= 0) t.layer = content.layers[size_t(node.layer)].name;
        t.ms = std::chrono::duration<double, std::milli>(
                   std::chrono::steady_clock::now() - start).count();
        times->push_back(t);
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

Model::Model(std::unique_ptr<ModelImpl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;

Status Model::load_buffer(const uint8_t* data, size_t size,
                          const std::string& name, const ModelOptions& options,
                          std::unique_ptr<Model>* out) {
  if (options.threads < 1 || options.threads > ThreadPool::kMaxThreads)
    return invalid("threads is " + std::to_string(options.threads) +
                   ", expected 1 to " +
                   std::to_string(ThreadPool::kMaxThreads));
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
  return impl_->run_graph(name, inputs, outputs);
}

Status Model::profile_graph(const std::string& name,
                            const std::vector<Tensor>& inputs,
                            std::vector<NodeTime>* times) const {
  std::vector<std::pair<std::string, Tensor>> outputs;
  times->clear();
  Status s = impl_->run_graph(name, inputs, &outputs, times);
  impl_->recycle(&outputs);
  return s;
}

Status Model::detect(const Tensor& input, const std::vector<ImageInfo>& images,
                     bool rescale,
                     std::vector<std::vector<Detection>>* detections) const {
  if (impl_->content.kind != "single_stage")
    return Status(StatusCode::kUnsupported,
                  "detect supports single_stage detectors (RetinaNet); this "
                  "model is " + impl_->content.kind);
  if (input.shape.size() != 4 || input.shape[1] != 3 ||
      int64_t(images.size()) != input.shape[0])
    return invalid("detect takes an (N, 3, H, W) tensor and N image "
                   "descriptions, got " + input.shape_string() + " and " +
                   std::to_string(images.size()));
  std::vector<std::pair<std::string, Tensor>> outputs;
  Status s = impl_->run_graph("main", {input}, &outputs);
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
