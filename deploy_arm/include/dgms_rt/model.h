// A packed DGMS detector (docs/packed-format.md) loaded for inference:
// validated reader, graph executor and detection post-processing.
//
// Model::load reads and checks the whole file as the format specifies
// (magic, version, CRC-32s, zero padding, sizes, JSON fields and ranges,
// index streams) before building any layer; malformed input returns an
// error Status naming the part that is wrong. A loaded model is immutable:
// run_graph and detect may be called from several threads, and each call
// uses the model's thread pool for the convolutions.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dgms_rt/conv.h"
#include "dgms_rt/detect.h"
#include "dgms_rt/json.h"
#include "dgms_rt/status.h"
#include "dgms_rt/tensor.h"

namespace dgms_rt {

// META `preprocess`: how an image becomes the graph input.
struct PreprocessSettings {
  float mean[3] = {0, 0, 0};
  float std[3] = {1, 1, 1};
  bool bgr_to_rgb = false;
  int64_t pad_size_divisor = 1;
  float pad_value = 0.0f;
  bool has_resize = false;
  int64_t resize_width = 0;   // META resize.scale[0]
  int64_t resize_height = 0;  // META resize.scale[1]
  bool keep_ratio = true;
};

struct ModelOptions {
  // Threads of the conv kernels and the executor. With 2 or more, a run of
  // conv nodes that do not all depend on each other (the FPN outputs and
  // the head's branches) can run as a task graph, each node on one thread.
  // It does where no chain of dependent nodes takes more than 1.25 times a
  // thread's share of the estimated work (kSectionSlack in model.cc).
  // Other nodes split their work over all threads.
  // Results are the same bits for every thread count.
  int threads = 1;
  Isa isa = Isa::kAuto;
  QuantKernel quant_kernel = QuantKernel::kAuto;
  // Full-precision 3x3 stride-1 layers: kAuto runs Winograd where it is
  // faster (see DenseConv2d), kDirect saves its 4x filter memory.
  DenseAlgorithm dense_algorithm = DenseAlgorithm::kAuto;
  // Quantized 3x3 stride-1 layers whose Winograd filters take at most this
  // many bytes keep them and run Winograd where the full-precision layers
  // would (see QuantConv2d), on the decoded weights: faster, at 36 floats
  // per filter and input channel of memory. 0 runs the codebook kernels
  // only, and a negative value fails the load. The default takes in
  // 64-channel layers (576 KiB each).
  int64_t quant_winograd_max_bytes = int64_t(1) << 20;
  // Working-set size of a band of a conv chain, in bytes. A chain is a
  // depthwise conv with a 1x1 conv after it and optionally one before it
  // (MobileNetV2's inverted residual block). Where its expanded tensor
  // is at least 4 such bands in size and there are at least 2 bands per
  // thread, it runs band by band of output rows, so that the expanded
  // rows stay in cache (docs/deploy_arm.md). The results are the same
  // bits either way. 0 runs every conv on its whole input, and a negative
  // value fails the load.
  // NOTE: the default was tuned on an x86 CPU with 1 MiB of L2 cache per
  // core; ARM cores with less L2 may run faster with smaller bands.
  int64_t chain_band_bytes = int64_t(1) << 20;
  // Full-precision convs that read the same input with the same geometry
  // and activation (the first convs of a RetinaNet head's class and box
  // branches) run as one conv over all their output channels, which shares
  // the input transform. The results are the same bits either way.
  bool merge_sibling_convs = true;
};

class ModelImpl;

class Model {
 public:
  ~Model();

  // Loads and validates a packed file from a path or from memory (copied
  // as needed; the buffer is not kept). name is used in messages.
  static Status load_file(const std::string& path, const ModelOptions& options,
                          std::unique_ptr<Model>* out);
  static Status load_buffer(const uint8_t* data, size_t size,
                            const std::string& name,
                            const ModelOptions& options,
                            std::unique_ptr<Model>* out);

  // META fields.
  const std::string& detector_type() const;  // e.g. "RetinaNet"
  const std::string& kind() const;           // single_stage / two_stage
  int64_t num_levels() const;
  const std::vector<std::string>& classes() const;  // empty when null
  const PreprocessSettings& preprocess() const;
  const Json& meta() const;

  // Runs graph `name` on its inputs (float32, NCHW for images); outputs
  // come back as (output name, tensor) in the graph's order.
  Status run_graph(const std::string& name, const std::vector<Tensor>& inputs,
                   std::vector<std::pair<std::string, Tensor>>* outputs) const;

  // Time of one graph node, for profiles.
  struct NodeTime {
    std::string op;     // e.g. "conv2d 3x3 q4" (q<bits> or f32), "add"
    std::string layer;  // layer name for conv2d and linear, else empty
    double ms = 0.0;
    // The node ran on one thread while other nodes of its section ran on
    // the others (see ModelOptions::threads), so its time overlaps theirs.
    bool concurrent = false;
  };
  // Runs graph `name` like run_graph and reports the time of each node.
  Status profile_graph(const std::string& name,
                       const std::vector<Tensor>& inputs,
                       std::vector<NodeTime>* times) const;

  // single_stage only: runs the main graph on a preprocessed batch of one
  // or more images of the same padded size (N, 3, H, W) and post-processes
  // each; image[i] describes image i. With rescale, boxes are in original
  // image pixels.
  Status detect(const Tensor& input, const std::vector<ImageInfo>& images,
                bool rescale,
                std::vector<std::vector<Detection>>* detections) const;
  // The same on caller-owned floats: `input` contains the product of
  // `shape` values, which the call reads without keeping.
  Status detect(const float* input, const std::vector<int64_t>& shape,
                const std::vector<ImageInfo>& images, bool rescale,
                std::vector<std::vector<Detection>>* detections) const;

 private:
  explicit Model(std::unique_ptr<ModelImpl> impl);
  std::unique_ptr<ModelImpl> impl_;
};

// Resizes, normalises and pads an 8-bit RGB image (height x width x 3,
// row-major, as a binary PPM stores it) as META `preprocess` says, into a
// (1, 3, H, W) tensor; fills info with the resized size and scale factors.
// Resizing is bilinear with half-pixel centres in OpenCV's fixed-point
// arithmetic (cv::resize with INTER_LINEAR on 8-bit images), so the tensor
// equals the one MMDetection's cv2 pipeline makes from the same pixels.
Status preprocess_rgb_image(const PreprocessSettings& settings,
                            const uint8_t* rgb, int64_t height, int64_t width,
                            Tensor* out, ImageInfo* info);

}  // namespace dgms_rt
