// CPU kernels of snippet_distill_loss and mmsd_distill_loss (schemas: csrc/distill.cpp,
// maths: csrc/distill_math.h).
//
// One task handles a block of rows; a row (C classes, C * 3 * 4 bytes for MMSD: it
// stays in L1 for WTAL's C = 21..201) is read from memory once and walked twice:
// pass 1 takes the row maxima, pass 2 the exps, their sums and the cross terms.
// The plain forwards write the loss and 8 floats of statistics per row: the backward
// recomputes the probabilities from those statistics in one pass (read the inputs,
// write the gradients). _mmsd_distill_loss_with_grads (MMSD training, see
// csrc/autograd.cpp) walks each row a third time while it is in L1 and writes its
// gradients for an upstream gradient of 1 (forward_backward_rows; measurements below).
//
// Vectorisation: the extension is compiled without -mavx*, so at::vec::Vectorized
// falls back to its scalar code here and Sleef is not reachable. The row loops are
// written once with GCC vector extensions (a branch-free exp included) and compiled
// three times, for AVX-512, AVX2+FMA and the baseline, picked at run time from the
// CPU's features (__builtin_cpu_supports; MMSD_EXT_DISTILL_CPU_ISA=avx512|avx2|baseline
// asks for one, which is how the tests reach all three; build_info()["cpu_isa"] says
// which one runs).
//
// Inputs of any strides are made contiguous by the op (a copy only when they are
// not already); float16/bfloat16/float64 rows are converted to a float32 scratch
// row first. The loss is summed per fixed block of rows in double, then over the
// blocks in order: the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "distill_checks.h"
#include "distill_math.h"

namespace mmsd_ext {
namespace distill {
namespace {

// Rows per task: about this many classes, so a task is a few tens of microseconds
// and a large tensor splits into many tasks.
constexpr int64_t kElementsPerTask = 8192;

// Gradients in the forward against recomputing them, fwd+bwd of mmsd_distill_loss.
// The first version of these kernels (commit c8553f8) scaled the saved gradients by
// grad_out in every backward, into new tensors (12 N floats of traffic, twice the
// new pages): at (32, 2304, 201) float32, 2 threads, 593 and 608 ms against 227 and
// 258 ms for recomputing (9 N), on a shared 2-core AMD EPYC (AVX-512). Now the
// backward hands the forward's tensors over and scales them in place only where
// grad_out != 1 (6 N, or 12 N for a weighted term). Same machine, 2026-11-27,
// `python -m benchmarks.distill_upstream --device cpu --shapes 32x2304x201 10x750x21
// --min-run-time 3`, three runs, medians in ms:
//   (32, 2304, 201): upstream 1 74.2 / 64.1 / 60.5, upstream 0.5 82.0 / 73.0 / 69.3,
//                    recompute 77.5 / 76.2 / 63.0
//   (10, 750, 21):   upstream 1 1.21 / 1.41 / 1.19, upstream 0.5 1.30 / 1.79 / 1.35,
//                    recompute 1.34 / 1.29 / 1.79
// On this loaded VM the three differ by less than the runs do; the way was chosen
// for the GPU, where the traffic sets the time at large sizes.

// Every helper below is always inlined into a function compiled for the ISA of its
// vector width, so the "vector argument without AVX changes the ABI" warning about
// the never-emitted out-of-line versions does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#define MMSD_INLINE inline __attribute__((always_inline))
#define MMSD_LAMBDA_INLINE __attribute__((always_inline))

// ---------------------------------------------------------------- SIMD layer
template <int W>
struct Vec;
template <>
struct Vec<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
  typedef uint32_t u __attribute__((vector_size(16)));
  typedef double d __attribute__((vector_size(32)));
};
template <>
struct Vec<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef double d __attribute__((vector_size(64)));
};
template <>
struct Vec<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
  typedef uint32_t u __attribute__((vector_size(64)));
  typedef double d __attribute__((vector_size(128)));
};

template <int W>
using vf = typename Vec<W>::f;
template <int W>
using vi = typename Vec<W>::i;
template <int W>
using vu = typename Vec<W>::u;
template <int W>
using vd = typename Vec<W>::d;

template <int W>
MMSD_INLINE vf<W> splat(float x) {
  return vf<W>{} + x;
}

// x as computed, rounded to float: the empty asm hides how it was made, so the compiler
// cannot contract the product behind it into a later sum. GCC contracts a * b - c into
// one fma where the ISA has one (the avx2 and avx512 kernels), and the difference of two
// equal probabilities p = exp(a) * (1 / S) then came out as the rounding error of one
// product (up to 5e-8 in a gradient that must be 0).
template <int W>
MMSD_INLINE vf<W> rounded(vf<W> x) {
  asm("" : "+v"(x));
  return x;
}

// W floats from p, or the n < W left, padded with -inf (a class that does not
// exist: probability 0, cross term 0).
template <int W>
MMSD_INLINE vf<W> load(const float* p, int64_t n) {
  vf<W> v;
  if (n >= W) {
    std::memcpy(&v, p, sizeof(v));  // a constant size: one vector load
  } else {
    v = splat<W>(-INFINITY);
    std::memcpy(&v, p, n * sizeof(float));
  }
  return v;
}

// load, with lanes below `skip` (classes the walk has already visited) set to -inf.
template <int W>
MMSD_INLINE vf<W> load_new(const float* p, int64_t n, int64_t skip) {
  vf<W> v = load<W>(p, n);
  if (skip > 0) {
    vi<W> lane;
    for (int i = 0; i < W; ++i) lane[i] = i;
    v = lane < static_cast<int32_t>(skip) ? splat<W>(-INFINITY) : v;
  }
  return v;
}

template <int W>
MMSD_INLINE void store(float* p, vf<W> v, int64_t n) {
  if (n >= W) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    std::memcpy(p, &v, n * sizeof(float));
  }
}

