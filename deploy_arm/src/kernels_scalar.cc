// Portable scalar kernels: the reference that every SIMD path must match.
#include <cmath>

#include "kernels.h"

namespace dgms_rt {
namespace detail {
namespace {

struct Ops {
  using Vec = float;
  static constexpr int kLanes = 1;
  static Vec zero() { return 0.0f; }
  static Vec set1(float v) { return v; }
  static Vec load(const float* p) { return *p; }
  static Vec load_partial(const float* p, int lanes) {
    return lanes > 0 ? *p : 0.0f;
  }
  // Lanes [0, lanes) of a and the others of b.
  static Vec select_first(Vec a, Vec b, int lanes) {
    return lanes > 0 ? a : b;
  }
  static Vec add(Vec a, Vec b) { return a + b; }
  static Vec sub(Vec a, Vec b) { return a - b; }
  // Stores v[0], ..., v[3] as the 4 floats at dst[0].
  static void store_columns4(const Vec v[4], float* const dst[1]) {
    for (int j = 0; j < 4; ++j) dst[0][j] = v[j];
  }
  // Splits the 4 floats at p by index modulo 4: phase[q] is p[q].
  static void deinterleave4(const float* p, Vec phase[4]) {
    for (int q = 0; q < 4; ++q) phase[q] = p[q];
  }
  static Vec mul(Vec a, Vec b) { return a * b; }
  static Vec fmadd(Vec a, Vec b, Vec c) { return a * b + c; }
  static Vec fused(Vec a, Vec b, Vec c) { return std::fma(a, b, c); }
  // Same results as the SIMD max/min for finite values, -0.0 included.
  static Vec max(Vec a, Vec b) { return a > b ? a : b; }
  static Vec min(Vec a, Vec b) { return a < b ? a : b; }
  static void store(float* p, Vec v, int lanes) {
    if (lanes > 0) *p = v;
  }
};

#include "kernel_impl.h"
#include "winograd_impl.h"
#include "kernel_table_impl.h"

constexpr int kQuantTile = 4;
constexpr int kDenseTile = 2;
constexpr int kDenseOutBlock = 4;
constexpr int kDenseSingleTile = 4;

}  // namespace

const KernelTable& scalar_kernels() {
  static const KernelTable table =
      make_kernel_table<Ops, kQuantTile, kDenseTile, kDenseOutBlock,
                        kDenseSingleTile>(Isa::kScalar);
  return table;
}

}  // namespace detail
}  // namespace dgms_rt
