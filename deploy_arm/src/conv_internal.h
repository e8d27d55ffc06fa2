// Shared between the layer classes: the shape plan and repacked weights.
#pragma once

#include <cstdint>
#include <vector>

#include "dgms_rt/conv.h"
#include "kernels.h"

namespace dgms_rt {

// Layout of the prepared input and the tables that depend on the input
// shape. The prepared input has one zero-padded plane of padded_h rows per
// channel. Each row is split into stride_w phases of phase_w floats, and
// phase p contains the padded columns p, p + stride_w, p + 2 * stride_w, ...
// So the inputs of consecutive output pixels under one kernel tap are
// consecutive floats for every stride, and a vector load fetches them.
struct ConvPlan {
  int64_t height = 0;
  int64_t width = 0;
  // Floats between the input's channel planes (height * width for a dense
  // tensor). Only flat plans depend on it, through their offsets.
  int64_t in_plane = 0;
  int64_t out_h = 0;
  int64_t out_w = 0;
  int64_t padded_h = 0;
  int64_t phase_w = 0;
  int64_t row_stride = 0;  // stride_w * phase_w
  int64_t plane = 0;       // padded_h * row_stride
  // Tiles [0, full_tiles) have the layer's tile size in segments, and the
  // num_tiles - full_tiles tiles after them (see split_into_tiles) have
  // its tail size.
  int64_t num_tiles = 0;
  int64_t full_tiles = 0;
  std::vector<detail::Segment> segments;
  std::vector<int32_t> offsets;           // kernel-specific tap offsets

  // The layer prepares its input itself (see Conv2d::compute_raw): one
  // conv group at a time (depthwise layers), or Winograd, which uses none
  // of the fields above.
  bool raw_input = false;
  bool winograd = false;
  // 1x1 stride-1 unpadded layers read the unprepared input: segments run
  // over the flattened pixels (across rows) and offsets are plane offsets.
  bool flat = false;
  int64_t tiles_y = 0;
  int64_t tiles_x = 0;
  int64_t tile_blocks = 0;
};

struct ConvWeights {
  // Quantized layers: per output channel and input-channel block, the
  // nonempty codebook groups and their taps (OIHW position within the
  // channel's C/G x KH x KW weights), in (o, block) order.
  // NOTE: a nonzero weight costs 4 bytes here and 4 more in each shape
  // plan's offsets, so with this kernel a low-bit layer takes more memory
  // at run time than its FP32 weights. The lookup kernel keeps 1 byte per
  // weight.
  std::vector<int32_t> tap_ids;
  std::vector<int64_t> tap_begin;    // [out_channels * channel_blocks + 1]
  std::vector<detail::QuantGroup> groups;
  std::vector<int64_t> group_begin;  // [out_channels * channel_blocks + 1]
  std::vector<float> scale;
  int64_t channel_blocks = 1;

  // Quantized layers with the lookup kernel: the codebook and the indices
  // in the dense layout [groups][blocks_per_group][taps][out_block], with
  // index 0 for the unused channels of a group's last block.
  std::vector<float> codebook;
  std::vector<uint8_t> block_indices;

  // Dense layers: [groups][blocks_per_group][taps][out_block] weights.
  // out_block and blocks_per_group also describe block_indices.
  std::vector<float> packed;
  int64_t out_block = 0;  // output channels per block: 1 or dense_out_block
  int64_t blocks_per_group = 0;

  std::vector<float> bias;  // [out_channels], zeros when absent
  // Dense layers with a scale: [out_channels]; empty when absent.
  std::vector<float> dense_scale;

