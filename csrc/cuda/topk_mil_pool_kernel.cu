// CUDA kernels of top-k MIL pooling (schema: csrc/topk_mil_pool.cpp).
//
// Forward: one thread block per column (video b, class c). The column's order
// keys (topk_mil_pool_math.h) are cached in shared memory when they fit, then a
// radix select finds the k-th largest key one 8-bit digit at a time (a
// shared-memory histogram of the keys that share the digits found so far, and
// one warp that walks it). No sort: the selected sum is
//   sum(values with key > kth) + (k - count(key > kth)) * value(kth),
// and `cut`, the time index of the last selected element equal to kth, needs a
// block-wide scan only when kth is tied across the k-th place.
// k and lengths are read on the device: no host sync. A video whose k or length
// is out of range gets NaN and selects nothing (zero gradient).
// Backward: one elementwise pass that recomputes each key and applies (kth, cut).
#include "topk_mil_pool.h"
#include "topk_mil_pool_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

namespace mmsd_ext {
namespace {

using namespace topk_mil_pool_math;

constexpr int kWarp = 32;
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kMaxThreads = 256;
// Columns whose keys fit in this much dynamic shared memory are read from
// global memory once; longer ones are re-read (from L2) on every pass. With the
// 1 KiB histogram it stays under the 48 KiB a block may use without opting in.
constexpr int64_t kCacheBytes = 40 * 1024;
// Elementwise backward: threads per block.
constexpr int kBackwardThreads = 256;

// Warp 0 (all 32 lanes) walks the histogram from the top: the bin holding the
// need-th largest key goes to *digit, its rank inside the bin to *rank, its
// count to *count. Each lane owns 8 consecutive bins; a suffix sum over lanes
// finds the owning lane, which then walks its own bins.
__device__ void find_digit_warp(const int* hist, int need, int* digit, int* rank, int* count) {
  constexpr int kPer = kBins / kWarp;
  const int lane = threadIdx.x;
  int local[kPer];
  int own = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    local[j] = hist[lane * kPer + j];
    own += local[j];
  }
  int suffix = own;  // sum over lanes >= lane
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const int other = __shfl_down_sync(0xffffffffu, suffix, offset);
    if (lane + offset < kWarp) {
      suffix += other;
    }
  }
  // suffix falls with the lane; the keys sharing the prefix number >= need, so lane 0 qualifies.
  const unsigned qualifies = __ballot_sync(0xffffffffu, suffix >= need);
  const int owner = kWarp - 1 - __clz(qualifies);
  if (lane == owner) {
    int above = suffix - own;
#pragma unroll
    for (int j = kPer - 1; j >= 0; --j) {
      if (above + local[j] >= need) {
        *digit = lane * kPer + j;
        *rank = need - above;
        *count = local[j];
        break;
      }
      above += local[j];
    }
  }
}

// Sum over the block, in a fixed order (bitwise deterministic); the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* partial) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  if ((threadIdx.x & (kWarp - 1)) == 0) {
    partial[threadIdx.x / kWarp] = value;
  }
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x) / kWarp; ++w) {
      total += partial[w];
    }
  }
  return total;
}

