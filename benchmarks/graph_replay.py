"""Kernel time without the host: fwd+bwd captured in a CUDA graph and replayed.

On the H200 machine an eager fwd+bwd of ``mmsd_distill_loss`` on the cuda backend
took 0.21 to 0.25 ms from (10, 750, 21) to (32, 2304, 201): the host (Python,
dispatch, autograd, launches) set the pace, not the kernels, so the benchmark's
``% copy`` there says nothing about the kernels. A CUDA graph replays the captured
kernels in one launch; its time is the kernels' (plus a few microseconds for the
graph launch). The differentiable ops make no host synchronisation, so they can be
captured (``torch.cuda.graph``), as a training step under CUDA graphs or
``torch.compile(mode="reduce-overhead")`` runs them.

For each op, size and provider (the mmsd_ext backends and the benchmark's eager
anchor), on the same tensors:

- ``call ms``: an ordinary fwd+bwd, gradients reset before each (as the benchmark's
  fwd+bwd pass);
- ``replay ms``: one replay of that fwd+bwd, captured once;
- ``% copy``: least traffic (the benchmark's count, bench_distill.py and
  bench_topk_mil_pool.py) over the time, against the copy bandwidth measured here,
  for the call and for the replay;
- ``x anchor``: the anchor's replay time over the provider's;
- ``check``: the replay's loss and gradients (set to NaN before it) against the
  anchor's ordinary call, with the benchmark's tolerances and comparison.

Timing: ``benchmarks.harness.measure`` (CUDA events around each call, L2 cleared and
the GPU idle before it, median). Float32, inputs as in the benchmark.

    python -m benchmarks.graph_replay [--ops mmsd_distill_loss topk_mil_pool] [--sizes 10x750x21 64x4608x201]
                                      [--backends cuda triton] [--min-run-time 0.2]
"""

import argparse
import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

import mmsd_ext

from . import bench_distill, bench_topk_mil_pool
from .harness import TOLERANCES, Settings, _first_line, _fmt, compare_tensors, copy_bandwidth, measure, parse_btc

OPS = ("mmsd_distill_loss", "snippet_distill_loss", "topk_mil_pool")
SIZES = ("10x750x21", "32x2304x201", "64x4608x201")
ANCHOR = {"mmsd_distill_loss": "eager", "snippet_distill_loss": "eager", "topk_mil_pool": "torch.topk"}
DTYPE = torch.float32


@dataclass
class Step:
    """One provider's fwd+bwd on a case's tensors."""

    op: str
    shape: tuple
    provider: str
    forward: Callable[[], torch.Tensor]  # the op's output
    leaves: List[torch.Tensor]  # the inputs that receive gradients
    grad_out: Optional[torch.Tensor]  # backward's upstream gradient (None: a scalar output)
    least_bytes: int  # fwd+bwd, the benchmark's count

    def __call__(self):
        for x in self.leaves:
            x.grad = None
        out = self.forward()
        out.backward(self.grad_out)
        return out

    def result(self, out):
        """(output, gradients), the form the benchmark's comparisons take."""
        return out.detach(), [x.grad for x in self.leaves]

    def compare(self, expected, got):
        rtol, atol = TOLERANCES[DTYPE]
        if self.op == "topk_mil_pool":
            # Ties straddling the k-th place may send the gradient to either (the
            # benchmark's comparison: the gradient's sum and count per (video, class)).
            expected, got = bench_topk_mil_pool._tie_free(expected), bench_topk_mil_pool._tie_free(got)
        return compare_tensors(expected, got, rtol, atol)


