// Host-side pieces shared by the CUDA kernels of temporal_nms and soft_temporal_nms:
// the group layout (segments sorted so that groups are contiguous), the sync-free
// value check of the segments, and the one read of results to the host.
//
// Group layout. After the sort, group k occupies positions [gs, ge) of the sorted
// arrays. `is_start[p]` marks the first position of a group and `end_of[p]` the
// first group start after p (or n), so end_of[gs] = ge. Kernels find the groups
// without knowing their number on the host: block b handles every group that
// starts in positions [64 b, 64 b + 64), one after another.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "nms_checks.h"

namespace mmsd_ext {
namespace nms {
namespace cuda_common {

// [is_start (uint8), end_of (int64)] of non-decreasing group ids (None: one group).
inline std::tuple<at::Tensor, at::Tensor> group_bounds(const c10::optional<at::Tensor>& sorted_groups, int64_t n,
                                                       const at::TensorOptions& long_opts) {
  at::Tensor pos = at::arange(n, long_opts);
  at::Tensor is_start;
  if (sorted_groups.has_value()) {
    const at::Tensor& g = *sorted_groups;
    is_start = at::ones({n}, long_opts.dtype(at::kBool));
    if (n > 1) is_start.narrow(0, 1, n - 1).copy_(g.narrow(0, 1, n - 1) != g.narrow(0, 0, n - 1));
  } else {
    is_start = pos == 0;
  }
  // next[p] = the first start at a position > p, or n: a suffix minimum.
  at::Tensor start_pos = at::where(is_start, pos, at::full({}, n, long_opts));
  at::Tensor shifted = at::full({n}, n, long_opts);
  if (n > 1) shifted.narrow(0, 0, n - 1).copy_(start_pos.narrow(0, 1, n - 1));
  at::Tensor end_of = std::get<0>(at::cummin(shifted.flip({0}), 0)).flip({0}).contiguous();
  return {is_start.to(at::kByte).contiguous(), end_of};
}

// First index of a segment that is not finite or has end < start, or n: a device
// scalar, read on the host together with the result size (no extra sync).
inline at::Tensor first_bad_segment(const at::Tensor& segments_double) {
  const int64_t n = segments_double.size(0);
  at::Tensor s = segments_double.select(1, 0), e = segments_double.select(1, 1);
  at::Tensor ok = at::isfinite(s).logical_and_(at::isfinite(e)).logical_and_(e >= s);
  at::Tensor pos = at::arange(n, segments_double.options().dtype(at::kLong));
  return at::where(ok, at::full({}, n, pos.options()), pos).min();
}

// Reads [count, first_bad] to the host (the op's one synchronisation) and raises
// a ValueError naming `segments` if a segment was invalid.
inline int64_t read_count_and_check(const at::Tensor& count, const at::Tensor& first_bad,
                                    const at::Tensor& segments_double) {
  const at::Tensor host = at::stack({count.to(at::kLong).reshape({}), first_bad.reshape({})}).cpu();
  const int64_t* h = host.data_ptr<int64_t>();
  const int64_t n = segments_double.size(0);
  if (h[1] < n) {
    const at::Tensor bad = segments_double[h[1]].cpu();
    const double s = bad[0].item<double>(), e = bad[1].item<double>();
    TORCH_CHECK_VALUE(false, "segments: expected finite coordinates with end >= start, got segment ", h[1], " = (", s,
                      ", ", e, ")");
  }
  return h[0];
}

}  // namespace cuda_common
}  // namespace nms
}  // namespace mmsd_ext
