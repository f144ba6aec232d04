"""fwd+bwd of ``mmsd_distill_loss``: the two ways through its autograd (csrc/autograd.cpp).

Where all three inputs need a gradient, the cpu and cuda backends write the
gradients in the forward and hand them over in the backward, scaled in place by
the upstream gradient (a pass skipped where that is 1). Otherwise the backward
recomputes them from the inputs. Traffic, N elements per input: upstream 1,
read 3N + write 3N; upstream != 1, 3N + 3N more for the scaling; recompute,
read 3N (forward) + read 3N and write 3N (backward). Rows:

- ``forward, upstream 1``: ``loss.backward()``.
- ``forward, upstream 0.5``: ``(0.5 * loss).backward()`` (a weighted loss term).
- ``recompute``: rgb without a gradient, so the forward saves statistics only; the
  backward kernel still writes all three gradients (the work of the other way
  when a second backward or torch.compile takes it).

``% copy`` = least traffic (read three inputs, write three gradients) / time,
against the copy bandwidth of ``benchmarks.harness.copy_bandwidth`` (a tensor far
larger than the caches, as ``python -m benchmarks`` measures it), once per run.

    python -m benchmarks.distill_upstream [--device cuda] [--shapes 10x750x21 64x4608x201]
"""

import argparse

import torch

import mmsd_ext

from .bench_distill import TEMPERATURE
from .harness import Settings, copy_bandwidth, parse_btc, timer_class


def _median_s(fn, min_run_time):
    fn()
    # Timer's own default is one thread: on the CPU the kernels would run on one core, against a
    # copy bandwidth (and the main benchmark's figures) measured on all of torch's threads.
    timer = timer_class()("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill_upstream", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", default=["10x750x21", "32x2304x201"], help="BxTxC shapes")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per row (default 1)")
    args = p.parse_args(argv)
    if not 0 < args.min_run_time < float("inf"):
        p.error(f"--min-run-time: expected a number of seconds > 0, got {args.min_run_time:g}")
    shapes = []
    for text in args.shapes:
        shape = parse_btc(text)
        if shape is None:
            p.error(f"--shapes: expected BxTxC, e.g. 10x750x21, got {text!r}")
        shapes.append(shape)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.device not in mmsd_ext.available_backends():
        p.error(f"--device {args.device}: the {args.device} backend is not available here")
    device = torch.device(args.device)
    copy_bw = copy_bandwidth(args.device, Settings(device=args.device, min_run_time=args.min_run_time)) * 1e9
    print(f"mmsd_distill_loss fwd+bwd, backend {args.device}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write), {torch.get_num_threads()} threads")
    print(f"{'shape':<14}{'way':<24}{'median ms':>11}{'% copy':>8}")
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(*shape, generator=gen).to(device) for _ in range(3)]
        n_bytes = base[0].numel() * base[0].element_size()
        ways = [("forward, upstream 1", (True, True, True), None),
                ("forward, upstream 0.5", (True, True, True), 0.5),
                ("recompute", (False, True, True), None)]
        for name, needs, weight in ways:
            t = _time_way(base, needs, weight, args.device, args.min_run_time)
            pct = 100 * 6 * n_bytes / t / copy_bw
            print(f"{'x'.join(map(str, shape)):<14}{name:<24}{t * 1e3:>11.3f}{pct:>8.1f}")


def _time_way(base, needs, weight, backend, min_run_time):
    """Median seconds of a fwd+bwd on copies of ``base`` (freed on return)."""
    xs = [x.clone().requires_grad_(n) for x, n in zip(base, needs)]

    def step():
        for x in xs:
            x.grad = None
        loss = mmsd_ext.mmsd_distill_loss(*xs, TEMPERATURE, backend=backend)
        (loss if weight is None else weight * loss).backward()

    return _median_s(step, min_run_time)


if __name__ == "__main__":
    main()
