// CPU kernel of soft_temporal_nms.
//
// Per group (groups in parallel with at::parallel_for):
// - the live segments (score >= min_score) sit in an indexed binary max-heap keyed
//   by (current score desc, index asc), so each selection is O(log G);
// - a decay changes only segments that intersect the selected one b (IoU 0 gives
//   the gaussian factor exp(-0) = 1 exactly, and never passes the linear
//   threshold): live segments with start <= end_b + offset and end >= start_b -
//   offset (each up to a rounding slack). The live segments are ranked by start,
//   in blocks of 64 ranks, under a max-tree of each block's longest live end
//   (EndTree). The first condition is a prefix of the ranks (a galloping search
//   from b's rank), the second prunes every subtree whose live ends all lie
//   before b, so a selection visits the blocks holding segments that intersect it
//   and no others, however long the longest segment of the group is. A decayed
//   segment moves in the heap, or leaves it (and the tree) when its score falls
//   below min_score.
//
// Global order. The reference selects the best live segment over all groups, and
// a decay touches only its own group, so the result is the merge of the per-group
// sequences that always takes the best head. A group's sequence splits into runs:
// each run starts at an element ranked below every earlier one of its group (a new
// running minimum of (score desc, index asc)) and goes on with elements ranked
// above that start. Once a run's start is the best head, the rest of its run is
// better than every other head, so runs come out whole, in the order of their
// starts. Sorting the selections by (run start score desc, run start index asc,
// step) therefore reproduces the merge. With non-negative scores every run has one
// element (decays only lower scores); negative scores rise under decay and make
// longer runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/nms_partition.h"
#include "nms_checks.h"
#include "nms_math.h"

namespace mmsd_ext {
namespace nms {
namespace {

// One selection: original index, score at selection, its run key, step in group.
struct Selection {
  int64_t index;
  double score;
  double run_score;
  int64_t run_index;
  int64_t step;
};

bool merge_before(const Selection& a, const Selection& b) {
  if (a.run_score != b.run_score) return a.run_score > b.run_score;
  if (a.run_index != b.run_index) return a.run_index < b.run_index;
  return a.step < b.step;
}

// Indexed binary max-heap over local ids 0..n-1 keyed by (cur desc, index asc).
class LiveHeap {
 public:
  LiveHeap(const double* cur, const int64_t* index) : cur_(cur), index_(index) {}

  void reset(int64_t n) {
    heap_.resize(n);
    pos_.assign(n, -1);
    std::iota(heap_.begin(), heap_.end(), int64_t{0});
    for (int64_t p = 0; p < n; ++p) pos_[p] = p;
    for (int64_t p = n / 2 - 1; p >= 0; --p) down(p);
  }
  bool empty() const { return heap_.empty(); }
  int64_t top() const { return heap_[0]; }
  void remove(int64_t id) {
    const int64_t p = pos_[id];
    const int64_t last = heap_.back();
    heap_.pop_back();
    pos_[id] = -1;
    if (last == id) return;
    heap_[p] = last;
    pos_[last] = p;
    update(last);
  }
  // Restores the heap after cur[id] changed.
  void update(int64_t id) {
    const int64_t p = pos_[id];
    if (up(p) == p) down(p);
  }

 private:
  bool better(int64_t a, int64_t b) const {
    if (cur_[a] != cur_[b]) return cur_[a] > cur_[b];
    return index_[a] < index_[b];
  }
  void place(int64_t p, int64_t id) {
    heap_[p] = id;
    pos_[id] = p;
  }
  int64_t up(int64_t p) {
    const int64_t id = heap_[p];
    while (p > 0) {
      const int64_t parent = (p - 1) / 2;
      if (!better(id, heap_[parent])) break;
      place(p, heap_[parent]);
      p = parent;
    }
    place(p, id);
    return p;
  }
  void down(int64_t p) {
    const int64_t id = heap_[p];
    const int64_t n = static_cast<int64_t>(heap_.size());
    while (true) {
      int64_t child = 2 * p + 1;
      if (child >= n) break;
      if (child + 1 < n && better(heap_[child + 1], heap_[child])) ++child;
      if (!better(heap_[child], id)) break;
      place(p, heap_[child]);
      p = child;
    }
    place(p, id);
  }

