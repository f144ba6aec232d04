// Schema and argument checks of top-k MIL pooling. The public function and its
// documentation are mmsd_ext.topk_mil_pool (mmsd_ext/mil.py); the kernels are
// cpu/topk_mil_pool_kernel.cpp and cuda/topk_mil_pool_kernel.cu.
#include "topk_mil_pool.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

namespace mmsd_ext {

namespace {

void check_device_of_scores(const char* name, const at::Tensor& value, const at::Tensor& scores) {
  TORCH_CHECK(
      value.device() == scores.device(),
      name,
      ": expected a tensor on ",
      device_text(scores.device()),
      " like scores, got ",
      device_text(value.device()));
}

void check_index_vector(const char* name, const at::Tensor& value, const at::Tensor& scores, int64_t B) {
  TORCH_CHECK(
      value.scalar_type() == at::kLong,
      name,
      ": expected an int64 tensor, got ",
      dtype_text(value.scalar_type()));
  TORCH_CHECK(
      value.dim() == 1 && value.size(0) == B,
      name,
      ": expected shape [B] = [",
      num(B),
      "], got ",
      shape(value.sizes()));
  check_device_of_scores(name, value, scores);
}

void check_per_column(const char* name, const at::Tensor& value, const at::Tensor& scores) {
  const int64_t B = scores.size(0), C = scores.size(2);
  TORCH_CHECK(
      value.dim() == 2 && value.size(0) == B && value.size(1) == C,
      name,
      ": expected shape [B, C] = [",
      num(B),
      ", ",
      num(C),
      "], got ",
      shape(value.sizes()));
  check_device_of_scores(name, value, scores);
}

}  // namespace

void check_topk_mil_pool_args(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& lengths) {
  TORCH_CHECK(scores.dim() == 3, "scores: expected a 3-d tensor [B, T, C], got shape ", shape(scores.sizes()));
  const auto dtype = scores.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
      "scores: expected dtype float32, float16, bfloat16 or float64, got ",
      dtype_text(dtype));
  // Counts and time indices are 32-bit inside the kernels. A ValueError, as the triton
  // backend's limit and the docstring's "TypeError / ValueError naming the argument".
  TORCH_CHECK_VALUE(
      scores.size(1) < std::numeric_limits<int32_t>::max(),
      "scores: expected T < 2**31 - 1 (32-bit time indices), got T = ",
      num(scores.size(1)));
  check_index_vector("k", k, scores, scores.size(0));
  check_index_vector("lengths", lengths, scores, scores.size(0));
}

void check_topk_mil_pool_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& scores,
    const at::Tensor& k,
    const at::Tensor& lengths,
    const at::Tensor& kth_key,
    const at::Tensor& cut) {
  check_topk_mil_pool_args(scores, k, lengths);
  TORCH_CHECK(
      at::isFloatingType(grad_out.scalar_type()),
      "grad_out: expected a floating-point tensor, got ",
      dtype_text(grad_out.scalar_type()));
  check_per_column("grad_out", grad_out, scores);
  TORCH_CHECK(
      kth_key.scalar_type() == at::kLong,
      "kth_key: expected an int64 tensor, got ",
      dtype_text(kth_key.scalar_type()));
  check_per_column("kth_key", kth_key, scores);
  TORCH_CHECK(cut.scalar_type() == at::kLong, "cut: expected an int64 tensor, got ", dtype_text(cut.scalar_type()));
  check_per_column("cut", cut, scores);
}

}  // namespace mmsd_ext

TORCH_LIBRARY_FRAGMENT(mmsd_ext, m) {
  // Returns (out [B, C] in the dtype of scores, kth_key [B, C] int64, cut [B, C] int64).
  // kth_key holds the order key (topk_mil_pool_math.h) of the k-th selected value
  // of each column, cut the last selected time index among the elements equal to
  // it; with them the backward recomputes the selection in one elementwise pass.
  // Only `out` is differentiable. What kth_key and cut hold for a video whose k or
  // length is out of range (CUDA only; the CPU kernel raises) selects nothing.
  m.def(
      "topk_mil_pool(Tensor scores, Tensor k, Tensor lengths, bool largest) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Gradient of `out` with respect to scores: [B, T, C] contiguous, dtype of scores.
  m.def(
      "_topk_mil_pool_backward(Tensor grad_out, Tensor scores, Tensor k, Tensor lengths, Tensor kth_key, "
      "Tensor cut, bool largest) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
