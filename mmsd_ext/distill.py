"""Snippet-level knowledge distillation losses: ``snippet_distill_loss`` and ``mmsd_distill_loss``."""

from typing import Optional, Tuple

import torch

from . import _backend, _checks, _loader

REDUCTIONS = ("mean", "sum", "none")


def snippet_distill_loss(student, teacher, temperature=1.0, *, mask=None, reduction="mean", backend=None):
    """Cross-entropy between a teacher's and a student's snippet class distributions.

    Per row (one snippet), with tau = ``temperature``::

        l = -sum_c softmax(teacher / tau)_c * log_softmax(student / tau)_c

    MMSD's CategoryCrossEntropy (no tau**2 factor). The teacher is a target: it
    never receives a gradient, even if it requires grad. The student's gradient
    is ``(softmax(student/tau) - softmax(teacher/tau)) / tau`` times the upstream
    weight of the row. First order only: on every backend but "reference", a
    double backward (differentiating the gradient again) raises an error.

    Args:
        student, teacher: logits of one shape [..., C] (typically [B, T, C], C >= 1),
            float32, float16 or bfloat16 (float64 is accepted; every backend
            computes it in float32), any strides. ``-inf`` in the teacher
            excludes a class (probability 0; it adds 0 even where the
            student is ``-inf`` too). A teacher row that is all ``-inf`` has no
            target: its loss and its gradient are 0 (it still counts as a valid
            row for "mean"). A student row that is all ``-inf`` has no
            distribution: where its teacher has a target, the row's loss and
            gradient are NaN. Different dtypes are promoted to a common one.
        temperature: tau, a number in [1e-30, 1e30] (the kernels scale by 1 / tau
            in float32, which must stay a normal float).
        mask: optional bool or 0/1 float tensor of the leading shape [...];
            rows where it is False/0 (padding) contribute nothing. A float mask is
            read as ``mask != 0``: it selects rows, it does not weight them (its
            values are not checked, which would need a host synchronisation).
        reduction: "mean" over the valid rows, "sum", or "none" (per-row values
            of shape [...], zero at masked rows).
        backend: "reference", "cpu", "cuda", "triton", "auto" or None (a block's or the process's, else auto).

    Returns:
        float32 tensor (scalar, or [...] for "none"), accumulated in float32 for
        any input dtype. An all-masked input gives 0 for "mean" and "sum" (and
        zero gradients), not NaN. Logits of magnitude 1e4 are fine at any tau
        (but see ``mmsd_distill_loss`` for its mean teacher);
        NaN or +inf in a valid row that has a target makes that row's loss
        and gradient NaN (other rows keep theirs); masked-out rows and rows
        without a target give 0 whatever they hold.

    Raises:
        TypeError / ValueError naming the argument: shapes that differ, C == 0,
        a non-float tensor, tau outside [1e-30, 1e30], a mask of the wrong shape or
        dtype, an unknown reduction, tensors on different devices.

    Example::

        >>> s = torch.randn(10, 750, 21, requires_grad=True); t = torch.randn(10, 750, 21)
        >>> loss = mmsd_ext.snippet_distill_loss(s, t, temperature=0.2)
    """
    student, teacher, tau, mask = _check_pair(student, teacher, temperature, mask)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    name = _backend.resolve(
        "snippet_distill_loss", backend, student.device, supported=_PAIR_SUPPORTED, gpu_order=_GPU_ORDER
    )
    # Detached here, so that on every backend the loss needs a gradient only where the
    # student does (the compiled and Triton ops' outputs would otherwise follow the teacher's
    # requires_grad, with nothing to give it).
    return _PAIR_IMPLS[name](student, teacher.detach(), tau, mask, reduction)


