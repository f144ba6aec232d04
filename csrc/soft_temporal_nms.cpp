// Schema of soft_temporal_nms (Soft-NMS of Bodla et al. over 1-D segments, batched
// over groups). Kernels: cpu/soft_temporal_nms_kernel.cpp,
// cuda/soft_temporal_nms_kernel.cu, kernels/temporal_nms.py; semantics and the
// public wrapper: mmsd_ext/nms.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmsd_ext, m) {
  // method "gaussian" or "linear". Returns (indices int64 [K], scores [K] in the dtype
  // of `scores`): the selected segments in selection order and their decayed scores
  // at selection; K is data-dependent.
  m.def(
      "soft_temporal_nms(Tensor segments, Tensor scores, Tensor? groups, str method, float sigma, "
      "float iou_threshold, float min_score, float offset) -> (Tensor, Tensor)");
}
