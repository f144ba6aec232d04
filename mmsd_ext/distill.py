"""Snippet-level knowledge distillation losses: ``snippet_distill_loss`` and ``mmsd_distill_loss``."""

import torch

from . import _backend, _checks

REDUCTIONS = ("mean", "sum", "none")


def snippet_distill_loss(student, teacher, temperature=1.0, *, mask=None, reduction="mean", backend=None):
    """Cross-entropy between a teacher's and a student's snippet class distributions.

    Per row (one snippet), with tau = ``temperature``::

        l = -sum_c softmax(teacher / tau)_c * log_softmax(student / tau)_c

    MMSD's CategoryCrossEntropy (no tau**2 factor). The teacher is a target: it
    never receives a gradient, even if it requires grad. The student's gradient
    is ``(softmax(student/tau) - softmax(teacher/tau)) / tau`` times the upstream
    weight of the row.

    Args:
        student, teacher: logits of one shape [..., C] (typically [B, T, C]),
            float32, float16 or bfloat16, any strides. ``-inf`` in the teacher
            excludes a class (probability 0).
        temperature: tau > 0.
        mask: optional bool or 0/1 float tensor of the leading shape [...];
            rows where it is False/0 (padding) contribute nothing.
        reduction: "mean" over the valid rows, "sum", or "none" (per-row values
            of shape [...], zero at masked rows).
        backend: "reference", "cpu", "cuda", "triton" or None (auto).

    Returns:
        float32 tensor (scalar, or [...] for "none"), accumulated in float32 for
        any input dtype. An all-masked input gives 0 for "mean" and "sum" (and
        zero gradients), not NaN.

    Example::

        >>> s = torch.randn(10, 750, 21, requires_grad=True); t = torch.randn(10, 750, 21)
        >>> loss = mmsd_ext.snippet_distill_loss(s, t, temperature=0.2)
    """
    student, teacher, tau, mask = _check_pair(student, teacher, temperature, mask)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    name = _backend.resolve("snippet_distill_loss", backend, student.device, supported=_PAIR_SUPPORTED)
    return _PAIR_IMPLS[name](student, teacher, tau, mask, reduction)


def mmsd_distill_loss(rgb, flow, fused, temperature=0.2, *, mask=None, backend=None):
    """MMSD's multi-modality knowledge distillation term, in one fused pass.

    ``L(rgb <- flow) + L(flow <- rgb) + L(fused <- (rgb + flow) / 2)``, each a
    "mean" ``snippet_distill_loss`` at ``temperature`` with its teacher detached:
    rgb gets gradient only from the first term, flow only from the second,
    fused only from the third.

    Args:
        rgb, flow, fused: snippet class logits of one shape [..., C] (cas_logits
            of the three streams), float32/float16/bfloat16, any strides.
        temperature: tau > 0 (MMSD: 0.2).
        mask: optional bool or 0/1 float tensor [...] of valid snippets.
        backend: "reference", "cpu", "cuda", "triton" or None (auto).

    Returns:
        float32 scalar. All-masked input gives 0.
    """
    rgb, flow, tau, mask = _check_pair(rgb, flow, temperature, mask, names=("rgb", "flow"))
    _checks.floating("fused", fused)
    if fused.shape != rgb.shape:
        raise ValueError(f"fused: expected the shape of rgb {tuple(rgb.shape)}, got {tuple(fused.shape)}")
    _checks.same_device("rgb", rgb, fused=fused)
    name = _backend.resolve("mmsd_distill_loss", backend, rgb.device, supported=_MMSD_SUPPORTED)
    return _MMSD_IMPLS[name](rgb, flow, fused, tau, mask)


def _check_pair(student, teacher, temperature, mask, names=("student", "teacher")):
    s_name, t_name = names
    dtypes = _checks.FLOAT_DTYPES + (torch.float64,)
    _checks.floating(s_name, student, dtypes)
    _checks.floating(t_name, teacher, dtypes)
    if student.dim() < 1:
        raise ValueError(f"{s_name}: expected shape [..., C], got a scalar")
    if teacher.shape != student.shape:
        raise ValueError(f"{t_name}: expected the shape of {s_name} {tuple(student.shape)}, got {tuple(teacher.shape)}")
    _checks.same_device(s_name, student, **{t_name: teacher})
    tau = _checks.positive_number("temperature", temperature)
    if mask is not None:
        _checks.tensor("mask", mask)
        if mask.shape != student.shape[:-1]:
            raise ValueError(f"mask: expected the leading shape {tuple(student.shape[:-1])}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"mask: expected a bool or 0/1 float tensor, got {str(mask.dtype).replace('torch.', '')}")
        _checks.same_device(s_name, student, mask=mask)
    return student, teacher, tau, mask


def _row_losses_reference(student, teacher, tau):
    # float32 accumulation for low precision, float64 stays float64 (the test oracle).
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_p_student = torch.log_softmax(student.to(acc) / tau, dim=-1)
    p_teacher = torch.softmax(teacher.detach().to(acc) / tau, dim=-1)
    # Excluded classes (p_teacher == 0) contribute 0 even where log_p_student is -inf.
    terms = torch.where(p_teacher > 0, p_teacher * log_p_student, torch.zeros_like(log_p_student))
    return -terms.sum(dim=-1)


def snippet_distill_loss_reference(student, teacher, tau, mask, reduction):
    """Plain PyTorch, autograd does the backward."""
    rows = _row_losses_reference(student, teacher, tau)
    if mask is not None:
        rows = torch.where(mask.bool(), rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = rows.new_tensor(rows.numel()) if mask is None else mask.bool().sum().to(rows.dtype)
    return total / count.clamp(min=1)


def mmsd_distill_loss_reference(rgb, flow, fused, tau, mask):
    """MMSD's three terms composed from the single-pair reference."""
    mean_teacher = (rgb.detach() + flow.detach()) / 2
    return (
        snippet_distill_loss_reference(rgb, flow, tau, mask, "mean")
        + snippet_distill_loss_reference(flow, rgb, tau, mask, "mean")
        + snippet_distill_loss_reference(fused, mean_teacher, tau, mask, "mean")
    )


_PAIR_IMPLS = {"reference": snippet_distill_loss_reference}
_PAIR_SUPPORTED = ("reference",)
_MMSD_IMPLS = {"reference": mmsd_distill_loss_reference}
_MMSD_SUPPORTED = ("reference",)