def mmsd_distill_loss(rgb, flow, fused, temperature=0.2, *, mask=None, backend=None):
    """MMSD's multi-modality knowledge distillation term, in one fused pass.

    ``L(rgb <- flow) + L(flow <- rgb) + L(fused <- (rgb + flow) / 2)``, each a
    "mean" ``snippet_distill_loss`` at ``temperature`` with its teacher detached:
    rgb gets gradient only from the first term, flow only from the second,
    fused only from the third.

    Args:
        rgb, flow, fused: snippet class logits of one shape [..., C] (cas_logits
            of the three streams), float32/float16/bfloat16 (float64 as in
            ``snippet_distill_loss``), any strides; edge
            cases (-inf, all -inf rows, dtypes) as in ``snippet_distill_loss``.
        temperature: tau, a number in [1e-30, 1e30] (MMSD: 0.2).
        mask: optional bool or 0/1 float tensor [...] of valid snippets (a float
            mask is read as ``mask != 0``, as in ``snippet_distill_loss``).
        backend: "reference", "cpu", "cuda", "triton", "auto" or None (a block's or the process's, else auto).

    Returns:
        float32 scalar. All-masked input gives 0.

    Range: the mean teacher (rgb + flow) / 2 is exact in the cpu, cuda and triton
    kernels (summed in float64), but the maximum that shifts its softmax is
    float32, off by up to 2**-24 of itself, and 1 / tau magnifies that in the
    exponents: past max|logit| / tau of about 88 * 2**24 = 1.5e9 they can
    overflow. Measured on the cpu backend (2026-11-28, three draws of 3900 rows of
    21 classes, logits 10 * N(0, 1), tau from 0.2 down to 7e-9): every row with
    max|logit| / tau below 1.4e9 had finite gradients within 2.7e-7 of the
    float64 reference's (as a fraction of their scale 1 / (rows * tau)), and the
    loss of a batch of such rows was within 5.4e-8 (relative); from a ratio of
    1.87e9 on, some rows gave an inf loss or NaN gradients (MMSD's logits of at
    most 20 at tau = 0.2 are a ratio of 100). ``snippet_distill_loss`` has no
    such limit.

    The cpu and cuda backends, where all three inputs need a gradient (training),
    read each input once: the forward also writes the three gradients, which are
    held until the backward and then handed over, multiplied in place by the
    upstream gradient (a pass skipped, without a host sync, where that is 1, as in
    ``loss.backward()``; a weighted term, ``w * loss``, pays that pass: 12 N
    elements of traffic against 9 N for recomputing, N = rgb.numel()). Otherwise
    (float16 inputs, some input without a gradient, a second backward with
    ``retain_graph=True``, ``create_graph=True``, a batched upstream gradient
    (``is_grads_batched=True``), torch.compile) the forward saves per-row
    statistics only (the maxima and log-sums of the four softmaxes) and the
    backward reads the inputs again to write the gradients.
    The triton backend always does the latter. float16 recomputes because the
    gradients of an upstream gradient of 1 are about 1 / (rows * tau): float16
    subnormals or 0 at a few hundred rows, whose lost digits a scaled loss
    (GradScaler) would scale up; recomputed, each is rounded once, after the scale.

    Example::

        >>> rgb, flow, fused = (torch.randn(10, 750, 21, requires_grad=True) for _ in range(3))
        >>> loss = mmsd_ext.mmsd_distill_loss(rgb, flow, fused, temperature=0.2)
    """
    rgb, flow, tau, mask = _check_pair(rgb, flow, temperature, mask, names=("rgb", "flow"))
    _checks.floating("fused", fused, _checks.FLOAT_DTYPES + (torch.float64,))
    if fused.shape != rgb.shape:
        raise ValueError(f"fused: expected the shape of rgb {tuple(rgb.shape)}, got {tuple(fused.shape)}")
    _checks.same_device("rgb", rgb, fused=fused)
    name = _backend.resolve("mmsd_distill_loss", backend, rgb.device, supported=_MMSD_SUPPORTED, gpu_order=_GPU_ORDER)
    return _MMSD_IMPLS[name](rgb, flow, fused, tau, mask)


_MIN_TEMPERATURE, _MAX_TEMPERATURE = 1e-30, 1e30


