"""topk_mil_pool: top-k MIL pooling over time, fwd / bwd / fwd+bwd.

Inputs: scores [B, T, C] ~ N(0, 1), every video full length (lengths = T),
k = max(1, T // 8) for every video (MMSD's rule), grad_out [B, C] ~ N(0, 1).

Anchors, measured in the same run on the same tensors:
- ``torch.topk`` (eager): ``torch.topk(scores, k, dim=1).values.mean(1)`` on
  the padded tensor, autograd for the backward (MMSD's FrmScrLoss).
- ``torch.compile``: ``torch.compile`` of that eager formulation (default
  mode, static shapes, compiled in the untimed check call, as the distillation
  benchmark's anchor). No goal is set against it, so it is optional (left out
  when the op's share of ``--time-budget`` is spent); ``--no-compile`` leaves
  it out.
- ``loop``: the per-video loop W-TALC-style code writes:
  ``torch.topk(scores[b, :L_b], k_b, dim=0).values.mean(0)`` for each video, then cat,
  with L_b and k_b host integers as those codes have them.

Least traffic (bytes), e = element size: fwd reads scores and writes the
output, ``B*T*C*e + B*C*e`` (+ k and lengths, 16*B); bwd reads grad_out and
writes the whole gradient (zeros included), ``B*C*e + B*T*C*e``; fwd+bwd is
the sum.
"""

import torch

from .harness import AUTOGRAD_RESULT_PASS, TOLERANCES, Case, Provider, autograd_passes, compare_tensors, compiled_anchor, dtype_name, parse_btc

OP = "topk_mil_pool"

# (B, T, C): THUMOS14-sized batches (C = 20 actions + background) up to
# ActivityNet-sized classes with long videos (the largest size).
PRESETS = {
    "tiny": [(2, 64, 5)],
    "quick": [(10, 750, 21), (32, 2304, 201)],
    "full": [(10, 750, 21), (32, 750, 21), (16, 2304, 101), (32, 2304, 201)],
}


def cases(ctx):
    out = []
    for shape in ctx.sizes(PRESETS, parse_btc):
        for dtype in ctx.dtypes:
            out.append(_case(ctx, shape, dtype))
    return out


def least_bytes(shape, dtype):
    B, T, C = shape
    e = torch.empty((), dtype=dtype).element_size()
    fwd = B * T * C * e + B * C * e + 16 * B
    bwd = B * C * e + B * T * C * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _case(ctx, shape, dtype):
    B, T, C = shape
    device = ctx.device
    k = max(1, T // 8)
    inputs = {}

    def tensors():
        # Made once per case, shared by every provider (built lazily, on first use).
        if not inputs:
            g = torch.Generator().manual_seed(ctx.seed)
            inputs["scores"] = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
            inputs["grad_out"] = torch.randn(B, C, generator=g).to(device=device, dtype=dtype)
            inputs["k"] = torch.full((B,), k, dtype=torch.int64, device=device)
            inputs["lengths"] = torch.full((B,), T, dtype=torch.int64, device=device)
        return inputs

    def provider(name, kind, make_forward, optional=False):
        def build():
            t = tensors()
            forward = make_forward()
            passes, result, release = autograd_passes(lambda: forward(t), [t["scores"]], t["grad_out"])
            return {"passes": passes, "result": result, "result_pass": AUTOGRAD_RESULT_PASS, "release": release}

        return Provider(name, kind, build, device=device, jit=name in ("triton", "torch.compile"), optional=optional)

    providers = []
    for backend in ctx.mmsd_backends():
        providers.append(provider(backend, "mmsd_ext", lambda backend=backend: _mmsd(backend)))
    providers.append(provider("torch.topk", "anchor", lambda: lambda t: topk_mean(t["scores"], k)))
    if ctx.compile_anchors:
        providers.append(provider("torch.compile", "anchor", lambda: _compiled(k), optional=True))
    lengths_host = [T] * B
    k_host = [k] * B
    providers.append(provider("loop", "anchor", lambda: lambda t: _per_video_loop(t["scores"], lengths_host, k_host)))

    rtol, atol = TOLERANCES[dtype]

    def compare(expected, got):
        # Which of equal values straddling the k-th place gets the gradient is
        # left open by torch.topk (and ties are common in bfloat16), so the
        # gradient is compared by what does not depend on it: its sum and its
        # number of non-zeros per (video, class).
        return compare_tensors(_tie_free(expected), _tie_free(got), rtol, atol)

    return Case(
        op=OP,
        shape="x".join(map(str, shape)),
        dtype=dtype_name(dtype),
        passes=("fwd", "bwd", "fwd+bwd"),
        least_bytes=least_bytes(shape, dtype),
        providers=providers,
        roles={"eager": "torch.topk", "compile": "torch.compile", "loop": "loop", "reference": "reference"},
        compare=compare,
        note=f"k = {k}",
    )


def topk_mean(scores, k):
    """The eager anchor: MMSD's top-k mean over time on the padded tensor."""
    return torch.topk(scores, k, dim=1).values.mean(1)


def _compiled(k):
    compiled = compiled_anchor(topk_mean)
    return lambda t: compiled(t["scores"], k)


def _mmsd(backend):
    import mmsd_ext

    return lambda t: mmsd_ext.topk_mil_pool(t["scores"], t["k"], t["lengths"], backend=backend)


def _tie_free(result):
    out, (grad,) = result
    return out, grad.float().sum(dim=1), (grad != 0).sum(dim=1).float()


def _per_video_loop(scores, lengths, ks):
    rows = []
    for b, (length, k) in enumerate(zip(lengths, ks)):
        values, _ = torch.topk(scores[b, :length], k=k, dim=0)
        rows.append(values.mean(0, keepdim=True))
    return torch.cat(rows, dim=0)