template <int W>
MMSD_INLINE vf<W> vmax(vf<W> a, vf<W> b) {
  return a > b ? a : b;
}

template <int W>
MMSD_INLINE vf<W> vmin(vf<W> a, vf<W> b) {
  return a < b ? a : b;
}

// Horizontal reductions by halving (a fixed order: deterministic).
template <int W>
MMSD_INLINE void halves(vf<W> v, vf<W / 2>& lo, vf<W / 2>& hi) {
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
}

template <int W>
MMSD_INLINE float hsum(vf<W> v) {
  if constexpr (W == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    vf<W / 2> lo, hi;
    halves<W>(v, lo, hi);
    return hsum<W / 2>(lo + hi);
  }
}

template <int W>
MMSD_INLINE float hmax(vf<W> v) {
  if constexpr (W == 4) {
    const float a = v[0] > v[2] ? v[0] : v[2], b = v[1] > v[3] ? v[1] : v[3];
    return a > b ? a : b;
  } else {
    vf<W / 2> lo, hi;
    halves<W>(v, lo, hi);
    return hmax<W / 2>(vmax<W / 2>(lo, hi));
  }
}

template <int W>
MMSD_INLINE float hmin(vf<W> v) {
  if constexpr (W == 4) {
    const float a = v[0] < v[2] ? v[0] : v[2], b = v[1] < v[3] ? v[1] : v[3];
    return a < b ? a : b;
  } else {
    vf<W / 2> lo, hi;
    halves<W>(v, lo, hi);
    return hmin<W / 2>(vmin<W / 2>(lo, hi));
  }
}

// exp(x) for x <= 0, -inf (-> 0) and NaN (-> NaN): Cody-Waite reduction and the
// degree-6 polynomial of Cephes' expf, max relative error 8e-8 (measured against
// double exp over [-87, 0]); results below FLT_MIN flush to 0, far below what a
// sum >= 1 can see. Below -87.3 (-inf included) the arithmetic makes garbage or
// NaN that the final select replaces, so the input needs no clamp.
// kSubnormal: results below FLT_MIN are the subnormals expf gives (0 only below
// -103.97), for the teacher's probabilities in a cross term, where the student's
// class may be -inf: a probability of 1e-42 there makes the loss +inf, as in the
// reference and on CUDA, where 0 would leave it finite.
template <int W, bool kSubnormal = false>
MMSD_INLINE vf<W> vexp(vf<W> x) {
  using V = vf<W>;
  // The exponent bits are made in unsigned lanes: for x between about -1.7e7 and -8.7e6
  // the signed difference below overflows (undefined behaviour, though the lane is replaced
  // by the final select); unsigned arithmetic wraps, with the same bits everywhere else.
  using U = vu<W>;
  // Round x*log2(e) to an integer n with the 1.5*2^23 trick (plain float adds).
  V t = x * 1.44269504088896341f + 12582912.0f;
  V n = t - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = splat<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  U bits = ((U)t - 0x4B400000u + 127u) << 23;  // 2^n, valid for n >= -126
  V res = p * (V)bits;
  if constexpr (kSubnormal) {
    // n in [-159, -127]: p * 2^(n + 64) is exact, and the product by 2^-64 rounds once
    // (to 0 below about -103.97).
    U low = ((U)t - 0x4B400000u + 127u + 64u) << 23;
    V sub = (p * (V)low) * 0x1p-64f;
    res = x < splat<W>(-87.33654f) ? sub : res;
    return x < splat<W>(-110.0f) ? splat<W>(0.0f) : res;  // 2^(n + 64) stays normal to n = -190
  }
  return x < splat<W>(-87.33654f) ? splat<W>(0.0f) : res;
}

// avg_exponent of distill_math.h on W lanes: ((x_r + x_f) / 2 - shift) in double,
// rounded once to float, times 1 / tau.
template <int W>
MMSD_INLINE vf<W> avg_exponent_v(vf<W> xr, vf<W> xf, float shift, float inv_tau) {
  const vd<W> d = (__builtin_convertvector(xr, vd<W>) + __builtin_convertvector(xf, vd<W>)) * 0.5 -
      static_cast<double>(shift);
  return __builtin_convertvector(d, vf<W>) * inv_tau;
}

// One class's contribution to D = sum e_t * (-a_s). kGuard: e_t == 0 must give 0
// even where a_s = -inf (a -inf logit, or the -inf padding of a row's last vector);
// rows without -inf skip the select on all full vectors.
template <int W, bool kGuard>
MMSD_INLINE vf<W> cross(vf<W> e_t, vf<W> a_s) {
  if constexpr (kGuard) {
    return e_t == splat<W>(0.0f) ? splat<W>(0.0f) : -e_t * a_s;
  } else {
    return -e_t * a_s;
  }
}

// Walks a row of C classes W at a time: step(guard, c, n, skip) on the vector at
// class c holding n classes (n < W only for rows shorter than W, padded with -inf).
// A row that is not a multiple of W ends with the vector of its last W classes,
// whose first `skip` lanes were visited before: sums mask them (load_new), maxima
// and elementwise outputs may take them again. This keeps variable-length copies
// out of every row but the shortest. guard: std::integral_constant<bool,
// kGuardFull> on full vectors, true on the last one (the forward's cross terms).
template <int W, bool kGuardFull, typename Step>
MMSD_INLINE void for_each_vector(int64_t C, Step&& step) {
  if (C < W) {
    step(std::true_type{}, int64_t(0), C, int64_t(0));
    return;
  }
  int64_t c = 0;
  for (; c + W <= C; c += W) step(std::integral_constant<bool, kGuardFull>{}, c, int64_t(W), int64_t(0));
  if (c < C) step(std::true_type{}, C - W, int64_t(W), W - (C - c));
}

