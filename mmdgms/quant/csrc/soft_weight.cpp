// Fused CPU kernels for DGMS soft weights, their gradients and hard indices.
//
// Per weight w and component k (K components, notation of functional.py):
//   l_k = c_k - a_k (w - mu_k)^2        c = log pi - log sigma, a = 1/(2 sigma^2)
//   e_k = exp(l_k - max_j l_j)          0 where l_k - max_j l_j < floor
//   S1 = sum_k e_k,  g_k = e_k / S1     (so max_k g_k = 1 / S1)
//   q_k = exp((e_k - 1) / (S1 tau))     = exp(g_k / tau - max_j g_j / tau),
//                                         0 where the argument < floor
//   S2 = sum_k q_k,  r_k = q_k / S2,  y = sum_k r_k mu_k
//
// The chunked torch implementation in functional.py makes about 13 passes
// over a K x chunk tensor in the forward pass and 25 in the backward pass.
// Here each block of kBlock weights keeps its K x kBlock intermediates in a
// small buffer that stays in cache. The loops over the weights of a block
// are vectorised, and nothing K x N is ever allocated.
//
// Reductions over the weights (the gradients of the K-sized mixture terms)
// are summed per task in double and the task partials are added in task
// order, so results do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

// The per-block kernels are inlined into one wrapper per instruction set
// (see DGMS_DEFINE_KERNELS), so each wrapper is vectorised for its target.
#if defined(__GNUC__)
#define DGMS_INLINE inline __attribute__((always_inline))
#else
#define DGMS_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DGMS_X86 1
#define DGMS_TARGET_AVX512                                          \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma," \
                        "prefer-vector-width=512")))
#define DGMS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace {

// Weights per vectorised block. Larger blocks amortise the per-component
// sums of the backward pass over more weights. Forward plus backward on
// 1.2 M weights, K = 16, one thread of a Xeon with AVX-512 took 29.6 ns per
// weight with 64, 25.2 with 128, 24.5 with 256 and 29.3 with 512.
constexpr int64_t kBlock = 256;
constexpr int64_t kTaskWork = 1 << 18;  // weights x components per task

// exp(x) for float and x <= 0, vectorisable: x = n ln2 + r with
// |r| <= ln2 / 2 and exp(x) = 2^n p(r). p is a degree-5 polynomial fitted
// to exp on that interval (relative error 7.5e-8, and 2.1e-7 or about
// 3.5 ulp with float32 rounding, checked on 2e5 points). Adding
// 1.5 * 2^23 + 127 rounds x log2(e) to an integer and leaves n + 127 in
// the low mantissa bits, so a shift by 23 builds 2^n. Arguments are clamped
// to -80, where 2^n is still a normal float, because a subnormal product
// would take the slow microcode path. Callers map anything below their
// floor (at least -80) to 0.
DGMS_INLINE float exp_nonpositive(float x) {
  x = x < -80.0f ? -80.0f : x;
  const float shifter = 12583039.0f;  // 1.5 * 2^23 + 127
  float t = x * 1.44269504088896341f + shifter;
  float n = t - shifter;
  float r = x - n * 0.693145751953125f;  // ln2 split in two for exactness
  r = r - n * 1.428606765330187045e-06f;
  float p = 0.008297650143504143f;
  p = p * r + 0.04191538318991661f;
  p = p * r + 0.16667574644088745f;
  p = p * r + 0.49998894333839417f;
  p = p * r + 0.9999997019767761f;
  p = p * r + 1.0000001192092896f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

DGMS_INLINE double exp_nonpositive(double x) { return std::exp(x); }

template <typename T>
struct Mixture {
  int64_t k;
  const T* means;
  const T* log_coef;
  const T* inv_two_var;
  const T* two_a;  // 2 * inv_two_var
  T inv_tau;
  T floor;  // softmax entries whose argument is below this are set to 0
};

// Fills e (K x kBlock) with the floored exp(l - max l), and per weight
// s1 = sum e, scale = 1 / (S1 tau) and mu_top, the mean of the component
// with the largest l (the first one on ties).
template <typename T>
DGMS_INLINE void first_softmax(const T* w, const Mixture<T>& m, T* e, T* s1,
                               T* scale, T* mu_top) {
  T row_max[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) {
    row_max[j] = -std::numeric_limits<T>::infinity();
    mu_top[j] = m.means[0];
  }
  for (int64_t k = 0; k < m.k; ++k) {
    const T mu = m.means[k], c = m.log_coef[k], a = m.inv_two_var[k];
    T* ek = e + k * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) {
      T d = w[j] - mu;
      T l = c - a * d * d;
      ek[j] = l;
      bool better = l > row_max[j];
      row_max[j] = better ? l : row_max[j];
      mu_top[j] = better ? mu : mu_top[j];
    }
  }
  for (int64_t j = 0; j < kBlock; ++j) s1[j] = T(0);
  for (int64_t k = 0; k < m.k; ++k) {
    T* ek = e + k * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) {
      T x = ek[j] - row_max[j];
      T v = exp_nonpositive(x);
      v = x < m.floor ? T(0) : v;
      ek[j] = v;
      s1[j] += v;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < kBlock; ++j) scale[j] = m.inv_tau / s1[j];
}

