// CPU kernels of temporal_nms and of _temporal_nms_gather.
//
// temporal_nms exploits the 1-D structure instead of comparing all pairs. Per
// group, the segments are ranked by start and visited by score; the kept ones are
// a bitset over start ranks. A candidate c is compared only with kept segments
// that pass two necessary conditions for an overlap above the threshold t (both
// follow from intersection > t * length of c, see nms_one_group):
// - kept starts at or before c's: its end must pass start_c - offset + t L_c;
// - kept starts after c's: its start must lie within (1 - t) L_c of c's, and its
//   length must exceed t L_c.
// Two max-trees over 64-rank words of kept segments (longest end, longest length)
// skip whole words that fail them, so one long kept segment (a whole-video
// proposal) costs a candidate one extra test, not a scan over every kept segment
// between them. Kept segments are scanned outward from c's rank, where a
// suppressor usually is; the exact overlap test (nms_math.h) decides. Groups run
// in parallel (at::parallel_for); within a group the greedy scan is sequential by
// nature.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/nms_partition.h"
#include "nms_checks.h"
#include "nms_math.h"

namespace mmsd_ext {
namespace nms {
namespace {

// Doubles as unsigned keys with the same order.
inline uint64_t ordered_bits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return (b >> 63) ? ~b : (b | (uint64_t{1} << 63));
}

// Visit order as an unsigned key: ascending key = descending score, NaN last,
// 0.0 and -0.0 equal (ties are then ordered by index).
inline uint64_t visit_key(double score) {
  if (std::isnan(score)) return ~uint64_t{0};
  return ordered_bits(-score + 0.0);  // -0.0 + 0.0 is +0.0
}

using KeyIndex = std::pair<uint64_t, int64_t>;

// Groups at least this large are sorted by an LSD radix sort (8-bit digits, the
// passes where all keys share the digit skipped; stable), smaller ones by
// std::sort. Measured here (best of 30, keys of uniform random doubles):
// n = 2048: 18.6 us std::sort, 19.7 us radix (13.4 us for float32 scores, whose
// low bytes are zero); n = 10k: 399 vs 109 us; n = 100k: 5.3 vs 1.2 ms.
constexpr int64_t kRadixSortMinSize = 2048;

// Sorts by (key, index): stable for the radix sort, whose input is in index order.
void sort_keys(std::vector<KeyIndex>& v, std::vector<KeyIndex>& tmp) {
  const int64_t n = static_cast<int64_t>(v.size());
  if (n < kRadixSortMinSize) {
    std::sort(v.begin(), v.end());
    return;
  }
  std::vector<int64_t> hist(8 * 256, 0);
  for (const auto& e : v) {
    for (int d = 0; d < 8; ++d) ++hist[d * 256 + ((e.first >> (8 * d)) & 255)];
  }
  tmp.resize(n);
  for (int d = 0; d < 8; ++d) {
    int64_t* h = hist.data() + d * 256;
    if (h[(v[0].first >> (8 * d)) & 255] == n) continue;  // one digit value: nothing moves
    int64_t sum = 0;
    for (int k = 0; k < 256; ++k) {
      const int64_t c = h[k];
      h[k] = sum;
      sum += c;
    }
    for (const auto& e : v) tmp[h[(e.first >> (8 * d)) & 255]++] = e;
    v.swap(tmp);
  }
}

// Maximum of a value over words of 64 kept ranks, as a binary tree: finds the
// nearest word before or after a given one whose maximum exceeds a bound in
// O(log words), usually in a step or two (the neighbour qualifies). Leaves of
// words without kept segments hold -inf.
class WordMaxTree {
 public:
  void reset(int64_t words) {
    leaves_ = 1;
    while (leaves_ < words) leaves_ *= 2;
    node_.assign(2 * leaves_, -std::numeric_limits<double>::infinity());
  }
  void raise(int64_t w, double value) {
    for (int64_t p = leaves_ + w; p >= 1 && node_[p] < value; p >>= 1) node_[p] = value;
  }
  // The largest word < w whose maximum is > x, or -1.
  int64_t prev_above(int64_t w, double x) const {
    int64_t p = leaves_ + w;
    while (true) {
      if (p == 1) return -1;
      if ((p & 1) && node_[p - 1] > x) break;
      p >>= 1;
    }
    for (--p; p < leaves_;) p = node_[2 * p + 1] > x ? 2 * p + 1 : 2 * p;
    return p - leaves_;
  }
  // The smallest word > w whose maximum is > x, or -1.
  int64_t next_above(int64_t w, double x) const {
    int64_t p = leaves_ + w;
    while (true) {
      if (p == 1) return -1;
      if (!(p & 1) && node_[p + 1] > x) break;
      p >>= 1;
    }
    for (++p; p < leaves_;) p = node_[2 * p] > x ? 2 * p : 2 * p + 1;
    return p - leaves_;
  }

