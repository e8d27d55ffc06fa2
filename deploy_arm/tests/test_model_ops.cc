// Tests of the graph executor's operators and the post-processing's
// candidate selection against naive loops, bit for bit. max_pool2d runs on
// odd sizes, strides, dilations, padding and ceil_mode windows with NaN,
// -inf and both zeros. add and the activations run in place and out of
// place. The score threshold and nms_pre selection gets logits with ties, NaN,
// infinities and scores that round to 1. Prints one line per failure and
// exits non-zero if any.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "candidates.h"
#include "dgms_rt/thread_pool.h"
#include "ops.h"

using namespace dgms_rt;

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

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Values with repeats, both zeros, -inf and NaNs of two payloads, so that
// the visiting order of the taps shows in the result bits.
std::vector<float> tricky_values(size_t count, std::mt19937* rng) {
  const float nan_a = std::nanf("1"), nan_b = std::nanf("2");
  const float special[] = {0.0f, -0.0f, -std::numeric_limits<float>::infinity(),
                           nan_a, nan_b, 1.0f, -1.0f};
  std::uniform_int_distribution<int> kind(0, 19);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> values(count);
  for (float& v : values) {
    const int k = kind(*rng);
    if (k < 7) {
      v = special[k];
    } else if (k < 12) {
      v = std::round(normal(*rng));
    } else {
      v = normal(*rng);
    }
  }
  return values;
}

struct PoolCase {
  int64_t planes, height, width;
  PoolWindow window;
  bool ceil_mode;
};

// The output side the executor computes (PyTorch's rule).
int64_t pool_output_side(int64_t in, int64_t kernel, int64_t stride,
                         int64_t pad, int64_t dilation, bool ceil_mode) {
  const int64_t span = in + 2 * pad - dilation * (kernel - 1) - 1;
  int64_t out = (span + (ceil_mode ? stride - 1 : 0)) / stride + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// Every tap of a window in row-major order, bounds-checked per tap.
void naive_max_pool(const std::vector<float>& input, const PoolCase& c,
                    int64_t out_h, int64_t out_w, std::vector<float>* out) {
  const PoolWindow& g = c.window;
  out->assign(size_t(c.planes * out_h * out_w), 0.0f);
  for (int64_t p = 0; p < c.planes; ++p)
    for (int64_t oy = 0; oy < out_h; ++oy)
      for (int64_t ox = 0; ox < out_w; ++ox) {
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t ky = 0; ky < g.kernel[0]; ++ky) {
          const int64_t iy = oy * g.stride[0] - g.padding[0] + ky * g.dilation[0];
          if (iy < 0 || iy >= c.height) continue;
          for (int64_t kx = 0; kx < g.kernel[1]; ++kx) {
            const int64_t ix =
                ox * g.stride[1] - g.padding[1] + kx * g.dilation[1];
            if (ix < 0 || ix >= c.width) continue;
            const float v = input[size_t((p * c.height + iy) * c.width + ix)];
            if (v > best || std::isnan(v)) best = v;
          }
        }
        (*out)[size_t((p * out_h + oy) * out_w + ox)] = best;
      }
}

std::string describe(const PoolCase& c) {
  const PoolWindow& g = c.window;
  char text[200];
  std::snprintf(text, sizeof(text),
                "max_pool %ldx%ldx%ld k%ldx%ld s%ldx%ld p%ldx%ld d%ldx%ld%s",
                long(c.planes), long(c.height), long(c.width),
                long(g.kernel[0]), long(g.kernel[1]), long(g.stride[0]),
                long(g.stride[1]), long(g.padding[0]), long(g.padding[1]),
                long(g.dilation[0]), long(g.dilation[1]),
                c.ceil_mode ? " ceil" : "");
  return text;
}

void check_max_pool(const PoolCase& c, std::mt19937* rng, ThreadPool* pool) {
  const PoolWindow& g = c.window;
  const int64_t out_h = pool_output_side(c.height, g.kernel[0], g.stride[0],
                                         g.padding[0], g.dilation[0],
                                         c.ceil_mode);
  const int64_t out_w = pool_output_side(c.width, g.kernel[1], g.stride[1],
                                         g.padding[1], g.dilation[1],
                                         c.ceil_mode);
  if (out_h < 1 || out_w < 1) return;  // the window does not fit
  const std::vector<float> input =
      tricky_values(size_t(c.planes * c.height * c.width), rng);
  std::vector<float> expected;
  naive_max_pool(input, c, out_h, out_w, &expected);
  // Poisoned output: every element must be written.
  std::vector<float> got(expected.size(), 12345.0f);
  max_pool2d(input.data(), c.planes, c.height, c.width, g, out_h, out_w,
             got.data(), pool);
  check(same_bits(got, expected),
        describe(c) + (pool ? " with a thread pool" : "") +
            ": differs from the naive loop");
}