// Sums, per weight, the floored q = exp((e - 1) scale) into s2 = sum q and
// num = sum q (mu - mu_top).
//
// The soft weight is then y = mu_top + num / s2, not sum q mu / s2: the
// component of mu_top has q = 1, the largest, so with a nearly one-hot r
// the difference y - mu_top is small and comes out with full relative
// precision. The backward pass needs mu_k - y, which from sum q mu / s2
// would lose that precision to cancellation (about 1e-3 relative in
// float64 at tau = 1e-4).
template <typename T>
DGMS_INLINE void second_softmax(const T* e, const T* scale, const T* mu_top,
                                const Mixture<T>& m, T* s2, T* num) {
  for (int64_t j = 0; j < kBlock; ++j) {
    s2[j] = T(0);
    num[j] = T(0);
  }
  for (int64_t k = 0; k < m.k; ++k) {
    const T mu = m.means[k];
    const T* ek = e + k * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) {
      T x = (ek[j] - T(1)) * scale[j];
      T v = exp_nonpositive(x);
      v = x < m.floor ? T(0) : v;
      s2[j] += v;
      num[j] += v * (mu - mu_top[j]);
    }
  }
}

// second_softmax for the backward pass: it also stores q (K x kBlock) and
// sums e q and e q (mu - mu_top) per weight, from which
// row_dot = sum_k g_k dz_k follows before any dz_k is known.
template <typename T>
DGMS_INLINE void second_softmax_products(const T* e, const T* scale,
                                         const T* mu_top, const Mixture<T>& m,
                                         T* q, T* s2, T* num, T* eq_sum,
                                         T* eq_num) {
  for (int64_t j = 0; j < kBlock; ++j) {
    s2[j] = T(0);
    num[j] = T(0);
    eq_sum[j] = T(0);
    eq_num[j] = T(0);
  }
  for (int64_t k = 0; k < m.k; ++k) {
    const T mu = m.means[k];
    const T* ek = e + k * kBlock;
    T* qk = q + k * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) {
      T x = (ek[j] - T(1)) * scale[j];
      T v = exp_nonpositive(x);
      v = x < m.floor ? T(0) : v;
      T shifted = mu - mu_top[j];
      T ev = ek[j] * v;
      qk[j] = v;
      s2[j] += v;
      num[j] += v * shifted;
      eq_sum[j] += ev;
      eq_num[j] += ev * shifted;
    }
  }
}

// Copies up to kBlock values into a full block, padded with zeros.
template <typename T>
DGMS_INLINE void load_block(const T* src, int64_t count, T* dst) {
  for (int64_t j = 0; j < count; ++j) dst[j] = src[j];
  for (int64_t j = count; j < kBlock; ++j) dst[j] = T(0);
}

DGMS_INLINE int64_t block_size(int64_t block, int64_t n) {
  int64_t rest = n - block * kBlock;
  return rest < kBlock ? rest : kBlock;
}

