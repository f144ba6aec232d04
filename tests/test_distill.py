"""snippet_distill_loss and mmsd_distill_loss: every backend against the float64 reference.

The oracle is the plain reference run on float64 copies of the inputs. Tolerances
follow flash-attention: a backend's error against the oracle may be at most
MULTIPLE times the error of a baseline, plus a floor of FLOOR times the magnitude
of the terms (TOLERANCES, one row per dtype). The baseline is what a correct
kernel gives: eager PyTorch doing the reference's maths in float32 (as every
backend computes, whatever the input dtype), its gradients rounded once to the
input's dtype. (Eager PyTorch at the input's own precision, the baseline before
2026-11-28, let a float16/bfloat16 kernel doing its maths in that dtype pass.)
That magnitude is, for losses, the loss plus the number of terms log S it sums (a
row's loss is log S_s + D / S_t, both >= 0, and log S of a sum near 1 is good to an
absolute rounding of S), and w / tau for gradients: each is w / tau * (p_student -
p_teacher), a difference of two probabilities each good to a few roundings, which
can be far smaller than either.
"""

import functools
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import HAS_GPU, backend_device
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mmsd_ext
from mmsd_ext import _loader
from mmsd_ext import distill as distill_module

# The Triton interpreter evaluates the kernels with numpy, which warns about the
# intended log(0) = -inf and -inf arithmetic of excluded classes and masked rows, and
# about what tl.where selects away, on both of its sides: exp overflowing in a masked
# row's gradient (its logits against a shift it never took), 0 times inf.
pytestmark = pytest.mark.filterwarnings("ignore:(divide by zero|invalid value|overflow) encountered:RuntimeWarning")

# The oracle: the reference computing in float64 (as a backend it computes in float32).
REFERENCE_PAIR = functools.partial(distill_module.snippet_distill_loss_reference, acc=torch.float64)
REFERENCE_MMSD = functools.partial(distill_module.mmsd_distill_loss_reference, acc=torch.float64)

# dtype: (MULTIPLE of the baseline's error, FLOOR relative to the terms' magnitude).
# float32: 8 units in the last place (2**-21): a probability takes an exp, a product
# and a scaling. The CPU's exp is good to ~1.3 ulp; the GPU's expf to 2 and Triton's
# compiled tl.exp (ex2.approx) to a few more. Every kernel keeps that out of the
# gradients: it recomputes exp(a) exactly as the forward summed it into S and scales
# it by 1 / S (an emulation of the mean-teacher test below with a per-input exp error
# of 1 to 2 ulps: 5.1 ulps of k that way, 9.8 to 10.2 with exp(a - log S), which the
# GPU kernels used before 2026-11-27; the new GPU code is not yet run on a GPU). float16/bfloat16: one unit
# in the last place at 1 (gradients are stored in the dtype). The baseline's error there is
# its one rounding to the dtype, up to half a unit. A correct kernel rounds its float32
# result the same way, half a unit plus float32 noise (2**-21 relative, a thousandth of a
# float16 unit): inside the floor alone. MMSD's gradients that the cpu and cuda forwards
# write, scaled in place by an upstream gradient other than 1, are rounded twice: up to
# 0.87 units for the upstream gradients drawn here (-0.7, 3), still inside. Maths done in
# the dtype errs by several units (MMSD_CASES below).
TOLERANCES = {
    torch.float32: (2.0, 2**-21),
    torch.float64: (2.0, 2**-21),  # computed in float32: oracle and baseline get the float32-rounded input
    torch.float16: (2.0, 2**-10),
    torch.bfloat16: (2.0, 2**-7),
}

# The Triton interpreter takes milliseconds per program: fewer, smaller cases there.
INTERPRETED = not HAS_GPU


def _examples(backend):
    """The profile's example count (20 in "ci", 100 in "dev"), two fifths of it for the
    interpreted Triton kernels."""
    n = settings.default.max_examples
    return max(2, n * 2 // 5) if backend == "triton" and INTERPRETED else n


# ----------------------------------------------------------------- helpers
def _baseline_pair(student, teacher, tau, mask, reduction):
    """The reference's maths in float32 whatever the input dtype; autograd rounds the
    gradient once to the input's dtype (the cast back of student.to(float32))."""
    return distill_module.snippet_distill_loss_reference(student, teacher, tau, mask, reduction, acc=torch.float32)


def _baseline_mmsd(rgb, flow, fused, tau, mask):
    return distill_module.mmsd_distill_loss_reference(rgb, flow, fused, tau, mask, acc=torch.float32)


def _loss_and_grads(fn, inputs, grad_out_scale, needs_grad):
    """fn(*inputs) and the gradients of (grad_out * fn(...)).sum() for the inputs in needs_grad."""
    leaves = [x.detach().clone().requires_grad_(need) for x, need in zip(inputs, needs_grad)]
    loss = fn(*leaves)
    grad_out = torch.full_like(loss, grad_out_scale)
    if loss.dim() > 0:  # reduction "none": a different weight per row
        grad_out = grad_out * torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype, device=loss.device).view(
            loss.shape
        )
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, grad_out)
    return loss.detach(), [g.detach() for g in grads]


def _max_err(value, oracle):
    diff = (value.detach().double().cpu() - oracle.detach().double().cpu()).abs()
    return diff.max().item() if diff.numel() else 0.0


def _finite_max_abs(x):
    x = x.detach().double().cpu()
    x = x[torch.isfinite(x)]
    return x.abs().max().item() if x.numel() else 0.0


def _assert_close(value, oracle, baseline, dtype, what, scale=None):
    """Flash-attention style: |value - oracle| <= MULTIPLE * |baseline - oracle| + FLOOR * scale.

    scale: the magnitude of the terms (default: max |oracle| over its finite values).
    Where the oracle is not finite, value must be the same inf, or NaN.
    """
    multiple, floor = TOLERANCES[dtype]
    oracle = oracle.detach().double().cpu()
    value = value.detach().double().cpu()
    assert value.shape == oracle.shape, what
    assert torch.equal(torch.isfinite(value), torch.isfinite(oracle)), f"{what}: finiteness differs"
    finite = torch.isfinite(oracle)
    if not finite.all():
        v, o = value[~finite], oracle[~finite]
        assert torch.equal(v.isnan(), o.isnan()), f"{what}: NaN where the oracle is inf, or inf where it is NaN"
        assert torch.equal(v[~v.isnan()], o[~o.isnan()]), f"{what}: infinities of another sign"
    value, oracle, baseline = value[finite], oracle[finite], baseline.detach().double().cpu()[finite]
    baseline_err = _max_err(baseline, oracle)
    if not math.isfinite(baseline_err):
        baseline_err = 0.0  # the baseline overflowed in the dtype: only the floor applies
    if scale is None:
        scale = _finite_max_abs(oracle)
    bound = multiple * baseline_err + floor * max(scale, 1e-30)
    err = _max_err(value, oracle)
    assert err <= bound, (f"{what}: error {err:.3g} > bound {bound:.3g} "
                          f"(baseline error {baseline_err:.3g}, scale {scale:.3g})")


def _oracle_input(x):
    """x in float64 for the oracle; float64 input as the compiled backends see it (rounded to float32)."""
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.float64 else x).double()


def _baseline_input(x):
    """x for the baseline as the backends see it (float64 input: rounded to float32)."""
    x = x.detach().cpu()
    return x.float() if x.dtype == torch.float64 else x


def _valid_rows(shape, mask):
    return math.prod(shape[:-1]) if mask is None else int(mask.bool().sum())


def _make_logits(gen, shape, scale):
    """Random float64 logits on the CPU; edge values go in before _finish."""
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _finish(x, dtype, device, layout):
    """x in dtype on device, in one of three memory layouts (the values unchanged)."""
    x = x.to(dtype).to(device)
    if layout == "transposed" and x.dim() >= 3:
        # [B, T, C] as the transpose of a [T, B, C] tensor (rows not evenly strided)
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":
        # every other class of a wider tensor (class stride 2); NaN in the gaps
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=dtype, device=device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _make_mask(gen, leading, kind):
    if kind is None:
        return None
    valid = torch.rand(leading, generator=gen) < 0.7
    return valid if kind == "bool" else valid.float()


def _pad_masked_rows(xs, mask, value):
    """Masked-out rows filled with value (-inf or NaN padding): they must still give 0."""
    if mask is None or value is None:
        return xs
    out = ~mask.bool()[..., None]
    return [x.masked_fill(out, value) for x in xs]