  const double* cur_;
  const int64_t* index_;
  std::vector<int64_t> heap_;
  std::vector<int64_t> pos_;
};

// The longest live end of each block of 64 start ranks, under a max-tree: finds
// the blocks before a given one that hold a live end >= x without looking at the
// others, in O(log blocks) each and usually a step or two. Leaves are blocks;
// node p has children 2p and 2p + 1; a block without live segments holds -inf.
class EndTree {
 public:
  // Builds the tree over ranks 0..n-1 (n >= 1), all live.
  void reset(const double* end, int64_t n) {
    const int64_t blocks = ceil_div(n, 64);
    leaves_ = 1;
    while (leaves_ < blocks) leaves_ *= 2;
    node_.assign(2 * leaves_, -std::numeric_limits<double>::infinity());
    for (int64_t r = 0; r < n; ++r) node_[leaves_ + (r >> 6)] = std::max(node_[leaves_ + (r >> 6)], end[r]);
    for (int64_t p = leaves_ - 1; p >= 1; --p) node_[p] = std::max(node_[2 * p], node_[2 * p + 1]);
  }
  double block_max(int64_t w) const { return node_[leaves_ + w]; }
  // Recomputes block w from its live bits, after members of it died.
  void refresh(int64_t w, uint64_t live_bits, const double* end) {
    double m = -std::numeric_limits<double>::infinity();
    for (; live_bits; live_bits &= live_bits - 1) m = std::max(m, end[(w << 6) + __builtin_ctzll(live_bits)]);
    int64_t p = leaves_ + w;
    node_[p] = m;
    for (p >>= 1; p >= 1; p >>= 1) {
      const double up = std::max(node_[2 * p], node_[2 * p + 1]);
      if (node_[p] == up) break;
      node_[p] = up;
    }
  }
  // The largest block < w whose longest live end is >= x, or -1.
  int64_t prev_at_least(int64_t w, double x) const {
    int64_t p = leaves_ + w;
    while (true) {
      if (p == 1) return -1;
      if ((p & 1) && node_[p - 1] >= x) break;
      p >>= 1;
    }
    for (--p; p < leaves_;) p = node_[2 * p + 1] >= x ? 2 * p + 1 : 2 * p;
    return p - leaves_;
  }