template <typename scalar_t, bool kCached>
__global__ void __launch_bounds__(kMaxThreads) topk_mil_pool_forward_kernel(
    const scalar_t* __restrict__ scores,
    int64_t stride_b,
    int64_t stride_t,
    int64_t stride_c,
    int64_t T,
    int64_t C,
    const int64_t* __restrict__ k,
    const int64_t* __restrict__ lengths,
    bool largest,
    scalar_t* __restrict__ out,
    int64_t* __restrict__ kth_out,
    int64_t* __restrict__ cut_out) {
  using acc_t = at::opmath_type<scalar_t>;
  using key_t = typename KeyOf<acc_t>::type;
  constexpr int kKeyBits = static_cast<int>(sizeof(key_t) * 8);

  // One declaration for every instantiation (nvcc warns when alignments differ): 8 bytes suits both key widths.
  extern __shared__ __align__(8) unsigned char cache_bytes[];
  key_t* cache = reinterpret_cast<key_t*>(cache_bytes);
  __shared__ int hist[kBins];
  __shared__ int s_digit, s_rank, s_count, s_cut;
  __shared__ int s_warp_count[kMaxThreads / kWarp];
  __shared__ acc_t s_partial[kMaxThreads / kWarp];

  const int64_t column = blockIdx.x;
  const int64_t b = column / C, c = column % C;
  const int64_t length = lengths[b], kk = k[b];
  if (!(length >= 1 && length <= T && kk >= 1 && kk <= length)) {
    if (threadIdx.x == 0) {
      out[column] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      kth_out[column] = static_cast<int64_t>(invalid_kth<key_t>());
      cut_out[column] = kInvalidCut;
    }
    return;
  }
  const int n = static_cast<int>(length);  // T < 2**31, checked on the host
  const key_t flip = flip_mask<key_t>(largest);
  const scalar_t* col = scores + b * stride_b + c * stride_c;
  auto key_at = [&](int t) -> key_t {
    if constexpr (kCached) {
      return cache[t];
    } else {
      return order_key(static_cast<acc_t>(col[t * stride_t]), flip);
    }
  };
  if constexpr (kCached) {
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
      cache[t] = order_key(static_cast<acc_t>(col[t * stride_t]), flip);
    }
  }

  // Radix select, most significant digit first. Invariant: at least `need`
  // keys share `prefix` on the bits of `mask`, and the k-th largest is among them.
  key_t prefix = 0, mask = 0;
  int need = static_cast<int>(kk);
  int tied = 0;  // keys equal to the k-th, once every digit is fixed
  for (int shift = kKeyBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
      hist[i] = 0;
    }
    __syncthreads();  // also orders the cache fill before the first pass
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
      const key_t key = key_at(t);
      if ((key & mask) == prefix) {
        atomicAdd(&hist[(key >> shift) & (kBins - 1)], 1);
      }
    }
    __syncthreads();
    if (threadIdx.x < kWarp) {
      find_digit_warp(hist, need, &s_digit, &s_rank, &s_count);
    }
    __syncthreads();
    prefix |= static_cast<key_t>(s_digit) << shift;
    mask |= static_cast<key_t>(kBins - 1) << shift;
    need = s_rank;
    tied = s_count;
  }
  const key_t kth = prefix;
  // Now `need` of the `tied` keys equal to kth are selected, and everything above it.

  acc_t sum = 0;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const key_t key = key_at(t);
    if (key > kth) {
      sum += value_of_key(key, flip);
    }
  }
  sum = block_sum(sum, s_partial);

  int cut = n - 1;  // every tied key selected: any cut past the last one
  if (tied != need) {
    // Tiles of blockDim time steps in order: rank the tied keys with ballots
    // until the need-th one is found. Every thread runs every tile (ballots need full warps).
    const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
    const int warps = blockDim.x / kWarp;
    int seen = 0;
    for (int base = 0; base < n; base += blockDim.x) {
      const int t = base + threadIdx.x;
      const bool tie = t < n && key_at(t) == kth;
      const unsigned ties = __ballot_sync(0xffffffffu, tie);
      if (lane == 0) {
        s_warp_count[warp] = __popc(ties);
      }
      __syncthreads();
      int before = seen, total = seen;
      for (int w = 0; w < warps; ++w) {
        before += w < warp ? s_warp_count[w] : 0;
        total += s_warp_count[w];
      }
      if (tie && before + __popc(ties & ((1u << lane) - 1u)) + 1 == need) {
        s_cut = t;
      }
      __syncthreads();
      seen = total;
      if (seen >= need) {
        break;  // the same decision in every thread
      }
    }
    cut = s_cut;
  }

  if (threadIdx.x == 0) {
    sum += static_cast<acc_t>(need) * value_of_key(kth, flip);
    out[column] = static_cast<scalar_t>(sum / static_cast<acc_t>(kk));
    kth_out[column] = static_cast<int64_t>(kth);
    cut_out[column] = cut;
  }
}

