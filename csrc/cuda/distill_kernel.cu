// CUDA kernels of snippet_distill_loss and mmsd_distill_loss (schemas: csrc/distill.cpp,
// maths: csrc/distill_math.h).
//
// Forward: a group of G lanes per row (G = 8 or 16 packs several of WTAL's short
// rows into a warp, C = 21 takes 8 lanes). Rows of up to 32 * 16 classes are held
// in registers (VPT values per lane): read from memory once, reduced with warp
// shuffles. Wider rows loop: a warp per row, a first pass for the maxima and a
// second for the sums, re-reading the row from L1/L2. Each row writes its loss and
// the (max, log-sum) of its softmaxes; one block then sums the row losses and
// counts the valid rows in a fixed order (deterministic, no atomics, no host sync).
// Backward: one thread per element, probabilities recomputed from the row statistics.
//
// Inputs of any strides are made contiguous by the op (a copy only when they are
// not already). All arithmetic is float32 whatever the input dtype, except the
// exponent of the mean teacher (rgb + flow) / 2, formed in double (avg_exponent).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header, not ATen/cuda/CUDAContext.h: that one pulls in cuSPARSE and
// cuBLAS headers, which the toolkit here does not ship (they come with the pip wheels).
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "distill_checks.h"
#include "distill_math.h"

namespace mmsd_ext {
namespace distill {
namespace {

constexpr int kThreads = 256;          // forward and backward blocks
constexpr int kFinalizeThreads = 1024;  // the one block that sums the row losses (see there)
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops beyond this

template <int G>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset, G));
  return v;
}

template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset, G);
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ float load_logit(const scalar_t* __restrict__ p, int64_t i, bool ok) {
  return ok ? static_cast<float>(p[i]) : -INFINITY;
}

// Rows are visited warp by warp: the loop condition is the same for every lane of a
// warp, so the shuffles always have the whole warp; a group past the last row idles
// along (its loads are masked off).
struct RowLoop {
  int lane;            // lane within the row's group of G
  int group;           // the group's place in its warp
  int64_t warp_first;  // first row of the warp in this iteration
  int64_t step;        // rows between two iterations
  template <int G>
  __device__ static RowLoop make() {
    constexpr int kGroupsPerWarp = 32 / G;
    const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
    const int64_t n_warps = int64_t(gridDim.x) * kThreads / 32;
    return RowLoop{int(threadIdx.x % G), int((threadIdx.x % 32) / G), warp * kGroupsPerWarp,
                   n_warps * kGroupsPerWarp};
  }
};

// ------------------------------------------------------------------ forward
// VPT > 0: the row's classes lane, lane + G, ... sit in VPT registers per input;
// VPT == 0 (with G == 32): the row is read twice in a loop.
template <typename scalar_t, int G, int VPT>
__global__ void __launch_bounds__(kThreads)
    snippet_distill_forward_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                                   const bool* __restrict__ mask, int64_t R, int64_t C, float inv_tau,
                                   float* __restrict__ row_losses, float* __restrict__ stats) {
  const RowLoop loop = RowLoop::make<G>();
  for (int64_t warp_row = loop.warp_first; warp_row < R; warp_row += loop.step) {
    const int64_t row = warp_row + loop.group;
    const bool in_range = row < R;
    const bool valid = in_range && (mask == nullptr || mask[row]);
    const int64_t base = row * C;
    float cs[VPT > 0 ? VPT : 1], ct[VPT > 0 ? VPT : 1];
    float ms = -INFINITY, mt = -INFINITY;
    if constexpr (VPT > 0) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int64_t c = loop.lane + int64_t(i) * G;
        cs[i] = load_logit(student, base + c, valid && c < C);
        ct[i] = load_logit(teacher, base + c, valid && c < C);
        ms = fmaxf(ms, cs[i]);
        mt = fmaxf(mt, ct[i]);
      }
    } else if (valid) {
      for (int64_t c = loop.lane; c < C; c += G) {
        ms = fmaxf(ms, static_cast<float>(student[base + c]));
        mt = fmaxf(mt, static_cast<float>(teacher[base + c]));
      }
    }
    const float shift_s = row_shift(group_max<G>(ms)), shift_t = row_shift(group_max<G>(mt));
    float sum_s = 0.0f, sum_t = 0.0f, cross = 0.0f;
    auto accumulate = [&](float xs, float xt) {
      const float a = (xs - shift_s) * inv_tau, b = (xt - shift_t) * inv_tau;
      const float eb = expf(b);
      sum_s += expf(a);
      sum_t += eb;
      cross += cross_term(eb, a);
    };
    if constexpr (VPT > 0) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) accumulate(cs[i], ct[i]);
    } else if (valid) {
      for (int64_t c = loop.lane; c < C; c += G) {
        accumulate(static_cast<float>(student[base + c]), static_cast<float>(teacher[base + c]));
      }
    }
    sum_s = group_sum<G>(sum_s);
    sum_t = group_sum<G>(sum_t);
    cross = group_sum<G>(cross);
    if (in_range && loop.lane == 0) {
      row_losses[row] = valid ? row_loss(sum_s, sum_t, cross) : 0.0f;
      float* st = stats + row * kPairStats;
      st[0] = shift_s;
      st[1] = logf(sum_s);
      st[2] = shift_t;
      st[3] = valid ? logf(sum_t) : -INFINITY;
    }
  }
}

