#include "ops.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

namespace dgms_rt {
namespace {

// Elements per work item of the element-wise operators: 256 KB of floats,
// large enough that scheduling costs nothing and small enough to spread
// a 1-million-element tensor over several threads.
constexpr int64_t kChunk = int64_t(1) << 16;

// Outputs per work item of max_pool2d.
constexpr int64_t kPoolOutputsPerItem = int64_t(1) << 14;

void run_items(ThreadPool* pool, int64_t count,
               const std::function<void(int64_t)>& fn) {
  if (pool != nullptr) {
    pool->parallel_for(count, fn);
    return;
  }
  for (int64_t i = 0; i < count; ++i) fn(i);
}

// Calls fn(begin, end) on consecutive chunks of [0, count).
void for_chunks(int64_t count, ThreadPool* pool,
                const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  run_items(pool, chunks, [&](int64_t chunk) {
    fn(chunk * kChunk, std::min(count, (chunk + 1) * kChunk));
  });
}

// One loop per aliasing case: with __restrict on pointers that really
// differ, the compiler vectorises without a run-time overlap check (which
// would send the in-place case to its scalar fallback).
template <Activation kAct>
void add_to_new(const float* __restrict a, const float* __restrict b,
                float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = activate(a[i] + b[i], kAct);
}

template <Activation kAct>
void add_into_left(float* __restrict a, const float* __restrict b,
                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = activate(a[i] + b[i], kAct);
}

template <Activation kAct>
void add_into_right(const float* __restrict a, float* __restrict b,
                    int64_t n) {
  for (int64_t i = 0; i < n; ++i) b[i] = activate(a[i] + b[i], kAct);
}

template <Activation kAct>
void add_range(const float* a, const float* b, float* out, int64_t n) {
  if (out == a && out == b) {
    for (int64_t i = 0; i < n; ++i) out[i] = activate(out[i] + out[i], kAct);
  } else if (out == a) {
    add_into_left<kAct>(out, b, n);
  } else if (out == b) {
    add_into_right<kAct>(a, out, n);
  } else {
    add_to_new<kAct>(a, b, out, n);
  }
}

template <Activation kAct>
void activate_to_new(const float* __restrict x, float* __restrict out,
                     int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = activate(x[i], kAct);
}

template <Activation kAct>
void activate_range(const float* x, float* out, int64_t n) {
  if (out == x) {
    for (int64_t i = 0; i < n; ++i) out[i] = activate(out[i], kAct);
  } else {
    activate_to_new<kAct>(x, out, n);
  }
}

// Folds in[i * stride] into the running maximum out[i] for i < count.
// kStride > 0 fixes the stride at compile time, which lets the compiler
// vectorise the strided loads; 0 reads it from `stride`.
template <int kStride>
void fold_max(float* __restrict out, const float* __restrict in,
              int64_t count, int64_t stride) {
  const int64_t step = kStride > 0 ? kStride : stride;
  for (int64_t i = 0; i < count; ++i) {
    const float v = in[i * step];
    const float m = out[i];
    // NaN propagates; a value equal to the maximum (the other zero) does
    // not replace it. Bitwise | keeps the loop free of branches.
    out[i] = ((v > m) | (v != v)) ? v : m;
  }
}

}  // namespace

void add_activate(const float* a, const float* b, int64_t count,
                  Activation act, float* out, ThreadPool* pool) {
  for_chunks(count, pool, [&](int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    const float* pa = a + begin;
    const float* pb = b + begin;
    float* po = out + begin;
    switch (act) {
      case Activation::kReLU:
        add_range<Activation::kReLU>(pa, pb, po, n);
        break;
      case Activation::kReLU6:
        add_range<Activation::kReLU6>(pa, pb, po, n);
        break;
      default:
        add_range<Activation::kNone>(pa, pb, po, n);
        break;
    }
  });
}

void apply_activation(const float* x, int64_t count, Activation act,
                      float* out, ThreadPool* pool) {
  for_chunks(count, pool, [&](int64_t begin, int64_t end) {
    switch (act) {
      case Activation::kReLU:
        activate_range<Activation::kReLU>(x + begin, out + begin,
                                          end - begin);
        break;
      case Activation::kReLU6:
        activate_range<Activation::kReLU6>(x + begin, out + begin,
                                           end - begin);
        break;
      default:
        if (out != x) std::copy(x + begin, x + end, out + begin);
        break;
    }
  });
}

void max_pool2d(const float* input, int64_t planes, int64_t height,
                int64_t width, const PoolWindow& window, int64_t out_height,
                int64_t out_width, float* output, ThreadPool* pool) {
  const int64_t kernel_h = window.kernel[0], kernel_w = window.kernel[1];
  const int64_t stride_h = window.stride[0], stride_w = window.stride[1];
  const int64_t pad_h = window.padding[0], pad_w = window.padding[1];
  const int64_t dilation_h = window.dilation[0];
  const int64_t dilation_w = window.dilation[1];
  const int64_t rows = planes * out_height;
  const int64_t rows_per_item =
      std::max<int64_t>(1, kPoolOutputsPerItem / out_width);
  const int64_t items = (rows + rows_per_item - 1) / rows_per_item;
  run_items(pool, items, [&](int64_t item) {
    const int64_t row_end = std::min(rows, (item + 1) * rows_per_item);
    for (int64_t r = item * rows_per_item; r < row_end; ++r) {
      const int64_t oy = r % out_height;
      const float* plane = input + (r / out_height) * height * width;
      float* out = output + r * out_width;
      std::fill(out, out + out_width, -std::numeric_limits<float>::infinity());
      // Tap by tap in row-major order, each over the whole output row, so
      // that every output folds its taps in the order of the naive loop.
      // Taps outside the input are skipped rather than read as minus
      // infinity, which is the same because they never replace the
      // maximum.
      for (int64_t ky = 0; ky < kernel_h; ++ky) {
        const int64_t iy = oy * stride_h - pad_h + ky * dilation_h;
        if (iy < 0 || iy >= height) continue;
        const float* row = plane + iy * width;
        for (int64_t kx = 0; kx < kernel_w; ++kx) {
          // Output column ox reads input column ox * stride_w + shift,
          // which is inside the row for ox in [first, end).
          const int64_t shift = kx * dilation_w - pad_w;
          if (width - 1 - shift < 0) continue;
          const int64_t first =
              shift >= 0 ? 0 : (-shift + stride_w - 1) / stride_w;
          const int64_t end =
              std::min(out_width, (width - 1 - shift) / stride_w + 1);
          if (first >= end) continue;
          const float* src = row + first * stride_w + shift;
          if (stride_w == 1) {
            fold_max<1>(out + first, src, end - first, 1);
          } else if (stride_w == 2) {
            fold_max<2>(out + first, src, end - first, 2);
          } else {
            fold_max<0>(out + first, src, end - first, stride_w);
          }
        }
      }
    }
  });
}

}  // namespace dgms_rt
