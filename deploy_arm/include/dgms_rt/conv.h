// Quantized (codebook) and dense FP32 2-D convolution layers for batch-1
// inference on CPUs.
//
// Activation layout: every tensor is float32 NCHW with batch 1, that is
// [channels][height][width], row-major and densely packed. The kernels
// vectorise over output pixels along a row, which NCHW keeps contiguous
// in memory (docs/deploy_arm.md explains the choice).
//
// A layer is created once from its description (validated and repacked into
// the kernel's layout) and then run any number of times, also concurrently
// from several threads. All calls return a Status instead of throwing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dgms_rt/status.h"
#include "dgms_rt/thread_pool.h"

namespace dgms_rt {

// Instruction set of a kernel. kAuto picks NEON on AArch64 and AVX2 on
// x86-64 CPUs that have it, else scalar. kAvx512 runs only when asked for:
// it was not faster than AVX2 over whole networks on the AMD Zen 4 CPU it
// was measured on, but may be on CPUs with full-width 512-bit units.
enum class Isa { kAuto = 0, kScalar = 1, kAvx2 = 2, kNeon = 3, kAvx512 = 4 };

// Returns "auto", "scalar", "avx2", "neon" or "avx512".
const char* isa_name(Isa isa);

// Returns true when this build contains the kernels for isa and the CPU
// running it supports them. kScalar and kAuto are always supported.
bool isa_supported(Isa isa);

// Resolves kAuto as described at Isa; returns other values unchanged.
Isa resolve_isa(Isa isa);

enum class Activation { kNone = 0, kReLU = 1, kReLU6 = 2 };

// Kernel of a quantized layer. Both use the codebook directly.
// - kAccumulate sums the inputs that share a codebook index and
//   multiplies each sum by its codebook value once, skipping index 0, so
//   its time falls with the pruned fraction.
// - kLookup decodes each weight as codebook[index] inside a multiply-add
//   kernel blocked over output channels, like the dense one, from 1-byte
//   indices; its time does not depend on the pruned fraction.
// - kAuto picks kAccumulate when at least kAccumulateMinSparsity of the
//   weights have index 0, else kLookup.
enum class QuantKernel { kAuto = 0, kAccumulate = 1, kLookup = 2 };

// Pruned fraction from which kAuto picks kAccumulate: near the break-even
// measured on x86 AVX2 (docs/deploy_arm.md).
// NOTE: not measured on ARM; the NEON break-even is an estimate.
constexpr double kAccumulateMinSparsity = 0.5;

// Returns "auto", "accumulate" or "lookup".
const char* quant_kernel_name(QuantKernel kernel);

// Geometry of a 2-D convolution, with PyTorch's meaning of every field.
// Input channels and output channels must both be divisible by groups;
// depthwise is groups == in_channels == out_channels.
struct ConvGeometry {
  int64_t out_channels = 0;
  int64_t in_channels = 0;
  int64_t groups = 1;
  int64_t kernel_h = 1;
  int64_t kernel_w = 1;
  int64_t stride_h = 1;
  int64_t stride_w = 1;
  int64_t pad_h = 0;
  int64_t pad_w = 0;
  int64_t dilation_h = 1;
  int64_t dilation_w = 1;
};

// Limits enforced on descriptions and inputs. A value beyond them is
// rejected with kInvalidArgument; offsets inside the kernels are int32, so
// every buffer a kernel indexes stays below 2^31 elements.
struct ConvLimits {
  static constexpr int64_t kMaxChannels = int64_t(1) << 20;
  static constexpr int64_t kMaxKernel = 1024;
  static constexpr int64_t kMaxStride = 1024;
  static constexpr int64_t kMaxDilation = 1024;
  static constexpr int64_t kMaxPad = 1024;
  static constexpr int64_t kMaxSpatial = int64_t(1) << 20;
  static constexpr int64_t kMaxElements = (int64_t(1) << 31) - 1;
};

// A quantized conv layer in the packed file's canonical form.
//
// y[o] = act(scale[o] * sum(codebook[index] * x) + bias[o])
//
// indices holds out_channels * (in_channels / groups) * kernel_h * kernel_w
// codebook indices in PyTorch OIHW order, each `bits` wide, packed
// LSB-first into one byte stream: index j occupies stream bits
// [j * bits, (j + 1) * bits), and stream bit i is bit (i % 8) of byte i / 8.
// The unused high bits of the last byte must be zero. codebook[0] must be
// 0.0, the pruned component; weights with index 0 are skipped.
// Every pointer is only read during create(); the layer keeps no reference.
struct QuantConvDesc {
  ConvGeometry geometry;
  int bits = 0;                      // 1..8
  const float* codebook = nullptr;   // 2^bits values
  int64_t codebook_size = 0;
  const uint8_t* indices = nullptr;  // ceil(weights * bits / 8) bytes
  int64_t indices_size = 0;
  const float* scale = nullptr;      // out_channels values
  int64_t scale_size = 0;
  const float* bias = nullptr;       // out_channels values
  int64_t bias_size = 0;
  Activation activation = Activation::kNone;
};

// Algorithm of a dense layer's 3x3 stride-1 convs (see DenseConv2d).
enum class DenseAlgorithm { kAuto = 0, kDirect = 1, kWinograd = 2 };

const char* dense_algorithm_name(DenseAlgorithm algorithm);

// A dense FP32 conv layer: y[o] = act(sum(weight * x) + bias[o]), or with
// a scale y[o] = act(fma(sum(weight * x), scale[o], bias[o])), the fused
// multiply-add rounded once (a folded BatchNorm that was not merged into
// the weights). weights contains out_channels * (in_channels / groups) *
// kernel_h * kernel_w floats in OIHW order. bias and scale may be null
// (then their size must be 0).
struct DenseConvDesc {
  ConvGeometry geometry;
  const float* weights = nullptr;
  int64_t weights_size = 0;
  const float* bias = nullptr;
  int64_t bias_size = 0;
  const float* scale = nullptr;
  int64_t scale_size = 0;
  Activation activation = Activation::kNone;
  DenseAlgorithm algorithm = DenseAlgorithm::kAuto;
};

// Checks a geometry against ConvLimits and the divisibility rules.
Status validate_geometry(const ConvGeometry& geometry);

// Computes the output height and width for an input of height x width, or
// an error when the input is empty, too large, or smaller than the dilated
// kernel after padding.
Status conv_output_size(const ConvGeometry& geometry, int64_t height,
                        int64_t width, int64_t* out_height,
                        int64_t* out_width);

// Decodes a description's packed indices into one uint8 per weight
// (OIHW order), after validating the description. Used by tests and tools
// that need the plain weights.
Status unpack_indices(const QuantConvDesc& desc, std::vector<uint8_t>* out);

namespace detail {
struct LookupKernelArgs;
struct DenseKernelArgs;
}  // namespace detail

struct ConvPlan;     // shape-dependent tables, built on first run per shape
struct ConvWeights;  // repacked weights, kernel-specific

// Base of both layer kinds: geometry, the chosen instruction set and the
// shape-dependent plan cache. Not constructible directly.
class Conv2d {
 public:
  virtual ~Conv2d();

