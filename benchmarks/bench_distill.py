"""snippet_distill_loss and mmsd_distill_loss, fwd / bwd / fwd+bwd.

Inputs: logits [B, T, C] ~ N(0, 1), no mask, "mean" reduction, temperature
0.2 (MMSD's); the loss is a scalar, so backward starts from 1.

Anchors, measured in the same run on the same tensors:
- ``eager``: MMSD's formulation written out as its CategoryCrossEntropy is
  (softmax of the detached teacher / tau, log_softmax of the student / tau,
  product, sum over classes, mean over snippets and videos); for
  mmsd_distill_loss the three terms rgb <- flow, flow <- rgb,
  fused <- (rgb + flow) / 2.
- ``torch.compile``: ``torch.compile`` of that same function (default mode,
  compiled once per shape during warm-up, so compile time is not counted).
  On a GPU no goal is set against it, so it is optional there (left out when
  the op's share of ``--time-budget`` is spent); ``--no-compile`` leaves it out.

Least traffic (bytes), N = B*T rows, e = element size:
- snippet_distill_loss: fwd reads student and teacher, ``2*N*C*e``; bwd
  writes the student's gradient, ``N*C*e``; fwd+bwd (gradient made in the
  same pass) ``3*N*C*e``.
- mmsd_distill_loss: fwd reads the three inputs, ``3*N*C*e``; bwd writes the
  three gradients, ``3*N*C*e``; fwd+bwd ``6*N*C*e`` (356 MB at (32, 2304, 201)
  in float32).
The scalar loss (4 bytes) is left out.

The cpu and cuda backends of mmsd_distill_loss, whose three inputs all need a
gradient here, write the gradients in the forward (csrc/autograd.cpp): their fwd
pass includes those writes, and their bwd pass (backward rerun on a retained
graph) hands the forward's gradients over in its first call only and recomputes
them in the others. fwd+bwd is what a training step does.
``python -m benchmarks.distill_upstream`` times the two ways against each other.
"""

import torch
import torch.nn.functional as F

from .harness import AUTOGRAD_RESULT_PASS, TOLERANCES, Case, Provider, autograd_passes, compare_tensors, compiled_anchor, dtype_name, parse_btc

TEMPERATURE = 0.2  # MMSD's distillation temperature

# On a GPU, (32, 2304, 201) is still bound by the host: an autograd fwd+bwd costs
# about 0.2 ms there whatever the size (H200, 2026-11-27), longer than moving its
# 356 MB at copy bandwidth (85 us). (64, 4608, 201) moves 1.4 GB.
PRESETS = {
    "tiny": [(2, 32, 5)],
    "quick": {"cpu": [(10, 750, 21), (32, 2304, 201)], "cuda": [(10, 750, 21), (32, 2304, 201), (64, 4608, 201)]},
    "full": {
        "cpu": [(10, 750, 21), (32, 750, 21), (16, 2304, 101), (32, 2304, 201)],
        "cuda": [(10, 750, 21), (32, 750, 21), (16, 2304, 101), (32, 2304, 201), (64, 4608, 201)],
    },
}

# Inputs that receive a gradient, per op (snippet_distill_loss: the teacher is a target).
_N_INPUTS = {"snippet_distill_loss": 2, "mmsd_distill_loss": 3}
_N_GRADS = {"snippet_distill_loss": 1, "mmsd_distill_loss": 3}


def cases(op, ctx):
    if op not in _N_INPUTS:
        raise ValueError(f"op: expected one of {', '.join(_N_INPUTS)}, got {op!r}")
    out = []
    for shape in ctx.sizes(PRESETS, parse_btc):
        for dtype in ctx.dtypes:
            out.append(_case(op, ctx, shape, dtype))
    return out


def least_bytes(op, shape, dtype):
    B, T, C = shape
    e = torch.empty((), dtype=dtype).element_size()
    n = B * T * C * e
    fwd = _N_INPUTS[op] * n
    bwd = _N_GRADS[op] * n
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def category_cross_entropy(student, teacher, tau):
    """MMSD's CategoryCrossEntropy: teacher softmax detached, mean over every snippet."""
    soft_label = F.softmax(teacher.detach() / tau, -1)
    loss = -torch.sum(soft_label * torch.log_softmax(student / tau, -1), dim=-1)
    return loss.mean(-1).mean(-1)


def mmsd_eager(rgb, flow, fused, tau):
    """MMSD's three distillation terms, as its training step adds them."""
    return (
        category_cross_entropy(rgb, flow, tau)
        + category_cross_entropy(flow, rgb, tau)
        + category_cross_entropy(fused, (rgb + flow) / 2, tau)
    )


def _case(op, ctx, shape, dtype):
    B, T, C = shape
    device = ctx.device
    n_in, n_grad = _N_INPUTS[op], _N_GRADS[op]
    inputs = []

    def tensors():
        if not inputs:
            g = torch.Generator().manual_seed(ctx.seed)
            for i in range(n_in):
                x = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype)
                inputs.append(x.requires_grad_(i < n_grad))
        return inputs

    def provider(name, kind, make_forward, optional=False):
        def build():
            xs = tensors()
            forward = make_forward()
            passes, result, release = autograd_passes(lambda: forward(*xs), xs[:n_grad])
            return {"passes": passes, "result": result, "result_pass": AUTOGRAD_RESULT_PASS, "release": release}

        return Provider(name, kind, build, device=device, jit=name in ("triton", "torch.compile"), optional=optional)

    eager = mmsd_eager if op == "mmsd_distill_loss" else category_cross_entropy
    providers = [provider(b, "mmsd_ext", _mmsd_factory(op, b)) for b in ctx.mmsd_backends()]
    providers.append(provider("eager", "anchor", lambda: lambda *xs: eager(*xs, TEMPERATURE)))
    if ctx.compile_anchors:
        # The CPU goal of mmsd_distill_loss is set against torch.compile; no GPU goal is.
        optional = device != "cpu" or op != "mmsd_distill_loss"
        providers.append(provider("torch.compile", "anchor", lambda: _compiled(eager), optional=optional))

    rtol, atol = TOLERANCES[dtype]
    return Case(
        op=op,
        shape="x".join(map(str, shape)),
        dtype=dtype_name(dtype),
        passes=("fwd", "bwd", "fwd+bwd"),
        least_bytes=least_bytes(op, shape, dtype),
        providers=providers,
        roles={"eager": "eager", "compile": "torch.compile", "reference": "reference"},
        compare=lambda e, g: compare_tensors(e, g, rtol, atol),
    )


def _mmsd_factory(op, backend):
    def make():
        import mmsd_ext

        fn = getattr(mmsd_ext, op)
        return lambda *xs: fn(*xs, TEMPERATURE, backend=backend)

    return make


def _compiled(eager):
    compiled = compiled_anchor(eager)
    return lambda *xs: compiled(*xs, TEMPERATURE)
