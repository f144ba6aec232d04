"""Host time against whole-call time, per op and backend: is a run bound by the host?

On an H200 the triton backend's fwd+bwd of ``mmsd_distill_loss`` took 0.84 to 1.18 ms at
(10, 750, 21), against 0.22 ms for cuda, while its kernels do a few microseconds of work;
the host (Python, dispatch, autograd, launches) is the suspect. This tool measures it.

For each case, ``--calls`` calls run back to back, five times (median of each figure):

- ``host us``: wall time until the last call has returned, over the calls. Launches are
  queued, nothing is waited for, except what a call waits for itself (the NMS ops read
  their result size back).
- ``total us``: wall time until the device has also finished them, over the calls.

Where host is close to total, the host sets the pace, not the kernels. Base costs, measured
the same way: a one-element torch op (``add_``), an empty Triton kernel launch, a custom op
(``torch.library.custom_op``) and an ``autograd.Function`` that do no work, fwd+bwd.

    python -m benchmarks.host_overhead [--device cuda] [--calls 200] [--backends cuda triton] [--shape 10x750x21]
"""

import argparse
import importlib.util
import statistics
import time
from typing import Tuple

import numpy as np
import torch

import mmsd_ext

from . import bench_nms, workloads
from .bench_distill import TEMPERATURE, mmsd_eager
from .harness import _first_line, parse_btc

