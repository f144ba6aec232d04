// Host-side argument checks and preparation shared by the CPU and CUDA
// implementations of the distillation ops. Every message names the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string>
#include <vector>

#include "distill_math.h"
#include "format.h"

namespace mmsd_ext {
namespace distill {

inline bool is_logit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Logits [..., C] of a float dtype; `others` must match the first tensor's shape,
// dtype and device.
inline void check_logits(const std::vector<std::pair<const char*, const at::Tensor*>>& tensors) {
  const char* name0 = tensors[0].first;
  const at::Tensor& t0 = *tensors[0].second;
  for (const auto& [name, tp] : tensors) {
    const at::Tensor& t = *tp;
    TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
    TORCH_CHECK(is_logit_dtype(t.scalar_type()), name,
                ": expected dtype float32, float16, bfloat16 or float64, got ", dtype_text(t.scalar_type()));
    TORCH_CHECK(t.dim() >= 1, name, ": expected shape [..., C], got a scalar");
    TORCH_CHECK(t.size(-1) >= 1, name, ": expected at least one class (C >= 1), got shape ", shape(t.sizes()));
    if (&t == &t0) continue;
    TORCH_CHECK(t.sizes() == t0.sizes(), name, ": expected the shape of ", name0, " ", shape(t0.sizes()), ", got ",
                shape(t.sizes()));
    TORCH_CHECK(t.scalar_type() == t0.scalar_type(), name, ": expected dtype ", dtype_text(t0.scalar_type()),
                " like ", name0, ", got ", dtype_text(t.scalar_type()));
    TORCH_CHECK(t.device() == t0.device(), name, ": expected a tensor on ", device_text(t0.device()), " like ", name0,
                ", got ", device_text(t.device()));
  }
}

// The kernels scale by 1 / temperature in float32: outside this range it leaves the
// normal floats (0 or inf past about 7e45 and 3e-39), and softmax(x / tau) is NaN.
// Same bounds in mmsd_ext/distill.py and kernels/distill.py.
constexpr double kMinTemperature = 1e-30;
constexpr double kMaxTemperature = 1e30;

inline void check_temperature(double temperature) {
  TORCH_CHECK(temperature >= kMinTemperature && temperature <= kMaxTemperature,
              "temperature: expected a finite number > 0 within [1e-30, 1e30], got ", real(temperature));
}

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "reduction: expected 0 (none), 1 (mean) or 2 (sum), got ", num(reduction));
}

// The mask as a contiguous bool tensor of the leading shape (undefined if absent);
// a float mask counts nonzero entries as valid (like mask.bool()).
inline at::Tensor prepare_mask(const std::optional<at::Tensor>& mask, const at::Tensor& logits,
                               const char* logits_name) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const at::Tensor& m = *mask;
  auto leading = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(m.sizes() == leading, "mask: expected the leading shape ", shape(leading), " of ", logits_name, ", got ",
              shape(m.sizes()));
  TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
              "mask: expected a bool or 0/1 float tensor, got ", dtype_text(m.scalar_type()));
  TORCH_CHECK(m.device() == logits.device(), "mask: expected a tensor on ", device_text(logits.device()), " like ",
              logits_name, ", got ", device_text(m.device()));
  at::Tensor b = m.scalar_type() == at::kBool ? m : m.ne(0);
  return b.contiguous();
}

// Leading shape [...] of logits [..., C].
inline std::vector<int64_t> leading_shape(const at::Tensor& logits) {
  auto s = logits.sizes();
  return std::vector<int64_t>(s.begin(), s.end() - 1);
}

// Row statistics [..., k] as saved by the forward.
inline void check_row_stats(const at::Tensor& stats, const at::Tensor& logits, int64_t k) {
  auto expected = leading_shape(logits);
  expected.push_back(k);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.sizes() == at::IntArrayRef(expected) &&
                  stats.is_contiguous() && stats.device() == logits.device(),
              "row_stats: expected the contiguous float32 tensor of shape ", shape(expected),
              " that the forward returned, got ", dtype_text(stats.scalar_type()), " ", shape(stats.sizes()));
}

