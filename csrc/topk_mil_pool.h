// Argument checks of the top-k MIL pooling op, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace mmsd_ext {

// Numbers and shapes for error messages, formatted without std::ostream. On the
// GPU image we test on (torch 2.11), a TORCH_CHECK of this extension whose
// message streams an integer crashed the process instead of raising, while
// messages of strings and dtypes raised as they should.
inline std::string num(int64_t value) {
  return std::to_string(value);
}
inline std::string shape(c10::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return text + "]";
}

// Shapes, dtypes and devices of the forward's arguments (values are the kernels' business).
void check_topk_mil_pool_args(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& lengths);

// The same for the backward, plus grad_out [B, C] and the saved kth_key and cut [B, C].
void check_topk_mil_pool_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& scores,
    const at::Tensor& k,
    const at::Tensor& lengths,
    const at::Tensor& kth_key,
    const at::Tensor& cut);

}  // namespace mmsd_ext
