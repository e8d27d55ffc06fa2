// QuantConv2d: validation of the canonical quantized layer, unpacking of
// the bit-packed indices, and repacking into per-codebook-index tap lists
// (accumulate kernel) or output-channel blocks of indices (lookup kernel).
#include <algorithm>
#include <new>
#include <string>

#include "conv_internal.h"

namespace dgms_rt {
namespace {

Status invalid(const std::string& message) {
  return Status(StatusCode::kInvalidArgument, message);
}

std::string str(int64_t v) { return std::to_string(v); }

int64_t weight_count(const ConvGeometry& g) {
  return g.out_channels * (g.in_channels / g.groups) * g.kernel_h *
         g.kernel_w;
}

Status validate_quant_desc(const QuantConvDesc& desc) {
  Status status = validate_geometry(desc.geometry);
  if (!status.ok()) return status;

  if (desc.bits < 1 || desc.bits > 8) {
    return invalid("bits is " + str(desc.bits) +
                   ", expected a value in [1, 8]");
  }
  const int64_t entries = int64_t(1) << desc.bits;
  status = check_float_array("codebook", desc.codebook, desc.codebook_size,
                             entries);
  if (!status.ok()) return status;
  if (desc.codebook[0] != 0.0f) {
    return invalid("codebook[0] is " + std::to_string(desc.codebook[0]) +
                   ", expected 0.0: entry 0 is the pruned component that "
                   "the kernels skip");
  }

  const int64_t out_channels = desc.geometry.out_channels;
  status = check_float_array("scale", desc.scale, desc.scale_size,
                             out_channels);
  if (!status.ok()) return status;
  status = check_float_array("bias", desc.bias, desc.bias_size, out_channels);
  if (!status.ok()) return status;

  // weight_count <= 2^31 - 1 and bits <= 8, so the bit count fits int64.
  const int64_t expected_bytes = (weight_count(desc.geometry) * desc.bits +
                                  7) / 8;
  if (desc.indices == nullptr || desc.indices_size != expected_bytes) {
    return invalid("indices has " +
                   str(desc.indices == nullptr ? 0 : desc.indices_size) +
                   " bytes, expected ceil(" + str(weight_count(desc.geometry)) +
                   " weights x " + str(desc.bits) + " bits / 8) = " +
                   str(expected_bytes));
  }
  const int used_bits =
      static_cast<int>((weight_count(desc.geometry) * desc.bits) % 8);
  if (used_bits != 0 && (desc.indices[expected_bytes - 1] >> used_bits) != 0) {
    return invalid("the unused high bits of the last indices byte are not "
                   "zero: the stream does not match bits = " +
                   str(desc.bits) + " and the layer geometry");
  }

  if (desc.activation != Activation::kNone &&
      desc.activation != Activation::kReLU &&
      desc.activation != Activation::kReLU6) {
    return invalid("activation is " +
                   str(static_cast<int64_t>(desc.activation)) +
                   ", expected 0 (none), 1 (ReLU) or 2 (ReLU6)");
  }
  return Status::Ok();
}

// Decodes index j of an LSB-first stream of `bits`-wide values.
inline uint32_t read_index(const uint8_t* stream, int64_t j, int bits) {
  const int64_t first_bit = j * bits;
  const int64_t byte = first_bit / 8;
  const int shift = static_cast<int>(first_bit % 8);
  uint32_t word = stream[byte];
  if (shift + bits > 8) word |= static_cast<uint32_t>(stream[byte + 1]) << 8;
  return (word >> shift) & ((1u << bits) - 1u);
}

}  // namespace

Status unpack_indices(const QuantConvDesc& desc, std::vector<uint8_t>* out) {
  Status status = validate_quant_desc(desc);
  if (!status.ok()) return status;
  try {
    const int64_t count = weight_count(desc.geometry);
    out->resize(count);
    for (int64_t j = 0; j < count; ++j) {
      (*out)[j] = static_cast<uint8_t>(read_index(desc.indices, j, desc.bits));
    }
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kOutOfMemory, "out of memory unpacking indices");
  }
  return Status::Ok();
}

