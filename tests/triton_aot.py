"""Compiles every Triton kernel of mmsd_ext for a GPU target, with no GPU.

Under the interpreter (the CPU test runs) Triton never compiles a kernel, so an
error that only the compiler sees (a loop-carried value changing type, an op
with no lowering, a tile too large for shared memory) would first show on a
lent GPU. This script closes that gap: it points Triton at a stand-in driver
that names the target (sm_90 by default), makes every launch of the host
launchers in mmsd_ext.kernels compile instead of run, and reports what each
compile gave. It runs in its own process because the interpreter must be off
when triton is imported, and the stand-in driver is process-wide.

    python tests/triton_aot.py [--arch 90] [--json]

Each case calls one host launcher with CPU tensors of the right shapes and
dtypes; the first kernel launch compiles for the target (Triton's own warm-up
path, the same specialisation a GPU launch makes) and stops the launcher, whose
outputs are never read. Exit status 0 when every case compiled to a cubin.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _TargetOnlyDriver:
    """What JITFunction.run asks of a driver before it launches: a device, a stream, a target."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


class _Compiled(Exception):
    """Raised by a launch once its kernel is compiled: the launcher stops there."""

    def __init__(self, name, kernel, constexprs, grid):
        super().__init__(name)
        self.name, self.kernel, self.constexprs, self.grid = name, kernel, constexprs, grid


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    kernel = _ORIGINAL_RUN(self, *args, grid=grid, warmup=True, **kwargs)
    grid = grid(kwargs) if callable(grid) else grid
    raise _Compiled(self.fn.__name__, kernel, {k: v for k, v in kwargs.items() if k.isupper()}, [int(g) for g in grid])


_ORIGINAL_RUN = JITFunction.run


def _cases():
    """(label, thunk) pairs: each thunk calls one host launcher; together they reach every kernel."""
    from mmsd_ext.kernels import distill, temporal_nms, topk_mil_pool

    def topk_forward(dtype, T, largest, C=21):
        B = 2
        scores = torch.zeros(B, T, C, dtype=dtype)
        k = torch.full((B,), 3, dtype=torch.int64)
        lengths = torch.full((B,), T, dtype=torch.int64)
        return lambda: topk_mil_pool.topk_mil_pool_forward(scores, k, lengths, largest)

    def topk_backward(dtype, T, largest, B=2, C=21, expanded=False):
        scores = torch.zeros(B, 1 if expanded else T, C, dtype=dtype).expand(B, T, C)
        k = torch.full((B,), 3, dtype=torch.int64)
        lengths = torch.full((B,), T, dtype=torch.int64)
        key = torch.zeros(B, C, dtype=torch.int64)
        grad_out = torch.zeros(B, C, dtype=dtype)
        return lambda: topk_mil_pool.topk_mil_pool_backward(grad_out, scores, k, lengths, key, key, largest)

    def pair_forward(dtype, C, masked, reduction):
        s, t = torch.zeros(4, 8, C, dtype=dtype), torch.zeros(4, 8, C, dtype=dtype)
        mask = torch.ones(4, 8, dtype=torch.bool) if masked else None
        return lambda: distill.snippet_distill_forward(s, t, 0.5, mask, reduction)

    def pair_backward(dtype, C, reduction):
        s, t = torch.zeros(4, 8, C, dtype=dtype), torch.zeros(4, 8, C, dtype=dtype)
        stats = torch.zeros(4, 8, 4)
        grad = torch.zeros(4, 8) if reduction == 0 else torch.zeros(())
        return lambda: distill.snippet_distill_backward(grad, s, t, stats, torch.ones(()), 0.5, reduction)

    def mmsd_forward(dtype, C, masked):
        r, f, u = (torch.zeros(4, 8, C, dtype=dtype) for _ in range(3))
        mask = torch.ones(4, 8, dtype=torch.bool) if masked else None
        return lambda: distill.mmsd_distill_forward(r, f, u, 0.2, mask)

    def mmsd_backward(dtype, C):
        r, f, u = (torch.zeros(4, 8, C, dtype=dtype) for _ in range(3))
        stats = torch.zeros(4, 8, 8)
        return lambda: distill.mmsd_distill_backward(torch.zeros(()), r, f, u, stats, torch.ones(()), 0.2)

    def nms_mask(kind, grouped):
        n = 200
        seg = torch.zeros(n, 2, dtype=torch.float64)
        groups = torch.zeros(n, dtype=torch.int64) if grouped else None
        return lambda: temporal_nms.temporal_nms_mask(seg, groups, 0.5, kind, 1.0, 4)

    def soft_select(gaussian):
        n = 200
        seg = torch.zeros(n, 2, dtype=torch.float64)
        i64 = torch.zeros(n, dtype=torch.int64)
        i8 = torch.zeros(n, dtype=torch.int8)
        cur = torch.zeros(n, dtype=torch.float64)
        return lambda: temporal_nms.soft_temporal_nms_select(seg, i64, cur, i8, i8, i64, gaussian, 0.5, 0.3, 1e-3, 0.0)

    def bench_empty():
        # The empty kernel whose launch benchmarks/host_overhead.py times on a GPU (imported
        # when the case runs: a failing import is that case's error).
        def launch():
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            from benchmarks import host_overhead

            host_overhead.empty_triton_launch(torch.zeros(1))

        return launch

    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    cases = [("benchmarks.host_overhead empty kernel", bench_empty())]
    # The one-tile forward at few classes and T just past a power of two holds the most
    # registers (226 to 246 at C = 1 and 2).
    for dtype, T, largest, C in [
        (f32, 50, True, 21), (f32, 3000, True, 21), (f16, 3000, False, 21), (bf16, 50, True, 21),
        (f64, 3000, True, 21), (f16, 257, True, 2), (f32, 513, True, 1),
    ]:
        cases.append((f"topk_mil_pool forward {dtype} T={T} C={C} largest={largest}", topk_forward(dtype, T, largest, C)))
    for dtype in (f32, f16, bf16, f64):
        cases.append((f"topk_mil_pool backward {dtype}", topk_backward(dtype, 3000, True)))
    # More tiles of 1024 time steps (at C = 4) than a grid axis past the first may hold (65535):
    # the scores are a view; the gradient (537 MB) is allocated but never written.
    long_video = topk_backward(f16, 65536 * 1024 + 1, True, B=1, C=4, expanded=True)
    cases.append(("topk_mil_pool backward float16 T=67108865 C=4", long_video))
    # Distillation: WTAL's C (21, 101, 201), C = 1, the looped wide rows, and float64
    # (computed in float32 but loaded as float64: other registers).
    for dtype, C, masked, reduction in [
        (f32, 21, False, 1), (f16, 201, True, 0), (bf16, 4096, True, 2), (f32, 1100, False, 1),
        (f32, 1, False, 1), (f64, 21, True, 0), (f64, 1100, False, 2),
    ]:
        cases.append((f"snippet_distill forward {dtype} C={C} mask={masked}", pair_forward(dtype, C, masked, reduction)))
    for dtype, C, reduction in [
        (f32, 21, 0), (f32, 201, 1), (bf16, 4096, 2), (f16, 101, 1),
        (f32, 1, 0), (f64, 21, 1), (f16, 2, 1), (bf16, 2, 0),
    ]:
        cases.append((f"snippet_distill backward {dtype} C={C} reduction={reduction}", pair_backward(dtype, C, reduction)))
    for dtype, C, masked in [
        (f32, 21, False), (bf16, 201, True), (f32, 1024, True), (f32, 2000, False), (f16, 4096, True),
        (f32, 1, False), (f64, 21, True), (f64, 2000, False), (f32, 33, True), (f32, 1, True),
    ]:
        cases.append((f"mmsd_distill forward {dtype} C={C} mask={masked}", mmsd_forward(dtype, C, masked)))
    for dtype, C in [(f32, 21), (bf16, 2000), (f32, 1), (f64, 21), (f16, 1000), (f16, 513), (bf16, 9)]:
        cases.append((f"mmsd_distill backward {dtype} C={C}", mmsd_backward(dtype, C)))
    for kind in (0, 1):
        for grouped in (False, True):
            cases.append((f"temporal_nms mask overlap={('iou', 'other')[kind]} groups={grouped}", nms_mask(kind, grouped)))
    for gaussian in (True, False):
        cases.append((f"soft_temporal_nms {'gaussian' if gaussian else 'linear'}", soft_select(gaussian)))
    return cases


