// Tests of the conv kernels: the scalar reference against a naive double
// conv of the decoded weights, every SIMD path against the scalar
// reference, on listed and on random shapes. Also malformed descriptions
// and inputs, extreme field values, the thread pool and the index
// unpacking. Prints one line per failure and exits non-zero if any.
//
// Tolerances:
// - scalar quantized and every dense path against the naive double conv:
//   |y - y_ref| <= (taps + 8) * FLT_EPSILON * m, where m is
//   |scale| * sum(|w * x|) + |bias| (the worst-case rounding bound of a
//   float sum of `taps` terms plus the scale and bias steps);
// - quantized SIMD paths and any thread count against the scalar
//   reference with one thread: bit-identical (the kernels perform the same
//   float operations in the same order, see src/kernel_impl.h).
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "dgms_rt/c_api.h"
#include "dgms_rt/conv.h"
#include "reference.h"

using namespace dgms_rt;
using dgms_rt::testing::QuantLayer;

namespace {

int g_checks = 0;
int g_failures = 0;

void check(bool condition, const std::string& context) {
  ++g_checks;
  if (!condition) {
    ++g_failures;
    std::printf("FAIL: %s\n", context.c_str());
  }
}

struct Shape {
  const char* name;
  int64_t in_channels, out_channels, groups;
  int64_t kernel_h, kernel_w, stride_h, stride_w;
  int64_t pad_h, pad_w, dilation_h, dilation_w;
  int64_t height, width;

  ConvGeometry geometry() const {
    ConvGeometry g;
    g.out_channels = out_channels;
    g.in_channels = in_channels;
    g.groups = groups;
    g.kernel_h = kernel_h;
    g.kernel_w = kernel_w;
    g.stride_h = stride_h;
    g.stride_w = stride_w;
    g.pad_h = pad_h;
    g.pad_w = pad_w;
    g.dilation_h = dilation_h;
    g.dilation_w = dilation_w;
    return g;
  }
};

// Odd channel counts, every kernel kind, widths that leave vector and tile
// tails, 1-pixel and non-square inputs.
const Shape kShapes[] = {
    // name              C   O  G  KH KW SH SW PH PW DH DW   H   W
    {"1x1",              3,  5, 1, 1, 1, 1, 1, 0, 0, 1, 1,   7,  9},
    {"1x1_stride2",      8,  6, 1, 1, 1, 2, 2, 0, 0, 1, 1,   9, 10},
    {"1x1_wide_tail",   13, 11, 1, 1, 1, 1, 1, 0, 0, 1, 1,   3, 37},
    {"3x3_pad1",         5,  7, 1, 3, 3, 1, 1, 1, 1, 1, 1,  11, 13},
    {"3x3_stride2",      6,  9, 1, 3, 3, 2, 2, 1, 1, 1, 1,  13, 17},
    {"3x3_stride3",      4,  4, 1, 3, 3, 3, 3, 1, 1, 1, 1,  14, 20},
    {"3x3_no_pad",      33, 17, 1, 3, 3, 1, 1, 0, 0, 1, 1,   6, 19},
    {"3x3_dilated2",     4,  5, 1, 3, 3, 1, 1, 2, 2, 2, 2,  10, 12},
    {"3x3_mixed",        5,  6, 1, 3, 3, 2, 1, 0, 2, 1, 3,  10, 14},
    {"grouped",          6,  9, 3, 3, 3, 1, 1, 1, 1, 1, 1,   8, 11},
    {"grouped_stride2", 12,  8, 4, 3, 3, 2, 2, 1, 1, 1, 1,   9,  9},
    {"depthwise",        7,  7, 7, 3, 3, 1, 1, 1, 1, 1, 1,  12,  9},
    {"depthwise_s2",     8,  8, 8, 3, 3, 2, 2, 1, 1, 1, 1,  15, 15},
    {"depthwise_x2",     4,  8, 4, 3, 3, 1, 1, 1, 1, 1, 1,   5,  6},
    {"one_pixel_1x1",    5,  3, 1, 1, 1, 1, 1, 0, 0, 1, 1,   1,  1},
    {"one_pixel_3x3",    3,  4, 1, 3, 3, 1, 1, 1, 1, 1, 1,   1,  1},
    {"stem_7x7_s2",      3,  8, 1, 7, 7, 2, 2, 3, 3, 1, 1,  19, 23},
    {"kernel_1x5",       3,  5, 1, 1, 5, 1, 1, 0, 2, 1, 1,   4, 21},
    {"kernel_5x1",       3,  5, 1, 5, 1, 1, 1, 2, 0, 1, 1,  21,  4},
    {"tall",             2,  3, 1, 3, 3, 1, 1, 1, 1, 1, 1,  40,  2},
    {"3x3_wide",        40, 70, 1, 3, 3, 1, 1, 1, 1, 1, 1,  17, 45},
    // Over 65536 taps: the output channels are split into several chunks.
    {"1x1_many_taps",  256,300, 1, 1, 1, 1, 1, 0, 0, 1, 1,   3,  5},
};

const int kBits[] = {1, 2, 3, 4, 8};

// Winograd's transforms scale intermediate values up (by up to 10 x 10 in
// the input transform and 19 x 19 in the output transform). So its
// worst-case rounding error is larger than the direct kernels' bound, and
// the test allows this factor times that bound.
constexpr double kWinogradErrorFactor = 4.0;
const int kThreads[] = {1, 3};

// A 3x3 stride-1 conv without groups or dilation, padded by `pad`.
ConvGeometry conv3x3(int64_t in_channels, int64_t out_channels,
                     int64_t pad) {
  ConvGeometry g;
  g.in_channels = in_channels;
  g.out_channels = out_channels;
  g.kernel_h = g.kernel_w = 3;
  g.pad_h = g.pad_w = pad;
  return g;
}

std::vector<Isa> simd_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (isa_supported(isa)) isas.push_back(isa);
  }
  return isas;
}

// Runs conv and returns its output; records a failure when it errs.
std::vector<float> run_conv(const Conv2d& conv, const std::vector<float>& input,
                            int64_t height, int64_t width, int threads,
                            const std::string& context) {
  int64_t out_h = 0;
  int64_t out_w = 0;
  conv_output_size(conv.geometry(), height, width, &out_h, &out_w);
  std::vector<float> output(conv.geometry().out_channels * out_h * out_w,
                            std::numeric_limits<float>::quiet_NaN());
  ThreadPool pool(threads);
  Status status = conv.run(input.data(), static_cast<int64_t>(input.size()),
                           height, width, output.data(),
                           static_cast<int64_t>(output.size()), &pool);
  check(status.ok(), context + ": run failed: " + status.message());
  return output;
}

// Formats a value with enough digits to tell neighbouring floats apart.
std::string format(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.9g", value);
  return text;
}

// Checks output against the naive conv within the stated bound.
void check_close(const std::vector<float>& output,
                 const std::vector<double>& expected,
                 const std::vector<double>& magnitude, int64_t taps,
                 const std::string& context) {
  const double factor = (taps + 8) * static_cast<double>(FLT_EPSILON);
  int64_t bad = -1;
  for (size_t i = 0; i < output.size(); ++i) {
    const double error = std::fabs(output[i] - expected[i]);
    if (!(error <= factor * magnitude[i])) {
      bad = static_cast<int64_t>(i);
      break;
    }
  }
  check(bad < 0, context + ": element " + std::to_string(bad) + " is " +
                     (bad < 0 ? "" : format(output[bad])) + ", expected " +
                     (bad < 0 ? "" : format(expected[bad])) + " within " +
                     (bad < 0 ? "" : format(factor * magnitude[bad])));
}