namespace {

// Sorts each (output channel, input-channel block)'s nonzero taps into
// groups by codebook index, for the accumulate kernel.
void repack_accumulate(const QuantConvDesc& desc,
                       const std::vector<uint8_t>& indices,
                       ConvWeights* weights) {
  const ConvGeometry& g = desc.geometry;
  weights->tap_begin.assign(1, 0);
  weights->group_begin.assign(1, 0);

  // Input channels per block: for kernels larger than 1x1, about 576
  // taps (64 channels of a 3x3 kernel), split evenly, so the tile's
  // input rows stay in L1 cache. 1x1 kernels use one block, because
  // their inputs per tile are small and splitting them leaves few taps
  // per codebook group. Both choices were the faster ones on the
  // ResNet-50 layers (docs/deploy_arm.md). The size depends on the
  // geometry only, so every instruction set sums in the same order.
  const int64_t in_per_group = g.in_channels / g.groups;
  const int64_t kernel_taps = g.kernel_h * g.kernel_w;
  const int64_t max_block =
      kernel_taps == 1 ? in_per_group : std::max<int64_t>(1, 576 / kernel_taps);
  weights->channel_blocks = (in_per_group + max_block - 1) / max_block;
  const int64_t block_channels =
      (in_per_group + weights->channel_blocks - 1) / weights->channel_blocks;

  // Counting sort by codebook index. Taps keep their OIHW order inside a
  // group, so loads walk memory forward.
  const int64_t taps = in_per_group * kernel_taps;
  const int entries = 1 << desc.bits;
  std::vector<int64_t> counts(entries);
  std::vector<int64_t> start(entries);
  for (int64_t o = 0; o < g.out_channels; ++o) {
    const uint8_t* row = indices.data() + o * taps;
    for (int64_t block = 0; block < weights->channel_blocks; ++block) {
      const int64_t t_begin = block * block_channels * kernel_taps;
      const int64_t t_end =
          std::min(taps, t_begin + block_channels * kernel_taps);
      std::fill(counts.begin(), counts.end(), 0);
      for (int64_t t = t_begin; t < t_end; ++t) ++counts[row[t]];

      int64_t next = static_cast<int64_t>(weights->tap_ids.size());
      for (int k = 1; k < entries; ++k) {
        start[k] = next;
        next += counts[k];
        if (counts[k] > 0) {
          weights->groups.push_back(detail::QuantGroup{
              desc.codebook[k], static_cast<int32_t>(counts[k])});
        }
      }
      weights->tap_ids.resize(next);
      for (int64_t t = t_begin; t < t_end; ++t) {
        if (row[t] != 0) {
          weights->tap_ids[start[row[t]]++] = static_cast<int32_t>(t);
        }
      }
      weights->tap_begin.push_back(next);
      weights->group_begin.push_back(
          static_cast<int64_t>(weights->groups.size()));
    }
  }
}

// Lays the indices out in output-channel blocks, for the lookup kernel.
void repack_lookup(const QuantConvDesc& desc,
                   const std::vector<uint8_t>& indices,
                   const detail::KernelTable& kernels, ConvWeights* weights) {
  const ConvGeometry& g = desc.geometry;
  const int64_t block = output_block(g, kernels);
  const int64_t out_per_group = g.out_channels / g.groups;
  const int64_t taps = (g.in_channels / g.groups) * g.kernel_h * g.kernel_w;
  weights->out_block = block;
  weights->blocks_per_group = (out_per_group + block - 1) / block;
  weights->codebook.assign(desc.codebook, desc.codebook + desc.codebook_size);
  weights->block_indices.assign(
      g.groups * weights->blocks_per_group * taps * block, 0);

  for (int64_t o = 0; o < g.out_channels; ++o) {
    const int64_t group = o / out_per_group;
    const int64_t local = o % out_per_group;
    uint8_t* dst = weights->block_indices.data() +
                   (group * weights->blocks_per_group + local / block) * taps *
                       block +
                   local % block;
    const uint8_t* src = indices.data() + o * taps;
    for (int64_t t = 0; t < taps; ++t) dst[t * block] = src[t];
  }
}

}  // namespace

const char* quant_kernel_name(QuantKernel kernel) {
  switch (kernel) {
    case QuantKernel::kAuto:
      return "auto";
    case QuantKernel::kAccumulate:
      return "accumulate";
    case QuantKernel::kLookup:
      return "lookup";
  }
  return "unknown";
}

QuantConv2d::QuantConv2d(const ConvGeometry& geometry, Activation activation,
                         Isa isa, QuantKernel kernel)
    : Conv2d(geometry, activation, isa), kernel_(kernel) {
  const detail::KernelTable& kernels = detail::kernels_for(isa);
  lanes_ = kernels.lanes;
  if (kernel == QuantKernel::kAccumulate) {
    tile_segments_ = kernels.quant_tile_segments;
  } else {
    if (output_block(geometry, kernels) == 1) {
      tile_segments_ = kernels.dense_single_tile_segments;
    } else {
      tile_segments_ = kernels.dense_tile_segments;
      tail_segments_ = kernels.dense_tail_segments;
    }
  }
}

QuantConv2d::~QuantConv2d() = default;

