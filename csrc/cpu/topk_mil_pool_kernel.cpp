// CPU kernels of top-k MIL pooling (schema: csrc/topk_mil_pool.cpp).
//
// Forward, per task (one video b, a block of 16 columns): no sort, but a radix
// select of the k-th largest order key (topk_mil_pool_math.h) of each column,
// after which the selected sum is
//   sum(values with key > kth) + (k - count(key > kth)) * value(kth).
// The block is copied once as keys, row-major like the input so that the copy
// vectorises. The passes that touch every element (two histograms that fix the
// top 16 bits, the sum of what lies above that prefix, the collection of the
// candidates that share it) run over the 16 columns of a row at once; the
// remaining digits run over the candidates only, which are few.
// The backward is one elementwise pass that recomputes each key and applies
// the saved (kth, cut) rule.
//
// Measured at (32, 2304, 201), k = 288, one thread, CPU time of the forward on
// the shared 2-core development machine: a branchy key and one digit per pass
// 200 ms; branch-free keys 80 ms; prefetching the rows 59 ms; two digits before
// collecting candidates 34 ms (torch.topk forward + backward: 305 ms).
#include "topk_mil_pool.h"
#include "topk_mil_pool_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace mmsd_ext {
namespace {

using namespace topk_mil_pool_math;

// Columns per task: 16 fp32 columns are one 64-byte cache line of each row of a
// C-contiguous slab, and 16 lanes fill the vector registers in the per-row loops.
constexpr int64_t kLanes = 16;
// Rows ahead that load_keys prefetches (two cache lines each): 80 -> 59 ms, above.
constexpr int64_t kPrefetchRows = 16;
// Radix digit: 16 lanes x 256 bins of int32 is 16 KiB, which stays in L1.
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;

// Walks the bins from the top; returns the bin holding the need-th largest key
// and leaves in `need` its rank inside that bin.
inline int find_digit(const int32_t* hist, int64_t& need) {
  for (int d = kBins - 1; d > 0; --d) {
    if (hist[d] >= need) {
      return d;
    }
    need -= hist[d];
  }
  return 0;
}

// Copies rows [0, L) of a [T, width] slab as keys into keys[t * kLanes + j];
// lanes j >= width get key 0. kFull: width == kLanes and unit column stride,
// fixed at compile time so that the loop vectorises.
template <bool kFull, typename scalar_t, typename key_t>
void load_keys(const scalar_t* slab, int64_t L, int64_t sT, int64_t sC, int64_t width, key_t flip, key_t* keys) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = 0; t < L; ++t) {
    const scalar_t* row = slab + t * sT;
    key_t* dst = keys + t * kLanes;
    // The rows are far apart (a whole row of C scores): the hardware prefetcher
    // does not keep up, so ask for the first and last element kPrefetchRows ahead.
    if (t + kPrefetchRows < L) {
      __builtin_prefetch(row + kPrefetchRows * sT);
      __builtin_prefetch(row + kPrefetchRows * sT + (width - 1) * sC);
    }
    if constexpr (kFull) {
      for (int64_t j = 0; j < kLanes; ++j) {
        dst[j] = order_key(static_cast<acc_t>(row[j]), flip);
      }
    } else {
      for (int64_t j = 0; j < kLanes; ++j) {
        dst[j] = j < width ? order_key(static_cast<acc_t>(row[j * sC]), flip) : key_t(0);
      }
    }
  }
}

// Runs fn(begin, end) over [0, n) in chunks of `chunk`, handed out one by one
// from a shared counter to at::get_num_threads() workers; init() makes each
// worker's scratch once. A static split (at::parallel_for alone) waits for its
// slowest half, and on a shared machine one thread is often descheduled for a
// while. Which worker computes a chunk never changes its result.
template <typename Init, typename F>
void parallel_chunks(int64_t n, int64_t chunk, const Init& init, const F& fn) {
  if (n <= 0) {
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    auto scratch = init();
    for (int64_t w = begin; w < end; ++w) {  // one worker per thread, or all inline when nested
      for (int64_t s = next.fetch_add(chunk); s < n; s = next.fetch_add(chunk)) {
        fn(scratch, s, std::min(s + chunk, n));
      }
    }
  });
}

