// Test and benchmark helpers: random layers, index packing and a naive
// double-precision convolution.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "dgms_rt/conv.h"

namespace dgms_rt {
namespace testing {

// A quantized layer with its own storage; desc() points into it.
struct QuantLayer {
  ConvGeometry geometry;
  int bits = 0;
  Activation activation = Activation::kNone;
  std::vector<float> codebook;
  std::vector<uint8_t> indices;  // one index per weight, OIHW
  std::vector<uint8_t> packed;   // LSB-first bit stream
  std::vector<float> scale;
  std::vector<float> bias;

  QuantConvDesc desc() const;
  // Decoded weights codebook[index] in OIHW order.
  std::vector<float> decoded_weights() const;
};

int64_t weight_count(const ConvGeometry& g);

// Packs one index per weight LSB-first into ceil(n * bits / 8) bytes.
std::vector<uint8_t> pack_indices(const std::vector<uint8_t>& indices,
                                  int bits);

// Draws a layer whose weights have index 0 with probability `sparsity`
// and a uniformly drawn nonzero index otherwise.
QuantLayer random_quant_layer(const ConvGeometry& geometry, int bits,
                              double sparsity, Activation activation,
                              std::mt19937* rng);

std::vector<float> random_floats(int64_t count, float low, float high,
                                 std::mt19937* rng);

// y = act(scale[o] * sum(weight * x) + bias[o]) in double, and
// magnitude = |scale[o]| * sum(|weight * x|) + |bias[o]|, the bound that
// scales the rounding error of any summation order. scale and bias may be
// empty (1 and 0).
void naive_conv(const ConvGeometry& g, int64_t height, int64_t width,
                const std::vector<float>& input,
                const std::vector<float>& weights,
                const std::vector<float>& scale,
                const std::vector<float>& bias, Activation activation,
                std::vector<double>* output, std::vector<double>* magnitude);

}  // namespace testing
}  // namespace dgms_rt