// Gradients in the forward (kGrads, _mmsd_distill_loss_with_grads): after its sums,
// each row also writes the three gradients for an upstream gradient of 1, with the
// weight 1 / max(count, 1) (count: *count_dev when given, else count_host) and the
// formulas of mmsd_distill_backward_kernel, from the values in registers (VPT > 0) or
// re-read from L1/L2 (VPT == 0). Masked-out rows write zeros.
template <typename scalar_t>
struct MmsdGrads {
  const float* count_dev;  // the number of valid rows, counted on the device (a mask), or nullptr
  float count_host;        // ... or known on the host (no mask: every row)
  scalar_t* rgb;
  scalar_t* flow;
  scalar_t* fused;
};

template <typename scalar_t, int G, int VPT, bool kGrads>
__global__ void __launch_bounds__(kThreads)
    mmsd_distill_forward_kernel(const scalar_t* __restrict__ rgb, const scalar_t* __restrict__ flow,
                                const scalar_t* __restrict__ fused, const bool* __restrict__ mask, int64_t R,
                                int64_t C, float inv_tau, float* __restrict__ row_losses,
                                float* __restrict__ stats, MmsdGrads<scalar_t> grads) {
  float k = 0.0f;
  if constexpr (kGrads) {
    const float one = 1.0f, count = grads.count_dev != nullptr ? *grads.count_dev : grads.count_host;
    k = row_weight(&one, 0, kMean, &count) * inv_tau;  // as the backward kernel's k for grad = 1
  }
  const RowLoop loop = RowLoop::make<G>();
  for (int64_t warp_row = loop.warp_first; warp_row < R; warp_row += loop.step) {
    const int64_t row = warp_row + loop.group;
    const bool in_range = row < R;
    const bool valid = in_range && (mask == nullptr || mask[row]);
    const int64_t base = row * C;
    float cr[VPT > 0 ? VPT : 1], cf[VPT > 0 ? VPT : 1], cu[VPT > 0 ? VPT : 1];
    float mr = -INFINITY, mf = -INFINITY, mu = -INFINITY, ma = -INFINITY;
    auto update_max = [&](float xr, float xf, float xu) {
      mr = fmaxf(mr, xr);
      mf = fmaxf(mf, xf);
      mu = fmaxf(mu, xu);
      ma = fmaxf(ma, (xr + xf) * 0.5f);
    };
    if constexpr (VPT > 0) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int64_t c = loop.lane + int64_t(i) * G;
        cr[i] = load_logit(rgb, base + c, valid && c < C);
        cf[i] = load_logit(flow, base + c, valid && c < C);
        cu[i] = load_logit(fused, base + c, valid && c < C);
        update_max(cr[i], cf[i], cu[i]);
      }
    } else if (valid) {
      for (int64_t c = loop.lane; c < C; c += G) {
        update_max(static_cast<float>(rgb[base + c]), static_cast<float>(flow[base + c]),
                   static_cast<float>(fused[base + c]));
      }
    }
    const float sr = row_shift(group_max<G>(mr)), sf = row_shift(group_max<G>(mf));
    const float su = row_shift(group_max<G>(mu)), sa = row_shift(group_max<G>(ma));
    float zr = 0.0f, zf = 0.0f, zu = 0.0f, za = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
    auto accumulate = [&](float xr, float xf, float xu) {
      const float ar = (xr - sr) * inv_tau, af = (xf - sf) * inv_tau, au = (xu - su) * inv_tau;
      const float er = expf(ar), ef = expf(af), ea = expf(avg_exponent(xr, xf, sa, inv_tau));
      zr += er;
      zf += ef;
      zu += expf(au);
      za += ea;
      d1 += cross_term(ef, ar);  // L(rgb <- flow)
      d2 += cross_term(er, af);  // L(flow <- rgb)
      d3 += cross_term(ea, au);  // L(fused <- avg)
    };
    if constexpr (VPT > 0) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) accumulate(cr[i], cf[i], cu[i]);
    } else if (valid) {
      for (int64_t c = loop.lane; c < C; c += G) {
        accumulate(static_cast<float>(rgb[base + c]), static_cast<float>(flow[base + c]),
                   static_cast<float>(fused[base + c]));
      }
    }
    zr = group_sum<G>(zr);
    zf = group_sum<G>(zf);
    zu = group_sum<G>(zu);
    za = group_sum<G>(za);
    d1 = group_sum<G>(d1);
    d2 = group_sum<G>(d2);
    d3 = group_sum<G>(d3);
    // Masked rows: every log-sum -inf, so the backward writes zeros without the mask.
    const float lr = valid ? logf(zr) : -INFINITY, lf = valid ? logf(zf) : -INFINITY;
    const float lu = valid ? logf(zu) : -INFINITY, la = valid ? logf(za) : -INFINITY;
    if (in_range && loop.lane == 0) {
      row_losses[row] = valid ? row_loss(zr, zf, d1) + row_loss(zf, zr, d2) + row_loss(zu, za, d3) : 0.0f;
      float* st = stats + row * kMmsdStats;
      st[0] = sr;
      st[1] = lr;
      st[2] = sf;
      st[3] = lf;
      st[4] = su;
      st[5] = lu;
      st[6] = sa;
      st[7] = la;
    }
    if constexpr (kGrads) {
      // The gradients of mmsd_distill_backward_kernel: prob() recomputes exp(a) exactly as
      // it was summed into S above (distill_math.h: why), here times 1 / S of the float sum
      // itself. The backward kernel's inverse_sum(log S) carries logf's error besides: the
      // two differ by up to ulp(log S) + 2^-23 relative, and as p <= 1 / S = exp(-log S), a
      // probability by under 1.5 float32 eps, a gradient by under 3 eps k. (inverse_sum here,
      // a double exp, made these kernels spill 40 to 52 bytes on sm_90.)
      const bool ok1 = !teacher_excluded(lf), ok2 = !teacher_excluded(lr), ok3 = !teacher_excluded(la);
      const float inv_r = 1.0f / zr, inv_f = 1.0f / zf, inv_u = 1.0f / zu, inv_a = 1.0f / za;
      auto write = [&](int64_t c, float xr, float xf, float xu) {
        const float pr = prob(xr, sr, inv_tau, inv_r), pf = prob(xf, sf, inv_tau, inv_f);
        const float pu = prob(xu, su, inv_tau, inv_u), pa = __fmul_rn(expf(avg_exponent(xr, xf, sa, inv_tau)), inv_a);
        const float g1 = k * (pr - pf);
        const float g3 = k * (pu - pa);
        grads.rgb[base + c] = static_cast<scalar_t>(ok1 ? g1 : 0.0f);
        grads.flow[base + c] = static_cast<scalar_t>(ok2 ? -g1 : 0.0f);
        grads.fused[base + c] = static_cast<scalar_t>(ok3 ? g3 : 0.0f);
      };
      if (in_range) {
        if constexpr (VPT > 0) {
#pragma unroll
          for (int i = 0; i < VPT; ++i) {
            const int64_t c = loop.lane + int64_t(i) * G;
            if (c < C) write(c, cr[i], cf[i], cu[i]);
          }
        } else {
          for (int64_t c = loop.lane; c < C; c += G) {
            write(c, load_logit(rgb, base + c, valid), load_logit(flow, base + c, valid),
                  load_logit(fused, base + c, valid));
          }
        }
      }
    }
  }
}

