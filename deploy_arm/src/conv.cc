// Geometry validation, shape plans, input preparation and the run loop
// shared by the quantized and dense layers.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "conv_internal.h"

namespace dgms_rt {
namespace {

Status invalid(const std::string& message) {
  return Status(StatusCode::kInvalidArgument, message);
}

std::string str(int64_t v) { return std::to_string(v); }

Status check_range(const char* name, int64_t value, int64_t min_value,
                   int64_t max_value) {
  if (value < min_value || value > max_value) {
    return invalid(std::string(name) + " is " + str(value) +
                   ", expected a value in [" + str(min_value) + ", " +
                   str(max_value) + "]");
  }
  return Status::Ok();
}

// Multiplies non-negative values; false when the product exceeds limit.
bool mul_within(int64_t a, int64_t b, int64_t limit, int64_t* out) {
  int64_t product = 0;
  if (__builtin_mul_overflow(a, b, &product) || product > limit) {
    return false;
  }
  *out = product;
  return true;
}

}  // namespace

Status validate_geometry(const ConvGeometry& g) {
  const struct {
    const char* name;
    int64_t value, min_value, max_value;
  } fields[] = {
      {"out_channels", g.out_channels, 1, ConvLimits::kMaxChannels},
      {"in_channels", g.in_channels, 1, ConvLimits::kMaxChannels},
      {"groups", g.groups, 1, ConvLimits::kMaxChannels},
      {"kernel_h", g.kernel_h, 1, ConvLimits::kMaxKernel},
      {"kernel_w", g.kernel_w, 1, ConvLimits::kMaxKernel},
      {"stride_h", g.stride_h, 1, ConvLimits::kMaxStride},
      {"stride_w", g.stride_w, 1, ConvLimits::kMaxStride},
      {"pad_h", g.pad_h, 0, ConvLimits::kMaxPad},
      {"pad_w", g.pad_w, 0, ConvLimits::kMaxPad},
      {"dilation_h", g.dilation_h, 1, ConvLimits::kMaxDilation},
      {"dilation_w", g.dilation_w, 1, ConvLimits::kMaxDilation},
  };
  for (const auto& f : fields) {
    Status status = check_range(f.name, f.value, f.min_value, f.max_value);
    if (!status.ok()) return status;
  }

  if (g.in_channels % g.groups != 0 || g.out_channels % g.groups != 0) {
    return invalid("groups (" + str(g.groups) +
                   ") must divide in_channels (" + str(g.in_channels) +
                   ") and out_channels (" + str(g.out_channels) + ")");
  }

  int64_t taps = 0;
  int64_t weights = 0;
  if (!mul_within(g.in_channels / g.groups, g.kernel_h * g.kernel_w,
                  ConvLimits::kMaxElements, &taps) ||
      !mul_within(taps, g.out_channels, ConvLimits::kMaxElements, &weights)) {
    return invalid("the layer has more than " +
                   str(ConvLimits::kMaxElements) + " weights (out_channels " +
                   str(g.out_channels) + " x in_channels/groups " +
                   str(g.in_channels / g.groups) + " x kernel " +
                   str(g.kernel_h) + "x" + str(g.kernel_w) + ")");
  }
  return Status::Ok();
}

Status conv_output_size(const ConvGeometry& g, int64_t height, int64_t width,
                        int64_t* out_height, int64_t* out_width) {
  Status status = check_range("input height", height, 1,
                              ConvLimits::kMaxSpatial);
  if (!status.ok()) return status;
  status = check_range("input width", width, 1, ConvLimits::kMaxSpatial);
  if (!status.ok()) return status;

  // All terms are bounded by the limits above, so nothing overflows.
  const int64_t padded_h = height + 2 * g.pad_h;
  const int64_t padded_w = width + 2 * g.pad_w;
  const int64_t extent_h = g.dilation_h * (g.kernel_h - 1) + 1;
  const int64_t extent_w = g.dilation_w * (g.kernel_w - 1) + 1;
  if (padded_h < extent_h || padded_w < extent_w) {
    return invalid("input " + str(height) + "x" + str(width) +
                   " padded to " + str(padded_h) + "x" + str(padded_w) +
                   " is smaller than the dilated kernel " + str(extent_h) +
                   "x" + str(extent_w) + ": use a larger input");
  }
  *out_height = (padded_h - extent_h) / g.stride_h + 1;
  *out_width = (padded_w - extent_w) / g.stride_w + 1;
  return Status::Ok();
}

Status check_float_array(const char* name, const float* data, int64_t size,
                         int64_t expected) {
  if (data == nullptr) {
    return invalid(std::string(name) + " is null, expected " + str(expected) +
                   " values");
  }
  if (size != expected) {
    return invalid(std::string(name) + " has " + str(size) +
                   " values, expected " + str(expected));
  }
  for (int64_t i = 0; i < size; ++i) {
    if (!std::isfinite(data[i])) {
      return invalid(std::string(name) + "[" + str(i) + "] is " +
                     std::to_string(data[i]) + ", expected a finite value");
    }
  }
  return Status::Ok();
}

detail::PlaneLayout plane_layout(const ConvGeometry& g, const ConvPlan& p) {
  detail::PlaneLayout layout;
  layout.height = p.height;
  layout.width = p.width;
  layout.pad_h = g.pad_h;
  layout.pad_w = g.pad_w;
  layout.stride_w = g.stride_w;
  layout.phase_w = p.phase_w;
  layout.row_stride = p.row_stride;
  layout.plane = p.plane;
  return layout;
}

void prepare_input(const ConvGeometry& g, const ConvPlan& p,
                   const detail::KernelTable& kernels, const float* input,
                   int64_t input_plane, int64_t channels, float* buffer) {
  const detail::PlaneLayout layout = plane_layout(g, p);
  for (int64_t c = 0; c < channels; ++c) {
    kernels.prepare(layout, input + c * input_plane, buffer + c * p.plane);
  }
}

bool flat_geometry(const ConvGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 &&
         g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0;
}

void split_into_tiles(int tile_segments, int tail_segments, ConvPlan* plan) {
  const int64_t n = static_cast<int64_t>(plan->segments.size());
  // Smaller tiles at the end where they make the split exact.
  for (int64_t tails = 0; tail_segments > 0 && tails < tile_segments &&
                          tails * tail_segments <= n;
       ++tails) {
    if ((n - tails * tail_segments) % tile_segments == 0) {
      plan->full_tiles = (n - tails * tail_segments) / tile_segments;
      plan->num_tiles = plan->full_tiles + tails;
      return;
    }
  }
  plan->num_tiles = (n + tile_segments - 1) / tile_segments;
  plan->full_tiles = plan->num_tiles;
  plan->segments.resize(plan->num_tiles * tile_segments,
                        detail::Segment{0, 0, 0});
}

void make_flat_plan(const ConvGeometry& g, int lanes, int tile_segments,
                    int tail_segments, ConvPlan* plan) {
  const int64_t pixels = plan->height * plan->width;
  plan->raw_input = true;
  plan->flat = true;
  plan->segments.clear();
  plan->segments.reserve((pixels + lanes - 1) / lanes + tile_segments);
  for (int64_t p = 0; p < pixels; p += lanes) {
    plan->segments.push_back(detail::Segment{
        static_cast<int32_t>(p), static_cast<int32_t>(p),
        static_cast<int32_t>(std::min<int64_t>(lanes, pixels - p))});
  }
  split_into_tiles(tile_segments, tail_segments, plan);
  const int64_t channels = g.in_channels / g.groups;
  plan->offsets.resize(channels);
  for (int64_t c = 0; c < channels; ++c) {
    plan->offsets[c] = static_cast<int32_t>(c * plan->in_plane);
  }
}

void run_per_group(const ConvGeometry& g, const ConvPlan& plan,
                   const detail::KernelTable& kernels, const float* input,
                   ThreadPool* pool,
                   const std::function<void(const float*, int64_t, int64_t)>&
                       kernel) {
  const int64_t channels = g.in_channels / g.groups;
  const int64_t group_size = channels * plan.in_plane;
  run_parallel(pool, g.groups, [&](int64_t group) {
    thread_local FloatVector prepared;
    if (static_cast<int64_t>(prepared.size()) < channels * plan.plane) {
      prepared.resize(channels * plan.plane);
    }
    prepare_input(g, plan, kernels, input + group * group_size,
                  plan.in_plane, channels, prepared.data());
    for (int64_t tile = 0; tile < plan.num_tiles; ++tile) {
      kernel(prepared.data(), group, tile);
    }
  });
}

bool depthwise_geometry(const ConvGeometry& g) {
  return g.in_channels == g.groups && g.out_channels == g.groups &&
         g.kernel_h * g.kernel_w <= detail::kDepthwiseMaxTaps;
}

void run_depthwise(const ConvGeometry& g, const ConvPlan& plan,
                   const float* input, float* output, int64_t out_plane,
                   const DepthwiseWeights& weights, Activation activation,
                   const detail::KernelTable& kernels, ThreadPool* pool) {
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t in_plane = plan.in_plane;
  const int64_t segments =
      plan.out_h * ((plan.out_w + kernels.lanes - 1) / kernels.lanes);
  const detail::PlaneLayout layout = plane_layout(g, plan);
  // Work items of whole channels with about 4096 outputs, at least 4 per
  // thread. With one channel per item, handing out an item cost about as
  // much as computing a small one. So 960 channels of 13 x 13 took 0.113
  // ms on one thread and 0.100 ms on two. They take 0.061 ms on two now.
  const int threads = pool != nullptr ? pool->num_threads() : 1;
  const int64_t outputs = std::max<int64_t>(1, plan.out_h * plan.out_w);
  const int64_t channels_per_item = chunk_size(
      g.groups, std::max<int64_t>(1, 4096 / outputs), 4 * threads);
  const int64_t items = (g.groups + channels_per_item - 1) / channels_per_item;
  const auto run_channel = [&](int64_t c) {
    // The padding of the layout last prepared in the buffer stays zero:
    // the kernels write only its data.
    thread_local FloatVector prepared;
    thread_local detail::PlaneLayout padded{};
    thread_local bool padding_ready = false;
    if (static_cast<int64_t>(prepared.size()) < plan.plane) {
      prepared.resize(plan.plane);
      padding_ready = false;
    }
    detail::DepthwiseArgs args;
    args.input = input + c * in_plane;
    args.layout = &layout;
    args.prepared = prepared.data();
    args.padding_ready = padding_ready && padded == layout;
    padded = layout;
    padding_ready = true;
    args.output = output + c * out_plane;
    args.segments = plan.segments.data();
    args.num_segments = segments;
    args.offsets = plan.offsets.data();
    args.taps = taps;
    args.weights =
        weights.weights != nullptr ? weights.weights + c * taps : nullptr;
    args.indices =
        weights.indices != nullptr ? weights.indices + c * taps : nullptr;
    args.codebook = weights.codebook;
    args.has_scale = weights.scale != nullptr;
    args.scale = args.has_scale ? weights.scale[c] : 1.0f;
    args.bias = weights.bias[c];
    args.activation = activation;
    kernels.depthwise(args);
  };
  run_parallel(pool, items, [&](int64_t item) {
    const int64_t end = std::min(g.groups, (item + 1) * channels_per_item);
    for (int64_t c = item * channels_per_item; c < end; ++c) run_channel(c);
  });
}

int64_t tap_offset(const ConvGeometry& g, const ConvPlan& plan, int64_t c,
                   int64_t kh, int64_t kw) {
  const int64_t column = kw * g.dilation_w;
  return c * plan.plane + kh * g.dilation_h * plan.row_stride +
         (column % g.stride_w) * plan.phase_w + column / g.stride_w;
}

void local_tap_offsets(const ConvGeometry& g, const ConvPlan& plan,
                       std::vector<int32_t>* table) {
  const int64_t channels = g.in_channels / g.groups;
  table->resize(channels * g.kernel_h * g.kernel_w);
  int64_t t = 0;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        (*table)[t++] = static_cast<int32_t>(tap_offset(g, plan, c, kh, kw));
      }
    }
  }
}

