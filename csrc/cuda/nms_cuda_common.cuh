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
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>

#include <limits>
#include <tuple>

#include "nms_checks.h"

namespace mmsd_ext {
namespace nms {
namespace cuda_common {
// Internal linkage: each .cu file that includes this gets its own copy of the
// kernel below (a kernel defined in a header would otherwise be defined twice).
namespace {

// is_start[p] = 1 where a group starts (p == 0 or a new id); end_of[p] = the end of
// p's group, the first position whose id is larger (a binary search in the sorted ids;
// that is also the first group start after p). groups == nullptr: one group.
__global__ void group_bounds_kernel(const int64_t* __restrict__ groups, int64_t n, uint8_t* __restrict__ is_start,
                                    int64_t* __restrict__ end_of) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= n) return;
  if (groups == nullptr) {
    is_start[p] = p == 0;
    end_of[p] = n;
    return;
  }
  const int64_t g = groups[p];
  is_start[p] = p == 0 || groups[p - 1] != g;
  int64_t lo = p + 1, hi = n;  // the first position in [p + 1, n) with an id > g
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (groups[mid] > g) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  end_of[p] = lo;
}

// [is_start (uint8), end_of (int64)] of non-decreasing group ids (None: one group),
// in one launch.
inline std::tuple<at::Tensor, at::Tensor> group_bounds(const c10::optional<at::Tensor>& sorted_groups, int64_t n,
                                                       const at::TensorOptions& long_opts) {
  at::Tensor is_start = at::empty({n}, long_opts.dtype(at::kByte));
  at::Tensor end_of = at::empty({n}, long_opts);
  if (n == 0) return {is_start, end_of};
  at::Tensor g;
  if (sorted_groups.has_value()) g = sorted_groups->contiguous();
  constexpr int threads = 256;
  group_bounds_kernel<<<static_cast<unsigned>(ceil_div(n, threads)), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g.defined() ? g.data_ptr<int64_t>() : nullptr, n, is_start.data_ptr<uint8_t>(), end_of.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {is_start, end_of};
}

// Sort key of a value for a descending visit: ordered as the values, -0.0 equal to
// +0.0, every NaN below -inf. A double's bits, read as int64, order the non-negative
// values; flipping the magnitude bits of the negative ones orders those too.
__device__ __forceinline__ int64_t descending_key(double v) {
  if (isnan(v)) return std::numeric_limits<int64_t>::min();
  const long long bits = __double_as_longlong(v + 0.0);  // + 0.0: -0.0 becomes +0.0
  return bits < 0 ? bits ^ 0x7FFFFFFFFFFFFFFFLL : bits;
}

__global__ void descending_key_kernel(const double* __restrict__ values, int64_t n, int64_t* __restrict__ key) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  key[i] = descending_key(values[i]);
}

// Stable order by descending value (ties to the lower index), NaN last, -0.0 equal to
// +0.0: the visit order of the CPU kernels. Not a sort of -values: CUDA's radix sort
// orders NaNs by their sign bit (which negation flips) and keeps -0.0 apart from
// +0.0. One launch for the integer keys, then one stable sort.
inline at::Tensor descending_order(const at::Tensor& values) {
  const at::Tensor v = values.to(at::kDouble).contiguous();
  const int64_t n = v.numel();
  at::Tensor key = at::empty({n}, v.options().dtype(at::kLong));
  if (n > 0) {
    constexpr int threads = 256;
    descending_key_kernel<<<static_cast<unsigned>(ceil_div(n, threads)), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        v.data_ptr<double>(), n, key.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return std::get<1>(at::sort(key, /*stable=*/true, 0, /*descending=*/true));
}

// A segment the NMS ops accept: finite coordinates with end >= start.
__device__ __forceinline__ bool segment_ok(double start, double end) {
  return isfinite(start) && isfinite(end) && end >= start;
}

// The error for segment i that segment_ok rejected (values read to the host), in the
// words of the CPU check (nms_checks.h); as_float: the user's segments are float32.
inline void throw_bad_segment(const at::Tensor& segments, int64_t i, bool as_float) {
  const at::Tensor row = segments[i].to(at::kDouble).cpu();
  const double s = row[0].item<double>(), e = row[1].item<double>();
  const bool finite = std::isfinite(s) && std::isfinite(e);
  TORCH_CHECK_VALUE(false, "segments: expected ", finite ? "end >= start" : "finite coordinates", ", got segment ", num(i),
                    " = (", real(s, as_float), ", ", real(e, as_float), ")");
}

// first_bad = min(first_bad, i) for every segment i that is not finite or has end < start.
__global__ void first_bad_segment_kernel(const double* __restrict__ seg, int64_t n,
                                         unsigned long long* __restrict__ first_bad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const double s = seg[2 * i], e = seg[2 * i + 1];
  if (!segment_ok(s, e)) atomicMin(first_bad, static_cast<unsigned long long>(i));
}

// First index of a segment that is not finite or has end < start, or n: a device
// scalar, read on the host together with the result size (no extra sync).
inline at::Tensor first_bad_segment(const at::Tensor& segments_double) {
  const int64_t n = segments_double.size(0);
  at::Tensor first_bad = at::full({}, n, segments_double.options().dtype(at::kLong));
  constexpr int threads = 256;
  first_bad_segment_kernel<<<static_cast<unsigned>(ceil_div(n, threads)), threads, 0,
                             c10::cuda::getCurrentCUDAStream()>>>(
      segments_double.data_ptr<double>(), n, reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return first_bad;
}

// Reads [count, first_bad] to the host (the op's one synchronisation) and raises
// a ValueError naming `segments` if a segment was invalid.
inline int64_t read_count_and_check(const at::Tensor& count, const at::Tensor& first_bad,
                                    const at::Tensor& segments_double, bool as_float) {
  const at::Tensor host = at::stack({count.to(at::kLong).reshape({}), first_bad.reshape({})}).cpu();
  const int64_t* h = host.data_ptr<int64_t>();
  const int64_t n = segments_double.size(0);
  if (h[1] < n) throw_bad_segment(segments_double, h[1], as_float);
  return h[0];
}

}  // namespace
}  // namespace cuda_common
}  // namespace nms
}  // namespace mmsd_ext