PoolCase pool_case(int64_t planes, int64_t h, int64_t w, int64_t kh,
                   int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                   int64_t dh, int64_t dw, bool ceil_mode) {
  PoolCase c;
  c.planes = planes;
  c.height = h;
  c.width = w;
  c.window.kernel[0] = kh;
  c.window.kernel[1] = kw;
  c.window.stride[0] = sh;
  c.window.stride[1] = sw;
  c.window.padding[0] = ph;
  c.window.padding[1] = pw;
  c.window.dilation[0] = dh;
  c.window.dilation[1] = dw;
  c.ceil_mode = ceil_mode;
  return c;
}

void test_max_pool(std::mt19937* rng) {
  ThreadPool pool(3);
  const PoolCase cases[] = {
      // planes H W  KH KW SH SW PH PW DH DW ceil
      pool_case(3, 16, 16, 3, 3, 2, 2, 1, 1, 1, 1, false),  // ResNet stem
      pool_case(2, 15, 17, 3, 3, 2, 2, 1, 1, 1, 1, false),
      pool_case(2, 15, 17, 3, 3, 2, 2, 1, 1, 1, 1, true),
      pool_case(2, 14, 14, 2, 2, 2, 2, 0, 0, 1, 1, true),
      pool_case(1, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1, false),
      pool_case(2, 11, 13, 3, 2, 3, 3, 1, 1, 1, 1, true),
      pool_case(1, 9, 23, 3, 3, 1, 2, 0, 1, 2, 2, false),
      pool_case(1, 12, 31, 5, 5, 3, 4, 2, 2, 1, 2, true),
      pool_case(1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, false),
      pool_case(1, 1, 5, 1, 3, 1, 2, 0, 1, 1, 1, true),
      pool_case(4, 3, 40, 2, 8, 1, 5, 1, 4, 1, 1, true),
  };
  for (const PoolCase& c : cases) {
    check_max_pool(c, rng, nullptr);
    check_max_pool(c, rng, &pool);
  }
  std::uniform_int_distribution<int64_t> side(1, 21), small(1, 4);
  for (int i = 0; i < 300; ++i) {
    // One draw per statement: the order of evaluating function arguments
    // differs between compilers, and the cases must not.
    PoolCase c;
    c.planes = small(*rng);
    c.height = side(*rng);
    c.width = side(*rng);
    for (int k = 0; k < 2; ++k) {
      PoolWindow& g = c.window;
      g.kernel[k] = small(*rng);
      g.stride[k] = small(*rng);
      g.dilation[k] = small(*rng) % 3 + 1;
      // The reader allows padding up to half the kernel.
      g.padding[k] = int64_t((*rng)() % uint64_t(g.kernel[k] / 2 + 1));
    }
    c.ceil_mode = (*rng)() % 2 == 0;
    check_max_pool(c, rng, i % 2 ? &pool : nullptr);
  }
}

float naive_activate(float v, Activation act) {
  if (act == Activation::kReLU) return v > 0.0f ? v : 0.0f;
  if (act == Activation::kReLU6) return std::min(std::max(v, 0.0f), 6.0f);
  return v;
}

void test_elementwise(std::mt19937* rng) {
  ThreadPool pool(2);
  const Activation acts[] = {Activation::kNone, Activation::kReLU,
                             Activation::kReLU6};
  // Sizes around the vector width and beyond one work item (65536).
  const int64_t sizes[] = {1, 3, 8, 17, 1000, 70001};
  for (int64_t n : sizes)
    for (Activation act : acts) {
      const std::vector<float> a = tricky_values(size_t(n), rng);
      std::vector<float> b = tricky_values(size_t(n), rng);
      for (float& v : b) v *= 4.0f;  // reach relu6's upper clamp
      const size_t count = static_cast<size_t>(n);
      std::vector<float> sum(count), same(count), relu(count);
      for (size_t i = 0; i < count; ++i) {
        sum[i] = naive_activate(a[i] + b[i], act);
        same[i] = naive_activate(a[i] + a[i], act);
        relu[i] = naive_activate(b[i], act);
      }
      const std::string context = "n " + std::to_string(n) + " activation " +
                                  std::to_string(int(act));
      for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
        std::vector<float> out(size_t(n), 7.0f);
        add_activate(a.data(), b.data(), n, act, out.data(), p);
        check(same_bits(out, sum), "add to a new buffer, " + context);
        std::vector<float> left(a);
        add_activate(left.data(), b.data(), n, act, left.data(), p);
        check(same_bits(left, sum), "add into the first input, " + context);
        std::vector<float> right(b);
        add_activate(a.data(), right.data(), n, act, right.data(), p);
        check(same_bits(right, sum), "add into the second input, " + context);
        std::vector<float> both(a);
        add_activate(both.data(), both.data(), n, act, both.data(), p);
        check(same_bits(both, same), "add of a value to itself, " + context);
        std::vector<float> moved(size_t(n), 7.0f);
        apply_activation(b.data(), n, act, moved.data(), p);
        check(same_bits(moved, relu), "activation to a new buffer, " + context);
        std::vector<float> in_place(b);
        apply_activation(in_place.data(), n, act, in_place.data(), p);
        check(same_bits(in_place, relu), "activation in place, " + context);
      }
    }
}