void check_identical(const std::vector<float>& output,
                     const std::vector<float>& expected,
                     const std::string& context) {
  int64_t bad = -1;
  for (size_t i = 0; i < output.size(); ++i) {
    if (!(output[i] == expected[i])) {
      bad = static_cast<int64_t>(i);
      break;
    }
  }
  check(bad < 0, context + ": element " + std::to_string(bad) + " is " +
                     (bad < 0 ? "" : format(output[bad])) +
                     ", the scalar reference has " +
                     (bad < 0 ? "" : format(expected[bad])));
}

// Checks both quantized kernels on one layer: the scalar kernel with one
// thread against the naive conv, then every instruction set (scalar
// included) with each thread count bit-identical to it.
void check_quant_layer(const QuantLayer& layer, const std::vector<float>& input,
                       int64_t height, int64_t width,
                       const std::vector<int>& thread_counts,
                       const std::string& context) {
  const ConvGeometry& g = layer.geometry;
  const int64_t taps = (g.in_channels / g.groups) * g.kernel_h * g.kernel_w;
  std::vector<double> expected;
  std::vector<double> magnitude;
  testing::naive_conv(g, height, width, input, layer.decoded_weights(),
                      layer.scale, layer.bias, layer.activation, &expected,
                      &magnitude);
  std::vector<Isa> isas = simd_isas();
  isas.insert(isas.begin(), Isa::kScalar);

  for (QuantKernel kernel : {QuantKernel::kAccumulate, QuantKernel::kLookup}) {
    const std::string kernel_context =
        context + " kernel=" + quant_kernel_name(kernel);
    std::unique_ptr<QuantConv2d> scalar;
    Status status =
        QuantConv2d::create(layer.desc(), Isa::kScalar, &scalar, kernel);
    check(status.ok(), kernel_context + ": create failed: " + status.message());
    if (!status.ok()) continue;
    check(scalar->kernel() == kernel, kernel_context + ": wrong kernel");
    const std::vector<float> reference =
        run_conv(*scalar, input, height, width, 1, kernel_context);
    check_close(reference, expected, magnitude, taps,
                kernel_context + " scalar vs naive");

    for (Isa isa : isas) {
      std::unique_ptr<QuantConv2d> conv;
      status = QuantConv2d::create(layer.desc(), isa, &conv, kernel);
      check(status.ok(), kernel_context + ": create failed: " + status.message());
      if (!status.ok()) continue;
      for (int threads : thread_counts) {
        const std::string run_context = kernel_context + " isa=" +
                                        isa_name(isa) + " threads=" +
                                        std::to_string(threads);
        check_identical(
            run_conv(*conv, input, height, width, threads, run_context),
            reference, run_context + " vs scalar");
      }
    }
  }
}

void test_quant_kernels(std::mt19937* rng) {
  const double sparsities[] = {0.3, 0.0, 1.0, 0.6};
  int case_index = 0;
  for (const Shape& shape : kShapes) {
    const ConvGeometry g = shape.geometry();
    for (int bits : kBits) {
      const Activation activation = static_cast<Activation>(case_index % 3);
      const double sparsity = sparsities[case_index % 4];
      ++case_index;
      const QuantLayer layer =
          testing::random_quant_layer(g, bits, sparsity, activation, rng);
      const std::vector<float> input = testing::random_floats(
          g.in_channels * shape.height * shape.width, -2.0f, 2.0f, rng);
      check_quant_layer(layer, input, shape.height, shape.width,
                        {kThreads[0], kThreads[1]},
                        std::string("quant ") + shape.name +
                            " bits=" + std::to_string(bits));
    }
  }
}

// Checks the dense kernel on one layer with random weights, bias and
// activation, with or without a scale: every instruction set and thread
// count against the naive conv.
void check_dense_layer(const ConvGeometry& g, const std::vector<float>& input,
                       int64_t height, int64_t width, Activation activation,
                       bool with_bias, bool with_scale,
                       const std::vector<int>& thread_counts,
                       const std::string& context, std::mt19937* rng) {
  std::vector<Isa> isas = simd_isas();
  isas.insert(isas.begin(), Isa::kScalar);
  const int64_t taps = (g.in_channels / g.groups) * g.kernel_h * g.kernel_w;
  const std::vector<float> weights =
      testing::random_floats(testing::weight_count(g), -1.0f, 1.0f, rng);
  const std::vector<float> bias =
      with_bias ? testing::random_floats(g.out_channels, -0.5f, 0.5f, rng)
                : std::vector<float>();
  // A scale stands for a folded BatchNorm.
  const std::vector<float> scale =
      with_scale ? testing::random_floats(g.out_channels, 0.25f, 2.0f, rng)
                 : std::vector<float>();
  std::vector<double> expected;
  std::vector<double> magnitude;
  testing::naive_conv(g, height, width, input, weights, scale, bias,
                      activation, &expected, &magnitude);

  DenseConvDesc desc;
  desc.geometry = g;
  desc.weights = weights.data();
  desc.weights_size = static_cast<int64_t>(weights.size());
  desc.bias = with_bias ? bias.data() : nullptr;
  desc.bias_size = static_cast<int64_t>(bias.size());
  desc.scale = scale.empty() ? nullptr : scale.data();
  desc.scale_size = static_cast<int64_t>(scale.size());
  desc.activation = activation;
  desc.algorithm = DenseAlgorithm::kDirect;

  for (Isa isa : isas) {
    std::unique_ptr<DenseConv2d> conv;
    Status status = DenseConv2d::create(desc, isa, &conv);
    check(status.ok(), context + " isa=" + isa_name(isa) +
                           ": create failed: " + status.message());
    if (!status.ok()) continue;
    for (int threads : thread_counts) {
      const std::string run_context = context + " isa=" + isa_name(isa) +
                                      " threads=" + std::to_string(threads);
      check_close(run_conv(*conv, input, height, width, threads, run_context),
                  expected, magnitude, taps, run_context);
    }
  }
}

void test_dense_kernels(std::mt19937* rng) {
  int case_index = 0;
  for (const Shape& shape : kShapes) {
    const ConvGeometry g = shape.geometry();
    const Activation activation = static_cast<Activation>(case_index % 3);
    const bool with_bias = case_index % 2 == 0;
    ++case_index;
    // Every third layer has a scale.
    const bool with_scale = case_index % 3 == 1;
    const std::vector<float> input = testing::random_floats(
        g.in_channels * shape.height * shape.width, -2.0f, 2.0f, rng);
    check_dense_layer(g, input, shape.height, shape.width, activation,
                      with_bias, with_scale,
                      {kThreads[0], kThreads[1]},
                      std::string("dense ") + shape.name, rng);
  }
}

