"""Every Triton kernel compiles for sm_90 (H100/H200), on a machine with or without a GPU.

The CPU runs check the kernels' results under Triton's interpreter, which never
compiles them; tests/triton_aot.py compiles each one, as a launch on an H100 would,
through Triton's own compiler and ptxas. Here: every kernel compiles in every
specialisation the launchers choose, and none spills registers or asks for more
shared memory than an sm_90 block may have.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = {
    "_topk_mil_pool_forward_kernel",
    "_topk_mil_pool_backward_kernel",
    "_snippet_distill_forward_kernel",
    "_snippet_distill_backward_kernel",
    "_mmsd_distill_forward_kernel",
    "_mmsd_distill_backward_kernel",
    "_temporal_nms_mask_kernel",
    "_soft_temporal_nms_kernel",
    "_empty_kernel",  # benchmarks/host_overhead.py's, whose launch it times on a GPU
}
SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one sm_90 block may use


def _has_nvidia_backend():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.fixture(scope="module")
def compiled():
    if not _has_nvidia_backend():
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_aot.py"), "--arch", "90", "--json"],
        capture_output=True, text=True, env=env, cwd="/", timeout=600,
    )
    assert done.stdout.strip(), f"triton_aot.py printed nothing; stderr:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(compiled):
    failed = [f"{r['case']}: {r['error']}" for r in compiled["results"] if "error" in r]
    assert not failed, "\n".join(failed)
    assert {r["kernel"] for r in compiled["results"]} == KERNELS
    for row in compiled["results"]:
        assert row["cubin_bytes"] > 0, row["case"]
        assert row["target"].startswith("sm_90"), row


def test_no_kernel_spills_or_overflows_shared_memory(compiled):
    rows = [r for r in compiled["results"] if "error" not in r]
    assert rows
    if all(r["registers"] is None for r in rows):
        pytest.skip("ptxas -v gave no register counts with this Triton")
    spilled = [f"{r['case']}: {r['spill_bytes']} B ({r['registers']} registers)" for r in rows if r["spill_bytes"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    for row in rows:
        assert row["registers"] <= 255, row
        assert row["shared_bytes"] <= SM90_SHARED_BYTES, row


def test_distillation_backwards_round_every_product(compiled):
    # Triton contracts a * b - c into one fma by default; the interpreter never does. In
    # the backward kernels that would make p_s - p_t of equal logits the rounding error
    # of a product instead of exactly 0, unlike the CPU and CUDA kernels and the
    # interpreter runs (test_student_equal_to_teacher_gives_entropy_and_zero_gradient).
    rows = [r for r in compiled["results"] if r.get("kernel", "").endswith("_distill_backward_kernel")]
    assert {r["kernel"] for r in rows} == {"_snippet_distill_backward_kernel", "_mmsd_distill_backward_kernel"}
    # Every fused multiply-add counts, in any precision (float64 and half ones too).
    assert all(r["fma"] == 0 for r in rows), [(r["case"], r["fma"]) for r in rows if r["fma"]]
    # The count works: the top-k forward's total + need * kth is contracted (which only makes
    # it more exact), in float32 and, for float64 scores, in float64.
    topk = {r["case"]: r["fma"] for r in compiled["results"] if r.get("kernel") == "_topk_mil_pool_forward_kernel"}
    assert topk["topk_mil_pool forward torch.float32 T=3000 C=21 largest=True"] > 0, topk
    assert topk["topk_mil_pool forward torch.float64 T=3000 C=21 largest=True"] > 0, topk


def test_every_launch_fits_the_cuda_grid(compiled):
    # CUDA takes up to 2**31 - 1 programs on grid axis 0 and 65535 on axes 1 and 2; the
    # interpreter has no limits. One case (the top-k backward of a 67M-step video) has
    # more time tiles than axes 1 and 2 may hold.
    rows = [r for r in compiled["results"] if "error" not in r]
    assert any(max(r["grid"]) > 65535 for r in rows)
    for row in rows:
        assert 1 <= len(row["grid"]) <= 3 and row["grid"][0] <= 2**31 - 1, row
        assert all(g <= 65535 for g in row["grid"][1:]), row


def test_soft_nms_compiles_its_gpu_exp(compiled):
    # Compiled, the gaussian decay uses libdevice's float64 exp; only the interpreter
    # (which has no libdevice) takes tl.exp. The choice follows the kernel object.
    soft = [r for r in compiled["results"] if r.get("kernel") == "_soft_temporal_nms_kernel"]
    assert soft and all(r["constexprs"]["LIBDEVICE_EXP"] is True for r in soft)
    from mmsd_ext.kernels import temporal_nms
    from triton.runtime.jit import JITFunction

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert isinstance(temporal_nms._soft_temporal_nms_kernel, JITFunction) != interpreted