// The plain procedure that select_candidates must reproduce.
std::vector<ScoredIndex> naive_select(const std::vector<float>& logits,
                                      int64_t channels, int64_t positions,
                                      float score_thr, int64_t nms_pre) {
  std::vector<ScoredIndex> all;
  for (int64_t p = 0; p < positions; ++p)
    for (int64_t c = 0; c < channels; ++c) {
      const float score = sigmoid(logits[size_t(c * positions + p)]);
      if (score > score_thr) all.push_back(ScoredIndex{p * channels + c, score});
    }
  std::stable_sort(all.begin(), all.end(),
                   [](const ScoredIndex& a, const ScoredIndex& b) {
                     return a.score > b.score;
                   });
  const int64_t n = int64_t(all.size());
  int64_t keep = std::min(nms_pre, n);
  if (keep < 0) keep = std::max<int64_t>(0, n + keep);
  all.resize(size_t(keep));
  return all;
}

void test_select_candidates(std::mt19937* rng) {
  const float score_thresholds[] = {0.05f, 0.0f, 0.5f, -0.25f, 1.0f,
                                    0.999999f, 1e-35f};
  const int64_t nms_pres[] = {1000, 1, 7, 100, 0, -1, -3, 5000};
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int trial = 0; trial < 240; ++trial) {
    const int kind = trial % 6;
    // Large levels make the buffer fill and be cut back several times.
    const int64_t channels = 1 + int64_t((*rng)() % 40);
    const int64_t positions = trial % 3 == 0 ? 1 + int64_t((*rng)() % 2000)
                                             : 1 + int64_t((*rng)() % 100);
    const float score_thr = score_thresholds[(*rng)() % 7];
    const int64_t nms_pre = nms_pres[(*rng)() % 8];
    const double thr = std::min(std::max(double(score_thr), 1e-6), 1 - 1e-6);
    const float thr_logit = float(std::log(thr / (1 - thr)));
    std::vector<float> logits(size_t(channels * positions));
    for (float& v : logits) {
      const float u = uniform(*rng);
      switch (kind) {
        case 0:  // continuous
          v = normal(*rng);
          break;
        case 1:  // many exact ties
          v = std::round(normal(*rng) * 2.0f) / 2.0f;
          break;
        case 2:  // scores that round to 1.0f, tied by position only
          v = 14.0f + 16.0f * u;
          break;
        case 3:  // non-finite and extreme logits
          v = u < 0.05f   ? std::nanf("")
              : u < 0.1f  ? std::numeric_limits<float>::infinity()
              : u < 0.15f ? -std::numeric_limits<float>::infinity()
              : u < 0.2f  ? -1e30f
              : u < 0.25f ? 1e30f
                          : normal(*rng);
          break;
        case 4:  // within rounding of the threshold's logit
          v = thr_logit + (u - 0.5f) * 2e-5f;
          break;
        default:  // distinct logits whose float scores collide
          v = 12.0f + float((*rng)() % 4000) * 1e-3f;
          break;
      }
    }
    std::vector<ScoredIndex> got;
    select_candidates(logits.data(), channels, positions, score_thr, nms_pre,
                      &got);
    const std::vector<ScoredIndex> expected =
        naive_select(logits, channels, positions, score_thr, nms_pre);
    bool same = got.size() == expected.size();
    for (size_t i = 0; same && i < got.size(); ++i)
      same = got[i].index == expected[i].index &&
             std::memcmp(&got[i].score, &expected[i].score, sizeof(float)) ==
                 0;
    check(same, "select_candidates kind " + std::to_string(kind) + " " +
                    std::to_string(channels) + "x" +
                    std::to_string(positions) + " score_thr " +
                    std::to_string(score_thr) + " nms_pre " +
                    std::to_string(nms_pre) + ": " +
                    std::to_string(got.size()) + " selected, expected " +
                    std::to_string(expected.size()) + " or another order");
  }
}

}  // namespace

int main() {
  std::mt19937 rng(20240531);
  test_max_pool(&rng);
  test_elementwise(&rng);
  test_select_candidates(&rng);
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