// Winograd F(4x4, 3x3) layers: the scalar kernel against the naive double
// conv within kWinogradErrorFactor times the direct kernels' bound, every
// SIMD path and thread count bit-identical to the scalar kernel, and the
// automatic choice. The outputs cover whole and partial 4x4 tiles, tile
// rows narrower and wider than a vector, and channel counts that leave
// partial output-channel blocks.
void test_winograd(std::mt19937* rng) {
  const struct {
    const char* name;
    int64_t in_channels, out_channels, pad, height, width;
  } cases[] = {
      {"wino_pad1", 5, 7, 1, 11, 13},
      {"wino_no_pad", 9, 6, 0, 10, 38},
      {"wino_pad2", 8, 9, 2, 7, 5},
      {"wino_one_pixel", 3, 4, 1, 1, 1},
      {"wino_tall", 2, 3, 1, 40, 2},
      {"wino_wide", 40, 70, 1, 17, 45},
      {"wino_square64", 16, 16, 1, 64, 64},
      {"wino_many_blocks", 64, 33, 1, 23, 97},
  };
  std::vector<Isa> isas = simd_isas();
  isas.insert(isas.begin(), Isa::kScalar);
  double worst = 0.0;
  for (const auto& c : cases) {
    const ConvGeometry g = conv3x3(c.in_channels, c.out_channels, c.pad);
    const int64_t taps = g.in_channels * 9;
    for (int variant = 0; variant < 3; ++variant) {
      const Activation activation = static_cast<Activation>(variant);
      const std::vector<float> weights =
          testing::random_floats(testing::weight_count(g), -1.0f, 1.0f, rng);
      const std::vector<float> bias =
          testing::random_floats(g.out_channels, -0.5f, 0.5f, rng);
      // The ReLU variant also has a scale (a folded BatchNorm).
      const std::vector<float> scale =
          variant == 1
              ? testing::random_floats(g.out_channels, 0.25f, 2.0f, rng)
              : std::vector<float>();
      const std::vector<float> input = testing::random_floats(
          g.in_channels * c.height * c.width, -2.0f, 2.0f, rng);
      std::vector<double> expected;
      std::vector<double> magnitude;
      testing::naive_conv(g, c.height, c.width, input, weights, scale, bias,
                          activation, &expected, &magnitude);

      DenseConvDesc desc;
      desc.geometry = g;
      desc.weights = weights.data();
      desc.weights_size = static_cast<int64_t>(weights.size());
      desc.bias = bias.data();
      desc.bias_size = static_cast<int64_t>(bias.size());
      desc.scale = scale.empty() ? nullptr : scale.data();
      desc.scale_size = static_cast<int64_t>(scale.size());
      desc.activation = activation;
      desc.algorithm = DenseAlgorithm::kWinograd;
      const std::string context =
          std::string(c.name) + " act=" + std::to_string(variant);

      std::unique_ptr<DenseConv2d> scalar;
      Status status = DenseConv2d::create(desc, Isa::kScalar, &scalar);
      check(status.ok(), context + ": create failed: " + status.message());
      if (!status.ok()) continue;
      check(scalar->uses_winograd(c.height, c.width),
            context + ": kWinograd layer does not use Winograd");
      const std::vector<float> reference =
          run_conv(*scalar, input, c.height, c.width, 1, context);
      const double bound = (taps + 8) * static_cast<double>(FLT_EPSILON);
      int64_t bad = -1;
      for (size_t i = 0; i < reference.size(); ++i) {
        const double ratio =
            std::fabs(reference[i] - expected[i]) / (bound * magnitude[i]);
        if (!(ratio <= kWinogradErrorFactor)) {
          bad = static_cast<int64_t>(i);
          break;
        }
        worst = std::max(worst, ratio);
      }
      check(bad < 0,
            context + " scalar vs naive: element " + std::to_string(bad) +
                " is " + (bad < 0 ? "" : format(reference[bad])) +
                ", expected " + (bad < 0 ? "" : format(expected[bad])));

      for (Isa isa : isas) {
        std::unique_ptr<DenseConv2d> conv;
        status = DenseConv2d::create(desc, isa, &conv);
        check(status.ok(), context + ": create failed: " + status.message());
        if (!status.ok()) continue;
        for (int threads : kThreads) {
          const std::string run_context = context + " isa=" + isa_name(isa) +
                                          " threads=" +
                                          std::to_string(threads);
          check_identical(
              run_conv(*conv, input, c.height, c.width, threads, run_context),
              reference, run_context + " vs scalar");
        }
      }
    }
  }
  std::printf("winograd: largest error %.3g x the direct kernels' bound "
              "(limit %.0f)\n", worst, kWinogradErrorFactor);

  // The automatic choice: Winograd for 3x3 stride-1 layers on outputs whose
  // tile rows fill the vectors, direct for other geometries.
  ConvGeometry g = conv3x3(16, 16, 1);
  const std::vector<float> weights =
      testing::random_floats(testing::weight_count(g), -1.0f, 1.0f, rng);
  DenseConvDesc desc;
  desc.geometry = g;
  desc.weights = weights.data();
  desc.weights_size = static_cast<int64_t>(weights.size());
  std::unique_ptr<DenseConv2d> conv;
  check(DenseConv2d::create(desc, Isa::kAuto, &conv).ok(),
        "winograd auto: create failed");
  check(conv->algorithm() == DenseAlgorithm::kAuto &&
            conv->uses_winograd(64, 64) && !conv->uses_winograd(1, 1),
        "winograd auto: expected Winograd on 64x64 and direct on 1x1");
  desc.algorithm = DenseAlgorithm::kDirect;
  check(DenseConv2d::create(desc, Isa::kAuto, &conv).ok() &&
            !conv->uses_winograd(64, 64),
        "winograd: algorithm direct uses Winograd");
  g.stride_h = g.stride_w = 2;
  desc.geometry = g;
  desc.algorithm = DenseAlgorithm::kAuto;
  check(DenseConv2d::create(desc, Isa::kAuto, &conv).ok() &&
            conv->algorithm() == DenseAlgorithm::kDirect,
        "winograd auto: a strided layer does not resolve to direct");
  desc.algorithm = DenseAlgorithm::kWinograd;
  Status status = DenseConv2d::create(desc, Isa::kAuto, &conv);
  check(status.code() == StatusCode::kInvalidArgument &&
            status.message().find("stride 2x2") != std::string::npos,
        "winograd on a strided layer: expected kInvalidArgument naming the "
        "stride, got " + status.message());
  desc.algorithm = static_cast<DenseAlgorithm>(7);
  check(DenseConv2d::create(desc, Isa::kAuto, &conv).code() ==
            StatusCode::kInvalidArgument,
        "dense: algorithm 7 accepted");
}