SHAPE = "10x750x21"  # THUMOS14-like: the size of issue 3's GPU goal against eager
NMS_M = 100


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_and_total(fn, device, calls, rounds=5):
    """(host, total) microseconds per call: medians over ``rounds`` of ``calls`` calls."""
    for _ in range(max(3, calls // 10)):
        fn()
    _sync(device)
    host, total = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        _sync(device)
        t2 = time.perf_counter()
        host.append((t1 - t0) / calls * 1e6)
        total.append((t2 - t0) / calls * 1e6)
    return statistics.median(host), statistics.median(total)


# ------------------------------------------------------------------ base costs
@torch.library.custom_op("mmsd_ext_bench::noop", mutates_args=())
def _noop_op(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(()), x.new_empty(0)


@_noop_op.register_fake
def _noop_fake(x):
    return x.new_empty(()), x.new_empty(0)


@torch.library.custom_op("mmsd_ext_bench::noop_backward", mutates_args=())
def _noop_backward_op(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@_noop_backward_op.register_fake
def _noop_backward_fake(grad, x):
    return torch.empty_like(x)


def _noop_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _noop_backward(ctx, grad, _unused):
    (x,) = ctx.saved_tensors
    return _noop_backward_op(grad, x)


_noop_op.register_autograd(_noop_backward, setup_context=_noop_setup)


class _NoopFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.new_empty(()), x.new_empty(0)

    @staticmethod
    def backward(ctx, grad, _unused):
        (x,) = ctx.saved_tensors
        return torch.empty_like(x)


# At module level: compiling, Triton reads the kernel's names (tl of its annotations) from
# the module's globals, not from a function's locals.
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
else:
    @triton.jit
    def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass


def empty_triton_launch(x):
    """Launches an empty Triton kernel of one program on x's device."""
    _empty_kernel[(1,)](x, x.numel(), BLOCK=32)


def base_cases(device):
    x = torch.zeros(1, device=device)
    leaf = torch.zeros(4, device=device, requires_grad=True)

    def fwd_bwd(op):
        def step():
            leaf.grad = None
            op(leaf)[0].backward()

        return step

    cases = [
        ("torch add_, 1 element", lambda: x.add_(1)),
        ("custom op, no work, fwd+bwd", fwd_bwd(_noop_op)),
        ("autograd.Function, no work, fwd+bwd", fwd_bwd(_NoopFunction.apply)),
    ]
    if triton is not None and (device.type == "cuda" or mmsd_ext._backend.triton_interpreting()):
        cases.append(("empty Triton kernel launch", lambda: empty_triton_launch(x)))
    return cases


# ------------------------------------------------------------------ the ops
def op_cases(device, backends, size):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(*size, generator=gen).to(device).requires_grad_() for _ in range(3)]
    shape = "x".join(map(str, size))

    def distill(fn):
        def step():
            for x in xs:
                x.grad = None
            fn().backward()

        return step

    cases = [(f"mmsd_distill_loss fwd+bwd {shape}", "eager", distill(lambda: mmsd_eager(*xs, TEMPERATURE)))]
    for name in backends:
        cases.append((f"mmsd_distill_loss fwd+bwd {shape}", name,
                      distill(lambda name=name: mmsd_ext.mmsd_distill_loss(*xs, TEMPERATURE, backend=name))))

    k = mmsd_ext.mil_k(torch.full((size[0],), size[1], device=device))
    cas = torch.randn(*size, generator=gen).to(device).requires_grad_()

    def topk(fn):
        def step():
            cas.grad = None
            fn().sum().backward()

        return step

    kk = int(k[0])
    cases.append((f"topk_mil_pool fwd+bwd {shape}", "torch.topk",
                  topk(lambda: cas.topk(kk, dim=1).values.mean(dim=1))))
    for name in backends:
        cases.append((f"topk_mil_pool fwd+bwd {shape}", name,
                      topk(lambda name=name: mmsd_ext.topk_mil_pool(cas, k, backend=name))))

    # The benchmark's one-group workload and torchvision anchor at M = NMS_M (bench_nms).
    tensors = bench_nms._tensors(*workloads.one_group_segments(np.random.default_rng(0), NMS_M), None, device)
    segments, scores, _ = tensors
    nms = f"temporal_nms M={NMS_M}"
    if importlib.util.find_spec("torchvision") is not None:
        cases.append((nms, "torchvision", bench_nms._torchvision(tensors)))
    for name in backends:
        cases.append((nms, name, lambda name=name: mmsd_ext.temporal_nms(
            segments, scores, bench_nms.IOU_THRESHOLD, backend=name)))
    return cases


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default=SHAPE, help=f"BxTxC of the distillation and top-k cases (default {SHAPE})")
    p.add_argument("--calls", type=int, default=200, help="calls per round, five rounds (default 200)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="op backends (default: those of mmsd_ext.available_backends() for the device, "
                   "reference left out)")
    args = p.parse_args(argv)
    size = parse_btc(args.shape)
    if size is None:
        p.error(f"--shape: expected BxTxC, e.g. {SHAPE}, got {args.shape!r}")
    if args.calls < 1:
        p.error(f"--calls: expected a number >= 1, got {args.calls}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    usable = [b for b in mmsd_ext.available_backends() if b != "reference"]
    if device.type == "cuda":
        usable = [b for b in usable if b != "cpu"]
    else:
        usable = [b for b in usable if b != "cuda"]
    backends = usable if args.backends is None else args.backends
    for name in backends:
        if name not in usable + ["reference"]:  # (the reference runs anywhere; not timed by default)
            p.error(f"--backends: {name!r} cannot run on {args.device} here (usable: {', '.join(usable + ['reference'])})")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"host time per call, {where}, {args.calls} calls a round, median of 5 rounds")
    print(f"{'case':<40}{'backend':<13}{'host us':>10}{'total us':>10}{'host %':>8}")
    rows = [(name, "", fn) for name, fn in base_cases(device)] + op_cases(device, backends, size)
    failed = 0
    for name, backend, fn in rows:
        try:
            host, total = host_and_total(fn, device, args.calls)
        except Exception as exc:  # one case that fails does not cost the others their rows
            failed += 1
            print(f"{name:<40}{backend:<13}  failed: {_first_line(exc)}", flush=True)
            continue
        print(f"{name:<40}{backend:<13}{host:>10.1f}{total:>10.1f}{100 * host / total:>8.0f}", flush=True)
    if failed:
        print(f"{failed} of {len(rows)} cases failed")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