  const ConvGeometry& geometry() const { return geometry_; }
  Activation activation() const { return activation_; }
  Isa isa() const { return isa_; }

  // Input shapes whose plans a layer keeps (see run()).
  static constexpr size_t kMaxPlans = 8;

  // Runs the layer on input [in_channels][height][width] and writes
  // output [out_channels][out_height][out_width]; input_size and
  // output_size are element counts and must match exactly. pool may be
  // null (single thread). A run builds offset tables for its (height,
  // width) and keeps those of the kMaxPlans most recent shapes, so runs
  // that cycle through more shapes than that rebuild them every time.
  // Each calling thread keeps a prepared-input buffer between runs.
  Status run(const float* input, int64_t input_size, int64_t height,
             int64_t width, float* output, int64_t output_size,
             ThreadPool* pool) const;

  // Runs the layer on views into larger buffers: input channel c is the
  // height x width plane at input + c * input_plane, output channel o the
  // out_h x out_w plane at output + o * output_plane. A band of rows of an
  // NCHW tensor is such a view (the plane distance is the full tensor's
  // plane). Each distance must be at least its plane's size, and the
  // buffers of input_size and output_size elements must contain every
  // plane. Each view may span at most ConvLimits::kMaxElements elements.
  // A view that breaks these rules, or a null buffer, returns
  // kInvalidArgument. run() is run_view() with dense planes.
  Status run_view(const float* input, int64_t input_size,
                  int64_t input_plane, int64_t height, int64_t width,
                  float* output, int64_t output_size, int64_t output_plane,
                  ThreadPool* pool) const;

 protected:
  Conv2d(const ConvGeometry& geometry, Activation activation, Isa isa);

  // Builds the kernel-specific part of a plan (tap offsets).
  virtual Status fill_plan(ConvPlan* plan) const = 0;
  // Runs the kernel over the prepared input. Output planes lie out_plane
  // floats apart.
  virtual void compute(const ConvPlan& plan, const float* prepared,
                       float* output, int64_t out_plane,
                       ThreadPool* pool) const = 0;
  // Runs a plan marked `raw_input` on the unprepared NCHW input, whose
  // planes lie plan.in_plane floats apart: Winograd, flat 1x1 plans and
  // depthwise layers that prepare one group at a time. Only layers whose
  // fill_plan() marks plans so override it.
  virtual void compute_raw(const ConvPlan& plan, const float* input,
                           float* output, int64_t out_plane,
                           ThreadPool* pool) const;