// Quantized 3x3 stride-1 layers with Winograd filters of their decoded
// weights. On shapes where Winograd pays off, every kernel, instruction
// set and thread count must give the bits of a dense Winograd layer with
// the decoded weights and the layer's scale and bias. On the others, they
// must give the bits of the layer without Winograd filters. Also checks
// the size cap and the layers that keep no filters.
void test_quant_winograd(std::mt19937* rng) {
  const struct {
    const char* name;
    int64_t in_channels, out_channels, pad, height, width;
    int bits;
  } cases[] = {
      {"qwino_pad1", 8, 9, 1, 19, 23, 4},
      {"qwino_no_pad", 12, 8, 0, 30, 18, 2},
      {"qwino_square", 16, 16, 1, 52, 52, 8},
      {"qwino_narrow_in", 5, 16, 1, 32, 32, 3},
      {"qwino_small_input", 16, 8, 1, 3, 3, 4},
  };
  std::vector<Isa> isas = simd_isas();
  isas.insert(isas.begin(), Isa::kScalar);
  const int64_t no_limit = int64_t(1) << 40;
  for (const auto& c : cases) {
    const ConvGeometry g = conv3x3(c.in_channels, c.out_channels, c.pad);
    const Activation activation =
        static_cast<Activation>(c.bits % 3);
    const QuantLayer layer =
        testing::random_quant_layer(g, c.bits, 0.2, activation, rng);
    const std::vector<float> input = testing::random_floats(
        g.in_channels * c.height * c.width, -2.0f, 2.0f, rng);
    const std::vector<float> weights = layer.decoded_weights();
    DenseConvDesc dense;
    dense.geometry = g;
    dense.weights = weights.data();
    dense.weights_size = static_cast<int64_t>(weights.size());
    dense.bias = layer.bias.data();
    dense.bias_size = g.out_channels;
    dense.scale = layer.scale.data();
    dense.scale_size = g.out_channels;
    dense.activation = activation;
    dense.algorithm = DenseAlgorithm::kWinograd;
    std::unique_ptr<DenseConv2d> dense_conv;
    Status status = DenseConv2d::create(dense, Isa::kScalar, &dense_conv);
    check(status.ok(), std::string(c.name) + ": dense create failed: " +
                           status.message());
    if (!status.ok()) continue;
    const std::vector<float> expected =
        run_conv(*dense_conv, input, c.height, c.width, 1, c.name);
    // Where Winograd pays off depends on the instruction set's tile block.
    dense.algorithm = DenseAlgorithm::kAuto;

    for (QuantKernel kernel : {QuantKernel::kLookup, QuantKernel::kAccumulate}) {
      const std::string kernel_context =
          std::string(c.name) + " kernel=" + quant_kernel_name(kernel);
      std::unique_ptr<QuantConv2d> plain;
      status = QuantConv2d::create(layer.desc(), Isa::kScalar, &plain, kernel);
      check(status.ok(), kernel_context + ": create failed: " +
                             status.message());
      if (!status.ok()) continue;
      const std::vector<float> codebook_result =
          run_conv(*plain, input, c.height, c.width, 1, kernel_context);
      for (Isa isa : isas) {
        std::unique_ptr<DenseConv2d> auto_conv;
        check(DenseConv2d::create(dense, isa, &auto_conv).ok(),
              kernel_context + ": dense create failed");
        const bool winograd = auto_conv->uses_winograd(c.height, c.width);
        const std::vector<float>& reference =
            winograd ? expected : codebook_result;
        std::unique_ptr<QuantConv2d> conv;
        status = QuantConv2d::create(layer.desc(), isa, &conv, kernel,
                                     no_limit);
        check(status.ok(), kernel_context + ": create failed: " +
                               status.message());
        if (!status.ok()) continue;
        check(conv->winograd_bytes() > 0 &&
                  conv->uses_winograd(c.height, c.width) == winograd,
              kernel_context + ": expected Winograd filters, used " +
                  (winograd ? "on" : "not on") + " this shape");
        for (int threads : kThreads) {
          const std::string run_context = kernel_context + " isa=" +
                                          isa_name(isa) + " threads=" +
                                          std::to_string(threads);
          check_identical(
              run_conv(*conv, input, c.height, c.width, threads, run_context),
              reference,
              run_context +
                  (winograd ? " vs dense Winograd" : " vs codebook kernel"));
        }
      }
    }
  }

  // The cap: filters of exactly the cap are kept, and one byte less keeps
  // none. Strided layers and a cap of 0 keep none, and a negative cap
  // fails.
  ConvGeometry g = conv3x3(16, 16, 1);
  const QuantLayer layer =
      testing::random_quant_layer(g, 4, 0.2, Activation::kNone, rng);
  std::unique_ptr<QuantConv2d> conv;
  check(QuantConv2d::create(layer.desc(), Isa::kAuto, &conv,
                            QuantKernel::kAuto, no_limit).ok(),
        "quant winograd cap: create failed");
  const int64_t bytes = conv->winograd_bytes();
  check(bytes >= 36 * 16 * 16 * 4, "quant winograd cap: " +
                                       std::to_string(bytes) +
                                       " bytes of filters for 16x16 channels");
  check(QuantConv2d::create(layer.desc(), Isa::kAuto, &conv,
                            QuantKernel::kAuto, bytes).ok() &&
            conv->winograd_bytes() == bytes,
        "quant winograd cap: filters of exactly the cap not kept");
  check(QuantConv2d::create(layer.desc(), Isa::kAuto, &conv,
                            QuantKernel::kAuto, bytes - 1).ok() &&
            conv->winograd_bytes() == 0 && !conv->uses_winograd(64, 64),
        "quant winograd cap: filters over the cap kept");
  check(QuantConv2d::create(layer.desc(), Isa::kAuto, &conv).ok() &&
            conv->winograd_bytes() == 0,
        "quant winograd: the default create keeps filters");
  Status status = QuantConv2d::create(layer.desc(), Isa::kAuto, &conv,
                                      QuantKernel::kAuto, -1);
  check(status.code() == StatusCode::kInvalidArgument &&
            status.message().find("winograd_max_bytes is -1") !=
                std::string::npos,
        "quant winograd: negative cap gave " + status.message());
  g.stride_h = g.stride_w = 2;
  const QuantLayer strided =
      testing::random_quant_layer(g, 4, 0.2, Activation::kNone, rng);
  check(QuantConv2d::create(strided.desc(), Isa::kAuto, &conv,
                            QuantKernel::kAuto, no_limit).ok() &&
            conv->winograd_bytes() == 0,
        "quant winograd: a strided layer keeps Winograd filters");
}

// A layer run on alternating input shapes must match a fresh layer's
// result for each shape (the layer caches a plan per recent shape).
void test_shape_change(std::mt19937* rng) {
  const ConvGeometry g = conv3x3(5, 6, 1);
  const QuantLayer layer =
      testing::random_quant_layer(g, 3, 0.2, Activation::kNone, rng);
  std::unique_ptr<QuantConv2d> shared;
  check(QuantConv2d::create(layer.desc(), Isa::kAuto, &shared).ok(),
        "shape change: create failed");
  const int64_t sizes[][2] = {{9, 11}, {4, 21}, {9, 11}, {1, 1}};
  for (const auto& size : sizes) {
    const std::vector<float> input =
        testing::random_floats(g.in_channels * size[0] * size[1], -1, 1, rng);
    std::unique_ptr<QuantConv2d> fresh;
    QuantConv2d::create(layer.desc(), Isa::kAuto, &fresh);
    const std::string context = "shape change " + std::to_string(size[0]) + "x" +
                             std::to_string(size[1]);
    check_identical(run_conv(*shared, input, size[0], size[1], 2, context),
                    run_conv(*fresh, input, size[0], size[1], 1, context), context);
  }
}

// A depthwise layer keeps the zero padding of its buffer between channels
// and calls while the plane layout stays the same (see
// DepthwiseArgs::padding_ready). Layers and input sizes that alternate,
// with other layouts in between, must still match the naive conv.
void test_depthwise_padding_reuse(std::mt19937* rng) {
  struct Case {
    int64_t stride, pad, dilation;
  };
  const Case cases[] = {{1, 1, 1}, {2, 1, 1}, {1, 2, 2}};
  std::vector<QuantLayer> layers;
  for (const Case& c : cases) {
    ConvGeometry g;
    g.out_channels = g.in_channels = g.groups = 5;
    g.kernel_h = g.kernel_w = 3;
    g.stride_h = g.stride_w = c.stride;
    g.pad_h = g.pad_w = c.pad;
    g.dilation_h = g.dilation_w = c.dilation;
    layers.push_back(
        testing::random_quant_layer(g, 4, 0.2, Activation::kNone, rng));
  }
  const int64_t sizes[][2] = {{9, 11}, {9, 11}, {4, 21}, {9, 11}};
  for (int round = 0; round < 2; ++round) {
    for (size_t l = 0; l < layers.size(); ++l) {
      for (const auto& size : sizes) {
        const std::vector<float> input = testing::random_floats(
            5 * size[0] * size[1], -1, 1, rng);
        check_quant_layer(layers[l], input, size[0], size[1], {1, 2},
                          "depthwise padding reuse layer " +
                              std::to_string(l) + " " +
                              std::to_string(size[0]) + "x" +
                              std::to_string(size[1]));
      }
    }
  }
}

void expect_invalid(const Status& status, const std::string& context) {
  check(status.code() == StatusCode::kInvalidArgument,
        context + ": expected kInvalidArgument, got code " +
            std::to_string(static_cast<int>(status.code())));
  check(!status.message().empty(), context + ": error message is empty");
}