// One block: the sum of the row losses (reduction mean or sum) and the number of
// valid rows, in a fixed order. As on the CPU, the sum is a double and the count an
// integer (a float count stops being exact past 2**24 rows). loss == nullptr: the
// count only (the gradient-writing forward needs it first, where there is a mask).
// Not row_losses == nullptr: with no rows, that is the data of an empty tensor.
//
// A single block reads R floats that the forward has just left in L2; its time is
// the latency of those reads over the loads in flight. So rows go four at a time (a
// float4 of losses, a 32-bit word of mask bytes where the mask is aligned, else its
// four bytes) with 1024 threads: at (64, 4608, 201), R = 294912, 72 vector loads a
// thread instead of 576 scalar ones with 512 threads (not yet timed on a GPU). The
// order of the additions depends only on R and the alignment of row_losses (a fresh
// allocation, always aligned), not on the mask's: a mask view 1 to 3 bytes into its
// storage gives the bits its copy gives.
__global__ void __launch_bounds__(kFinalizeThreads)
    distill_finalize_kernel(const float* __restrict__ row_losses, const bool* __restrict__ mask_in, int64_t R,
                            int64_t reduction, float* __restrict__ loss, float* __restrict__ count) {
  __shared__ double sums[kFinalizeThreads];
  __shared__ unsigned long long counts[kFinalizeThreads];
  // A bool's byte, read as a byte: a row counts where it is not 0, in both paths.
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(mask_in);
  double sum = 0.0;
  unsigned long long valid = 0;
  int64_t first_scalar = 0;  // rows before this one went four at a time
  const bool vectors = reinterpret_cast<uintptr_t>(row_losses) % sizeof(float4) == 0;  // nullptr is aligned
  const bool mask_words = reinterpret_cast<uintptr_t>(mask) % sizeof(uint32_t) == 0;
  if (vectors) {
    const int64_t quads = R / 4;
#pragma unroll 4
    for (int64_t q = threadIdx.x; q < quads; q += kFinalizeThreads) {
      if (row_losses != nullptr) {
        const float4 v = reinterpret_cast<const float4*>(row_losses)[q];
        sum += static_cast<double>(v.x);
        sum += static_cast<double>(v.y);
        sum += static_cast<double>(v.z);
        sum += static_cast<double>(v.w);
      }
      if (mask == nullptr) {
        valid += 4;
      } else if (mask_words) {
        const uint32_t w = reinterpret_cast<const uint32_t*>(mask)[q];  // four bools, one byte each
        valid += ((w & 0xFFu) != 0) + ((w & 0xFF00u) != 0) + ((w & 0xFF0000u) != 0) + ((w & 0xFF000000u) != 0);
      } else {
        const uint8_t* m = mask + 4 * q;
        valid += (m[0] != 0) + (m[1] != 0) + (m[2] != 0) + (m[3] != 0);
      }
    }
    first_scalar = quads * 4;
  }
  for (int64_t row = first_scalar + threadIdx.x; row < R; row += kFinalizeThreads) {
    if (row_losses != nullptr) sum += static_cast<double>(row_losses[row]);
    valid += (mask == nullptr || mask[row] != 0) ? 1 : 0;
  }
  sums[threadIdx.x] = sum;
  counts[threadIdx.x] = valid;
  __syncthreads();
  for (int half = kFinalizeThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      sums[threadIdx.x] += sums[threadIdx.x + half];
      counts[threadIdx.x] += counts[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const unsigned long long n = counts[0];
    count[0] = static_cast<float>(n);
    if (loss == nullptr) return;
    if (reduction == kMean) loss[0] = static_cast<float>(sums[0] / static_cast<double>(n > 0 ? n : 1));
    if (reduction == kSum) loss[0] = static_cast<float>(sums[0]);
  }
}

// ----------------------------------------------------------------- backward
// 1 / S of every softmax of every row, from the saved (shift, log S) pairs: inv[i] =
// inverse_sum(stats[2 i + 1]), n = rows x softmaxes. Once per row here, not once per
// element in the backward kernels (a double exp per element would cost more than the
// element's memory traffic).
__global__ void __launch_bounds__(kThreads)
    inverse_sums_kernel(const float* __restrict__ stats, int64_t n, float* __restrict__ inv) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    inv[i] = inverse_sum(stats[2 * i + 1]);
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    snippet_distill_backward_kernel(const float* __restrict__ grad, const float* __restrict__ count,
                                    const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                                    const float* __restrict__ stats, const float* __restrict__ inv, index_t N,
                                    index_t C, float inv_tau, int64_t reduction, scalar_t* __restrict__ out) {
  for (index_t i = index_t(blockIdx.x) * kThreads + threadIdx.x; i < N; i += index_t(gridDim.x) * kThreads) {
    const index_t row = i / C;
    const float* st = stats + int64_t(row) * kPairStats;
    const float* in = inv + int64_t(row) * (kPairStats / 2);
    float g = 0.0f;
    if (!teacher_excluded(st[3])) {
      const float k = row_weight(grad, row, reduction, count) * inv_tau;
      g = k * (prob(static_cast<float>(student[i]), st[0], inv_tau, in[0]) -
               prob(static_cast<float>(teacher[i]), st[2], inv_tau, in[1]));
    }
    out[i] = static_cast<scalar_t>(g);
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    mmsd_distill_backward_kernel(const float* __restrict__ grad, const float* __restrict__ count,
                                 const scalar_t* __restrict__ rgb, const scalar_t* __restrict__ flow,
                                 const scalar_t* __restrict__ fused, const float* __restrict__ stats,
                                 const float* __restrict__ inv, index_t N, index_t C, float inv_tau,
                                 scalar_t* __restrict__ grad_rgb,
                                 scalar_t* __restrict__ grad_flow, scalar_t* __restrict__ grad_fused) {
  const float k = row_weight(grad, 0, kMean, count) * inv_tau;
  for (index_t i = index_t(blockIdx.x) * kThreads + threadIdx.x; i < N; i += index_t(gridDim.x) * kThreads) {
    const int64_t row = int64_t(i / C);
    const float* st = stats + row * kMmsdStats;
    const float* in = inv + row * (kMmsdStats / 2);
    const float xr = static_cast<float>(rgb[i]), xf = static_cast<float>(flow[i]);
    const float pr = prob(xr, st[0], inv_tau, in[0]);
    const float pf = prob(xf, st[2], inv_tau, in[1]);
    const float pu = prob(static_cast<float>(fused[i]), st[4], inv_tau, in[2]);
    const float pa = __fmul_rn(expf(avg_exponent(xr, xf, st[6], inv_tau)), in[3]);
    const float g1 = k * (pr - pf);
    // Selects, not products with 0: a term without a teacher may hold NaN probabilities.
    grad_rgb[i] = static_cast<scalar_t>(teacher_excluded(st[3]) ? 0.0f : g1);
    grad_flow[i] = static_cast<scalar_t>(teacher_excluded(st[1]) ? 0.0f : -g1);
    grad_fused[i] = static_cast<scalar_t>(teacher_excluded(st[7]) ? 0.0f : k * (pu - pa));
  }
}

// _distill_scale_grads_: a, b, c *= *grad, nothing at all where *grad == 1 (read
// here, so the host never waits for it). Products in the accumulation type of the
// dtype (float, or double for float64), rounded once to the dtype, as the CPU kernel.
// Selects, as the backward kernel's: a term without a teacher (row_stats: a masked row
// or an all -inf teacher) stays 0, also where *grad is inf or NaN.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    distill_scale_grads_kernel(const float* __restrict__ grad, const float* __restrict__ stats, index_t N,
                               index_t C, scalar_t* __restrict__ a, scalar_t* __restrict__ b,
                               scalar_t* __restrict__ c) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const float w = *grad;
  if (w == 1.0f) return;
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  for (index_t i = index_t(blockIdx.x) * kThreads + threadIdx.x; i < N; i += index_t(gridDim.x) * kThreads) {
    const float* st = stats + int64_t(i / C) * kMmsdStats;
    a[i] = teacher_excluded(st[3]) ? zero : static_cast<scalar_t>(static_cast<acc_t>(a[i]) * w);
    b[i] = teacher_excluded(st[1]) ? zero : static_cast<scalar_t>(static_cast<acc_t>(b[i]) * w);
    c[i] = teacher_excluded(st[7]) ? zero : static_cast<scalar_t>(static_cast<acc_t>(c[i]) * w);
  }
}

// ------------------------------------------------------------------ launches
// Lanes per row and values per lane for C classes (VPT 0: looped rows).
template <typename F>
void with_row_shape(int64_t C, F&& launch) {
  if (C <= 32) {
    launch(std::integral_constant<int, 8>{}, std::integral_constant<int, 4>{});
  } else if (C <= 64) {
    launch(std::integral_constant<int, 16>{}, std::integral_constant<int, 4>{});
  } else if (C <= 128) {
    launch(std::integral_constant<int, 32>{}, std::integral_constant<int, 4>{});
  } else if (C <= 256) {
    launch(std::integral_constant<int, 32>{}, std::integral_constant<int, 8>{});
  } else if (C <= 512) {
    launch(std::integral_constant<int, 32>{}, std::integral_constant<int, 16>{});
  } else {
    launch(std::integral_constant<int, 32>{}, std::integral_constant<int, 0>{});
  }
}

int64_t blocks_for(int64_t work, int64_t per_block, int64_t max_blocks = kMaxBlocks) {
  return std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, max_blocks));
}