// Soft weights of blocks [b0, b1). scratch: K kBlock values.
template <typename T>
DGMS_INLINE void forward_blocks(const T* w, int64_t n, const Mixture<T>& m,
                                int64_t b0, int64_t b1, T* scratch, T* out) {
  T* e = scratch;
  T wb[kBlock], s1[kBlock], scale[kBlock], mu_top[kBlock], s2[kBlock],
      num[kBlock];
  // Results below the smallest normal float32 are set to 0: they would
  // slow the convolutions down, and the change is below 1.2e-38.
  const T smallest_normal = std::numeric_limits<float>::min();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kBlock;
    const int64_t count = block_size(b, n);
    load_block(w + start, count, wb);
    first_softmax(wb, m, e, s1, scale, mu_top);
    second_softmax(e, scale, mu_top, m, s2, num);
    for (int64_t j = 0; j < count; ++j) {
      T y = mu_top[j] + num[j] / s2[j];
      out[start + j] = std::abs(y) < smallest_normal ? T(0) : y;
    }
  }
}

// Gradients of blocks [b0, b1). With dz_k = dy r_k (mu_k - y),
// row_dot = sum_k g_k dz_k and G_k = g_k (dz_k - row_dot) = tau dL/dl_k,
// it adds to `part` (4 K + 1 doubles): sum G_k, sum G_k d_k^2, sum G_k d_k,
// sum dy r_k (K each, d = w - mu), then sum row_dot; and it writes
// dL/dw = -(1/tau) sum_k G_k 2 a_k d_k to grad_w unless grad_w is null.
template <typename T>
DGMS_INLINE void backward_blocks(const T* w, const T* grad_out, int64_t n,
                                 const Mixture<T>& m, int64_t b0, int64_t b1,
                                 T* scratch, T* grad_w, double* part) {
  const int64_t k_count = m.k;
  T* e = scratch;
  T* q = scratch + k_count * kBlock;
  T wb[kBlock], dy[kBlock], s1[kBlock], scale[kBlock], mu_top[kBlock],
      s2[kBlock], num[kBlock], eq_sum[kBlock], eq_num[kBlock],
      offset[kBlock], inv_s1[kBlock], dy_inv_s2[kBlock], row_dot[kBlock],
      gw[kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kBlock;
    const int64_t count = block_size(b, n);
    load_block(w + start, count, wb);
    // Padding lanes get dy = 0, so they add nothing to any sum.
    load_block(grad_out + start, count, dy);
    first_softmax(wb, m, e, s1, scale, mu_top);
    second_softmax_products(e, scale, mu_top, m, q, s2, num, eq_sum, eq_num);

    // With y - mu_top = offset and mu_k - y = (mu_k - mu_top) - offset,
    // row_dot = dy / (S1 S2) (sum_k e_k q_k (mu_k - mu_top) - offset
    // sum_k e_k q_k).
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) {
      offset[j] = num[j] / s2[j];
      inv_s1[j] = T(1) / s1[j];
      dy_inv_s2[j] = dy[j] / s2[j];
      row_dot[j] =
          dy_inv_s2[j] * inv_s1[j] * (eq_num[j] - offset[j] * eq_sum[j]);
      gw[j] = T(0);
    }

    for (int64_t k = 0; k < k_count; ++k) {
      const T mu = m.means[k], two_a = m.two_a[k];
      const T* ek = e + k * kBlock;
      const T* qk = q + k * kBlock;
      T direct = T(0), sum_g = T(0), sum_g_sq = T(0), sum_g_diff = T(0);
#pragma omp simd reduction(+ : direct, sum_g, sum_g_sq, sum_g_diff)
      for (int64_t j = 0; j < kBlock; ++j) {
        T dy_r = qk[j] * dy_inv_s2[j];
        T dz = dy_r * ((mu - mu_top[j]) - offset[j]);
        T g = ek[j] * inv_s1[j] * (dz - row_dot[j]);
        T d = wb[j] - mu;
        T gd = g * d;
        direct += dy_r;
        sum_g += g;
        sum_g_diff += gd;
        sum_g_sq += gd * d;
        gw[j] += gd * two_a;
      }
      part[k] += sum_g;
      part[k_count + k] += sum_g_sq;
      part[2 * k_count + k] += sum_g_diff;
      part[3 * k_count + k] += direct;
    }

    T dot_total = T(0);
#pragma omp simd reduction(+ : dot_total)
    for (int64_t j = 0; j < kBlock; ++j) dot_total += row_dot[j];
    part[4 * k_count] += dot_total;
    if (grad_w != nullptr) {
      for (int64_t j = 0; j < count; ++j)
        grad_w[start + j] = -m.inv_tau * gw[j];
    }
  }
}