int64_t chunk_size(int64_t count, int64_t target_units, int64_t min_chunks) {
  int64_t size = std::max<int64_t>(1, std::min(count, target_units));
  while (size > 1 && (count + size - 1) / size < min_chunks) {
    size = (size + 1) / 2;
  }
  return size;
}

int64_t output_block(const ConvGeometry& g,
                     const detail::KernelTable& kernels) {
  return g.out_channels / g.groups < kernels.dense_out_block
             ? 1
             : kernels.dense_out_block;
}

std::vector<int64_t> interleaved_runs(int64_t count, int threads) {
  const int64_t run_length = (count + threads - 1) / threads;
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(count));
  for (int64_t j = 0; j < run_length; ++j) {
    for (int64_t t = 0; t < threads; ++t) {
      if (t * run_length + j < count) order.push_back(t * run_length + j);
    }
  }
  return order;
}

void run_blocked(ThreadPool* pool, int64_t blocks, int64_t block_weights,
                 int64_t num_tiles, bool packed,
                 const std::function<void(int64_t, int64_t, int64_t)>& kernel) {
  const int threads = pool != nullptr ? pool->num_threads() : 1;
  const int64_t blocks_per_chunk = chunk_size(
      blocks, packed ? blocks : std::max<int64_t>(1, 65536 / block_weights),
      (4 * threads + num_tiles - 1) / num_tiles);
  const int64_t chunks = (blocks + blocks_per_chunk - 1) / blocks_per_chunk;

  const std::vector<int64_t> order = interleaved_runs(num_tiles, threads);
  run_parallel(pool, chunks * num_tiles, [&](int64_t item) {
    const int64_t begin = (item / num_tiles) * blocks_per_chunk;
    const int64_t end = std::min(blocks, begin + blocks_per_chunk);
    kernel(order[size_t(item % num_tiles)], begin, end);
  });
}