// run_view() on planes inside larger buffers (a band of rows of a taller
// tensor, with gaps after each plane) gives the same bits as run() on the
// dense planes. It writes nothing between the output planes and rejects
// views that do not fit their buffers. The cases cover the flat 1x1,
// depthwise, prepared-input and Winograd plans.
void test_views(std::mt19937* rng) {
  struct Case {
    const char* name;
    int64_t in, out, groups, kernel, stride, pad;
    bool dense;
    QuantKernel kernel_kind;
  };
  const Case cases[] = {
      {"1x1 lookup", 19, 20, 1, 1, 1, 0, false, QuantKernel::kLookup},
      {"1x1 accumulate", 9, 7, 1, 1, 1, 0, false, QuantKernel::kAccumulate},
      {"3x3 dw stride 2", 11, 11, 11, 3, 2, 1, false, QuantKernel::kLookup},
      {"3x3 dw no row padding", 6, 6, 6, 3, 1, 0, false,
       QuantKernel::kLookup},
      {"3x3 lookup", 5, 9, 1, 3, 1, 1, false, QuantKernel::kLookup},
      {"3x3 dense winograd", 8, 8, 1, 3, 1, 1, true, QuantKernel::kAuto},
      {"1x1 dense", 12, 16, 1, 1, 1, 0, true, QuantKernel::kAuto},
  };
  const int64_t height = 13, width = 18, tall = 29, top = 7;
  const int64_t in_gap = 5, out_gap = 3;
  for (const Case& c : cases) {
    ConvGeometry g;
    g.in_channels = c.in;
    g.out_channels = c.out;
    g.groups = c.groups;
    g.kernel_h = g.kernel_w = c.kernel;
    g.stride_h = g.stride_w = c.stride;
    g.pad_h = g.pad_w = c.pad;
    std::unique_ptr<Conv2d> conv;
    const QuantLayer layer =
        testing::random_quant_layer(g, 4, 0.3, Activation::kReLU6, rng);
    std::vector<float> weights;
    if (c.dense) {
      weights = testing::random_floats(testing::weight_count(g), -1, 1, rng);
      DenseConvDesc desc;
      desc.geometry = g;
      desc.weights = weights.data();
      desc.weights_size = static_cast<int64_t>(weights.size());
      desc.bias = layer.bias.data();
      desc.bias_size = c.out;
      desc.activation = Activation::kReLU;
      std::unique_ptr<DenseConv2d> dense;
      check(DenseConv2d::create(desc, Isa::kAuto, &dense).ok(),
            std::string("view ") + c.name + ": create failed");
      conv = std::move(dense);
    } else {
      std::unique_ptr<QuantConv2d> quant;
      check(QuantConv2d::create(layer.desc(), Isa::kAuto, &quant,
                                c.kernel_kind).ok(),
            std::string("view ") + c.name + ": create failed");
      conv = std::move(quant);
    }
    if (!conv) continue;
    const std::string context = std::string("view ") + c.name;
    int64_t out_h = 0, out_w = 0;
    conv_output_size(g, height, width, &out_h, &out_w);

    // Rows [top, top + height) of a tall tensor, planes in_gap apart more.
    const int64_t in_plane = tall * width + in_gap;
    const std::vector<float> big =
        testing::random_floats(c.in * in_plane, -1, 1, rng);
    std::vector<float> dense_input(c.in * height * width);
    for (int64_t ch = 0; ch < c.in; ++ch) {
      std::copy_n(big.begin() + ch * in_plane + top * width, height * width,
                  dense_input.begin() + ch * height * width);
    }
    const std::vector<float> expected =
        run_conv(*conv, dense_input, height, width, 1, context);

    const int64_t out_plane = out_h * out_w + out_gap;
    const float sentinel = 12345.0f;
    for (int threads : kThreads) {
      std::vector<float> output(c.out * out_plane, sentinel);
      ThreadPool pool(threads);
      const int64_t in_size = static_cast<int64_t>(big.size()) - top * width;
      Status status = conv->run_view(
          big.data() + top * width, in_size, in_plane, height, width,
          output.data(), static_cast<int64_t>(output.size()), out_plane,
          &pool);
      check(status.ok(), context + ": run_view failed: " + status.message());
      bool same = true, gaps_kept = true;
      for (int64_t o = 0; o < c.out; ++o) {
        for (int64_t i = 0; i < out_plane; ++i) {
          const float v = output[o * out_plane + i];
          if (i < out_h * out_w) {
            same = same && std::memcmp(&v, &expected[o * out_h * out_w + i],
                                       sizeof(float)) == 0;
          } else {
            gaps_kept = gaps_kept && v == sentinel;
          }
        }
      }
      check(same, context + ": run_view differs from run");
      check(gaps_kept, context + ": run_view wrote between output planes");

      // The plane distance must cover a plane, and the buffers all planes.
      expect_invalid(conv->run_view(big.data(), in_size, height * width - 1,
                                    height, width, output.data(),
                                    static_cast<int64_t>(output.size()),
                                    out_plane, &pool),
                     context + ": short input plane distance");
      expect_invalid(conv->run_view(big.data(), (c.in - 1) * in_plane,
                                    in_plane, height, width, output.data(),
                                    static_cast<int64_t>(output.size()),
                                    out_plane, &pool),
                     context + ": short input buffer");
      expect_invalid(conv->run_view(big.data(), in_size, in_plane, height,
                                    width, output.data(),
                                    static_cast<int64_t>(output.size()) -
                                        out_gap - 1,
                                    out_plane, &pool),
                     context + ": short output buffer");
    }
  }
}

