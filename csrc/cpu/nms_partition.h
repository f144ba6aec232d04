// Groups of the CPU kernels of temporal_nms and soft_temporal_nms as contiguous
// runs of one index permutation, found in linear time for dense group ids.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace mmsd_ext {
namespace nms {

// Groups as contiguous runs of an index permutation: members of group k are
// order[starts[k] .. starts[k + 1]), in increasing index order.
struct Partition {
  std::vector<int64_t> order;
  std::vector<int64_t> starts;
};

// Counting sort is linear; it is used when the group ids span at most this many
// values per segment (ids like video * num_classes + class are dense), otherwise a
// comparison sort. 4 keeps the count array at most 4x the index array.
constexpr uint64_t kCountingSortSpanPerSegment = 4;

inline Partition partition_by_group(const int64_t* g, int64_t n) {
  Partition p;
  p.order.resize(n);
  std::iota(p.order.begin(), p.order.end(), int64_t{0});
  if (g == nullptr || n == 0) {
    p.starts = {0, n};
    if (n == 0) p.starts = {0};
    return p;
  }
  bool sorted = true;
  int64_t lo = g[0], hi = g[0];
  for (int64_t i = 1; i < n; ++i) {
    sorted &= g[i] >= g[i - 1];
    lo = std::min(lo, g[i]);
    hi = std::max(hi, g[i]);
  }
  if (!sorted) {
    const uint64_t span = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);  // no signed overflow
    if (span < kCountingSortSpanPerSegment * static_cast<uint64_t>(n) + 1024) {
      std::vector<int64_t> count(span + 2, 0);
      for (int64_t i = 0; i < n; ++i) ++count[static_cast<uint64_t>(g[i]) - static_cast<uint64_t>(lo) + 1];
      for (size_t k = 1; k < count.size(); ++k) count[k] += count[k - 1];
      for (int64_t i = 0; i < n; ++i) p.order[count[static_cast<uint64_t>(g[i]) - static_cast<uint64_t>(lo)]++] = i;
    } else {
      std::stable_sort(p.order.begin(), p.order.end(), [g](int64_t a, int64_t b) { return g[a] < g[b]; });
    }
  }
  p.starts.push_back(0);
  for (int64_t k = 1; k < n; ++k) {
    if (g[p.order[k]] != g[p.order[k - 1]]) p.starts.push_back(k);
  }
  p.starts.push_back(n);
  return p;
}

}  // namespace nms
}  // namespace mmsd_ext
