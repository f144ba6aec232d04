// Schema of _threshold_runs, the run finding and scoring half of mmsd_proposals
// (MMSD's getActLoc). The Python wrapper (mmsd_ext/localize.py) lays the selected
// (video, class) sequences end to end in float64; this op returns every maximal run
// above each threshold with its inner - outer score.
// CPU kernel: cpu/threshold_runs_kernel.cpp. Other devices use the vectorised
// PyTorch formulation in localize.py, which produces the same numbers.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmsd_ext, m) {
  // values float64 [S]: the sequences end to end; offsets, lengths int64 [N]: where
  // each sequence starts in values and how long it is; thresholds float64 [K], in the caller's order.
  // Returns (seq, start, end, score): int64, int64, int64, float64 [R], one entry per
  // maximal run [start, end) of values > threshold with end - start >= min_len,
  // ordered by sequence, then threshold (caller's order), then start. With
  // first_copies_only, a run equal to one found at an earlier threshold of the same
  // sequence is left out.
  m.def(
      "_threshold_runs(Tensor values, Tensor offsets, Tensor lengths, Tensor thresholds, int min_len, "
      "float outer_ratio, bool first_copies_only) -> (Tensor, Tensor, Tensor, Tensor)");
}