inline void check_backward_scalars(const at::Tensor& grad, const at::Tensor& count, const at::Tensor& logits,
                                   int64_t reduction) {
  TORCH_CHECK(count.scalar_type() == at::kFloat && count.numel() == 1 && count.device() == logits.device(),
              "count: expected the float32 scalar that the forward returned, got ",
              dtype_text(count.scalar_type()), " ", shape(count.sizes()));
  TORCH_CHECK(grad.device() == logits.device(), "grad: expected a tensor on ", device_text(logits.device()), ", got ",
              device_text(grad.device()));
  // A complex gradient would lose its imaginary part in the float32 copy, an integer one means a caller's mistake.
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "grad: expected a floating tensor, got ",
              dtype_text(grad.scalar_type()));
  if (reduction == kNone) {
    auto leading = logits.sizes().slice(0, logits.dim() - 1);
    TORCH_CHECK(grad.sizes() == leading, "grad: expected shape ", shape(leading), ", got ", shape(grad.sizes()));
  } else {
    TORCH_CHECK(grad.numel() == 1, "grad: expected a scalar, got shape ", shape(grad.sizes()));
  }
}

// _distill_scale_grads_: grad a floating scalar; the gradients to scale in place
// contiguous, of one floating dtype and shape, on grad's device.
inline void check_scale_grads(const at::Tensor& grad, const at::Tensor& row_stats,
                              std::initializer_list<const at::Tensor*> grads) {
  TORCH_CHECK(grad.numel() == 1 && at::isFloatingType(grad.scalar_type()),
              "grad: expected a floating scalar, got ", dtype_text(grad.scalar_type()), " ", shape(grad.sizes()));
  const at::Tensor& g0 = **grads.begin();
  for (const at::Tensor* g : grads) {
    TORCH_CHECK(g->defined() && is_logit_dtype(g->scalar_type()) && g->is_contiguous() && g->sizes() == g0.sizes() &&
                    g->scalar_type() == g0.scalar_type() && g->device() == grad.device(),
                "grad_rgb, grad_flow, grad_fused: expected contiguous floating tensors of one shape and dtype on ",
                device_text(grad.device()), ", got ", g->defined() ? dtype_text(g->scalar_type()) : "None", " ",
                g->defined() ? shape(g->sizes()) : std::string(), g->defined() && !g->is_contiguous() ? " (not contiguous)" : "");
  }
  // Each is scaled once: tensors sharing memory would be scaled once per name.
  for (auto a = grads.begin(); a != grads.end(); ++a) {
    for (auto b = a + 1; b != grads.end(); ++b) {
      TORCH_CHECK(at::get_overlap_status(**a, **b) == at::MemOverlapStatus::No,
                  "grad_rgb, grad_flow, grad_fused: expected three tensors that share no memory");
    }
  }
  // The kernels read grad while they write the others (the CUDA one from every block).
  for (const at::Tensor* g : grads) {
    TORCH_CHECK(at::get_overlap_status(grad, *g) == at::MemOverlapStatus::No,
                "grad: expected a tensor that shares no memory with grad_rgb, grad_flow, grad_fused");
  }
  check_row_stats(row_stats, g0, kMmsdStats);
  for (const at::Tensor* g : grads) {
    TORCH_CHECK(at::get_overlap_status(row_stats, *g) == at::MemOverlapStatus::No,
                "row_stats: expected a tensor that shares no memory with grad_rgb, grad_flow, grad_fused");
  }
}

// The version counters of tensors this op changed in place (the autograd fallback of an op
// with no output does not bump them), so that autograd refuses a backward that saved them.
inline void bump_versions(std::initializer_list<const at::Tensor*> grads) {
  for (const at::Tensor* g : grads) {
    g->unsafeGetTensorImpl()->bump_version();
  }
}

// grad as a contiguous float32 tensor (an expanded or other-dtype gradient is copied; it has one float per row at most).
inline at::Tensor prepare_grad(const at::Tensor& grad) {
  return grad.to(at::kFloat).contiguous();
}

}  // namespace distill
}  // namespace mmsd_ext
