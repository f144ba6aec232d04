// Host-side argument checks shared by the CPU and CUDA kernels of temporal_nms and
// soft_temporal_nms. The Python wrapper (mmsd_ext/nms.py) checks the same things
// first; these guard direct calls of torch.ops.mmsd_ext.*. Each message names the
// argument at fault.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#include "format.h"
#include "nms_math.h"

namespace mmsd_ext {
namespace nms {

inline void check_nms_inputs(const at::Tensor& segments, const at::Tensor& scores,
                             const c10::optional<at::Tensor>& groups, double offset) {
  TORCH_CHECK_TYPE(segments.scalar_type() == at::kFloat || segments.scalar_type() == at::kDouble,
                   "segments: expected dtype float32 or float64, got ", dtype_text(segments.scalar_type()));
  TORCH_CHECK_VALUE(segments.dim() == 2 && segments.size(1) == 2, "segments: expected shape [M, 2], got ",
                    shape(segments.sizes()));
  const int64_t m = segments.size(0);
  // The dtypes of the Python wrappers and of every kernel's dispatch (not float8).
  const at::ScalarType score_type = scores.scalar_type();
  TORCH_CHECK_TYPE(score_type == at::kFloat || score_type == at::kDouble || score_type == at::kHalf ||
                       score_type == at::kBFloat16,
                   "scores: expected dtype float32, float64, float16 or bfloat16, got ", dtype_text(score_type));
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == m, "scores: expected shape [M] = [", num(m), "], got ",
                    shape(scores.sizes()));
  TORCH_CHECK_VALUE(scores.device() == segments.device(), "scores: expected a tensor on ",
                    device_text(segments.device()), " like segments, got ", device_text(scores.device()));
  if (groups.has_value()) {
    const at::Tensor& g = *groups;
    TORCH_CHECK_TYPE(g.scalar_type() == at::kLong, "groups: expected an int64 tensor, got ",
                     dtype_text(g.scalar_type()));
    TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == m, "groups: expected shape [M] = [", num(m), "], got ",
                      shape(g.sizes()));
    TORCH_CHECK_VALUE(g.device() == segments.device(), "groups: expected a tensor on ",
                      device_text(segments.device()), " like segments, got ", device_text(g.device()));
  }
  TORCH_CHECK_VALUE(std::isfinite(offset) && offset >= 0, "offset: expected a finite number >= 0, got ",
                    real(offset));
}

inline void check_threshold(const char* name, double value) {
  TORCH_CHECK_VALUE(value >= 0, name, ": expected a number >= 0, got ", real(value));
}

// The arguments of soft_temporal_nms beyond the tensors (checked after check_nms_inputs).
inline void check_soft_nms_params(c10::string_view method, double sigma, double iou_threshold, double min_score) {
  TORCH_CHECK_VALUE(method == "gaussian" || method == "linear", "method: expected one of gaussian, linear, got '",
                    std::string(method), "'");
  TORCH_CHECK_VALUE(sigma > 0, "sigma: expected a number > 0, got ", real(sigma));
  check_threshold("iou_threshold", iou_threshold);
  TORCH_CHECK_VALUE(!std::isnan(min_score), "min_score: expected a number, got nan");
}

// Host check of the coordinates of CPU segments (double, contiguous [M, 2]); as_float:
// the caller's segments are float32, and their values print as float32s.
inline void check_segment_values(const double* seg, int64_t m, bool as_float) {
  for (int64_t i = 0; i < m; ++i) {
    const double s = seg[2 * i], e = seg[2 * i + 1];
    TORCH_CHECK_VALUE(std::isfinite(s) && std::isfinite(e), "segments: expected finite coordinates, got segment ",
                      num(i), " = (", real(s, as_float), ", ", real(e, as_float), ")");
    TORCH_CHECK_VALUE(e >= s, "segments: expected end >= start, got segment ", num(i), " = (", real(s, as_float),
                      ", ", real(e, as_float), ")");
  }
}

inline int overlap_kind(const std::string& overlap) {
  if (overlap == "iou") return 0;
  if (overlap == "other") return 1;
  TORCH_CHECK_VALUE(false, "overlap: expected one of iou, other, got '", overlap, "'");
  return -1;
}

}  // namespace nms
}  // namespace mmsd_ext
