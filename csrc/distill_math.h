// Per-row maths of the distillation losses (snippet_distill_loss, mmsd_distill_loss),
// shared by the CPU kernels (csrc/cpu/distill_kernel.cpp) and the CUDA kernels
// (csrc/cuda/distill_kernel.cu). kernels/distill.py follows the same formulas.
//
// One (student s, teacher t) pair over a row of C classes, tau = temperature:
//
//   shift_x = max_c x_c              (0 for an all -inf row, so its exps are 0, not NaN)
//   a_c     = (s_c - shift_s) / tau  <= 0,   b_c = (t_c - shift_t) / tau <= 0
//   S_s     = sum_c exp(a_c),        S_t = sum_c exp(b_c)
//   D       = sum_c exp(b_c) * (-a_c)          (terms with exp(b_c) == 0 are 0)
//   loss    = -sum_c p_t,c log p_s,c = log S_s + D / S_t
//
// Both summands are >= 0, so nothing cancels even for logits of magnitude 1e4
// at tau = 0.1 (scaled logits of 1e5): subtracting the row max before scaling
// keeps a_c exact to float32 rounding where it matters (near the max).
// A -inf teacher entry has exp(b_c) == 0 and adds 0 to D even where s_c = -inf
// (0 * inf would be NaN). A teacher row that is all -inf has S_t == 0: its loss
// and its gradient are defined as 0 (no class is a target). NaN in a row gives NaN.
//
// Gradient (recomputed in the backward from the saved shift and log S):
//   p_s,c = exp((s_c - shift_s) / tau - log S_s),  d loss / d s_c = (p_s,c - p_t,c) / tau.
// (The CPU kernels compute exp((s_c - shift_s) / tau) * (1 / S_s) instead, the
// exp bit for bit as in the forward, so that it cancels against S; see there.)
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace mmsd_ext {
namespace distill {

// The `reduction` argument of the ops, numbered as at::Reduction.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Floats of row statistics saved per row for the backward: (shift, log S) per softmax.
constexpr int kPairStats = 4;  // student, teacher
constexpr int kMmsdStats = 8;  // rgb, flow, fused, (rgb + flow) / 2

C10_HOST_DEVICE inline float row_shift(float row_max) {
  return row_max == -INFINITY ? 0.0f : row_max;
}

// One class's contribution to D, from e_t = exp(b_c) and a_c.
C10_HOST_DEVICE inline float cross_term(float e_t, float a_s) {
  return e_t == 0.0f ? 0.0f : -e_t * a_s;
}

// The row's loss from S_s, S_t and D; 0 when the teacher row is all -inf.
C10_HOST_DEVICE inline float row_loss(float sum_s, float sum_t, float cross) {
  return sum_t == 0.0f ? 0.0f : ::logf(sum_s) + cross / sum_t;
}

// Saved log S of a teacher that yields no gradient: an all -inf teacher row, or a
// masked-out row (the forward stores this for masked rows so the backward needs no mask).
C10_HOST_DEVICE inline bool teacher_excluded(float log_sum_t) {
  return log_sum_t == -INFINITY;
}

// 1 / S from a saved log S: exp(-log S) in double, rounded once (0 < 1 / S <= 1 for a
// valid row, whose S >= 1; +inf where log S = -inf, a row the callers select away).
C10_HOST_DEVICE inline float inverse_sum(float log_sum) {
  return static_cast<float>(::exp(-static_cast<double>(log_sum)));
}

// A probability recomputed in a backward: exp(a) with a = (x - shift) / tau formed as the
// forward formed the values it summed into S, times 1 / S. The rounding of a dominant
// class's exp then cancels in p = exp(a) / S, which exp(a - log S) would not give (its
// argument rounds by |a - log S| * 6e-8, and on a GPU expf adds up to 2 ulps of its own).
// On CUDA the product is __fmul_rn, which nvcc never contracts: a difference of two
// probabilities, p_s - p_t, would otherwise become one fma, and equal logits would give
// a product's rounding error instead of a zero gradient. (The CPU kernels round it with
// an asm barrier, csrc/cpu/distill_kernel.cpp: rounded.)
C10_HOST_DEVICE inline float prob(float x, float shift, float inv_tau, float inv_sum) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(::expf((x - shift) * inv_tau), inv_sum);
#else
  return ::expf((x - shift) * inv_tau) * inv_sum;
#endif
}

// MMSD's third teacher, avg = (rgb + flow) / 2, by three exps per class instead of
// four (the CPU kernels): with h_r = exp(a_r / 2), h_f = exp(a_f / 2) (a_x = (x - shift_x) / tau),
//   exp(a_r) = h_r^2,  exp(a_f) = h_f^2,  exp(a_avg) = h_r * h_f * exp(delta),
//   delta = ((shift_r + shift_f) / 2 - shift_avg) / tau >= 0.
// Where exp(a_avg) matters, a_avg is near 0, so a_r / 2 + a_f / 2 is near -delta:
// the roundings of a_r and a_f, each relative to itself, add up to a relative error
// of about delta ulps in exp(a_avg). So the identity serves only rows with
// delta <= kMaxPairedExponent = 8, where that stays a few ulps, as for a pair's own
// probabilities (with 50, the limit before 2026-11-27, the mean teacher's
// probabilities were off by up to 20 ulps in rows of delta near 50). Other rows
// (delta > 8: the streams peak at different classes, and the mean of their maxima
// exceeds the mean teacher's maximum by more than 8 tau; under 1% of the rows of
// standard normal logits at tau = 0.2) take avg_exponent below. The CPU backward takes
// the same branch and needs the forward's delta bit for bit (its normaliser log S_avg
// was summed with it): no contraction into FMAs here. The CUDA kernels never take the
// identity: they form exp(a_avg) from avg_exponent, forward and backward. In rows with
// -inf logits the CPU forward's cross term of a -inf fused class also takes exp(a_avg)
// directly (csrc/cpu/distill_kernel.cpp, mmsd_forward_sums).
constexpr float kMaxPairedExponent = 8.0f;

C10_HOST_DEVICE inline float paired_delta(float shift_r, float shift_f, float shift_avg, float inv_tau) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(__fsub_rn(__fmul_rn(__fadd_rn(shift_r, shift_f), 0.5f), shift_avg), inv_tau);
#else
  return ((shift_r + shift_f) * 0.5f - shift_avg) * inv_tau;
#endif
}

