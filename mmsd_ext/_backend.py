"""Which implementation of an op runs.

Every public op takes ``backend=None``. The name is resolved, in this order, from
the call's argument, the innermost ``use_backend(...)`` context, the
``MMSD_EXT_BACKEND`` environment variable (read at import; a bad name is a ValueError
where it would be used), and finally "auto":
``cpu`` for CPU tensors, the op's faster measured GPU backend for CUDA tensors,
``reference`` where nothing compiled can run. "auto" given at any of these levels
is that automatic choice, and the levels below it are not read.
"""

import contextlib
import importlib.util
import os
import threading
import warnings

import torch

from . import _loader

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "MMSD_EXT_BACKEND"


def _check_name(name, what):
    if name is not None and name not in BACKENDS + ("auto",):
        raise ValueError(f"{what}: expected one of {', '.join(BACKENDS)} or 'auto', got {name!r}")
    return None if name == "auto" else name


_env_value = os.environ.get(ENV_VAR) or None
try:
    _global_override, _env_error = _check_name(_env_value, ENV_VAR), None
except ValueError as error:
    # Refused where it would be read (an op's backend=None outside any use_backend block),
    # not at import: `import mmsd_ext` then works, and a command line tool that takes the
    # variable as its --backend (python -m mmsd_ext.train) reports it as it reports its flags.
    _global_override, _env_error = None, str(error)
# The use_backend() blocks of each thread, innermost last: one thread's block never
# changes what another thread's calls resolve to. (threading.local, not a ContextVar:
# dynamo traces a block inside a compiled function through this list, not ContextVar.set.)
_threads = threading.local()


def _stack():
    stack = getattr(_threads, "stack", None)
    if stack is None:
        stack = _threads.stack = []
    return stack


def use_backend(name):
    """Run every mmsd_ext op inside the block with backend ``name`` ("auto" restores the default).

    An explicit ``backend=`` argument still wins. The block covers the calls of the thread
    that entered it; other threads keep their own setting. A name that is not a backend
    is refused at the call, before the block. A call that is never entered as a ``with``
    block changes nothing, and warns when it is dropped. Example::

        with mmsd_ext.use_backend("reference"):
            loss = mmsd_ext.mmsd_distill_loss(rgb, flow, fused)
    """
    return _BackendBlock(_check_name(name, "use_backend"), name)


class _BackendBlock(contextlib.ContextDecorator):
    """A with block, or (as contextlib's blocks) a decorator that opens it on every call."""

    def __init__(self, name, given):
        self._name, self._given, self._entered = name, given, False

    def __call__(self, func):
        self._entered = True  # used: as a decorator
        return super().__call__(func)

    def __enter__(self):
        self._entered = True
        _stack().append(self._name)

    def __exit__(self, *exc_info):
        _stack().pop()
        return False

    def __del__(self):
        # As Python's "coroutine ... was never awaited": `mmsd_ext.use_backend("cpu")` as a
        # statement reads as a setting but is a block that was never opened.
        # (getattr: dynamo, tracing a block inside a compiled function, makes one without __init__.)
        if not getattr(self, "_entered", True):
            warnings.warn(
                f"use_backend({self._given!r}) was never entered, so it changed nothing: it is a block, "
                f"`with mmsd_ext.use_backend({self._given!r}): ...`; {ENV_VAR} sets the backend of a process",
                RuntimeWarning,
                stacklevel=2,
            )


def _current_override():
    stack = getattr(_threads, "stack", None)
    if stack:
        return stack[-1]
    if _env_error is not None:
        raise ValueError(_env_error)
    return _global_override


# Looked up once: a search of sys.path on every call would cost host time, and
# torch.compile cannot trace importlib (an op called inside a compiled function
# resolves its backend there).
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable():
    return _TRITON_IMPORTABLE


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def cuda_usable():
    return _loader.cuda_compiled() and torch.cuda.is_available()


def available_backends():
    """Names usable in this process, in BACKENDS order."""
    names = ["reference"]
    if _loader.compiled_available():
        names.append("cpu")
    if cuda_usable():
        names.append("cuda")
    if triton_importable() and (torch.cuda.is_available() or triton_interpreting()):
        names.append("triton")
    return names


def _unavailable(name, device):
    if name == "cpu":
        return RuntimeError(_loader.LOAD_ERROR or "mmsd_ext: the cpu backend is not available")
    if name == "cuda":
        if not _loader.compiled_available():
            return RuntimeError(_loader.LOAD_ERROR)
        if not _loader.cuda_compiled():
            return RuntimeError(
                "backend='cuda': mmsd_ext was built without its CUDA kernels; rebuild on a machine with the "
                "CUDA toolkit: `FORCE_CUDA=1 pip install --no-build-isolation -e .`"
            )
        return RuntimeError("backend='cuda': no CUDA device is visible to torch in this process")
    if name == "triton":
        if not triton_importable():
            return RuntimeError("backend='triton': triton is not installed; `pip install triton`")
        return RuntimeError(
            f"backend='triton': tensors are on {device}; Triton kernels run on CUDA devices, or on the CPU "
            "only under the interpreter (set TRITON_INTERPRET=1 before triton is imported; slow, for tests)"
        )
    return RuntimeError(f"backend={name!r} is not available")


