// DenseConv2d: FP32 conv with output-channel blocking, and Winograd
// F(4x4, 3x3) for 3x3 stride-1 layers.
#include <algorithm>
#include <memory>
#include <new>
#include <string>

#include "conv_internal.h"

namespace dgms_rt {

bool winograd_geometry(const ConvGeometry& g) {
  return g.groups == 1 && g.kernel_h == 3 && g.kernel_w == 3 &&
         g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 &&
         g.dilation_w == 1;
}

namespace {

// G of F(4x4, 3x3): the filter transform U = G g G^T.
constexpr double kWinogradG[6][3] = {
    {1.0 / 4, 0.0, 0.0},
    {-1.0 / 6, -1.0 / 6, -1.0 / 6},
    {-1.0 / 6, 1.0 / 6, -1.0 / 6},
    {1.0 / 24, 1.0 / 12, 1.0 / 6},
    {1.0 / 24, -1.0 / 12, 1.0 / 6},
    {0.0, 0.0, 1.0},
};

}  // namespace

void winograd_filters(const ConvGeometry& g, const float* weights,
                      int64_t block, int64_t out_blocks,
                      std::vector<float>* u) {
  const int64_t channels = g.in_channels;
  u->assign(36 * out_blocks * channels * block, 0.0f);
  for (int64_t o = 0; o < g.out_channels; ++o) {
    for (int64_t c = 0; c < channels; ++c) {
      const float* w = weights + (o * channels + c) * 9;
      double gw[6][3];  // G g
      for (int k = 0; k < 6; ++k) {
        for (int b = 0; b < 3; ++b) {
          gw[k][b] = kWinogradG[k][0] * w[b] + kWinogradG[k][1] * w[3 + b] +
                     kWinogradG[k][2] * w[6 + b];
        }
      }
      for (int k = 0; k < 6; ++k) {
        for (int l = 0; l < 6; ++l) {
          const double value = gw[k][0] * kWinogradG[l][0] +
                               gw[k][1] * kWinogradG[l][1] +
                               gw[k][2] * kWinogradG[l][2];
          (*u)[(((k * 6 + l) * out_blocks + o / block) * channels + c) *
                   block +
               o % block] = static_cast<float>(value);
        }
      }
    }
  }
}

const char* dense_algorithm_name(DenseAlgorithm algorithm) {
  switch (algorithm) {
    case DenseAlgorithm::kAuto:
      return "auto";
    case DenseAlgorithm::kDirect:
      return "direct";
    case DenseAlgorithm::kWinograd:
      return "winograd";
  }
  return "unknown";
}

DenseConv2d::DenseConv2d(const ConvGeometry& geometry, Activation activation,
                         Isa isa, DenseAlgorithm algorithm)
    : Conv2d(geometry, activation, isa), algorithm_(algorithm) {
  const detail::KernelTable& kernels = detail::kernels_for(isa);
  lanes_ = kernels.lanes;
  if (output_block(geometry, kernels) == 1) {
    tile_segments_ = kernels.dense_single_tile_segments;
  } else {
    tile_segments_ = kernels.dense_tile_segments;
    tail_segments_ = kernels.dense_tail_segments;
  }
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
  if (desc.scale != nullptr || desc.scale_size != 0) {
    status = check_float_array("scale", desc.scale, desc.scale_size,
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
  if (desc.algorithm != DenseAlgorithm::kAuto &&
      desc.algorithm != DenseAlgorithm::kDirect &&
      desc.algorithm != DenseAlgorithm::kWinograd) {
    return Status(StatusCode::kInvalidArgument,
                  "algorithm is " +
                      std::to_string(static_cast<int>(desc.algorithm)) +
                      ", expected 0 (auto), 1 (direct) or 2 (winograd)");
  }
  if (desc.algorithm == DenseAlgorithm::kWinograd && !winograd_geometry(g)) {
    return Status(StatusCode::kInvalidArgument,
                  "algorithm winograd needs a 3x3 kernel, stride 1, "
                  "dilation 1 and groups 1; this layer has kernel " +
                      std::to_string(g.kernel_h) + "x" +
                      std::to_string(g.kernel_w) + ", stride " +
                      std::to_string(g.stride_h) + "x" +
                      std::to_string(g.stride_w) + ", dilation " +
                      std::to_string(g.dilation_h) + "x" +
                      std::to_string(g.dilation_w) + ", groups " +
                      std::to_string(g.groups) +
                      ": use algorithm auto or direct");
  }
  DenseAlgorithm algorithm = desc.algorithm;
  if (algorithm == DenseAlgorithm::kAuto && !winograd_geometry(g)) {
    algorithm = DenseAlgorithm::kDirect;
  }

  try {
    std::unique_ptr<DenseConv2d> conv(
        new DenseConv2d(g, desc.activation, resolve_isa(isa), algorithm));
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
    if (desc.scale != nullptr) {
      weights->dense_scale.assign(desc.scale, desc.scale + g.out_channels);
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
    if (algorithm != DenseAlgorithm::kDirect) {
      weights->winograd_out_blocks =
          (g.out_channels + kernels.winograd_out_block - 1) /
          kernels.winograd_out_block;
      winograd_filters(g, desc.weights, kernels.winograd_out_block,
                       weights->winograd_out_blocks, &weights->winograd_u);
    }

    conv->weights_ = std::move(weights);
    *out = std::move(conv);
    return Status::Ok();
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kOutOfMemory,
                  "out of memory repacking a dense conv layer");
  }
}

bool winograd_pays_off(const ConvGeometry& g,
                       const detail::KernelTable& kernels, int64_t height,
                       int64_t width) {
  int64_t out_h = 0, out_w = 0;
  if (!conv_output_size(g, height, width, &out_h, &out_w).ok()) return false;
  // Winograd pays off from about half a block of tiles (a 16x16 output
  // with AVX2) and 8 channels; smaller layers run the direct kernel.
  const int64_t tiles = (out_h + 3) / 4 * ((out_w + 3) / 4);
  return 2 * tiles >= kernels.winograd_block_tiles && g.in_channels >= 8 &&
         g.out_channels >= 8;
}

Status fill_winograd_plan(const ConvGeometry& g,
                          const detail::KernelTable& kernels,
                          ConvPlan* plan) {
  const int64_t block_tiles = kernels.winograd_block_tiles;
  plan->raw_input = true;
  plan->winograd = true;
  plan->tiles_y = (plan->out_h + 3) / 4;
  plan->tiles_x = (plan->out_w + 3) / 4;
  plan->tile_blocks =
      (plan->tiles_y * plan->tiles_x + block_tiles - 1) / block_tiles;
  // The transformed input must stay within int64 and the memory limit
  // of the direct path's prepared input.
  const int64_t v_size = 36 * plan->tile_blocks * block_tiles;
  if (v_size > ConvLimits::kMaxElements / g.in_channels) {
    return Status(StatusCode::kInvalidArgument,
                  "input " + std::to_string(plan->height) + "x" +
                      std::to_string(plan->width) +
                      " is too large for this layer's Winograd buffers "
                      "(over " + std::to_string(ConvLimits::kMaxElements) +
                      " elements): use algorithm direct");
  }
  return Status::Ok();
}

bool DenseConv2d::uses_winograd(int64_t height, int64_t width) const {
  if (algorithm_ == DenseAlgorithm::kDirect) return false;
  if (algorithm_ == DenseAlgorithm::kWinograd) return true;
  return winograd_pays_off(geometry_, detail::kernels_for(isa_), height,
                           width);
}

Status DenseConv2d::fill_plan(ConvPlan* plan) const {
  if (uses_winograd(plan->height, plan->width)) {
    return fill_winograd_plan(geometry_, detail::kernels_for(isa_), plan);
  }
  if (flat_geometry(geometry_) && weights_->out_block > 1) {
    make_flat_plan(geometry_, lanes_, tile_segments_, tail_segments_, plan);
    return Status::Ok();
  }
  local_tap_offsets(geometry_, *plan, &plan->offsets);
  // Layers with one-channel blocks (depthwise) prepare one group at a
  // time, see run_per_group().
  plan->raw_input = weights_->out_block == 1;
  return Status::Ok();
}

detail::DenseKernelArgs DenseConv2d::dense_args(const ConvPlan& plan,
                                                const float* prepared,
                                                float* output,
                                                int64_t out_plane) const {
  const ConvGeometry& g = geometry_;
  const ConvWeights& w = *weights_;
  detail::DenseKernelArgs args;
  args.input = prepared;
  args.output = output;
  args.out_plane = out_plane;
  args.segments = plan.segments.data();
  args.full_tiles = plan.full_tiles;
  args.offsets = plan.offsets.data();
  args.taps = static_cast<int64_t>(plan.offsets.size());
  args.weights = w.packed.data();
  args.scale = w.dense_scale.empty() ? nullptr : w.dense_scale.data();
  args.bias = w.bias.data();
  args.group_input_stride = (g.in_channels / g.groups) * plan.plane;
  args.out_per_group = g.out_channels / g.groups;
  args.blocks_per_group = w.blocks_per_group;
  args.activation = activation_;
  args.pack_inputs = g.kernel_h * g.kernel_w == 1;
  args.flat_input = false;
  return args;
}

void DenseConv2d::compute_raw(const ConvPlan& plan, const float* input,
                              float* output, int64_t out_plane,
                              ThreadPool* pool) const {
  if (plan.winograd) {
    const ConvWeights& w = *weights_;
    run_winograd(geometry_, plan,
                 winograd_weights(w, w.dense_scale.empty()
                                         ? nullptr
                                         : w.dense_scale.data()),
                 activation_, detail::kernels_for(isa_), input, output,
                 out_plane, pool);
    return;
  }
  const detail::KernelTable& kernels = detail::kernels_for(isa_);
  if (!plan.flat && depthwise_geometry(geometry_)) {
    DepthwiseWeights w;
    w.weights = weights_->packed.data();
    w.scale = weights_->dense_scale.empty() ? nullptr
                                             : weights_->dense_scale.data();
    w.bias = weights_->bias.data();
    run_depthwise(geometry_, plan, input, output, out_plane, w, activation_,
                  kernels, pool);
    return;
  }
  run_raw_dense_style(geometry_, plan, input, dense_args(plan, nullptr, output, out_plane),
                      weights_->blocks_per_group, kernels.dense_chunk,
                      kernels.dense, kernels.dense_single, kernels,
                      pool);
}

WinogradWeights winograd_weights(const ConvWeights& w, const float* scale) {
  WinogradWeights out;
  out.u = w.winograd_u.data();
  out.out_blocks = w.winograd_out_blocks;
  out.scale = scale;
  out.bias = w.bias.data();
  return out;
}

void run_winograd(const ConvGeometry& g, const ConvPlan& plan,
                  const WinogradWeights& w, Activation activation,
                  const detail::KernelTable& kernels, const float* input,
                  float* output, int64_t out_plane, ThreadPool* pool) {
  const int64_t block_tiles = kernels.winograd_block_tiles;

  // The transformed input of the whole layer. Like the prepared input of
  // the direct path, each calling thread keeps its buffer between runs.
  // NOTE: it keeps the size of the largest layer the thread has run.
  thread_local std::unique_ptr<float[]> transformed;
  thread_local int64_t transformed_capacity = 0;
  const int64_t v_size =
      36 * plan.tile_blocks * block_tiles * g.in_channels;
  if (transformed_capacity < v_size) {
    transformed.reset();
    transformed_capacity = 0;
    transformed.reset(new float[v_size]);
    transformed_capacity = v_size;
  }

  detail::WinogradArgs args;
  args.input = input;
  args.in_plane = plan.in_plane;
  args.out_plane = out_plane;
  args.height = plan.height;
  args.width = plan.width;
  args.pad_h = g.pad_h;
  args.pad_w = g.pad_w;
  args.in_channels = g.in_channels;
  args.out_channels = g.out_channels;
  args.out_h = plan.out_h;
  args.out_w = plan.out_w;
  args.tiles_y = plan.tiles_y;
  args.tiles_x = plan.tiles_x;
  args.phase_w = plan.tiles_x + kernels.winograd_lanes;
  args.block_tiles = block_tiles;
  args.v = transformed.get();
  args.u = w.u;
  args.out_blocks = w.out_blocks;
  args.scale = w.scale;
  args.bias = w.bias;
  args.output = output;
  args.activation = activation;

  // The tiles past the last tile row fill the last block with zeros; the
  // input transform then writes the used tiles.
  const int64_t used = plan.tiles_y * plan.tiles_x;
  const int64_t last = plan.tile_blocks - 1;
  if (used % block_tiles != 0) {
    std::fill(args.v + last * 36 * g.in_channels * block_tiles,
              args.v + v_size, 0.0f);
  }

  const int64_t scratch_in = (4 * plan.tiles_y + 2) * 4 * args.phase_w;
  run_parallel(pool, g.in_channels, [&](int64_t c) {
    thread_local FloatVector scratch;
    if (static_cast<int64_t>(scratch.size()) < scratch_in) {
      scratch.resize(scratch_in);
    }
    kernels.winograd_input(args, c, scratch.data());
  });

  // Work items: chunks of output-channel blocks x groups of tile blocks,
  // at least 4 per thread where the layer has them.
  const int threads = pool != nullptr ? pool->num_threads() : 1;
  const int64_t chunk = chunk_size(w.out_blocks,
                                   detail::kWinogradChunk, 2 * threads);
  const int64_t group = chunk_size(
      plan.tile_blocks, detail::kWinogradBlockGroup,
      (4 * threads * chunk + w.out_blocks - 1) / w.out_blocks);
  const int64_t chunks = (w.out_blocks + chunk - 1) / chunk;
  const int64_t groups = (plan.tile_blocks + group - 1) / group;
  const int64_t scratch_out =
      36 * group * chunk * kernels.winograd_out_block * block_tiles;
  run_parallel(pool, chunks * groups, [&](int64_t item) {
    thread_local FloatVector scratch;
    if (static_cast<int64_t>(scratch.size()) < scratch_out) {
      scratch.resize(scratch_out);
    }
    const int64_t block_begin = (item % groups) * group;
    const int64_t ob_begin = (item / groups) * chunk;
    kernels.winograd_block(
        args, block_begin, std::min(plan.tile_blocks, block_begin + group),
        ob_begin, std::min(w.out_blocks, ob_begin + chunk),
        scratch.data());
  });
}

void DenseConv2d::compute(const ConvPlan& plan, const float* prepared,
                          float* output, int64_t out_plane,
                          ThreadPool* pool) const {
  const ConvGeometry& g = geometry_;
  const detail::KernelTable& kernels = detail::kernels_for(isa_);
  const ConvWeights& w = *weights_;
  const detail::DenseKernelArgs args =
      dense_args(plan, prepared, output, out_plane);

  if (w.out_block > 1 && chunked_tiles(args.taps, kernels)) {
    run_chunk_kernel(args, plan.num_tiles, g.groups * w.blocks_per_group,
                     kernels.dense_chunk, kernels, pool);
    return;
  }
  run_tile_kernel(args, plan.num_tiles, g.groups * w.blocks_per_group,
                  w.out_block,
                  w.out_block == 1 ? kernels.dense_single : kernels.dense,
                  pool);
}

}  // namespace dgms_rt
