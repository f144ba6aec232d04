"""Shared test setup: hypothesis profiles, the Triton interpreter, backend parametrisation.

Profiles: "ci" (default; derandomized, so every run checks the same examples)
and "dev" (random, more examples): HYPOTHESIS_PROFILE=dev pytest tests.
"""

import os

# Without a GPU, Triton kernels run under the interpreter; it must be chosen
# before triton is first imported.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import mmsd_ext  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=20, suppress_health_check=_SLOW_OK)
settings.register_profile("dev", deadline=None, max_examples=100, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu: touches the GPU where there is one, though its name does not say so "
        "(benchmarks/device_check.sh selects the GPU tests by -k, which matches marker names too)",
    )


AVAILABLE = mmsd_ext.available_backends()
HAS_GPU = torch.cuda.is_available()


def backend_device(backend):
    """The device a backend's tests run on: CUDA for cuda (and triton with a GPU), else the CPU."""
    if backend == "cuda" or (backend == "triton" and HAS_GPU):
        return torch.device("cuda")
    return torch.device("cpu")


def _backend_param(name):
    reason = None
    if name not in AVAILABLE:
        reason = f"backend {name!r} is not available here (build_info: {mmsd_ext.build_info()['backends']})"
    return pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


@pytest.fixture(params=[_backend_param(n) for n in ("cpu", "cuda", "triton")])
def backend(request):
    """Each compiled backend in turn (skipped where unavailable); the reference is the oracle."""
    return request.param


@pytest.fixture(params=[_backend_param(n) for n in ("reference", "cpu", "cuda", "triton")])
def any_backend(request):
    """Every backend, the reference included (for bad-input and edge-case tests)."""
    return request.param
