// CUDA kernels of temporal_nms and of _temporal_nms_gather.
//
// The design of torchvision's CUDA nms (64 x 64 blocks of pairwise tests packed
// into 64-bit suppression words), changed in three ways:
// 1. Groups. Segments are sorted by (group, visit order), so each group is a
//    contiguous range; a row only needs the column tiles up to its group's end, so
//    the mask is a band: mask[i, k] holds the 64 columns of tile i / 64 + k, and
//    tiles whose rows and columns share no group are neither computed nor read.
// 2. The greedy keep-gather runs on the device (temporal_nms_gather_kernel), not
//    on the host after copying the mask back; groups are gathered in parallel.
// 3. The result size is read back to the host once, with the validity check of
//    the segments folded into the same read; with groups and n > kDenseMaskMaxSegments
//    the size of the largest group is read first (see below). The gather op called
//    on its own (the Triton backend's second stage) reads its input checks once.
//
// Small inputs (n <= kSmallNmsMaxSegments) take another path: one launch of one
// block (temporal_nms_small_kernel) ranks the segments in visit order, runs the
// greedy pass in shared memory and writes the kept indices, their count and the
// validity check; then the same one read of [count, bad] to the host. There the
// ~10 launches of the path above, not the work, set the time. Groups need not be
// sorted for it: the kernel compares group ids directly.
//
// Mask memory: n * W * 8 bytes, W = the number of column tiles of the band. With
// one group (or n <= kDenseMaskMaxSegments) W = ceil(n / 64): n^2 / 8 bytes, 1.25 GB
// at n = 1e5, as torchvision. With groups and larger n, W = ceil(Gmax / 64) + 1
// from the largest group Gmax, which costs one extra read to the host. A mask over
// kMaxMaskBytes is not built: the CPU kernel runs on copies instead (see there).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Dispatch.h>
// c10/cuda/CUDAStream.h, not ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS
// headers that a bare CUDA toolkit (as on the build machines here) does not ship.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "cuda/nms_cuda_common.cuh"
#include "nms_checks.h"
#include "nms_math.h"