  Status get_plan(int64_t height, int64_t width, int64_t in_plane,
                  std::shared_ptr<const ConvPlan>* plan) const;

  ConvGeometry geometry_;
  Activation activation_;
  Isa isa_;
  int lanes_ = 1;          // output pixels per kernel vector
  int tile_segments_ = 1;  // vectors per kernel call, set by the subclass
  // Vectors per call of the smaller tiles that may end a plan, or 0 where
  // the layer's kernels take none. The subclass sets it.
  int tail_segments_ = 0;

 private:
  mutable std::mutex plan_mutex_;
  // The plans of the most recent shapes, most recently used first.
  mutable std::vector<std::shared_ptr<const ConvPlan>> plans_;
};

// Quantized conv with codebook kernels (see QuantKernel).
//
// A 3x3 stride-1 layer without groups or dilation can also keep the
// Winograd transform of its decoded weights (codebook[index]), which
// takes 36 floats per filter and input channel instead of 9 indices.
// create() builds it when winograd_max_bytes is positive and the
// transformed filters take at most that many bytes. Runs then use it on
// the input shapes where DenseAlgorithm::kAuto would (see DenseConv2d),
// and the codebook kernel on the others. Winograd rounds differently
// from the direct kernels (see docs/deploy_arm.md).
class QuantConv2d : public Conv2d {
 public:
  // Validates desc and repacks it for the chosen kernel. isa kAuto picks
  // the fastest supported instruction set; an explicit isa that is not
  // supported returns kUnsupported. A negative winograd_max_bytes returns
  // kInvalidArgument.
  static Status create(const QuantConvDesc& desc, Isa isa,
                       std::unique_ptr<QuantConv2d>* out,
                       QuantKernel kernel = QuantKernel::kAuto,
                       int64_t winograd_max_bytes = 0);
  ~QuantConv2d() override;

  // The kernel in use (never kAuto).
  QuantKernel kernel() const { return kernel_; }
  int bits() const { return bits_; }
  // Fraction of weights with index 0 (pruned, skipped by the kernels).
  double sparsity() const { return sparsity_; }
  // Bytes of the layer's Winograd filters, 0 when it keeps none.
  int64_t winograd_bytes() const;
  // Whether a run on this input shape uses Winograd.
  bool uses_winograd(int64_t height, int64_t width) const;

 protected:
  Status fill_plan(ConvPlan* plan) const override;
  void compute(const ConvPlan& plan, const float* prepared, float* output,
               int64_t out_plane, ThreadPool* pool) const override;
  void compute_raw(const ConvPlan& plan, const float* input, float* output,
                   int64_t out_plane, ThreadPool* pool) const override;

 private:
  detail::LookupKernelArgs lookup_args(const ConvPlan& plan,
                                       const float* prepared, float* output,
                                       int64_t out_plane) const;

  QuantConv2d(const ConvGeometry& geometry, Activation activation, Isa isa,
              QuantKernel kernel);

  QuantKernel kernel_;
  int bits_ = 0;
  double sparsity_ = 0.0;
  std::unique_ptr<ConvWeights> weights_;
};

// Dense FP32 conv: the full-precision layers and the speed baseline.
//
// 3x3 stride-1 layers without groups or dilation can run with Winograd
// F(4x4, 3x3), which needs 36 instead of 144 multiply-adds per 16 outputs
// and input channel, at the cost of 4x the weight memory (the transformed
// filters) and a larger rounding error (see docs/deploy_arm.md).
// DenseAlgorithm::kAuto uses it for such layers when the output has at
// least half a tile block of 4x4 tiles and both channel counts are at
// least 8, and the direct kernel elsewhere. kWinograd uses it for every
// shape and is rejected for other geometries. kDirect never uses it.
class DenseConv2d : public Conv2d {
 public:
  static Status create(const DenseConvDesc& desc, Isa isa,
                       std::unique_ptr<DenseConv2d>* out);
  ~DenseConv2d() override;

  DenseAlgorithm algorithm() const { return algorithm_; }
  // Whether a run on this input shape uses Winograd.
  bool uses_winograd(int64_t height, int64_t width) const;

 protected:
  Status fill_plan(ConvPlan* plan) const override;
  void compute(const ConvPlan& plan, const float* prepared, float* output,
               int64_t out_plane, ThreadPool* pool) const override;
  void compute_raw(const ConvPlan& plan, const float* input, float* output,
                   int64_t out_plane, ThreadPool* pool) const override;

 private:
  detail::DenseKernelArgs dense_args(const ConvPlan& plan,
                                     const float* prepared, float* output,
                                     int64_t out_plane) const;

  DenseConv2d(const ConvGeometry& geometry, Activation activation, Isa isa,
              DenseAlgorithm algorithm);

  DenseAlgorithm algorithm_;
  std::unique_ptr<ConvWeights> weights_;
};

}  // namespace dgms_rt
