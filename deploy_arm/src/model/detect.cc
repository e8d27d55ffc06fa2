// Dense-head post-processing (RetinaNet) and image preprocessing.
#include "dgms_rt/detect.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>
#include <vector>

#include "candidates.h"
#include "dgms_rt/model.h"

namespace dgms_rt {
namespace {

Status invalid(const std::string& message) {
  return Status(StatusCode::kInvalidArgument, message);
}
Status unsupported(const std::string& message) {
  return Status(StatusCode::kUnsupported, message);
}

// Typed optional fields of the model config; `where` names the config path.
struct ConfigReader {
  Status number(const Json& obj, const char* key, const std::string& where,
                double fallback, double* out, bool required = false) const {
    const Json* v = obj.find(key);
    if (v == nullptr || (v->is_null() && !required)) {
      if (required) return invalid("model_config." + where + "." + key +
                                   " is missing");
      *out = fallback;
      return Status::Ok();
    }
    if (!v->is_number() || !std::isfinite(v->as_double()))
      return invalid("model_config." + where + "." + key +
                     " must be a number, got " + v->describe());
    *out = v->as_double();
    return Status::Ok();
  }
  Status integer(const Json& obj, const char* key, const std::string& where,
                 int64_t fallback, int64_t* out, bool required = false) const {
    const Json* v = obj.find(key);
    if (v == nullptr) {
      if (required) return invalid("model_config." + where + "." + key +
                                   " is missing");
      *out = fallback;
      return Status::Ok();
    }
    if (!v->is_int())
      return invalid("model_config." + where + "." + key +
                     " must be an integer, got " + v->describe());
    *out = v->as_int();
    return Status::Ok();
  }
  Status boolean(const Json& obj, const char* key, const std::string& where,
                 bool fallback, bool* out) const {
    const Json* v = obj.find(key);
    if (v == nullptr) {
      *out = fallback;
      return Status::Ok();
    }
    if (!v->is_bool())
      return invalid("model_config." + where + "." + key +
                     " must be true or false, got " + v->describe());
    *out = v->as_bool();
    return Status::Ok();
  }
  Status numbers(const Json& obj, const char* key, const std::string& where,
                 std::vector<double>* out) const {
    const Json* v = obj.find(key);
    bool ok = v != nullptr && v->is_array() && !v->items().empty() &&
              v->items().size() <= 64;
    out->clear();
    for (size_t i = 0; ok && i < v->items().size(); ++i) {
      ok = v->items()[i].is_number() &&
           std::isfinite(v->items()[i].as_double());
      if (ok) out->push_back(v->items()[i].as_double());
    }
    if (!ok)
      return invalid("model_config." + where + "." + key +
                     " must be a list of 1 to 64 numbers, got " +
                     (v ? v->describe() : std::string("nothing")));
    return Status::Ok();
  }
  Status type(const Json& obj, const std::string& where,
              const std::string& expected) const {
    const Json* v = obj.find("type");
    if (v == nullptr || !v->is_string() || v->as_string() != expected)
      return unsupported("model_config." + where + ".type is " +
                         (v ? v->describe() : std::string("missing")) +
                         "; the runtime implements " + expected);
    return Status::Ok();
  }
};

struct Box {
  float x1, y1, x2, y2;
};

// mmcv's CPU nms: indices of kept boxes, by descending score. Stops after
// `limit` kept boxes when limit >= 0: the greedy pass keeps a box
// depending only on the boxes before it, so the kept list is the same
// prefix of the full one.
std::vector<int64_t> nms(const std::vector<Box>& boxes,
                         const std::vector<float>& scores,
                         const std::vector<int64_t>& subset, float threshold,
                         float offset, int64_t limit) {
  std::vector<int64_t> order(subset);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return scores[size_t(a)] > scores[size_t(b)];
  });
  // Coordinates and areas in score order, as separate arrays, so that the
  // loop over the remaining boxes vectorises. That loop also computes the
  // overlap of boxes already suppressed, which only sets their flag again.
  const size_t n = order.size();
  std::vector<float> x1(n), y1(n), x2(n), y2(n), area(n);
  for (size_t i = 0; i < n; ++i) {
    const Box& b = boxes[size_t(order[i])];
    x1[i] = b.x1;
    y1[i] = b.y1;
    x2[i] = b.x2;
    y2[i] = b.y2;
    area[i] = (b.x2 - b.x1 + offset) * (b.y2 - b.y1 + offset);
  }
  std::vector<int32_t> suppressed(n, 0);
  std::vector<int64_t> keep;
  for (size_t i = 0; i < n; ++i) {
    if (suppressed[i]) continue;
    if (limit >= 0 && int64_t(keep.size()) >= limit) break;
    keep.push_back(order[i]);
    const float ax1 = x1[i], ay1 = y1[i], ax2 = x2[i], ay2 = y2[i];
    const float area_a = area[i];
    for (size_t j = i + 1; j < n; ++j) {
      const float w = std::max(0.0f, std::min(ax2, x2[j]) -
                                         std::max(ax1, x1[j]) + offset);
      const float h = std::max(0.0f, std::min(ay2, y2[j]) -
                                         std::max(ay1, y1[j]) + offset);
      const float inter = w * h;
      suppressed[j] |= int32_t(inter / (area_a + area[j] - inter) > threshold);
    }
  }
  return keep;
}

}  // namespace