void test_malformed_quant(std::mt19937* rng) {
  ConvGeometry base;
  base.out_channels = 4;
  base.in_channels = 6;
  base.groups = 2;
  base.kernel_h = base.kernel_w = 3;
  base.pad_h = base.pad_w = 1;
  const QuantLayer good =
      testing::random_quant_layer(base, 3, 0.3, Activation::kReLU, rng);

  struct GeometryCase {
    const char* name;
    void (*edit)(ConvGeometry*);
  };
  const GeometryCase geometry_cases[] = {
      {"zero out_channels", [](ConvGeometry* g) { g->out_channels = 0; }},
      {"negative in_channels", [](ConvGeometry* g) { g->in_channels = -6; }},
      {"zero groups", [](ConvGeometry* g) { g->groups = 0; }},
      {"groups not dividing", [](ConvGeometry* g) { g->groups = 4; }},
      {"zero kernel", [](ConvGeometry* g) { g->kernel_w = 0; }},
      {"negative kernel", [](ConvGeometry* g) { g->kernel_h = -3; }},
      {"zero stride", [](ConvGeometry* g) { g->stride_h = 0; }},
      {"zero dilation", [](ConvGeometry* g) { g->dilation_w = 0; }},
      {"negative pad", [](ConvGeometry* g) { g->pad_h = -1; }},
      {"absurd channels", [](ConvGeometry* g) { g->in_channels = 1LL << 40; }},
      {"absurd kernel", [](ConvGeometry* g) { g->kernel_h = 1LL << 33; }},
      {"int64 max stride",
       [](ConvGeometry* g) { g->stride_w = std::numeric_limits<int64_t>::max(); }},
      {"overflowing weight count",
       [](ConvGeometry* g) {
         g->out_channels = g->in_channels = 1 << 20;
         g->groups = 1;
         g->kernel_h = g->kernel_w = 1024;
       }},
  };
  for (const GeometryCase& c : geometry_cases) {
    QuantConvDesc desc = good.desc();
    c.edit(&desc.geometry);
    std::unique_ptr<QuantConv2d> conv;
    expect_invalid(QuantConv2d::create(desc, Isa::kScalar, &conv),
                   std::string("quant create, ") + c.name);
    check(conv == nullptr, std::string(c.name) + ": layer was created");
  }

  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> codebook_nonzero = good.codebook;
  codebook_nonzero[0] = 0.25f;
  std::vector<float> codebook_nan = good.codebook;
  codebook_nan[3] = nan;
  std::vector<float> scale_inf = good.scale;
  scale_inf[1] = std::numeric_limits<float>::infinity();
  std::vector<uint8_t> high_bits = good.packed;
  const int64_t used = (testing::weight_count(base) * 3) % 8;
  high_bits.back() |= static_cast<uint8_t>(0x80);
  check(used != 0, "malformed quant: the base layer needs a partial last byte");
  std::vector<uint8_t> longer = good.packed;
  longer.push_back(0);

  struct DescCase {
    const char* name;
    QuantConvDesc desc;
  };
  std::vector<DescCase> cases;
  auto add = [&](const char* name, auto edit) {
    QuantConvDesc desc = good.desc();
    edit(&desc);
    cases.push_back({name, desc});
  };
  add("bits 0", [](QuantConvDesc* d) { d->bits = 0; });
  add("bits 9", [](QuantConvDesc* d) { d->bits = 9; });
  add("bits negative", [](QuantConvDesc* d) { d->bits = -3; });
  add("bits 2 with a 3-bit stream", [](QuantConvDesc* d) { d->bits = 2; });
  add("codebook null", [](QuantConvDesc* d) { d->codebook = nullptr; });
  add("codebook too short", [](QuantConvDesc* d) { d->codebook_size = 7; });
  add("codebook entry 0 not zero",
      [&](QuantConvDesc* d) { d->codebook = codebook_nonzero.data(); });
  add("codebook nan", [&](QuantConvDesc* d) { d->codebook = codebook_nan.data(); });
  add("indices null", [](QuantConvDesc* d) { d->indices = nullptr; });
  add("indices one byte short", [](QuantConvDesc* d) { d->indices_size -= 1; });
  add("indices empty", [](QuantConvDesc* d) { d->indices_size = 0; });
  add("indices negative size", [](QuantConvDesc* d) { d->indices_size = -1; });
  add("indices one byte long", [&](QuantConvDesc* d) {
    d->indices = longer.data();
    d->indices_size = static_cast<int64_t>(longer.size());
  });
  add("indices high bits set",
      [&](QuantConvDesc* d) { d->indices = high_bits.data(); });
  add("scale null", [](QuantConvDesc* d) { d->scale = nullptr; });
  add("scale too short", [](QuantConvDesc* d) { d->scale_size = 3; });
  add("scale infinite", [&](QuantConvDesc* d) { d->scale = scale_inf.data(); });
  add("bias null", [](QuantConvDesc* d) { d->bias = nullptr; });
  add("bias too long", [](QuantConvDesc* d) { d->bias_size = 5; });
  add("activation out of range",
      [](QuantConvDesc* d) { d->activation = static_cast<Activation>(7); });
  for (const DescCase& c : cases) {
    std::unique_ptr<QuantConv2d> conv;
    expect_invalid(QuantConv2d::create(c.desc, Isa::kScalar, &conv),
                   std::string("quant create, ") + c.name);
  }

  std::unique_ptr<QuantConv2d> bad_kernel;
  expect_invalid(QuantConv2d::create(good.desc(), Isa::kScalar, &bad_kernel,
                                     static_cast<QuantKernel>(5)),
                 "quant create, kernel out of range");

  // Unsupported instruction set on this machine.
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (isa_supported(isa)) continue;
    std::unique_ptr<QuantConv2d> conv;
    Status status = QuantConv2d::create(good.desc(), isa, &conv);
    check(status.code() == StatusCode::kUnsupported,
          std::string("quant create with unsupported ") + isa_name(isa));
  }
}

// kAuto picks the accumulate kernel from kAccumulateMinSparsity pruned
// weights on, else the lookup kernel.
void test_kernel_choice(std::mt19937* rng) {
  ConvGeometry g;
  g.out_channels = 8;
  g.in_channels = 16;
  g.kernel_h = g.kernel_w = 3;
  const struct {
    double sparsity;
    QuantKernel expected;
  } cases[] = {{0.0, QuantKernel::kLookup},
               {0.2, QuantKernel::kLookup},
               {0.8, QuantKernel::kAccumulate},
               {1.0, QuantKernel::kAccumulate}};
  for (const auto& c : cases) {
    const QuantLayer layer =
        testing::random_quant_layer(g, 2, c.sparsity, Activation::kNone, rng);
    std::unique_ptr<QuantConv2d> conv;
    check(QuantConv2d::create(layer.desc(), Isa::kAuto, &conv).ok(),
          "kernel choice: create failed");
    if (!conv) continue;
    check(conv->kernel() == c.expected,
          "kernel choice: sparsity " + format(conv->sparsity()) + " chose " +
              quant_kernel_name(conv->kernel()));
  }
}

void test_malformed_run(std::mt19937* rng) {
  ConvGeometry g;
  g.out_channels = 3;
  g.in_channels = 4;
  g.kernel_h = g.kernel_w = 5;
  g.dilation_h = 2;
  const QuantLayer layer =
      testing::random_quant_layer(g, 2, 0.3, Activation::kNone, rng);
  std::unique_ptr<QuantConv2d> conv;
  check(QuantConv2d::create(layer.desc(), Isa::kAuto, &conv).ok(),
        "malformed run: create failed");
  if (!conv) return;

  std::vector<float> input(4 * 12 * 12, 1.0f);
  std::vector<float> output(3 * 4 * 8, 0.0f);  // out 4x8 for input 12x12
  ThreadPool pool(2);
  auto run = [&](const float* in, int64_t in_size, int64_t h, int64_t w,
                 float* out, int64_t out_size) {
    return conv->run(in, in_size, h, w, out, out_size, &pool);
  };
  check(run(input.data(), 576, 12, 12, output.data(), 96).ok(),
        "malformed run: the valid call failed");
  expect_invalid(run(input.data(), 576, 0, 12, output.data(), 96),
                 "run, zero height");
  expect_invalid(run(input.data(), 576, 12, -4, output.data(), 96),
                 "run, negative width");
  expect_invalid(run(input.data(), 576, 8, 72, output.data(), 96),
                 "run, input shorter than the dilated kernel");
  expect_invalid(run(input.data(), 575, 12, 12, output.data(), 96),
                 "run, input size mismatch");
  expect_invalid(run(nullptr, 576, 12, 12, output.data(), 96),
                 "run, null input");
  expect_invalid(run(input.data(), 576, 12, 12, output.data(), 95),
                 "run, output size mismatch");
  expect_invalid(run(input.data(), 576, 12, 12, nullptr, 96),
                 "run, null output");
  expect_invalid(run(input.data(), 576, int64_t(1) << 40, 12, output.data(), 96),
                 "run, absurd height");
  // 4 x 2^20 x 2^20 padded inputs exceed the int32 offset range.
  expect_invalid(run(input.data(), 576, int64_t(1) << 20, int64_t(1) << 20,
                     output.data(), 96),
                 "run, padded input too large");
  check(run(input.data(), 576, 12, 12, output.data(), 96).ok(),
        "malformed run: the valid call failed after errors");
}

