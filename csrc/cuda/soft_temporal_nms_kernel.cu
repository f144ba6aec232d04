// CUDA kernel of soft_temporal_nms.
//
// Algorithm. Segments are sorted (stably) by group, so each group is a contiguous
// range [gs, ge); block b handles the groups starting in positions [64 b, 64 b + 64)
// (see nms_cuda_common.cuh), one after another. For one group the block loops:
//   1. block-wide argmax over the live segments of the group, by (current score
//      desc, original index asc): each thread reduces a strided slice, then warp
//      shuffles, then one warp over the warps' results;
//   2. thread 0 records the winner in slot gs + step (index, score, and the run key
//      below);
//   3. every thread decays its slice against the winner (gaussian or linear, the
//      winner itself leaves the live set, a score below min_score or NaN drops the
//      segment) and, in the same pass, reduces the best survivor: that is step 1 of
//      the next iteration, so each selection costs one pass over the group;
// until no segment of the group is live. Scores are kept in double, like the
// reference. A group of G segments with K selections costs O(K G / threads).
//
// Global order (see cpu/soft_temporal_nms_kernel.cpp for the argument): the
// selections sorted by (run start score desc, run start index asc, step), where a
// run starts at each selection ranked below all earlier ones of its group. The
// sort runs on the device; the number of selections is the only value read back.
#include <ATen/ATen.h>
// c10/cuda/CUDAStream.h, not ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS
// headers that a bare CUDA toolkit (as on the build machines here) does not ship.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#include "cuda/nms_cuda_common.cuh"
#include "nms_checks.h"
#include "nms_math.h"

