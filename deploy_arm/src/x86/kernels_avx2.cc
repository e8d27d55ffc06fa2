// x86-64 AVX2 + FMA kernels: 8 output pixels per vector. This file is
// compiled with -mavx2 -mfma and only called after a runtime CPU check.
#include <immintrin.h>

#include "../kernels.h"

namespace dgms_rt {
namespace detail {
namespace {

struct Ops {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float v) { return _mm256_set1_ps(v); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  // Loads the first `lanes` floats and zeros the rest; reads nothing past
  // p + lanes.
  static Vec load_partial(const float* p, int lanes) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), lane);
    return _mm256_maskload_ps(p, mask);
  }
  // Lanes [0, lanes) of a and the others of b.
  static Vec select_first(Vec a, Vec b, int lanes) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), lane);
    return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(mask));
  }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  // Stores lane l of v[0], ..., v[3] as the 4 floats at dst[l], for every
  // lane: a 4 x 8 transpose.
  static void store_columns4(const Vec v[4], float* const dst[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]);
    const __m256 t1 = _mm256_unpacklo_ps(v[2], v[3]);
    const __m256 t2 = _mm256_unpackhi_ps(v[0], v[1]);
    const __m256 t3 = _mm256_unpackhi_ps(v[2], v[3]);
    // Lanes l and l + 4, each as 4 consecutive floats.
    const __m256 lanes[4] = {
        _mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
        _mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)),
        _mm256_shuffle_ps(t2, t3, _MM_SHUFFLE(1, 0, 1, 0)),
        _mm256_shuffle_ps(t2, t3, _MM_SHUFFLE(3, 2, 3, 2))};
    for (int l = 0; l < 4; ++l) {
      _mm_storeu_ps(dst[l], _mm256_castps256_ps128(lanes[l]));
      _mm_storeu_ps(dst[l + 4], _mm256_extractf128_ps(lanes[l], 1));
    }
  }
  // Splits the 32 floats at p by index modulo 4: phase[q] gets p[4 * l +
  // q] in lane l.
  static void deinterleave4(const float* p, Vec phase[4]) {
    const __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
    const __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
    // A 4 x 4 transpose within each 128-bit half: lane order 0, 8, 16, 24
    // | 4, 12, 20, 28 for phase 0, and so on.
    const __m256 t0 = _mm256_unpacklo_ps(v0, v1);
    const __m256 t1 = _mm256_unpacklo_ps(v2, v3);
    const __m256 t2 = _mm256_unpackhi_ps(v0, v1);
    const __m256 t3 = _mm256_unpackhi_ps(v2, v3);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    phase[0] = _mm256_permutevar8x32_ps(
        _mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)), order);
    phase[1] = _mm256_permutevar8x32_ps(
        _mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)), order);
    phase[2] = _mm256_permutevar8x32_ps(
        _mm256_shuffle_ps(t2, t3, _MM_SHUFFLE(1, 0, 1, 0)), order);
    phase[3] = _mm256_permutevar8x32_ps(
        _mm256_shuffle_ps(t2, t3, _MM_SHUFFLE(3, 2, 3, 2)), order);
  }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec fused(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
  static void store(float* p, Vec v, int lanes) {
    if (lanes == kLanes) {
      _mm256_storeu_ps(p, v);
      return;
    }
    // In pieces of 4, 2 and 1 floats: a masked store (vmaskmovps) takes
    // tens of cycles on AMD processors.
    __m128 part = _mm256_castps256_ps128(v);
    if (lanes >= 4) {
      _mm_storeu_ps(p, part);
      part = _mm256_extractf128_ps(v, 1);
      p += 4;
      lanes -= 4;
    }
    if (lanes >= 2) {
      _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
      part = _mm_movehl_ps(part, part);
      p += 2;
      lanes -= 2;
    }
    if (lanes >= 1) _mm_store_ss(p, part);
  }
};

#include "../kernel_impl.h"
#include "../winograd_impl.h"
#include "../kernel_table_impl.h"

// 4 segments x 2 partial sums give 8 independent add chains, enough to
// cover the add latency (4 cycles at 2 per cycle on recent cores).
constexpr int kQuantTile = 4;
// 4 output channels x 3 segments = 12 accumulators + 3 inputs + 1 weight
// fill the 16 ymm registers.
constexpr int kDenseTile = 3;
constexpr int kDenseOutBlock = 4;
constexpr int kDenseSingleTile = 8;

}  // namespace

const KernelTable& avx2_kernels() {
  static const KernelTable table =
      make_kernel_table<Ops, kQuantTile, kDenseTile, kDenseOutBlock,
                        kDenseSingleTile>(Isa::kAvx2);
  return table;
}

}  // namespace detail
}  // namespace dgms_rt