// ------------------------------------------------------------- row kernels
// The backward recomputes exp(a_c) exactly as the forward did (same expression,
// same rounding) and scales it by 1 / S (inverse_sum, csrc/distill_math.h), S the
// forward's sum of those very values: the rounding of a dominant class's exp then
// cancels in p = exp(a) / S, which exp(a - log S) would not give.

// Single pair: stats = (shift_s, log S_s, shift_t, log S_t); returns the row's loss.
template <int W, bool kGuardFull>
MMSD_INLINE void pair_forward_sums(const float* s, const float* t, int64_t C, float inv_tau, float shs, float sht,
                                   float* sums) {
  using V = vf<W>;
  V ss = splat<W>(0.0f), st = ss, d = ss;
  for_each_vector<W, kGuardFull>(C, [&](auto guard, int64_t c, int64_t n, int64_t skip) MMSD_LAMBDA_INLINE {
    constexpr bool kGuard = decltype(guard)::value;
    V a = (load_new<W>(s + c, n, skip) - shs) * inv_tau;
    V b = (load_new<W>(t + c, n, skip) - sht) * inv_tau;
    V eb = vexp<W, kGuard>(b);
    ss += vexp<W>(a);
    st += eb;
    d += cross<W, kGuard>(eb, a);
  });
  sums[0] = hsum<W>(ss);
  sums[1] = hsum<W>(st);
  sums[2] = hsum<W>(d);
}

template <int W>
MMSD_INLINE float pair_forward_row(const float* s, const float* t, int64_t C, float inv_tau, float* stats) {
  using V = vf<W>;
  V ms = splat<W>(-INFINITY), mt = ms, lo = splat<W>(INFINITY);
  for_each_vector<W, false>(C, [&](auto, int64_t c, int64_t n, int64_t) MMSD_LAMBDA_INLINE {
    V xs = load<W>(s + c, n);
    ms = vmax<W>(ms, xs);
    lo = vmin<W>(lo, xs);
    mt = vmax<W>(mt, load<W>(t + c, n));
  });
  const float shs = row_shift(hmax<W>(ms)), sht = row_shift(hmax<W>(mt));
  float sums[3];
  // Only a -inf student logit makes an unguarded cross term NaN (0 * -inf).
  if (hmin<W>(lo) > -INFINITY) {
    pair_forward_sums<W, false>(s, t, C, inv_tau, shs, sht, sums);
  } else {
    pair_forward_sums<W, true>(s, t, C, inv_tau, shs, sht, sums);
  }
  stats[0] = shs;
  stats[1] = std::log(sums[0]);
  stats[2] = sht;
  stats[3] = std::log(sums[1]);
  return row_loss(sums[0], sums[1], sums[2]);
}

template <int W>
MMSD_INLINE void pair_backward_row(const float* s, const float* t, int64_t C, float inv_tau, const float* stats,
                                   float w, float* g) {
  using V = vf<W>;
  if (teacher_excluded(stats[3])) {
    std::memset(g, 0, C * sizeof(float));
    return;
  }
  const float k = w * inv_tau;
  const float inv_s = inverse_sum(stats[1]), inv_t = inverse_sum(stats[3]);
  for_each_vector<W, false>(C, [&](auto, int64_t c, int64_t n, int64_t) MMSD_LAMBDA_INLINE {
    V ps = vexp<W>((load<W>(s + c, n) - stats[0]) * inv_tau) * inv_s;
    V pt = vexp<W>((load<W>(t + c, n) - stats[2]) * inv_tau) * inv_t;
    store<W>(g + c, k * (rounded<W>(ps) - rounded<W>(pt)), n);
  });
}

// MMSD: terms L(rgb <- flow), L(flow <- rgb), L(fused <- avg), avg = (rgb + flow) / 2.
// stats = (shift, log S) of rgb, flow, fused, avg.
// Three exps per class where the rows allow: see paired_delta in distill_math.h.
template <int W, bool kPaired, bool kGuardFull>
MMSD_INLINE void mmsd_forward_sums(const float* r, const float* f, const float* u, int64_t C, float inv_tau,
                                   const float* shift, float paired_scale, float* sums) {
  using V = vf<W>;
  V zr = splat<W>(0.0f), zf = zr, zu = zr, za = zr, d1 = zr, d2 = zr, d3 = zr;
  for_each_vector<W, kGuardFull>(C, [&](auto guard, int64_t c, int64_t n, int64_t skip) MMSD_LAMBDA_INLINE {
    constexpr bool kGuard = decltype(guard)::value;
    V xr = load_new<W>(r + c, n, skip), xf = load_new<W>(f + c, n, skip);
    V ar = (xr - shift[0]) * inv_tau, af = (xf - shift[1]) * inv_tau;
    V au = (load_new<W>(u + c, n, skip) - shift[2]) * inv_tau;
    V er, ef, ea, ea_cross;
    if constexpr (kPaired) {
      V hr = vexp<W>(ar * 0.5f), hf = vexp<W>(af * 0.5f);
      er = hr * hr;
      ef = hf * hf;
      ea = hr * (hf * paired_scale);
      ea_cross = ea;
      if constexpr (kGuardFull) {
        // A row with -inf logits. Where fused is -inf, whether the mean teacher's probability
        // is 0 decides between a +inf loss and a finite one; h_r or h_f flush to 0 (a_r <
        // -174.7) where exp(a_avg) itself is still a float (a_avg >= -103.97). Those classes
        // take exp(a_avg) as the unpaired branch (and the reference, and CUDA) forms it. The
        // sum S_avg keeps the identity's value: the backward recomputes that.
        V exact = vexp<W, true>(avg_exponent_v<W>(xr, xf, shift[3], inv_tau));
        ea_cross = au == splat<W>(-INFINITY) ? exact : ea;
      }
    } else {
      er = vexp<W, kGuard>(ar);
      ef = vexp<W, kGuard>(af);
      ea = vexp<W, kGuard>(avg_exponent_v<W>(xr, xf, shift[3], inv_tau));
      ea_cross = ea;
    }
    zr += er;
    zf += ef;
    zu += vexp<W>(au);
    za += ea;
    d1 += cross<W, kGuard>(ef, ar);
    d2 += cross<W, kGuard>(er, af);
    d3 += cross<W, kGuard>(ea_cross, au);
  });
  sums[0] = hsum<W>(zr);
  sums[1] = hsum<W>(zf);
  sums[2] = hsum<W>(zu);
  sums[3] = hsum<W>(za);
  sums[4] = hsum<W>(d1);
  sums[5] = hsum<W>(d2);
  sums[6] = hsum<W>(d3);
}