// value if `take`, else +0.0; through the bits, so that no branch is emitted
// (the condition is a coin flip on real scores) and inf/NaN stay where they belong.
template <typename acc_t>
inline acc_t masked(acc_t value, bool take) {
  using key_t = typename KeyOf<acc_t>::type;
  return float_of(static_cast<key_t>(bits_of(value) & (key_t(0) - key_t(take))));
}

// The selection of one block of columns. Scratch buffers belong to one thread.
template <typename acc_t>
struct BlockSelect {
  using key_t = typename KeyOf<acc_t>::type;
  static constexpr int kKeyBits = static_cast<int>(sizeof(key_t) * 8);
  static constexpr int kShift1 = kKeyBits - kDigitBits;  // first digit: key >> kShift1
  static constexpr int kShift2 = kShift1 - kDigitBits;    // first two digits: key >> kShift2
  // Partial sums over the candidates: breaks the dependency chain of one float
  // accumulator (4 cycles per add) and lets the loop vectorise; fixed order, so deterministic.
  static constexpr int kPartials = 8;

  // Sized by the longest valid length, not T, and candidates only for the lanes a
  // block can fill (C < kLanes): a long, narrow, mostly padded input needs no more.
  std::vector<key_t> keys;      // [rows, kLanes]
  std::vector<key_t> cand_key;  // [lanes, rows]: keys of each lane's candidates, in time order
  std::vector<int32_t> cand_t;  // [lanes, rows]: and their time indices
  std::vector<int32_t> hist;    // [kLanes, kBins]

  BlockSelect(int64_t rows, int64_t lanes)
      : keys(rows * kLanes), cand_key(rows * lanes), cand_t(rows * lanes), hist(kLanes * kBins) {}

