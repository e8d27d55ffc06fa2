#include "reference.h"

#include <algorithm>
#include <cmath>

namespace dgms_rt {
namespace testing {

int64_t weight_count(const ConvGeometry& g) {
  return g.out_channels * (g.in_channels / g.groups) * g.kernel_h *
         g.kernel_w;
}

QuantConvDesc QuantLayer::desc() const {
  QuantConvDesc d;
  d.geometry = geometry;
  d.bits = bits;
  d.codebook = codebook.data();
  d.codebook_size = static_cast<int64_t>(codebook.size());
  d.indices = packed.data();
  d.indices_size = static_cast<int64_t>(packed.size());
  d.scale = scale.data();
  d.scale_size = static_cast<int64_t>(scale.size());
  d.bias = bias.data();
  d.bias_size = static_cast<int64_t>(bias.size());
  d.activation = activation;
  return d;
}

std::vector<float> QuantLayer::decoded_weights() const {
  std::vector<float> weights(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) {
    weights[i] = codebook[indices[i]];
  }
  return weights;
}

std::vector<uint8_t> pack_indices(const std::vector<uint8_t>& indices,
                                  int bits) {
  const int64_t total_bits = static_cast<int64_t>(indices.size()) * bits;
  std::vector<uint8_t> packed((total_bits + 7) / 8, 0);
  for (size_t j = 0; j < indices.size(); ++j) {
    for (int b = 0; b < bits; ++b) {
      if ((indices[j] >> b) & 1) {
        const int64_t bit = static_cast<int64_t>(j) * bits + b;
        packed[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
      }
    }
  }
  return packed;
}

std::vector<float> random_floats(int64_t count, float low, float high,
                                 std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(low, high);
  std::vector<float> values(count);
  for (float& v : values) v = dist(*rng);
  return values;
}

QuantLayer random_quant_layer(const ConvGeometry& geometry, int bits,
                              double sparsity, Activation activation,
                              std::mt19937* rng) {
  QuantLayer layer;
  layer.geometry = geometry;
  layer.bits = bits;
  layer.activation = activation;

  const int entries = 1 << bits;
  layer.codebook = random_floats(entries, -1.0f, 1.0f, rng);
  layer.codebook[0] = 0.0f;

  std::bernoulli_distribution pruned(sparsity);
  std::uniform_int_distribution<int> nonzero(1, entries - 1);
  layer.indices.resize(weight_count(geometry));
  for (uint8_t& index : layer.indices) {
    index = pruned(*rng) ? 0 : static_cast<uint8_t>(nonzero(*rng));
  }
  layer.packed = pack_indices(layer.indices, bits);
  layer.scale = random_floats(geometry.out_channels, 0.5f, 1.5f, rng);
  layer.bias = random_floats(geometry.out_channels, -0.5f, 0.5f, rng);
  return layer;
}

void naive_conv(const ConvGeometry& g, int64_t height, int64_t width,
                const std::vector<float>& input,
                const std::vector<float>& weights,
                const std::vector<float>& scale,
                const std::vector<float>& bias, Activation activation,
                std::vector<double>* output, std::vector<double>* magnitude) {
  int64_t out_h = 0;
  int64_t out_w = 0;
  conv_output_size(g, height, width, &out_h, &out_w);
  const int64_t in_per_group = g.in_channels / g.groups;
  const int64_t out_per_group = g.out_channels / g.groups;
  output->assign(g.out_channels * out_h * out_w, 0.0);
  magnitude->assign(output->size(), 0.0);

  for (int64_t o = 0; o < g.out_channels; ++o) {
    const int64_t group = o / out_per_group;
    const double s = scale.empty() ? 1.0 : scale[o];
    const double b = bias.empty() ? 0.0 : bias[o];
    for (int64_t oy = 0; oy < out_h; ++oy) {
      for (int64_t ox = 0; ox < out_w; ++ox) {
        double sum = 0.0;
        double abs_sum = 0.0;
        for (int64_t c = 0; c < in_per_group; ++c) {
          const int64_t ic = group * in_per_group + c;
          for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
            const int64_t y = oy * g.stride_h - g.pad_h + kh * g.dilation_h;
            if (y < 0 || y >= height) continue;
            for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
              const int64_t x = ox * g.stride_w - g.pad_w + kw * g.dilation_w;
              if (x < 0 || x >= width) continue;
              const double w =
                  weights[((o * in_per_group + c) * g.kernel_h + kh) *
                              g.kernel_w + kw];
              const double term = w * input[(ic * height + y) * width + x];
              sum += term;
              abs_sum += std::fabs(term);
            }
          }
        }
        double value = s * sum + b;
        if (activation == Activation::kReLU) value = std::max(value, 0.0);
        if (activation == Activation::kReLU6) {
          value = std::min(std::max(value, 0.0), 6.0);
        }
        const int64_t at = (o * out_h + oy) * out_w + ox;
        (*output)[at] = value;
        (*magnitude)[at] = std::fabs(s) * abs_sum + std::fabs(b);
      }
    }
  }
}

}  // namespace testing
}  // namespace dgms_rt
