// DenseConv2d: FP32 conv with output-channel blocking.
#include <algorithm>
#include <new>
#include <string>

#include "conv_internal.h"

namespace dgms_rt {

DenseConv2d::DenseConv2d(const ConvGeometry& geometry, Activation activation,
                         Isa isa)
    : Conv2d(geometry, activation, isa) {
  const detail::KernelTable& kernels = detail::kernels_for(isa);
  lanes_ = kernels.lanes;
  tile_segments_ = output_block(geometry, kernels) == 1
                       ? kernels.dense_single_tile_segments
                       : kernels.dense_tile_segments;
}

DenseConv2d::~DenseConv2d() = default;

Status DenseConv2d::create(const DenseConvDesc& desc, Isa isa,
                           std::unique_ptr<DenseConv2d>* out) {
  if (!isa_supported(isa)) {
    return Status(StatusCode::kUnsupported,
                  std::string("instruction set ") + isa_name(isa) +
                      " is not available in this build or on this CPU; "
                      "use Isa::kAuto");
  }
  const ConvGeometry& g = desc.geometry;
  Status status = validate_geometry(g);
  if (!status.ok()) return status;

  const int64_t taps = (g.in_channels / g.groups) * g.kernel_h * g.kernel_w;
  status = check_float_array("weights", desc.weights, desc.weights_size,
                             g.out_channels * taps);
  if (!status.ok()) return status;
  if (desc.bias != nullptr || desc.bias_size != 0) {
    status = check_float_array("bias", desc.bias, desc.bias_size,
                               g.out_channels);
    if (!status.ok()) return status;
  }
  if (desc.activation != Activation::kNone &&
      desc.activation != Activation::kReLU &&
      desc.activation != Activation::kReLU6) {
    return Status(StatusCode::kInvalidArgument,
                  "activation is " +
                      std::to_string(static_cast<int>(desc.activation)) +
                      ", expected 0 (none), 1 (ReLU) or 2 (ReLU6)");
  }

  try {
    std::unique_ptr<DenseConv2d> conv(
        new DenseConv2d(g, desc.activation, resolve_isa(isa)));
    const detail::KernelTable& kernels = detail::kernels_for(conv->isa_);
    const int64_t block = output_block(g, kernels);
    const int64_t out_per_group = g.out_channels / g.groups;
    auto weights = std::make_unique<ConvWeights>();
    weights->out_block = block;
    weights->blocks_per_group = (out_per_group + block - 1) / block;
    if (desc.bias != nullptr) {
      weights->bias.assign(desc.bias, desc.bias + g.out_channels);
    } else {
      weights->bias.assign(g.out_channels, 0.0f);
    }

    // [groups][blocks][taps][block]; the channels past out_per_group in a
    // group's last block get zero weights and are never stored.
    weights->packed.assign(g.groups * weights->blocks_per_group * taps * block,
                           0.0f);
    for (int64_t o = 0; o < g.out_channels; ++o) {
      const int64_t group = o / out_per_group;
      const int64_t local = o % out_per_group;
      float* dst = weights->packed.data() +
                   (group * weights->blocks_per_group + local / block) * taps *
                       block +
                   local % block;
      const float* src = desc.weights + o * taps;
      for (int64_t t = 0; t < taps; ++t) dst[t * block] = src[t];
    }

    conv->weights_ = std::move(weights);
    *out = std::move(conv);
    return Status::Ok();
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kOutOfMemory,
                  "out of memory repacking a dense conv layer");
  }
}

Status DenseConv2d::fill_plan(ConvPlan* plan) const {
  local_tap_offsets(geometry_, *plan, &plan->offsets);
  return Status::Ok();
}

void DenseConv2d::compute(const ConvPlan& plan, const float* prepared,
                          float* output, ThreadPool* pool) const {
  const ConvGeometry& g = geometry_;
  const detail::KernelTable& kernels = detail::kernels_for(isa_);
  const ConvWeights& w = *weights_;

  detail::DenseKernelArgs args;
  args.input = prepared;
  args.output = output;
  args.out_plane = plan.out_h * plan.out_w;
  args.segments = plan.segments.data();
  args.offsets = plan.offsets.data();
  args.taps = static_cast<int64_t>(plan.offsets.size());
  args.weights = w.packed.data();
  args.bias = w.bias.data();
  args.group_input_stride = (g.in_channels / g.groups) * plan.plane;
  args.out_per_group = g.out_channels / g.groups;
  args.blocks_per_group = w.blocks_per_group;
  args.activation = activation_;

  const auto kernel = w.out_block == 1 ? kernels.dense_single : kernels.dense;
  run_blocked(pool, g.groups * w.blocks_per_group, args.taps * w.out_block,
              plan.num_tiles, [&](int64_t tile, int64_t begin, int64_t end) {
                kernel(args, tile, begin, end);
              });
}

}  // namespace dgms_rt