Status QuantConv2d::create(const QuantConvDesc& desc, Isa isa,
                           std::unique_ptr<QuantConv2d>* out,
                           QuantKernel kernel, int64_t winograd_max_bytes) {
  if (!isa_supported(isa)) {
    return Status(StatusCode::kUnsupported,
                  std::string("instruction set ") + isa_name(isa) +
                      " is not available in this build or on this CPU; "
                      "use Isa::kAuto");
  }
  if (kernel != QuantKernel::kAuto && kernel != QuantKernel::kAccumulate &&
      kernel != QuantKernel::kLookup) {
    return invalid("quantized kernel is " +
                   str(static_cast<int64_t>(kernel)) +
                   ", expected 0 (auto), 1 (accumulate) or 2 (lookup)");
  }
  if (winograd_max_bytes < 0) {
    return invalid("winograd_max_bytes is " + str(winograd_max_bytes) +
                   ", expected 0 (codebook kernels only) or a positive "
                   "byte count");
  }
  try {
    std::vector<uint8_t> indices;
    Status status = unpack_indices(desc, &indices);
    if (!status.ok()) return status;

    const int64_t pruned = std::count(indices.begin(), indices.end(), 0);
    const double sparsity =
        static_cast<double>(pruned) / static_cast<double>(indices.size());
    if (kernel == QuantKernel::kAuto) {
      kernel = sparsity >= kAccumulateMinSparsity ? QuantKernel::kAccumulate
                                                  : QuantKernel::kLookup;
    }

    const ConvGeometry& g = desc.geometry;
    std::unique_ptr<QuantConv2d> conv(
        new QuantConv2d(g, desc.activation, resolve_isa(isa), kernel));
    conv->bits_ = desc.bits;
    conv->sparsity_ = sparsity;
    auto weights = std::make_unique<ConvWeights>();
    weights->scale.assign(desc.scale, desc.scale + g.out_channels);
    weights->bias.assign(desc.bias, desc.bias + g.out_channels);
    const detail::KernelTable& kernels = detail::kernels_for(conv->isa_);
    if (kernel == QuantKernel::kAccumulate) {
      repack_accumulate(desc, indices, weights.get());
    } else {
      repack_lookup(desc, indices, kernels, weights.get());
    }
    if (winograd_max_bytes > 0 && winograd_geometry(g)) {
      const int64_t block = kernels.winograd_out_block;
      const int64_t out_blocks = (g.out_channels + block - 1) / block;
      const int64_t bytes = 36 * out_blocks * block * g.in_channels *
                            int64_t(sizeof(float));
      if (bytes <= winograd_max_bytes) {
        std::vector<float> decoded(indices.size());
        for (size_t i = 0; i < indices.size(); ++i) {
          decoded[i] = desc.codebook[indices[i]];
        }
        weights->winograd_out_blocks = out_blocks;
        winograd_filters(g, decoded.data(), block, out_blocks,
                         &weights->winograd_u);
      }
    }

    conv->weights_ = std::move(weights);
    *out = std::move(conv);
    return Status::Ok();
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kOutOfMemory,
                  "out of memory repacking a quantized conv layer");
  }
}

int64_t QuantConv2d::winograd_bytes() const {
  return int64_t(weights_->winograd_u.size() * sizeof(float));
}

bool QuantConv2d::uses_winograd(int64_t height, int64_t width) const {
  return !weights_->winograd_u.empty() &&
         winograd_pays_off(geometry_, detail::kernels_for(isa_), height,
                           width);
}

Status QuantConv2d::fill_plan(ConvPlan* plan) const {
  if (uses_winograd(plan->height, plan->width)) {
    return fill_winograd_plan(geometry_, detail::kernels_for(isa_), plan);
  }
  if (kernel_ == QuantKernel::kLookup) {
    if (flat_geometry(geometry_) && weights_->out_block > 1) {
      make_flat_plan(geometry_, lanes_, tile_segments_, tail_segments_,
                     plan);
      return Status::Ok();
    }
    local_tap_offsets(geometry_, *plan, &plan->offsets);
    // Layers with one-channel blocks (depthwise) prepare one group at a
    // time, see run_per_group().
    plan->raw_input = weights_->out_block == 1;
    return Status::Ok();
  }
  std::vector<int32_t> table;
  local_tap_offsets(geometry_, *plan, &table);
  const std::vector<int32_t>& ids = weights_->tap_ids;
  plan->offsets.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) plan->offsets[i] = table[ids[i]];
  return Status::Ok();
}

detail::LookupKernelArgs QuantConv2d::lookup_args(const ConvPlan& plan,
                                                  const float* prepared,
                                                  float* output,
                                                  int64_t out_plane) const {
  const ConvGeometry& g = geometry_;
  const ConvWeights& w = *weights_;
  detail::LookupKernelArgs args;
  args.input = prepared;
  args.output = output;
  args.out_plane = out_plane;
  args.segments = plan.segments.data();
  args.full_tiles = plan.full_tiles;
  args.offsets = plan.offsets.data();
  args.taps = static_cast<int64_t>(plan.offsets.size());
  args.indices = w.block_indices.data();
  args.codebook = w.codebook.data();
  args.scale = w.scale.data();
  args.bias = w.bias.data();
  args.group_input_stride = (g.in_channels / g.groups) * plan.plane;
  args.out_per_group = g.out_channels / g.groups;
  args.blocks_per_group = w.blocks_per_group;
  args.activation = activation_;
  args.pack_inputs = g.kernel_h * g.kernel_w == 1;
  args.flat_input = false;
  return args;
}