// Blocks of the scale kernel: where *grad == 1 each block only reads it and exits, so
// the grid is capped (grid-stride beyond). 1024 x 256 threads fill an H100/H200
// (132 SMs x 2048 resident threads); not tuned.
constexpr int64_t kScaleMaxBlocks = 1024;

// Runs launch(index_t{}) with 32-bit indices (cheaper division by C) whenever
// every index of a grid-stride loop over N fits.
template <typename F>
void with_index_type(int64_t N, F&& launch) {
  if (N <= std::numeric_limits<int32_t>::max() - int64_t(kThreads) * kMaxBlocks) {
    launch(int32_t{});
  } else {
    launch(int64_t{});
  }
}

// 1 / S of each softmax of each row (inverse_sums_kernel), on the stream of the backward
// that reads it. row_stats: contiguous float32 [..., stats_per_row] (check_row_stats).
at::Tensor inverse_sums(const at::Tensor& row_stats, int64_t stats_per_row, cudaStream_t stream) {
  const int64_t n = row_stats.numel() / 2;
  at::Tensor inv = at::empty({n}, row_stats.options());
  TORCH_INTERNAL_ASSERT(row_stats.size(-1) == stats_per_row && row_stats.is_contiguous());
  if (n > 0) {
    inverse_sums_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(row_stats.const_data_ptr<float>(), n,
                                                                         inv.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return inv;
}

at::Tensor stats_tensor(const at::Tensor& logits, int64_t k) {
  auto shape = leading_shape(logits);
  shape.push_back(k);
  return at::empty(shape, logits.options().dtype(at::kFloat));
}

void check_cuda(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got ", device_text(t.device()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> snippet_distill_loss_cuda(const at::Tensor& student,
                                                                         const at::Tensor& teacher,
                                                                         double temperature,
                                                                         const std::optional<at::Tensor>& mask,
                                                                         int64_t reduction) {
  check_logits({{"student", &student}, {"teacher", &teacher}});
  check_cuda("student", student);
  check_temperature(temperature);
  check_reduction(reduction);
  const c10::cuda::OptionalCUDAGuard guard(student.device());
  const at::Tensor m = prepare_mask(mask, student, "student");
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t C = s.size(-1), R = s.numel() / C;
  const auto f32 = s.options().dtype(at::kFloat);
  at::Tensor row_losses = at::empty(leading_shape(s), f32);
  at::Tensor stats = stats_tensor(s, kPairStats);
  at::Tensor loss = reduction == kNone ? row_losses : at::empty({}, f32);
  at::Tensor count = at::empty({}, f32);
  const bool* mask_ptr = m.defined() ? m.const_data_ptr<bool>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (R > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "snippet_distill_loss_cuda", [&] {
      with_row_shape(C, [&](auto g, auto vpt) {
        constexpr int G = decltype(g)::value, VPT = decltype(vpt)::value;
        snippet_distill_forward_kernel<scalar_t, G, VPT><<<blocks_for(R, kThreads / G), kThreads, 0, stream>>>(
            s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), mask_ptr, R, C,
            static_cast<float>(1.0 / temperature), row_losses.data_ptr<float>(), stats.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  distill_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(row_losses.const_data_ptr<float>(), mask_ptr, R,
                                                               reduction, loss.data_ptr<float>(),
                                                               count.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats, count};
}

at::Tensor snippet_distill_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& student,
                                              const at::Tensor& teacher, const at::Tensor& row_stats,
                                              const at::Tensor& count, double temperature, int64_t reduction) {
  check_logits({{"student", &student}, {"teacher", &teacher}});
  check_cuda("student", student);
  check_temperature(temperature);
  check_reduction(reduction);
  check_row_stats(row_stats, student, kPairStats);
  check_backward_scalars(grad, count, student, reduction);
  const c10::cuda::OptionalCUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), g = prepare_grad(grad);
  const int64_t C = s.size(-1), N = s.numel();
  at::Tensor out = at::empty(s.sizes(), s.options());
  if (N == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor inv = inverse_sums(row_stats, kPairStats, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "snippet_distill_loss_backward_cuda",
                                  [&] {
                                    with_index_type(N, [&](auto index) {
                                      using index_t = decltype(index);
                                      snippet_distill_backward_kernel<scalar_t, index_t>
                                          <<<blocks_for(N, kThreads), kThreads, 0, stream>>>(
                                              g.const_data_ptr<float>(), count.const_data_ptr<float>(),
                                              s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                              row_stats.const_data_ptr<float>(), inv.const_data_ptr<float>(),
                                              index_t(N), index_t(C),
                                              static_cast<float>(1.0 / temperature), reduction,
                                              out.data_ptr<scalar_t>());
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
                                  });
  return out;
}

// The forward of mmsd_distill_loss; with grads (three tensors of rgb's shape and
// dtype), also the gradients for an upstream gradient of 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mmsd_forward(const at::Tensor& rgb, const at::Tensor& flow,
                                                            const at::Tensor& fused, double temperature,
                                                            const std::optional<at::Tensor>& mask,
                                                            const at::Tensor* grads) {
  check_logits({{"rgb", &rgb}, {"flow", &flow}, {"fused", &fused}});
  check_cuda("rgb", rgb);
  check_temperature(temperature);
  const c10::cuda::OptionalCUDAGuard guard(rgb.device());
  const at::Tensor m = prepare_mask(mask, rgb, "rgb");
  const at::Tensor r = rgb.contiguous(), f = flow.contiguous(), u = fused.contiguous();
  const int64_t C = r.size(-1), R = r.numel() / C;
  const auto f32 = r.options().dtype(at::kFloat);
  at::Tensor row_losses = at::empty({R}, f32);
  at::Tensor stats = stats_tensor(r, kMmsdStats);
  at::Tensor loss = at::empty({}, f32), count = at::empty({}, f32);
  const bool* mask_ptr = m.defined() ? m.const_data_ptr<bool>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (grads != nullptr && mask_ptr != nullptr) {  // the gradients' weight needs the count first
    distill_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(nullptr, mask_ptr, R, kNone, nullptr,
                                                                 count.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (R > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "mmsd_distill_loss_cuda", [&] {
      with_row_shape(C, [&](auto g, auto vpt) {
        constexpr int G = decltype(g)::value, VPT = decltype(vpt)::value;
        const auto launch = [&](auto with_grads, MmsdGrads<scalar_t> out) {
          mmsd_distill_forward_kernel<scalar_t, G, VPT, decltype(with_grads)::value>
              <<<blocks_for(R, kThreads / G), kThreads, 0, stream>>>(
                  r.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), mask_ptr,
                  R, C, static_cast<float>(1.0 / temperature), row_losses.data_ptr<float>(), stats.data_ptr<float>(),
                  out);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (grads != nullptr) {
          launch(std::true_type{},
                 MmsdGrads<scalar_t>{mask_ptr != nullptr ? count.const_data_ptr<float>() : nullptr,
                                     static_cast<float>(R), grads[0].data_ptr<scalar_t>(),
                                     grads[1].data_ptr<scalar_t>(), grads[2].data_ptr<scalar_t>()});
        } else {
          launch(std::false_type{}, MmsdGrads<scalar_t>{nullptr, 0.0f, nullptr, nullptr, nullptr});
        }
      });
    });
  }
  distill_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(row_losses.const_data_ptr<float>(), mask_ptr, R,
                                                               kMean, loss.data_ptr<float>(), count.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmsd_distill_loss_cuda(const at::Tensor& rgb, const at::Tensor& flow,
                                                                      const at::Tensor& fused, double temperature,
                                                                      const std::optional<at::Tensor>& mask) {
  return mmsd_forward(rgb, flow, fused, temperature, mask, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mmsd_distill_loss_with_grads_cuda(
    const at::Tensor& rgb, const at::Tensor& flow, const at::Tensor& fused, double temperature,
    const std::optional<at::Tensor>& mask) {
  check_logits({{"rgb", &rgb}, {"flow", &flow}, {"fused", &fused}});
  check_cuda("rgb", rgb);
  const at::TensorOptions opts = rgb.options().memory_format(at::MemoryFormat::Contiguous);
  const at::Tensor grads[3] = {at::empty(rgb.sizes(), opts), at::empty(rgb.sizes(), opts),
                               at::empty(rgb.sizes(), opts)};
  auto [loss, stats, count] = mmsd_forward(rgb, flow, fused, temperature, mask, grads);
  return {loss, stats, count, grads[0], grads[1], grads[2]};
}

void distill_scale_grads_cuda(const at::Tensor& grad, const at::Tensor& row_stats, const at::Tensor& grad_rgb,
                              const at::Tensor& grad_flow, const at::Tensor& grad_fused) {
  check_scale_grads(grad, row_stats, {&grad_rgb, &grad_flow, &grad_fused});
  bump_versions({&grad_rgb, &grad_flow, &grad_fused});
  check_cuda("grad", grad);
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  const at::Tensor w = prepare_grad(grad);
  const int64_t N = grad_rgb.numel();
  if (N == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rgb.scalar_type(), "distill_scale_grads_cuda", [&] {
    with_index_type(N, [&](auto index) {
      using index_t = decltype(index);
      distill_scale_grads_kernel<scalar_t, index_t><<<blocks_for(N, kThreads, kScaleMaxBlocks), kThreads, 0, stream>>>(
          w.const_data_ptr<float>(), row_stats.const_data_ptr<float>(), index_t(N), index_t(grad_rgb.size(-1)),
          grad_rgb.data_ptr<scalar_t>(), grad_flow.data_ptr<scalar_t>(), grad_fused.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmsd_distill_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rgb, const at::Tensor& flow, const at::Tensor& fused,
    const at::Tensor& row_stats, const at::Tensor& count, double temperature) {
  check_logits({{"rgb", &rgb}, {"flow", &flow}, {"fused", &fused}});
  check_cuda("rgb", rgb);
  check_temperature(temperature);
  check_row_stats(row_stats, rgb, kMmsdStats);
  check_backward_scalars(grad, count, rgb, kMean);
  const c10::cuda::OptionalCUDAGuard guard(rgb.device());
  const at::Tensor r = rgb.contiguous(), f = flow.contiguous(), u = fused.contiguous(), g = prepare_grad(grad);
  const int64_t C = r.size(-1), N = r.numel();
  at::Tensor gr = at::empty(r.sizes(), r.options()), gf = at::empty(r.sizes(), r.options()),
             gu = at::empty(r.sizes(), r.options());
  if (N == 0) return {gr, gf, gu};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor inv = inverse_sums(row_stats, kMmsdStats, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "mmsd_distill_loss_backward_cuda", [&] {
    with_index_type(N, [&](auto index) {
      using index_t = decltype(index);
      mmsd_distill_backward_kernel<scalar_t, index_t><<<blocks_for(N, kThreads), kThreads, 0, stream>>>(
          g.const_data_ptr<float>(), count.const_data_ptr<float>(), r.const_data_ptr<scalar_t>(),
          f.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), row_stats.const_data_ptr<float>(),
          inv.const_data_ptr<float>(), index_t(N),
          index_t(C), static_cast<float>(1.0 / temperature), gr.data_ptr<scalar_t>(), gf.data_ptr<scalar_t>(),
          gu.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gr, gf, gu};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmsd_ext, CUDA, m) {
  m.impl("snippet_distill_loss", &snippet_distill_loss_cuda);
  m.impl("_snippet_distill_loss_backward", &snippet_distill_loss_backward_cuda);
  m.impl("mmsd_distill_loss", &mmsd_distill_loss_cuda);
  m.impl("_mmsd_distill_loss_backward", &mmsd_distill_loss_backward_cuda);
  m.impl("_mmsd_distill_loss_with_grads", &mmsd_distill_loss_with_grads_cuda);
  m.impl("_distill_scale_grads_", &distill_scale_grads_cuda);
}

}  // namespace distill
}  // namespace mmsd_ext