// The exponent of MMSD's third teacher, avg = (rgb + flow) / 2, where it is
// exponentiated directly: (avg_c - shift_avg) / tau. The sum and the difference in
// double, then one rounding to float: in float32, rgb + flow rounds by up to half an
// ulp of the sum, which 1 / tau magnifies (logits of 50 at tau = 0.15: 1e-5 in the
// exponent, a relative 1e-6 in the probabilities), where a pair's own exponents are
// good to a few roundings of themselves. shift_avg: a float near the row's largest
// avg (softmax does not depend on it; forward and backward must use the same). No
// contraction into FMAs on CUDA, so that the forward's sum and the backward's
// probabilities see the same exponent.
C10_HOST_DEVICE inline float avg_exponent(float x_r, float x_f, float shift_avg, float inv_tau) {
#ifdef __CUDA_ARCH__
  const double d = __dsub_rn(__dmul_rn(__dadd_rn(x_r, x_f), 0.5), shift_avg);
  return __fmul_rn(__double2float_rn(d), inv_tau);
#else
  const double d = (static_cast<double>(x_r) + static_cast<double>(x_f)) * 0.5 - static_cast<double>(shift_avg);
  return static_cast<float>(d) * inv_tau;
#endif
}

// Upstream weight of one row: grad[row] for "none", grad[0] for "sum",
// grad[0] / max(count, 1) for "mean" (count: valid rows, computed on the device).
C10_HOST_DEVICE inline float row_weight(const float* grad, int64_t row, int64_t reduction, const float* count) {
  if (reduction == kNone) return grad[row];
  if (reduction == kSum) return grad[0];
  return grad[0] / (count[0] > 1.0f ? count[0] : 1.0f);
}

}  // namespace distill
}  // namespace mmsd_ext
