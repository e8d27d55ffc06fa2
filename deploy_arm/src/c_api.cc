#include "dgms_rt/c_api.h"

#include <exception>
#include <memory>
#include <new>
#include <string>

#include "dgms_rt/conv.h"

struct dgms_thread_pool {
  std::unique_ptr<dgms_rt::ThreadPool> pool;
};

struct dgms_conv {
  std::unique_ptr<dgms_rt::Conv2d> conv;
};

namespace {

thread_local std::string last_error;

dgms_status report(const dgms_rt::Status& status) {
  if (status.ok()) {
    last_error.clear();
    return DGMS_OK;
  }
  last_error = status.message();
  return static_cast<dgms_status>(status.code());
}

dgms_status fail(dgms_status code, const std::string& message) {
  last_error = message;
  return code;
}

bool valid_isa(int isa) { return isa >= 0 && isa <= 4; }

dgms_rt::ConvGeometry to_geometry(const dgms_conv_geometry& g) {
  dgms_rt::ConvGeometry out;
  out.out_channels = g.out_channels;
  out.in_channels = g.in_channels;
  out.groups = g.groups;
  out.kernel_h = g.kernel_h;
  out.kernel_w = g.kernel_w;
  out.stride_h = g.stride_h;
  out.stride_w = g.stride_w;
  out.pad_h = g.pad_h;
  out.pad_w = g.pad_w;
  out.dilation_h = g.dilation_h;
  out.dilation_w = g.dilation_w;
  return out;
}

}  // namespace

