#include "candidates.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dgms_rt {
namespace {

// A logit below a cut is skipped without computing its score, so every
// float logit below the cut must have a float score below a bound q. The
// cut is the logit of q * (1 - kScoreMargin), rounded down. sigmoid()
// rounds three times (expf, the sum, the division), which keeps it within
// a few float ulps (2^-23 relative each) of the exact logistic function
// when expf is accurate to about 1 ulp. kScoreMargin is about 80 ulps.
// The margin is relative to q, so it also works where scores round to
// equal floats: for q = 1.0f the cut is near 11.5, and every logit whose
// score could round to 1.0f is kept.
// NOTE: an expf that is off by more than about 80 ulps breaks this.
constexpr double kScoreMargin = 1e-5;

// Below this bound no cut is used: float scores near 1e-38 are subnormal
// and have no relative error bound.
constexpr double kMinCutScore = 1e-30;

// Logits per block of the scan: a block whose logits are all below the
// cut is skipped after one vectorised comparison.
constexpr int64_t kBlock = 32;

// Returns a float cut such that every float logit x < cut has
// sigmoid(x) < q, or minus infinity when q is too small for a cut.
float cut_below(double q) {
  const double target = q * (1.0 - kScoreMargin);
  if (!(target >= kMinCutScore)) return -std::numeric_limits<float>::infinity();
  if (target >= 1.0) return std::numeric_limits<float>::infinity();
  const double logit = std::log(target / (1.0 - target));
  float cut = float(logit);
  if (double(cut) > logit)
    cut = std::nextafter(cut, -std::numeric_limits<float>::infinity());
  return cut;
}

// The order of the selection: descending score, then ascending index.
bool ranks_before(const ScoredIndex& a, const ScoredIndex& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

}  // namespace

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

void select_candidates(const float* logits, int64_t channels,
                       int64_t positions, float score_thr, int64_t nms_pre,
                       std::vector<ScoredIndex>* out) {
  out->clear();
  if (nms_pre == 0) return;
  const bool bounded = nms_pre > 0;
  // With nms_pre > 0, the buffer is cut back to the nms_pre best when it
  // reaches this size, which keeps the cost of cutting per added
  // candidate constant. A level with at most nms_pre logits never fills
  // it.
  const int64_t kept_max = std::min(nms_pre, channels * positions);
  const size_t capacity =
      bounded ? size_t(kept_max + std::max<int64_t>(kept_max, 4096)) : 0;
  const float threshold_cut = cut_below(double(score_thr));
  // A logit below `cut` is not a candidate or, once the buffer has been
  // cut back, scores below the worst of nms_pre candidates. NaN logits
  // fail every `>= cut` and are never candidates (NaN > score_thr fails).
  float cut = threshold_cut;
  for (int64_t c = 0; c < channels; ++c) {
    const float* row = logits + c * positions;
    for (int64_t begin = 0; begin < positions; begin += kBlock) {
      const int64_t end = std::min(positions, begin + kBlock);
      int any = 0;
      for (int64_t p = begin; p < end; ++p) any |= row[p] >= cut;
      if (!any) continue;
      for (int64_t p = begin; p < end; ++p) {
        if (!(row[p] >= cut)) continue;
        // The cut errs on the safe side, so the score decides.
        const float score = sigmoid(row[p]);
        if (!(score > score_thr)) continue;
        out->push_back(ScoredIndex{p * channels + c, score});
        if (!bounded || out->size() < capacity) continue;
        // Keep the nms_pre best. A dropped candidate ranks after nms_pre
        // others, so it cannot be among the nms_pre best of the level.
        const auto nth = out->begin() + (nms_pre - 1);
        std::nth_element(out->begin(), nth, out->end(), ranks_before);
        out->resize(size_t(nms_pre));
        // Scores below the worst kept one rank after all the kept ones.
        cut = std::max(threshold_cut, cut_below(double(out->back().score)));
      }
    }
  }
  // Only the nms_pre best are kept, so only they need sorting. The buffer
  // may hold up to `capacity` here, and sorting all of it cost about 1 ms
  // per demo image with 100 detections (docs/deploy_arm.md).
  if (bounded && int64_t(out->size()) > nms_pre) {
    const auto nth = out->begin() + (nms_pre - 1);
    std::nth_element(out->begin(), nth, out->end(), ranks_before);
    out->resize(size_t(nms_pre));
  }
  std::sort(out->begin(), out->end(), ranks_before);
  const int64_t count = int64_t(out->size());
  // Python slicing of mmdet's filter_scores_and_topk: a negative nms_pre
  // gives min(nms_pre, n) < 0, which drops that many from the end.
  int64_t keep = std::min(nms_pre, count);
  if (keep < 0) keep = std::max<int64_t>(0, count + keep);
  out->resize(size_t(keep));
}

}  // namespace dgms_rt
