// Autograd of the compiled differentiable ops (top-k MIL pooling and the two
// distillation losses), registered in C++ for the Autograd key of every device.
//
// Why C++ and not torch.library.register_autograd: at WTAL sizes on a GPU
// (e.g. 10 x 750 x 21) a forward + backward is bound by host time, not by the
// kernels. On the 2-core CPU machine (a [1, 4, 2] input, so host time only), the
// top-k op's forward + .sum().backward() took about 100 us through the Python
// autograd wrapper, against 60 for eager torch.topk; through this code 60. It also skips
// materialising zero gradients for the two non-differentiable outputs (an
// undefined gradient means "none"). The semantics are those of the Python
// wrapper: the same saved tensors, only the first output differentiable,
// gradients only where asked for.
// Fake kernels stay in Python (mmsd_ext/mil.py, mmsd_ext/distill.py); torch.compile
// traces through this code like through any ATen op's autograd.
//
// The backward ops have no derivative of their own: backward with create_graph=True
// works, but differentiating its result again (a double backward) raises an error
// naming the op, instead of the default fallback's warning and a missing gradient.
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace mmsd_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The op below autograd: a typed handle looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// ---------------------------------------------------------------------------
// topk_mil_pool(scores, k, lengths, largest) -> (out, kth_key, cut)

using TopkSig = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
using TopkBackwardSig = at::Tensor(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    bool);