def _ptxas_usage(ptx, target):
    """(registers, spill bytes) per thread from Triton's own ptxas -v, or (None, None) without it."""
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except Exception:
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run([ptxas, "-v", f"--gpu-name={target}", f.name, "-o", os.devnull], capture_output=True, text=True)
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr)
    if done.returncode != 0 or registers is None:
        return None, None
    return int(registers.group(1)), sum(int(x) for x in spills)


def run(arch):
    """Compiles every case for sm_<arch>; returns one dict per case."""
    driver.set_active(_TargetOnlyDriver(arch))
    JITFunction.run = _compile_instead_of_launch
    results = []
    try:
        for label, thunk in _cases():
            start = time.perf_counter()
            row = {"case": label}
            try:
                thunk()
                row["error"] = "the launcher returned without launching a kernel"
            except _Compiled as done:
                kernel = done.kernel
                row.update(
                    kernel=done.name,
                    constexprs={k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in done.constexprs.items()},
                    cubin_bytes=len(kernel.asm.get("cubin", b"")),
                    target=str(kernel.asm.get("ptx", "")).split(".target", 1)[-1].split()[0] if "ptx" in kernel.asm else None,
                    shared_bytes=int(getattr(kernel.metadata, "shared", 0)),
                    num_warps=int(getattr(kernel.metadata, "num_warps", 0)),
                    grid=done.grid,
                    fma=len(re.findall(r"\bfma\.rn(?:\.oob)?(?:\.ftz)?(?:\.sat)?(?:\.relu)?\.(?:f32|f64|f16|f16x2|bf16|bf16x2)\b", str(kernel.asm.get("ptx", "")))),
                )
                row["registers"], row["spill_bytes"] = _ptxas_usage(kernel.asm["ptx"], row["target"]) if row["target"] else (None, None)
            except Exception as error:  # a compile error: reported, not raised, so every case is tried
                row["error"] = f"{type(error).__name__}: {error}"
            row["seconds"] = round(time.perf_counter() - start, 2)
            results.append(row)
    finally:
        JITFunction.run = _ORIGINAL_RUN
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90: H100/H200)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    results = run(args.arch)
    if args.json:
        print(json.dumps({"triton": triton.__version__, "torch": torch.__version__, "arch": args.arch, "results": results}))
    else:
        for row in results:
            what = row.get("error") or (
                f"{row['cubin_bytes']} B cubin, {row['shared_bytes']} B shared, "
                f"{row['registers']} registers, {row['spill_bytes']} B spilled"
            )
            print(f"{row['seconds']:6.2f} s  {row['case']}: {what}")
    return 0 if all("error" not in row for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