// argmax_k l_k(w) of blocks [b0, b1); ties go to the lowest k, as in
// torch.argmax.
template <typename T>
DGMS_INLINE void hard_blocks(const T* w, int64_t n, const Mixture<T>& m,
                             int64_t b0, int64_t b1, int64_t* out) {
  // The index is kept as T, so the loop over weights stays vectorised.
  T wb[kBlock], best[kBlock], arg[kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kBlock;
    const int64_t count = block_size(b, n);
    load_block(w + start, count, wb);
    for (int64_t j = 0; j < kBlock; ++j) {
      best[j] = -std::numeric_limits<T>::infinity();
      arg[j] = T(0);
    }
    for (int64_t k = 0; k < m.k; ++k) {
      const T mu = m.means[k], c = m.log_coef[k], a = m.inv_two_var[k];
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) {
        T d = wb[j] - mu;
        T l = c - a * d * d;
        bool better = l > best[j];
        best[j] = better ? l : best[j];
        arg[j] = better ? static_cast<T>(k) : arg[j];
      }
    }
    for (int64_t j = 0; j < count; ++j)
      out[start + j] = static_cast<int64_t>(arg[j]);
  }
}

template <typename T>
struct Kernels {
  void (*forward)(const T*, int64_t, const Mixture<T>&, int64_t, int64_t, T*,
                  T*);
  void (*backward)(const T*, const T*, int64_t, const Mixture<T>&, int64_t,
                   int64_t, T*, T*, double*);
  void (*hard)(const T*, int64_t, const Mixture<T>&, int64_t, int64_t,
               int64_t*);
};

// One non-inline copy of each kernel per (dtype, instruction set).
#define DGMS_DEFINE_KERNELS(T, SUFFIX, ATTR)                                 \
  ATTR void forward_##T##_##SUFFIX(const T* w, int64_t n,                     \
                                   const Mixture<T>& m, int64_t b0,          \
                                   int64_t b1, T* scratch, T* out) {         \
    forward_blocks<T>(w, n, m, b0, b1, scratch, out);                         \
  }                                                                           \
  ATTR void backward_##T##_##SUFFIX(const T* w, const T* dy, int64_t n,       \
                                    const Mixture<T>& m, int64_t b0,         \
                                    int64_t b1, T* scratch, T* grad_w,        \
                                    double* part) {                           \
    backward_blocks<T>(w, dy, n, m, b0, b1, scratch, grad_w, part);           \
  }                                                                           \
  ATTR void hard_##T##_##SUFFIX(const T* w, int64_t n, const Mixture<T>& m,   \
                                int64_t b0, int64_t b1, int64_t* out) {      \
    hard_blocks<T>(w, n, m, b0, b1, out);                                     \
  }                                                                           \
  const Kernels<T> kernels_##T##_##SUFFIX = {                                 \
      forward_##T##_##SUFFIX, backward_##T##_##SUFFIX, hard_##T##_##SUFFIX};

DGMS_DEFINE_KERNELS(float, baseline, )
DGMS_DEFINE_KERNELS(double, baseline, )
#ifdef DGMS_X86
DGMS_DEFINE_KERNELS(float, avx2, DGMS_TARGET_AVX2)
DGMS_DEFINE_KERNELS(float, avx512, DGMS_TARGET_AVX512)
#endif

bool cpu_supports(const std::string& isa) {
  if (isa == "baseline") return true;
#ifdef DGMS_X86
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
#endif
  return false;
}

const char* const kIsas[] = {"avx512", "avx2", "baseline"};

std::string best_isa() {
  for (const char* isa : kIsas)
    if (cpu_supports(isa)) return isa;
  return "baseline";
}

// Resolves "" to the best instruction set of this CPU and rejects one the
// CPU lacks, so a test that requests a variant never runs another.
std::string resolve_isa(const std::string& isa) {
  if (isa.empty()) return best_isa();
  bool known = false;
  for (const char* name : kIsas) known = known || isa == name;
  TORCH_CHECK(known, "unknown instruction set '", isa,
              "': expected one of avx512, avx2, baseline or '' (best)");
  TORCH_CHECK(cpu_supports(isa), "this CPU does not support the '", isa,
              "' kernels; available_isas() lists the ones it does");
  return isa;
}