extern "C" {

const char* dgms_last_error(void) { return last_error.c_str(); }

int dgms_isa_supported(int isa) {
  return valid_isa(isa) && dgms_rt::isa_supported(static_cast<dgms_rt::Isa>(isa));
}

int dgms_best_isa(void) {
  return static_cast<int>(dgms_rt::resolve_isa(dgms_rt::Isa::kAuto));
}

const char* dgms_isa_name(int isa) {
  return valid_isa(isa) ? dgms_rt::isa_name(static_cast<dgms_rt::Isa>(isa))
                        : "unknown";
}

dgms_status dgms_thread_pool_create(int num_threads, dgms_thread_pool** out) {
  if (out == nullptr) return fail(DGMS_INVALID_ARGUMENT, "out is null");
  if (num_threads < 1 || num_threads > dgms_rt::ThreadPool::kMaxThreads) {
    return fail(DGMS_INVALID_ARGUMENT,
                "num_threads is " + std::to_string(num_threads) +
                    ", expected a value in [1, " +
                    std::to_string(dgms_rt::ThreadPool::kMaxThreads) + "]");
  }
  try {
    auto handle = std::make_unique<dgms_thread_pool>();
    handle->pool = std::make_unique<dgms_rt::ThreadPool>(num_threads);
    *out = handle.release();
    return DGMS_OK;
  } catch (const std::bad_alloc&) {
    return fail(DGMS_OUT_OF_MEMORY, "out of memory creating a thread pool");
  } catch (const std::exception& e) {
    return fail(DGMS_UNSUPPORTED,
                std::string("failed to start worker threads: ") + e.what());
  }
}

void dgms_thread_pool_destroy(dgms_thread_pool* pool) { delete pool; }

dgms_status dgms_quant_conv_create(
    const dgms_conv_geometry* geometry, int bits, const float* codebook,
    int64_t codebook_size, const uint8_t* indices, int64_t indices_size,
    const float* scale, int64_t scale_size, const float* bias,
    int64_t bias_size, int activation, int isa, int kernel, dgms_conv** out) {
  if (geometry == nullptr || out == nullptr) {
    return fail(DGMS_INVALID_ARGUMENT, "geometry or out is null");
  }
  if (!valid_isa(isa)) {
    return fail(DGMS_INVALID_ARGUMENT,
                "isa is " + std::to_string(isa) +
                    ", expected 0 (auto), 1 (scalar), 2 (avx2), 3 (neon) or 4 (avx512)");
  }
  dgms_rt::QuantConvDesc desc;
  desc.geometry = to_geometry(*geometry);
  desc.bits = bits;
  desc.codebook = codebook;
  desc.codebook_size = codebook_size;
  desc.indices = indices;
  desc.indices_size = indices_size;
  desc.scale = scale;
  desc.scale_size = scale_size;
  desc.bias = bias;
  desc.bias_size = bias_size;
  desc.activation = static_cast<dgms_rt::Activation>(activation);

  std::unique_ptr<dgms_rt::QuantConv2d> conv;
  dgms_rt::Status status = dgms_rt::QuantConv2d::create(
      desc, static_cast<dgms_rt::Isa>(isa), &conv,
      static_cast<dgms_rt::QuantKernel>(kernel));
  if (!status.ok()) return report(status);
  try {
    *out = new dgms_conv{std::move(conv)};
  } catch (const std::bad_alloc&) {
    return fail(DGMS_OUT_OF_MEMORY, "out of memory creating a layer handle");
  }
  return DGMS_OK;
}

dgms_status dgms_dense_conv_create(const dgms_conv_geometry* geometry,
                                   const float* weights, int64_t weights_size,
                                   const float* bias, int64_t bias_size,
                                   int activation, int isa, dgms_conv** out) {
  if (geometry == nullptr || out == nullptr) {
    return fail(DGMS_INVALID_ARGUMENT, "geometry or out is null");
  }
  if (!valid_isa(isa)) {
    return fail(DGMS_INVALID_ARGUMENT,
                "isa is " + std::to_string(isa) +
                    ", expected 0 (auto), 1 (scalar), 2 (avx2), 3 (neon) or 4 (avx512)");
  }
  dgms_rt::DenseConvDesc desc;
  desc.geometry = to_geometry(*geometry);
  desc.weights = weights;
  desc.weights_size = weights_size;
  desc.bias = bias;
  desc.bias_size = bias_size;
  desc.activation = static_cast<dgms_rt::Activation>(activation);

  std::unique_ptr<dgms_rt::DenseConv2d> conv;
  dgms_rt::Status status = dgms_rt::DenseConv2d::create(
      desc, static_cast<dgms_rt::Isa>(isa), &conv);
  if (!status.ok()) return report(status);
  try {
    *out = new dgms_conv{std::move(conv)};
  } catch (const std::bad_alloc&) {
    return fail(DGMS_OUT_OF_MEMORY, "out of memory creating a layer handle");
  }
  return DGMS_OK;
}

void dgms_conv_destroy(dgms_conv* conv) { delete conv; }

int dgms_conv_isa(const dgms_conv* conv) {
  return conv != nullptr ? static_cast<int>(conv->conv->isa()) : 0;
}

int dgms_conv_quant_kernel(const dgms_conv* conv) {
  if (conv == nullptr) return 0;
  const auto* quant = dynamic_cast<const dgms_rt::QuantConv2d*>(conv->conv.get());
  return quant != nullptr ? static_cast<int>(quant->kernel()) : 0;
}

dgms_status dgms_conv_output_size(const dgms_conv* conv, int64_t height,
                                  int64_t width, int64_t* out_height,
                                  int64_t* out_width) {
  if (conv == nullptr || out_height == nullptr || out_width == nullptr) {
    return fail(DGMS_INVALID_ARGUMENT, "conv, out_height or out_width is null");
  }
  return report(dgms_rt::conv_output_size(conv->conv->geometry(), height,
                                          width, out_height, out_width));
}

dgms_status dgms_conv_run(const dgms_conv* conv, const float* input,
                          int64_t input_size, int64_t height, int64_t width,
                          float* output, int64_t output_size,
                          dgms_thread_pool* pool) {
  if (conv == nullptr) return fail(DGMS_INVALID_ARGUMENT, "conv is null");
  return report(conv->conv->run(input, input_size, height, width, output,
                                output_size,
                                pool != nullptr ? pool->pool.get() : nullptr));
}

}  // extern "C"