  // Selects the k largest keys of lanes [0, width) over rows [0, L); writes the
  // mean, kth key and cut of lane j to out[j], kth_out[j], cut_out[j].
  //
  // The first two digits are found with two histogram passes over every
  // element (the second counts only the elements that share the first digit,
  // branch-free), because one digit leaves too many candidates: the top 8 bits
  // of a key are the sign and 7 exponent bits, so e.g. every score in [0.5, 2)
  // shares one. After 16 bits the candidates are few, and collecting them is a
  // well-predicted branch on a vectorised test of each row.
  template <typename scalar_t>
  void run(int64_t L, int64_t k, int64_t width, key_t flip, scalar_t* out, int64_t* kth_out, int64_t* cut_out) {
    const key_t* K = keys.data();
    std::array<int64_t, kLanes> need;
    need.fill(k);
    // First digit of all lanes at once: 16 independent counters per row.
    std::array<key_t, kLanes> prefix;
    std::fill(hist.begin(), hist.end(), 0);
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t j = 0; j < kLanes; ++j) {
        hist[j * kBins + (K[t * kLanes + j] >> kShift1)]++;
      }
    }
    for (int64_t j = 0; j < kLanes; ++j) {
      prefix[j] = static_cast<key_t>(find_digit(hist.data() + j * kBins, need[j]));
    }
    // Second digit, counting only what shares the first.
    std::fill(hist.begin(), hist.end(), 0);
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const key_t key = K[t * kLanes + j];
        hist[j * kBins + ((key >> kShift2) & (kBins - 1))] += (key >> kShift1) == prefix[j];
      }
    }
    for (int64_t j = 0; j < kLanes; ++j) {
      prefix[j] = (prefix[j] << kDigitBits) | static_cast<key_t>(find_digit(hist.data() + j * kBins, need[j]));
    }
    // Padding lanes hold key 0: a prefix of 1 leaves them neither above nor candidates.
    for (int64_t j = width; j < kLanes; ++j) {
      prefix[j] = 1;
    }
    // What lies above each lane's 16-bit prefix is selected: sum it (vectorised, time order per lane).
    std::array<acc_t, kLanes> sum{};
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const key_t key = K[t * kLanes + j];
        sum[j] += masked(value_of_key(key, flip), (key >> kShift2) > prefix[j]);
      }
    }
    // What shares it is a candidate: append it to its lane, in time order.
    std::array<int32_t, kLanes> n{};
    for (int64_t t = 0; t < L; ++t) {
      const key_t* row = K + t * kLanes;
      int any = 0;
      for (int64_t j = 0; j < kLanes; ++j) {
        any |= (row[j] >> kShift2) == prefix[j];
      }
      if (any) {
        for (int64_t j = 0; j < kLanes; ++j) {
          if ((row[j] >> kShift2) == prefix[j]) {
            cand_key[j * L + n[j]] = row[j];
            cand_t[j * L + n[j]] = static_cast<int32_t>(t);
            n[j]++;
          }
        }
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      const Tie tie = finish_lane(cand_key.data() + j * L, cand_t.data() + j * L, L, n[j], need[j], sum[j], flip);
      out[j] = static_cast<scalar_t>(sum[j] / static_cast<acc_t>(k));
      kth_out[j] = static_cast<int64_t>(tie.kth);
      cut_out[j] = tie.cut;
    }
  }

 private:
  struct Tie {
    key_t kth;
    int64_t cut;
  };

  // Adds the values of the keys ck[0, n) whose digit at `shift` exceeds `digit`
  // (all of them if shift < 0).
  static acc_t sum_above(const key_t* ck, int32_t n, int shift, key_t digit, key_t flip) {
    acc_t part[kPartials] = {};
    int32_t i = 0;
    for (; i + kPartials <= n; i += kPartials) {
      for (int l = 0; l < kPartials; ++l) {
        const key_t key = ck[i + l];
        const bool take = shift < 0 || ((key >> shift) & (kBins - 1)) > digit;
        part[l] += masked(value_of_key(key, flip), take);
      }
    }
    for (; i < n; ++i) {
      const key_t key = ck[i];
      const bool take = shift < 0 || ((key >> shift) & (kBins - 1)) > digit;
      part[0] += masked(value_of_key(key, flip), take);
    }
    acc_t total = 0;
    for (int l = 0; l < kPartials; ++l) {
      total += part[l];
    }
    return total;
  }

  // The remaining digits of one lane, over its n candidates (ck, ct) only, until
  // they are all selected or all equal (every digit fixed). Adds to sum what they select.
  Tie finish_lane(key_t* ck, int32_t* ct, int64_t L, int32_t n, int64_t need, acc_t& sum, key_t flip) {
    int32_t* H = hist.data();
    for (int shift = kShift2 - kDigitBits; shift >= 0 && n != need; shift -= kDigitBits) {
      std::fill(H, H + kBins, 0);
      for (int32_t i = 0; i < n; ++i) {
        H[(ck[i] >> shift) & (kBins - 1)]++;
      }
      const key_t digit = static_cast<key_t>(find_digit(H, need));
      sum += sum_above(ck, n, shift, digit, flip);
      int32_t m = 0;
      for (int32_t i = 0; i < n; ++i) {
        const key_t key = ck[i];
        ck[m] = key;
        ct[m] = ct[i];
        m += ((key >> shift) & (kBins - 1)) == digit;
      }
      n = m;
    }
    if (n == need) {
      // Every candidate is selected, so is every element equal to the smallest of them.
      sum += sum_above(ck, n, -1, 0, flip);
      return {*std::min_element(ck, ck + n), L - 1};
    }
    // All candidates equal the k-th key; the first `need` of them in time order are selected.
    sum += static_cast<acc_t>(need) * value_of_key(ck[0], flip);
    return {ck[0], ct[need - 1]};
  }
};