namespace mmsd_ext {
namespace nms {
namespace {

// Threads per group-block, not yet tuned on a GPU: a group of THUMOS size (~60
// segments) uses a fraction of them; a group of 1e4 takes ~40 strided elements per
// thread per pass.
constexpr int kSoftThreads = 256;
constexpr int kWarps = kSoftThreads / 32;

struct Best {
  double score;
  int64_t index;  // original index; INT64_MAX when empty
  int64_t pos;    // sorted position
};

__device__ __forceinline__ bool better(const Best& a, const Best& b) {
  if (a.index == INT64_MAX) return false;
  if (b.index == INT64_MAX) return true;
  if (a.score != b.score) return a.score > b.score;
  return a.index < b.index;
}

__device__ __forceinline__ Best warp_best(Best v) {
  for (int d = 16; d > 0; d >>= 1) {
    Best o;
    o.score = __shfl_down_sync(0xffffffffu, v.score, d);
    o.index = __shfl_down_sync(0xffffffffu, v.index, d);
    o.pos = __shfl_down_sync(0xffffffffu, v.pos, d);
    if (better(o, v)) v = o;
  }
  return v;
}

// Block-wide best; every thread gets the result.
__device__ Best block_best(Best v, Best* warp_results, Best* result) {
  v = warp_best(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    Best w = lane < kWarps ? warp_results[lane] : Best{0.0, INT64_MAX, -1};
    w = warp_best(w);
    if (lane == 0) *result = w;
  }
  __syncthreads();
  return *result;
}

__global__ void __launch_bounds__(kSoftThreads) soft_temporal_nms_kernel(
    const double* __restrict__ seg,         // [n, 2] segments sorted by group
    const int64_t* __restrict__ orig,       // [n] original index of each sorted position
    double* __restrict__ cur,               // [n] current scores (in: initial scores)
    uint8_t* __restrict__ alive,            // [n] live flags (in: score >= min_score)
    const uint8_t* __restrict__ is_start,   // [n] 1 where a group starts
    const int64_t* __restrict__ end_of,     // [n] end of the group starting here
    int64_t n, bool gaussian, double sigma, double threshold, double min_score, double offset,
    int64_t* __restrict__ out_index,        // [n] slot gs + step: selected original index
    double* __restrict__ out_score,         // [n] its score at selection
    double* __restrict__ out_run_score,     // [n] its run key: score ...
    int64_t* __restrict__ out_run_index,    // [n] ... and index of the run's start
    int64_t* __restrict__ count) {          // [n] at gs: number of selections of the group
  __shared__ Best warp_results[kWarps];
  __shared__ Best result;
  const int64_t tile0 = blockIdx.x * kTile;
  for (int t = 0; t < kTile && tile0 + t < n; ++t) {
    const int64_t gs = tile0 + t;
    if (!is_start[gs]) continue;
    const int64_t ge = end_of[gs];
    Best local{0.0, INT64_MAX, -1};
    for (int64_t q = gs + threadIdx.x; q < ge; q += blockDim.x) {
      if (alive[q]) {
        const Best c{cur[q], orig[q], q};
        if (better(c, local)) local = c;
      }
    }
    Best best = block_best(local, warp_results, &result);
    int64_t step = 0;
    double run_score = 0.0;
    int64_t run_index = -1;
    while (best.index != INT64_MAX) {
      if (run_index < 0 || best.score < run_score || (best.score == run_score && best.index > run_index)) {
        run_score = best.score;
        run_index = best.index;
      }
      if (threadIdx.x == 0) {
        out_index[gs + step] = best.index;
        out_score[gs + step] = best.score;
        out_run_score[gs + step] = run_score;
        out_run_index[gs + step] = run_index;
      }
      ++step;
      const double bs = seg[2 * best.pos], be = seg[2 * best.pos + 1];
      local = Best{0.0, INT64_MAX, -1};
      for (int64_t q = gs + threadIdx.x; q < ge; q += blockDim.x) {
        if (!alive[q]) continue;
        if (q == best.pos) {
          alive[q] = 0;
          continue;
        }
        const double iou = segment_overlap(bs, be, seg[2 * q], seg[2 * q + 1], kIoU, offset);
        double s = cur[q];
        if (gaussian) {
          s *= exp(-(iou * iou) / sigma);
        } else if (iou > threshold) {
          s *= 1.0 - iou;
        }
        cur[q] = s;
        if (s >= min_score) {
          const Best c{s, orig[q], q};
          if (better(c, local)) local = c;
        } else {
          alive[q] = 0;  // below min_score, or NaN
        }
      }
      best = block_best(local, warp_results, &result);
    }
    if (threadIdx.x == 0) count[gs] = step;
  }
}

std::tuple<at::Tensor, at::Tensor> soft_temporal_nms_cuda(const at::Tensor& segments, const at::Tensor& scores,
                                                          const c10::optional<at::Tensor>& groups,
                                                          c10::string_view method, double sigma, double iou_threshold,
                                                          double min_score, double offset) {
  check_nms_inputs(segments, scores, groups, offset);
  check_soft_nms_params(method, sigma, iou_threshold, min_score);
  TORCH_CHECK_VALUE(segments.is_cuda(), "segments: expected a CUDA tensor, got ",
                    device_text(segments.device()));
  c10::cuda::CUDAGuard guard(segments.device());
  const int64_t n = segments.size(0);
  const auto long_opts = segments.options().dtype(at::kLong);
  const auto double_opts = segments.options().dtype(at::kDouble);
  if (n == 0) return {at::empty({0}, long_opts), at::empty({0}, scores.options())};

  const at::Tensor seg_d = segments.to(at::kDouble).contiguous();
  const at::Tensor first_bad = cuda_common::first_bad_segment(seg_d);
  at::Tensor order = at::arange(n, long_opts);
  c10::optional<at::Tensor> sorted_groups;
  if (groups.has_value()) {
    at::Tensor g_sorted;
    std::tie(g_sorted, order) = at::sort(*groups, /*stable=*/true, 0, false);
    sorted_groups = g_sorted.contiguous();
  }
  at::Tensor is_start, end_of;
  std::tie(is_start, end_of) = cuda_common::group_bounds(sorted_groups, n, long_opts);
  const at::Tensor seg_sorted = seg_d.index_select(0, order).contiguous();
  at::Tensor cur = scores.to(at::kDouble).index_select(0, order).contiguous();
  at::Tensor alive = (cur >= min_score).to(at::kByte).contiguous();

  at::Tensor out_index = at::zeros({n}, long_opts);
  at::Tensor out_score = at::zeros({n}, double_opts);
  at::Tensor out_run_score = at::zeros({n}, double_opts);
  at::Tensor out_run_index = at::zeros({n}, long_opts);
  at::Tensor count = at::zeros({n}, long_opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  soft_temporal_nms_kernel<<<static_cast<unsigned>(ceil_div(n, kTile)), kSoftThreads, 0, stream>>>(
      seg_sorted.data_ptr<double>(), order.data_ptr<int64_t>(), cur.data_ptr<double>(), alive.data_ptr<uint8_t>(),
      is_start.data_ptr<uint8_t>(), end_of.data_ptr<int64_t>(), n, method == "gaussian", sigma, iou_threshold,
      min_score, offset, out_index.data_ptr<int64_t>(), out_score.data_ptr<double>(), out_run_score.data_ptr<double>(),
      out_run_index.data_ptr<int64_t>(), count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Slot p holds a selection iff p - gs < count[gs] for the group start gs <= p.
  const at::Tensor pos = at::arange(n, long_opts);
  const at::Tensor start_of = std::get<0>(at::cummax(at::where(is_start.to(at::kBool), pos, at::zeros_like(pos)), 0));
  const at::Tensor valid = (pos - start_of) < count.index_select(0, start_of);
  // Stable sorts, least significant key first: slots are in (group, step) order;
  // then run index asc, run score desc, and the empty slots last.
  at::Tensor perm = std::get<1>(at::sort(out_run_index, /*stable=*/true, 0, false));
  perm = perm.index_select(0, cuda_common::descending_order(out_run_score.index_select(0, perm)));
  perm = perm.index_select(0, std::get<1>(at::sort(valid.logical_not().index_select(0, perm).to(at::kByte), true, 0, false)));
  const int64_t total = cuda_common::read_count_and_check(valid.sum(), first_bad, seg_d,
                                                             segments.scalar_type() == at::kFloat);
  const at::Tensor chosen = perm.narrow(0, 0, total);
  return {out_index.index_select(0, chosen), out_score.index_select(0, chosen).to(scores.scalar_type())};
}

}  // namespace
}  // namespace nms
}  // namespace mmsd_ext

TORCH_LIBRARY_IMPL(mmsd_ext, CUDA, m) {
  m.impl("soft_temporal_nms", &mmsd_ext::nms::soft_temporal_nms_cuda);
}