class TopkMilPool : public torch::autograd::Function<TopkMilPool> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& scores,
      const at::Tensor& k,
      const at::Tensor& lengths,
      bool largest) {
    static const auto op = op_handle<TopkSig>("mmsd_ext::topk_mil_pool");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, kth_key, cut] = op.call(scores, k, lengths, largest);
    // kth_key and cut pin the selection down, ties included, so the backward is
    // one elementwise pass over scores.
    ctx->mark_non_differentiable({kth_key, cut});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({scores, k, lengths, kth_key, cut});
    ctx->saved_data["largest"] = largest;
    return {out, kth_key, cut};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<TopkBackwardSig>("mmsd_ext::_topk_mil_pool_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_scores;
    if (grads[0].defined() && ctx->needs_input_grad(0)) {
      grad_scores = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["largest"].toBool());
    }
    return {grad_scores, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensor3 topk_mil_pool_autograd(const at::Tensor& scores, const at::Tensor& k, const at::Tensor& lengths, bool largest) {
  const auto outs = TopkMilPool::apply(scores, k, lengths, largest);
  return {outs[0], outs[1], outs[2]};
}

// ---------------------------------------------------------------------------
// snippet_distill_loss(student, teacher, temperature, mask, reduction) -> (loss, row_stats, count)
// The teacher is a target: it never gets a gradient.

using PairSig = Tensor3(const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&, int64_t);
using PairBackwardSig = at::Tensor(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    double,
    int64_t);

class SnippetDistillLoss : public torch::autograd::Function<SnippetDistillLoss> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& student,
      const at::Tensor& teacher,
      double temperature,
      const std::optional<at::Tensor>& mask,
      int64_t reduction) {
    static const auto op = op_handle<PairSig>("mmsd_ext::snippet_distill_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, count] = op.call(student, teacher, temperature, mask, reduction);
    ctx->mark_non_differentiable({row_stats, count});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({student, teacher, row_stats, count});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["reduction"] = reduction;
    return {loss, row_stats, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<PairBackwardSig>("mmsd_ext::_snippet_distill_loss_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_student;
    if (grads[0].defined() && ctx->needs_input_grad(0)) {
      grad_student = op.call(
          grads[0],
          saved[0],
          saved[1],
          saved[2],
          saved[3],
          ctx->saved_data["temperature"].toDouble(),
          ctx->saved_data["reduction"].toInt());
    }
    return {grad_student, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensor3 snippet_distill_loss_autograd(
    const at::Tensor& student,
    const at::Tensor& teacher,
    double temperature,
    const std::optional<at::Tensor>& mask,
    int64_t reduction) {
  const auto outs = SnippetDistillLoss::apply(student, teacher, temperature, mask, reduction);
  return {outs[0], outs[1], outs[2]};
}

// ---------------------------------------------------------------------------
// mmsd_distill_loss(rgb, flow, fused, temperature, mask) -> (loss, row_stats, count)
// One backward call gives all three gradients; each is returned only where asked for.
//
// Two ways through (the same gradients; where the upstream gradient is 1, bit for bit
// on the CPU):
// - Gradients in the forward (MMSD training: all three inputs need a gradient).
//   _mmsd_distill_loss_with_grads reads the rows once and writes the loss and the
//   gradients for an upstream gradient of 1. The first backward hands those tensors
//   over after _distill_scale_grads_ has multiplied them in place by the upstream
//   gradient; that kernel reads it on the device and does nothing where it is 1
//   (loss.backward() on the distillation term, or a sum of terms). Traffic: the
//   inputs read once, the gradients written once, the least an op can do. The cost:
//   the three gradients are held from the forward to the backward, outside the saved
//   tensors (saved_tensors_hooks, e.g. offloading to the CPU, do not see them).
// - Recompute (every other case): the forward saves per-row statistics only and the
//   backward reads the inputs again. Taken when not every input needs a gradient,
//   for float16 inputs (held gradients of an upstream gradient of 1 underflow there,
//   see mmsd_distill_loss_autograd), for a second backward (retain_graph=True: the
//   handed-over tensors may since have been changed by their new owner), for a
//   batched upstream gradient (is_grads_batched=True), for backward with
//   create_graph=True (so that differentiating the gradients raises, see above), and
//   for tensor subclasses and dispatch modes: torch.compile, FakeTensor, functorch.
//   Under those the ops are traced, not run, and a trace of the first way would bake
//   in an in-place update of tensors saved for backward; this way traces as plain
//   functional ops.

using MmsdSig =
    Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&);
using MmsdWithGradsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&);
using MmsdBackwardSig = Tensor3(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    double);
using ScaleGradsSig =
    void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

constexpr const char* kForwardGrads = "grads_from_forward";

class MmsdDistillLoss : public torch::autograd::Function<MmsdDistillLoss> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& rgb,
      const at::Tensor& flow,
      const at::Tensor& fused,
      double temperature,
      const std::optional<at::Tensor>& mask,
      bool grads_in_forward) {
    static const auto op = op_handle<MmsdSig>("mmsd_ext::mmsd_distill_loss");
    static const auto op_with_grads = op_handle<MmsdWithGradsSig>("mmsd_ext::_mmsd_distill_loss_with_grads");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor loss, row_stats, count;
    if (grads_in_forward) {
      at::Tensor grad_rgb, grad_flow, grad_fused;
      std::tie(loss, row_stats, count, grad_rgb, grad_flow, grad_fused) =
          op_with_grads.call(rgb, flow, fused, temperature, mask);
      // row_stats too, for the scale's selects: unpacking the saved variables would check
      // their versions, which the gradients held here do not depend on.
      ctx->saved_data[kForwardGrads] = c10::List<at::Tensor>({grad_rgb, grad_flow, grad_fused, row_stats});
    } else {
      std::tie(loss, row_stats, count) = op.call(rgb, flow, fused, temperature, mask);
    }
    ctx->mark_non_differentiable({row_stats, count});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({rgb, flow, fused, row_stats, count});
    ctx->saved_data["temperature"] = temperature;
    return {loss, row_stats, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<MmsdBackwardSig>("mmsd_ext::_mmsd_distill_loss_backward");
    static const auto scale = op_handle<ScaleGradsSig>("mmsd_ext::_distill_scale_grads_");
    if (!grads[0].defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    at::Tensor grad_rgb, grad_flow, grad_fused;
    const auto held = ctx->saved_data.find(kForwardGrads);
    // Not for a batched upstream gradient (is_grads_batched=True, vmap): the in-place
    // scale has no batching rule, and the recompute op has one.
    if (held != ctx->saved_data.end() && !at::GradMode::is_enabled() && !at::isTensorSubclassLike(grads[0])) {
      at::Tensor row_stats;
      {
        // Moved out and dropped from the context, so that the tensors returned are
        // referenced only by autograd (AccumulateGrad then keeps them as .grad, no copy).
        const c10::List<at::Tensor> list = held->second.toTensorList();
        ctx->saved_data.erase(held);
        grad_rgb = list.get(0);
        grad_flow = list.get(1);
        grad_fused = list.get(2);
        row_stats = list.get(3);
      }
      at::AutoDispatchBelowADInplaceOrView guard;
      scale.call(grads[0], row_stats, grad_rgb, grad_flow, grad_fused);
    } else {
      const auto saved = ctx->get_saved_variables();
      std::tie(grad_rgb, grad_flow, grad_fused) =
          op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["temperature"].toDouble());
    }
    const auto only_if = [&](int i, at::Tensor grad) { return ctx->needs_input_grad(i) ? grad : at::Tensor(); };
    return {only_if(0, grad_rgb), only_if(1, grad_flow), only_if(2, grad_fused), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensor3 mmsd_distill_loss_autograd(
    const at::Tensor& rgb,
    const at::Tensor& flow,
    const at::Tensor& fused,
    double temperature,
    const std::optional<at::Tensor>& mask) {
  // Gradients in the forward: see above. Decided here, where grad mode is the caller's.
  // Not for float16: the held gradients are those of an upstream gradient of 1, about
  // 1 / (rows * tau), which float16 holds as subnormals or 0 (at 7500 rows and tau 0.2,
  // under 1e-3 times a probability difference); a loss scaled up for float16 training
  // (GradScaler's 65536) then scaled the rounding loss up with them. Recomputed, they
  // are rounded once, after the upstream gradient. bfloat16 has float32's range.
  const bool grads_in_forward = at::GradMode::is_enabled() && rgb.requires_grad() && flow.requires_grad() &&
      fused.requires_grad() && (rgb.is_cpu() || rgb.is_cuda()) && rgb.scalar_type() != at::kHalf &&
      !at::areAnyTensorSubclassLike({rgb, flow, fused}) && !(mask.has_value() && at::isTensorSubclassLike(*mask));
  const auto outs = MmsdDistillLoss::apply(rgb, flow, fused, temperature, mask, grads_in_forward);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace
}  // namespace mmsd_ext

TORCH_LIBRARY_IMPL(mmsd_ext, Autograd, m) {
  m.impl("topk_mil_pool", &mmsd_ext::topk_mil_pool_autograd);
  m.impl("snippet_distill_loss", &mmsd_ext::snippet_distill_loss_autograd);
  m.impl("mmsd_distill_loss", &mmsd_ext::mmsd_distill_loss_autograd);
  m.impl("_topk_mil_pool_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_snippet_distill_loss_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_mmsd_distill_loss_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_mmsd_distill_loss_with_grads", torch::autograd::autogradNotImplementedFallback());
  m.impl("_distill_scale_grads_", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(mmsd_ext, ADInplaceOrView, m) {
  m.impl("_distill_scale_grads_", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}