void test_malformed_dense() {
  ConvGeometry g;
  g.out_channels = 2;
  g.in_channels = 3;
  std::vector<float> weights(6, 0.5f);
  std::vector<float> bias(2, 0.0f);
  DenseConvDesc good;
  good.geometry = g;
  good.weights = weights.data();
  good.weights_size = 6;
  good.bias = bias.data();
  good.bias_size = 2;
  std::unique_ptr<DenseConv2d> conv;
  check(DenseConv2d::create(good, Isa::kAuto, &conv).ok(),
        "dense create with a valid description failed");

  DenseConvDesc d = good;
  d.weights_size = 5;
  expect_invalid(DenseConv2d::create(d, Isa::kAuto, &conv), "dense, short weights");
  d = good;
  d.weights = nullptr;
  expect_invalid(DenseConv2d::create(d, Isa::kAuto, &conv), "dense, null weights");
  d = good;
  d.bias_size = 3;
  expect_invalid(DenseConv2d::create(d, Isa::kAuto, &conv), "dense, long bias");
  d = good;
  d.bias = nullptr;
  expect_invalid(DenseConv2d::create(d, Isa::kAuto, &conv),
                 "dense, null bias with a nonzero size");
  d = good;
  std::vector<float> nan_weights = weights;
  nan_weights[4] = std::numeric_limits<float>::quiet_NaN();
  d.weights = nan_weights.data();
  expect_invalid(DenseConv2d::create(d, Isa::kAuto, &conv), "dense, nan weight");
  d = good;
  d.geometry.groups = 2;
  expect_invalid(DenseConv2d::create(d, Isa::kAuto, &conv),
                 "dense, groups not dividing");
  std::vector<float> scale = {1.0f, std::numeric_limits<float>::infinity()};
  d = good;
  d.scale = scale.data();
  d.scale_size = 1;
  expect_invalid(DenseConv2d::create(d, Isa::kAuto, &conv), "dense, short scale");
  d.scale_size = 2;
  expect_invalid(DenseConv2d::create(d, Isa::kAuto, &conv), "dense, inf scale");
  d.scale = nullptr;
  expect_invalid(DenseConv2d::create(d, Isa::kAuto, &conv),
                 "dense, null scale with a nonzero size");
}

void test_c_api() {
  dgms_conv_geometry g = {2, 2, 1, 1, 1, 1, 1, 0, 0, 1, 1};
  const float codebook[2] = {0.0f, 2.0f};
  const uint8_t indices[1] = {0x9};  // weights [[1, 0], [0, 1]]
  const float scale[2] = {1.0f, 0.5f};
  const float bias[2] = {0.0f, 1.0f};
  dgms_conv* conv = nullptr;
  check(dgms_quant_conv_create(&g, 1, codebook, 2, indices, 1, scale, 2, bias,
                               2, 0, 0, 2, &conv) == DGMS_OK,
        std::string("c api create failed: ") + dgms_last_error());
  if (conv == nullptr) return;
  check(dgms_conv_quant_kernel(conv) == 2, "c api quant kernel is not lookup");

  dgms_thread_pool* pool = nullptr;
  check(dgms_thread_pool_create(3, &pool) == DGMS_OK, "c api pool create");
  const float input[2] = {3.0f, -4.0f};
  float output[2] = {0.0f, 0.0f};
  check(dgms_conv_run(conv, input, 2, 1, 1, output, 2, pool) == DGMS_OK,
        std::string("c api run failed: ") + dgms_last_error());
  check(output[0] == 6.0f && output[1] == -3.0f,
        "c api output is " + std::to_string(output[0]) + ", " +
            std::to_string(output[1]) + ", expected 6, -3");

  check(dgms_conv_run(conv, input, 2, 1, 1, output, 3, pool) ==
                DGMS_INVALID_ARGUMENT &&
            std::strstr(dgms_last_error(), "output") != nullptr,
        "c api run with a wrong output size");
  check(dgms_thread_pool_create(0, &pool) == DGMS_INVALID_ARGUMENT,
        "c api pool with zero threads");

  dgms_conv* bad = nullptr;
  check(dgms_quant_conv_create(&g, 1, codebook, 2, indices, 1, scale, 2, bias,
                               2, 0, 9, 0, &bad) == DGMS_INVALID_ARGUMENT &&
            bad == nullptr,
        "c api create with isa 9");

  dgms_thread_pool_destroy(pool);
  dgms_conv_destroy(conv);
}

void test_unpack_indices(std::mt19937* rng) {
  ConvGeometry g;
  g.out_channels = 3;
  g.in_channels = 5;
  g.kernel_h = 3;
  g.kernel_w = 1;
  for (int bits = 1; bits <= 8; ++bits) {
    const QuantLayer layer =
        testing::random_quant_layer(g, bits, 0.2, Activation::kNone, rng);
    std::vector<uint8_t> unpacked;
    const Status status = unpack_indices(layer.desc(), &unpacked);
    check(status.ok() && unpacked == layer.indices,
          "unpack_indices round trip, bits=" + std::to_string(bits));
  }
  // Index j = 1 at 3 bits sits in stream bits [3, 6): byte 0 = 0b00111000.
  ConvGeometry two;
  two.out_channels = 1;
  two.in_channels = 2;
  QuantLayer layer = testing::random_quant_layer(two, 3, 0.0, Activation::kNone, rng);
  layer.packed = {0x38};
  std::vector<uint8_t> unpacked;
  unpack_indices(layer.desc(), &unpacked);
  check(unpacked == std::vector<uint8_t>({0, 7}),
        "unpack_indices reads LSB-first");
}

// Draws a small random geometry and input size whose output is not empty.
Shape random_shape(std::mt19937* rng) {
  auto uniform = [&](int64_t low, int64_t high) {
    return std::uniform_int_distribution<int64_t>(low, high)(*rng);
  };
  Shape shape{};
  shape.name = "random";
  const int64_t kind = uniform(0, 3);
  if (kind == 0) {  // depthwise, channel multiplier 1 or 2
    shape.in_channels = shape.groups = uniform(1, 9);
    shape.out_channels = shape.in_channels * uniform(1, 2);
  } else {
    shape.groups = kind == 1 ? uniform(2, 3) : 1;
    shape.in_channels = shape.groups * uniform(1, 7);
    shape.out_channels = shape.groups * uniform(1, 9);
  }
  shape.kernel_h = uniform(1, 5);
  shape.kernel_w = uniform(1, 5);
  shape.stride_h = uniform(1, 3);
  shape.stride_w = uniform(1, 3);
  shape.pad_h = uniform(0, 3);
  shape.pad_w = uniform(0, 3);
  shape.dilation_h = uniform(1, 3);
  shape.dilation_w = uniform(1, 3);
  const int64_t min_h = std::max<int64_t>(
      1, shape.dilation_h * (shape.kernel_h - 1) + 1 - 2 * shape.pad_h);
  const int64_t min_w = std::max<int64_t>(
      1, shape.dilation_w * (shape.kernel_w - 1) + 1 - 2 * shape.pad_w);
  shape.height = min_h + uniform(0, 12);
  shape.width = min_w + uniform(0, 20);
  return shape;
}

std::string describe(const Shape& s) {
  char text[160];
  std::snprintf(text, sizeof(text),
                "C%lld O%lld G%lld k%lldx%lld s%lldx%lld p%lldx%lld "
                "d%lldx%lld in %lldx%lld",
                (long long)s.in_channels, (long long)s.out_channels,
                (long long)s.groups, (long long)s.kernel_h,
                (long long)s.kernel_w, (long long)s.stride_h,
                (long long)s.stride_w, (long long)s.pad_h, (long long)s.pad_w,
                (long long)s.dilation_h, (long long)s.dilation_w,
                (long long)s.height, (long long)s.width);
  return text;
}

