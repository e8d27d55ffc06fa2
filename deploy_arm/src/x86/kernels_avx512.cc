// x86-64 AVX-512 kernels: 16 output pixels per vector and 32 vector
// registers. This file is compiled with -mavx512f -mavx2 -mfma and only
// called after a runtime CPU check. Every lane gets the same operations
// as in the AVX2 and scalar kernels, so the quantized results are the
// same bits.
#include <immintrin.h>

#include "../kernels.h"

// GCC 12 warns that _mm512_max_ps and _mm512_min_ps may read an
// uninitialised value: the masked built-ins they expand to take an unused
// pass-through operand. The warning does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dgms_rt {
namespace detail {
namespace {

struct Ops {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static __mmask16 first(int lanes) {
    return static_cast<__mmask16>((1u << lanes) - 1u);
  }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float v) { return _mm512_set1_ps(v); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  // Loads the first `lanes` floats and zeros the rest; reads nothing past
  // p + lanes.
  static Vec load_partial(const float* p, int lanes) {
    return _mm512_maskz_loadu_ps(first(lanes), p);
  }
  // Lanes [0, lanes) of a and the others of b.
  static Vec select_first(Vec a, Vec b, int lanes) {
    return _mm512_mask_blend_ps(first(lanes), b, a);
  }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  // Stores lane l of v[0], ..., v[3] as the 4 floats at dst[l], for every
  // lane. This and deinterleave4 serve the Winograd templates, which this
  // table compiles but does not use (see make_table).
  static void store_columns4(const Vec v[4], float* const dst[16]) {
    alignas(64) float values[4][16];
    for (int j = 0; j < 4; ++j) _mm512_store_ps(values[j], v[j]);
    for (int l = 0; l < 16; ++l) {
      for (int j = 0; j < 4; ++j) dst[l][j] = values[j][l];
    }
  }
  // Splits the 64 floats at p by index modulo 4: phase[q] gets p[4 * l +
  // q] in lane l.
  static void deinterleave4(const float* p, Vec phase[4]) {
    const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32,
                                            36, 40, 44, 48, 52, 56, 60);
    for (int q = 0; q < 4; ++q) {
      phase[q] = _mm512_i32gather_ps(
          _mm512_add_epi32(first, _mm512_set1_epi32(q)), p, 4);
    }
  }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec fused(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
  static void store(float* p, Vec v, int lanes) {
    if (lanes == kLanes) {
      _mm512_storeu_ps(p, v);
      return;
    }
    _mm512_mask_storeu_ps(p, first(lanes), v);
  }
};

#include "../kernel_impl.h"
#include "../winograd_impl.h"
#include "../kernel_table_impl.h"

// 4 segments x 2 partial sums give 8 independent add chains.
constexpr int kQuantTile = 4;
// 8 output channels x 2 segments = 16 accumulators + 2 inputs + 1 weight.
constexpr int kDenseTile = 2;
constexpr int kDenseOutBlock = 8;
constexpr int kDenseSingleTile = 8;

KernelTable make_table() {
  KernelTable table =
      make_kernel_table<Ops, kQuantTile, kDenseTile, kDenseOutBlock,
                        kDenseSingleTile>(Isa::kAvx512);
  // The Winograd kernels are the AVX2 ones: the 16-lane version was about
  // 17% slower on a RetinaNet head on an AMD Zen 4 processor, and
  // Winograd results are the same bits in every instruction set.
  const KernelTable& avx2 = avx2_kernels();
  table.winograd_lanes = avx2.winograd_lanes;
  table.winograd_block_tiles = avx2.winograd_block_tiles;
  table.winograd_out_block = avx2.winograd_out_block;
  table.winograd_input = avx2.winograd_input;
  table.winograd_block = avx2.winograd_block;
  return table;
}

}  // namespace

const KernelTable& avx512_kernels() {
  static const KernelTable table = make_table();
  return table;
}

}  // namespace detail
}  // namespace dgms_rt
