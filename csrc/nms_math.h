// Overlap of two 1-D segments, shared by the CPU and CUDA kernels of temporal_nms
// and soft_temporal_nms.
//
// Everything is computed in double whatever the input dtype, with the operations
// in the order of the Python reference (mmsd_ext/nms.py, _overlap_reference), so
// that every backend makes the same keep/suppress decision as the reference, bit
// for bit, also where an overlap lands exactly on the threshold (integer snippet
// coordinates do that often: [0, 2] and [1, 3] have IoU 1/3, which float32 rounds
// up to 0.33333334 > 1/3).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace mmsd_ext {
namespace nms {

// 64-bit suppression-mask tiles: one bit per (row, column) pair.
constexpr int64_t kTile = 64;

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Overlap kinds, as the schema's `overlap` string maps to them.
enum OverlapKind : int { kIoU = 0, kOther = 1 };

// Numerator and denominator of the overlap of candidate b with kept segment a, in
// the reference's operation order: the intersection max(0, min(ends) - max(starts)
// + offset) over the union (kIoU, lengths end - start + offset) or over the length
// of b (kOther).
C10_HOST_DEVICE inline void overlap_terms(double a_start, double a_end, double b_start, double b_end, int kind,
                                          double offset, double& inter, double& den) {
  double lo = a_start > b_start ? a_start : b_start;
  double hi = a_end < b_end ? a_end : b_end;
  inter = hi - lo + offset;
  if (!(inter > 0.0)) {
    inter = 0.0;
  }
  double len_b = b_end - b_start + offset;
  if (kind == kOther) {
    den = len_b;
  } else {
    double len_a = a_end - a_start + offset;
    den = len_a + len_b - inter;
  }
}

// Overlap of candidate b with kept (higher-ranked) segment a; an empty denominator
// gives 0.
C10_HOST_DEVICE inline double segment_overlap(double a_start, double a_end, double b_start, double b_end, int kind,
                                              double offset) {
  double inter, den;
  overlap_terms(a_start, a_end, b_start, b_end, kind, offset, inter, den);
  return den > 0.0 ? inter / den : 0.0;
}

// segment_overlap(...) > threshold, the same decision bit for bit, mostly without
// the division. With p = threshold * den a normal double (relative error <= 2^-53),
// inter <= p (1 - 1e-12) implies inter / den < threshold (1 - 1e-12 + 2^-52), so
// the correctly rounded quotient is <= threshold; inter >= p (1 + 1e-12) implies
// it is > threshold. Only the 2e-12-wide band between divides. A subnormal
// threshold or p (where the relative-error bound fails) always divides.
C10_HOST_DEVICE inline bool overlap_exceeds(double a_start, double a_end, double b_start, double b_end, int kind,
                                            double offset, double threshold) {
  double inter, den;
  overlap_terms(a_start, a_end, b_start, b_end, kind, offset, inter, den);
  if (!(den > 0.0)) {
    return 0.0 > threshold;
  }
  constexpr double kNormal = 1e-300;  // comfortably above the subnormal range (2.2e-308)
  if (threshold >= kNormal) {
    const double p = threshold * den;
    if (p >= kNormal) {
      if (inter <= p * (1.0 - 1e-12)) return false;
      if (inter >= p * (1.0 + 1e-12)) return true;
    }
  }
  return inter / den > threshold;
}

// Rank of a score in the visit order: true when score x comes strictly before
// score y (higher first, NaN after every number). Equal scores (0.0 and -0.0
// included) are ordered by index by the caller.
C10_HOST_DEVICE inline bool score_before(double x, double y) {
  bool x_nan = x != x;
  bool y_nan = y != y;
  if (x_nan || y_nan) {
    return !x_nan && y_nan;
  }
  return x > y;
}

}  // namespace nms
}  // namespace mmsd_ext