 private:
  int64_t leaves_ = 1;
  std::vector<double> node_;
};

struct SoftParams {
  bool gaussian;
  double sigma, threshold, min_score, offset;
};

// Soft-NMS of one group; appends its selections in its own selection order.
void soft_one_group(const int64_t* members, int64_t size, const double* seg, const double* score, const SoftParams& p,
                    std::vector<Selection>& out) {
  // Local ids ranked by start; only the initially live segments take part.
  std::vector<std::pair<double, int64_t>> by_start;
  by_start.reserve(size);
  for (int64_t k = 0; k < size; ++k) {
    const int64_t i = members[k];
    if (score[i] >= p.min_score) by_start.push_back({seg[2 * i], i});  // NaN fails: dropped
  }
  std::sort(by_start.begin(), by_start.end());
  const int64_t n = static_cast<int64_t>(by_start.size());
  if (n == 0) return;
  std::vector<double> start(n), end(n), cur(n);
  std::vector<int64_t> index(n);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = by_start[r].second;
    index[r] = i;
    start[r] = seg[2 * i];
    end[r] = seg[2 * i + 1];
    cur[r] = score[i];
  }
  LiveHeap heap(cur.data(), index.data());
  heap.reset(n);
  EndTree ends;
  ends.reset(end.data(), n);
  std::vector<uint64_t> live(ceil_div(n, 64), ~uint64_t{0});
  if (n & 63) live.back() = ~uint64_t{0} >> (64 - (n & 63));  // no ranks past n
  std::vector<int64_t> dirty;  // blocks that lost their longest live end during one selection
  // Removes rank r from the live set; its block needs a refresh only if r held the
  // block's longest end.
  auto kill = [&](int64_t r) {
    live[r >> 6] &= ~(uint64_t{1} << (r & 63));
    if (end[r] >= ends.block_max(r >> 6) && (dirty.empty() || dirty.back() != (r >> 6))) dirty.push_back(r >> 6);
  };
  double run_score = 0.0;
  int64_t run_index = -1;
  int64_t step = 0;
  while (!heap.empty()) {
    const int64_t b = heap.top();
    heap.remove(b);
    dirty.clear();
    kill(b);
    if (run_index < 0 || cur[b] < run_score || (cur[b] == run_score && index[b] > run_index)) {
      run_score = cur[b];
      run_index = index[b];
    }
    out.push_back({index[b], cur[b], run_score, run_index, step++});
    // Segment r can intersect b (intersection > 0) only if start_r <= be + offset
    // and end_r >= bs - offset; the slack, far above the rounding error of the
    // intersection, makes both tests conservative, so the exact IoU decides.
    const double bs = start[b], be = end[b];
    const double slack = 1e-12 * (std::fabs(bs) + std::fabs(be) + p.offset) + 1e-300;
    const double lo = bs - p.offset - slack, hi = be + p.offset + slack;
    // r1: the first rank whose start is > hi (start[b] <= hi, so r1 > b), by
    // galloping from b then a binary search: O(log (r1 - b)).
    int64_t stride = 1;
    while (b + stride < n && start[b + stride] <= hi) stride *= 2;
    const int64_t r1 =
        std::upper_bound(start.begin() + b + stride / 2 + 1, start.begin() + std::min(b + stride, n), hi) - start.begin();
    // Blocks from the one of rank r1 - 1 down, those holding a live end >= lo.
    const int64_t last = (r1 - 1) >> 6;
    for (int64_t w = ends.block_max(last) >= lo ? last : ends.prev_at_least(last, lo); w >= 0;
         w = ends.prev_at_least(w, lo)) {
      uint64_t bits = live[w];
      if (w == last && (r1 & 63) != 0) bits &= ~uint64_t{0} >> (64 - (r1 & 63));
      for (; bits; bits &= bits - 1) {
        const int64_t r = (w << 6) + __builtin_ctzll(bits);
        if (end[r] < lo) continue;
        const double iou = segment_overlap(bs, be, start[r], end[r], kIoU, p.offset);
        if (iou == 0.0) continue;  // factor exactly 1 (gaussian), or no decay (linear)
        if (p.gaussian) {
          cur[r] *= std::exp(-(iou * iou) / p.sigma);
        } else if (iou > p.threshold) {
          cur[r] *= 1.0 - iou;
        } else {
          continue;
        }
        if (cur[r] >= p.min_score) {
          heap.update(r);
        } else {
          heap.remove(r);  // below min_score, or NaN (an infinite score decayed by 0)
          kill(r);
        }
      }
    }
    // The tree changes after the walk, which reads it.
    for (const int64_t w : dirty) ends.refresh(w, live[w], end.data());
  }
}

// Segments per parallel task (see temporal_nms_kernel.cpp).
constexpr int64_t kSegmentsPerTask = 4096;

std::tuple<at::Tensor, at::Tensor> soft_temporal_nms_cpu(const at::Tensor& segments, const at::Tensor& scores,
                                                         const c10::optional<at::Tensor>& groups,
                                                         c10::string_view method, double sigma, double iou_threshold,
                                                         double min_score, double offset) {
  check_nms_inputs(segments, scores, groups, offset);
  check_soft_nms_params(method, sigma, iou_threshold, min_score);
  TORCH_CHECK_VALUE(segments.device().is_cpu(), "segments: expected a CPU tensor, got ",
                    device_text(segments.device()));
  const int64_t n = segments.size(0);
  const SoftParams p{method == "gaussian", sigma, iou_threshold, min_score, offset};

  const at::Tensor seg_t = segments.to(at::kDouble).contiguous();
  const at::Tensor score_t = scores.to(at::kDouble).contiguous();
  const double* seg = seg_t.data_ptr<double>();
  const double* score = score_t.data_ptr<double>();
  check_segment_values(seg, n, segments.scalar_type() == at::kFloat);

  at::Tensor groups_t;
  if (groups.has_value()) groups_t = groups->contiguous();
  const Partition part = partition_by_group(groups.has_value() ? groups_t.data_ptr<int64_t>() : nullptr, n);
  const std::vector<int64_t>& order = part.order;
  const std::vector<int64_t>& starts = part.starts;
  const int64_t num_groups = static_cast<int64_t>(starts.size()) - 1;

  std::vector<std::vector<Selection>> per_group(num_groups);
  const int64_t grain = n == 0 ? 1 : std::max<int64_t>(1, kSegmentsPerTask * num_groups / n);
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      soft_one_group(order.data() + starts[k], starts[k + 1] - starts[k], seg, score, p, per_group[k]);
    }
  });
  std::vector<Selection> all;
  for (auto& v : per_group) all.insert(all.end(), v.begin(), v.end());
  if (num_groups > 1) std::sort(all.begin(), all.end(), merge_before);

  const int64_t k = static_cast<int64_t>(all.size());
  at::Tensor idx = at::empty({k}, segments.options().dtype(at::kLong));
  at::Tensor val = at::empty({k}, segments.options().dtype(at::kDouble));
  int64_t* ip = idx.data_ptr<int64_t>();
  double* vp = val.data_ptr<double>();
  for (int64_t j = 0; j < k; ++j) {
    ip[j] = all[j].index;
    vp[j] = all[j].score;
  }
  return {idx, val.to(scores.scalar_type())};
}

}  // namespace
}  // namespace nms
}  // namespace mmsd_ext

TORCH_LIBRARY_IMPL(mmsd_ext, CPU, m) {
  m.impl("soft_temporal_nms", &mmsd_ext::nms::soft_temporal_nms_cpu);
}
