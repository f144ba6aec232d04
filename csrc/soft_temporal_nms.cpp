// Schema of soft_temporal_nms (Soft-NMS of Bodla et al. over 1-D segments, batched
// over groups). Kernels: cpu/soft_temporal_nms_kernel.cpp,
// cuda/soft_temporal_nms_kernel.cu, kernels/temporal_nms.py; semantics and the
// public wrapper: mmsd_ext/nms.py.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmsd_ext, m) {
  // method "gaussian" or "linear". Returns (indices int64 [K], scores [K] in the dtype
  // of `scores`): the selected segments in selection order and their decayed scores
  // at selection; K is data-dependent.
  m.def(
      "soft_temporal_nms(Tensor segments, Tensor scores, Tensor? groups, str method, float sigma, "
      "float iou_threshold, float min_score, float offset) -> (Tensor, Tensor)");
}

// Not differentiable here (the public wrapper detaches its inputs): a backward through the
// raw op's scores raises "not implemented", as the Python ops' does, instead of the
// dispatcher's default, which only warns and leaves the gradient None.
TORCH_LIBRARY_IMPL(mmsd_ext, Autograd, m) {
  m.impl("soft_temporal_nms", torch::autograd::autogradNotImplementedFallback());
}