 private:
  int64_t leaves_ = 1;
  std::vector<double> node_;
};

// Per-thread scratch for one group, reused across the groups of a chunk.
struct GroupScratch {
  std::vector<KeyIndex> visit;     // (visit key, position in members), sorted
  std::vector<KeyIndex> by_start;  // (start key, index), sorted: rank r -> index
  std::vector<KeyIndex> tmp;
  std::vector<double> rank_start, rank_end;  // coordinates by start rank
  std::vector<int64_t> position_rank;        // start rank of members[k]
  std::vector<int64_t> visit_rank;           // start rank of the v-th visited segment
  std::vector<uint64_t> kept_bits;           // kept segments, by start rank
  WordMaxTree kept_end;                      // per word of kept_bits: the longest end
  WordMaxTree kept_length;                   // per word of kept_bits: the longest end - start + offset
};

// Greedy NMS of one group: sets keep[i] = 1 for its kept members and, if
// kept_in_order is given, appends them to it in visit order.
//
// Which kept segments a can overlap candidate c by more than t. Lengths
// L = end - start + offset bound the intersection I: I <= L_c, I <= L_a,
// I <= e_a - s_c + offset when s_a <= s_c, I <= L_c - (s_a - s_c) when s_a >= s_c;
// and an overlap above t needs I > t L_c (the union is >= L_c; "other" divides by
// L_c). So, up to rounding:
// - s_a <= s_c: e_a > s_c - offset + t L_c, and (the old window, with Lmax the
//   longest kept length) s_a > s_c - A, A = (1 - t) Lmax for "iou", Lmax - t L_c
//   for "other";
// - s_a >= s_c: s_a < s_c + (1 - t) L_c and L_a > t L_c.
// Each bound is relaxed by a slack far above the rounding error of the computed
// overlap, so they only drop pairs the exact test would not suppress.
//
// Memory: the loop reads everything by start rank (the candidate's coordinates,
// the window, the kept bits), so a candidate costs about one cache miss at large G.
void nms_one_group(const int64_t* members, int64_t size, const double* seg, const double* score, double threshold,
                   int kind, double offset, uint8_t* keep, std::vector<int64_t>* kept_in_order, GroupScratch& s) {
  if (size == 1) {
    keep[members[0]] = 1;
    if (kept_in_order != nullptr) kept_in_order->push_back(members[0]);
    return;
  }
  // Sort keys carry the position k in members; members are in increasing index
  // order, so (key, k) orders like (key, index).
  s.visit.resize(size);
  for (int64_t k = 0; k < size; ++k) s.visit[k] = {visit_key(score[members[k]]), k};
  sort_keys(s.visit, s.tmp);
  s.by_start.resize(size);
  for (int64_t k = 0; k < size; ++k) s.by_start[k] = {ordered_bits(seg[2 * members[k]]), k};
  sort_keys(s.by_start, s.tmp);
  s.rank_start.resize(size);
  s.rank_end.resize(size);
  s.position_rank.resize(size);
  for (int64_t r = 0; r < size; ++r) {
    const int64_t k = s.by_start[r].second;
    const int64_t i = members[k];
    s.by_start[r].second = i;
    s.rank_start[r] = seg[2 * i];
    s.rank_end[r] = seg[2 * i + 1];
    s.position_rank[k] = r;
  }
  s.visit_rank.resize(size);
  for (int64_t v = 0; v < size; ++v) s.visit_rank[v] = s.position_rank[s.visit[v].second];

  if (threshold >= 1.0) {
    // Nothing can be suppressed: overlap_terms never gives inter > den (inter <= each
    // length, and den = len_a + len_b - inter >= inter, each step rounded monotonically),
    // so no overlap exceeds 1. Without this, segments that share a start were each tested
    // against every kept one (M identical segments: M^2 / 2 tests, 7 s at M = 40k).
    for (int64_t v = 0; v < size; ++v) {
      const int64_t i = members[s.visit[v].second];
      keep[i] = 1;
      if (kept_in_order != nullptr) kept_in_order->push_back(i);
    }
    return;
  }
  const int64_t words = ceil_div(size, 64);
  s.kept_bits.assign(words, 0);
  s.kept_end.reset(words);
  s.kept_length.reset(words);
  const double keep_frac = std::max(1.0 - threshold, 0.0);
  const double minus_inf = -std::numeric_limits<double>::infinity();
  double maxlen = -1.0;  // longest kept end - start + offset; < 0 while nothing is kept
  const double* first = s.rank_start.data();
  const double* second = s.rank_end.data();
  for (int64_t v = 0; v < size; ++v) {
    const int64_t rc = s.visit_rank[v];
    const double cs = first[rc], ce = second[rc];
    const double len_c = ce - cs + offset;
    bool suppressed = false;
    // A zero-length candidate (start == end, offset 0) is never suppressed: its
    // intersection with anything is 0 (min(ends) <= ce == cs <= max(starts)), so its
    // overlap is 0 (also for an empty denominator), and thresholds are >= 0. Without
    // this, M such segments on one point were each tested against every kept one
    // (a reach of 0 bounds nothing): 3 s at M = 40k.
    if (maxlen >= 0 && len_c != 0.0) {
      const double reach = threshold * len_c;  // the intersection must exceed it
      const double below = kind == kOther ? maxlen - reach : keep_frac * maxlen;
      const double above = keep_frac * len_c;
      const double slack = 1e-9 * (std::fabs(cs) + std::fabs(ce) + offset + maxlen) + 1e-300;
      const double lo = cs - below - slack, hi = cs + above + slack;
      // Bounds on a kept end (left side) and length (right side); NaN (from an
      // infinite length) means no bound.
      const double bound_slack = 1e-9 * (std::fabs(cs) + std::fabs(ce) + offset + reach) + 1e-300;
      double end_bound = cs - offset + reach * (1.0 - 1e-8) - bound_slack;
      double length_bound = reach * (1.0 - 1e-8) - 1e-300;
      if (end_bound != end_bound) end_bound = minus_inf;
      if (length_bound != length_bound) length_bound = minus_inf;
      // Outward from c's own rank rc: ranks > rc ascending until a start exceeds hi,
      // ranks < rc descending until a start falls below lo, a word of each in turn.
      // Words whose kept segments all fail the side's bound are skipped via the trees.
      int64_t wr = rc >> 6, wl = rc >> 6;
      bool right = true, left = rc > 0;
      uint64_t right_bits = s.kept_bits[wr] & ((~uint64_t{0} << (rc & 63)) << 1);  // ranks > rc
      uint64_t left_bits = s.kept_bits[wl] & ((uint64_t{1} << (rc & 63)) - 1);  // ranks < rc
      while (!suppressed && (right || left)) {
        if (right) {
          for (; right_bits && !suppressed; right_bits &= right_bits - 1) {
            const int64_t r = (wr << 6) + __builtin_ctzll(right_bits);
            if (first[r] > hi) {
              right = false;
              break;
            }
            suppressed = second[r] - first[r] + offset > length_bound &&
                         overlap_exceeds(first[r], second[r], cs, ce, kind, offset, threshold);
          }
          if (right && !suppressed) {
            wr = s.kept_length.next_above(wr, length_bound);
            if (wr < 0 || first[wr << 6] > hi) {
              right = false;
            } else {
              right_bits = s.kept_bits[wr];
            }
          }
        }
        if (left && !suppressed) {
          while (left_bits && !suppressed) {
            const int b = 63 - __builtin_clzll(left_bits);
            const int64_t r = (wl << 6) + b;
            if (first[r] < lo) {
              left = false;
              break;
            }
            suppressed = second[r] > end_bound && overlap_exceeds(first[r], second[r], cs, ce, kind, offset, threshold);
            left_bits &= ~(uint64_t{1} << b);
          }
          if (left && !suppressed) {
            wl = s.kept_end.prev_above(wl, end_bound);
            if (wl < 0 || first[(wl << 6) + 63] < lo) {
              left = false;
            } else {
              left_bits = s.kept_bits[wl];
            }
          }
        }
      }
    }
    if (!suppressed) {
      s.kept_bits[rc >> 6] |= uint64_t{1} << (rc & 63);
      s.kept_end.raise(rc >> 6, ce);
      s.kept_length.raise(rc >> 6, len_c);
      maxlen = std::max(maxlen, len_c);
      if (kept_in_order != nullptr) kept_in_order->push_back(members[s.visit[v].second]);
    }
  }
  for (int64_t w = 0; w < words; ++w) {
    for (uint64_t bits = s.kept_bits[w]; bits; bits &= bits - 1) {
      keep[s.by_start[(w << 6) + __builtin_ctzll(bits)].second] = 1;
    }
  }
}

// Work per parallel chunk: at least this many segments, so that tiny groups are
// batched (a parallel_for task costs about a microsecond).
constexpr int64_t kSegmentsPerTask = 4096;

at::Tensor temporal_nms_cpu(const at::Tensor& segments, const at::Tensor& scores, const c10::optional<at::Tensor>& groups,
                            double iou_threshold, c10::string_view overlap, double offset) {
  check_nms_inputs(segments, scores, groups, offset);
  check_threshold("iou_threshold", iou_threshold);
  const int kind = overlap_kind(std::string(overlap));
  TORCH_CHECK_VALUE(segments.device().is_cpu(), "segments: expected a CPU tensor, got ",
                    device_text(segments.device()));
  const int64_t n = segments.size(0);
  if (n == 0) return at::empty({0}, segments.options().dtype(at::kLong));

  const at::Tensor seg_t = segments.to(at::kDouble).contiguous();
  const at::Tensor score_t = scores.to(at::kDouble).contiguous();
  const double* seg = seg_t.data_ptr<double>();
  const double* score = score_t.data_ptr<double>();
  check_segment_values(seg, n, segments.scalar_type() == at::kFloat);
  at::Tensor groups_t;
  if (groups.has_value()) groups_t = groups->contiguous();
  const Partition part = partition_by_group(groups.has_value() ? groups_t.data_ptr<int64_t>() : nullptr, n);
  const int64_t num_groups = static_cast<int64_t>(part.starts.size()) - 1;

  std::vector<uint8_t> keep(n, 0);
  std::vector<int64_t> kept;  // in visit order
  if (num_groups == 1) {
    GroupScratch scratch;
    nms_one_group(part.order.data(), n, seg, score, iou_threshold, kind, offset, keep.data(), &kept, scratch);
  } else {
    const int64_t grain = std::max<int64_t>(1, kSegmentsPerTask * num_groups / n);
    at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
      GroupScratch scratch;
      for (int64_t k = begin; k < end; ++k) {
        const int64_t a = part.starts[k], b = part.starts[k + 1];
        nms_one_group(part.order.data() + a, b - a, seg, score, iou_threshold, kind, offset, keep.data(), nullptr,
                      scratch);
      }
    });
    // All groups' kept segments in visit order: a stable sort by visit key of the
    // kept indices taken in increasing order (ties stay by index).
    std::vector<KeyIndex> order, tmp;
    for (int64_t i = 0; i < n; ++i) {
      if (keep[i]) order.push_back({visit_key(score[i]), i});
    }
    sort_keys(order, tmp);
    kept.resize(order.size());
    for (size_t j = 0; j < order.size(); ++j) kept[j] = order[j].second;
  }
  at::Tensor out = at::empty({static_cast<int64_t>(kept.size())}, segments.options().dtype(at::kLong));
  std::copy(kept.begin(), kept.end(), out.data_ptr<int64_t>());
  return out;
}

