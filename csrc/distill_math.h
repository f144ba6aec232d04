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

// A probability recomputed from the saved statistics.
C10_HOST_DEVICE inline float prob(float x, float shift, float inv_tau, float log_sum) {
  return ::expf((x - shift) * inv_tau - log_sum);
}

// MMSD's third teacher, avg = (rgb + flow) / 2, by three exps per class instead of
// four: with h_r = exp(a_r / 2), h_f = exp(a_f / 2) (a_x = (x - shift_x) / tau),
//   exp(a_r) = h_r^2,  exp(a_f) = h_f^2,  exp(a_avg) = h_r * h_f * exp(delta),
//   delta = ((shift_r + shift_f) / 2 - shift_avg) / tau >= 0.
// h_r underflows to 0 when a_r < -174; the exp(a_avg) then lost is at most
// exp(-87 + delta) against a sum >= 1, so the identity serves only rows with
// delta <= kMaxPairedExponent (lost mass < 3e-13 in the forward, < 1e-9 in the
// backward for C <= 4096); other rows (streams whose logits disagree by more than
// 50 tau) exponentiate avg directly. The backward takes the same branch and needs
// the forward's delta bit for bit (its normaliser log S_avg was summed with it): no
// contraction into FMAs here. The identity is also more exact than exponentiating
// (rgb + flow) / 2 - shift, which rounds the sum of two large logits.
constexpr float kMaxPairedExponent = 50.0f;

C10_HOST_DEVICE inline float paired_delta(float shift_r, float shift_f, float shift_avg, float inv_tau) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(__fsub_rn(__fmul_rn(__fadd_rn(shift_r, shift_f), 0.5f), shift_avg), inv_tau);
#else
  return ((shift_r + shift_f) * 0.5f - shift_avg) * inv_tau;
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
