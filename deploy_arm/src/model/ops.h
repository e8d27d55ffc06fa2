// Internal: the element-wise and pooling operators of the graph executor
// (model.cc), on float32 NCHW planes. They are kept apart from the
// executor so that tests can compare them with naive loops.
#pragma once

#include <algorithm>
#include <cstdint>

#include "dgms_rt/conv.h"
#include "dgms_rt/thread_pool.h"

namespace dgms_rt {

// The activation of conv2d, linear and add nodes, and of relu and relu6
// nodes. ReLU maps NaN to 0 and ReLU6 keeps it.
inline float activate(float v, Activation act) {
  if (act == Activation::kReLU) return v > 0.0f ? v : 0.0f;
  if (act == Activation::kReLU6) return std::min(std::max(v, 0.0f), 6.0f);
  return v;
}

// out[i] = activate(a[i] + b[i]) for i < count. out may be a or b (the
// executor writes into a buffer whose value dies at this node) but must
// not overlap them otherwise. pool may be null.
void add_activate(const float* a, const float* b, int64_t count,
                  Activation act, float* out, ThreadPool* pool);

// out[i] = activate(x[i]) for i < count; out may be x.
void apply_activation(const float* x, int64_t count, Activation act,
                      float* out, ThreadPool* pool);

struct PoolWindow {
  int64_t kernel[2] = {1, 1};  // [height, width], as in the packed graph
  int64_t stride[2] = {1, 1};
  int64_t padding[2] = {0, 0};
  int64_t dilation[2] = {1, 1};
};

// PyTorch's max_pool2d on `planes` planes of height x width, into planes
// of out_height x out_width (the caller computes the size, with or without
// ceil_mode). Padding counts as minus infinity, and a window with no tap
// inside the input gives minus infinity. The taps of a window are visited
// in row-major order, and a tap replaces the running maximum when it is
// larger or NaN. That order fixes the bits of the result where values
// compare equal or are NaN: the first of +0 and -0 wins, and the last NaN.
void max_pool2d(const float* input, int64_t planes, int64_t height,
                int64_t width, const PoolWindow& window, int64_t out_height,
                int64_t out_width, float* output, ThreadPool* pool);

}  // namespace dgms_rt