template <int W>
MMSD_INLINE float mmsd_forward_row(const float* r, const float* f, const float* u, int64_t C, float inv_tau,
                                   float* stats) {
  using V = vf<W>;
  V mr = splat<W>(-INFINITY), mf = mr, mu = mr, ma = mr, lo = splat<W>(INFINITY);
  for_each_vector<W, false>(C, [&](auto, int64_t c, int64_t n, int64_t) MMSD_LAMBDA_INLINE {
    V xr = load<W>(r + c, n), xf = load<W>(f + c, n), xu = load<W>(u + c, n);
    mr = vmax<W>(mr, xr);
    mf = vmax<W>(mf, xf);
    ma = vmax<W>(ma, (xr + xf) * 0.5f);
    mu = vmax<W>(mu, xu);
    lo = vmin<W>(lo, vmin<W>(vmin<W>(xr, xf), xu));
  });
  const float shift[4] = {row_shift(hmax<W>(mr)), row_shift(hmax<W>(mf)), row_shift(hmax<W>(mu)),
                          row_shift(hmax<W>(ma))};
  const float delta = paired_delta(shift[0], shift[1], shift[3], inv_tau);
  float sums[7];
  // Only -inf logits make an unguarded cross term NaN (0 * -inf).
  const bool finite = hmin<W>(lo) > -INFINITY;
  if (delta <= kMaxPairedExponent) {  // false for NaN
    if (finite) {
      mmsd_forward_sums<W, true, false>(r, f, u, C, inv_tau, shift, std::exp(delta), sums);
    } else {
      mmsd_forward_sums<W, true, true>(r, f, u, C, inv_tau, shift, std::exp(delta), sums);
    }
  } else {
    mmsd_forward_sums<W, false, true>(r, f, u, C, inv_tau, shift, 0.0f, sums);
  }
  const float sum_r = sums[0], sum_f = sums[1], sum_u = sums[2], sum_a = sums[3];
  stats[0] = shift[0];
  stats[1] = std::log(sum_r);
  stats[2] = shift[1];
  stats[3] = std::log(sum_f);
  stats[4] = shift[2];
  stats[5] = std::log(sum_u);
  stats[6] = shift[3];
  stats[7] = std::log(sum_a);
  return row_loss(sum_r, sum_f, sums[4]) + row_loss(sum_f, sum_r, sums[5]) + row_loss(sum_u, sum_a, sums[6]);
}

// Gradients: rgb (term 1, teacher flow) k (p_r - p_f), flow (term 2) k (p_f - p_r),
// fused (term 3) k (p_u - p_avg), k = w / tau; each exp recomputed as the forward's
// branch computed it, times the row's 1 / S.
template <int W, bool kPaired>
MMSD_INLINE void mmsd_backward_loop(const float* r, const float* f, const float* u, int64_t C, float inv_tau,
                                    const float* stats, float k, float paired_scale, bool ok1, bool ok2, bool ok3,
                                    float* gr, float* gf, float* gu) {
  using V = vf<W>;
  const V zero = splat<W>(0.0f);
  // Selects, not products with 0: a term without a teacher may hold NaN probabilities.
  const V on1 = splat<W>(ok1 ? 1.0f : 0.0f), on2 = splat<W>(ok2 ? 1.0f : 0.0f), on3 = splat<W>(ok3 ? 1.0f : 0.0f);
  const float inv_r = inverse_sum(stats[1]), inv_f = inverse_sum(stats[3]);
  const float inv_u = inverse_sum(stats[5]), inv_a = inverse_sum(stats[7]);
  for_each_vector<W, false>(C, [&](auto, int64_t c, int64_t n, int64_t) MMSD_LAMBDA_INLINE {
    V xr = load<W>(r + c, n), xf = load<W>(f + c, n);
    V ar = (xr - stats[0]) * inv_tau, af = (xf - stats[2]) * inv_tau;
    V er, ef, ea;
    if constexpr (kPaired) {
      V hr = vexp<W>(ar * 0.5f), hf = vexp<W>(af * 0.5f);
      er = hr * hr;
      ef = hf * hf;
      ea = hr * (hf * paired_scale);
    } else {
      er = vexp<W>(ar);
      ef = vexp<W>(af);
      ea = vexp<W>(avg_exponent_v<W>(xr, xf, stats[6], inv_tau));
    }
    V pu = vexp<W>((load<W>(u + c, n) - stats[4]) * inv_tau) * inv_u;
    V g1 = k * (rounded<W>(er * inv_r) - rounded<W>(ef * inv_f)), g3 = k * (rounded<W>(pu) - rounded<W>(ea * inv_a));
    if constexpr (kPaired) {  // only taken with all three teachers present
      store<W>(gr + c, g1, n);
      store<W>(gf + c, -g1, n);
      store<W>(gu + c, g3, n);
    } else {
      store<W>(gr + c, on1 != zero ? g1 : zero, n);
      store<W>(gf + c, on2 != zero ? -g1 : zero, n);
      store<W>(gu + c, on3 != zero ? g3 : zero, n);
    }
  });
}