template <typename T>
Kernels<T> select_kernels(const std::string& isa);

template <>
Kernels<float> select_kernels<float>(const std::string& isa) {
#ifdef DGMS_X86
  if (isa == "avx512") return kernels_float_avx512;
  if (isa == "avx2") return kernels_float_avx2;
#endif
  return kernels_float_baseline;
}

// float64 is for tests and references; it has the baseline build only.
template <>
Kernels<double> select_kernels<double>(const std::string&) {
  return kernels_double_baseline;
}

void check_inputs(const at::Tensor& w, const at::Tensor& means,
                  const at::Tensor& log_coef, const at::Tensor& inv_two_var) {
  for (const at::Tensor* t : {&w, &means, &log_coef, &inv_two_var}) {
    TORCH_CHECK(t->device().is_cpu(),
                "the fused DGMS kernels take CPU tensors, got a tensor on ",
                t->device());
    TORCH_CHECK(t->dim() == 1 && t->is_contiguous(),
                "the fused DGMS kernels take contiguous 1-D tensors, got "
                "shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == w.scalar_type(),
                "the fused DGMS kernels take tensors of one dtype, got ",
                t->scalar_type(), " and ", w.scalar_type());
  }
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "the fused DGMS kernels take float32 or float64, got ",
              w.scalar_type());
  TORCH_CHECK(means.numel() > 0 && means.numel() == log_coef.numel() &&
                  means.numel() == inv_two_var.numel(),
              "means, log_coef and inv_two_var must have one non-zero "
              "length, got ", means.numel(), ", ", log_coef.numel(), ", ",
              inv_two_var.numel());
}

void check_floor(double floor) {
  TORCH_CHECK(floor >= -80.0 && floor < 0.0,
              "floor must be in [-80, 0), got ", floor);
}

// Blocks per parallel task: about kTaskWork weight-component pairs.
int64_t blocks_per_task(int64_t k) {
  int64_t blocks = kTaskWork / (k * kBlock);
  return blocks < 1 ? 1 : blocks;
}

int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

template <typename T>
Mixture<T> make_mixture(const at::Tensor& means, const at::Tensor& log_coef,
                        const at::Tensor& inv_two_var,
                        const std::vector<T>& two_a, double inv_tau,
                        double floor) {
  return Mixture<T>{means.numel(),
                    means.data_ptr<T>(),
                    log_coef.data_ptr<T>(),
                    inv_two_var.data_ptr<T>(),
                    two_a.data(),
                    static_cast<T>(inv_tau),
                    static_cast<T>(floor)};
}

template <typename T>
std::vector<T> doubled(const at::Tensor& inv_two_var) {
  std::vector<T> out(inv_two_var.numel());
  const T* a = inv_two_var.data_ptr<T>();
  for (size_t k = 0; k < out.size(); ++k) out[k] = T(2) * a[k];
  return out;
}

}  // namespace

at::Tensor soft_weight_forward(const at::Tensor& w, const at::Tensor& means,
                               const at::Tensor& log_coef,
                               const at::Tensor& inv_two_var, double inv_tau,
                               double floor, const std::string& isa) {
  check_inputs(w, means, log_coef, inv_two_var);
  check_floor(floor);
  const std::string chosen = resolve_isa(isa);
  at::Tensor out = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_weight_forward", [&] {
    const auto kernels = select_kernels<scalar_t>(chosen);
    const auto two_a = doubled<scalar_t>(inv_two_var);
    const auto m = make_mixture<scalar_t>(means, log_coef, inv_two_var,
                                          two_a, inv_tau, floor);
    const int64_t n = w.numel();
    const scalar_t* w_ptr = w.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_blocks(n), blocks_per_task(m.k),
                     [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> scratch(m.k * kBlock);
      kernels.forward(w_ptr, n, m, b0, b1, scratch.data(), out_ptr);
    });
  });
  return out;
}

