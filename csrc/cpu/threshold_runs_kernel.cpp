// CPU kernel of _threshold_runs (schema and contract in ../threshold_runs.cpp).
//
// One sweep per sequence finds the maximal runs of every threshold at once, in
// work proportional to the snippets plus the runs (see sequence_runs), each run
// scored as it closes. Sequences run in parallel
// (at::parallel_for), each into its own list; the lists are then concatenated in
// sequence order, so the output does not depend on the number of threads.
//
// The score is computed with the same float64 operations, in the same order, as
// _run_scores in mmsd_ext/localize.py, so both paths give identical numbers. Each
// window is summed directly, left to right: a difference of one running prefix sum
// would be cheaper but rounds differently at each position, so two runs over the
// same values would get scores a few ulps apart and the NMS tie rule would no
// longer see them as tied. Direct sums cost the total window length; on the
// THUMOS14-sized workload of the tests (8874 proposals kept) mmsd_proposals took
// 8.5-8.8 ms with them and 8.6-12.3 ms with the prefix sum, one thread, on a
// loaded 2-core machine: no measurable cost.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "format.h"

namespace mmsd_ext {
namespace {

struct Run {
  int64_t start;
  int64_t end;
  double score;
};

void check_1d(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected dtype ", dtype_text(dtype), ", got ",
                   dtype_text(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1, name, ": expected a 1-d tensor, got shape ", shape(t.sizes()));
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", device_text(t.device()));
}

// total + x[a] + x[a + 1] + ... + x[b - 1], added left to right (a plain loop's order).
inline double add_window(double total, const double* x, int64_t a, int64_t b) {
  for (int64_t i = a; i < b; ++i) total += x[i];
  return total;
}

// MMSD's inner - outer contrast of the run [start, end) of a sequence x[0:T];
// mirrors _run_scores in localize.py.
inline double run_score(const double* x, int64_t T, int64_t start, int64_t end, double outer_ratio) {
  const int64_t inner_end = std::min(end + 1, T);
  const double inner = add_window(0.0, x, start, inner_end) / static_cast<double>(inner_end - start);
  const double reach = outer_ratio * static_cast<double>(end - start);
  // Clamped in double before the int64 casts, which a huge reach would overflow.
  const int64_t left = static_cast<int64_t>(std::max(std::trunc(static_cast<double>(start) - reach), 0.0));
  const int64_t right =
      static_cast<int64_t>(std::min(static_cast<double>(T - 1), std::trunc((static_cast<double>(end) + reach) + 1)));
  const int64_t n_left = start - left;
  const int64_t n_right = std::max<int64_t>(right - (end + 1), 0);
  const int64_t right_from = std::max<int64_t>(std::min(end + 1, right), 0);
  const int64_t right_to = std::max(right, right_from);
  // One sum over the left window then the right one, as MMSD's mean over the
  // concatenated index list adds them.
  const double total = add_window(add_window(0.0, x, left, start), x, right_from, right_to);
  const int64_t count = n_left + n_right;
  const double outer = count > 0 ? total / static_cast<double>(count) : 0.0;
  return inner - outer;
}

// The thresholds in ascending order (ties in the caller's order), each with its
// index in the caller's order, and the inverse map.
struct Thresholds {
  std::vector<double> sorted;
  std::vector<int64_t> caller;  // caller[j]: caller's index of sorted[j]
  std::vector<int64_t> rank;    // rank[c]: sorted index of the caller's threshold c
};

Thresholds sort_thresholds(const double* thr, int64_t K) {
  Thresholds t;
  t.caller.resize(K);
  std::iota(t.caller.begin(), t.caller.end(), int64_t{0});
  std::stable_sort(t.caller.begin(), t.caller.end(), [&](int64_t a, int64_t b) { return thr[a] < thr[b]; });
  t.sorted.resize(K);
  t.rank.resize(K);
  for (int64_t j = 0; j < K; ++j) {
    t.sorted[j] = thr[t.caller[j]];
    t.rank[t.caller[j]] = j;
  }
  return t;
}

// level[t] = how many thresholds lie strictly below x[t], so x[t] > sorted[j]
// exactly for j < level[t], for t in [0, n). Counted one threshold at a time over a
// block of snippets: branch free (the crossings of noisy activations defeat branch
// prediction), vectorised over t, and the block stays in L1.
void levels_of(const double* __restrict x, int64_t n, const double* __restrict sorted, int64_t K,
               int32_t* __restrict level) {
  std::fill(level, level + n, 0);
  for (int64_t j = 0; j < K; ++j) {
    const double u = sorted[j];
    for (int64_t t = 0; t < n; ++t) level[t] += u < x[t];
  }
}

// Snippets per levels_of block: 2 KiB of levels and 4 KiB of values.
constexpr int64_t kLevelBlock = 512;

// Appends the runs of one sequence (values x[0:T]) to out, by threshold in the
// caller's order, then start. One sweep over t: where the level rises from a to b,
// the runs of sorted thresholds [a, b) open; where it falls from b to a, those
// runs close. Runs of one threshold close in start order, into that threshold's
// bucket. Runs closing together with equal starts are copies of one run (the same
// [s, e) at several thresholds, and no other threshold has it): with
// first_copies_only, only the copy of the lowest caller index is kept.
void sequence_runs(const double* x, int64_t T, const Thresholds& thr, int64_t min_len, double outer_ratio,
                   bool first_copies_only, std::vector<int32_t>& levels, std::vector<int64_t>& open,
                   std::vector<std::vector<Run>>& buckets, std::vector<Run>& out) {
  const int64_t K = static_cast<int64_t>(thr.sorted.size());
  for (auto& b : buckets) b.clear();
  levels.resize(kLevelBlock);
  int64_t previous = 0;
  for (int64_t t = 0; t <= T; ++t) {
    if (t % kLevelBlock == 0 && t < T) {
      levels_of(x + t, std::min(kLevelBlock, T - t), thr.sorted.data(), K, levels.data());
    }
    const int64_t level = t < T ? levels[t % kLevelBlock] : 0;
    if (level > previous) {
      for (int64_t j = previous; j < level; ++j) open[j] = t;
    } else if (level < previous) {
      // Open starts do not decrease with j: the runs too short to keep are the
      // top ones, and equal starts form consecutive blocks.
      int64_t long_end = previous;
      while (long_end > level && t - open[long_end - 1] < min_len) --long_end;
      int64_t j = level;
      while (j < long_end) {
        const int64_t s = open[j];
        int64_t block_end = j + 1;
        while (block_end < long_end && open[block_end] == s) ++block_end;
        const double score = run_score(x, T, s, t, outer_ratio);
        if (first_copies_only) {
          int64_t first = j;
          for (int64_t i = j + 1; i < block_end; ++i) {
            if (thr.caller[i] < thr.caller[first]) first = i;
          }
          buckets[first].push_back({s, t, score});
        } else {
          for (int64_t i = j; i < block_end; ++i) buckets[i].push_back({s, t, score});
        }
        j = block_end;
      }
    }
    previous = level;
  }
  for (int64_t c = 0; c < K; ++c) {
    const auto& bucket = buckets[thr.rank[c]];
    out.insert(out.end(), bucket.begin(), bucket.end());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> threshold_runs_cpu(
    const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& lengths,
    const at::Tensor& thresholds, int64_t min_len, double outer_ratio, bool first_copies_only) {
  check_1d(values, "values", at::kDouble);
  check_1d(offsets, "offsets", at::kLong);
  check_1d(lengths, "lengths", at::kLong);
  check_1d(thresholds, "thresholds", at::kDouble);
  const int64_t S = values.size(0);
  const int64_t N = offsets.size(0);
  TORCH_CHECK_VALUE(lengths.size(0) == N, "lengths: expected shape [N] = [", num(N), "] like offsets, got ",
                    shape(lengths.sizes()));
  TORCH_CHECK_VALUE(min_len >= 1, "min_len: expected an int >= 1, got ", num(min_len));
  TORCH_CHECK_VALUE(std::isfinite(outer_ratio) && outer_ratio >= 0, "outer_ratio: expected a finite number >= 0, got ",
                    real(outer_ratio));

  const at::Tensor x_t = values.contiguous(), o_t = offsets.contiguous(),
                   l_t = lengths.contiguous(), thr_t = thresholds.contiguous();
  const double* x = x_t.data_ptr<double>();
  const int64_t* off = o_t.data_ptr<int64_t>();
  const int64_t* len = l_t.data_ptr<int64_t>();
  const double* thr = thr_t.data_ptr<double>();
  const int64_t K = thr_t.size(0);
  for (int64_t n = 0; n < N; ++n) {
    // Compared without forming off + len, which could overflow int64.
    TORCH_CHECK_VALUE(len[n] >= 0 && off[n] >= 0 && off[n] <= S && len[n] <= S - off[n], "offsets, lengths: sequence ",
                      num(n), " (offset ", num(off[n]), ", length ", num(len[n]), ") lies outside values of length ",
                      num(S));
  }
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK_VALUE(std::isfinite(thr[k]), "thresholds: expected finite values, got ", real(thr[k]), " at ", num(k));
  }

  const Thresholds sorted_thr = sort_thresholds(thr, K);
  // About one sequence per task: their lengths vary by two orders of magnitude.
  std::vector<std::vector<Run>> runs(N);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> levels;
    std::vector<int64_t> open(K);
    std::vector<std::vector<Run>> buckets(K);
    for (int64_t n = begin; n < end; ++n) {
      sequence_runs(x + off[n], len[n], sorted_thr, min_len, outer_ratio, first_copies_only, levels, open, buckets,
                    runs[n]);
    }
  });

  int64_t R = 0;
  for (const auto& r : runs) R += static_cast<int64_t>(r.size());
  const auto long_options = values.options().dtype(at::kLong);
  at::Tensor seq = at::empty({R}, long_options), start = at::empty({R}, long_options),
             end = at::empty({R}, long_options), score = at::empty({R}, values.options());
  int64_t* seq_p = seq.data_ptr<int64_t>();
  int64_t* start_p = start.data_ptr<int64_t>();
  int64_t* end_p = end.data_ptr<int64_t>();
  double* score_p = score.data_ptr<double>();
  int64_t i = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (const Run& r : runs[n]) {
      seq_p[i] = n;
      start_p[i] = r.start;
      end_p[i] = r.end;
      score_p[i] = r.score;
      ++i;
    }
  }
  return {seq, start, end, score};
}

}  // namespace
}  // namespace mmsd_ext

TORCH_LIBRARY_IMPL(mmsd_ext, CPU, m) {
  m.impl("_threshold_runs", &mmsd_ext::threshold_runs_cpu);
}