def _check_pair(student, teacher, temperature, mask, names=("student", "teacher")):
    s_name, t_name = names
    dtypes = _checks.FLOAT_DTYPES + (torch.float64,)
    _checks.floating(s_name, student, dtypes)
    _checks.floating(t_name, teacher, dtypes)
    if student.dim() < 1:
        raise ValueError(f"{s_name}: expected shape [..., C], got a scalar")
    if student.shape[-1] == 0:
        raise ValueError(f"{s_name}: expected at least one class (C >= 1), got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"{t_name}: expected the shape of {s_name} {tuple(student.shape)}, got {tuple(teacher.shape)}")
    _checks.same_device(s_name, student, **{t_name: teacher})
    tau = _checks.positive_number("temperature", temperature)
    # The kernels scale by 1 / tau in float32: outside these bounds (those of
    # csrc/distill_checks.h) it is no longer a normal float, and the softmax NaN.
    if not (_MIN_TEMPERATURE <= tau <= _MAX_TEMPERATURE):
        raise ValueError(f"temperature: expected a finite number > 0 within [1e-30, 1e30], got {temperature}")
    if mask is not None:
        _checks.tensor("mask", mask)
        if mask.shape != student.shape[:-1]:
            raise ValueError(f"mask: expected the leading shape {tuple(student.shape[:-1])}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"mask: expected a bool or 0/1 float tensor, got {str(mask.dtype).replace('torch.', '')}")
        _checks.same_device(s_name, student, mask=mask)
    return student, teacher, tau, mask


def _row_losses_reference(student, teacher, tau, mask, acc):
    """Per-row losses in dtype acc; exactly 0, with a zero gradient, at dropped rows."""
    student = student.to(acc)
    teacher = teacher.detach().to(acc)
    # Dropped rows: a teacher row that is all -inf has no target (its softmax would be
    # NaN), and masked-out rows may hold anything (-inf or NaN padding). Their inputs
    # are replaced by 0 before the softmaxes, not only their losses after: otherwise
    # a NaN from the softmax would flow back into the gradient.
    drop = torch.isneginf(teacher).all(dim=-1)
    if mask is not None:
        drop = drop | ~mask.bool()
    student = torch.where(drop[..., None], 0.0, student)
    teacher = torch.where(drop[..., None], 0.0, teacher)
    log_p_student = torch.log_softmax(student / tau, dim=-1)
    p_teacher = torch.softmax(teacher / tau, dim=-1)
    # Excluded classes (p_teacher == 0) contribute 0 even where log_p_student is
    # -inf; a NaN teacher stays NaN.
    terms = torch.where(p_teacher == 0, 0.0, p_teacher * log_p_student)
    return torch.where(drop, 0.0, -terms.sum(dim=-1))


def snippet_distill_loss_reference(student, teacher, tau, mask, reduction, acc=torch.float32):
    """Plain PyTorch, autograd does the backward.

    acc: the dtype computed in and returned; float32 as the other backends (the
    tests' oracle passes float64).
    """
    rows = _row_losses_reference(student, teacher, tau, mask, acc)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if mask is None:  # a symbolic size under torch.export, not a constant of the graph
        return total / torch.sym_max(rows.numel(), 1)
    return total / mask.bool().sum().to(rows.dtype).clamp(min=1)


def mmsd_distill_loss_reference(rgb, flow, fused, tau, mask, acc=torch.float32):
    """MMSD's three terms composed from the single-pair reference (acc: as there)."""
    mean_teacher = (rgb.detach().to(acc) + flow.detach().to(acc)) / 2
    return (
        snippet_distill_loss_reference(rgb, flow, tau, mask, "mean", acc)
        + snippet_distill_loss_reference(flow, rgb, tau, mask, "mean", acc)
        + snippet_distill_loss_reference(fused, mean_teacher, tau, mask, "mean", acc)
    )


# ---------------------------------------------------------------- compiled backends
# "cpu" and "cuda" are the same C++ ops (csrc/distill.cpp; the tensors' device picks
# the kernel), "triton" its own custom ops (kernels/distill.py). Each forward returns
# (loss, row_stats, count); only loss is differentiable, the backward recomputes the
# probabilities from row_stats (see csrc/distill_math.h).

_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}  # as at::Reduction
_PAIR_STATS = 4  # (max, log-sum) of the student's and the teacher's softmax
_MMSD_STATS = 8  # ... of rgb, flow, fused and (rgb + flow) / 2
# Measured on an H200 (benchmarks/RESULTS.md), mmsd_distill_loss fwd+bwd: cuda 0.22 ms,
# triton 1.18 ms at (10, 750, 21); cuda 0.21 ms, triton 1.26 ms at (32, 2304, 201). cuda first.
_GPU_ORDER = ("cuda", "triton")


def _common_dtype(*tensors):
    """The tensors in one dtype (the kernels take one); autograd casts the gradients back."""
    dtype = tensors[0].dtype
    if all(t.dtype == dtype for t in tensors[1:]):  # the usual case, without promote_types' 2 us
        return tensors
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _pair_compiled(student, teacher, tau, mask, reduction):
    student, teacher = _common_dtype(student, teacher)
    return torch.ops.mmsd_ext.snippet_distill_loss(student, teacher, tau, mask, _REDUCTION_CODES[reduction])[0]


def _mmsd_compiled(rgb, flow, fused, tau, mask):
    rgb, flow, fused = _common_dtype(rgb, flow, fused)
    return torch.ops.mmsd_ext.mmsd_distill_loss(rgb, flow, fused, tau, mask)[0]


def _pair_triton(student, teacher, tau, mask, reduction):
    student, teacher = _common_dtype(student, teacher)
    return torch.ops.mmsd_ext.snippet_distill_loss_triton(student, teacher, tau, mask, _REDUCTION_CODES[reduction])[0]


def _mmsd_triton(rgb, flow, fused, tau, mask):
    rgb, flow, fused = _common_dtype(rgb, flow, fused)
    return torch.ops.mmsd_ext.mmsd_distill_loss_triton(rgb, flow, fused, tau, mask)[0]


# Fake kernels (shapes only), shared by the C++ and the Triton ops.
def _pair_fake(student, teacher, temperature, mask, reduction):
    # The checks that need no values, here too: a meta tensor among real ones (or a call
    # under FakeTensorMode) with a bad argument is an error, never an output made up.
    _check_pair(student, teacher, temperature, mask)
    leading = student.shape[:-1]
    loss = student.new_empty(leading if reduction == 0 else (), dtype=torch.float32)
    stats = student.new_empty((*leading, _PAIR_STATS), dtype=torch.float32)
    return loss, stats, student.new_empty((), dtype=torch.float32)


def _pair_backward_fake(grad, student, teacher, row_stats, count, temperature, reduction):
    _checks.same_device("student", student, grad=grad, teacher=teacher, row_stats=row_stats, count=count)
    return student.new_empty(student.shape)


def _mmsd_fake(rgb, flow, fused, temperature, mask):
    _check_pair(rgb, flow, temperature, mask, names=("rgb", "flow"))
    _check_pair(rgb, fused, temperature, None, names=("rgb", "fused"))
    stats = rgb.new_empty((*rgb.shape[:-1], _MMSD_STATS), dtype=torch.float32)
    return rgb.new_empty((), dtype=torch.float32), stats, rgb.new_empty((), dtype=torch.float32)


def _mmsd_backward_fake(grad, rgb, flow, fused, row_stats, count, temperature):
    _checks.same_device("rgb", rgb, grad=grad, flow=flow, fused=fused, row_stats=row_stats, count=count)
    return rgb.new_empty(rgb.shape), rgb.new_empty(rgb.shape), rgb.new_empty(rgb.shape)


def _mmsd_with_grads_fake(rgb, flow, fused, temperature, mask):
    return _mmsd_fake(rgb, flow, fused, temperature, mask) + _mmsd_backward_fake(None, rgb, flow, fused, None, None, None)


def _scale_grads_fake(grad, row_stats, grad_rgb, grad_flow, grad_fused):
    _checks.same_device("grad", grad, row_stats=row_stats, grad_rgb=grad_rgb, grad_flow=grad_flow, grad_fused=grad_fused)
    return None


# Autograd: the teacher never gets a gradient; MMSD's three inputs each get theirs
# from the one backward call.
def _pair_setup_context(ctx, inputs, output):
    student, teacher, temperature, _mask, reduction = inputs
    _loss, stats, count = output
    ctx.mark_non_differentiable(stats, count)
    ctx.set_materialize_grads(False)  # no zeros for the statistics' absent gradients
    ctx.save_for_backward(student, teacher, stats, count)
    ctx.temperature = temperature
    ctx.reduction = reduction


def _mmsd_setup_context(ctx, inputs, output):
    rgb, flow, fused, temperature, _mask = inputs
    _loss, stats, count = output
    ctx.mark_non_differentiable(stats, count)
    ctx.set_materialize_grads(False)  # no zeros for the statistics' absent gradients
    ctx.save_for_backward(rgb, flow, fused, stats, count)
    ctx.temperature = temperature


def _make_pair_backward(backward_op):
    def backward(ctx, grad, _grad_stats, _grad_count):
        student, teacher, stats, count = ctx.saved_tensors
        grad_student = None
        if grad is not None and ctx.needs_input_grad[0]:
            grad_student = backward_op(grad, student, teacher, stats, count, ctx.temperature, ctx.reduction)
        return grad_student, None, None, None, None

    return backward


def _make_mmsd_backward(backward_op):
    def backward(ctx, grad, _grad_stats, _grad_count):
        rgb, flow, fused, stats, count = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        grads = backward_op(grad, rgb, flow, fused, stats, count, ctx.temperature)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])) + (None, None)

    return backward