// Random small geometries, bits, sparsities and thread counts: the scalar
// kernel against the naive conv, and every SIMD path bit-identical to it.
void test_random_layers(std::mt19937* rng, int cases) {
  for (int i = 0; i < cases; ++i) {
    const Shape shape = random_shape(rng);
    const ConvGeometry g = shape.geometry();
    const int bits = std::uniform_int_distribution<int>(1, 8)(*rng);
    const double sparsity = std::uniform_real_distribution<double>(0, 1)(*rng);
    const int threads = std::uniform_int_distribution<int>(1, 4)(*rng);
    const Activation activation = static_cast<Activation>(i % 3);
    const std::string context = "random layer " + describe(shape) +
                                " bits=" + std::to_string(bits) +
                                " threads=" + std::to_string(threads);

    const QuantLayer layer =
        testing::random_quant_layer(g, bits, sparsity, activation, rng);
    const std::vector<float> input = testing::random_floats(
        g.in_channels * shape.height * shape.width, -2.0f, 2.0f, rng);
    check_quant_layer(layer, input, shape.height, shape.width, {threads},
                      context);
    check_dense_layer(g, input, shape.height, shape.width, activation,
                      i % 2 == 0, i % 3 == 1, {threads}, context + " dense",
                      rng);
  }
}

// Layer descriptions and run arguments with one field set to an extreme
// value: every call returns a status, and an accepted layer runs. The
// sanitizer build turns any out-of-bounds access or overflow into a
// failure.
void test_extreme_values(std::mt19937* rng, int cases) {
  const int64_t extremes[] = {0,
                              -1,
                              -7,
                              1,
                              2,
                              3,
                              1000,
                              int64_t(1) << 31,
                              int64_t(1) << 40,
                              std::numeric_limits<int64_t>::max(),
                              std::numeric_limits<int64_t>::min()};
  const int64_t run_sides[] = {0, -1, 1, 3, 7, int64_t(1) << 40,
                               std::numeric_limits<int64_t>::max(),
                               std::numeric_limits<int64_t>::min()};
  std::vector<float> input(12 * 7 * 7, 0.5f);
  std::vector<float> output(1 << 16, 0.0f);
  auto pick = [&](auto& values) {
    const size_t n = sizeof(values) / sizeof(values[0]);
    return values[std::uniform_int_distribution<size_t>(0, n - 1)(*rng)];
  };

  int accepted = 0;
  for (int i = 0; i < cases; ++i) {
    Shape shape{};
    shape.name = "extreme";
    shape.in_channels = 6;
    shape.out_channels = 4;
    shape.groups = 2;
    shape.kernel_h = shape.kernel_w = 3;
    shape.stride_h = shape.stride_w = 1;
    shape.pad_h = shape.pad_w = 1;
    shape.dilation_h = shape.dilation_w = 1;
    const QuantLayer layer = testing::random_quant_layer(
        shape.geometry(), 3, 0.3, Activation::kNone, rng);
    QuantConvDesc desc = layer.desc();
    int64_t* fields[] = {&desc.geometry.out_channels, &desc.geometry.in_channels,
                         &desc.geometry.groups,       &desc.geometry.kernel_h,
                         &desc.geometry.kernel_w,     &desc.geometry.stride_h,
                         &desc.geometry.stride_w,     &desc.geometry.pad_h,
                         &desc.geometry.pad_w,        &desc.geometry.dilation_h,
                         &desc.geometry.dilation_w,   &desc.codebook_size,
                         &desc.indices_size,          &desc.scale_size,
                         &desc.bias_size};
    const size_t field = std::uniform_int_distribution<size_t>(0, 15)(*rng);
    if (field < 15) {
      *fields[field] = pick(extremes);
    } else {
      desc.bits = static_cast<int>(pick(extremes));
    }

    std::unique_ptr<QuantConv2d> conv;
    const Status status = QuantConv2d::create(desc, Isa::kAuto, &conv);
    check(status.ok() || !status.message().empty(),
          "extreme values: an error without a message");
    if (!status.ok()) continue;
    ++accepted;

    const int64_t height = pick(run_sides);
    const int64_t width = pick(run_sides);
    int64_t out_h = 0;
    int64_t out_w = 0;
    const bool small = height >= 1 && height <= 7 && width >= 1 && width <= 7;
    const bool sized =
        small && conv_output_size(conv->geometry(), height, width, &out_h,
                                  &out_w).ok();
    const int64_t in_size =
        sized ? conv->geometry().in_channels * height * width : 1;
    const int64_t out_size =
        sized ? conv->geometry().out_channels * out_h * out_w : 1;
    if (in_size > static_cast<int64_t>(input.size()) ||
        out_size > static_cast<int64_t>(output.size())) {
      continue;
    }
    const Status run_status = conv->run(input.data(), in_size, height, width,
                                        output.data(), out_size, nullptr);
    check(run_status.ok() == sized,
          "extreme values: run with " + std::to_string(height) + "x" +
              std::to_string(width) + " returned '" + run_status.message() +
              "'");
  }
  check(accepted > 0, "extreme values: no mutated layer was accepted");
}

void test_thread_pool() {
  for (int threads : {1, 3}) {
    ThreadPool pool(threads);
    for (int64_t count : {0, 1, 2, 1000}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(count));
      for (auto& h : hits) h.store(0);
      for (int repeat = 0; repeat < 3; ++repeat) {
        pool.parallel_for(count, [&](int64_t i) { hits[i].fetch_add(1); });
      }
      bool all_three = true;
      for (auto& h : hits) all_three = all_three && h.load() == 3;
      check(all_three, "thread pool threads=" + std::to_string(threads) +
                           " count=" + std::to_string(count) +
                           ": every index must run once per loop");
    }
  }
  // Loops back to back find the workers spinning, and loops after a pause
  // longer than the spin find them asleep. A pool destroyed right after a
  // loop stops workers that are still spinning.
  for (int pause_us : {0, 2000}) {
    ThreadPool pool(3);
    std::vector<std::atomic<int>> hits(64);
    for (auto& h : hits) h.store(0);
    for (int repeat = 0; repeat < 20; ++repeat) {
      if (pause_us > 0) {
        std::this_thread::sleep_for(std::chrono::microseconds(pause_us));
      }
      pool.parallel_for(64, [&](int64_t i) { hits[i].fetch_add(1); });
    }
    bool all = true;
    for (auto& h : hits) all = all && h.load() == 20;
    check(all, "thread pool with pauses of " + std::to_string(pause_us) +
                   " us: every index must run once per loop");
  }
  for (int repeat = 0; repeat < 20; ++repeat) {
    ThreadPool pool(2);
    std::atomic<int> sum{0};
    pool.parallel_for(8, [&](int64_t i) { sum.fetch_add(int(i)); });
    check(sum.load() == 28, "thread pool destroyed after one loop");
  }
}

}  // namespace

int main() {
  std::mt19937 rng(20240611);
  std::printf("dgms_runtime_tests: best isa %s, SIMD paths tested:",
              isa_name(resolve_isa(Isa::kAuto)));
  for (Isa isa : simd_isas()) std::printf(" %s", isa_name(isa));
  std::printf("\n");

  test_thread_pool();
  test_unpack_indices(&rng);
  test_quant_kernels(&rng);
  test_dense_kernels(&rng);
  test_winograd(&rng);
  test_quant_winograd(&rng);
  test_shape_change(&rng);
  test_depthwise_padding_reuse(&rng);
  test_views(&rng);
  test_malformed_quant(&rng);
  test_kernel_choice(&rng);
  test_malformed_run(&rng);
  test_malformed_dense();
  test_c_api();
  test_random_layers(&rng, 300);
  test_extreme_values(&rng, 400);

  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
