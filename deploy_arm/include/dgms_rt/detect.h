// Post-processing of a RetinaNet-style dense head: anchors, sigmoid scores,
// per-level top-k, box decoding, score threshold, class-aware NMS and
// rescaling to the original image, with the semantics of MMDetection 3.3's
// AnchorGenerator, DeltaXYWHBBoxCoder, BaseDenseHead.predict_by_feat and
// mmcv's batched_nms (docs/deploy_arm.md lists the settings read).
#pragma once

#include <cstdint>
#include <vector>

#include "dgms_rt/json.h"
#include "dgms_rt/status.h"
#include "dgms_rt/tensor.h"

namespace dgms_rt {

// One detection, with the box in the pixels of the image the caller
// describes in ImageInfo (the original image when rescaling).
struct Detection {
  float x1 = 0, y1 = 0, x2 = 0, y2 = 0;
  float score = 0;
  int64_t label = 0;
};

// Geometry of one preprocessed image, as MMDetection's img_meta has it.
struct ImageInfo {
  int64_t img_height = 0;  // resized size before padding (img_shape)
  int64_t img_width = 0;
  double scale_w = 1.0;    // resized / original width (scale_factor[0])
  double scale_h = 1.0;    // resized / original height (scale_factor[1])
};

struct AnchorSettings {
  std::vector<float> stride_w, stride_h;  // per level
  std::vector<float> base_sizes;          // per level
  std::vector<float> ratios;
  std::vector<float> scales;
  float center_offset = 0.0f;
  bool scale_major = true;
  int64_t anchors_per_cell() const {
    return int64_t(ratios.size() * scales.size());
  }
};

struct DenseHeadSettings {
  AnchorSettings anchors;
  int64_t num_classes = 0;
  float means[4] = {0, 0, 0, 0};
  float stds[4] = {1, 1, 1, 1};
  bool clip_border = true;
  bool add_ctr_clamp = false;
  float ctr_clamp = 32.0f;
  // test_cfg
  int64_t nms_pre = -1;
  float score_thr = 0.0f;
  bool has_min_bbox_size = false;
  float min_bbox_size = 0.0f;
  float iou_threshold = 0.5f;
  float nms_offset = 0.0f;      // mmcv nms 'offset' (0 or 1)
  int64_t split_thr = 10000;
  int64_t nms_max_num = -1;
  bool class_agnostic = false;
  int64_t max_per_img = 100;
};

// Reads bbox_head.anchor_generator, bbox_head.bbox_coder, num_classes and
// test_cfg from an MMDetection RetinaNet model config; rejects settings the
// runtime does not implement with a message naming them.
Status parse_dense_head_settings(const Json& model_config, int64_t num_levels,
                                 DenseHeadSettings* out);

// Runs the post-processing on one image's head outputs: cls[i] is
// (A * num_classes, H_i, W_i) and bbox[i] is (A * 4, H_i, W_i) for level i
// (the batch dimension removed). With rescale, boxes are divided by the
// scale factors into original-image pixels. Detections come sorted by
// descending score.
Status postprocess_dense_head(const DenseHeadSettings& settings,
                              const std::vector<const Tensor*>& cls,
                              const std::vector<const Tensor*>& bbox,
                              int64_t batch_index, const ImageInfo& image,
                              bool rescale, std::vector<Detection>* out);

}  // namespace dgms_rt