Status parse_dense_head_settings(const Json& config, int64_t num_levels,
                                 DenseHeadSettings* out) {
  ConfigReader r;
  const Json* head = config.find("bbox_head");
  if (head == nullptr || !head->is_object())
    return invalid("model_config.bbox_head is missing");
  Status s = r.type(*head, "bbox_head", "RetinaHead");
  if (!s.ok()) return s;
  s = r.integer(*head, "num_classes", "bbox_head", 0, &out->num_classes, true);
  if (!s.ok()) return s;
  if (out->num_classes < 1 || out->num_classes > 100000)
    return invalid("model_config.bbox_head.num_classes is " +
                   std::to_string(out->num_classes) +
                   ", expected 1 to 100000");
  const Json* loss = head->find("loss_cls");
  bool sigmoid_scores = false;
  if (loss != nullptr) {
    s = r.boolean(*loss, "use_sigmoid", "bbox_head.loss_cls", false,
                  &sigmoid_scores);
    if (!s.ok()) return s;
  }
  if (!sigmoid_scores)
    return unsupported("model_config.bbox_head.loss_cls.use_sigmoid is not "
                       "true; the runtime implements sigmoid scores only");

  const Json* anchors = head->find("anchor_generator");
  if (anchors == nullptr || !anchors->is_object())
    return invalid("model_config.bbox_head.anchor_generator is missing");
  const std::string where = "bbox_head.anchor_generator";
  s = r.type(*anchors, where, "AnchorGenerator");
  if (!s.ok()) return s;
  const Json* centers = anchors->find("centers");
  if (centers != nullptr && !centers->is_null())
    return unsupported("model_config." + where + ".centers is set; the "
                       "runtime implements center_offset only");
  AnchorSettings& a = out->anchors;
  const Json* strides = anchors->find("strides");
  if (strides == nullptr || !strides->is_array() ||
      int64_t(strides->items().size()) != num_levels)
    return invalid("model_config." + where + ".strides must list " +
                   std::to_string(num_levels) + " strides, one per level");
  for (const Json& stride : strides->items()) {
    double sw, sh;
    if (stride.is_number()) {
      sw = sh = stride.as_double();
    } else if (stride.is_array() && stride.items().size() == 2 &&
               stride.items()[0].is_number() &&
               stride.items()[1].is_number()) {
      sw = stride.items()[0].as_double();
      sh = stride.items()[1].as_double();
    } else {
      return invalid("model_config." + where + ".strides has an invalid "
                     "entry " + stride.describe());
    }
    if (!(sw > 0 && sw <= 4096 && sh > 0 && sh <= 4096))
      return invalid("model_config." + where + ".strides has " +
                     stride.describe() + ", expected values in (0, 4096]");
    a.stride_w.push_back(float(sw));
    a.stride_h.push_back(float(sh));
    a.base_sizes.push_back(float(std::min(sw, sh)));
  }
  std::vector<double> values;
  s = r.numbers(*anchors, "ratios", where, &values);
  if (!s.ok()) return s;
  for (double v : values) {
    if (!(v > 0)) return invalid("model_config." + where +
                                 ".ratios must be positive");
    a.ratios.push_back(float(v));
  }
  const Json* scales = anchors->find("scales");
  if (scales != nullptr && !scales->is_null()) {
    s = r.numbers(*anchors, "scales", where, &values);
    if (!s.ok()) return s;
    for (double v : values) a.scales.push_back(float(v));
  } else {
    double base;
    int64_t per_octave;
    s = r.number(*anchors, "octave_base_scale", where, 0, &base, true);
    if (s.ok()) s = r.integer(*anchors, "scales_per_octave", where, 0,
                              &per_octave, true);
    if (!s.ok()) return s;
    if (per_octave < 1 || per_octave > 64 || !(base > 0))
      return invalid("model_config." + where + " needs octave_base_scale > "
                     "0 and scales_per_octave in [1, 64]");
    for (int64_t i = 0; i < per_octave; ++i)
      a.scales.push_back(float(std::pow(2.0, double(i) / double(per_octave)) *
                               base));
  }
  const Json* base_sizes = anchors->find("base_sizes");
  if (base_sizes != nullptr && !base_sizes->is_null()) {
    s = r.numbers(*anchors, "base_sizes", where, &values);
    if (!s.ok()) return s;
    if (int64_t(values.size()) != num_levels)
      return invalid("model_config." + where + ".base_sizes must have one "
                     "entry per level");
    for (size_t i = 0; i < values.size(); ++i) a.base_sizes[i] =
        float(values[i]);
  }
  double center_offset;
  s = r.number(*anchors, "center_offset", where, 0.0, &center_offset);
  if (s.ok()) s = r.boolean(*anchors, "scale_major", where, true,
                            &a.scale_major);
  if (!s.ok()) return s;
  a.center_offset = float(center_offset);

  const Json* coder = head->find("bbox_coder");
  if (coder == nullptr || !coder->is_object())
    return invalid("model_config.bbox_head.bbox_coder is missing");
  s = r.type(*coder, "bbox_head.bbox_coder", "DeltaXYWHBBoxCoder");
  if (!s.ok()) return s;
  for (int k = 0; k < 2; ++k) {
    const char* key = k ? "target_stds" : "target_means";
    if (coder->find(key) == nullptr) continue;
    s = r.numbers(*coder, key, "bbox_head.bbox_coder", &values);
    if (!s.ok()) return s;
    if (values.size() != 4)
      return invalid(std::string("model_config.bbox_head.bbox_coder.") + key +
                     " must have 4 values");
    for (int i = 0; i < 4; ++i) (k ? out->stds : out->means)[i] =
        float(values[size_t(i)]);
  }
  double ctr_clamp;
  s = r.boolean(*coder, "clip_border", "bbox_head.bbox_coder", true,
                &out->clip_border);
  if (s.ok()) s = r.boolean(*coder, "add_ctr_clamp", "bbox_head.bbox_coder",
                            false, &out->add_ctr_clamp);
  if (s.ok()) s = r.number(*coder, "ctr_clamp", "bbox_head.bbox_coder", 32,
                           &ctr_clamp);
  if (!s.ok()) return s;
  out->ctr_clamp = float(ctr_clamp);

  const Json* test = config.find("test_cfg");
  if (test == nullptr || !test->is_object())
    return invalid("model_config.test_cfg is missing");
  double value;
  s = r.integer(*test, "nms_pre", "test_cfg", -1, &out->nms_pre);
  if (s.ok()) s = r.number(*test, "score_thr", "test_cfg", 0.0, &value);
  if (!s.ok()) return s;
  out->score_thr = float(value);
  s = r.number(*test, "min_bbox_size", "test_cfg", -1.0, &value);
  if (!s.ok()) return s;
  out->has_min_bbox_size = value >= 0;
  out->min_bbox_size = float(value);
  s = r.integer(*test, "max_per_img", "test_cfg", 0, &out->max_per_img, true);
  if (!s.ok()) return s;
  const Json* nms_cfg = test->find("nms");
  if (nms_cfg == nullptr || !nms_cfg->is_object())
    return unsupported("model_config.test_cfg.nms is missing; the runtime "
                       "always runs NMS");
  s = r.type(*nms_cfg, "test_cfg.nms", "nms");
  if (!s.ok()) return s;
  s = r.number(*nms_cfg, "iou_threshold", "test_cfg.nms", 0, &value, true);
  if (!s.ok()) return s;
  out->iou_threshold = float(value);
  s = r.number(*nms_cfg, "offset", "test_cfg.nms", 0, &value);
  if (!s.ok()) return s;
  if (value != 0 && value != 1)
    return invalid("model_config.test_cfg.nms.offset must be 0 or 1");
  out->nms_offset = float(value);
  s = r.number(*nms_cfg, "score_threshold", "test_cfg.nms", 0, &value);
  if (!s.ok()) return s;
  if (value > 0)
    return unsupported("model_config.test_cfg.nms.score_threshold > 0 is not "
                       "implemented; use test_cfg.score_thr");
  s = r.integer(*nms_cfg, "split_thr", "test_cfg.nms", 10000,
                &out->split_thr);
  if (s.ok()) s = r.integer(*nms_cfg, "max_num", "test_cfg.nms", -1,
                            &out->nms_max_num);
  if (s.ok()) s = r.boolean(*nms_cfg, "class_agnostic", "test_cfg.nms",
                            false, &out->class_agnostic);
  return s;
}