// Each warp-row of a block (threadIdx.y) owns one time step (b, t) and its lanes
// walk the C columns: coalesced along C-contiguous scores and the contiguous
// gradient, and no integer division per element.
template <typename scalar_t>
__global__ void __launch_bounds__(kBackwardThreads) topk_mil_pool_backward_kernel(
    const at::opmath_type<scalar_t>* __restrict__ grad_out,
    int64_t stride_gb,
    int64_t stride_gc,
    const scalar_t* __restrict__ scores,
    int64_t stride_b,
    int64_t stride_t,
    int64_t stride_c,
    int64_t rows,
    int64_t T,
    int64_t C,
    const int64_t* __restrict__ k,
    const int64_t* __restrict__ lengths,
    const int64_t* __restrict__ kth,
    const int64_t* __restrict__ cut,
    bool largest,
    scalar_t* __restrict__ grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using key_t = typename KeyOf<acc_t>::type;
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (row >= rows) {
    return;
  }
  const int64_t b = row / T, t = row % T;
  const int64_t length = lengths[b], kk = k[b];
  const bool live = t < length && length <= T && kk >= 1 && kk <= length;
  const key_t flip = flip_mask<key_t>(largest);
  const scalar_t* src = scores + b * stride_b + t * stride_t;
  scalar_t* dst = grad + row * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    scalar_t value = scalar_t(0);
    if (live) {
      const int64_t o = b * C + c;
      const key_t key = order_key(static_cast<acc_t>(src[c * stride_c]), flip);
      if (is_selected(key, static_cast<key_t>(kth[o]), t, cut[o])) {
        // grad_out / k in the accumulator type (IEEE division), then rounded to
        // the dtype of scores: what autograd computes for the mean.
        value = static_cast<scalar_t>(grad_out[b * stride_gb + c * stride_gc] / static_cast<acc_t>(kk));
      }
    }
    dst[c] = value;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_mil_pool_cuda(
    const at::Tensor& scores,
    const at::Tensor& k_in,
    const at::Tensor& lengths_in,
    bool largest) {
  check_topk_mil_pool_args(scores, k_in, lengths_in);
  const c10::cuda::CUDAGuard device_guard(scores.device());
  const at::Tensor k = k_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t B = scores.size(0), T = scores.size(1), C = scores.size(2);
  // Limits of this kernel, checked before anything is allocated. ValueErrors naming the
  // argument, as the shared check's T limit (the docstring gives them, and the backward's).
  TORCH_CHECK_VALUE(
      B * C <= std::numeric_limits<int32_t>::max(),
      "scores: expected B * C < 2**31 on CUDA (one block per column), got B * C = ",
      num(B * C));
  // The time loops count in int and step by the block: t + blockDim.x must not overflow
  // (t < T, so T <= 2**31 - 256 would do; the limit is one step more cautious).
  TORCH_CHECK_VALUE(
      T <= std::numeric_limits<int32_t>::max() - kMaxThreads,
      "scores: expected T <= 2**31 - 257 on CUDA (32-bit time loops), got T = ",
      num(T));
  at::Tensor out = at::empty({B, C}, scores.options());
  at::Tensor kth = at::empty({B, C}, scores.options().dtype(at::kLong));
  at::Tensor cut = at::empty({B, C}, scores.options().dtype(at::kLong));
  if (B * C == 0) {
    return {out, kth, cut};
  }
  // A warp per column for short videos, up to 256 threads for long ones.
  const int threads = T <= 32 ? 32 : T <= 64 ? 64 : T <= 128 ? 128 : kMaxThreads;
  // c10's stream header, not ATen/cuda/CUDAContext.h: that one needs cusparse.h,
  // which minimal CUDA toolkits lack.
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_mil_pool_cuda", [&] {
    using key_t = typename KeyOf<at::opmath_type<scalar_t>>::type;
    const int64_t cache_bytes = T * static_cast<int64_t>(sizeof(key_t));
    // The keys of a column cached in shared memory when they fit, else re-read.
    auto launch = [&](auto kernel, int64_t shared_bytes) {
      kernel<<<B * C, threads, shared_bytes, stream>>>(
          scores.const_data_ptr<scalar_t>(),
          scores.stride(0),
          scores.stride(1),
          scores.stride(2),
          T,
          C,
          k.const_data_ptr<int64_t>(),
          lengths.const_data_ptr<int64_t>(),
          largest,
          out.mutable_data_ptr<scalar_t>(),
          kth.mutable_data_ptr<int64_t>(),
          cut.mutable_data_ptr<int64_t>());
    };
    if (cache_bytes <= kCacheBytes) {
      launch(topk_mil_pool_forward_kernel<scalar_t, true>, cache_bytes);
    } else {
      launch(topk_mil_pool_forward_kernel<scalar_t, false>, 0);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, kth, cut};
}

at::Tensor topk_mil_pool_backward_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& scores,
    const at::Tensor& k_in,
    const at::Tensor& lengths_in,
    const at::Tensor& kth_in,
    const at::Tensor& cut_in,
    bool largest) {
  check_topk_mil_pool_backward_args(grad_out, scores, k_in, lengths_in, kth_in, cut_in);
  const c10::cuda::CUDAGuard device_guard(scores.device());
  const at::Tensor k = k_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const at::Tensor kth = kth_in.contiguous();
  const at::Tensor cut = cut_in.contiguous();
  const int64_t rows = scores.size(0) * scores.size(1);
  const dim3 block(kWarp, kBackwardThreads / kWarp);
  const int64_t blocks = (rows + block.y - 1) / block.y;
  TORCH_CHECK_VALUE(
      blocks <= std::numeric_limits<int32_t>::max(),
      "scores: expected B * T <= 2**34 - 8 on CUDA (the backward's grid), got B * T = ",
      num(rows));
  at::Tensor grad = at::empty(scores.sizes(), scores.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) {
    return grad;
  }
  // In the accumulator type, as the CPU kernel reads it (a no-op for fp32 and fp64).
  const at::Tensor g = grad_out.to(at::toOpMathType(scores.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_mil_pool_backward_cuda", [&] {
    topk_mil_pool_backward_kernel<scalar_t><<<blocks, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<at::opmath_type<scalar_t>>(),
        g.stride(0),
        g.stride(1),
        scores.const_data_ptr<scalar_t>(),
        scores.stride(0),
        scores.stride(1),
        scores.stride(2),
        rows,
        scores.size(1),
        scores.size(2),
        k.const_data_ptr<int64_t>(),
        lengths.const_data_ptr<int64_t>(),
        kth.const_data_ptr<int64_t>(),
        cut.const_data_ptr<int64_t>(),
        largest,
        grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace mmsd_ext

TORCH_LIBRARY_IMPL(mmsd_ext, CUDA, m) {
  m.impl("topk_mil_pool", &mmsd_ext::topk_mil_pool_cuda);
  m.impl("_topk_mil_pool_backward", &mmsd_ext::topk_mil_pool_backward_cuda);
}