bool chunked_tiles(int64_t taps, const detail::KernelTable& kernels) {
  return tile_input_floats(taps, kernels) <= 1024;
}

void run_chunked(
    ThreadPool* pool, int64_t num_tiles, int64_t blocks, int64_t tile_floats,
    const std::function<void(int64_t, int64_t, int64_t, int64_t)>& kernel) {
  const int threads = pool != nullptr ? pool->num_threads() : 1;
  const int64_t tiles_per_chunk = chunk_size(
      num_tiles, std::max<int64_t>(1, 16384 / tile_floats), 4 * threads);
  const int64_t chunks = (num_tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  const int64_t blocks_per_item =
      chunk_size(blocks, blocks, (4 * threads + chunks - 1) / chunks);
  const int64_t block_items = (blocks + blocks_per_item - 1) / blocks_per_item;
  // Consecutive items share their blocks, whose weights stay in cache.
  const std::vector<int64_t> order = interleaved_runs(chunks, threads);
  run_parallel(pool, chunks * block_items, [&](int64_t item) {
    const int64_t tile_begin = order[size_t(item % chunks)] * tiles_per_chunk;
    const int64_t block_begin = (item / chunks) * blocks_per_item;
    kernel(tile_begin, std::min(num_tiles, tile_begin + tiles_per_chunk),
           block_begin, std::min(blocks, block_begin + blocks_per_item));
  });
}

void run_parallel(ThreadPool* pool, int64_t count,
                  const std::function<void(int64_t)>& fn) {
  if (pool != nullptr) {
    pool->parallel_for(count, fn);
    return;
  }
  for (int64_t i = 0; i < count; ++i) fn(i);
}

Conv2d::Conv2d(const ConvGeometry& geometry, Activation activation, Isa isa)
    : geometry_(geometry), activation_(activation), isa_(isa) {}

Conv2d::~Conv2d() = default;

void Conv2d::compute_raw(const ConvPlan&, const float*, float*, int64_t,
                         ThreadPool*) const {}

Status Conv2d::get_plan(int64_t height, int64_t width, int64_t in_plane,
                        std::shared_ptr<const ConvPlan>* out) const {
  std::lock_guard<std::mutex> lock(plan_mutex_);
  for (size_t i = 0; i < plans_.size(); ++i) {
    if (plans_[i]->height == height && plans_[i]->width == width &&
        plans_[i]->in_plane == in_plane) {
      std::rotate(plans_.begin(), plans_.begin() + i,
                  plans_.begin() + i + 1);
      *out = plans_.front();
      return Status::Ok();
    }
  }

  const ConvGeometry& g = geometry_;
  auto plan = std::make_shared<ConvPlan>();
  plan->height = height;
  plan->width = width;
  plan->in_plane = in_plane;
  Status status =
      conv_output_size(g, height, width, &plan->out_h, &plan->out_w);
  if (!status.ok()) return status;

  // The last vector of a row may run past out_w, so phase_w leaves room
  // for it and every load stays inside the buffer. The extra lanes read
  // zeros and are not stored.
  const int64_t padded_w = width + 2 * g.pad_w;
  const int64_t rounded_w = (plan->out_w + lanes_ - 1) / lanes_ * lanes_;
  const int64_t max_shift = (g.kernel_w - 1) * g.dilation_w / g.stride_w;
  plan->padded_h = height + 2 * g.pad_h;
  plan->phase_w = std::max((padded_w + g.stride_w - 1) / g.stride_w,
                           rounded_w + max_shift);
  if (depthwise_geometry(g)) {
    // Rows a whole number of vectors long, so that the depthwise kernel's
    // loads of its first tap column are aligned, as the row starts are.
    // Layers over 384 channels at 26 x 26 and 192 at 52 x 52 took about
    // 5 % less time (one thread, AVX2). Other layers took 0-9 % more.
    plan->phase_w = (plan->phase_w + lanes_ - 1) / lanes_ * lanes_;
  }
  plan->row_stride = g.stride_w * plan->phase_w;

  // Channel planes start an odd number of 64-byte cache lines apart.
  // With a power-of-two plane size the taps of consecutive channels would
  // map to one L1 cache set and evict each other (4 KiB aliasing).
  int64_t plane = 0;
  int64_t total = 0;
  int64_t out_total = 0;
  if (!mul_within(plan->padded_h, plan->row_stride, ConvLimits::kMaxElements,
                  &plane) ||
      !mul_within((plane + 31) / 32 * 32 + 16, g.in_channels,
                  ConvLimits::kMaxElements, &total) ||
      !mul_within(plan->out_h * plan->out_w, g.out_channels,
                  ConvLimits::kMaxElements, &out_total)) {
    return invalid("input " + str(g.in_channels) + "x" + str(height) + "x" +
                   str(width) + " is too large for this layer: the padded " +
                   "input or the output exceeds " +
                   str(ConvLimits::kMaxElements) + " elements");
  }

  plan->plane = (plane + 31) / 32 * 32 + 16;

  const int64_t per_row = rounded_w / lanes_;
  plan->segments.reserve(plan->out_h * per_row + tile_segments_);
  for (int64_t oh = 0; oh < plan->out_h; ++oh) {
    for (int64_t ow = 0; ow < plan->out_w; ow += lanes_) {
      plan->segments.push_back(detail::Segment{
          static_cast<int32_t>(oh * g.stride_h * plan->row_stride + ow),
          static_cast<int32_t>(oh * plan->out_w + ow),
          static_cast<int32_t>(std::min<int64_t>(lanes_, plan->out_w - ow))});
    }
  }
  split_into_tiles(tile_segments_, tail_segments_, plan.get());

  status = fill_plan(plan.get());
  if (!status.ok()) return status;
  if (plans_.size() == kMaxPlans) plans_.pop_back();
  plans_.insert(plans_.begin(), plan);
  *out = plan;
  return Status::Ok();
}

Status Conv2d::run(const float* input, int64_t input_size, int64_t height,
                   int64_t width, float* output, int64_t output_size,
                   ThreadPool* pool) const {
  int64_t out_h = 0;
  int64_t out_w = 0;
  Status status = conv_output_size(geometry_, height, width, &out_h, &out_w);
  if (!status.ok()) return status;
  const int64_t expected_in = geometry_.in_channels * height * width;
  const int64_t expected_out = geometry_.out_channels * out_h * out_w;
  if (input == nullptr || input_size != expected_in) {
    return invalid("input has " + str(input == nullptr ? 0 : input_size) +
                   " elements, expected in_channels x height x width = " +
                   str(expected_in));
  }
  if (output == nullptr || output_size != expected_out) {
    return invalid("output has " + str(output == nullptr ? 0 : output_size) +
                   " elements, expected out_channels x " + str(out_h) +
                   " x " + str(out_w) + " = " + str(expected_out));
  }
  return run_view(input, input_size, height * width, height, width, output,
                  output_size, out_h * out_w, pool);
}

namespace {

// Checks that `channels` planes of height x width, `plane` floats apart,
// fit in a buffer of `size` floats and in the kernels' int32 offsets.
Status check_view(const char* name, const float* data, int64_t size,
                  int64_t plane, int64_t channels, int64_t height,
                  int64_t width) {
  const int64_t pixels = height * width;
  if (data == nullptr) {
    return invalid(std::string(name) + " is null");
  }
  if (plane < pixels) {
    return invalid(std::string(name) + " plane distance " + str(plane) +
                   " is less than " + str(height) + " x " + str(width) +
                   " = " + str(pixels) + ": planes would overlap");
  }
  // The last channel's plane ends at (channels - 1) * plane + pixels.
  int64_t start = 0;
  int64_t extent = 0;
  if (__builtin_mul_overflow(channels - 1, plane, &start) ||
      __builtin_add_overflow(start, pixels, &extent) ||
      extent > ConvLimits::kMaxElements) {
    return invalid(std::string(name) + " view of " + str(channels) +
                   " planes " + str(plane) + " floats apart spans more " +
                   "than the runtime's limit of " +
                   str(ConvLimits::kMaxElements) + " elements");
  }
  if (extent > size) {
    return invalid(std::string(name) + " view of " + str(channels) +
                   " planes of " + str(height) + "x" + str(width) + ", " +
                   str(plane) + " floats apart, needs " + str(extent) +
                   " elements, but the buffer has " + str(size));
  }
  return Status::Ok();
}

}  // namespace

Status Conv2d::run_view(const float* input, int64_t input_size,
                        int64_t input_plane, int64_t height, int64_t width,
                        float* output, int64_t output_size,
                        int64_t output_plane, ThreadPool* pool) const {
  try {
    const ConvGeometry& g = geometry_;
    int64_t out_h = 0;
    int64_t out_w = 0;
    Status status = conv_output_size(g, height, width, &out_h, &out_w);
    if (!status.ok()) return status;
    Status view = check_view("input", input, input_size, input_plane,
                             g.in_channels, height, width);
    if (!view.ok()) return view;
    view = check_view("output", output, output_size, output_plane,
                      g.out_channels, out_h, out_w);
    if (!view.ok()) return view;

    std::shared_ptr<const ConvPlan> plan;
    status = get_plan(height, width, input_plane, &plan);
    if (!status.ok()) return status;

    if (plan->raw_input) {
      compute_raw(*plan, input, output, output_plane, pool);
      return Status::Ok();
    }

    // Zero-padded, phase-split copy of the input (see ConvPlan). Each
    // calling thread keeps its buffer for later runs, because the C library
    // maps a fresh allocation of this size anew each time, and the page
    // faults cost more than a small layer's arithmetic.
    // NOTE: the buffer keeps the size of the largest layer input a thread
    // has run, until the thread exits.
    thread_local std::unique_ptr<float[]> prepared;
    thread_local int64_t prepared_capacity = 0;
    const int64_t prepared_size = g.in_channels * plan->plane;
    if (prepared_capacity < prepared_size) {
      prepared.reset();
      prepared_capacity = 0;
      prepared.reset(new float[prepared_size]);
      prepared_capacity = prepared_size;
    }
    // The workers must use this thread's buffer: a thread_local named
    // inside the lambda would be their own.
    float* const buffer = prepared.get();
    const ConvPlan& p = *plan;
    const detail::KernelTable& kernels = detail::kernels_for(isa_);
    run_parallel(pool, g.in_channels, [&](int64_t c) {
      prepare_input(g, p, kernels, input + c * input_plane, input_plane, 1,
                    buffer + c * p.plane);
    });

    compute(p, buffer, output, output_plane, pool);
    return Status::Ok();
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kOutOfMemory,
                  "out of memory while running a conv layer on input " +
                      str(height) + "x" + str(width));
  }
}

}  // namespace dgms_rt