Status postprocess_dense_head(const DenseHeadSettings& settings,
                              const std::vector<const Tensor*>& cls,
                              const std::vector<const Tensor*>& bbox,
                              int64_t batch_index, const ImageInfo& image,
                              bool rescale, std::vector<Detection>* out) {
  const AnchorSettings& an = settings.anchors;
  const int64_t levels = int64_t(an.stride_w.size());
  const int64_t num_anchors = an.anchors_per_cell();
  const int64_t classes = settings.num_classes;
  if (int64_t(cls.size()) != levels || int64_t(bbox.size()) != levels)
    return invalid("the head outputs " + std::to_string(cls.size()) +
                   " levels, the anchor generator has " +
                   std::to_string(levels));
  std::vector<Box> boxes;
  std::vector<float> scores;
  std::vector<int64_t> labels;
  std::vector<ScoredIndex> candidates;
  const float max_ratio = float(std::fabs(std::log(16.0 / 1000.0)));
  for (int64_t level = 0; level < levels; ++level) {
    const Tensor* c = cls[size_t(level)];
    const Tensor* d = bbox[size_t(level)];
    if (c == nullptr || d == nullptr || c->shape.size() != 4 ||
        d->shape.size() != 4 || c->shape[1] != num_anchors * classes ||
        d->shape[1] != num_anchors * 4 || c->shape[2] != d->shape[2] ||
        c->shape[3] != d->shape[3] || batch_index >= c->shape[0] ||
        batch_index >= d->shape[0])
      return invalid("level " + std::to_string(level) +
                     " head outputs do not match " +
                     std::to_string(num_anchors) + " anchors and " +
                     std::to_string(classes) + " classes");
    const int64_t h = c->shape[2], w = c->shape[3], plane = h * w;
    const float* cdata = c->data.data() + batch_index * c->shape[1] * plane;
    const float* ddata = d->data.data() + batch_index * d->shape[1] * plane;
    // Base anchors of this level (AnchorGenerator.gen_single_level_base_anchors).
    const float base = an.base_sizes[size_t(level)];
    const float cx = an.center_offset * base, cy = an.center_offset * base;
    std::vector<Box> base_anchors;
    const size_t nr = an.ratios.size(), ns = an.scales.size();
    for (size_t i = 0; i < (an.scale_major ? nr : ns); ++i)
      for (size_t j = 0; j < (an.scale_major ? ns : nr); ++j) {
        const size_t ri = an.scale_major ? i : j;
        const size_t si = an.scale_major ? j : i;
        const float h_ratio = std::sqrt(an.ratios[ri]);
        const float w_ratio = 1.0f / h_ratio;
        const float ws = base * w_ratio * an.scales[si];
        const float hs = base * h_ratio * an.scales[si];
        base_anchors.push_back(Box{cx - 0.5f * ws, cy - 0.5f * hs,
                                   cx + 0.5f * ws, cy + 0.5f * hs});
      }
    select_candidates(cdata, num_anchors * classes, plane,
                      settings.score_thr, settings.nms_pre, &candidates);
    for (const ScoredIndex& candidate : candidates) {
      const int64_t flat = candidate.index;
      const int64_t p = flat / (num_anchors * classes);
      const int64_t a = (flat / classes) % num_anchors;
      const int64_t label = flat % classes;
      const float sx = float(p % w) * an.stride_w[size_t(level)];
      const float sy = float(p / w) * an.stride_h[size_t(level)];
      const Box& b = base_anchors[size_t(a)];
      const float ax1 = b.x1 + sx, ay1 = b.y1 + sy;
      const float ax2 = b.x2 + sx, ay2 = b.y2 + sy;
      float delta[4];
      for (int k = 0; k < 4; ++k)
        delta[k] = ddata[(a * 4 + k) * plane + p] * settings.stds[k] +
                   settings.means[k];
      const float px = (ax1 + ax2) * 0.5f, py = (ay1 + ay2) * 0.5f;
      const float pw = ax2 - ax1, ph = ay2 - ay1;
      float dx = pw * delta[0], dy = ph * delta[1];
      float dw = delta[2], dh = delta[3];
      if (settings.add_ctr_clamp) {
        dx = std::min(std::max(dx, -settings.ctr_clamp), settings.ctr_clamp);
        dy = std::min(std::max(dy, -settings.ctr_clamp), settings.ctr_clamp);
        dw = std::min(dw, max_ratio);
        dh = std::min(dh, max_ratio);
      } else {
        dw = std::min(std::max(dw, -max_ratio), max_ratio);
        dh = std::min(std::max(dh, -max_ratio), max_ratio);
      }
      const float gx = px + dx, gy = py + dy;
      const float gw = pw * std::exp(dw), gh = ph * std::exp(dh);
      Box box{gx - gw * 0.5f, gy - gh * 0.5f, gx + gw * 0.5f, gy + gh * 0.5f};
      if (settings.clip_border) {
        const float mw = float(image.img_width), mh = float(image.img_height);
        box.x1 = std::min(std::max(box.x1, 0.0f), mw);
        box.x2 = std::min(std::max(box.x2, 0.0f), mw);
        box.y1 = std::min(std::max(box.y1, 0.0f), mh);
        box.y2 = std::min(std::max(box.y2, 0.0f), mh);
      }
      boxes.push_back(box);
      scores.push_back(candidate.score);
      labels.push_back(label);
    }
  }
  if (rescale) {
    if (!(image.scale_w > 0) || !(image.scale_h > 0) ||
        !std::isfinite(image.scale_w) || !std::isfinite(image.scale_h))
      return invalid("the image scale factors are (" +
                     std::to_string(image.scale_w) + ", " +
                     std::to_string(image.scale_h) +
                     "), expected positive finite values (resized size / "
                     "original size) to rescale");
    const float fx = float(1.0 / image.scale_w), fy = float(1.0 / image.scale_h);
    for (Box& b : boxes) {
      b.x1 *= fx;
      b.x2 *= fx;
      b.y1 *= fy;
      b.y2 *= fy;
    }
  }
  std::vector<int64_t> valid;
  for (size_t i = 0; i < boxes.size(); ++i) {
    const Box& b = boxes[i];
    if (!settings.has_min_bbox_size ||
        ((b.x2 - b.x1) > settings.min_bbox_size &&
         (b.y2 - b.y1) > settings.min_bbox_size))
      valid.push_back(int64_t(i));
  }
  out->clear();
  if (valid.empty()) return Status::Ok();
  // mmcv batched_nms: class-aware through per-class coordinate offsets.
  std::vector<Box> nms_boxes(boxes);
  if (!settings.class_agnostic) {
    float max_coordinate = -INFINITY;
    for (int64_t i : valid) {
      const Box& b = boxes[size_t(i)];
      max_coordinate = std::max({max_coordinate, b.x1, b.y1, b.x2, b.y2});
    }
    for (int64_t i : valid) {
      const float offset = float(labels[size_t(i)]) * (max_coordinate + 1.0f);
      Box& b = nms_boxes[size_t(i)];
      b.x1 += offset;
      b.y1 += offset;
      b.x2 += offset;
      b.y2 += offset;
    }
  }
  // Only the first `limit` boxes by score survive nms_max_num and
  // max_per_img (-1: no limit). The kept boxes of one class come in the
  // order of the final list, so each NMS can stop after `limit` as well.
  int64_t limit = settings.nms_max_num > 0 ? settings.nms_max_num : -1;
  if (settings.max_per_img >= 0 && (limit < 0 || settings.max_per_img < limit))
    limit = settings.max_per_img;
  std::vector<int64_t> kept;
  if (int64_t(valid.size()) < settings.split_thr) {
    kept = nms(nms_boxes, scores, valid, settings.iou_threshold,
               settings.nms_offset, limit);
    if (settings.nms_max_num > 0 && int64_t(kept.size()) > settings.nms_max_num)
      kept.resize(size_t(settings.nms_max_num));
  } else {
    std::vector<int64_t> label_ids;
    for (int64_t i : valid) label_ids.push_back(labels[size_t(i)]);
    std::sort(label_ids.begin(), label_ids.end());
    label_ids.erase(std::unique(label_ids.begin(), label_ids.end()),
                    label_ids.end());
    for (int64_t label : label_ids) {
      std::vector<int64_t> subset;
      for (int64_t i : valid)
        if (labels[size_t(i)] == label) subset.push_back(i);
      std::vector<int64_t> k = nms(nms_boxes, scores, subset,
                                   settings.iou_threshold, settings.nms_offset,
                                   limit);
      kept.insert(kept.end(), k.begin(), k.end());
    }
    std::sort(kept.begin(), kept.end());
    std::stable_sort(kept.begin(), kept.end(), [&](int64_t x, int64_t y) {
      return scores[size_t(x)] > scores[size_t(y)];
    });
    if (settings.nms_max_num > 0 && int64_t(kept.size()) > settings.nms_max_num)
      kept.resize(size_t(settings.nms_max_num));
  }
  if (int64_t(kept.size()) > settings.max_per_img && settings.max_per_img >= 0)
    kept.resize(size_t(settings.max_per_img));
  for (int64_t i : kept) {
    const Box& b = boxes[size_t(i)];
    out->push_back(Detection{b.x1, b.y1, b.x2, b.y2, scores[size_t(i)],
                             labels[size_t(i)]});
  }
  return Status::Ok();
}