@st.composite
def cases(draw, small):
    """Shapes, temperature, mask and the padding of its masked rows, reduction, value scale,
    layout, -inf entries."""
    if small:
        leading = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
        num_classes = draw(st.sampled_from([1, 2, 7, 21, 33]))
    else:
        leading = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
        num_classes = draw(st.sampled_from([1, 2, 5, 16, 17, 21, 101, 201, 1100]))
    return dict(
        shape=(*leading, num_classes),
        # The small temperatures (MMSD's 0.2), which magnify every rounding by 1 / tau, as
        # often as the large ones; drawn from a list, as hypothesis's floats come out at a
        # bound (here tau = 1) in about half the examples.
        tau=draw(st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0])),
        mask=draw(st.sampled_from([None, "bool", "float"])),
        padding=draw(st.sampled_from([None, None, float("-inf"), float("nan")])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        scale=draw(st.sampled_from([0.1, 1.0, 5.0, 30.0])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        neg_inf=draw(st.sampled_from([0.0, 0.0, 0.3])),
        grad_out=draw(st.sampled_from([1.0, -0.7, 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _pair_inputs(case, dtype, device):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = case["shape"]
    student = _make_logits(gen, shape, case["scale"])
    teacher = _make_logits(gen, shape, case["scale"])
    if case["neg_inf"]:
        # Excluded classes in the teacher, and rows without a target (all -inf). The
        # student is -inf at some excluded classes too, never in class 0 of a row
        # with a target (a student row of only -inf against a target is NaN), and
        # all -inf in some rows without a target (their loss and gradient are 0).
        no_target = torch.rand(shape[:-1], generator=gen) < 0.2
        drop = (torch.rand(shape, generator=gen) < case["neg_inf"]) | no_target[..., None]
        both = drop & (torch.rand(shape, generator=gen) < 0.5)
        both[..., 0] = False
        both |= (no_target & (torch.rand(shape[:-1], generator=gen) < 0.5))[..., None]
        teacher = teacher.masked_fill(drop, float("-inf"))
        student = student.masked_fill(both, float("-inf"))
    mask = _make_mask(gen, shape[:-1], case["mask"])
    student, teacher = _pad_masked_rows([student, teacher], mask, case["padding"])
    student, teacher = (_finish(x, dtype, device, case["layout"]) for x in (student, teacher))
    return student, teacher, None if mask is None else mask.to(device)


def _check_pair_case(backend, case, dtype):
    student, teacher, mask = _pair_inputs(case, dtype, backend_device(backend))
    _check_pair(backend, student, teacher, mask, case["tau"], case["reduction"], case["grad_out"])


def _check_pair(backend, student, teacher, mask, tau, reduction, grad_out):
    """The backend's loss and student gradient on these inputs against the oracle
    (the tolerance row of student's dtype)."""

    def run(s, t):
        return mmsd_ext.snippet_distill_loss(s, t, tau, mask=mask, reduction=reduction, backend=backend)

    loss, (grad,) = _loss_and_grads(run, (student, teacher), grad_out, (True, False))
    _assert_pair_matches_oracle(loss, grad, student, teacher, mask, tau, reduction, grad_out)


def _assert_pair_matches_oracle(loss, grad, student, teacher, mask, tau, reduction, grad_out):
    """loss and grad (of grad_out * loss, see _loss_and_grads) against the oracle and the baseline."""
    dtype = student.dtype
    cpu_mask = None if mask is None else mask.cpu()

    def oracle(s, t):
        return REFERENCE_PAIR(s, t, tau, cpu_mask, reduction)

    def baseline(s, t):
        return _baseline_pair(s, t, tau, cpu_mask, reduction)

    as64 = [_oracle_input(x) for x in (student, teacher)]
    ref_loss, (ref_grad,) = _loss_and_grads(oracle, as64, grad_out, (True, False))
    seen = [_baseline_input(x) for x in (student, teacher)]
    base_loss, (base_grad,) = _loss_and_grads(baseline, seen, grad_out, (True, False))
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    terms = _valid_rows(student.shape, mask) if reduction == "sum" else 1
    _assert_close(loss, ref_loss, base_loss, dtype, "loss", scale=_finite_max_abs(ref_loss) + terms)
    weight = abs(grad_out) * (2.0 if reduction == "none" else 1.0)  # max |grad_out| of a row
    if reduction == "mean":
        weight /= max(_valid_rows(student.shape, mask), 1)
    _assert_close(grad, ref_grad, base_grad, dtype, "grad student", scale=weight / tau)


def _mmsd_inputs(case, dtype, device):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = case["shape"]
    xs = [_make_logits(gen, shape, case["scale"]) for _ in range(3)]
    if case["neg_inf"]:
        # Classes excluded in every stream, never class 0; more excluded in rgb and
        # flow only (the mean teacher is -inf there, the fused student finite); and
        # rows where rgb and flow are all -inf (no term of the row has a target).
        # rgb and flow share their -inf entries, so every term stays finite.
        drop = torch.rand(shape, generator=gen) < case["neg_inf"]
        drop[..., 0] = False
        no_target = torch.rand(shape[:-1], generator=gen) < 0.2
        streams = drop | (torch.rand(shape, generator=gen) < case["neg_inf"]) | no_target[..., None]
        xs[0] = xs[0].masked_fill(streams, float("-inf"))
        xs[1] = xs[1].masked_fill(streams, float("-inf"))
        xs[2] = xs[2].masked_fill(drop, float("-inf"))
    mask = _make_mask(gen, shape[:-1], case["mask"])
    xs = [_finish(x, dtype, device, case["layout"]) for x in _pad_masked_rows(xs, mask, case["padding"])]
    return xs, None if mask is None else mask.to(device)


def _check_mmsd_case(backend, case, dtype):
    xs, mask = _mmsd_inputs(case, dtype, backend_device(backend))
    _check_mmsd(backend, xs, mask, case["tau"], case["grad_out"])


def _check_mmsd(backend, xs, mask, tau, grad_out):
    """The backend's loss and three gradients on these inputs against the oracle. On cpu
    and cuda the first backward hands over the gradients the forward wrote; a second one
    (retain_graph) recomputes them in the backward kernels, checked too."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    loss = mmsd_ext.mmsd_distill_loss(*leaves, tau, mask=mask, backend=backend)
    upstream = torch.full_like(loss, grad_out)
    grads = torch.autograd.grad(loss, leaves, upstream, retain_graph=backend != "triton")
    oracle = _assert_mmsd_matches_oracle(loss.detach(), grads, xs, mask, tau, grad_out)
    if backend != "triton":  # the Triton backend always recomputes
        recomputed = torch.autograd.grad(loss, leaves, upstream)
        _assert_mmsd_matches_oracle(loss.detach(), recomputed, xs, mask, tau, grad_out, oracle=oracle)


def _assert_mmsd_matches_oracle(loss, grads, xs, mask, tau, grad_out, oracle=None):
    """loss and the gradients of grad_out * loss against the oracle and the baseline.
    Returns what it compared against, to pass as ``oracle`` for the same inputs again."""
    dtype = xs[0].dtype
    if oracle is None:
        cpu_mask = None if mask is None else mask.cpu()
        oracle = _loss_and_grads(
            lambda r, f, u: REFERENCE_MMSD(r, f, u, tau, cpu_mask),
            [_oracle_input(x) for x in xs], grad_out, (True, True, True),
        ) + _loss_and_grads(
            lambda r, f, u: _baseline_mmsd(r, f, u, tau, cpu_mask),
            [_baseline_input(x) for x in xs], grad_out, (True, True, True),
        )
    ref_loss, ref_grads, base_loss, base_grads = oracle
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _assert_close(loss, ref_loss, base_loss, dtype, "loss", scale=_finite_max_abs(ref_loss) + 3)
    weight = abs(grad_out) / max(_valid_rows(xs[0].shape, mask), 1)
    for name, g, ref, bg in zip(("rgb", "flow", "fused"), grads, ref_grads, base_grads):
        assert g.dtype == dtype
        _assert_close(g, ref, bg, dtype, f"grad {name}", scale=weight / tau)
    return oracle


# --------------------------------------------------- property tests, float32
def test_pair_matches_reference(backend):
    @settings(max_examples=_examples(backend))
    @given(case=cases(small=backend == "triton" and INTERPRETED))
    def check(case):
        _check_pair_case(backend, case, torch.float32)

    check()


def test_mmsd_matches_reference(backend):
    @settings(max_examples=_examples(backend))
    @given(case=cases(small=backend == "triton" and INTERPRETED))
    def check(case):
        _check_mmsd_case(backend, case, torch.float32)

    check()


# ------------------------------------------- low precision, flash-attention style
# MMSD's own setting, at two of its class counts: tau = 0.2 with logits up to about 20.
# The pair's gradient from maths done in float16 (first) or bfloat16 (second) instead of
# float32 is off by 2.8 and 1.8 units at its magnitude there; the cpu kernel's by 0.2.
MMSD_CASES = [
    dict(shape=(2, 6, 21), tau=0.2, mask="bool", padding=float("-inf"), reduction="mean", scale=5.0,
         layout="contiguous", neg_inf=0.0, grad_out=1.0, seed=1),
    dict(shape=(2, 3, 201), tau=0.2, mask=None, padding=None, reduction="none", scale=5.0,
         layout="transposed", neg_inf=0.3, grad_out=-0.7, seed=2),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_dtypes_within_tolerance_table(backend, dtype):
    @settings(max_examples=max(4, _examples(backend) // 2))
    @given(case=cases(small=backend == "triton" and INTERPRETED))
    @example(case=MMSD_CASES[0])
    @example(case=MMSD_CASES[1])
    def check(case):
        _check_pair_case(backend, case, dtype)
        _check_mmsd_case(backend, case, dtype)

    check()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_loss_is_float32_maths_whatever_the_input_dtype(any_backend, dtype):
    """A float32 loss, as close to the oracle as float32 maths on the inputs' values
    (float64 inputs rounded to float32) allows: the float32 row of the table, eager
    PyTorch at float32 the baseline. MMSD's mean teacher is among that maths: formed
    in float32, not rounded to the input's dtype first."""
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(43)
    xs = [_finish(torch.randn(64, 21, generator=gen, dtype=torch.float64) * 5, dtype, device, "contiguous")
          for _ in range(3)]
    tau = 0.2
    as32 = [x.detach().cpu().float() for x in xs]
    as64 = [x.double() for x in as32]
    for reduction in ("none", "sum"):
        loss = mmsd_ext.snippet_distill_loss(xs[0], xs[1], tau, reduction=reduction, backend=any_backend)
        oracle = REFERENCE_PAIR(as64[0], as64[1], tau, None, reduction)
        eager = _baseline_pair(as32[0], as32[1], tau, None, reduction)
        assert loss.dtype == torch.float32
        terms = 64 if reduction == "sum" else 1
        _assert_close(loss, oracle, eager, torch.float32, f"loss {reduction}", scale=_finite_max_abs(oracle) + terms)
    loss = mmsd_ext.mmsd_distill_loss(*xs, tau, backend=any_backend)
    oracle = REFERENCE_MMSD(*as64, tau, None)
    assert loss.dtype == torch.float32
    _assert_close(loss, oracle, _baseline_mmsd(*as32, tau, None), torch.float32, "mmsd loss",
                  scale=oracle.item() + 3)


def test_mixed_dtypes_are_promoted(backend):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(4, 21, generator=gen).to(device, torch.float16).requires_grad_()
    teacher = torch.randn(4, 21, generator=gen).to(device)
    loss = mmsd_ext.snippet_distill_loss(student, teacher, 0.5, backend=backend)
    loss.backward()
    ref = REFERENCE_PAIR(student.detach().double().cpu(), teacher.double().cpu(), 0.5, None, "mean")
    assert student.grad.dtype == torch.float16
    assert abs(loss.item() - ref.item()) <= 1e-5 * (1 + abs(ref.item()))
    # The wider dtype first, and three dtypes with the widest in the middle: the common
    # dtype is promoted from all of them, not taken from the last.
    student = torch.randn(4, 21, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(4, 21, generator=gen).to(device, torch.float16)
    loss = mmsd_ext.snippet_distill_loss(student, teacher, 0.5, backend=backend)
    loss.backward()
    ref_student = student.detach().double().cpu().requires_grad_()
    ref = REFERENCE_PAIR(ref_student, teacher.double().cpu(), 0.5, None, "mean")
    ref.backward()
    assert student.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5 * (1 + abs(ref.item()))
    torch.testing.assert_close(student.grad.double().cpu(), ref_student.grad, rtol=1e-4, atol=1e-6)
    xs = [torch.randn(4, 21, generator=gen).to(device, dt).requires_grad_()
          for dt in (torch.float16, torch.float32, torch.bfloat16)]
    loss = mmsd_ext.mmsd_distill_loss(*xs, 0.5, backend=backend)
    loss.backward()
    ref = REFERENCE_MMSD(*(x.detach().double().cpu() for x in xs), 0.5, None)
    assert [x.grad.dtype for x in xs] == [torch.float16, torch.float32, torch.bfloat16]
    assert abs(loss.item() - ref.item()) <= 1e-5 * (1 + abs(ref.item()))


def test_class_strided_inputs_and_a_strided_mask(any_backend):
    """Fixed small cases of layouts the property tests draw only now and then (the Triton
    ones under the interpreter draw few examples): a class stride of 2, and a 1-d mask that is
    every other element of a longer one."""
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(0)
    x, t, u = (torch.randn(3, 5, 21, generator=gen).to(device) for _ in range(3))
    student = _finish(x, x.dtype, device, "strided").requires_grad_()
    loss = mmsd_ext.snippet_distill_loss(student, _finish(t, t.dtype, device, "strided"), 0.5, backend=any_backend)
    loss.backward()
    ref_student = x.double().cpu().requires_grad_()
    ref = REFERENCE_PAIR(ref_student, t.double().cpu(), 0.5, None, "mean")
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * (1 + abs(ref.item()))
    torch.testing.assert_close(student.grad.double().cpu(), ref_student.grad, rtol=1e-4, atol=1e-6)
    got = mmsd_ext.mmsd_distill_loss(*(_finish(v, v.dtype, device, "strided") for v in (x, t, u)), 0.5, backend=any_backend)
    ref = REFERENCE_MMSD(x.double().cpu(), t.double().cpu(), u.double().cpu(), 0.5, None)
    assert abs(got.item() - ref.item()) <= 1e-5 * (1 + abs(ref.item()))

    s, t = (torch.randn(9, 7, generator=gen).to(device) for _ in range(2))
    wide = torch.zeros(18, dtype=torch.bool, device=device)
    wide[::2] = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    mask = wide[::2]
    for reduction in ("none", "mean"):
        got = mmsd_ext.snippet_distill_loss(s, t, 0.5, mask=mask, reduction=reduction, backend=any_backend)
        ref = REFERENCE_PAIR(s.double().cpu(), t.double().cpu(), 0.5, mask.cpu().contiguous(), reduction)
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    got = mmsd_ext.mmsd_distill_loss(s, t, s * 0.5, 0.5, mask=mask, backend=any_backend)
    ref = REFERENCE_MMSD(s.double().cpu(), t.double().cpu(), s.double().cpu() * 0.5, 0.5, mask.cpu().contiguous())
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- wide rows
@pytest.mark.parametrize("num_classes", [1100, 4096])
def test_wide_rows_use_the_looped_path(backend, num_classes):
    if backend == "triton" and INTERPRETED and num_classes > 1100:
        pytest.skip("one wide case is enough under the interpreter")
    case = dict(shape=(2, num_classes), tau=0.7, mask=None, padding=None, reduction="sum", scale=4.0,
                layout="contiguous", neg_inf=0.1, grad_out=1.3, seed=11)
    _check_pair_case(backend, case, torch.float32)
    _check_mmsd_case(backend, case, torch.float32)


# Both sides of each change of row layout in the CUDA kernels (8 lanes x 4 values
# up to 32 classes, 16 x 4 up to 64, a warp x 4, 8 or 16 up to 512, looped beyond),
# of the CPU's vector widths and of Triton's one-tile blocks (BLOCK_C 32 to 1024, which
# the interpreted property tests never reach; the ten widths take a few seconds there),
# with -inf entries, a mask (-inf or NaN in its masked rows) and a strided layout.
@pytest.mark.parametrize("num_classes", [32, 33, 64, 65, 128, 129, 256, 257, 512, 513])
def test_row_layout_boundaries(backend, num_classes):
    for reduction, mask, padding in (("none", "bool", float("-inf")), ("mean", "float", float("nan"))):
        case = dict(shape=(3, 5, num_classes), tau=0.5, mask=mask, padding=padding, reduction=reduction, scale=5.0,
                    layout="strided", neg_inf=0.3, grad_out=-0.7, seed=num_classes)
        _check_pair_case(backend, case, torch.float32)
        _check_mmsd_case(backend, case, torch.float32)


# ------------------------------------------------------------- edge values
NEG_INF = float("-inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tau", [0.1, 10.0])
def test_large_logits_match_the_oracle(any_backend, dtype, tau):
    """Logits of magnitude 1e4, with -inf teacher entries among them: finite, and as
    accurate as the tolerance table asks, loss and gradients."""
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(5)
    shape = (4, 21)
    xs = [(torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4 for _ in range(3)]
    xs[1][0] = xs[0][0]  # one row where two streams agree exactly
    # Excluded classes: a few in row 1, and in row 2 the class of the student's (rgb's)
    # largest logit, so the student's shift is not at any class the teacher keeps.
    excluded = torch.zeros(shape, dtype=torch.bool)
    excluded[1, 3:9] = True
    excluded[2, xs[0][2].argmax()] = True
    teacher = xs[1].masked_fill(excluded, NEG_INF)
    student = _finish(xs[0], dtype, device, "contiguous")
    for reduction, grad_out in (("none", 1.0), ("mean", -0.7)):
        _check_pair(any_backend, student, _finish(teacher, dtype, device, "contiguous"), None, tau, reduction, grad_out)
    # MMSD: rgb and flow share their -inf entries (each term stays finite); fused is
    # finite everywhere, so the mean teacher excludes classes the fused student has.
    streams = [xs[0].masked_fill(excluded, NEG_INF), teacher, xs[2]]
    _check_mmsd(any_backend, [_finish(x, dtype, device, "contiguous") for x in streams], None, tau, 1.0)


@pytest.mark.parametrize("spread", [1.0, 5.0, 10.0, 30.0])
def test_mean_teacher_is_exact_where_the_streams_disagree(backend, spread):
    """MMSD's third teacher (rgb + flow) / 2 to a few ulps of the probabilities, without
    eager PyTorch as the yardstick (which at these sizes is sometimes lucky, sometimes
    off by tens of ulps): logits of spread 1 to 30 at tau = 0.15 put the rows on both
    sides of the CPU's paired identity (kMaxPairedExponent in csrc/distill_math.h; at
    spread 30 most rows have delta > 50). fused's gradient is k (p_fused - p_avg),
    k = 1 / (rows tau): within 2**-21 k of the float64 oracle."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(59)
    tau, rows = 0.15, 256
    xs = [(torch.randn(rows, 21, generator=gen) * spread).to(device).requires_grad_() for _ in range(3)]
    mmsd_ext.mmsd_distill_loss(*xs, tau, backend=backend).backward()
    ref = [x.detach().cpu().double().requires_grad_() for x in xs]
    distill_module.mmsd_distill_loss_reference(*ref, tau, None, acc=torch.float64).backward()
    k = 1 / (rows * tau)
    for name, x, r in zip(("rgb", "flow", "fused"), xs, ref):
        err = (x.grad.cpu().double() - r.grad).abs().max().item()
        assert err <= 2**-21 * k, f"grad {name}: {err / (2**-24 * k):.1f} ulps of k"


def test_neg_inf_teacher_entries_and_rows(any_backend):
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(5, 6, generator=gen)
    teacher = torch.randn(5, 6, generator=gen)
    teacher[0, 1] = NEG_INF  # excluded class
    student[0, 1] = NEG_INF  # ... where the student is -inf too: adds 0, not NaN
    teacher[1, :] = NEG_INF  # no target at all: loss 0, gradient 0
    teacher[2, :5] = NEG_INF  # a single target class
    teacher[3, :] = NEG_INF  # no target, and a student of only -inf: loss 0, gradient 0
    student[3, :] = NEG_INF
    s, t = student.to(device), teacher.to(device)
    rows, (g,) = _loss_and_grads(
        lambda a, b: mmsd_ext.snippet_distill_loss(a, b, 0.5, reduction="none", backend=any_backend), (s, t), 1.0,
        (True, False),
    )
    assert torch.isfinite(rows).all() and torch.isfinite(g).all()
    for row in (1, 3):
        assert rows[row].item() == 0.0 and torch.all(g[row] == 0)
    _assert_pair_matches_oracle(rows, g, s, t, None, 0.5, "none", 1.0)
    # the rows without a target still count for "mean"
    _check_pair(any_backend, s, t, None, 0.5, "mean", 1.0)
    mean = mmsd_ext.snippet_distill_loss(s, t, 0.5, backend=any_backend)
    assert torch.allclose(mean.double().cpu(), rows.double().cpu().sum() / 5, rtol=1e-6)


def test_mmsd_neg_inf_in_rgb_and_flow_only(any_backend):
    """-inf where the fused stream is finite: the mean teacher excludes the class; rows
    where rgb and flow are all -inf have no target in any term (loss 0, no gradient)."""
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(19)
    rgb, flow, fused = [torch.randn(5, 7, generator=gen) * 3 for _ in range(3)]
    for x in (rgb, flow):
        x[0, 1:3] = NEG_INF  # excluded in rgb and flow, fused finite there
        x[1, :] = NEG_INF  # rgb and flow all -inf, fused finite
        x[2, :] = NEG_INF  # ... and fused all -inf too
    fused[2, :] = NEG_INF
    fused[3, 4] = NEG_INF  # a -inf in fused alone: the mean teacher keeps the class, the loss is inf
    xs = [x.to(device) for x in (rgb, flow, fused)]
    mask = torch.tensor([True, True, True, False, True], device=device)  # row 3 masked out: finite loss
    loss, grads = _loss_and_grads(
        lambda r, f, u: mmsd_ext.mmsd_distill_loss(r, f, u, 0.5, mask=mask, backend=any_backend), xs, 1.0,
        (True, True, True),
    )
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    for g in grads:
        assert torch.all(g[1:4] == 0)
    assert torch.all(grads[2][0, 1:3] > 0)  # fused is pushed down where the mean teacher is -inf
    _assert_mmsd_matches_oracle(loss, grads, xs, mask, 0.5, 1.0)
    # Unmasked, fused's -inf under a finite mean teacher makes the loss +inf (its gradient stays finite).
    loss, grads = _loss_and_grads(
        lambda r, f, u: mmsd_ext.mmsd_distill_loss(r, f, u, 0.5, backend=any_backend), xs, 1.0, (True, True, True)
    )
    assert loss.item() == float("inf")
    _assert_mmsd_matches_oracle(loss, grads, xs, None, 0.5, 1.0)


@pytest.mark.parametrize("dead", ["rgb", "flow"])
def test_mmsd_one_of_rgb_and_flow_all_neg_inf_in_a_row(any_backend, dead):
    """A row where only one of rgb and flow is all -inf: the term it teaches has no target,
    so the other stream gets no gradient there, and the mean teacher is all -inf, so fused
    gets none either. The dead stream, a student with no distribution under a finite
    teacher, makes its term, and so the loss, NaN. Other rows are untouched. (Each gradient
    is gated by its own term's teacher.)"""
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(29)
    xs = [torch.randn(3, 6, generator=gen) for _ in range(3)]
    d = ("rgb", "flow").index(dead)
    xs[d][1, :] = NEG_INF
    xs = [x.to(device) for x in xs]
    loss, grads = _loss_and_grads(
        lambda r, f, u: mmsd_ext.mmsd_distill_loss(r, f, u, 0.5, backend=any_backend), xs, 1.0, (True, True, True)
    )
    assert math.isnan(loss.item()) and torch.isnan(grads[d][1]).all()
    assert torch.all(grads[1 - d][1] == 0) and torch.all(grads[2][1] == 0)
    assert all(torch.isfinite(g[[0, 2]]).all() for g in grads)
    _assert_mmsd_matches_oracle(loss, grads, xs, None, 0.5, 1.0)
    # The single pair alike: the dead student's row is NaN, the others are not.
    student = xs[d].detach().clone().requires_grad_()
    rows = mmsd_ext.snippet_distill_loss(student, xs[1 - d], 0.5, reduction="none", backend=any_backend)
    (g,) = torch.autograd.grad(rows.sum(), student)
    assert torch.isnan(rows[1]) and torch.isnan(g[1]).all()
    assert torch.isfinite(rows[[0, 2]]).all() and torch.isfinite(g[[0, 2]]).all()


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "cuda", "triton"])
def test_mmsd_wide_rows_where_the_mean_teacher_exceeds_both_streams(backend_name):
    """C = 1500 takes Triton's looped path. rgb = 0 and flow = 100 (101 at one class): the
    mean teacher's maximum (50.5) lies far above rgb's (0), by more than 88 tau, so a shift
    of the mean teacher's exponentials by rgb's maximum alone would overflow them."""
    if backend_name not in mmsd_ext.available_backends():
        pytest.skip(f"{backend_name} backend not available")
    device = backend_device(backend_name)
    gen = torch.Generator().manual_seed(31)
    C = 1500
    rgb = torch.zeros(2, C)
    flow = torch.full((2, C), 100.0)
    flow[:, 7] = 101.0
    fused = torch.randn(2, C, generator=gen)
    xs = [x.to(device) for x in (rgb, flow, fused)]
    loss, grads = _loss_and_grads(
        lambda r, f, u: mmsd_ext.mmsd_distill_loss(r, f, u, 0.5, backend=backend_name), xs, 1.0, (True, True, True)
    )
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    _assert_mmsd_matches_oracle(loss, grads, xs, None, 0.5, 1.0)


@pytest.mark.parametrize("gap", [88.0, 95.0, 103.5])
def test_a_tiny_teacher_probability_over_a_neg_inf_student_class_makes_the_loss_inf(any_backend, gap):
    """A teacher probability of exp(-gap), a float32 subnormal (gap in (87.3, 104)), where
    the student's class is -inf: the cross-entropy is +inf, as the reference gives. Before
    2026-11-27 the cpu kernel's exp flushed it to 0 and gave a finite loss (41.39 in the
    mmsd case below); a review of the CUDA code found the difference, where expf keeps it."""
    device = backend_device(any_backend)
    student = torch.tensor([[0.0, NEG_INF], [0.0, 1.0]], device=device)
    teacher = torch.tensor([[0.0, -gap], [0.0, -gap]], device=device)
    rows = mmsd_ext.snippet_distill_loss(student, teacher, 1.0, reduction="none", backend=any_backend)
    expected = mmsd_ext.snippet_distill_loss(student, teacher, 1.0, reduction="none", backend="reference")
    assert rows[0].item() == float("inf") and expected[0].item() == float("inf")
    torch.testing.assert_close(rows[1], expected[1], rtol=2**-21, atol=0)
    # mmsd: the first term's teacher (flow) is tiny where its student (rgb) is -inf.
    rgb = torch.tensor([[20.0, NEG_INF, 0.0, 0.0]], device=device)
    flow = torch.tensor([[0.0, 20.0 - gap, 20.0, 0.0]], device=device)
    fused = torch.zeros(1, 4, device=device)
    assert mmsd_ext.mmsd_distill_loss(rgb, flow, fused, 1.0, backend=any_backend).item() == float("inf")
    assert mmsd_ext.mmsd_distill_loss(rgb, flow, fused, 1.0, backend="reference").item() == float("inf")
    # The third term: the mean teacher (rgb + flow) / 2 tiny where fused is -inf, in a row whose
    # maxima agree to within 8 tau (delta = 8 here), which the cpu kernel's three-exp identity
    # serves: its exp(a_rgb / 2) flushed to 0 there, and the loss was finite (196.0 at gap 82)
    # until 2026-11-27 (found by a review of the CUDA code, which forms exp(a_avg) directly).
    rgb = torch.tensor([[0.0, -2 * (gap + 8)]], device=device)  # a_avg = -gap at class 1
    flow = torch.tensor([[-16.0, 0.0]], device=device)
    fused = torch.tensor([[0.0, NEG_INF]], device=device)
    assert mmsd_ext.mmsd_distill_loss(rgb, flow, fused, 1.0, backend=any_backend).item() == float("inf")
    assert mmsd_ext.mmsd_distill_loss(rgb, flow, fused, 1.0, backend="reference").item() == float("inf")
    # Where rgb and flow are -inf too, the mean teacher's probability is 0: a finite loss, as the reference's.
    both = [torch.tensor([[0.0, NEG_INF]], device=device) for _ in range(2)]
    got = mmsd_ext.mmsd_distill_loss(*both, fused, 1.0, backend=any_backend)
    torch.testing.assert_close(got, mmsd_ext.mmsd_distill_loss(*both, fused, 1.0, backend="reference"), rtol=2**-21, atol=0)
    assert got.isfinite()


@pytest.mark.parametrize("where", ["student", "teacher", "rgb", "fused"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "+inf"])
def test_nan_and_inf_spoil_only_their_row(any_backend, value, where):
    """NaN or +inf in a row makes that row's loss and the gradients it feeds NaN;
    every other row's loss and gradient stay what the oracle gives."""
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(31)
    xs = [torch.randn(4, 7, generator=gen) * 2 for _ in range(3)]
    bad, others = 2, [0, 1, 3]
    if where in ("student", "teacher"):
        xs[0 if where == "student" else 1][bad, 3] = value
        s, t = xs[0].to(device), xs[1].to(device)
        rows, (g,) = _loss_and_grads(
            lambda a, b: mmsd_ext.snippet_distill_loss(a, b, 0.5, reduction="none", backend=any_backend), (s, t),
            1.0, (True, False),
        )
        assert torch.isnan(rows[bad]) and torch.isfinite(rows[others]).all()
        assert torch.isnan(g[bad]).all() and torch.isfinite(g[others]).all()
        _assert_pair_matches_oracle(rows, g, s, t, None, 0.5, "none", 1.0)
    else:
        # rgb is a student and a teacher, and half the mean teacher: every gradient of
        # its row is NaN. fused is only a student: rgb's and flow's stay finite.
        xs[0 if where == "rgb" else 2][bad, 3] = value
        xs = [x.to(device) for x in xs]
        loss, grads = _loss_and_grads(
            lambda r, f, u: mmsd_ext.mmsd_distill_loss(r, f, u, 0.5, backend=any_backend), xs, 1.0,
            (True, True, True),
        )
        assert torch.isnan(loss)
        for name, g in zip(("rgb", "flow", "fused"), grads):
            assert torch.isfinite(g[others]).all(), name
            assert torch.isnan(g[bad]).all() if where == "rgb" or name == "fused" else torch.isfinite(g[bad]).all()
        _assert_mmsd_matches_oracle(loss, grads, xs, None, 0.5, 1.0)


def test_ties_constant_rows_and_one_class(any_backend):
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(37)
    # Logits on a grid of four values: most rows repeat their maximum.
    xs = [torch.randint(-2, 2, (6, 9), generator=gen).float() * 1.5 for _ in range(3)]
    xs[0][0], xs[1][0] = 2.0, -1.0  # constant student and teacher: loss log C, no gradient
    xs[0][1] = 2.0  # constant student against a tied teacher
    xs[1][2] = 0.5  # constant teacher
    xs[2][3] = xs[0][3]  # (MMSD) fused and rgb tied
    assert all((x == x.max(dim=-1, keepdim=True).values).sum(dim=-1).gt(1).sum() >= 4 for x in xs)
    xs = [x.to(device) for x in xs]
    for reduction, grad_out in (("none", 1.0), ("sum", -0.7), ("mean", 3.0)):
        _check_pair(any_backend, xs[0], xs[1], None, 0.5, reduction, grad_out)
    _check_mmsd(any_backend, xs, None, 0.5, 1.0)
    rows, (g,) = _loss_and_grads(
        lambda a, b: mmsd_ext.snippet_distill_loss(a, b, 0.5, reduction="none", backend=any_backend),
        (xs[0][:1], xs[1][:1]), 1.0, (True, False),
    )
    assert abs(rows.item() - math.log(9)) <= 2**-21 * (1 + math.log(9))
    assert torch.all(g.abs() <= 2**-21 / 0.5)
    # One class: every softmax is 1, so every loss and gradient is exactly 0; a teacher
    # of -inf has no target (0 too). In MMSD rgb and flow are -inf together (alone, one
    # of them would be a student of only -inf against a target: NaN).
    ones = [torch.randn(3, 4, 1, generator=gen).to(device) * 5 for _ in range(3)]
    ones[0][0, 0] = ones[1][0, 0] = NEG_INF
    mask = torch.tensor([[True, False, True, True]] * 3, device=device)
    for reduction in ("none", "sum", "mean"):
        rows, (g,) = _loss_and_grads(
            lambda a, b: mmsd_ext.snippet_distill_loss(a, b, 0.3, mask=mask, reduction=reduction, backend=any_backend),
            (ones[2], ones[1]), 1.0, (True, False),
        )
        assert torch.all(rows == 0) and torch.all(g == 0), reduction
    loss, grads = _loss_and_grads(
        lambda r, f, u: mmsd_ext.mmsd_distill_loss(r, f, u, 0.3, mask=mask, backend=any_backend), ones, 1.0,
        (True, True, True),
    )
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)


def test_student_equal_to_teacher_gives_entropy_and_zero_gradient(any_backend):
    backend = any_backend
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(5, 21, generator=gen) * 4).to(device)
    s = x.clone().requires_grad_()
    tau = 0.3
    rows = mmsd_ext.snippet_distill_loss(s, x, tau, reduction="none", backend=backend)
    (g,) = torch.autograd.grad(rows.sum(), s)
    p = torch.softmax(x.double().cpu() / tau, dim=-1)
    entropy = -(p * torch.log(p)).sum(-1)
    assert torch.allclose(rows.double().cpu(), entropy, rtol=1e-5, atol=1e-6)
    # The compiled kernels compute both probabilities by the same arithmetic, each product
    # rounded (contracted into an fma, p_s - p_t was a product's rounding error, up to 5e-8
    # on the avx2 and avx512 kernels): exactly 0. The reference takes one from
    # log_softmax's backward and one from softmax, each good to a few float32 roundings:
    # the table's floor.
    atol = TOLERANCES[torch.float32][1] / tau if backend == "reference" else 0.0
    assert torch.allclose(g, torch.zeros_like(g), rtol=0, atol=atol)
    # MMSD with three identical streams: three times the mean entropy, no gradient; rgb's
    # and flow's exactly 0 on the compiled kernels (each is k (p_rgb - p_flow)); fused's
    # teacher, the mean of rgb and flow, is formed another way than fused's softmax.
    xs = [x.clone().requires_grad_() for _ in range(3)]
    loss = mmsd_ext.mmsd_distill_loss(*xs, tau, backend=backend)
    grads = torch.autograd.grad(loss, xs)
    assert abs(loss.item() - 3 * entropy.mean().item()) <= 1e-5 * (1 + 3 * entropy.mean().item())
    for i, g in enumerate(grads):
        exact = backend != "reference" and i < 2
        assert torch.allclose(g, torch.zeros_like(g), rtol=0, atol=0.0 if exact else 1e-6), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.1, 1.0, 10.0])
def test_student_equal_to_teacher_in_every_reduction_with_a_mask(any_backend, tau, dtype):
    """The same property across the issue's temperatures, the three reductions, a mask and the
    half dtypes (both inputs rounded alike, so still equal): loss = entropy of the teacher's
    distribution (float32, against float64 on the rounded inputs), gradient 0."""
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(21)
    x = (torch.randn(2, 6, 21, generator=gen) * 4).to(dtype).to(device)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    p = torch.softmax(x.double().cpu() / tau, dim=-1)
    entropy = torch.where(mask, -(p * torch.log(p)).nan_to_num().sum(-1), 0.0)
    expected = {"none": entropy, "sum": entropy.sum(), "mean": entropy.sum() / mask.sum()}
    # The compiled kernels compute both probabilities by the same arithmetic: exactly 0. The
    # reference's two come from log_softmax's backward and from softmax (see the test above).
    atol = TOLERANCES[torch.float32][1] / tau if any_backend == "reference" else 0.0
    for reduction, want in expected.items():
        s = x.clone().requires_grad_()
        out = mmsd_ext.snippet_distill_loss(s, x, tau, mask=mask.to(device), reduction=reduction, backend=any_backend)
        (g,) = torch.autograd.grad(out.sum(), s)
        assert out.dtype == torch.float32 and g.dtype == dtype, reduction
        assert torch.allclose(out.double().cpu(), want, rtol=1e-5, atol=1e-6), reduction
        assert torch.allclose(g.float(), torch.zeros_like(g.float()), rtol=0, atol=atol), reduction


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_all_masked_gives_zero_loss_and_zero_gradient(any_backend, kind):
    device = backend_device(any_backend)
    xs = [torch.randn(2, 3, 7, device=device, requires_grad=True) for _ in range(3)]
    mask = torch.zeros(2, 3, dtype=torch.bool if kind == "bool" else torch.float32, device=device)
    for reduction in ("mean", "sum"):
        loss = mmsd_ext.snippet_distill_loss(xs[0], xs[1], mask=mask, reduction=reduction, backend=any_backend)
        (g,) = torch.autograd.grad(loss, xs[0])
        assert loss.item() == 0.0 and torch.all(g == 0)
    loss = mmsd_ext.mmsd_distill_loss(*xs, mask=mask, backend=any_backend)
    grads = torch.autograd.grad(loss, xs)
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)


def test_empty_leading_dims(any_backend):
    device = backend_device(any_backend)
    xs = [torch.randn(0, 5, device=device, requires_grad=True) for _ in range(3)]
    # Freed NaNs for the loss's allocation to reuse: a loss left unwritten shows (on CUDA,
    # where the caching allocator hands the block back).
    torch.full((128,), float("nan"), device=device)
    loss = mmsd_ext.mmsd_distill_loss(*xs, backend=any_backend)
    loss.backward()
    assert loss.item() == 0.0 and xs[0].grad.shape == (0, 5)
    rows = mmsd_ext.snippet_distill_loss(xs[0], xs[1], reduction="none", backend=any_backend)
    assert rows.shape == (0,) and rows.dtype == torch.float32


def test_sum_and_mean_add_the_row_losses_in_float64(backend):
    """"sum" and "mean" are the float64 sum of the row losses ("none"), rounded once to
    float32: one row's loss near 1e5 among losses near 2, where a float32 sum would
    round away the small ones' low digits."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(41)
    student = torch.randn(256, 7, generator=gen)
    teacher = torch.randn(256, 7, generator=gen)
    student[0] = torch.linspace(-2e4, 2e4, 7)
    teacher[0] = -student[0]
    s, t = student.to(device), teacher.to(device)
    mask = (torch.rand(256, generator=gen) < 0.8).to(device)
    mask[0] = True
    rows = mmsd_ext.snippet_distill_loss(s, t, 0.5, mask=mask, reduction="none", backend=backend).cpu()
    total = rows.double().sum()
    assert rows.sum() != total.float()  # the case can tell the two sums apart
    loss_sum = mmsd_ext.snippet_distill_loss(s, t, 0.5, mask=mask, reduction="sum", backend=backend)
    loss_mean = mmsd_ext.snippet_distill_loss(s, t, 0.5, mask=mask, backend=backend)
    assert loss_sum.item() == total.float().item()
    assert loss_mean.item() == (total / int(mask.sum())).float().item()


# ------------------------------------------------------------------ autograd
def test_retain_graph_second_backward_and_grad_output(backend):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(13)
    xs = [torch.randn(3, 4, 21, generator=gen).to(device).requires_grad_() for _ in range(3)]
    loss = mmsd_ext.mmsd_distill_loss(*xs, 0.2, backend=backend)
    loss.backward(torch.tensor(2.5, device=device), retain_graph=True)
    first = [x.grad.clone() for x in xs]
    loss.backward(torch.tensor(-1.0, device=device))
    ref = [x.detach().double().cpu().requires_grad_() for x in xs]
    ref_grads = torch.autograd.grad(REFERENCE_MMSD(*ref, 0.2, None), ref)
    for x, g1, rg in zip(xs, first, ref_grads):
        assert torch.allclose(g1.double().cpu(), 2.5 * rg, rtol=1e-5, atol=1e-7)
        assert torch.allclose(x.grad.double().cpu(), 1.5 * rg, rtol=1e-5, atol=1e-7)
    s = xs[0].detach().clone().requires_grad_()
    rows = mmsd_ext.snippet_distill_loss(s, xs[1].detach(), reduction="none", backend=backend)
    w = torch.arange(12, dtype=torch.float32, device=device).view(3, 4)
    rows.backward(w, retain_graph=True)
    rows.backward(w)
    s64 = s.detach().double().cpu().requires_grad_()
    (rg,) = torch.autograd.grad(REFERENCE_PAIR(s64, xs[1].detach().double().cpu(), 1.0, None, "none"), s64, w.double().cpu())
    # atol: float32 roundings of w / tau * (p_student - p_teacher), w up to 11
    assert torch.allclose(s.grad.double().cpu(), 2 * rg, rtol=1e-5, atol=2**-21 * 2 * 11)


COMPILED_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _loader.compiled_available(), reason="the compiled extension is not built")),
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU or not _loader.cuda_compiled(), reason="needs the CUDA kernels and a GPU")),
]


def _ops_run(fn):
    """fn() and the names of the mmsd_ext ops it ran (the profiler records every dispatcher op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.name for e in prof.events() if e.name.startswith(("mmsd_ext::", "aten::"))}


@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_from_the_forward_equal_the_recomputed_ones(device, dtype, masked):
    """Training (all three inputs need a gradient) takes the gradients written by the forward;
    a second backward recomputes them from the inputs. With an upstream gradient of 1 the two
    agree bit for bit on the CPU (the same row functions, the same weight); other upstream
    gradients scale the forward's in place, one rounding more than the recomputation."""
    gen = torch.Generator().manual_seed(43)
    C = 37 if device == "cpu" else 600  # cuda: 600 > 512 classes, the looped rows too
    base = [3 * torch.randn(5, 9, C, generator=gen) for _ in range(3)]
    base[1][0, 0, :] = float("-inf")  # an all -inf teacher row: no gradient for rgb there
    base[0][1, 2, :C // 2] = float("-inf")
    mask = (torch.rand(5, 9, generator=gen) < 0.7).to(device) if masked else None
    xs = [x.to(dtype).to(device).requires_grad_() for x in base]
    loss, ran = _ops_run(lambda: mmsd_ext.mmsd_distill_loss(*xs, 0.3, mask=mask, backend=device))
    assert "mmsd_ext::_mmsd_distill_loss_with_grads" in ran
    _, ran = _ops_run(lambda: loss.backward(retain_graph=True))
    assert "mmsd_ext::_distill_scale_grads_" in ran and "mmsd_ext::_mmsd_distill_loss_backward" not in ran
    # AccumulateGrad keeps the handed-over tensors as .grad: no copy.
    assert not ran & {"aten::clone", "aten::copy_"}, ran
    from_forward = [x.grad for x in xs]
    for x in xs:
        x.grad = None
    _, ran = _ops_run(lambda: loss.backward())
    assert "mmsd_ext::_mmsd_distill_loss_backward" in ran
    recomputed = [x.grad for x in xs]
    # The kernels compute in float32 for float64 inputs too: on CUDA, where the two
    # ways differ by roundings, those are float32 roundings.
    eps = torch.finfo(torch.float32 if device != "cpu" and dtype == torch.float64 else dtype).eps

    def cuda_atol(b):
        # Two CUDA kernels: the forward scales exp(a) by 1 / S of its float sum, the
        # backward by exp(-log S) (csrc/cuda/distill_kernel.cu says why), which differ
        # by up to 1.5 eps in a probability; k (p_s - p_t) then by up to 3 eps k,
        # however small the entry (here the largest gradient is about k).
        return 0.0 if device == "cpu" else 4 * eps * b[b.isfinite()].abs().max().item()

    for a, b in zip(from_forward, recomputed):
        assert a.dtype == dtype and a.is_contiguous()
        if device == "cpu":
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        else:
            assert torch.allclose(a.double(), b.double(), rtol=2 * eps, atol=cuda_atol(b.double()), equal_nan=True)
    # Other upstream gradients: the forward's gradients times w in the accumulation type, rounded
    # to the dtype once more. w = 0.1 (MMSD's distillation weight) is not exact in fp16/bf16, and
    # 65536 (GradScaler's initial scale) is inf in fp16: w must not be rounded to the dtype first.
    for w in (2.5, 0.1, 65536.0):
        for x in xs:
            x.grad = None
        mmsd_ext.mmsd_distill_loss(*xs, 0.3, mask=mask, backend=device).backward(torch.tensor(w, device=device))
        w32 = float(torch.tensor(w, dtype=torch.float32))  # the kernels read the upstream gradient as float32
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for x, b in zip(xs, recomputed):
            expected = (b.double() * w32).to(dtype).double()
            assert expected[b.isfinite()].isfinite().all()  # else this would check little
            if device == "cpu":
                # One product in the accumulation type, rounded once (bf16: a weight rounded to
                # bf16 first is off by up to 2**-9, which the tolerance below would let pass).
                torch.testing.assert_close(x.grad, (b.to(acc) * w32).to(dtype), rtol=0, atol=0, equal_nan=True)
            assert torch.allclose(x.grad.double(), expected, rtol=eps, atol=w * cuda_atol(b.double()), equal_nan=True), w


@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.parametrize("upstream", [math.inf, math.nan, -2.5])
def test_held_gradients_keep_rows_without_a_teacher_zero(device, upstream):
    """The held gradients are scaled by the upstream gradient; rows without a teacher (masked,
    or an all -inf teacher) stay 0 as the recomputing backward's selects leave them, where
    an upstream inf or NaN times their 0 was NaN (an overflowed scaled loss)."""
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(3, 6, 11, generator=gen) for _ in range(3)]
    xs[1][0, 2] = -math.inf  # flow all -inf in row (0, 2): rgb's term there has no teacher
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :3] = False
    xs = [x.to(device).requires_grad_() for x in xs]
    loss, ran = _ops_run(lambda: mmsd_ext.mmsd_distill_loss(*xs, 0.3, mask=mask.to(device), backend=device))
    assert "mmsd_ext::_mmsd_distill_loss_with_grads" in ran
    w = torch.tensor(upstream, device=device)
    loss.backward(w, retain_graph=True)  # the held gradients, scaled
    held = [x.grad.cpu() for x in xs]
    for x in xs:
        x.grad = None
    loss.backward(w)  # recomputed
    recomputed = [x.grad.cpu() for x in xs]
    for g in held + recomputed:
        assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))
    assert torch.equal(held[0][0, 2], torch.zeros(11)) and torch.equal(recomputed[0][0, 2], torch.zeros(11))
    if device == "cpu":  # the held way rounds once more (the scale): 2 eps
        for a, b in zip(held, recomputed):
            torch.testing.assert_close(a, b, rtol=2**-22, atol=0, equal_nan=True)
    elif math.isfinite(upstream):
        # CUDA: the two ways differ by float32 roundings (1 / S against exp(-log S); see
        # test_gradients_from_the_forward_equal_the_recomputed_ones). Under an upstream inf
        # or NaN an entry 0 one way and not quite 0 the other is NaN against inf. flow's
        # row (0, 2), all -inf, is NaN both ways.
        eps = torch.finfo(torch.float32).eps
        for a, b in zip(held, recomputed):
            atol = 4 * eps * b[b.isfinite()].abs().max().item()
            torch.testing.assert_close(a, b, rtol=2 * eps, atol=atol, equal_nan=True)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_float16_gradients_of_a_scaled_loss_are_rounded_once(device):
    """float16 training scales the loss up (GradScaler: 65536). The gradients for an upstream
    gradient of 1 are about 1 / (rows * tau): float16 subnormals or 0 at a few hundred rows.
    Held from the forward and scaled in the backward, they lost that rounding (a quarter of
    the entries 0 and a median error of 1.4% at (10, 750, 21)); float16 recomputes them, so
    each is rounded once, after the scale, as the reference rounds it."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(4, 300, 21, generator=gen).half() for _ in range(3)]
    xs = [x.to(device, copy=True).requires_grad_() for x in base]
    loss, ran = _ops_run(lambda: mmsd_ext.mmsd_distill_loss(*xs, 0.2, backend=device))
    assert "mmsd_ext::_mmsd_distill_loss_with_grads" not in ran
    (loss * 65536.0).backward()
    x64 = [x.double().requires_grad_() for x in base]
    (mmsd_ext.mmsd_distill_loss(*x64, 0.2, backend="reference") * 65536.0).backward()
    for x, o in zip(xs, x64):
        g, want = x.grad.double().cpu(), o.grad
        # Most unscaled gradients lie below float16's normal range.
        assert (want.abs() / 65536 < 2**-14).float().mean() > 0.5
        # One float16 rounding (2**-11 relative) of a value good to float32 roundings of the
        # probabilities: a few float32 eps of 65536 k, k = 1 / (rows * tau).
        atol = 4 * 2**-23 * 65536 / (4 * 300 * 0.2)
        assert torch.allclose(g, want, rtol=2**-10, atol=atol), (g - want).abs().max()



@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_gradients_in_the_forward_only_where_all_three_are_trained(device):
    gen = torch.Generator().manual_seed(47)
    base = [torch.randn(3, 4, 21, generator=gen).to(device) for _ in range(3)]
    cases = {
        "all three": ([True, True, True], True),
        "fused only": ([False, False, True], False),
        "rgb and flow": ([True, True, False], False),
    }
    for what, (needs, in_forward) in cases.items():
        xs = [x.clone().requires_grad_(n) for x, n in zip(base, needs)]
        loss, ran = _ops_run(lambda: mmsd_ext.mmsd_distill_loss(*xs, backend=device))
        assert ("mmsd_ext::_mmsd_distill_loss_with_grads" in ran) == in_forward, what
        grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad])
        assert all(torch.isfinite(g).all() for g in grads), what
    xs = [x.clone().requires_grad_() for x in base]
    with torch.no_grad():
        _, ran = _ops_run(lambda: mmsd_ext.mmsd_distill_loss(*xs, backend=device))
    assert "mmsd_ext::mmsd_distill_loss" in ran and "mmsd_ext::_mmsd_distill_loss_with_grads" not in ran
    # create_graph=True recomputes (the gradients must carry the op's not-differentiable grad_fn).
    loss = mmsd_ext.mmsd_distill_loss(*xs, backend=device)
    grads, ran = _ops_run(lambda: torch.autograd.grad(loss, xs, create_graph=True))
    assert "mmsd_ext::_mmsd_distill_loss_backward" in ran and "mmsd_ext::_distill_scale_grads_" not in ran
    with pytest.raises(RuntimeError, match="distill_loss.*backward|[Aa]utograd"):
        (grads[0] ** 2).sum().backward()


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_batched_upstream_gradients_recompute(device):
    """A batched upstream gradient (is_grads_batched=True, as in a vectorised jacobian)
    takes the recompute op, which vmap can batch (the in-place scale cannot), and gives
    each upstream value's gradients."""
    gen = torch.Generator().manual_seed(53)
    xs = [torch.randn(3, 4, 21, generator=gen).to(device).requires_grad_() for _ in range(3)]
    upstream = torch.tensor([1.0, 2.0, -0.5], device=device)
    loss, ran = _ops_run(lambda: mmsd_ext.mmsd_distill_loss(*xs, backend=device))
    assert "mmsd_ext::_mmsd_distill_loss_with_grads" in ran
    batched = torch.autograd.grad(loss, xs, grad_outputs=upstream, is_grads_batched=True, retain_graph=True)
    for j, w in enumerate(upstream):
        one = torch.autograd.grad(loss, xs, grad_outputs=w, retain_graph=True)
        for b, g in zip(batched, one):
            if j == 0 and device != "cpu":
                # The batched call left the forward's gradients held, so this first
                # backward takes them (upstream 1, unscaled). On CUDA they differ from the
                # recomputed ones by roundings of 1 / S (see
                # test_gradients_from_the_forward_equal_the_recomputed_ones); on the CPU
                # they are bit-equal, and the later calls recompute.
                atol = 4 * torch.finfo(torch.float32).eps * g.abs().max().item()
                torch.testing.assert_close(b[j], g, rtol=2 * torch.finfo(torch.float32).eps, atol=atol)
            else:
                torch.testing.assert_close(b[j], g, rtol=0, atol=0)
    assert all(torch.count_nonzero(g) > 0 for g in batched)


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_masks_at_any_byte_offset_and_row_counts(device):
    """The CUDA finalize reads the mask as a 32-bit word where it is aligned and as four
    bytes elsewhere: masks that start 0 to 3 bytes into their storage, and row counts
    that are not multiples of 4, count the same rows, and give the loss bits of an aligned
    copy of the mask (the byte path's count against the word path's). The order of the
    sum no longer follows the mask's alignment, but these row losses add up exactly in
    double in any order, so that is not what this checks."""
    gen = torch.Generator().manual_seed(53)
    for rows in (1, 3, 4, 7, 1030):
        xs = [torch.randn(rows, 21, generator=gen, dtype=torch.float64) for _ in range(3)]
        storage = torch.rand(rows + 3, generator=gen) < 0.6
        for offset in range(4):
            mask = storage[offset:offset + rows]
            ins = [x.float().to(device).requires_grad_() for x in xs]
            m = storage.to(device)[offset:offset + rows]  # a view with the same offset on the device
            assert m.storage_offset() == offset
            pair = mmsd_ext.snippet_distill_loss(ins[0], ins[1], 0.5, mask=m, reduction="sum", backend=device)
            loss = mmsd_ext.mmsd_distill_loss(*ins, 0.5, mask=m, backend=device)
            grads = torch.autograd.grad(loss, ins)
            ref64 = [x.clone().requires_grad_() for x in xs]
            ref = REFERENCE_MMSD(*ref64, 0.5, mask)
            ref_grads = torch.autograd.grad(ref, ref64)
            what = (rows, offset)
            assert math.isclose(pair.item(), REFERENCE_PAIR(xs[0], xs[1], 0.5, mask, "sum").item(), rel_tol=1e-5, abs_tol=1e-6), what
            assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5, abs_tol=1e-6), what
            aligned = m.clone()
            assert torch.equal(pair, mmsd_ext.snippet_distill_loss(ins[0], ins[1], 0.5, mask=aligned, reduction="sum",
                                                                   backend=device)), what
            assert torch.equal(loss.detach(), mmsd_ext.mmsd_distill_loss(*ins, 0.5, mask=aligned, backend=device).detach()), what
            for g, rg in zip(grads, ref_grads):  # the weight 1 / count, from the counted mask
                assert torch.allclose(g.double().cpu(), rg, rtol=1e-4, atol=1e-6), what


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_scale_grads_op_checks_its_arguments(device):
    ops = torch.ops.mmsd_ext
    g = [torch.ones(2, 3, device=device) for _ in range(3)]
    st = torch.zeros(2, 8, device=device)  # row statistics: every term has a teacher (log S = 0)
    message = "grad_rgb, grad_flow, grad_fused: expected contiguous floating tensors of one shape and dtype on "
    with pytest.raises(RuntimeError, match="^" + re.escape(message) + ".*float32 \\[2\\]"):
        ops._distill_scale_grads_(torch.tensor(2.0, device=device), st, g[0], g[1], g[2][:, 0].contiguous())
    with pytest.raises(RuntimeError, match="^" + re.escape(message) + ".*not contiguous"):
        ops._distill_scale_grads_(torch.tensor(2.0, device=device), st, g[0], g[1], torch.ones(3, 2, device=device).t())
    with pytest.raises(RuntimeError, match="^" + re.escape("grad: expected a floating scalar, got float32 [2]")):
        ops._distill_scale_grads_(torch.ones(2, device=device), st, *g)
    # The scale read from one of the gradients it rewrites, or a gradient given twice.
    with pytest.raises(RuntimeError, match="^" + re.escape("grad: expected a tensor that shares no memory")):
        ops._distill_scale_grads_(g[0].view(-1)[0], st, *g)
    with pytest.raises(RuntimeError, match="^grad_rgb, grad_flow, grad_fused: expected three tensors that share no"):
        ops._distill_scale_grads_(torch.tensor(2.0, device=device), st, g[0], g[0], g[1])
    ops._distill_scale_grads_(torch.tensor(1.0, device=device), st, *g)
    assert all(torch.equal(x, torch.ones(2, 3, device=device)) for x in g)
    # The op changes its tensors in place: their version counters move, so that a backward
    # that saved one of them refuses to run.
    before = [x._version for x in g]
    z = torch.randn(2, 3, device=device, requires_grad=True)
    y = (z * g[0]).sum()
    ops._distill_scale_grads_(torch.tensor(1.0, device=device), st, *g)
    assert all(x._version > v for x, v in zip(g, before))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    ops._distill_scale_grads_(torch.tensor(-0.5, device=device), st, *g)
    assert all(torch.equal(x, torch.full((2, 3), -0.5, device=device)) for x in g)
    # The row statistics: the forward's shape, and not memory the op rewrites.
    with pytest.raises(RuntimeError, match="^" + re.escape("row_stats: expected the contiguous float32 tensor of shape [2, 8]")):
        ops._distill_scale_grads_(torch.tensor(2.0, device=device), st[:, :4].contiguous(), *g)
    base = torch.zeros(16, device=device)
    with pytest.raises(RuntimeError, match="^row_stats: expected a tensor that shares no memory"):
        ops._distill_scale_grads_(torch.tensor(2.0, device=device), base.view(2, 8), g[0], g[1], base[:6].view(2, 3))
    # A term without a teacher (log S = -inf: a masked row, or an all -inf teacher) stays 0
    # whatever the scale; 0 * inf was NaN. rgb's teacher is flow (column 3), flow's is rgb
    # (1), fused's the mean (7).
    for w in (math.inf, math.nan, 3.0):
        x = [torch.ones(2, 3, device=device) for _ in range(3)]
        st = torch.zeros(2, 8, device=device)
        st[0, 3] = st[1, 1] = st[1, 7] = -math.inf
        ops._distill_scale_grads_(torch.tensor(w, device=device), st, *x)
        full = torch.full((3,), w, device=device)
        for got, dropped in zip(x, (0, 1, 1)):
            assert torch.equal(got[dropped], torch.zeros(3, device=device)), w
            assert torch.allclose(got[1 - dropped], full, equal_nan=True), w