template <int W>
MMSD_INLINE void mmsd_backward_row(const float* r, const float* f, const float* u, int64_t C, float inv_tau,
                                   const float* stats, float w, float* gr, float* gf, float* gu) {
  // Which teacher gives gradient: flow to rgb (term 1), rgb to flow (term 2), avg to fused (term 3).
  const bool ok1 = !teacher_excluded(stats[3]), ok2 = !teacher_excluded(stats[1]), ok3 = !teacher_excluded(stats[7]);
  if (!ok1 && !ok2 && !ok3) {  // masked-out row
    std::memset(gr, 0, C * sizeof(float));
    std::memset(gf, 0, C * sizeof(float));
    std::memset(gu, 0, C * sizeof(float));
    return;
  }
  const float k = w * inv_tau;
  const float delta = paired_delta(stats[0], stats[2], stats[6], inv_tau);
  if (ok1 && ok2 && ok3 && delta <= kMaxPairedExponent) {  // the forward's branch, the forward's exp(delta)
    mmsd_backward_loop<W, true>(r, f, u, C, inv_tau, stats, k, std::exp(delta), ok1, ok2, ok3, gr, gf, gu);
  } else {
    mmsd_backward_loop<W, false>(r, f, u, C, inv_tau, stats, k, 0.0f, ok1, ok2, ok3, gr, gf, gu);
  }
}

// ------------------------------------------------- per-ISA instantiations
// in[k], grads[k]: float32 rows of C classes.
using ForwardRowFn = float (*)(const float* const* in, int64_t C, float inv_tau, float* stats);
using BackwardRowFn = void (*)(const float* const* in, int64_t C, float inv_tau, const float* stats, float w,
                               float* const* grads);

struct RowKernels {
  ForwardRowFn pair_forward;
  BackwardRowFn pair_backward;
  ForwardRowFn mmsd_forward;
  BackwardRowFn mmsd_backward;
  const char* isa;
};

#define MMSD_ROW_KERNELS(SUFFIX, ATTR, W)                                                                        \
  ATTR float pair_forward_##SUFFIX(const float* const* in, int64_t C, float inv_tau, float* stats) {           \
    return pair_forward_row<W>(in[0], in[1], C, inv_tau, stats);                                               \
  }                                                                                                            \
  ATTR void pair_backward_##SUFFIX(const float* const* in, int64_t C, float inv_tau, const float* stats,       \
                                   float w, float* const* g) {                                                 \
    pair_backward_row<W>(in[0], in[1], C, inv_tau, stats, w, g[0]);                                            \
  }                                                                                                            \
  ATTR float mmsd_forward_##SUFFIX(const float* const* in, int64_t C, float inv_tau, float* stats) {           \
    return mmsd_forward_row<W>(in[0], in[1], in[2], C, inv_tau, stats);                                        \
  }                                                                                                            \
  ATTR void mmsd_backward_##SUFFIX(const float* const* in, int64_t C, float inv_tau, const float* stats,       \
                                   float w, float* const* g) {                                                 \
    mmsd_backward_row<W>(in[0], in[1], in[2], C, inv_tau, stats, w, g[0], g[1], g[2]);                         \
  }

#if defined(__GNUC__) && defined(__x86_64__)
#define MMSD_X86_DISPATCH 1
MMSD_ROW_KERNELS(avx512, __attribute__((target("avx512f"))), 16)
MMSD_ROW_KERNELS(avx2, __attribute__((target("avx2,fma"))), 8)
#endif
MMSD_ROW_KERNELS(baseline, , 4)

// The widest vector ISA the CPU has; MMSD_EXT_DISTILL_CPU_ISA=avx512|avx2|baseline
// asks for one (read once per process; the tests run every version this way). A
// name it does not know, or an ISA this CPU or build lacks, is a ValueError naming
// the variable, not a silent fallback. A throwing initialiser leaves the static
// unset, so every later call reports the same error.
const RowKernels& row_kernels() {
  static const RowKernels kernels = [] {
    const char* forced = std::getenv("MMSD_EXT_DISTILL_CPU_ISA");
    const std::string want = forced != nullptr ? forced : "";
    TORCH_CHECK_VALUE(want.empty() || want == "avx512" || want == "avx2" || want == "baseline",
                      "MMSD_EXT_DISTILL_CPU_ISA: expected avx512, avx2 or baseline (or unset for the widest), got '",
                      want, "'");
    const RowKernels baseline{pair_forward_baseline, pair_backward_baseline, mmsd_forward_baseline,
                              mmsd_backward_baseline, "baseline"};
    if (want == "baseline") return baseline;
    bool avx512 = false, avx2 = false;
#ifdef MMSD_X86_DISPATCH
    __builtin_cpu_init();
    avx512 = __builtin_cpu_supports("avx512f");
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    TORCH_CHECK_VALUE(want != "avx512" || avx512, "MMSD_EXT_DISTILL_CPU_ISA: avx512 asked for, but this ",
                      "CPU (or a build for another architecture) has no AVX-512F; use avx2 or baseline");
    TORCH_CHECK_VALUE(want != "avx2" || avx2, "MMSD_EXT_DISTILL_CPU_ISA: avx2 asked for, but this ",
                      "CPU (or a build for another architecture) has no AVX2 with FMA; use baseline");
#ifdef MMSD_X86_DISPATCH
    if (want != "avx2" && avx512) {
      return RowKernels{pair_forward_avx512, pair_backward_avx512, mmsd_forward_avx512, mmsd_backward_avx512,
                        "avx512"};
    }
    if (avx2) {
      return RowKernels{pair_forward_avx2, pair_backward_avx2, mmsd_forward_avx2, mmsd_backward_avx2, "avx2"};
    }
#endif
    return baseline;
  }();
  return kernels;
}

