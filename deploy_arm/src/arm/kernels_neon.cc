// AArch64 NEON kernels: 4 output pixels per 128-bit vector. NEON (ASIMD)
// is part of the AArch64 baseline, so no runtime check is needed.
#include <arm_neon.h>

#include "../kernels.h"

namespace dgms_rt {
namespace detail {
namespace {

struct Ops {
  using Vec = float32x4_t;
  static constexpr int kLanes = 4;
  static Vec zero() { return vdupq_n_f32(0.0f); }
  static Vec set1(float v) { return vdupq_n_f32(v); }
  static Vec load(const float* p) { return vld1q_f32(p); }
  // Loads the first `lanes` floats and zeros the rest; reads nothing past
  // p + lanes.
  static Vec load_partial(const float* p, int lanes) {
    float tmp[kLanes] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < lanes; ++i) tmp[i] = p[i];
    return vld1q_f32(tmp);
  }
  // Lanes [0, lanes) of a and the others of b.
  static Vec select_first(Vec a, Vec b, int lanes) {
    const uint32_t index[kLanes] = {0, 1, 2, 3};
    const uint32x4_t mask =
        vcltq_u32(vld1q_u32(index), vdupq_n_u32(static_cast<uint32_t>(lanes)));
    return vbslq_f32(mask, a, b);
  }
  static Vec add(Vec a, Vec b) { return vaddq_f32(a, b); }
  static Vec sub(Vec a, Vec b) { return vsubq_f32(a, b); }
  // Stores lane l of v[0], ..., v[3] as the 4 floats at dst[l], for every
  // lane: a 4 x 4 transpose.
  static void store_columns4(const Vec v[4], float* const dst[4]) {
    const float32x4x2_t ab = vtrnq_f32(v[0], v[1]);
    const float32x4x2_t cd = vtrnq_f32(v[2], v[3]);
    vst1q_f32(dst[0], vcombine_f32(vget_low_f32(ab.val[0]),
                                   vget_low_f32(cd.val[0])));
    vst1q_f32(dst[1], vcombine_f32(vget_low_f32(ab.val[1]),
                                   vget_low_f32(cd.val[1])));
    vst1q_f32(dst[2], vcombine_f32(vget_high_f32(ab.val[0]),
                                   vget_high_f32(cd.val[0])));
    vst1q_f32(dst[3], vcombine_f32(vget_high_f32(ab.val[1]),
                                   vget_high_f32(cd.val[1])));
  }
  // Splits the 16 floats at p by index modulo 4: phase[q] gets p[4 * l +
  // q] in lane l.
  static void deinterleave4(const float* p, Vec phase[4]) {
    const float32x4x4_t phases = vld4q_f32(p);
    for (int q = 0; q < 4; ++q) phase[q] = phases.val[q];
  }
  static Vec mul(Vec a, Vec b) { return vmulq_f32(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return vfmaq_f32(c, a, b); }
  static Vec fused(Vec a, Vec b, Vec c) { return vfmaq_f32(c, a, b); }
  static Vec max(Vec a, Vec b) { return vmaxq_f32(a, b); }
  static Vec min(Vec a, Vec b) { return vminq_f32(a, b); }
  static void store(float* p, Vec v, int lanes) {
    if (lanes == kLanes) {
      vst1q_f32(p, v);
      return;
    }
    float tmp[kLanes];
    vst1q_f32(tmp, v);
    for (int i = 0; i < lanes; ++i) p[i] = tmp[i];
  }
};

#include "../kernel_impl.h"
#include "../winograd_impl.h"
#include "../kernel_table_impl.h"

// 8 segments (32 pixels) x 2 partial sums = 16 add chains plus 8 output
// accumulators: 24 of the 32 vector registers.
constexpr int kQuantTile = 8;
// 4 output channels x 5 segments = 20 accumulators + 5 inputs + weights.
constexpr int kDenseTile = 5;
constexpr int kDenseOutBlock = 4;
constexpr int kDenseSingleTile = 8;

}  // namespace

const KernelTable& neon_kernels() {
  static const KernelTable table =
      make_kernel_table<Ops, kQuantTile, kDenseTile, kDenseOutBlock,
                        kDenseSingleTile>(Isa::kNeon);
  return table;
}

}  // namespace detail
}  // namespace dgms_rt