def test_teacher_gets_no_gradient_and_inputs_are_untouched(backend):
    device = backend_device(backend)
    xs = [torch.randn(2, 5, 21, device=device, requires_grad=True) for _ in range(3)]
    copies = [x.detach().clone() for x in xs]
    mask = torch.rand(2, 5, device=device) > 0.5
    mask_copy = mask.clone()
    loss = mmsd_ext.snippet_distill_loss(xs[0], xs[1], 0.5, mask=mask, backend=backend)
    loss.backward()
    assert xs[0].grad is not None and xs[1].grad is None
    loss = mmsd_ext.mmsd_distill_loss(*xs, mask=mask, backend=backend)
    loss.backward()
    for x, c in zip(xs, copies):
        assert torch.equal(x.detach(), c)
    assert torch.equal(mask, mask_copy)
    # Only the teacher needs a gradient: the loss needs none, on every backend alike.
    loss = mmsd_ext.snippet_distill_loss(xs[0].detach(), xs[1], 0.5, backend=backend)
    assert not loss.requires_grad and loss.grad_fn is None


def test_a_float_mask_selects_rows_by_being_nonzero(any_backend):
    """Weights of 0.5, 2 or -1 select their rows as 1 does (they do not weight them): loss
    and gradients are the oracle's with the bool mask weights != 0, and bit for bit the
    backend's own with that mask."""
    backend = any_backend
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(23)
    xs = [torch.randn(2, 4, 5, generator=gen).to(device) for _ in range(3)]
    weights = torch.tensor([[0.5, 1.0, 0.0, 2.0], [-1.0, 0.0, 3.0, 1.0]], device=device)
    selected = weights != 0

    def pair(s, t, mask, reduction):
        return mmsd_ext.snippet_distill_loss(s, t, 0.5, mask=mask, reduction=reduction, backend=backend)

    for reduction in ("mean", "sum", "none"):
        loss, (grad,) = _loss_and_grads(lambda s, t: pair(s, t, weights, reduction), xs[:2], 1.0, (True, False))
        _assert_pair_matches_oracle(loss, grad, xs[0], xs[1], selected, 0.5, reduction, 1.0)
        assert torch.equal(loss, pair(xs[0], xs[1], selected, reduction)), reduction
    loss, grads = _loss_and_grads(
        lambda r, f, u: mmsd_ext.mmsd_distill_loss(r, f, u, 0.5, mask=weights, backend=backend), xs, 1.0,
        (True, True, True),
    )
    _assert_mmsd_matches_oracle(loss, grads, xs, selected, 0.5, 1.0)
    assert torch.equal(loss, mmsd_ext.mmsd_distill_loss(*xs, 0.5, mask=selected, backend=backend))


