// Internal: the score threshold and nms_pre selection of one level of a
// dense head (detect.cc), kept apart so that tests can compare it with
// the plain computation over every score.
#pragma once

#include <cstdint>
#include <vector>

namespace dgms_rt {

// The float32 sigmoid that gives every detection score.
float sigmoid(float x);

struct ScoredIndex {
  int64_t index;  // p * channels + c: position-major, as mmdet flattens
  float score;    // sigmoid(logit)
};

// Returns in *out the candidates of one level, whose logits are
// logits[c * positions + p] for channel c (anchor-major: anchor * classes +
// class) and position p. The result is the same as this plain procedure:
// compute sigmoid() of every logit, keep the indices whose score is above
// score_thr, sort them by descending score and then ascending index, and
// cut the list like mmdet's filter_scores_and_topk: the first nms_pre when
// nms_pre >= 0, else all but the last -nms_pre.
//
// With nms_pre >= 0 it computes sigmoid() only for logits that can still
// be among the nms_pre best: it keeps the best candidates seen so far
// and skips logits whose score is certainly below the worst of them.
void select_candidates(const float* logits, int64_t channels,
                       int64_t positions, float score_thr, int64_t nms_pre,
                       std::vector<ScoredIndex>* out);

}  // namespace dgms_rt
