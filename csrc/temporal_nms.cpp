// Schema of temporal_nms (greedy hard NMS over 1-D segments, batched over groups)
// and of its keep-gather, the sequential half of the mask-tile algorithm that the
// CUDA kernel and the Triton backend share. Kernels: cpu/temporal_nms_kernel.cpp,
// cuda/temporal_nms_kernel.cu, kernels/temporal_nms.py; semantics and the public
// wrapper: mmsd_ext/nms.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmsd_ext, m) {
  // segments [M, 2] float32/float64, scores [M] floating, groups None or int64 [M];
  // overlap "iou" or "other". Returns the kept indices (int64, data-dependent length)
  // in visit order: descending score, ties by lower index, NaN scores last.
  m.def("temporal_nms(Tensor segments, Tensor scores, Tensor? groups, float iou_threshold, str overlap, float offset) -> Tensor");
  // mask: int64 [n, W] suppression tiles of n segments sorted by (group, visit order):
  // bit b of mask[i, k] says that segment i, if kept, suppresses segment
  // 64 * (i / 64 + k) + b. sorted_groups: None (one group) or int64 [n], non-decreasing.
  // Returns bool [n]: which of the sorted segments greedy NMS keeps.
  m.def("_temporal_nms_gather(Tensor mask, Tensor? sorted_groups) -> Tensor");
}