// The sequential keep-gather over suppression tiles (see the schema in
// temporal_nms.cpp), one group after another in parallel: the Triton backend's
// second stage when it runs on CPU tensors under the Triton interpreter.
at::Tensor temporal_nms_gather_cpu(const at::Tensor& mask, const c10::optional<at::Tensor>& sorted_groups) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kLong, "mask: expected an int64 tensor, got ",
                   dtype_text(mask.scalar_type()));
  TORCH_CHECK_VALUE(mask.dim() == 2, "mask: expected shape [n, W], got ", shape(mask.sizes()));
  const int64_t n = mask.size(0), width = mask.size(1);
  at::Tensor keep = at::zeros({n}, mask.options().dtype(at::kBool));
  if (n == 0) return keep;
  TORCH_CHECK_VALUE(width >= 1, "mask: expected at least one tile per row, got shape ",
                    shape(mask.sizes()));
  at::Tensor g_t;
  if (sorted_groups.has_value()) {
    TORCH_CHECK_TYPE(sorted_groups->scalar_type() == at::kLong, "sorted_groups: expected an int64 tensor, got ",
                     dtype_text(sorted_groups->scalar_type()));
    TORCH_CHECK_VALUE(sorted_groups->dim() == 1 && sorted_groups->size(0) == n, "sorted_groups: expected shape [",
                      num(n), "], got ", shape(sorted_groups->sizes()));
    g_t = sorted_groups->contiguous();
  }
  const at::Tensor mask_t = mask.contiguous();
  const uint64_t* bits = reinterpret_cast<const uint64_t*>(mask_t.data_ptr<int64_t>());
  const int64_t* g = sorted_groups.has_value() ? g_t.data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> starts = {0};
  for (int64_t i = 1; i < n && g != nullptr; ++i) {
    TORCH_CHECK_VALUE(g[i] >= g[i - 1], "sorted_groups: expected non-decreasing group ids");
    if (g[i] != g[i - 1]) starts.push_back(i);
  }
  starts.push_back(n);
  for (size_t k = 0; k + 1 < starts.size(); ++k) {
    const int64_t need = (starts[k + 1] - 1) / kTile - starts[k] / kTile + 1;
    TORCH_CHECK_VALUE(width >= need, "mask: expected at least ", num(need), " tiles per row for a group of ",
                      num(starts[k + 1] - starts[k]), " segments, got ", num(width));
  }
  bool* keep_p = keep.data_ptr<bool>();
  const int64_t num_groups = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, num_groups, std::max<int64_t>(1, kSegmentsPerTask * num_groups / n), [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> removed;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t gs = starts[k], ge = starts[k + 1];
      const int64_t t0 = gs / kTile, t1 = (ge - 1) / kTile;
      removed.assign(t1 - t0 + 1, 0);
      for (int64_t i = gs; i < ge; ++i) {
        const int64_t r = i / kTile;
        if (removed[r - t0] >> (i % kTile) & 1) continue;
        keep_p[i] = true;
        const uint64_t* row = bits + i * width;
        for (int64_t c = r; c <= t1; ++c) removed[c - t0] |= row[c - r];
      }
    }
  });
  return keep;
}

}  // namespace
}  // namespace nms
}  // namespace mmsd_ext

TORCH_LIBRARY_IMPL(mmsd_ext, CPU, m) {
  m.impl("temporal_nms", &mmsd_ext::nms::temporal_nms_cpu);
  m.impl("_temporal_nms_gather", &mmsd_ext::nms::temporal_nms_gather_cpu);
}
