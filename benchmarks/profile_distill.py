"""Where the time of a fwd+bwd of ``mmsd_distill_loss`` goes on a GPU, kernel by kernel.

A torch.profiler table of ten calls per backend, after twenty warm ones.

    python -m benchmarks.profile_distill [--shape 10x750x21] [--backends cuda reference]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import mmsd_ext

from .harness import parse_btc


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_distill", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="10x750x21", help="BxTxC (default 10x750x21)")
    p.add_argument("--backends", nargs="+", default=["cuda", "reference"])
    args = p.parse_args(argv)
    shape = parse_btc(args.shape)
    if shape is None:
        p.error(f"--shape: expected BxTxC, e.g. 10x750x21, got {args.shape!r}")
    names = ("reference", "cpu", "cuda", "triton")
    bad = [b for b in args.backends if b not in names]
    if bad:
        p.error(f"--backends: unknown {', '.join(bad)}; choose from {', '.join(names)}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    xs = [torch.randn(*shape, device="cuda", requires_grad=True) for _ in range(3)]

    def step(backend):
        for x in xs:
            x.grad = None
        mmsd_ext.mmsd_distill_loss(*xs, backend=backend).backward()

    for backend in args.backends:
        for _ in range(20):
            step(backend)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step(backend)
            torch.cuda.synchronize()
        print(f"==== {backend}: 10 calls at {args.shape}")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