void QuantConv2d::compute_raw(const ConvPlan& plan, const float* input,
                              float* output, int64_t out_plane,
                              ThreadPool* pool) const {
  const detail::KernelTable& kernels = detail::kernels_for(isa_);
  if (plan.winograd) {
    run_winograd(geometry_, plan,
                 winograd_weights(*weights_, weights_->scale.data()),
                 activation_, kernels, input, output, out_plane, pool);
    return;
  }
  if (!plan.flat && depthwise_geometry(geometry_)) {
    DepthwiseWeights w;
    w.indices = weights_->block_indices.data();
    w.codebook = weights_->codebook.data();
    w.scale = weights_->scale.data();
    w.bias = weights_->bias.data();
    run_depthwise(geometry_, plan, input, output, out_plane, w, activation_,
                  kernels, pool);
    return;
  }
  run_raw_dense_style(geometry_, plan, input,
                      lookup_args(plan, nullptr, output, out_plane),
                      weights_->blocks_per_group, kernels.lookup_chunk,
                      kernels.lookup, kernels.lookup_single, kernels,
                      pool);
}

void QuantConv2d::compute(const ConvPlan& plan, const float* prepared,
                          float* output, int64_t out_plane,
                          ThreadPool* pool) const {
  const ConvGeometry& g = geometry_;
  const detail::KernelTable& kernels = detail::kernels_for(isa_);
  const ConvWeights& w = *weights_;

  if (kernel_ == QuantKernel::kLookup) {
    const detail::LookupKernelArgs args =
        lookup_args(plan, prepared, output, out_plane);
    if (w.out_block > 1 && chunked_tiles(args.taps, kernels)) {
      run_chunk_kernel(args, plan.num_tiles, g.groups * w.blocks_per_group,
                       kernels.lookup_chunk, kernels, pool);
      return;
    }
    run_tile_kernel(args, plan.num_tiles, g.groups * w.blocks_per_group,
                    w.out_block,
                    w.out_block == 1 ? kernels.lookup_single : kernels.lookup,
                    pool);
    return;
  }

  detail::QuantKernelArgs args;
  args.input = prepared;
  args.output = output;
  args.out_plane = out_plane;
  args.segments = plan.segments.data();
  args.offsets = plan.offsets.data();
  args.tap_begin = w.tap_begin.data();
  args.groups = w.groups.data();
  args.group_begin = w.group_begin.data();
  args.channel_blocks = w.channel_blocks;
  args.scale = w.scale.data();
  args.bias = w.bias.data();
  args.group_input_stride = (g.in_channels / g.groups) * plan.plane;
  args.out_per_group = g.out_channels / g.groups;
  args.activation = activation_;

  // Work item = (chunk of output channels, tile). A chunk's tap offsets
  // (about 256 KiB) stay in cache while the tile's inputs are reused
  // across its channels. At most 64 channels per chunk keep the partial
  // sums in scratch small.
  const int threads = pool != nullptr ? pool->num_threads() : 1;
  const int64_t taps_per_channel = std::max<int64_t>(
      1, static_cast<int64_t>(w.tap_ids.size()) / g.out_channels);
  const int64_t target = std::min<int64_t>(
      64, std::max<int64_t>(1, 65536 / taps_per_channel));
  const int64_t channels_per_chunk = chunk_size(
      g.out_channels, target,
      (4 * threads + plan.num_tiles - 1) / plan.num_tiles);
  const int64_t chunks =
      (g.out_channels + channels_per_chunk - 1) / channels_per_chunk;
  const int64_t tiles = plan.num_tiles;
  const size_t scratch_floats = static_cast<size_t>(
      channels_per_chunk * kernels.quant_tile_segments * kernels.lanes);

  run_parallel(pool, chunks * tiles, [&](int64_t item) {
    // One buffer per thread, reused across items and calls.
    thread_local FloatVector scratch;
    if (scratch.size() < scratch_floats) scratch.resize(scratch_floats);

    const int64_t chunk = item / tiles;
    const int64_t o_begin = chunk * channels_per_chunk;
    const int64_t o_end =
        std::min(g.out_channels, o_begin + channels_per_chunk);
    kernels.quant(args, item % tiles, o_begin, o_end, scratch.data());
  });
}

}  // namespace dgms_rt
