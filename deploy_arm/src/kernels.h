// Internal interface between the layer classes and the per-ISA kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dgms_rt/conv.h"
#include "dgms_rt/tensor.h"

namespace dgms_rt {
namespace detail {

// A run of up to `lanes` output pixels of one output row. input_offset is
// the position of the first pixel's receptive field in the prepared input
// (tap offsets are added to it), output_offset the pixel's index in an
// output plane. lanes == 0 marks a filler that pads the last tile.
struct Segment {
  int32_t input_offset;
  int32_t output_offset;
  int32_t lanes;
};

// The taps of one output channel and input-channel block that share a
// nonzero codebook index.
struct QuantGroup {
  float value;    // codebook value
  int32_t count;  // number of taps, stored consecutively in the offsets
};

struct QuantKernelArgs {
  const float* input;            // prepared (padded, phase-split) input
  float* output;                 // NCHW output
  int64_t out_plane;             // out_h * out_w
  const Segment* segments;       // tiles * tile_segments entries
  const int32_t* offsets;        // tap offsets, ordered by (o, block)
  const int64_t* tap_begin;      // [out_channels * blocks + 1] into offsets
  const QuantGroup* groups;      // nonempty groups, ordered by (o, block)
  const int64_t* group_begin;    // [out_channels * blocks + 1] into groups
  int64_t channel_blocks;        // input-channel blocks per output channel
  const float* scale;            // [out_channels]
  const float* bias;             // [out_channels]
  int64_t group_input_stride;    // prepared-input elements per conv group
  int64_t out_per_group;         // out_channels / groups
  Activation activation;
};

struct DenseKernelArgs {
  const float* input;
  float* output;
  int64_t out_plane;
  const Segment* segments;       // see full_tiles
  // Tiles [0, full_tiles) have the kernel's tile size in segments, the
  // ones after it one segment fewer (see ConvPlan::full_tiles).
  int64_t full_tiles;
  const int32_t* offsets;        // [taps] offsets, shared by all channels
  int64_t taps;                  // (in_channels / groups) * kernel_h * kernel_w
  const float* weights;          // [groups][blocks][taps][out_block]
  const float* scale;            // [out_channels] or null (no scale)
  const float* bias;             // [out_channels]
  int64_t group_input_stride;
  int64_t out_per_group;
  int64_t blocks_per_group;      // ceil(out_per_group / out_block)
  Activation activation;
  bool pack_inputs;              // pack each tile's inputs (1x1 kernels)
  // The input is a flat plan's unprepared planes (ConvPlan::flat), which
  // end at the last pixel, so the tile kernels always pack it and load
  // partial segments partially.
  bool flat_input;
};

struct LookupKernelArgs {
  const float* input;
  float* output;
  int64_t out_plane;
  const Segment* segments;       // see DenseKernelArgs::full_tiles
  int64_t full_tiles;
  const int32_t* offsets;        // [taps] offsets, shared by all channels
  int64_t taps;                  // (in_channels / groups) * kernel_h * kernel_w
  const uint8_t* indices;        // [groups][blocks][taps][out_block]
  const float* codebook;         // [2^bits], entry 0 is 0.0
  const float* scale;            // [out_channels]
  const float* bias;             // [out_channels]
  int64_t group_input_stride;
  int64_t out_per_group;
  int64_t blocks_per_group;      // ceil(out_per_group / out_block)
  Activation activation;
  bool pack_inputs;              // pack each tile's inputs (1x1 kernels)
  // The input is a flat plan's unprepared planes (ConvPlan::flat), which
  // end at the last pixel, so the tile kernels always pack it and load
  // partial segments partially.
  bool flat_input;
};

// The prepared layout of one channel plane (see ConvPlan): zero padding
// around the height x width input, each padded row split into stride_w
// phases of phase_w floats.
struct PlaneLayout {
  int64_t height;
  int64_t width;
  int64_t pad_h;
  int64_t pad_w;
  int64_t stride_w;
  int64_t phase_w;
  int64_t row_stride;  // stride_w * phase_w
  int64_t plane;       // floats per prepared plane, padding rows included