template <typename scalar_t>
void forward_kernel(
    const at::Tensor& scores,
    const int64_t* k,
    const int64_t* lengths,
    bool largest,
    scalar_t* out,
    int64_t* kth_out,
    int64_t* cut_out) {
  using acc_t = at::opmath_type<scalar_t>;
  using key_t = typename KeyOf<acc_t>::type;
  const int64_t B = scores.size(0), T = scores.size(1), C = scores.size(2);
  const int64_t sB = scores.stride(0), sT = scores.stride(1), sC = scores.stride(2);
  const scalar_t* base = scores.const_data_ptr<scalar_t>();
  const key_t flip = flip_mask<key_t>(largest);
  const int64_t blocks = (C + kLanes - 1) / kLanes;

  // lengths are checked to lie in [1, T]; rows >= every L a task sees.
  const int64_t rows = B > 0 ? *std::max_element(lengths, lengths + B) : 0;
  const int64_t lanes = std::min(kLanes, C);
  auto init = [rows, lanes] { return BlockSelect<acc_t>(rows, lanes); };
  parallel_chunks(B * blocks, 1, init, [&](BlockSelect<acc_t>& select, int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks;
      const int64_t c0 = (task % blocks) * kLanes;
      const int64_t width = std::min(kLanes, C - c0);
      const int64_t L = lengths[b];
      const scalar_t* slab = base + b * sB + c0 * sC;
      if (width == kLanes && sC == 1) {
        load_keys<true>(slab, L, sT, 1, width, flip, select.keys.data());
      } else {
        load_keys<false>(slab, L, sT, sC, width, flip, select.keys.data());
      }
      const int64_t o = b * C + c0;
      select.run(L, k[b], width, flip, out + o, kth_out + o, cut_out + o);
    }
  });
}

template <typename scalar_t>
void backward_kernel(
    const at::Tensor& grad_out,
    const at::Tensor& scores,
    const int64_t* k,
    const int64_t* lengths,
    const int64_t* kth_saved,
    const int64_t* cut_saved,
    bool largest,
    scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using key_t = typename KeyOf<acc_t>::type;
  const int64_t B = scores.size(0), T = scores.size(1), C = scores.size(2);
  const int64_t sB = scores.stride(0), sT = scores.stride(1), sC = scores.stride(2);
  const scalar_t* base = scores.const_data_ptr<scalar_t>();
  const key_t flip = flip_mask<key_t>(largest);

  // Per-column constants in the narrowest types, so the row loop vectorises.
  std::vector<key_t> kth(B * C);
  std::vector<int32_t> cut(B * C);
  std::vector<scalar_t> g(B * C);
  // grad_out arrives in the accumulation type: grad = (scalar_t)(grad_out / k), as autograd of the mean.
  auto go = grad_out.accessor<acc_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = b * C + c;
      // What the forward saved, or the op was called with other tensors: a key wider than the
      // scores' keys or a time index outside [-1, T) would be cut down to another selection.
      TORCH_CHECK_VALUE(sizeof(key_t) == 8 || (kth_saved[o] >= 0 && kth_saved[o] <= int64_t(~key_t(0))),
                        "kth_key: expected the keys the forward returned, got ", num(kth_saved[o]), " at [", num(b),
                        ", ", num(c), "]");
      TORCH_CHECK_VALUE(cut_saved[o] >= -1 && cut_saved[o] < T, "cut: expected the time indices in [-1, ", num(T),
                        ") the forward returned, got ", num(cut_saved[o]), " at [", num(b), ", ", num(c), "]");
      kth[o] = static_cast<key_t>(kth_saved[o]);
      cut[o] = static_cast<int32_t>(cut_saved[o]);
      g[o] = static_cast<scalar_t>(static_cast<acc_t>(go[b][c]) / static_cast<acc_t>(k[b]));
    }
  }

  // Rows of about 32 KiB of output per task: large enough to amortise the task.
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1));
  parallel_chunks(B * T, grain, [] { return 0; }, [&](int, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T, t = row % T;
      scalar_t* dst = grad + row * C;
      if (t >= lengths[b]) {
        std::fill(dst, dst + C, scalar_t(0));
        continue;
      }
      const scalar_t* src = base + b * sB + t * sT;
      const key_t* kth_b = kth.data() + b * C;
      const int32_t* cut_b = cut.data() + b * C;
      const scalar_t* g_b = g.data() + b * C;
      const int32_t t32 = static_cast<int32_t>(t);
      if (sC == 1) {
        for (int64_t c = 0; c < C; ++c) {
          const key_t key = order_key(static_cast<acc_t>(src[c]), flip);
          const scalar_t gc = g_b[c];  // loaded unconditionally, or the loop does not vectorise
          dst[c] = is_selected(key, kth_b[c], t32, cut_b[c]) ? gc : scalar_t(0);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const key_t key = order_key(static_cast<acc_t>(src[c * sC]), flip);
          const scalar_t gc = g_b[c];
          dst[c] = is_selected(key, kth_b[c], t32, cut_b[c]) ? gc : scalar_t(0);
        }
      }
    }
  });
}