namespace mmsd_ext {
namespace nms {
namespace {

// Below this many segments the band is the full triangle (no read of the largest
// group size); the mask then takes at most 8192^2 / 8 bytes = 8 MiB.
constexpr int64_t kDenseMaskMaxSegments = 8192;
// At most this many segments take the single-block path (temporal_nms_small_kernel);
// also its most threads (one per segment) and the length of its shared arrays
// (9476 bytes in all). Not yet measured on a GPU. The block's greedy pass costs one
// __syncthreads per sorted position and its ranking n compares per thread, so its
// time grows linearly in n, while the ~10 launches of the large path cost about the
// same at any small n; the crossover is assumed to lie above 256, which keeps one
// segment per thread in one block of 8 warps.
constexpr int64_t kSmallNmsMaxSegments = 256;
static_assert(kSmallNmsMaxSegments % 32 == 0 && kSmallNmsMaxSegments <= 1024, "whole warps, one block");
// The largest suppression mask built, 4 GiB: one group of about 185k segments (n^2 / 8
// bytes; M = 1e6 would need 116 GiB, more than an H100 or H200 has). Past it the
// CPU kernel, whose memory is linear in M, runs on host copies of the inputs, and the
// result is copied back. The limit is set by memory, not by a timing: where the GPU
// and the CPU paths cross over is not measured. The Triton backend uses the same.
constexpr int64_t kMaxMaskBytes = int64_t(4) << 30;
// Threads of the gather kernel (not tuned on a GPU): they share the OR of the kept
// rows' words into the later tiles of the group (see the kernel).
constexpr int kGatherThreads = 256;

// Per segment i: the sort key of its score (descending visit, see descending_key)
// and the validity check of its coordinates. bad = max(n - i) over the invalid
// segments (0 if none): it names the first one. Reads the inputs in their dtypes.
template <typename seg_t, typename score_t>
__global__ void temporal_nms_prepare_kernel(const seg_t* __restrict__ seg, const score_t* __restrict__ scores,
                                            int64_t n, int64_t* __restrict__ key,
                                            unsigned long long* __restrict__ bad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  key[i] = cuda_common::descending_key(static_cast<double>(scores[i]));
  const double s = static_cast<double>(seg[2 * i]), e = static_cast<double>(seg[2 * i + 1]);
  if (!cuda_common::segment_ok(s, e)) atomicMax(bad, static_cast<unsigned long long>(n - i));
}

// One 64 x 64 tile of suppression bits. Block (r, k): rows of tile r against the
// columns of tile r + k. Sorted position p holds segment order[p]. Bit b of
// mask[i * W + k] is set when j = 64 (r + k) + b comes after i in the sorted order,
// is in i's group, and i overlaps it by more than the threshold (j being the
// lower-ranked candidate). Coordinates are compared in double.
template <typename seg_t>
__global__ void temporal_nms_mask_kernel(const seg_t* __restrict__ seg, const int64_t* __restrict__ order,
                                         const int64_t* __restrict__ groups, int64_t n, int64_t width,
                                         double threshold, int kind, double offset,
                                         unsigned long long* __restrict__ mask) {
  const int64_t r = blockIdx.x;
  const int64_t k = blockIdx.y;
  const int64_t tiles = ceil_div(n, kTile);
  const int64_t c = r + k;
  if (c >= tiles) return;
  const int64_t row0 = r * kTile, col0 = c * kTile;
  // Sorted groups: no row of this tile shares a group with a column of that one.
  if (groups != nullptr && groups[min(row0 + kTile, n) - 1] < groups[col0]) return;

  __shared__ double col_start[kTile], col_end[kTile];
  __shared__ int64_t col_group[kTile];
  const int64_t j = col0 + threadIdx.x;
  if (j < n) {
    const int64_t src = order[j];
    col_start[threadIdx.x] = static_cast<double>(seg[2 * src]);
    col_end[threadIdx.x] = static_cast<double>(seg[2 * src + 1]);
    col_group[threadIdx.x] = groups != nullptr ? groups[j] : 0;
  }
  __syncthreads();
  const int64_t i = row0 + threadIdx.x;
  if (i >= n) return;
  const int64_t src = order[i];
  const double s = static_cast<double>(seg[2 * src]), e = static_cast<double>(seg[2 * src + 1]);
  const int64_t g = groups != nullptr ? groups[i] : 0;
  const int count = static_cast<int>(min(kTile, n - col0));
  const int first = c == r ? static_cast<int>(threadIdx.x) + 1 : 0;
  unsigned long long bits = 0;
  for (int b = first; b < count; ++b) {
    if (col_group[b] == g && overlap_exceeds(s, e, col_start[b], col_end[b], kind, offset, threshold)) {
      bits |= 1ULL << b;
    }
  }
  mask[i * width + k] = bits;
}

// Greedy keep-gather. Block b handles the groups that start in tile b. For each
// tile r of a group, in order: 64 threads stage the rows' diagonal words in shared
// memory; thread 0 walks the 64 rows (a row is kept unless its bit is set in the
// removed word of tile r, and a kept row removes its diagonal bits) and lists the
// kept rows; the 64 threads write keep for their rows (true or false, so keep needs
// no clearing); then the block ORs the kept rows' words into the removed words of
// the later tiles of the group, in global memory with atomicOr (a tile at a group
// boundary is shared with the block of the neighbouring group, whose bits are
// disjoint). The OR is spread over rows and columns: with C later tiles and C <
// blockDim, thread t takes column t % C and every S-th kept row from t / C (S =
// blockDim / C row slots); with C >= blockDim, a column at a time and every kept
// row. Four loads are in flight per thread. is_start / end_of == nullptr: one
// group, [0, n). visit_pos != nullptr: keep of sorted position p goes to
// keep[visit_pos[p]].
__global__ void temporal_nms_gather_kernel(const unsigned long long* __restrict__ mask, int64_t n, int64_t width,
                                           const uint8_t* __restrict__ is_start, const int64_t* __restrict__ end_of,
                                           const int64_t* __restrict__ visit_pos, unsigned long long* removed,
                                           bool* __restrict__ keep) {
  __shared__ unsigned long long diag[kTile];
  __shared__ unsigned long long kept_bits;
  __shared__ int kept_rows[kTile];
  __shared__ int kept_count;
  const int64_t threads = blockDim.x;
  const int64_t tile0 = blockIdx.x * kTile;
  for (int t = 0; t < kTile && tile0 + t < n; ++t) {
    const int64_t gs = tile0 + t;
    if (is_start != nullptr ? !is_start[gs] : gs != 0) continue;
    const int64_t ge = end_of != nullptr ? end_of[gs] : n;
    const int64_t t_last = (ge - 1) / kTile;
    // The group's last tile may be shared with the next group: only this group's
    // bits go in (as in the CPU gather, whatever else the mask holds).
    const unsigned long long last_bits = ge - t_last * kTile < kTile ? (1ULL << (ge - t_last * kTile)) - 1ULL : ~0ULL;
    for (int64_t r = gs / kTile; r <= t_last; ++r) {
      const int64_t row0 = r * kTile;
      if (threadIdx.x < kTile) {
        const int64_t i = row0 + threadIdx.x;
        diag[threadIdx.x] = (i >= gs && i < ge) ? mask[i * width] : 0ULL;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        unsigned long long word = atomicOr(removed + r, 0ULL);  // coherent read (L2)
        unsigned long long kept = 0;
        int count = 0;
        const int b0 = static_cast<int>(max(gs - row0, int64_t{0}));
        const int b1 = static_cast<int>(min(ge - row0, kTile));
        for (int b = b0; b < b1; ++b) {
          if (!((word >> b) & 1ULL)) {
            kept |= 1ULL << b;
            word |= diag[b];
            kept_rows[count++] = b;
          }
        }
        kept_bits = kept;
        kept_count = count;
      }
      __syncthreads();
      const unsigned long long kept = kept_bits;
      const int nk = kept_count;
      if (threadIdx.x < kTile) {
        const int64_t p = row0 + threadIdx.x;
        if (p >= gs && p < ge) keep[visit_pos != nullptr ? visit_pos[p] : p] = (kept >> threadIdx.x) & 1ULL;
      }
      const int64_t C = min(t_last - r, width - 1);  // later tiles: k = 1 .. C
      if (nk > 0 && C > 0) {
        const int64_t S = C >= threads ? 1 : threads / C;  // row slots
        const int64_t slot = C >= threads ? 0 : threadIdx.x / C;
        const int64_t c_step = C >= threads ? threads : C;
        for (int64_t c = C >= threads ? threadIdx.x : threadIdx.x % C; slot < S && c < C; c += c_step) {
          const unsigned long long* col = mask + row0 * width + 1 + c;
          unsigned long long acc = 0;
          int64_t q = slot;
          for (; q + 3 * S < nk; q += 4 * S) {
            const unsigned long long a0 = col[kept_rows[q] * width];
            const unsigned long long a1 = col[kept_rows[q + S] * width];
            const unsigned long long a2 = col[kept_rows[q + 2 * S] * width];
            const unsigned long long a3 = col[kept_rows[q + 3 * S] * width];
            acc |= a0 | a1 | a2 | a3;
          }
          for (; q < nk; q += S) acc |= col[kept_rows[q] * width];
          if (r + 1 + c == t_last) acc &= last_bits;
          if (acc) atomicOr(removed + r + 1 + c, acc);
        }
      }
      __syncthreads();
    }
  }
}

// out[pos[i] - 1] = src[i] where flag[i]; pos is the inclusive prefix sum of flag.
// The last thread also stores the total, pos[n - 1], in *total.
__global__ void compact_kernel(const bool* __restrict__ flag, const int64_t* __restrict__ pos,
                               const int64_t* __restrict__ src, int64_t n, int64_t* __restrict__ out,
                               int64_t* __restrict__ total) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  if (flag[i]) out[pos[i] - 1] = src[i];
  if (total != nullptr && i == n - 1) *total = pos[i];
}

// The whole op for n <= kSmallNmsMaxSegments in one block, in four phases separated
// by __syncthreads. Thread t owns positions (and indices) t, t + blockDim, ... < n.
// 1. key[i]: the sort key of score i (descending_key, as the prepare kernel).
// 2. rank(i) = #{j : key[j] > key[i] or (key[j] == key[i] and j < i)}, the position of
//    i in the visit order (the pairs (key, index) are distinct, so the ranks are a
//    permutation of 0 .. n - 1); i's coordinates (double), group and index go to
//    position rank(i), and removed[rank(i)] = false. The validity check of i as in the
//    prepare kernel: bad = max(n - i) over the invalid segments (0 if none).
// 3. The greedy pass, p = 0 .. n - 1: every thread reads removed[p], last written
//    before the previous step's __syncthreads (a step writes only positions > p), so
//    all threads take the same branch; if p is kept, each thread marks its positions
//    q > p of p's group that p overlaps by more than the threshold (p, the kept one,
//    first in overlap_exceeds, as in the mask kernel). Greedy NMS per group is this
//    one pass in visit order in which only segments of a group suppress each other,
//    so the groups need not be sorted. groups == nullptr: one group.
// 4. Thread 0 writes the kept indices in visit order to out[0, count), count to
//    out[n] and bad to out[n + 1] (so nothing needs zeroing before the launch).
template <typename seg_t, typename score_t>
__global__ void temporal_nms_small_kernel(const seg_t* __restrict__ seg, const score_t* __restrict__ scores,
                                          const int64_t* __restrict__ groups, int n, double threshold, int kind,
                                          double offset, int64_t* __restrict__ out) {
  __shared__ int64_t key[kSmallNmsMaxSegments];  // by index
  __shared__ double start[kSmallNmsMaxSegments], end[kSmallNmsMaxSegments];  // by position, as the rest
  __shared__ int64_t group[kSmallNmsMaxSegments];
  __shared__ int index[kSmallNmsMaxSegments];
  __shared__ bool removed[kSmallNmsMaxSegments];
  __shared__ int bad;
  const int t = threadIdx.x, stride = blockDim.x;

  if (t == 0) bad = 0;
  for (int i = t; i < n; i += stride) key[i] = cuda_common::descending_key(static_cast<double>(scores[i]));
  __syncthreads();

  for (int i = t; i < n; i += stride) {
    const int64_t k = key[i];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += key[j] > k || (key[j] == k && j < i);
    const double s = static_cast<double>(seg[2 * i]), e = static_cast<double>(seg[2 * i + 1]);
    if (!cuda_common::segment_ok(s, e)) atomicMax(&bad, n - i);
    start[rank] = s;
    end[rank] = e;
    group[rank] = groups != nullptr ? groups[i] : 0;
    index[rank] = i;
    removed[rank] = false;
  }
  __syncthreads();

  for (int p = 0; p < n; ++p) {
    if (!removed[p]) {
      const double ps = start[p], pe = end[p];
      const int64_t pg = group[p];
      for (int q = t; q < n; q += stride) {
        if (q > p && group[q] == pg && overlap_exceeds(ps, pe, start[q], end[q], kind, offset, threshold)) {
          removed[q] = true;
        }
      }
    }
    __syncthreads();
  }

  if (t == 0) {
    int count = 0;
    for (int p = 0; p < n; ++p) {
      if (!removed[p]) out[count++] = index[p];
    }
    out[n] = count;
    out[n + 1] = bad;
  }
}

// removed: ceil(n / 64) words, zero. is_start / end_of / visit_pos: undefined for
// one group / no reordering (see the kernel).
void launch_gather(const at::Tensor& mask, const at::Tensor& is_start, const at::Tensor& end_of,
                   const at::Tensor& visit_pos, int64_t* removed, const at::Tensor& keep) {
  const int64_t n = mask.size(0), width = mask.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  temporal_nms_gather_kernel<<<static_cast<unsigned>(ceil_div(n, kTile)), kGatherThreads, 0, stream>>>(
      reinterpret_cast<const unsigned long long*>(mask.data_ptr<int64_t>()), n, width,
      is_start.defined() ? is_start.data_ptr<uint8_t>() : nullptr,
      end_of.defined() ? end_of.data_ptr<int64_t>() : nullptr,
      visit_pos.defined() ? visit_pos.data_ptr<int64_t>() : nullptr, reinterpret_cast<unsigned long long*>(removed),
      keep.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// temporal_nms_cuda for 1 <= n <= kSmallNmsMaxSegments (contiguous inputs): one
// launch, then one read of [count, bad] to the host.
at::Tensor temporal_nms_small_cuda(const at::Tensor& seg, const at::Tensor& sc, const c10::optional<at::Tensor>& groups,
                                   double iou_threshold, int kind, double offset) {
  const int64_t n = seg.size(0);
  // [0, n): the kept indices; n, n + 1: count and bad.
  at::Tensor out = at::empty({n + 2}, seg.options().dtype(at::kLong));
  at::Tensor g;
  if (groups.has_value()) g = groups->contiguous();
  const int threads = static_cast<int>(ceil_div(n, 32) * 32);  // one per segment, in whole warps
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(seg.scalar_type(), "temporal_nms_cuda", [&] {
    using seg_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "temporal_nms_cuda", [&] {
      temporal_nms_small_kernel<seg_t, scalar_t><<<1, threads, 0, stream>>>(
          seg.data_ptr<seg_t>(), sc.data_ptr<scalar_t>(), g.defined() ? g.data_ptr<int64_t>() : nullptr,
          static_cast<int>(n), iou_threshold, kind, offset, out.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const at::Tensor host = out.narrow(0, n, 2).cpu();  // the op's one synchronisation
  const int64_t count = host.data_ptr<int64_t>()[0], bad = host.data_ptr<int64_t>()[1];
  if (bad != 0) cuda_common::throw_bad_segment(seg, n - bad, seg.scalar_type() == at::kFloat);
  return out.narrow(0, 0, count);
}

// The CPU kernel of the op on host copies, the kept indices back on the inputs' device.
at::Tensor temporal_nms_on_host(const at::Tensor& segments, const at::Tensor& scores,
                                const c10::optional<at::Tensor>& groups, double iou_threshold,
                                c10::string_view overlap, double offset) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mmsd_ext::temporal_nms", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double,
                            c10::string_view, double)>();
  c10::optional<at::Tensor> host_groups;
  if (groups.has_value()) host_groups = groups->cpu();
  return op.call(segments.cpu(), scores.cpu(), host_groups, iou_threshold, overlap, offset).to(segments.device());
}

// Launches (n > kSmallNmsMaxSegments, one group): the zeroed scratch, prepare, the
// sort (torch), mask, gather, the prefix sum (torch), compact, and one read of
// [count, bad] to the host.
at::Tensor temporal_nms_cuda(const at::Tensor& segments, const at::Tensor& scores, const c10::optional<at::Tensor>& groups,
                             double iou_threshold, c10::string_view overlap, double offset) {
  check_nms_inputs(segments, scores, groups, offset);
  check_threshold("iou_threshold", iou_threshold);
  const int kind = overlap_kind(std::string(overlap));
  TORCH_CHECK_VALUE(segments.is_cuda(), "segments: expected a CUDA tensor, got ",
                    device_text(segments.device()));
  c10::cuda::CUDAGuard guard(segments.device());
  const int64_t n = segments.size(0);
  const auto long_opts = segments.options().dtype(at::kLong);
  if (n == 0) return at::empty({0}, long_opts);

  const at::Tensor seg = segments.contiguous(), sc = scores.contiguous();
  if (n <= kSmallNmsMaxSegments) return temporal_nms_small_cuda(seg, sc, groups, iou_threshold, kind, offset);
  const int64_t tiles = ceil_div(n, kTile);
  // Scratch, zeroed once: the removed words of the gather, then [count, bad].
  at::Tensor scratch = at::zeros({tiles + 2}, long_opts);
  int64_t* const removed = scratch.data_ptr<int64_t>();
  int64_t* const count_and_bad = removed + tiles;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int threads = 256;
  const unsigned blocks_n = static_cast<unsigned>(ceil_div(n, threads));

  // Visit order: descending score, ties by index, NaN last. Then a stable sort by
  // group keeps that order inside each group.
  at::Tensor key = at::empty({n}, long_opts);
  AT_DISPATCH_FLOATING_TYPES(seg.scalar_type(), "temporal_nms_cuda", [&] {
    using seg_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "temporal_nms_cuda", [&] {
      temporal_nms_prepare_kernel<seg_t, scalar_t><<<blocks_n, threads, 0, stream>>>(
          seg.data_ptr<seg_t>(), sc.data_ptr<scalar_t>(), n, key.data_ptr<int64_t>(),
          reinterpret_cast<unsigned long long*>(count_and_bad + 1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const at::Tensor perm = std::get<1>(at::sort(key, /*stable=*/true, 0, /*descending=*/true));
  at::Tensor gperm = perm;    // sorted position -> original index
  at::Tensor by_group;        // sorted position -> visit position (with groups)
  c10::optional<at::Tensor> sorted_groups;
  at::Tensor is_start, end_of;  // undefined: one group
  if (groups.has_value()) {
    at::Tensor g_sorted;
    std::tie(g_sorted, by_group) = at::sort(groups->index_select(0, perm), /*stable=*/true, 0, false);
    gperm = perm.index_select(0, by_group);
    sorted_groups = g_sorted.contiguous();
    std::tie(is_start, end_of) = cuda_common::group_bounds(sorted_groups, n, long_opts);
  }

  int64_t width = tiles;
  if (sorted_groups.has_value() && n > kDenseMaskMaxSegments) {
    const at::Tensor sizes = end_of - at::arange(n, long_opts);
    const int64_t largest = at::where(is_start.to(at::kBool), sizes, at::zeros_like(sizes)).max().item<int64_t>();
    width = std::min(tiles, ceil_div(largest, kTile) + 1);
  }
  if (n * width * static_cast<int64_t>(sizeof(int64_t)) > kMaxMaskBytes) {
    return temporal_nms_on_host(segments, scores, groups, iou_threshold, overlap, offset);
  }
  // gridDim.y below; implied by the mask limit (width > 65535 means n > 4.19M rows of
  // over 512 KiB each).
  TORCH_INTERNAL_ASSERT(width <= 65535, "temporal_nms_cuda: mask width ", num(width), " past the grid limit");
  at::Tensor mask;
  try {
    mask = at::empty({n, width}, long_opts);
  } catch (const c10::OutOfMemoryError&) {
    // Under the limit but past what the GPU can give now (a shared or busy card): the
    // same way as past the limit. The queued work above only read the inputs.
    return temporal_nms_on_host(segments, scores, groups, iou_threshold, overlap, offset);
  }
  const dim3 blocks(static_cast<unsigned>(tiles), static_cast<unsigned>(width));
  AT_DISPATCH_FLOATING_TYPES(seg.scalar_type(), "temporal_nms_cuda", [&] {
    temporal_nms_mask_kernel<scalar_t><<<blocks, static_cast<unsigned>(kTile), 0, stream>>>(
        seg.data_ptr<scalar_t>(), gperm.data_ptr<int64_t>(),
        sorted_groups.has_value() ? sorted_groups->data_ptr<int64_t>() : nullptr, n, width, iou_threshold, kind,
        offset, reinterpret_cast<unsigned long long*>(mask.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // keep in visit order: the gather puts sorted position p at its visit position.
  at::Tensor keep_visit = at::empty({n}, long_opts.dtype(at::kBool));
  launch_gather(mask, is_start, end_of, by_group, removed, keep_visit);

  const at::Tensor pos = at::cumsum(keep_visit, 0, at::kLong);
  at::Tensor out = at::empty({n}, long_opts);
  compact_kernel<<<blocks_n, threads, 0, stream>>>(keep_visit.data_ptr<bool>(), pos.data_ptr<int64_t>(),
                                                    perm.data_ptr<int64_t>(), n, out.data_ptr<int64_t>(),
                                                    count_and_bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The op's one synchronisation (two with groups and n > kDenseMaskMaxSegments).
  const at::Tensor host = scratch.narrow(0, tiles, 2).cpu();
  const int64_t count = host.data_ptr<int64_t>()[0], bad = host.data_ptr<int64_t>()[1];
  if (bad != 0) cuda_common::throw_bad_segment(seg, n - bad, seg.scalar_type() == at::kFloat);
  // The kept indices are the first `count` of a buffer of n (no copy).
  return out.narrow(0, 0, count);
}

at::Tensor temporal_nms_gather_cuda(const at::Tensor& mask, const c10::optional<at::Tensor>& sorted_groups) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kLong, "mask: expected an int64 tensor, got ",
                   dtype_text(mask.scalar_type()));
  TORCH_CHECK_VALUE(mask.dim() == 2, "mask: expected shape [n, W], got ", shape(mask.sizes()));
  // Here when either tensor is on a CUDA device: the guard needs the mask to be.
  TORCH_CHECK_VALUE(mask.is_cuda(), "mask: expected a CUDA tensor like sorted_groups, got ",
                    device_text(mask.device()));
  c10::cuda::CUDAGuard guard(mask.device());
  const int64_t n = mask.size(0);
  at::Tensor keep = at::zeros({n}, mask.options().dtype(at::kBool));
  if (n == 0) return keep;
  TORCH_CHECK_VALUE(mask.size(1) >= 1, "mask: expected at least one tile per row, got shape ",
                    shape(mask.sizes()));
  c10::optional<at::Tensor> g;
  if (sorted_groups.has_value()) {
    TORCH_CHECK_TYPE(sorted_groups->scalar_type() == at::kLong, "sorted_groups: expected an int64 tensor, got ",
                     dtype_text(sorted_groups->scalar_type()));
    TORCH_CHECK_VALUE(sorted_groups->dim() == 1 && sorted_groups->size(0) == n, "sorted_groups: expected shape [",
                      num(n), "], got ", shape(sorted_groups->sizes()));
    TORCH_CHECK_VALUE(sorted_groups->device() == mask.device(), "sorted_groups: expected a tensor on ",
                      device_text(mask.device()), ", got ", device_text(sorted_groups->device()));
    g = sorted_groups->contiguous();
  }
  const auto long_opts = mask.options().dtype(at::kLong);
  at::Tensor is_start, end_of;
  std::tie(is_start, end_of) = cuda_common::group_bounds(g, n, long_opts);
  // The checks of the CPU kernel, from one read to the host: the group ids must not
  // decrease, and each row must hold the tiles up to its group's end (a narrower
  // mask would silently drop suppressions). need[p] = the tiles a group starting at
  // p spans; reported for the group that needs the most.
  const at::Tensor pos = at::arange(n, long_opts);
  const at::Tensor need = at::where(is_start.to(at::kBool),
                                    at::div(end_of - 1, kTile, "floor") - at::div(pos, kTile, "floor") + 1,
                                    at::zeros_like(pos));
  const at::Tensor widest = need.argmax();
  const at::Tensor decreasing =
      g.has_value() && n > 1 ? (g->narrow(0, 1, n - 1) < g->narrow(0, 0, n - 1)).any().to(at::kLong)
                             : at::zeros({}, long_opts);
  const at::Tensor host =
      at::stack({decreasing, need.index_select(0, widest.reshape({1})).reshape({}),
                 (end_of.index_select(0, widest.reshape({1})) - widest).reshape({})})
          .cpu();
  const int64_t* h = host.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(h[0] == 0, "sorted_groups: expected non-decreasing group ids");
  const int64_t width = mask.size(1);
  TORCH_CHECK_VALUE(width >= h[1], "mask: expected at least ", num(h[1]), " tiles per row for a group of ", num(h[2]),
                    " segments, got ", num(width));
  at::Tensor removed = at::zeros({ceil_div(n, kTile)}, long_opts);
  launch_gather(mask.contiguous(), is_start, end_of, at::Tensor(), removed.data_ptr<int64_t>(), keep);
  return keep;
}

}  // namespace
}  // namespace nms
}  // namespace mmsd_ext

TORCH_LIBRARY_IMPL(mmsd_ext, CUDA, m) {
  m.impl("temporal_nms", &mmsd_ext::nms::temporal_nms_cuda);
  m.impl("_temporal_nms_gather", &mmsd_ext::nms::temporal_nms_gather_cuda);
}