def _register_compiled():
    # The compiled ops' autograd is C++ (csrc/autograd.cpp: the same saved tensors
    # and backward as the Triton ops' Python autograd above, without its overhead).
    lib = "mmsd_ext::"
    torch.library.register_fake(lib + "snippet_distill_loss")(_pair_fake)
    torch.library.register_fake(lib + "_snippet_distill_loss_backward")(_pair_backward_fake)
    torch.library.register_fake(lib + "mmsd_distill_loss")(_mmsd_fake)
    torch.library.register_fake(lib + "_mmsd_distill_loss_backward")(_mmsd_backward_fake)
    torch.library.register_fake(lib + "_mmsd_distill_loss_with_grads")(_mmsd_with_grads_fake)
    torch.library.register_fake(lib + "_distill_scale_grads_")(_scale_grads_fake)


# The Triton ops need no compiled extension; triton itself is imported on first use.
@torch.library.custom_op("mmsd_ext::snippet_distill_loss_triton", mutates_args=())
def _snippet_distill_loss_triton(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: Optional[torch.Tensor], reduction: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels import distill as kernels

    return kernels.snippet_distill_forward(student, teacher, temperature, mask, reduction)


@torch.library.custom_op("mmsd_ext::_snippet_distill_loss_triton_backward", mutates_args=())
def _snippet_distill_loss_triton_backward(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_stats: torch.Tensor,
    count: torch.Tensor,
    temperature: float,
    reduction: int,
) -> torch.Tensor:
    from .kernels import distill as kernels

    return kernels.snippet_distill_backward(grad, student, teacher, row_stats, count, temperature, reduction)


@torch.library.custom_op("mmsd_ext::mmsd_distill_loss_triton", mutates_args=())
def _mmsd_distill_loss_triton(
    rgb: torch.Tensor, flow: torch.Tensor, fused: torch.Tensor, temperature: float, mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels import distill as kernels

    return kernels.mmsd_distill_forward(rgb, flow, fused, temperature, mask)


@torch.library.custom_op("mmsd_ext::_mmsd_distill_loss_triton_backward", mutates_args=())
def _mmsd_distill_loss_triton_backward(
    grad: torch.Tensor,
    rgb: torch.Tensor,
    flow: torch.Tensor,
    fused: torch.Tensor,
    row_stats: torch.Tensor,
    count: torch.Tensor,
    temperature: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels import distill as kernels

    return kernels.mmsd_distill_backward(grad, rgb, flow, fused, row_stats, count, temperature)


_snippet_distill_loss_triton.register_fake(_pair_fake)
_snippet_distill_loss_triton_backward.register_fake(_pair_backward_fake)
_mmsd_distill_loss_triton.register_fake(_mmsd_fake)
_mmsd_distill_loss_triton_backward.register_fake(_mmsd_backward_fake)
_snippet_distill_loss_triton.register_autograd(
    _make_pair_backward(_snippet_distill_loss_triton_backward), setup_context=_pair_setup_context
)
_mmsd_distill_loss_triton.register_autograd(
    _make_mmsd_backward(_mmsd_distill_loss_triton_backward), setup_context=_mmsd_setup_context
)

_PAIR_IMPLS = {
    "reference": snippet_distill_loss_reference,
    "cpu": _pair_compiled,
    "cuda": _pair_compiled,
    "triton": _pair_triton,
}
_PAIR_SUPPORTED = ("reference", "cpu", "cuda", "triton")
_MMSD_IMPLS = {
    "reference": mmsd_distill_loss_reference,
    "cpu": _mmsd_compiled,
    "cuda": _mmsd_compiled,
    "triton": _mmsd_triton,
}
_MMSD_SUPPORTED = ("reference", "cpu", "cuda", "triton")

# Fake kernels and autograd only for ops that exist: a missing or mismatched
# extension must not break `import mmsd_ext`.
if _loader.compiled_available():
    _register_compiled()