def requested(backend):
    """The name a call asks for: its ``backend`` argument, else the innermost
    ``use_backend`` block or the environment variable; None for auto. A call's
    "auto" is the automatic choice whatever a block or the environment says, as
    ``use_backend("auto")`` is inside its block."""
    if backend == "auto":
        return None
    name = _check_name(backend, "backend")
    return _current_override() if name is None else name


def resolve(op, backend, device, *, supported=BACKENDS, gpu_order=("cuda", "triton")):
    """The backend that runs ``op`` on tensors on ``device``.

    ``supported``: the backends this op has. ``gpu_order``: its GPU backends,
    fastest first as measured by benchmarks/ (auto picks the first usable one).
    Raises ValueError for a bad name or a backend that does not fit the device,
    RuntimeError for one that is not available, with how to get it.
    """
    name = requested(backend)
    device = torch.device(device)
    if name is None:
        return _auto(op, device, supported, gpu_order)
    if backend not in (None, "auto"):
        return _named(op, name, device, supported)
    # The name came from a block or the environment: the error says so.
    origin = "a use_backend block" if getattr(_threads, "stack", None) else ENV_VAR
    try:
        return _named(op, name, device, supported)
    except (ValueError, RuntimeError) as error:
        raise type(error)(f"{error} (the backend was set by {origin})") from None


def _named(op, name, device, supported):
    if name not in supported:
        raise ValueError(f"backend: {op} has no {name!r} implementation; it has {', '.join(supported)}")
    if name == "reference":
        return name
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, but the tensors of {op} are on {device}")
        if not _loader.compiled_available():
            raise _unavailable(name, device)
        return name
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors, but the tensors of {op} are on {device}")
        if not _loader.cuda_compiled():
            raise _unavailable(name, device)
        return name
    if name == "triton":
        if not triton_importable():
            raise _unavailable(name, device)
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise _unavailable(name, device)
        return name
    raise AssertionError(name)


def _auto(op, device, supported, gpu_order):
    if device.type == "cpu":
        if "cpu" in supported and _loader.compiled_available():
            return "cpu"
        return "reference"
    if device.type == "cuda":
        for name in gpu_order:
            if name not in supported:
                continue
            if name == "cuda" and _loader.cuda_compiled():
                return name
            if name == "triton" and triton_importable():
                return name
    return "reference"


def build_info():
    """How this mmsd_ext was built and what can run here.

    Returns a dict: ``version``, ``torch`` (the torch the build info records the
    extension was built against, or None without build info), ``torch_running``, ``cuda`` (CUDA version the
    kernels were compiled with, or None), ``archs`` (TORCH_CUDA_ARCH_LIST used),
    ``backends`` (names usable in this process), ``compiled`` (whether the
    extension loaded), ``load_error`` (why not, or None) and ``cpu_isa`` (the
    vector instructions the cpu distillation kernels use in this process:
    ``"avx512"``, ``"avx2"`` or ``"baseline"``, the widest the CPU has unless
    ``MMSD_EXT_DISTILL_CPU_ISA`` asks for one; None without the extension) and
    ``sanitize`` (whether it was built with ``MMSD_EXT_SANITIZE=1``: checked, and slow) and
    ``sources_changed`` (whether the checkout this package sits in holds other C++/CUDA
    sources in csrc/ than the loaded extension was built from, as the import warns; None
    where that cannot be told: an installed copy, or no extension loaded).

    Raises:
        ValueError naming ``MMSD_EXT_DISTILL_CPU_ISA`` when it holds another name,
        or asks for instructions this CPU lacks (the cpu distillation ops raise
        the same error).
    """
    from . import __version__

    info = _loader.BUILD_INFO or {}
    compiled = _loader._C
    return {
        "version": __version__,
        "torch": info.get("torch"),
        "torch_running": torch.__version__,
        "cuda": compiled.cuda_version if compiled is not None else info.get("cuda"),
        "archs": info.get("archs"),
        "backends": available_backends(),
        "compiled": compiled is not None,
        "load_error": _loader.LOAD_ERROR,
        "cpu_isa": compiled.distill_cpu_isa() if compiled is not None else None,
        "sanitize": bool(info.get("sanitize", False)),
        "sources_changed": _loader.SOURCES_CHANGED,
    }