// ------------------------------------------------------------------ drivers
int64_t rows_per_task(int64_t C) {
  return std::max<int64_t>(1, kElementsPerTask / C);
}

// Row `row` of K inputs as float32 pointers: the input itself for float32, else a
// converted copy in scratch.
template <typename scalar_t, int K>
MMSD_INLINE void row_pointers(const std::array<const scalar_t*, K>& in, int64_t row, int64_t C, float* scratch,
                              const float** out) {
  for (int k = 0; k < K; ++k) {
    const scalar_t* src = in[k] + row * C;
    if constexpr (std::is_same_v<scalar_t, float>) {
      out[k] = src;
    } else {
      float* dst = scratch + k * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<float>(src[c]);
      out[k] = dst;
    }
  }
}

// Statistics of a masked-out row: every (shift, log-sum) pair (0, -inf), which marks
// every teacher excluded, so a backward writes zeros there without the mask.
MMSD_INLINE void mark_masked_row(float* st, int64_t n_stats) {
  for (int64_t i = 0; i < n_stats; i += 2) {
    st[i] = 0.0f;
    st[i + 1] = -INFINITY;
  }
}

// Runs `row_fn` over every valid row; masked rows get loss 0 and statistics that
// mark every teacher excluded (so the backward writes zeros without the mask).
// Returns the sum of the row losses and the number of valid rows.
template <typename scalar_t, int K>
std::pair<double, int64_t> forward_rows(const std::array<const scalar_t*, K>& in, const bool* mask, int64_t R,
                                        int64_t C, float inv_tau, int64_t n_stats, float* stats, float* row_losses,
                                        ForwardRowFn row_fn) {
  const int64_t per_task = rows_per_task(C);
  const int64_t n_tasks = (R + per_task - 1) / per_task;
  std::vector<double> task_sum(n_tasks, 0.0);
  std::vector<int64_t> task_count(n_tasks, 0);
  at::parallel_for(0, n_tasks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(std::is_same_v<scalar_t, float> ? 0 : K * C);
    const float* rows[K];
    for (int64_t task = first; task < last; ++task) {
      double sum = 0.0;
      int64_t count = 0;
      const int64_t end = std::min(R, (task + 1) * per_task);
      for (int64_t row = task * per_task; row < end; ++row) {
        float* st = stats + row * n_stats;
        float loss = 0.0f;
        if (mask != nullptr && !mask[row]) {
          mark_masked_row(st, n_stats);
        } else {
          row_pointers<scalar_t, K>(in, row, C, scratch.data(), rows);
          loss = row_fn(rows, C, inv_tau, st);
          sum += loss;
          ++count;
        }
        if (row_losses != nullptr) row_losses[row] = loss;
      }
      task_sum[task] = sum;
      task_count[task] = count;
    }
  });
  double total = 0.0;
  int64_t count = 0;
  for (int64_t task = 0; task < n_tasks; ++task) {
    total += task_sum[task];
    count += task_count[task];
  }
  return {total, count};
}

// K inputs, KG gradients (the single pair's teacher gets none).
template <typename scalar_t, int K, int KG>
void backward_rows(const std::array<const scalar_t*, K>& in, int64_t R, int64_t C, float inv_tau, int64_t n_stats,
                   const float* stats, const float* grad, int64_t reduction, const float* count,
                   const std::array<scalar_t*, KG>& out, BackwardRowFn row_fn) {
  at::parallel_for(0, R, rows_per_task(C), [&](int64_t first, int64_t last) {
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    std::vector<float> scratch(kFloat ? 0 : (K + KG) * C);
    const float* rows[K];
    float* grads[KG];
    for (int64_t row = first; row < last; ++row) {
      row_pointers<scalar_t, K>(in, row, C, scratch.data(), rows);
      for (int k = 0; k < KG; ++k) {
        if constexpr (kFloat) {
          grads[k] = out[k] + row * C;
        } else {
          grads[k] = scratch.data() + (K + k) * C;
        }
      }
      row_fn(rows, C, inv_tau, stats + row * n_stats, row_weight(grad, row, reduction, count), grads);
      if constexpr (!kFloat) {
        for (int k = 0; k < KG; ++k) {
          scalar_t* dst = out[k] + row * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(grads[k][c]);
        }
      }
    }
  });
}

// The forward and, for an upstream gradient of 1, the backward of every row in one
// pass: a row is read from memory once and its gradients are written while it is in
// L1 (6 N floats of traffic against 9 N for a forward then a recomputing backward).
// The gradients are those of backward_rows with grad = 1, bit for bit: the same row
// functions with the same weight 1 / max(count, 1). `count`, the number of valid rows,
// is needed before the first gradient, so it is counted first.
template <typename scalar_t, int K, int KG>
std::pair<double, int64_t> forward_backward_rows(const std::array<const scalar_t*, K>& in, const bool* mask,
                                                 int64_t R, int64_t C, float inv_tau, int64_t n_stats, float* stats,
                                                 const std::array<scalar_t*, KG>& out, ForwardRowFn forward_fn,
                                                 BackwardRowFn backward_fn) {
  int64_t valid = R;
  if (mask != nullptr) valid = std::count(mask, mask + R, true);
  const float one = 1.0f, count = static_cast<float>(valid);
  const float w = row_weight(&one, 0, kMean, &count);
  const int64_t per_task = rows_per_task(C);
  const int64_t n_tasks = (R + per_task - 1) / per_task;
  std::vector<double> task_sum(n_tasks, 0.0);
  at::parallel_for(0, n_tasks, 1, [&](int64_t first, int64_t last) {
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    std::vector<float> scratch(kFloat ? 0 : (K + KG) * C);
    const float* rows[K];
    float* grads[KG];
    for (int64_t task = first; task < last; ++task) {
      double sum = 0.0;
      const int64_t end = std::min(R, (task + 1) * per_task);
      for (int64_t row = task * per_task; row < end; ++row) {
        float* st = stats + row * n_stats;
        for (int k = 0; k < KG; ++k) {
          if constexpr (kFloat) {
            grads[k] = out[k] + row * C;
          } else {
            grads[k] = scratch.data() + (K + k) * C;
          }
        }
        if (mask != nullptr && !mask[row]) {
          mark_masked_row(st, n_stats);
          for (int k = 0; k < KG; ++k) std::memset(grads[k], 0, C * sizeof(float));
        } else {
          row_pointers<scalar_t, K>(in, row, C, scratch.data(), rows);
          sum += forward_fn(rows, C, inv_tau, st);
          backward_fn(rows, C, inv_tau, st, w, grads);
        }
        if constexpr (!kFloat) {
          for (int k = 0; k < KG; ++k) {
            scalar_t* dst = out[k] + row * C;
            for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(grads[k][c]);
          }
        }
      }
      task_sum[task] = sum;
    }
  });
  double total = 0.0;
  for (int64_t task = 0; task < n_tasks; ++task) total += task_sum[task];
  return {total, valid};
}