def steps(op, shape, device, backends, seed=0):
    """The anchor's step first, then one per backend, all on the same tensors."""
    B, T, C = shape
    gen = torch.Generator().manual_seed(seed)
    if op == "topk_mil_pool":
        k = max(1, T // 8)  # the benchmark's rule (MMSD's)
        scores = torch.randn(B, T, C, generator=gen).to(device=device, dtype=DTYPE).requires_grad_()
        grad_out = torch.randn(B, C, generator=gen).to(device=device, dtype=DTYPE)
        ks = torch.full((B,), k, dtype=torch.int64, device=device)
        lengths = torch.full((B,), T, dtype=torch.int64, device=device)
        least = bench_topk_mil_pool.least_bytes(shape, DTYPE)["fwd+bwd"]

        def make(name, forward):
            return Step(op, shape, name, forward, [scores], grad_out, least)

        out = [make(ANCHOR[op], lambda: bench_topk_mil_pool.topk_mean(scores, k))]
        for name in backends:
            out.append(make(name, lambda name=name: mmsd_ext.topk_mil_pool(scores, ks, lengths, backend=name)))
        return out
    if op not in ("mmsd_distill_loss", "snippet_distill_loss"):
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
    n_inputs, n_grads = (3, 3) if op == "mmsd_distill_loss" else (2, 1)
    xs = [torch.randn(B, T, C, generator=gen).to(device=device, dtype=DTYPE).requires_grad_(i < n_grads)
          for i in range(n_inputs)]
    least = bench_distill.least_bytes(op, shape, DTYPE)["fwd+bwd"]
    tau = bench_distill.TEMPERATURE
    eager = bench_distill.mmsd_eager if op == "mmsd_distill_loss" else bench_distill.category_cross_entropy
    fn = getattr(mmsd_ext, op)

    def make(name, forward):
        return Step(op, shape, name, forward, xs[:n_grads], None, least)

    out = [make(ANCHOR[op], lambda: eager(*xs, tau))]
    for name in backends:
        out.append(make(name, lambda name=name: fn(*xs, tau, backend=name)))
    return out


def capture(step):
    """A CUDA graph of ``step`` (warmed up on a side stream first), its output and gradients."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compilation and autotuning stay out of the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    # step() set the gradients to None before the capture, so backward allocated them
    # in the graph's pool: every replay writes these tensors.
    return graph, out, [x.grad for x in step.leaves]


@dataclass
class Row:
    op: str
    shape: str
    provider: str
    call_ms: float = math.nan
    replay_ms: float = math.nan
    least_bytes: int = 0
    check: str = ""


def run_case(op, shape, backends, settings, log=print):
    """Rows of one (op, shape): the anchor's first."""
    device = torch.device("cuda")
    rows, anchor_result = [], None
    for n, step in enumerate(steps(op, shape, device, backends)):
        row = Row(op, "x".join(map(str, shape)), step.provider, least_bytes=step.least_bytes)
        rows.append(row)
        try:
            call_result = step.result(step())
            call_result = (call_result[0].clone(), [g.clone() for g in call_result[1]])
            if n == 0:
                anchor_result = call_result
            row.call_ms = measure(step, "cuda", settings).median
            graph, out, grads = capture(step)
            for t in [out, *grads]:
                t.detach().fill_(math.nan)  # a replay that writes nothing cannot pass the check
            graph.replay()
            torch.cuda.synchronize()
            # Against the anchor's ordinary call; where that failed, there is nothing to check against.
            row.check = step.compare(anchor_result, (out.detach(), grads)) if anchor_result is not None else "no anchor result"
            row.replay_ms = measure(graph.replay, "cuda", settings).median
        except Exception as exc:  # one provider's failure is a row, not the end of the run
            row.check = _first_line(exc)[:120]
            log(f"  {op} {row.shape} {step.provider}: {row.check}")
        finally:
            # The graph's memory pool goes before the next provider captures its own.
            graph = out = grads = t = None  # noqa: F841
            for x in step.leaves:
                x.grad = None
            torch.cuda.empty_cache()
    return rows


def format_rows(rows, copy_gbps):
    """The table: % copy of the call and the replay, x anchor at replay (the anchor is each case's first row)."""
    head = (f"{'op':<22}{'shape':<13}{'provider':<12}{'call ms':>9}{'replay ms':>11}"
            f"{'% copy call':>13}{'% copy replay':>15}{'x anchor':>10}  check")
    lines = [head]
    anchor = {}
    for r in rows:
        key = (r.op, r.shape)
        anchor.setdefault(key, r.replay_ms)

        def pct(ms):  # NaN (not measured) stays NaN, which _fmt shows as "-"
            return _fmt(100 * r.least_bytes / (ms * 1e-3) / 1e9 / copy_gbps if ms > 0 else math.nan, ".1f")

        ratio = anchor[key] / r.replay_ms if r.replay_ms > 0 else math.nan
        lines.append(f"{r.op:<22}{r.shape:<13}{r.provider:<12}{_ms(r.call_ms):>9}{_ms(r.replay_ms):>11}"
                     f"{pct(r.call_ms):>13}{pct(r.replay_ms):>15}{_fmt(ratio, '.2f'):>10}  {r.check}")
    return "\n".join(lines)


def _ms(v):
    return _fmt(v, ".4f" if v < 1 else ".3f")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.graph_replay", description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", default=list(OPS), help=f"subset of: {', '.join(OPS)} (default: all)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), help=f"BxTxC (default: {' '.join(SIZES)})")
    p.add_argument("--backends", nargs="+", default=None,
                   help="op backends (default: cuda and triton, those available here)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timed calls per figure (default 0.2)")
    args = p.parse_args(argv)
    for op in args.ops:
        if op not in OPS:
            p.error(f"--ops: expected a subset of {', '.join(OPS)}, got {op!r}")
    sizes = []
    for text in args.sizes:
        size = parse_btc(text)
        if size is None:
            p.error(f"--sizes: expected BxTxC, e.g. 10x750x21, got {text!r}")
        sizes.append(size)
    if not 0 < args.min_run_time < float("inf"):
        p.error(f"--min-run-time: expected a finite number of seconds > 0, got {args.min_run_time:g}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (it times CUDA graph replays): none here")
    usable = [b for b in ("cuda", "triton") if b in mmsd_ext.available_backends()]
    backends = usable if args.backends is None else args.backends
    for name in backends:
        if name not in usable:
            p.error(f"--backends: {name!r} cannot run on CUDA tensors here (usable: {', '.join(usable) or 'none'})")
    settings = Settings(device="cuda", min_run_time=args.min_run_time, progress=False)
    copy_gbps = copy_bandwidth("cuda", settings)
    print(f"fwd+bwd, ordinary call and CUDA graph replay, {torch.cuda.get_device_name()}, float32; "
          f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    # Each case's rows as soon as they are measured: a run cut short keeps what it measured.
    print(format_rows([], copy_gbps), flush=True)
    failed = 0
    for op in args.ops:
        for size in sizes:
            try:
                rows = run_case(op, size, backends, settings)
            except Exception as exc:  # e.g. out of memory making the inputs: the next case still runs
                failed += 1
                print(f"{op:<22}{'x'.join(map(str, size)):<13}failed: {_first_line(exc)}"[:160], flush=True)
            else:
                failed += sum(r.check != "ok" for r in rows)
                print("\n".join(format_rows(rows, copy_gbps).splitlines()[1:]), flush=True)
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
