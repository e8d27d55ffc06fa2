#include "dgms_rt/model_c_api.h"

#include <memory>
#include <new>
#include <string>

#include "dgms_rt/model.h"

struct dgms_model {
  std::unique_ptr<dgms_rt::Model> model;
};

namespace {
thread_local std::string last_error;

dgms_model_status report(const dgms_rt::Status& status) {
  last_error = status.ok() ? std::string() : status.message();
  return static_cast<dgms_model_status>(status.code());
}

dgms_model_status finish_load(const dgms_rt::Status& status,
                              std::unique_ptr<dgms_rt::Model> model,
                              dgms_model** out) {
  if (!status.ok()) return report(status);
  dgms_model* handle = new (std::nothrow) dgms_model;
  if (handle == nullptr)
    return report(dgms_rt::Status(dgms_rt::StatusCode::kOutOfMemory,
                                  "out of memory"));
  handle->model = std::move(model);
  *out = handle;
  return report(dgms_rt::Status::Ok());
}
}  // namespace

extern "C" {

const char* dgms_model_last_error(void) { return last_error.c_str(); }

dgms_model_status dgms_model_load_ex(const char* path, int threads,
                                     int64_t quant_winograd_max_bytes,
                                     dgms_model** out) {
  if (path == nullptr || out == nullptr)
    return report(dgms_rt::Status(dgms_rt::StatusCode::kInvalidArgument,
                                  "path and out must not be null"));
  dgms_rt::ModelOptions options;
  options.threads = threads;
  options.quant_winograd_max_bytes = quant_winograd_max_bytes;
  std::unique_ptr<dgms_rt::Model> model;
  try {
    dgms_rt::Status status = dgms_rt::Model::load_file(path, options, &model);
    return finish_load(status, std::move(model), out);
  } catch (const std::bad_alloc&) {
    return report(dgms_rt::Status(dgms_rt::StatusCode::kOutOfMemory,
                                  "out of memory loading the model"));
  }
}

dgms_model_status dgms_model_load(const char* path, int threads,
                                  dgms_model** out) {
  return dgms_model_load_ex(path, threads,
                            dgms_rt::ModelOptions().quant_winograd_max_bytes,
                            out);
}

dgms_model_status dgms_model_load_buffer_ex(const uint8_t* data, int64_t size,
                                            int threads,
                                            int64_t quant_winograd_max_bytes,
                                            dgms_model** out) {
  if ((data == nullptr && size != 0) || size < 0 || out == nullptr)
    return report(dgms_rt::Status(dgms_rt::StatusCode::kInvalidArgument,
                                  "data, size or out is invalid"));
  dgms_rt::ModelOptions options;
  options.threads = threads;
  options.quant_winograd_max_bytes = quant_winograd_max_bytes;
  std::unique_ptr<dgms_rt::Model> model;
  try {
    dgms_rt::Status status = dgms_rt::Model::load_buffer(
        data, size_t(size), "packed data", options, &model);
    return finish_load(status, std::move(model), out);
  } catch (const std::bad_alloc&) {
    return report(dgms_rt::Status(dgms_rt::StatusCode::kOutOfMemory,
                                  "out of memory loading the model"));
  }
}

dgms_model_status dgms_model_load_buffer(const uint8_t* data, int64_t size,
                                         int threads, dgms_model** out) {
  return dgms_model_load_buffer_ex(
      data, size, threads, dgms_rt::ModelOptions().quant_winograd_max_bytes,
      out);
}

void dgms_model_destroy(dgms_model* model) { delete model; }

const char* dgms_model_kind(const dgms_model* model) {
  return model->model->kind().c_str();
}

dgms_model_status dgms_model_detect(const dgms_model* model,
                                    const float* input, int64_t height,
                                    int64_t width, int64_t img_height,
                                    int64_t img_width, double scale_w,
                                    double scale_h, int rescale, float* out,
                                    int64_t capacity, int64_t* count) {
  if (model == nullptr || input == nullptr || count == nullptr)
    return report(dgms_rt::Status(dgms_rt::StatusCode::kInvalidArgument,
                                  "model, input and count must not be null"));
  if (height < 1 || width < 1 || height > (1 << 16) || width > (1 << 16))
    return report(dgms_rt::Status(
        dgms_rt::StatusCode::kInvalidArgument,
        "the input is " + std::to_string(height) + " x " +
            std::to_string(width) + ", expected 1 to 65536 pixels a side"));
  if (3 * height * width > dgms_rt::ConvLimits::kMaxElements)
    return report(dgms_rt::Status(
        dgms_rt::StatusCode::kInvalidArgument,
        "the input (3, " + std::to_string(height) + ", " +
            std::to_string(width) + ") has more than 2^31 - 1 values"));
  try {
    dgms_rt::ImageInfo info;
    info.img_height = img_height;
    info.img_width = img_width;
    info.scale_w = scale_w;
    info.scale_h = scale_h;
    std::vector<std::vector<dgms_rt::Detection>> dets;
    dgms_rt::Status status =
        model->model->detect(input, {1, 3, height, width}, {info},
                             rescale != 0, &dets);
    if (!status.ok()) return report(status);
    const auto& d = dets[0];
    *count = int64_t(d.size());
    if (int64_t(d.size()) > capacity || (out == nullptr && !d.empty()))
      return report(dgms_rt::Status(
          dgms_rt::StatusCode::kInvalidArgument,
          "the output holds " + std::to_string(capacity) +
              " detections, but " + std::to_string(d.size()) +
              " were found: pass a larger capacity"));
    for (size_t i = 0; i < d.size(); ++i) {
      float* row = out + 6 * i;
      row[0] = d[i].x1;
      row[1] = d[i].y1;
      row[2] = d[i].x2;
      row[3] = d[i].y2;
      row[4] = d[i].score;
      row[5] = float(d[i].label);
    }
    return report(dgms_rt::Status::Ok());
  } catch (const std::bad_alloc&) {
    return report(dgms_rt::Status(dgms_rt::StatusCode::kOutOfMemory,
                                  "out of memory running the model"));
  }
}

}  // extern "C"