  // 3x3 stride-1 layers with Winograd: the transformed filters G g G^T
  // (of the decoded weights in quantized layers),
  // [36][out_blocks][in_channels][winograd_out_block].
  std::vector<float> winograd_u;
  int64_t winograd_out_blocks = 0;
};

// Whether a layer reads its unprepared input through a flat plan: a 1x1
// kernel with stride 1 and no padding, whose output pixel p reads input
// pixel p of every channel.
bool flat_geometry(const ConvGeometry& g);

// Splits the segments of plan into tiles of tile_segments, or into such
// tiles followed by up to tile_segments - 1 tiles of tail_segments (when
// it is not 0) where that leaves no segment unused. Otherwise the last
// tile is padded with fillers (lanes 0), which the kernels compute but do
// not store. Sets num_tiles and full_tiles.
void split_into_tiles(int tile_segments, int tail_segments, ConvPlan* plan);

// Turns plan into a flat plan (see ConvPlan::flat) with `lanes` pixels
// per segment, split into tiles by split_into_tiles.
void make_flat_plan(const ConvGeometry& g, int lanes, int tile_segments,
                    int tail_segments, ConvPlan* plan);

// Copies `channels` input planes of height x width, src_plane floats
// apart, into the prepared layout of `plan` (zero padding, phase split) at
// dst.
void prepare_input(const ConvGeometry& g, const ConvPlan& plan,
                   const detail::KernelTable& kernels, const float* src,
                   int64_t src_plane, int64_t channels, float* dst);

// The prepared layout of one channel plane of plan.
detail::PlaneLayout plane_layout(const ConvGeometry& g, const ConvPlan& plan);

// Runs a layer with fewer output channels per group than a dense block
// (depthwise) one conv group per work item. Each item prepares the group's
// input into a per-thread buffer and runs all its tiles while that buffer
// is in cache, instead of preparing the whole input first.
// kernel(prepared_group_input, group, tile) computes one tile of a group.
// The input's channel planes lie plan.in_plane floats apart.
void run_per_group(const ConvGeometry& g, const ConvPlan& plan,
                   const detail::KernelTable& kernels, const float* input,
                   ThreadPool* pool,
                   const std::function<void(const float*, int64_t, int64_t)>&
                       kernel);

// Whether a layer runs through the depthwise kernel: one input and one
// output channel per group and at most kDepthwiseMaxTaps taps.
bool depthwise_geometry(const ConvGeometry& g);

// The weights of a depthwise layer for run_depthwise: dense weights or
// codebook indices, [channels][taps] each, and per-channel scale (null
// for none) and bias.
struct DepthwiseWeights {
  const float* weights = nullptr;
  const uint8_t* indices = nullptr;
  const float* codebook = nullptr;
  const float* scale = nullptr;
  const float* bias = nullptr;
};

// Runs a depthwise layer (see depthwise_geometry) on a plan whose offsets
// are the local tap offsets, one channel per work item: prepares the
// channel's plane into a per-thread buffer and computes its output with
// kernels.depthwise. Input planes lie plan.in_plane floats apart, output
// planes out_plane floats apart.
void run_depthwise(const ConvGeometry& g, const ConvPlan& plan,
                   const float* input, float* output, int64_t out_plane,
                   const DepthwiseWeights& weights, Activation activation,
                   const detail::KernelTable& kernels, ThreadPool* pool);

// Returns the prepared-input offset of tap (c, kh, kw) of a group.
int64_t tap_offset(const ConvGeometry& g, const ConvPlan& plan, int64_t c,
                   int64_t kh, int64_t kw);

// Fills table[t] = offset of tap t = (c * kernel_h + kh) * kernel_w + kw
// for t in [0, (in_channels / groups) * kernel_h * kernel_w).
void local_tap_offsets(const ConvGeometry& g, const ConvPlan& plan,
                       std::vector<int32_t>* table);

// Checks that a float array is present, has the expected size and holds
// only finite values; `name` is used in the error message.
Status check_float_array(const char* name, const float* data, int64_t size,
                         int64_t expected);

// Splits `count` units of work into chunks of whole units such that each
// chunk has about `target_units`, but at least `min_chunks` chunks exist
// where possible. Returns the chunk size.
int64_t chunk_size(int64_t count, int64_t target_units, int64_t min_chunks);

// Returns the output channels per block of the dense-style kernels (dense
// and quantized lookup): the kernel's block, or 1 for layers with fewer
// output channels per group (depthwise), which would waste the rest.
int64_t output_block(const ConvGeometry& g, const detail::KernelTable& kernels);

// Returns 0 .. count - 1 in the order that deals out `threads` runs of
// consecutive indices in turn: 0, r, 2r, ..., 1, r + 1, ... for runs of
// r. Parallel loops over neighbouring parts of an output take their parts
// in this order. While the threads take items in turn, each then walks
// its own run, and two threads seldom write the two sides of a boundary,
// where they would share a cache line. On two threads this made a 1x1
// conv (24 to 144 channels at 52 x 52) 10-17 % faster.
std::vector<int64_t> interleaved_runs(int64_t count, int threads);

// Runs kernel(tile, block_begin, block_end) over every tile and all
// `blocks` output-channel blocks, in work items of about 256 KiB of
// weights (`block_weights` per block) and at least 4 items per thread.
// Where the kernel packs each item's inputs (`packed`), an item takes all
// blocks unless the threads need more items. Packing a tile costs as much
// as the multiply-adds of several blocks, while streaming the weights (4
// floats or 4 index bytes per 12 vector multiply-adds) needs far less than
// the L2 cache delivers.
void run_blocked(ThreadPool* pool, int64_t blocks, int64_t block_weights,
                 int64_t num_tiles, bool packed,
                 const std::function<void(int64_t, int64_t, int64_t)>& kernel);

// Floats of one tile's packed inputs for a layer with `taps` taps.
inline int64_t tile_input_floats(int64_t taps,
                                 const detail::KernelTable& kernels) {
  return taps * kernels.dense_tile_segments * kernels.lanes;
}

// Whether a dense-style layer with `taps` taps runs in chunks of tiles
// (see run_chunked) rather than tile by tile. It does when a tile's packed
// inputs take at most 4 KiB, so that a chunk has many tiles and the layer
// writes long output runs.
bool chunked_tiles(int64_t taps, const detail::KernelTable& kernels);

// Runs kernel(tile_begin, tile_end, block_begin, block_end) over all
// tiles and blocks. The work items are chunks of tiles whose packed
// inputs (tile_floats each) take about 64 KiB, each with all blocks
// unless the threads need more items (see run_blocked). A layer that has
// them gets at least 4 items per thread. With all blocks rather
// than about 64 K weights per item, a 1x1 conv from 16 to 96 channels
// at 208 x 208 took 1.64 against 1.88 ms (one thread, AVX2).
void run_chunked(
    ThreadPool* pool, int64_t num_tiles, int64_t blocks, int64_t tile_floats,
    const std::function<void(int64_t, int64_t, int64_t, int64_t)>& kernel);

// Winograd F(4x4, 3x3), shared by dense layers and quantized layers that
// keep transformed filters of their decoded weights.
//
// Whether the geometry allows it: a 3x3 kernel, stride 1, dilation 1, no
// groups.
bool winograd_geometry(const ConvGeometry& g);

// Whether it is faster than the direct kernels for an input of height x
// width (the rule of DenseAlgorithm::kAuto).
bool winograd_pays_off(const ConvGeometry& g,
                       const detail::KernelTable& kernels, int64_t height,
                       int64_t width);

// Fills u ([36][out_blocks][in_channels][block]) from OIHW 3x3 weights.
// The transform is computed in double and rounded once per value.
void winograd_filters(const ConvGeometry& g, const float* weights,
                      int64_t block, int64_t out_blocks,
                      std::vector<float>* u);

// Marks plan as a Winograd plan and sets its tile counts, or fails when
// the input is too large for the transformed-input buffer.
Status fill_winograd_plan(const ConvGeometry& g,
                          const detail::KernelTable& kernels, ConvPlan* plan);

// A Winograd layer's transformed filters (see winograd_filters) and its
// per-channel scale (null for none) and bias.
struct WinogradWeights {
  const float* u = nullptr;
  int64_t out_blocks = 0;
  const float* scale = nullptr;
  const float* bias = nullptr;
};

// The Winograd part of w (winograd_u and bias) with `scale`: a dense
// layer's dense_scale (null when it has none) or a quantized layer's scale.
WinogradWeights winograd_weights(const ConvWeights& w, const float* scale);

// Runs a Winograd plan on the unprepared NCHW input (planes plan.in_plane
// floats apart) and writes output planes out_plane floats apart.
void run_winograd(const ConvGeometry& g, const ConvPlan& plan,
                  const WinogradWeights& w, Activation activation,
                  const detail::KernelTable& kernels, const float* input,
                  float* output, int64_t out_plane, ThreadPool* pool);

// Runs fn(i) for i in [0, count) on pool, or inline when pool is null.
void run_parallel(ThreadPool* pool, int64_t count,
                  const std::function<void(int64_t)>& fn);

// Runs a chunk kernel (dense_chunk or lookup_chunk) over all tiles and
// blocks.
template <class Args>
void run_chunk_kernel(const Args& args, int64_t num_tiles, int64_t blocks,
                      void (*chunk)(const Args&, int64_t, int64_t, int64_t,
                                    int64_t),
                      const detail::KernelTable& kernels, ThreadPool* pool) {
  run_chunked(pool, num_tiles, blocks, tile_input_floats(args.taps, kernels),
              [&](int64_t tile_begin, int64_t tile_end, int64_t block_begin,
                  int64_t block_end) {
                chunk(args, tile_begin, tile_end, block_begin, block_end);
              });
}

// Runs a tile kernel (dense or lookup, blocks of `out_block` output
// channels, or their one-channel variants) over all tiles and blocks.
template <class Args>
void run_tile_kernel(const Args& args, int64_t num_tiles, int64_t blocks,
                     int64_t out_block,
                     void (*kernel)(const Args&, int64_t, int64_t, int64_t),
                     ThreadPool* pool) {
  // The kernel reads the weights of one tap chunk at a time.
  const int64_t chunk_taps = std::min(args.taps, detail::kTileTapChunk);
  run_blocked(pool, blocks, chunk_taps * out_block, num_tiles,
              args.flat_input || (args.pack_inputs && out_block > 1),
              [&](int64_t tile, int64_t begin, int64_t end) {
                kernel(args, tile, begin, end);
              });
}

// The largest packed inputs of one tile (taps * tile width, in floats)
// for which a flat plan runs in chunks of tiles (see run_raw_dense_style).
// 3072 floats are 128 input channels on AVX2.
constexpr int64_t kFlatChunkFloats = 3072;

// Runs a dense-style kernel (dense or lookup) on a plan marked raw_input
// that is not Winograd. A flat plan reads the unprepared input directly,
// through `chunk` when a tile's packed inputs take at most
// kFlatChunkFloats, and otherwise through `tile`, which packs one tile at
// a time. With more input channels, `tile` took 0-4 % less time than
// `chunk` on the 1x1 convs of MobileNetV2 and RetinaNet-R50 (one thread,
// AVX2). With fewer, `chunk` was as fast or 1 % faster. Any other plan
// runs `single` one group at a time (see run_per_group). args describes
// the layer with a null input.
template <class Args>
void run_raw_dense_style(const ConvGeometry& g, const ConvPlan& plan,
                         const float* input, Args args,
                         int64_t blocks_per_group,
                         void (*chunk)(const Args&, int64_t, int64_t, int64_t,
                                       int64_t),
                         void (*tile)(const Args&, int64_t, int64_t, int64_t),
                         void (*single)(const Args&, int64_t, int64_t,
                                        int64_t),
                         const detail::KernelTable& kernels,
                         ThreadPool* pool) {
  if (plan.flat) {
    args.input = input;
    args.group_input_stride = (g.in_channels / g.groups) * plan.in_plane;
    const int64_t blocks = g.groups * blocks_per_group;
    if (tile_input_floats(args.taps, kernels) <= kFlatChunkFloats) {
      run_chunk_kernel(args, plan.num_tiles, blocks, chunk, kernels, pool);
    } else {
      args.flat_input = true;
      run_tile_kernel(args, plan.num_tiles, blocks, kernels.dense_out_block,
                      tile, pool);
    }
    return;
  }
  run_per_group(g, plan, kernels, input, pool,
                [&](const float* prepared, int64_t group, int64_t tile) {
                  Args group_args = args;
                  group_args.input = prepared;
                  group_args.group_input_stride = 0;
                  single(group_args, tile, group * blocks_per_group,
                         (group + 1) * blocks_per_group);
                });
}

}  // namespace dgms_rt