namespace {

// Bilinear resizing of 8-bit images in the fixed-point arithmetic of
// OpenCV's cv::resize with INTER_LINEAR on CV_8U images (HResizeLinear and
// VResizeLinear in modules/imgproc/src/resize.cpp). The weights have 11
// fractional bits, the horizontal pass writes int32 rows, and the vertical
// pass truncates before it rounds. test_ppm_input_matches_mmdet_pipeline
// checks the result against opencv-python 5.1.0 bit for bit.
constexpr int kResizeWeightBits = 11;
constexpr float kResizeWeightScale = float(1 << kResizeWeightBits);

// Source indices and fixed-point weights of one output row or column.
struct ResizeTap {
  int64_t index0 = 0, index1 = 0;
  int32_t weight0 = 0, weight1 = 0;
};

// Computes the taps of a resize from src_size to dst_size samples with
// half-pixel centres. Positions and fractions are float, as in OpenCV.
// With reset_outside (OpenCV's columns), a position outside
// [0, src_size - 1] moves to the nearest edge with fraction 0. Without it
// (OpenCV's rows), only the two indices are clamped.
std::vector<ResizeTap> resize_taps(int64_t src_size, int64_t dst_size,
                                   bool reset_outside) {
  const double scale = 1.0 / (double(dst_size) / double(src_size));
  std::vector<ResizeTap> taps(static_cast<size_t>(dst_size));
  for (int64_t d = 0; d < dst_size; ++d) {
    float fraction = float((double(d) + 0.5) * scale - 0.5);
    int64_t index = int64_t(std::floor(fraction));
    fraction -= float(index);
    if (reset_outside && index < 0) {
      index = 0;
      fraction = 0;
    }
    if (reset_outside && index >= src_size - 1) {
      index = src_size - 1;
      fraction = 0;
    }
    ResizeTap& tap = taps[size_t(d)];
    tap.index0 = std::min(std::max<int64_t>(index, 0), src_size - 1);
    tap.index1 = std::min(std::max<int64_t>(index + 1, 0), src_size - 1);
    // std::lrint rounds half to even in the default rounding mode, as
    // OpenCV's cvRound does.
    tap.weight0 = int32_t(std::lrint((1.0f - fraction) * kResizeWeightScale));
    tap.weight1 = int32_t(std::lrint(fraction * kResizeWeightScale));
  }
  return taps;
}

// Horizontal pass of one source row: 3 channels per output column, each
// the weighted sum of two samples in units of 1 / 2048.
void resize_row(const uint8_t* row, const std::vector<ResizeTap>& taps,
                int32_t* out) {
  for (size_t x = 0; x < taps.size(); ++x)
    for (int c = 0; c < 3; ++c)
      out[3 * x + size_t(c)] =
          int32_t(row[3 * taps[x].index0 + c]) * taps[x].weight0 +
          int32_t(row[3 * taps[x].index1 + c]) * taps[x].weight1;
}

}  // namespace

