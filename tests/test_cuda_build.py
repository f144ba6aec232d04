"""The CUDA kernels in the built extension: machine code for sm_90, no register spills.

CI builds the CUDA kernels without a GPU to run them. This reads the compiled
extension with cuobjdump (the one that ships with Triton, or the toolkit's):
every CUDA kernel has sm_90 code (H100/H200), and none uses local memory, which
is where the compiler puts registers it spills. cuobjdump reports spilled
registers (and local arrays) as the kernel's STACK frame; its LOCAL column
stays 0 for them with CUDA 13.
"""

import glob
import os
import re
import shutil
import subprocess

import pytest

from mmsd_ext import _loader

KERNELS = {
    "topk_mil_pool_forward_kernel",
    "topk_mil_pool_backward_kernel",
    "snippet_distill_forward_kernel",
    "snippet_distill_backward_kernel",
    "mmsd_distill_forward_kernel",
    "mmsd_distill_backward_kernel",
    "distill_finalize_kernel",
    "temporal_nms_mask_kernel",
    "temporal_nms_gather_kernel",
    "soft_temporal_nms_kernel",
    "descending_key_kernel",
}


def _cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def sm90_kernels():
    if not _loader.cuda_compiled():
        pytest.skip("the extension was built without its CUDA kernels")
    archs = (_loader.BUILD_INFO or {}).get("archs") or ""
    if "9.0" not in archs:
        pytest.skip(f"the CUDA kernels were built for {archs!r}, not sm_90")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here (neither on PATH, in Triton, nor in /usr/local/cuda*)")
    done = subprocess.run([tool, "--dump-resource-usage", _loader._C.__file__], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels, arch = [], None
    lines = done.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        match = re.match(r"\s*Function (\S+):", line)
        if match and arch == "sm_90":
            usage = dict(re.findall(r"(\w+):(\d+)", lines[i + 1]))
            kernels.append((match.group(1), {k: int(v) for k, v in usage.items()}))
    return kernels


def test_every_cuda_kernel_has_sm90_code(sm90_kernels):
    found = {name for name in KERNELS if any(name in mangled for mangled, _ in sm90_kernels)}
    assert found == KERNELS, f"missing from the sm_90 code: {sorted(KERNELS - found)}"


# Known stack frames (bytes), by mangled-name part. ptxas (CUDA 13.0, -Xptxas -v) spills 4 bytes,
# an 8-byte frame, in the float64 three-way forward of the widest rows without a mask; float64 is
# the test dtype, not a training one.
KNOWN_STACK = {"mmsd_distill_forward_kernelIdLi32ELi0ELb0E": 8}


def test_no_cuda_kernel_spills(sm90_kernels):
    assert sm90_kernels, "no sm_90 kernel found in cuobjdump's output"
    spilled = []
    for mangled, usage in sm90_kernels:
        allowed = max([b for part, b in KNOWN_STACK.items() if part in mangled], default=0)
        if usage.get("STACK", 0) > allowed or usage.get("LOCAL", 0) > 0:
            spilled.append(f"{mangled}: {usage}")
    assert not spilled, "kernels using local memory (spilled registers or local arrays):\n" + "\n".join(spilled)