// A new gradient tensor. Its pages are first touched by the kernel; on this VM the
// 4 KiB page faults of the three MMSD gradients at (32, 2304, 201) (178 MB) cost
// more than the kernel itself, so large outputs ask Linux for transparent huge
// pages (the advice PyTorch gives every allocation under THP_MEM_ALLOC_ENABLE=1).
// Advice only: where it is refused or THP is off, nothing changes.
constexpr int64_t kHugePage = int64_t(1) << 21;

at::Tensor new_gradient(const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options());
#ifdef __linux__
  const int64_t bytes = out.numel() * out.element_size();
  if (bytes >= 4 * kHugePage) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t start = (p + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
    const uintptr_t end = (p + bytes) & ~uintptr_t(kHugePage - 1);
    if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#endif
  return out;
}

at::Tensor stats_tensor(const at::Tensor& logits, int64_t k) {
  auto shape = leading_shape(logits);
  shape.push_back(k);
  return at::empty(shape, logits.options().dtype(at::kFloat));
}

// ----------------------------------------------------------------- the ops
std::tuple<at::Tensor, at::Tensor, at::Tensor> snippet_distill_loss_cpu(const at::Tensor& student,
                                                                        const at::Tensor& teacher,
                                                                        double temperature,
                                                                        const std::optional<at::Tensor>& mask,
                                                                        int64_t reduction) {
  check_logits({{"student", &student}, {"teacher", &teacher}});
  check_temperature(temperature);
  check_reduction(reduction);
  const at::Tensor m = prepare_mask(mask, student, "student");
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t C = s.size(-1), R = s.numel() / C;
  const float inv_tau = static_cast<float>(1.0 / temperature);
  const auto f32 = s.options().dtype(at::kFloat);
  at::Tensor stats = stats_tensor(s, kPairStats);
  at::Tensor loss = reduction == kNone ? at::empty(leading_shape(s), f32) : at::empty({}, f32);
  std::pair<double, int64_t> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "snippet_distill_loss_cpu", [&] {
    result = forward_rows<scalar_t, 2>({s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>()},
                                       m.defined() ? m.const_data_ptr<bool>() : nullptr, R, C, inv_tau, kPairStats,
                                       stats.data_ptr<float>(), reduction == kNone ? loss.data_ptr<float>() : nullptr,
                                       row_kernels().pair_forward);
  });
  const auto [total, count] = result;
  if (reduction != kNone) {
    loss.fill_(reduction == kMean ? total / static_cast<double>(std::max<int64_t>(count, 1)) : total);
  }
  return {loss, stats, at::scalar_tensor(static_cast<double>(count), f32)};
}

at::Tensor snippet_distill_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                             const at::Tensor& teacher, const at::Tensor& row_stats,
                                             const at::Tensor& count, double temperature, int64_t reduction) {
  check_logits({{"student", &student}, {"teacher", &teacher}});
  check_temperature(temperature);
  check_reduction(reduction);
  check_row_stats(row_stats, student, kPairStats);
  check_backward_scalars(grad, count, student, reduction);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), g = prepare_grad(grad);
  const int64_t C = s.size(-1), R = s.numel() / C;
  at::Tensor out = new_gradient(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "snippet_distill_loss_backward_cpu",
                                  [&] {
                                    backward_rows<scalar_t, 2, 1>(
                                        {s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>()}, R, C,
                                        static_cast<float>(1.0 / temperature), kPairStats,
                                        row_stats.const_data_ptr<float>(), g.const_data_ptr<float>(), reduction,
                                        count.const_data_ptr<float>(), {out.data_ptr<scalar_t>()},
                                        row_kernels().pair_backward);
                                  });
  return out;
}