// A new [B, T, C] gradient is one fresh page per 4 KiB, and on the VMs we
// measured on a page fault costs more than computing the gradient of that page
// (a 59 MB tensor: 30 ms of faults against 10 ms with 2 MiB pages). Asking for
// transparent huge pages before the first write is only a hint: where THP is
// off, or the memory was touched before, nothing changes.
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
}

// k and lengths live on the CPU here, so their values are checked (the CUDA
// kernel cannot without a host sync and marks such videos NaN instead).
void check_values(const at::Tensor& k, const at::Tensor& lengths, int64_t T) {
  const int64_t* kp = k.const_data_ptr<int64_t>();
  const int64_t* lp = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < k.size(0); ++b) {
    TORCH_CHECK_VALUE(
        lp[b] >= 1 && lp[b] <= T,
        "lengths: expected values in [1, T] = [1, ",
        num(T),
        "], got lengths[",
        num(b),
        "] = ",
        num(lp[b]));
    TORCH_CHECK_VALUE(
        kp[b] >= 1 && kp[b] <= lp[b],
        "k: expected 1 <= k[b] <= lengths[b], got k[",
        num(b),
        "] = ",
        num(kp[b]),
        " with lengths[",
        num(b),
        "] = ",
        num(lp[b]));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_mil_pool_cpu(
    const at::Tensor& scores,
    const at::Tensor& k_in,
    const at::Tensor& lengths_in,
    bool largest) {
  check_topk_mil_pool_args(scores, k_in, lengths_in);
  const at::Tensor k = k_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t B = scores.size(0), T = scores.size(1), C = scores.size(2);
  check_values(k, lengths, T);
  at::Tensor out = at::empty({B, C}, scores.options());
  at::Tensor kth = at::empty({B, C}, scores.options().dtype(at::kLong));
  at::Tensor cut = at::empty({B, C}, scores.options().dtype(at::kLong));
  if (B * C == 0) {
    return {out, kth, cut};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_mil_pool_cpu", [&] {
    forward_kernel<scalar_t>(
        scores,
        k.const_data_ptr<int64_t>(),
        lengths.const_data_ptr<int64_t>(),
        largest,
        out.mutable_data_ptr<scalar_t>(),
        kth.mutable_data_ptr<int64_t>(),
        cut.mutable_data_ptr<int64_t>());
  });
  return {out, kth, cut};
}

at::Tensor topk_mil_pool_backward_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& scores,
    const at::Tensor& k_in,
    const at::Tensor& lengths_in,
    const at::Tensor& kth_in,
    const at::Tensor& cut_in,
    bool largest) {
  check_topk_mil_pool_backward_args(grad_out, scores, k_in, lengths_in, kth_in, cut_in);
  const at::Tensor k = k_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const at::Tensor kth = kth_in.contiguous();
  const at::Tensor cut = cut_in.contiguous();
  check_values(k, lengths, scores.size(1));
  at::Tensor grad = at::empty(scores.sizes(), scores.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) {
    return grad;
  }
  advise_huge_pages(grad.mutable_data_ptr(), grad.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_mil_pool_backward_cpu", [&] {
    backward_kernel<scalar_t>(
        grad_out.to(at::toOpMathType(scores.scalar_type())),
        scores,
        k.const_data_ptr<int64_t>(),
        lengths.const_data_ptr<int64_t>(),
        kth.const_data_ptr<int64_t>(),
        cut.const_data_ptr<int64_t>(),
        largest,
        grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace
}  // namespace mmsd_ext

TORCH_LIBRARY_IMPL(mmsd_ext, CPU, m) {
  m.impl("topk_mil_pool", &mmsd_ext::topk_mil_pool_cpu);
  m.impl("_topk_mil_pool_backward", &mmsd_ext::topk_mil_pool_backward_cpu);
}
