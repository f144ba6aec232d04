// Schemas of the snippet-level distillation ops. Kernels: csrc/cpu/distill_kernel.cpp
// (CPU), csrc/cuda/distill_kernel.cu (CUDA); the Triton versions are their own ops
// (mmsd_ext::*_triton, kernels/distill.py). Public wrappers, fake kernels and autograd:
// mmsd_ext/distill.py. Maths: csrc/distill_math.h.
//
// The forwards return (loss, row_stats, count):
//   loss       float32: a scalar, or the per-row losses [...] for reduction 0 (none);
//   row_stats  float32 [..., k]: per softmax of the row, (row max, log of its sum of
//              exps), what the backward needs to recompute the probabilities in one pass;
//   count      float32 scalar: the number of valid rows, for "mean".
// Only loss is differentiable. reduction: 0 none, 1 mean, 2 sum (as at::Reduction).
//
// The autograd of mmsd_distill_loss (csrc/autograd.cpp) may instead call
// _mmsd_distill_loss_with_grads, which also writes the three gradients of the loss
// for an upstream gradient of 1 in the same pass (the rows are read once; the
// backward then needs no second read of the inputs), and in the backward
// _distill_scale_grads_, which multiplies those gradients in place by the upstream
// gradient, read on the device: where it is 1 the pass is skipped, with no host sync.
// Rows that row_stats marks without a teacher (masked rows, all -inf teachers) stay 0,
// as the backward's selects leave them, whatever the upstream gradient (0 * inf is NaN).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmsd_ext, m) {
  m.def(
      "snippet_distill_loss(Tensor student, Tensor teacher, float temperature, Tensor? mask, int reduction)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "_snippet_distill_loss_backward(Tensor grad, Tensor student, Tensor teacher, Tensor row_stats,"
      " Tensor count, float temperature, int reduction) -> Tensor");
  m.def(
      "mmsd_distill_loss(Tensor rgb, Tensor flow, Tensor fused, float temperature, Tensor? mask)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "_mmsd_distill_loss_backward(Tensor grad, Tensor rgb, Tensor flow, Tensor fused, Tensor row_stats,"
      " Tensor count, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_mmsd_distill_loss_with_grads(Tensor rgb, Tensor flow, Tensor fused, float temperature, Tensor? mask)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_distill_scale_grads_(Tensor grad, Tensor row_stats, Tensor(a!) grad_rgb, Tensor(b!) grad_flow,"
      " Tensor(c!) grad_fused) -> ()");
}