using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The forward of mmsd_distill_loss: (loss, stats, count), and with with_grads also the
// three gradients for an upstream gradient of 1 (else undefined).
Tensor6 mmsd_forward_cpu(const at::Tensor& rgb, const at::Tensor& flow, const at::Tensor& fused, double temperature,
                         const std::optional<at::Tensor>& mask, bool with_grads) {
  check_logits({{"rgb", &rgb}, {"flow", &flow}, {"fused", &fused}});
  check_temperature(temperature);
  const at::Tensor m = prepare_mask(mask, rgb, "rgb");
  const at::Tensor r = rgb.contiguous(), f = flow.contiguous(), u = fused.contiguous();
  const int64_t C = r.size(-1), R = r.numel() / C;
  const auto f32 = r.options().dtype(at::kFloat);
  at::Tensor stats = stats_tensor(r, kMmsdStats);
  at::Tensor gr, gf, gu;
  if (with_grads) {
    gr = new_gradient(r);
    gf = new_gradient(r);
    gu = new_gradient(r);
  }
  std::pair<double, int64_t> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "mmsd_distill_loss_cpu", [&] {
    const std::array<const scalar_t*, 3> in{r.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                                            u.const_data_ptr<scalar_t>()};
    const bool* mask_ptr = m.defined() ? m.const_data_ptr<bool>() : nullptr;
    const float inv_tau = static_cast<float>(1.0 / temperature);
    if (with_grads) {
      result = forward_backward_rows<scalar_t, 3, 3>(
          in, mask_ptr, R, C, inv_tau, kMmsdStats, stats.data_ptr<float>(),
          {gr.data_ptr<scalar_t>(), gf.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>()}, row_kernels().mmsd_forward,
          row_kernels().mmsd_backward);
    } else {
      result = forward_rows<scalar_t, 3>(in, mask_ptr, R, C, inv_tau, kMmsdStats, stats.data_ptr<float>(), nullptr,
                                         row_kernels().mmsd_forward);
    }
  });
  const auto [total, count] = result;
  at::Tensor loss = at::scalar_tensor(total / static_cast<double>(std::max<int64_t>(count, 1)), f32);
  return {loss, stats, at::scalar_tensor(static_cast<double>(count), f32), gr, gf, gu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmsd_distill_loss_cpu(const at::Tensor& rgb, const at::Tensor& flow,
                                                                     const at::Tensor& fused, double temperature,
                                                                     const std::optional<at::Tensor>& mask) {
  const Tensor6 out = mmsd_forward_cpu(rgb, flow, fused, temperature, mask, false);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

Tensor6 mmsd_distill_loss_with_grads_cpu(const at::Tensor& rgb, const at::Tensor& flow, const at::Tensor& fused,
                                         double temperature, const std::optional<at::Tensor>& mask) {
  return mmsd_forward_cpu(rgb, flow, fused, temperature, mask, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmsd_distill_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rgb, const at::Tensor& flow, const at::Tensor& fused,
    const at::Tensor& row_stats, const at::Tensor& count, double temperature) {
  check_logits({{"rgb", &rgb}, {"flow", &flow}, {"fused", &fused}});
  check_temperature(temperature);
  check_row_stats(row_stats, rgb, kMmsdStats);
  check_backward_scalars(grad, count, rgb, kMean);
  const at::Tensor r = rgb.contiguous(), f = flow.contiguous(), u = fused.contiguous(), g = prepare_grad(grad);
  const int64_t C = r.size(-1), R = r.numel() / C;
  at::Tensor gr = new_gradient(r), gf = new_gradient(r), gu = new_gradient(r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "mmsd_distill_loss_backward_cpu", [&] {
    backward_rows<scalar_t, 3, 3>(
        {r.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>()}, R, C,
        static_cast<float>(1.0 / temperature), kMmsdStats, row_stats.const_data_ptr<float>(),
        g.const_data_ptr<float>(), kMean, count.const_data_ptr<float>(),
        {gr.data_ptr<scalar_t>(), gf.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>()}, row_kernels().mmsd_backward);
  });
  return {gr, gf, gu};
}

// grad is a CPU scalar here: reading it costs no synchronisation. Products in float
// (double for float64; w is exact in either), rounded once to the dtype, as the CUDA
// kernel does (for fp16, mul_(w) would first round w to the dtype: GradScaler's 65536 is
// inf there). A row whose term has no teacher (row_stats: masked, or an all -inf teacher)
// stays 0, as in the recomputing backward, also where w is inf or NaN.
void distill_scale_grads_cpu(const at::Tensor& grad, const at::Tensor& row_stats, const at::Tensor& grad_rgb,
                             const at::Tensor& grad_flow, const at::Tensor& grad_fused) {
  check_scale_grads(grad, row_stats, {&grad_rgb, &grad_flow, &grad_fused});
  bump_versions({&grad_rgb, &grad_flow, &grad_fused});
  const float w = grad.to(at::kFloat).item<float>();
  if (w == 1.0f || grad_rgb.numel() == 0) return;
  const int64_t C = grad_rgb.size(-1), R = grad_rgb.numel() / C;
  const float* stats = row_stats.const_data_ptr<float>();
  // The teacher's log S of each gradient's term: rgb's is flow (3), flow's rgb (1), fused's avg (7).
  const std::pair<const at::Tensor*, int> terms[3] = {{&grad_rgb, 3}, {&grad_flow, 1}, {&grad_fused, 7}};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rgb.scalar_type(), "distill_scale_grads_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for (const auto& [g, teacher] : terms) {
      scalar_t* data = g->data_ptr<scalar_t>();
      at::parallel_for(0, R, std::max<int64_t>(1, (1 << 15) / C), [&](int64_t first, int64_t last) {
        for (int64_t r = first; r < last; ++r) {
          scalar_t* row = data + r * C;
          if (teacher_excluded(stats[r * kMmsdStats + teacher])) {
            std::fill(row, row + C, static_cast<scalar_t>(0.0f));
            continue;
          }
          for (int64_t c = 0; c < C; ++c) row[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) * w);
        }
      });
    }
  });
}

}  // namespace

const char* cpu_isa() {
  return row_kernels().isa;
}

TORCH_LIBRARY_IMPL(mmsd_ext, CPU, m) {
  m.impl("snippet_distill_loss", &snippet_distill_loss_cpu);
  m.impl("_snippet_distill_loss_backward", &snippet_distill_loss_backward_cpu);
  m.impl("mmsd_distill_loss", &mmsd_distill_loss_cpu);
  m.impl("_mmsd_distill_loss_backward", &mmsd_distill_loss_backward_cpu);
  m.impl("_mmsd_distill_loss_with_grads", &mmsd_distill_loss_with_grads_cpu);
  m.impl("_distill_scale_grads_", &distill_scale_grads_cpu);
}

}  // namespace distill
}  // namespace mmsd_ext