  bool operator==(const PlaneLayout& o) const {
    return height == o.height && width == o.width && pad_h == o.pad_h &&
           pad_w == o.pad_w && stride_w == o.stride_w &&
           phase_w == o.phase_w && row_stride == o.row_stride &&
           plane == o.plane;
  }
};

// Depthwise layers (one input and one output channel per group): one
// channel at a time, from its prepared input plane (see ConvPlan).
// Layers with more taps than kDepthwiseMaxTaps use the tile kernels.
constexpr int64_t kDepthwiseMaxTaps = 64;
// Taps per chunk of the dense and lookup tile kernels (see tile_body): a
// tile's inputs under 256 taps take 24 KiB with AVX2, which stays in a
// 32 KiB L1 cache. Chunks of 2048 (for L2) made the quantized 3x3 layers
// of RetinaNet-R50 and of the demo's FPN 6-7 % slower on an AMD Zen 4.
constexpr int64_t kTileTapChunk = 256;
struct DepthwiseArgs {
  const float* input;       // the channel's input plane, unprepared
  const PlaneLayout* layout;
  float* prepared;          // room for layout->plane floats
  // prepared already contains the zero padding of this layout (from the
  // previous channel), so only the data is copied.
  bool padding_ready;
  float* output;            // the channel's output plane
  const Segment* segments;  // the plan's segments (see ConvPlan)
  int64_t num_segments;     // without the fillers that pad the last tile
  const int32_t* offsets;   // [taps] tap offsets within the plane
  int64_t taps;             // kernel_h * kernel_w
  // Either dense weights (weights, accumulated with fmadd) or codebook
  // indices (indices + codebook, accumulated with fused), [taps] each.
  const float* weights;
  const uint8_t* indices;
  const float* codebook;
  float scale;              // applied when has_scale
  bool has_scale;
  float bias;
  Activation activation;
};

// Winograd F(4x4, 3x3) for 3x3 stride-1 convs without groups or dilation
// (see winograd_impl.h and DenseConv2d).
struct WinogradArgs {
  const float* input;       // NCHW input, [in_channels][height][width]
  int64_t in_plane;         // floats between input planes
  int64_t out_plane;        // floats between output planes
  int64_t height;
  int64_t width;
  int64_t pad_h;
  int64_t pad_w;
  int64_t in_channels;
  int64_t out_channels;
  int64_t out_h;
  int64_t out_w;
  int64_t tiles_y;          // ceil(out_h / 4)
  int64_t tiles_x;          // ceil(out_w / 4)
  int64_t phase_w;          // tiles_x + lanes
  int64_t block_tiles;      // dense_tile_segments * lanes
  float* v;                 // [blocks][36][in_channels][block_tiles]
  const float* u;           // [36][out_blocks][in_channels][dense_out_block]
  int64_t out_blocks;       // ceil(out_channels / dense_out_block)
  const float* scale;       // [out_channels] or null (no scale)
  const float* bias;        // [out_channels]
  float* output;            // NCHW output
  Activation activation;
};

// Output-channel blocks and tile blocks per Winograd work item.
constexpr int64_t kWinogradChunk = 16;
constexpr int64_t kWinogradBlockGroup = 4;

// Kernels of one instruction set and the blocking they expect.
struct KernelTable {
  Isa isa;
  int lanes;                // output pixels per vector
  int quant_tile_segments;  // segments one quant kernel call computes
  int dense_tile_segments;  // segments one dense kernel call computes
  int dense_out_block;      // output channels one dense kernel call computes
  // Segments of the smaller tiles that may end a plan of the dense and
  // lookup kernels with dense_out_block > 1 (see ConvPlan::full_tiles), or
  // 0 where the kernels take none.
  int dense_tail_segments;
  int dense_single_tile_segments;  // segments of the one-channel variant
  // Computes tile `tile` for output channels [o_begin, o_end). scratch
  // holds (o_end - o_begin) * quant_tile_segments * lanes floats for the
  // partial sums between input-channel blocks.
  void (*quant)(const QuantKernelArgs& args, int64_t tile, int64_t o_begin,
                int64_t o_end, float* scratch);
  // Computes tile `tile` for the global output-channel blocks
  // [block_begin, block_end) (block = group * blocks_per_group + b).
  void (*dense)(const DenseKernelArgs& args, int64_t tile,
                int64_t block_begin, int64_t block_end);
  // The same with blocks of one output channel, for layers with fewer
  // than dense_out_block output channels per group (depthwise).
  void (*dense_single)(const DenseKernelArgs& args, int64_t tile,
                       int64_t block_begin, int64_t block_end);
  // The quantized table-lookup kernel, blocked like dense and
  // dense_single (same tile sizes and output-channel blocks).
  void (*lookup)(const LookupKernelArgs& args, int64_t tile,
                 int64_t block_begin, int64_t block_end);
  void (*lookup_single)(const LookupKernelArgs& args, int64_t tile,
                        int64_t block_begin, int64_t block_end);
  // A chunk of tiles [tile_begin, tile_end) for the global output-channel
  // blocks [block_begin, block_end), dense and lookup (see chunk_body).
  void (*dense_chunk)(const DenseKernelArgs& args, int64_t tile_begin,
                      int64_t tile_end, int64_t block_begin,
                      int64_t block_end);
  void (*lookup_chunk)(const LookupKernelArgs& args, int64_t tile_begin,
                       int64_t tile_end, int64_t block_begin,
                       int64_t block_end);
  // Copies a channel plane into the prepared layout.
  void (*prepare)(const PlaneLayout& layout, const float* src, float* dst);
  // Computes a depthwise channel's whole output plane (see DepthwiseArgs).
  void (*depthwise)(const DepthwiseArgs& args);
  // The blocking of the Winograd kernels below: tiles per vector, tiles
  // per block (a multiple of it) and output channels per block. They
  // need not be this table's own (see avx512_kernels()).
  int winograd_lanes;
  int winograd_block_tiles;
  int winograd_out_block;
  // Winograd: transforms input channel c into args.v. scratch has room
  // for (4 * tiles_y + 2) * 4 * phase_w floats; phase_w is tiles_x +
  // winograd_lanes.
  void (*winograd_input)(const WinogradArgs& args, int64_t c, float* scratch);
  // Winograd: products and output transform of the tile blocks
  // [block_begin, block_end) for the output-channel blocks
  // [ob_begin, ob_end). scratch has room for 36 * (block_end -
  // block_begin) * (ob_end - ob_begin) * winograd_out_block *
  // winograd_block_tiles floats.
  void (*winograd_block)(const WinogradArgs& args, int64_t block_begin,
                         int64_t block_end, int64_t ob_begin, int64_t ob_end,
                         float* scratch);
};

const KernelTable& scalar_kernels();
#if defined(DGMS_RT_HAVE_AVX2)
const KernelTable& avx2_kernels();
#endif
#if defined(DGMS_RT_HAVE_AVX512)
const KernelTable& avx512_kernels();
#endif
#if defined(DGMS_RT_HAVE_NEON)
const KernelTable& neon_kernels();
#endif

// Returns the kernels for a supported, resolved isa.
const KernelTable& kernels_for(Isa isa);

}  // namespace detail
}  // namespace dgms_rt