def test_each_stream_gets_only_its_own_term(backend):
    """rgb's gradient is that of L(rgb <- flow) alone, flow's of L(flow <- rgb), fused's of L(fused <- avg)."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(17)
    r, f, u = [torch.randn(6, 21, generator=gen, dtype=torch.float64) for _ in range(3)]
    xs = [x.float().to(device).requires_grad_() for x in (r, f, u)]
    grads = torch.autograd.grad(mmsd_ext.mmsd_distill_loss(*xs, 0.2, backend=backend), xs)
    pairs = [(r, f), (f, r), (u, (r + f) / 2)]
    for g, (student, teacher) in zip(grads, pairs):
        s = student.clone().requires_grad_()
        (expected,) = torch.autograd.grad(REFERENCE_PAIR(s, teacher, 0.2, None, "mean"), s)
        assert torch.allclose(g.double().cpu(), expected, rtol=1e-5, atol=1e-7)


def test_create_graph_works_and_double_backward_raises(backend):
    # The backward is not differentiable again. A double backward must raise, never
    # hand back a missing or zero second-order gradient.
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(19)
    xs = [torch.randn(3, 21, generator=gen, dtype=torch.float64) for _ in range(3)]
    s = xs[0].float().to(device).requires_grad_()
    pair = lambda: mmsd_ext.snippet_distill_loss(s, xs[1].float().to(device), 0.5, backend=backend)  # noqa: E731
    mmsd = lambda: mmsd_ext.mmsd_distill_loss(s, xs[1].float().to(device), xs[2].float().to(device), backend=backend)  # noqa: E731
    for loss_fn, oracle, op in [(pair, lambda a: REFERENCE_PAIR(a, xs[1], 0.5, None, "mean"), "snippet"),
                                (mmsd, lambda a: REFERENCE_MMSD(a, xs[1], xs[2], 0.2, None), "mmsd")]:
        # Only the double backward may raise, with the op's own message: a RuntimeError from
        # the forward or the first gradient is a failure, not the refusal tested here.
        (grad,) = torch.autograd.grad(loss_fn(), s, create_graph=True)
        s64 = xs[0].clone().requires_grad_()
        (expected,) = torch.autograd.grad(oracle(s64), s64)
        assert torch.allclose(grad.double().cpu(), expected, rtol=1e-5, atol=1e-7)
        with pytest.raises(RuntimeError, match=rf"derivative for mmsd_ext::_{op}_distill_loss_backward is not implemented"
                                               rf"|backward through mmsd_ext\._{op}_distill_loss_triton_backward.* no autograd formula"):
            (grad**2).sum().backward()


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # the fallback's, as documented
def test_torch_func_vmap_of_the_forward_works_and_gradient_transforms_raise(backend):
    # As the README says: vmap runs PyTorch's per-sample fallback (it warns that it is
    # slow); torch.func's gradient transforms refuse the compiled and Triton autograd.
    device = backend_device(backend)
    x = torch.randn(3, 2, 5, 21, generator=torch.Generator().manual_seed(23)).to(device)
    pair = lambda a: mmsd_ext.snippet_distill_loss(a, a.flip(-1), 0.5, backend=backend)  # noqa: E731
    mmsd = lambda a: mmsd_ext.mmsd_distill_loss(a, a.flip(-1), 2 * a, backend=backend)  # noqa: E731
    for fn in (pair, mmsd):
        torch.testing.assert_close(torch.func.vmap(fn)(x), torch.stack([fn(a) for a in x]), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="functorch transforms"):
            torch.func.grad(fn)(x[0])


# ---------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument(any_backend):
    # Each message starts with the argument at fault (a message that named it only
    # later, "student: expected the shape of teacher", would blame the wrong one).
    device = backend_device(any_backend)
    s = torch.randn(2, 3, 5, device=device)
    t = torch.randn(2, 3, 5, device=device)
    call = lambda *a, **k: mmsd_ext.snippet_distill_loss(*a, backend=any_backend, **k)  # noqa: E731
    starts = lambda text: "^" + re.escape(text)  # noqa: E731
    with pytest.raises(ValueError, match=starts("teacher: expected the shape of student (2, 3, 5), got (2, 3, 4)")):
        call(s, t[..., :4])
    with pytest.raises(ValueError, match=starts("temperature: expected a number > 0, got 0.0")):
        call(s, t, 0.0)
    with pytest.raises(ValueError, match=starts("temperature: expected a number > 0, got -1.0")):
        call(s, t, -1.0)
    with pytest.raises(ValueError, match=r"^temperature: expected a finite number > 0 within \[1e-30, 1e30\], got inf"):
        call(s, t, math.inf)
    with pytest.raises(ValueError, match="^temperature: expected a number > 0, got nan"):
        call(s, t, math.nan)
    # 1 / tau leaves the normal float32 range: NaN from the kernels before 2026-11-27.
    for tau in (1e-31, 1e31, 1e46):
        with pytest.raises(ValueError, match=r"^temperature: expected a finite number > 0 within \[1e-30, 1e30\]"):
            call(s, t, tau)
    # The bounds themselves: a near-uniform softmax (log C) and a near-one-hot one.
    assert call(s, t, 1e30).item() == pytest.approx(math.log(5), rel=1e-6)
    assert math.isfinite(call(s, t, 1e-30).item())
    with pytest.raises(ValueError, match=starts("mask: expected the leading shape (2, 3), got (2, 4)")):
        call(s, t, mask=torch.ones(2, 4, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match=starts("mask: expected a bool or 0/1 float tensor, got int64")):
        call(s, t, mask=torch.ones(2, 3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="^student: expected dtype .*, got int64$"):
        call(s.long(), t)
    with pytest.raises(TypeError, match="^teacher: expected dtype .*, got int32$"):
        call(s, t.int())
    with pytest.raises(ValueError, match=starts("reduction: expected one of mean, sum, none, got 'max'")):
        call(s, t, reduction="max")
    with pytest.raises(ValueError, match=starts("student: expected at least one class (C >= 1), got shape (2, 0)")):
        call(torch.randn(2, 0, device=device), torch.randn(2, 0, device=device))
    with pytest.raises(ValueError, match=starts("student: expected shape [..., C], got a scalar")):
        call(s[0, 0, 0], t[0, 0, 0])
    with pytest.raises(ValueError, match=starts("rgb: expected shape [..., C], got a scalar")):
        mmsd_ext.mmsd_distill_loss(s[0, 0, 0], t[0, 0, 0], s[0, 0, 0], backend=any_backend)
    other = torch.device("meta") if device.type == "cpu" else torch.device("cpu")
    with pytest.raises(ValueError, match=starts(f"teacher: expected a tensor on {s.device} like student, got {other}")):
        call(s, t.to(other))
    with pytest.raises(ValueError, match=starts(f"mask: expected a tensor on {s.device} like student, got {other}")):
        call(s, t, mask=torch.ones(2, 3, dtype=torch.bool, device=other))
    mm = lambda *a, **k: mmsd_ext.mmsd_distill_loss(*a, backend=any_backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=starts("fused: expected the shape of rgb (2, 3, 5), got (2, 3, 4)")):
        mm(s, t, s[..., :4])
    with pytest.raises(TypeError, match="^fused: expected dtype .*, got int64$"):
        mm(s, t, s.long())
    with pytest.raises(ValueError, match=starts("flow: expected the shape of rgb (2, 3, 5), got (1, 3, 5)")):
        mm(s, t[:1], s)
    with pytest.raises(ValueError, match=starts(f"fused: expected a tensor on {s.device} like rgb, got {other}")):
        mm(s, t, s.to(other))
    with pytest.raises(ValueError, match=starts(f"flow: expected a tensor on {s.device} like rgb, got {other}")):
        mm(s, t.to(other), s)
    with pytest.raises(ValueError, match=starts("mask: expected the leading shape (2, 3), got (3, 2)")):
        mm(s, t, s, mask=torch.ones(3, 2, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=starts("mask: expected the leading shape (2, 3), got (2, 3, 5)")):
        mm(s, t, s, mask=torch.ones(2, 3, 5, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=starts(f"mask: expected a tensor on {s.device} like rgb, got {other}")):
        mm(s, t, s, mask=torch.ones(2, 3, dtype=torch.bool, device=other))
    with pytest.raises(ValueError, match="^temperature: expected a number > 0, got nan"):
        mm(s, t, s, float("nan"))
    with pytest.raises(ValueError, match="^temperature: expected a finite number > 0"):
        mm(s, t, s, math.inf)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_inputs_on_cpu_and_cuda_name_the_argument(any_backend):
    cpu = [torch.randn(2, 3, 5) for _ in range(3)]
    gpu = [x.cuda() for x in cpu]
    with pytest.raises(ValueError, match="^flow: expected a tensor on cuda"):
        mmsd_ext.mmsd_distill_loss(gpu[0], cpu[1], gpu[2], backend=any_backend)
    with pytest.raises(ValueError, match="^flow: expected a tensor on cpu"):
        mmsd_ext.mmsd_distill_loss(cpu[0], gpu[1], cpu[2], backend=any_backend)
    with pytest.raises(ValueError, match="^fused: expected a tensor on cuda"):
        mmsd_ext.mmsd_distill_loss(gpu[0], gpu[1], cpu[2], backend=any_backend)
    with pytest.raises(ValueError, match="^teacher: expected a tensor on cuda"):
        mmsd_ext.snippet_distill_loss(gpu[0], cpu[1], backend=any_backend)


@pytest.mark.skipif(not _loader.compiled_available(), reason="the compiled extension is not built")
def test_compiled_ops_check_their_arguments():
    ops = torch.ops.mmsd_ext
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    # Each message starts with the argument at fault (test_compiled_op_messages_give_the_numbers
    # checks the rest of several).
    with pytest.raises(RuntimeError, match="^teacher: expected the shape of student"):
        ops.snippet_distill_loss(s, t[:, :4], 1.0, None, 1)
    with pytest.raises(RuntimeError, match="^teacher: expected dtype float32 like student"):
        ops.snippet_distill_loss(s, t.half(), 1.0, None, 1)
    with pytest.raises(RuntimeError, match="^temperature:"):
        ops.snippet_distill_loss(s, t, 0.0, None, 1)
    with pytest.raises(RuntimeError, match="^reduction:"):
        ops.snippet_distill_loss(s, t, 1.0, None, 7)
    with pytest.raises(RuntimeError, match="^mask: expected the leading shape"):
        ops.snippet_distill_loss(s, t, 1.0, torch.ones(4, dtype=torch.bool), 1)
    with pytest.raises(RuntimeError, match="^student: expected dtype"):
        ops.snippet_distill_loss(s.int(), t.int(), 1.0, None, 1)
    with pytest.raises(RuntimeError, match="^fused: expected the shape of rgb"):
        ops.mmsd_distill_loss(s, t, s[:2], 1.0, None)
    _, stats, count = ops.snippet_distill_loss(s, t, 1.0, None, 1)
    with pytest.raises(RuntimeError, match="^row_stats:"):
        ops._snippet_distill_loss_backward(torch.ones(()), s, t, stats[:2], count, 1.0, 1)
    # The same values in another layout: the kernel reads them as rows of k (it would pair
    # each row with another row's statistics).
    strided = stats.t().contiguous().t()
    assert torch.equal(strided, stats) and not strided.is_contiguous()
    with pytest.raises(RuntimeError, match="^row_stats: expected the contiguous float32 tensor"):
        ops._snippet_distill_loss_backward(torch.ones(()), s, t, strided, count, 1.0, 1)
    with pytest.raises(RuntimeError, match="^grad: expected shape"):
        ops._snippet_distill_loss_backward(torch.ones(2), s, t, stats, count, 1.0, 0)
    # A complex upstream gradient lost its imaginary part with a warning; an integer one passed.
    for bad in (torch.ones((), dtype=torch.complex64), torch.ones((), dtype=torch.int64)):
        with pytest.raises(RuntimeError, match="^grad: expected a floating tensor"):
            ops._snippet_distill_loss_backward(bad, s, t, stats, count, 1.0, 1)


@pytest.mark.skipif("cpu" not in mmsd_ext.available_backends(), reason="cpu backend not available")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cpu_total_over_many_row_blocks_is_rounded_once(reduction):
    """The cpu kernel sums each block of 8192 // C rows in float64 and the block sums in
    float64 too, rounding once. C = 8 gives blocks of 1024 rows, here 16 of them, with one
    row's loss near 1e5, so a float32 total over the blocks would lose the others' low
    digits. The first seed whose data tells the two totals apart is used."""
    C, per_block, tau = 8, 1024, 0.5
    R = per_block * 16 - 3
    for seed in range(50):
        gen = torch.Generator().manual_seed(seed)
        student, teacher = torch.randn(R, C, generator=gen), torch.randn(R, C, generator=gen)
        student[0] = torch.linspace(-2e4, 2e4, C)
        teacher[0] = -student[0]
        rows = mmsd_ext.snippet_distill_loss(student, teacher, tau, reduction="none", backend="cpu").double()
        blocks = [rows[i : i + per_block].sum().item() for i in range(0, R, per_block)]
        divisor = R if reduction == "mean" else 1
        want = torch.tensor(sum(blocks) / divisor, dtype=torch.float64).float().item()
        running = 0.0
        for b in blocks:  # a float32 running total
            running = torch.tensor(running + b, dtype=torch.float64).float().item()
        if torch.tensor(running / divisor, dtype=torch.float64).float().item() != want:
            break
    else:
        pytest.fail("no seed tells a float32 total from the float64 one")
    got = mmsd_ext.snippet_distill_loss(student, teacher, tau, reduction=reduction, backend="cpu")
    assert got.item() == want, seed


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compiled_op_messages_give_the_numbers(device):
    # The kernels' own messages carry the offending sizes, dtypes and values, and
    # raise (not crash) when called without the Python wrapper.
    if device not in mmsd_ext.available_backends():
        pytest.skip(f"{device} backend not available")
    ops = torch.ops.mmsd_ext
    s, t = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    cases = [
        ((s, t[:, :4], 1.0, None, 1), "teacher: expected the shape of student [3, 5], got [3, 4]"),
        ((s, t.half(), 1.0, None, 1), "teacher: expected dtype float32 like student, got float16"),
        ((s[:, :0], t[:, :0], 1.0, None, 1), "student: expected at least one class (C >= 1), got shape [3, 0]"),
        ((s, t, -0.5, None, 1), "temperature: expected a finite number > 0 within [1e-30, 1e30], got -0.5"),
        ((s, t, math.inf, None, 1), "temperature: expected a finite number > 0 within [1e-30, 1e30], got inf"),
        ((s, t, 1e31, None, 1), "temperature: expected a finite number > 0 within [1e-30, 1e30], got 1e+31"),
        ((s, t, 1e-31, None, 1), "temperature: expected a finite number > 0 within [1e-30, 1e30], got 1e-31"),
        ((s, t, 5e-324, None, 1), "temperature: expected a finite number > 0 within [1e-30, 1e30], got 5e-324"),
        ((s, t, 1.0, None, 7), "reduction: expected 0 (none), 1 (mean) or 2 (sum), got 7"),
        ((s, t, 1.0, torch.ones(4, dtype=torch.bool, device=device), 1),
         "mask: expected the leading shape [3] of student, got [4]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match="^" + re.escape(message)):
            ops.snippet_distill_loss(*args)
    _, stats, count = ops.snippet_distill_loss(s, t, 1.0, None, 1)
    message = ("row_stats: expected the contiguous float32 tensor of shape [3, 4] that the forward returned, "
               "got float32 [2, 4]")
    with pytest.raises(RuntimeError, match="^" + re.escape(message)):
        ops._snippet_distill_loss_backward(torch.ones((), device=device), s, t, stats[:2], count, 1.0, 1)
    with pytest.raises(RuntimeError, match="^" + re.escape("grad: expected shape [3], got [2]")):
        ops._snippet_distill_loss_backward(torch.ones(2, device=device), s, t, stats, count, 1.0, 0)
    tau_message = "temperature: expected a finite number > 0 within [1e-30, 1e30], got 1e-40"
    for call in (
        lambda: ops.mmsd_distill_loss(s, t, s, 1e-40, None),
        lambda: ops._mmsd_distill_loss_with_grads(s, t, s, 1e-40, None),
        lambda: ops._snippet_distill_loss_backward(torch.ones((), device=device), s, t, stats, count, 1e-40, 1),
    ):
        with pytest.raises(RuntimeError, match="^" + re.escape(tau_message)):
            call()


# ------------------------------------------------- opcheck, compile, determinism
def _opcheck_samples(device, strided=False):
    """Contiguous, or (strided) class-major logits and a transposed mask: the fake kernels
    must give the strides the kernels do, which opcheck compares (a fake gradient made with
    empty_like(student) passes on contiguous samples only)."""
    gen = torch.Generator().manual_seed(21)
    s, t, u = [torch.randn(2, 3, 7, generator=gen).to(device) for _ in range(3)]
    mask = torch.tensor([[True, False, True], [True, True, True]], device=device)
    if strided:
        s, t, u = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (s, t, u)]
        mask = mask.t().contiguous().t()
    return s, t, u, mask


def _run_opcheck(forward, backward_pair, mmsd_forward, mmsd_backward, device):
    for strided in (False, True):
        s, t, u, mask = _opcheck_samples(device, strided)
        for reduction, m in [(0, None), (1, mask), (2, mask.float())]:
            sr = s.clone().requires_grad_()
            torch.library.opcheck(forward, (sr, t, 0.5, m, reduction))
            _, stats, count = forward(s, t, 0.5, m, reduction)
            grad = torch.ones(3, 2, device=device).t() if reduction == 0 else torch.tensor(1.5, device=device)
            torch.library.opcheck(backward_pair, (grad, s, t, stats, count, 0.5, reduction))
        xs = [x.clone().requires_grad_() for x in (s, t, u)]
        torch.library.opcheck(mmsd_forward, (*xs, 0.2, mask))
        _, stats, count = mmsd_forward(s, t, u, 0.2, mask)
        torch.library.opcheck(mmsd_backward, (torch.tensor(0.5, device=device), s, t, u, stats, count, 0.2))


@pytest.mark.gpu
@pytest.mark.skipif(not _loader.compiled_available(), reason="the compiled extension is not built")
def test_opcheck_compiled_ops():
    ops = torch.ops.mmsd_ext
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if mmsd_ext._backend.cuda_usable() else [])
    for device in devices:
        _run_opcheck(ops.snippet_distill_loss.default, ops._snippet_distill_loss_backward.default,
                     ops.mmsd_distill_loss.default, ops._mmsd_distill_loss_backward.default, device)
        # The ops of the gradients-in-the-forward way (csrc/autograd.cpp).
        for strided in (False, True):
            s, t, u, mask = _opcheck_samples(device, strided)
            for m in (None, mask):
                torch.library.opcheck(ops._mmsd_distill_loss_with_grads.default, (s, t, u, 0.2, m))
            outs = ops._mmsd_distill_loss_with_grads(s, t, u, 0.2, mask)
            for w in (1.0, 0.5):
                args = (torch.tensor(w, device=device), outs[1], *[g.clone() for g in outs[3:]])
                torch.library.opcheck(ops._distill_scale_grads_.default, args)


@pytest.mark.skipif("triton" not in mmsd_ext.available_backends(), reason="triton cannot run here")
def test_opcheck_triton_ops():
    ops = torch.ops.mmsd_ext
    _run_opcheck(ops.snippet_distill_loss_triton.default, ops._snippet_distill_loss_triton_backward.default,
                 ops.mmsd_distill_loss_triton.default, ops._mmsd_distill_loss_triton_backward.default,
                 backend_device("triton"))


def test_torch_compile_fullgraph(any_backend):
    # Both ops in one graph without a break (the wrappers and the fake kernels trace; no
    # host synchronisation), forward and backward as in eager. The reference is plain
    # PyTorch: what can break there is the capture, which aot_eager checks without
    # inductor's C++ builds.
    backend = any_backend
    torch._dynamo.reset()
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(23)
    xs = [torch.randn(2, 5, 21, generator=gen).to(device) for _ in range(3)]
    mask = (torch.rand(2, 5, generator=gen) > 0.3).to(device)

    def step(r, f, u):
        pair = mmsd_ext.snippet_distill_loss(r, f, 0.5, mask=mask, reduction="sum", backend=backend)
        return pair + mmsd_ext.mmsd_distill_loss(r, f, u, 0.2, mask=mask, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "reference" else "inductor")
    eager_in = [x.clone().requires_grad_() for x in xs]
    compiled_in = [x.clone().requires_grad_() for x in xs]
    expected = step(*eager_in)
    expected.backward()
    got = compiled(*compiled_in)
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-6)
    for a, b in zip(compiled_in, eager_in):
        # On CUDA eager hands over the forward's gradients (1 / S) and the compiled graph
        # may recompute them (exp(-log S)): float32 roundings of the largest gradient apart
        # (test_gradients_from_the_forward_equal_the_recomputed_ones).
        atol = 4 * torch.finfo(torch.float32).eps * b.grad.abs().max().item() if backend == "cuda" else 1e-8
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=atol)


def test_torch_compile_dynamic_with_the_temperature_as_an_input(any_backend):
    # dynamic=True hands a float argument of the compiled function to the ops as a
    # SymFloat: the argument checks must trace it (math.isfinite cannot) and the result
    # must follow the value. Under fullgraph a bad value surfaces as dynamo's error
    # around ours, with our message.
    backend = any_backend
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(31)
    xs = [torch.randn(2, 5, 7, generator=gen).to(backend_device(backend)) for _ in range(3)]

    def losses(r, f, u, tau):
        pair = mmsd_ext.snippet_distill_loss(r, f, tau, backend=backend)
        return pair + mmsd_ext.mmsd_distill_loss(r, f, u, tau, backend=backend)

    compiled = torch.compile(losses, fullgraph=True, dynamic=True, backend="aot_eager" if backend == "reference" else "inductor")
    for tau in (0.2, 0.7):
        torch.testing.assert_close(compiled(*xs, tau), losses(*xs, tau))
    with pytest.raises(Exception, match="temperature: expected a finite number > 0"):
        compiled(*xs, float("inf"))


@pytest.mark.skipif(not _loader.compiled_available(), reason="the compiled extension is not built")
def test_cpu_result_does_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(29)
    xs = [torch.randn(64, 50, 21, generator=gen) for _ in range(3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mmsd_ext.mmsd_distill_loss(*xs, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = mmsd_ext.mmsd_distill_loss(*xs, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# Run in a fresh process (the ISA is read once per process), held to this file's
# tolerance table through its own checks: every dtype, -inf entries, a mask, all three
# reductions, and MMSD's tau with one past the three-exp identity.
_ISA_CHECK = textwrap.dedent(
    """
    import sys
    import torch, mmsd_ext
    sys.path.insert(0, {tests!r})
    import test_distill as T
    gen = torch.Generator().manual_seed(0)
    for C in (1, 7, 21, 201, 1100):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            xs = [(torch.randn(3, 4, C, generator=gen, dtype=torch.float64) * 3).to(dtype) for _ in range(3)]
            if C > 1:  # -inf student and teacher entries (the guarded cross terms)
                xs[0][0, 0, 0] = xs[1][0, 0, 0] = float("-inf")
            mask = torch.rand(3, 4, generator=gen) > 0.3
            for reduction in ("mean", "sum", "none"):
                pair = lambda s, t: mmsd_ext.snippet_distill_loss(s, t, 0.3, mask=mask, reduction=reduction, backend="cpu")
                loss, (g,) = T._loss_and_grads(pair, xs[:2], 1.3, (True, False))
                T._assert_pair_matches_oracle(loss, g, xs[0], xs[1], mask, 0.3, reduction, 1.3)
            for tau in (0.2, 0.01):  # 0.01: rows beyond the three-exp identity
                mmsd = lambda r, f, u: mmsd_ext.mmsd_distill_loss(r, f, u, tau, mask=mask, backend="cpu")
                loss, grads = T._loss_and_grads(mmsd, xs, 1.3, (True, True, True))
                T._assert_mmsd_matches_oracle(loss, grads, xs, mask, tau, 1.3)
    # Exponents from -1.7e7 to -8.7e6: the vector exp's exponent bits overflowed a signed
    # lane there (undefined behaviour that UBSan reported; the lane is then replaced by 0).
    far = torch.tensor([[0.0, -1.5e7, -9e6, -1.2e7] * 5, [0.0, -1e7, -1.6e7, -8.8e6] * 5])
    xs = [far[None], far.flip(-1)[None], far.roll(1, -1)[None]]
    for reduction in ("mean", "none"):
        pair = lambda s, t: mmsd_ext.snippet_distill_loss(s, t, 1.0, reduction=reduction, backend="cpu")
        loss, (g,) = T._loss_and_grads(pair, xs[:2], 1.3, (True, False))
        T._assert_pair_matches_oracle(loss, g, xs[0], xs[1], None, 1.0, reduction, 1.3)
    mmsd = lambda r, f, u: mmsd_ext.mmsd_distill_loss(r, f, u, 1.0, backend="cpu")
    loss, grads = T._loss_and_grads(mmsd, xs, 1.3, (True, True, True))
    T._assert_mmsd_matches_oracle(loss, grads, xs, None, 1.0, 1.3)
    print("ok", mmsd_ext.build_info()["cpu_isa"])
    """
).format(tests=os.path.dirname(os.path.abspath(__file__)))

ISAS = ["avx512", "avx2", "baseline"]  # widest first


def _run_with_isa(isa, code):
    env = dict(os.environ, MMSD_EXT_QUIET="1")
    env.pop("MMSD_EXT_DISTILL_CPU_ISA", None)
    if isa is not None:
        env["MMSD_EXT_DISTILL_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not _loader.compiled_available(), reason="the compiled extension is not built")
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_kernels_of_every_vector_width(isa):
    """The CPU kernels exist for AVX-512, AVX2 and a baseline; MMSD_EXT_DISTILL_CPU_ISA
    picks one, and build_info says which ran."""
    done = _run_with_isa(isa, _ISA_CHECK)
    if done.returncode and f"MMSD_EXT_DISTILL_CPU_ISA: {isa} asked for, but this CPU" in done.stderr:
        pytest.skip(f"this CPU has no {isa}")
    assert done.returncode == 0 and done.stdout.strip().endswith(f"ok {isa}"), done.stderr[-3000:]


@pytest.mark.skipif(not _loader.compiled_available(), reason="the compiled extension is not built")
def test_cpu_kernels_default_to_the_widest_isa_and_refuse_an_unknown_one():
    probe = textwrap.dedent(
        """
        import torch, mmsd_ext
        x = torch.randn(2, 3)
        try:
            mmsd_ext.snippet_distill_loss(x, x, backend="cpu")
            print("isa", mmsd_ext.build_info()["cpu_isa"])
        except ValueError as exc:
            print("error", exc)
        # the reference backend does not depend on it
        print("reference", mmsd_ext.snippet_distill_loss(x, x, backend="reference").item() > 0)
        """
    )
    outcomes = {isa: _run_with_isa(isa, probe).stdout.splitlines() for isa in [None, "bogus"] + ISAS}
    widest = next(isa for isa in ISAS if outcomes[isa][0] == f"isa {isa}")
    assert outcomes[None][0] == f"isa {widest}"
    # A name the kernels do not know was silently the widest ISA.
    assert outcomes["bogus"][0] == ("error MMSD_EXT_DISTILL_CPU_ISA: expected avx512, avx2 or baseline "
                                   "(or unset for the widest), got 'bogus'")
    assert outcomes["baseline"][0] == "isa baseline"
    assert all(lines[1] == "reference True" for lines in outcomes.values())


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_cuda_graph_capture_without_host_sync(gpu_backend):
    if gpu_backend not in mmsd_ext.available_backends():
        pytest.skip(f"{gpu_backend} is not available")
    xs = [torch.randn(4, 100, 21, device="cuda", requires_grad=True) for _ in range(3)]
    mask = torch.rand(4, 100, device="cuda") > 0.2

    def step():
        for x in xs:
            x.grad = None
        loss = mmsd_ext.mmsd_distill_loss(*xs, 0.2, mask=mask, backend=gpu_backend)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (compilation, autotuning) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    # New values in the captured inputs: the replay must compute from them.
    gen = torch.Generator().manual_seed(47)
    with torch.no_grad():
        for x in xs:
            x.copy_(torch.randn(x.shape, generator=gen) * 3)
        mask.copy_(torch.rand(mask.shape, generator=gen) > 0.4)
    graph.replay()
    torch.cuda.synchronize()
    grads = [x.grad for x in xs]  # written by the replay (step() set them to None before the capture)
    _assert_mmsd_matches_oracle(loss, grads, xs, mask, 0.2, 1.0)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cuda_grid_stride_loops_against_cpu():
    # More rows than the forward's 65535 blocks cover in one sweep (2,097,120 rows of
    # <= 32 classes) and more elements than the backward's (16,776,960): every
    # kernel loops; the result must still match the CPU kernel row for row.
    if "cuda" not in mmsd_ext.available_backends() or "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cuda or cpu backend not available")
    gen = torch.Generator().manual_seed(12)
    shape = (2_100_000, 21)
    xs = [torch.randn(shape, generator=gen) * 3 for _ in range(3)]
    mask = torch.rand(shape[0], generator=gen) < 0.9
    weights = torch.randn(shape[0], generator=gen)
    results = {}
    for device in ("cpu", "cuda"):
        inputs = [x.to(device).requires_grad_() for x in xs]
        m, w = mask.to(device), weights.to(device)
        rows = mmsd_ext.snippet_distill_loss(inputs[0], inputs[1], 0.5, mask=m, reduction="none", backend=device)
        (g_pair,) = torch.autograd.grad(rows, inputs[0], w)
        loss = mmsd_ext.mmsd_distill_loss(*inputs, 0.5, mask=m, backend=device) * 1e6  # the mean's 1 / 1.9e6 rows brought back near 1
        grads = torch.autograd.grad(loss, inputs, retain_graph=True)  # written by the forward
        recomputed = torch.autograd.grad(loss, inputs)  # by the backward kernel, whose loop is checked too
        results[device] = [rows, g_pair, loss, *grads, *recomputed]
    names = ("rows", "grad pair", "loss x 1e6", "grad rgb", "grad flow", "grad fused",
             "recomputed grad rgb", "recomputed grad flow", "recomputed grad fused")
    for name, got, expected in zip(names, results["cuda"], results["cpu"]):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("num_classes", [1025, 2049])
def test_wide_rows_whose_largest_logit_is_in_a_last_tile_of_one_class(backend, num_classes):
    # C = k * 1024 + 1: the looped paths' last tile holds one class, the one exp(200) would overflow.
    device = backend_device(backend)
    student, teacher = torch.zeros(2, num_classes), torch.zeros(2, num_classes)
    student[:, -1], teacher[:, -1] = 200.0, 150.0
    got = mmsd_ext.snippet_distill_loss(student.to(device), teacher.to(device), 1.0, reduction="none", backend=backend)
    ref = REFERENCE_PAIR(student.double(), teacher.double(), 1.0, None, "none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_triton_backward_checks_the_grad_shape_of_reduction_none():
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    from mmsd_ext.kernels import distill as triton_distill

    device = backend_device("triton")
    s, t = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    _, stats, count = triton_distill.snippet_distill_forward(s, t, 1.0, None, 0)
    for grad in (torch.ones(2, device=device), torch.ones(3, 1, device=device)):
        with pytest.raises(ValueError, match="^grad: expected shape"):
            triton_distill.snippet_distill_backward(grad, s, t, stats, count, 1.0, 0)


def test_triton_refuses_more_classes_than_its_backward_grid_holds(monkeypatch):
    # The backward puts class tiles on grid axis 1 (at most 65535 programs on CUDA); the
    # forward refuses too, so no loss is computed whose backward would fail to launch.
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    from mmsd_ext.kernels import distill as triton_distill

    device = backend_device("triton")
    wide = torch.zeros(1, device=device).expand(triton_distill.MAX_C + 1)  # one row; nothing allocated
    with pytest.raises(ValueError, match="^student: expected at most 67,107,840 classes on triton, got C = 67,107,841"):
        mmsd_ext.snippet_distill_loss(wide, wide, backend="triton")
    with pytest.raises(ValueError, match="^rgb: expected at most 67,107,840 classes on triton"):
        mmsd_ext.mmsd_distill_loss(wide, wide, wide, backend="triton")
    # The limit itself is taken (a check of ">=" would refuse it).
    at_limit = torch.zeros(1, device=device).expand(triton_distill.MAX_C)
    triton_distill._check_logits(student=at_limit, teacher=at_limit)
    # The backward's own check, at a small limit: without it the backward would run (under
    # the interpreter, past the real limit, for many minutes).
    monkeypatch.setattr(triton_distill, "MAX_C", 4)
    five = torch.zeros(1, 5, device=device)
    stats = torch.zeros(1, 8, device=device)
    with pytest.raises(ValueError, match="^rgb: expected at most 4 classes on triton, got C = 5"):
        triton_distill.mmsd_distill_backward(torch.ones((), device=device), five, five, five, stats, torch.ones((), device=device), 0.2)


@pytest.mark.skipif("cpu" not in mmsd_ext.available_backends(), reason="cpu backend not available")
def test_the_pair_backward_runs_only_for_a_gradient_asked_for():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    loss = torch.ops.mmsd_ext.snippet_distill_loss(s, t, 1.0, None, 1)[0]
    with Calls() as calls:
        (g,) = torch.autograd.grad(loss, t, allow_unused=True, retain_graph=True)
    assert g is None and not any("_snippet_distill_loss_backward" in n for n in calls.names), calls.names
    with Calls() as calls:
        torch.autograd.grad(loss, s)
    assert any("_snippet_distill_loss_backward" in n for n in calls.names), calls.names


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_compiled_backward_ops_take_any_floating_upstream_gradient(device, dtype):
    if device not in mmsd_ext.available_backends():
        pytest.skip(f"{device} backend not available")
    ops = torch.ops.mmsd_ext
    s, t = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    for reduction, shape in ((1, ()), (0, (3,))):
        _, stats, count = ops.snippet_distill_loss(s, t, 1.0, None, reduction)
        want = ops._snippet_distill_loss_backward(torch.full(shape, 0.5, device=device), s, t, stats, count, 1.0, reduction)
        got = ops._snippet_distill_loss_backward(torch.full(shape, 0.5, device=device, dtype=dtype), s, t, stats, count,
                                                 1.0, reduction)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    r, f, u = torch.randn(3, 3, 5, device=device).unbind(0)
    _, stats, count = ops.mmsd_distill_loss(r, f, u, 0.2, None)
    want = ops._mmsd_distill_loss_backward(torch.tensor(0.5, device=device), r, f, u, stats, count, 0.2)
    got = ops._mmsd_distill_loss_backward(torch.tensor(0.5, device=device, dtype=dtype), r, f, u, stats, count, 0.2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