Status preprocess_rgb_image(const PreprocessSettings& p, const uint8_t* rgb,
                            int64_t height, int64_t width, Tensor* out,
                            ImageInfo* info) {
  if (height < 1 || width < 1 || height > 16384 || width > 16384)
    return invalid("image size " + std::to_string(width) + "x" +
                   std::to_string(height) + " is outside 1 to 16384 pixels");
  int64_t new_w = width, new_h = height;
  if (p.has_resize) {
    if (p.keep_ratio) {
      // mmcv.imrescale: fit the long edge to max(scale) and the short
      // edge to min(scale).
      const double long_edge = double(std::max(p.resize_width,
                                               p.resize_height));
      const double short_edge = double(std::min(p.resize_width,
                                                p.resize_height));
      const double factor = std::min(
          long_edge / double(std::max(height, width)),
          short_edge / double(std::min(height, width)));
      new_w = int64_t(double(width) * factor + 0.5);
      new_h = int64_t(double(height) * factor + 0.5);
    } else {
      new_w = p.resize_width;
      new_h = p.resize_height;
    }
  }
  new_w = std::max<int64_t>(new_w, 1);
  new_h = std::max<int64_t>(new_h, 1);
  info->img_width = new_w;
  info->img_height = new_h;
  info->scale_w = double(new_w) / double(width);
  info->scale_h = double(new_h) / double(height);
  const int64_t div = p.pad_size_divisor;
  const int64_t pad_h = (new_h + div - 1) / div * div;
  const int64_t pad_w = (new_w + div - 1) / div * div;
  out->shape = {1, 3, pad_h, pad_w};
  out->data.assign(size_t(3 * pad_h * pad_w), p.pad_value);

  const std::vector<ResizeTap> columns = resize_taps(width, new_w, true);
  const std::vector<ResizeTap> rows = resize_taps(height, new_h, false);
  // Horizontal passes of the top (0) and bottom (1) source rows of the
  // current output row. Consecutive output rows share source rows, so a
  // pass is reused or moved from bottom to top before one is computed.
  std::vector<int32_t> passes[2] = {std::vector<int32_t>(size_t(3 * new_w)),
                                    std::vector<int32_t>(size_t(3 * new_w))};
  int64_t pass_row[2] = {-1, -1};
  const size_t plane = size_t(pad_h * pad_w);
  for (int64_t y = 0; y < new_h; ++y) {
    const ResizeTap& tap = rows[size_t(y)];
    if (pass_row[0] != tap.index0) {
      if (pass_row[1] == tap.index0) {
        std::swap(passes[0], passes[1]);
        std::swap(pass_row[0], pass_row[1]);
      } else {
        resize_row(rgb + tap.index0 * width * 3, columns, passes[0].data());
        pass_row[0] = tap.index0;
      }
    }
    if (pass_row[1] != tap.index1) {
      resize_row(rgb + tap.index1 * width * 3, columns, passes[1].data());
      pass_row[1] = tap.index1;
    }
    const int32_t* top = passes[0].data();
    const int32_t* bottom = passes[1].data();
    for (int64_t x = 0; x < new_w; ++x)
      for (int c = 0; c < 3; ++c) {
        const size_t i = size_t(3 * x + c);
        // OpenCV's vertical pass for 8-bit output: drop 4 bits of each
        // row sum, multiply by the 11-bit weight, drop 16 bits, then round
        // the sum to 8 bits (22 fractional bits in all).
        const int32_t sum = ((tap.weight0 * (top[i] >> 4)) >> 16) +
                            ((tap.weight1 * (bottom[i] >> 4)) >> 16);
        const float value = float(std::min((sum + 2) >> 2, 255));
        // A PPM is RGB; the model's channel order is RGB when bgr_to_rgb
        // (MMDetection loads BGR and swaps), else BGR.
        const int channel = p.bgr_to_rgb ? c : 2 - c;
        out->data[size_t(channel) * plane + size_t(y * pad_w + x)] =
            (value - p.mean[channel]) / p.std[channel];
      }
  }
  return Status::Ok();
}

}  // namespace dgms_rt