std::vector<at::Tensor> soft_weight_backward(
    const at::Tensor& w, const at::Tensor& grad_out, const at::Tensor& means,
    const at::Tensor& log_coef, const at::Tensor& inv_two_var, double inv_tau,
    double floor, bool need_grad_w, const std::string& isa) {
  check_inputs(w, means, log_coef, inv_two_var);
  check_floor(floor);
  TORCH_CHECK(grad_out.sizes() == w.sizes() && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == w.scalar_type(),
              "grad_out must be contiguous and match the weights in shape "
              "and dtype, got shape ", grad_out.sizes(), " and ",
              grad_out.scalar_type());
  const std::string chosen = resolve_isa(isa);
  at::Tensor grad_w = need_grad_w ? at::empty_like(w) : at::Tensor();
  const int64_t k_count = means.numel();
  const int64_t width = 4 * k_count + 1;
  at::Tensor sums = at::zeros({width}, w.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_weight_backward", [&] {
    const auto kernels = select_kernels<scalar_t>(chosen);
    const auto two_a = doubled<scalar_t>(inv_two_var);
    const auto m = make_mixture<scalar_t>(means, log_coef, inv_two_var,
                                          two_a, inv_tau, floor);
    const int64_t n = w.numel();
    const scalar_t* w_ptr = w.data_ptr<scalar_t>();
    const scalar_t* dy_ptr = grad_out.data_ptr<scalar_t>();
    scalar_t* gw_ptr = need_grad_w ? grad_w.data_ptr<scalar_t>() : nullptr;
    const int64_t blocks = num_blocks(n);
    const int64_t per_task = blocks_per_task(k_count);
    const int64_t num_tasks = (blocks + per_task - 1) / per_task;

    // Fixed tasks, each with its own partial sums, are added in task
    // order, so the result does not depend on the number of threads.
    std::vector<double> partials(num_tasks * width, 0.0);
    at::parallel_for(0, num_tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> scratch(2 * k_count * kBlock);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b0 = task * per_task;
        const int64_t b1 = std::min(b0 + per_task, blocks);
        kernels.backward(w_ptr, dy_ptr, n, m, b0, b1, scratch.data(), gw_ptr,
                         partials.data() + task * width);
      }
    });
    double* out = sums.data_ptr<double>();
    for (int64_t task = 0; task < num_tasks; ++task)
      for (int64_t i = 0; i < width; ++i) out[i] += partials[task * width + i];
  });
  return {grad_w, sums};
}

at::Tensor hard_indices(const at::Tensor& w, const at::Tensor& means,
                        const at::Tensor& log_coef,
                        const at::Tensor& inv_two_var,
                        const std::string& isa) {
  check_inputs(w, means, log_coef, inv_two_var);
  const std::string chosen = resolve_isa(isa);
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "hard_indices", [&] {
    const auto kernels = select_kernels<scalar_t>(chosen);
    const auto two_a = doubled<scalar_t>(inv_two_var);
    const auto m = make_mixture<scalar_t>(means, log_coef, inv_two_var,
                                          two_a, 1.0, -30.0);
    const int64_t n = w.numel();
    const scalar_t* w_ptr = w.data_ptr<scalar_t>();
    int64_t* out_ptr = out.data_ptr<int64_t>();
    at::parallel_for(0, num_blocks(n), blocks_per_task(m.k),
                     [&](int64_t b0, int64_t b1) {
      kernels.hard(w_ptr, n, m, b0, b1, out_ptr);
    });
  });
  return out;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : kIsas)
    if (cpu_supports(isa)) out.push_back(isa);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.def("soft_weight_forward", &soft_weight_forward,
             "DGMS soft weights sum_k r_k mu_k of 1-D weights",
             py::arg("w"), py::arg("means"), py::arg("log_coef"),
             py::arg("inv_two_var"), py::arg("inv_tau"), py::arg("floor"),
             py::arg("isa") = "");
  module.def("soft_weight_backward", &soft_weight_backward,
             "gradient of the weights and per-component sums from which "
             "the mixture-term gradients follow",
             py::arg("w"), py::arg("grad_out"), py::arg("means"),
             py::arg("log_coef"), py::arg("inv_two_var"), py::arg("inv_tau"),
             py::arg("floor"), py::arg("need_grad_w"), py::arg("isa") = "");
  module.def("hard_indices", &hard_indices, "argmax_k l_k(w) per weight",
             py::arg("w"), py::arg("means"), py::arg("log_coef"),
             py::arg("inv_two_var"), py::arg("isa") = "");
  module.def("available_isas", &available_isas,
             "instruction sets of this CPU that kernels exist for, best "
             "first");
}
