/* C API of the DGMS mobile runtime, for ctypes and other FFI callers.
 *
 * Every function that can fail returns a dgms_status (0 on success); the
 * message of the calling thread's last failure is returned by
 * dgms_last_error(). Tensors are float32 NCHW with batch 1; sizes are
 * element counts. Layer descriptions follow dgms_rt/conv.h. */
#ifndef DGMS_RT_C_API_H_
#define DGMS_RT_C_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  DGMS_OK = 0,
  DGMS_INVALID_ARGUMENT = 1,
  DGMS_UNSUPPORTED = 2,
  DGMS_OUT_OF_MEMORY = 3,
} dgms_status;

/* Instruction sets: 0 auto, 1 scalar, 2 avx2, 3 neon, 4 avx512.
 * Activations: 0 none, 1 ReLU, 2 ReLU6.
 * Quantized kernels: 0 auto, 1 accumulate, 2 lookup (see QuantKernel). */

typedef struct {
  int64_t out_channels, in_channels, groups;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
} dgms_conv_geometry;

typedef struct dgms_thread_pool dgms_thread_pool;
typedef struct dgms_conv dgms_conv;

/* Message of the calling thread's last failed call ("" when none). */
const char* dgms_last_error(void);

/* 1 when the instruction set is available in this build and CPU. */
int dgms_isa_supported(int isa);
/* The instruction set that isa 0 (auto) selects. */
int dgms_best_isa(void);
const char* dgms_isa_name(int isa);

dgms_status dgms_thread_pool_create(int num_threads, dgms_thread_pool** out);
void dgms_thread_pool_destroy(dgms_thread_pool* pool);

/* Creates a quantized conv layer; see QuantConvDesc for the fields. */
dgms_status dgms_quant_conv_create(
    const dgms_conv_geometry* geometry, int bits, const float* codebook,
    int64_t codebook_size, const uint8_t* indices, int64_t indices_size,
    const float* scale, int64_t scale_size, const float* bias,
    int64_t bias_size, int activation, int isa, int kernel, dgms_conv** out);

/* Creates a dense FP32 conv layer; bias may be NULL with bias_size 0. */
dgms_status dgms_dense_conv_create(const dgms_conv_geometry* geometry,
                                   const float* weights, int64_t weights_size,
                                   const float* bias, int64_t bias_size,
                                   int activation, int isa, dgms_conv** out);

void dgms_conv_destroy(dgms_conv* conv);

/* The instruction set the layer's kernels use (never 0). */
int dgms_conv_isa(const dgms_conv* conv);
/* The quantized kernel the layer uses (1 or 2), or 0 for a dense layer. */
int dgms_conv_quant_kernel(const dgms_conv* conv);

dgms_status dgms_conv_output_size(const dgms_conv* conv, int64_t height,
                                  int64_t width, int64_t* out_height,
                                  int64_t* out_width);

/* Runs the layer; pool may be NULL for a single thread. */
dgms_status dgms_conv_run(const dgms_conv* conv, const float* input,
                          int64_t input_size, int64_t height, int64_t width,
                          float* output, int64_t output_size,
                          dgms_thread_pool* pool);

#ifdef __cplusplus
}
#endif

#endif /* DGMS_RT_C_API_H_ */
