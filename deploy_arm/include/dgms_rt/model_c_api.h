/* C API of the packed-model runtime (dgms_rt/model.h), for ctypes.
 *
 * Functions that can fail return a dgms_model_status (0 on success); the
 * calling thread's last error message is dgms_model_last_error(). */
#ifndef DGMS_RT_MODEL_C_API_H_
#define DGMS_RT_MODEL_C_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int dgms_model_status; /* 0 ok, 1 invalid argument, 2 unsupported,
                                  3 out of memory */
typedef struct dgms_model dgms_model;

const char* dgms_model_last_error(void);

/* Loads and validates a packed file; threads is the conv thread count. */
dgms_model_status dgms_model_load(const char* path, int threads,
                                  dgms_model** out);
dgms_model_status dgms_model_load_buffer(const uint8_t* data, int64_t size,
                                         int threads, dgms_model** out);
/* The same with the largest Winograd filters, in bytes, that a quantized
 * 3x3 stride-1 layer keeps (ModelOptions::quant_winograd_max_bytes, whose
 * default the two functions above use): 0 runs the codebook kernels only,
 * and a negative value fails the load. */
dgms_model_status dgms_model_load_ex(const char* path, int threads,
                                     int64_t quant_winograd_max_bytes,
                                     dgms_model** out);
dgms_model_status dgms_model_load_buffer_ex(const uint8_t* data, int64_t size,
                                            int threads,
                                            int64_t quant_winograd_max_bytes,
                                            dgms_model** out);
void dgms_model_destroy(dgms_model* model);

/* "single_stage" or "two_stage" (valid until destroy). */
const char* dgms_model_kind(const dgms_model* model);

/* Detects objects in one preprocessed image: input is (3, height, width)
 * float32 (normalised and padded), img_height/img_width the resized size
 * before padding, scale_w/scale_h the resize factors. With rescale != 0
 * boxes are in original-image pixels. Writes up to capacity detections
 * as 6 floats each (x1, y1, x2, y2, score, label) and their number to
 * *count; fails when capacity is too small, naming the count needed. */
dgms_model_status dgms_model_detect(const dgms_model* model,
                                    const float* input, int64_t height,
                                    int64_t width, int64_t img_height,
                                    int64_t img_width, double scale_w,
                                    double scale_h, int rescale, float* out,
                                    int64_t capacity, int64_t* count);

#ifdef __cplusplus
}
#endif

#endif /* DGMS_RT_MODEL_C_API_H_ */
