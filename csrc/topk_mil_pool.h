// Argument checks of the top-k MIL pooling op, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "format.h"

namespace mmsd_ext {

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
