"""Loads the compiled extension, or says once why it is not there.

Four failures are told apart (the first two as xformers' loader does): the
extension was never built, it was built for another torch, it was built from
mmsd_ext sources of another binary interface than these (a checkout updated across
an interface change without a rebuild), or it was built with MMSD_EXT_SANITIZE=1 and
the process lacks the ASan runtime (or has it without libstdc++ preloaded).
Either way the import of mmsd_ext succeeds and the ``reference`` and ``triton``
backends keep working; asking for ``cpu`` or ``cuda`` then raises with the reason.

A build of other C++/CUDA sources of the same interface (csrc/ edited, or a checkout
updated, without a rebuild) loads, with a warning, where the package sits in its
checkout (beside setup.py and csrc/): its kernels are those of the build.
"""

import ctypes
import importlib
import json
import os
import warnings

import torch

from . import _sources

_HERE = os.path.dirname(os.path.abspath(__file__))
# What this Python package needs of the compiled extension. Bump it when a change
# makes a build of older sources wrong with these (2: the autograd of the compiled
# ops moved from Python into the extension, csrc/autograd.cpp; a build without it
# would give no gradients; 3: build_info() reads the cpu kernels' vector ISA from
# _C.distill_cpu_isa). setup.py reads it from here into _build_info.json.
BINARY_INTERFACE = 3
REBUILD_HINT = "build it with `pip install --no-build-isolation -e .` in the mmsd_ext source tree"
# libstdc++ too: ASan finds the __cxa_throw it wraps only in libraries loaded before it
# starts; a C++ exception (any error the ops raise) otherwise ends the process.
SANITIZER_HINT = (
    'run Python with the runtimes preloaded: LD_PRELOAD="$(gcc -print-file-name=libasan.so) '
    '$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 python ...'
)


def _read_build_info():
    path = os.path.join(_HERE, "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _asan_runtime_loaded():
    # Preloaded, the runtime's symbols are in the process's global scope.
    try:
        return hasattr(ctypes.CDLL(None), "__asan_init")
    except OSError:
        return False


def _cxx_runtime_preloaded():
    # Whether libstdc++ was loaded before ASan started (preloaded): only then does ASan's
    # wrapper of __cxa_throw find the real one. Loaded later (by torch's import), the first
    # C++ exception fails ASan's CHECK on it and ends the process, whoever throws it.
    preload = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    return any(os.path.basename(entry).startswith("libstdc++") for entry in preload)


def _load():
    info = _read_build_info()
    # Local version labels (+cu130) are part of the ABI, so the whole string must match.
    if info is not None and info.get("torch") != torch.__version__:
        return None, info, (
            f"mmsd_ext: the compiled extension was built for torch {info.get('torch')}, "
            f"but this process runs torch {torch.__version__}; the cpu/cuda backends are disabled. "
            f"Re-{REBUILD_HINT}."
        )
    if info is not None and info.get("binary_interface", 1) != BINARY_INTERFACE:
        return None, info, (
            f"mmsd_ext: the compiled extension was built from other mmsd_ext sources (binary interface "
            f"{info.get('binary_interface', 1)}; these sources need {BINARY_INTERFACE}); the cpu/cuda "
            f"backends are disabled. Re-{REBUILD_HINT}."
        )
    if info is not None and info.get("sanitize") and not _asan_runtime_loaded():
        # Loaded without it, AddressSanitizer ends the process ("ASan runtime does not come
        # first in initial library list"): no ImportError the import could survive.
        return None, info, (
            "mmsd_ext: the compiled extension was built with MMSD_EXT_SANITIZE=1 and this process has no "
            f"AddressSanitizer runtime; the cpu/cuda backends are disabled. To use it, {SANITIZER_HINT}"
        )
    if info is not None and info.get("sanitize") and not _cxx_runtime_preloaded():
        return None, info, (
            "mmsd_ext: the compiled extension was built with MMSD_EXT_SANITIZE=1 and this process has the "
            "AddressSanitizer runtime but not libstdc++ preloaded: ASan would end it at the first error an op "
            f"raises; the cpu/cuda backends are disabled. To use it, {SANITIZER_HINT}"
        )
    try:
        module = importlib.import_module("mmsd_ext._C")
    except ImportError as exc:
        text = str(exc)
        if "undefined symbol" in text or ("version" in text.lower() and "GLIBC" not in text):
            why = (
                "mmsd_ext: the compiled extension does not match this torch "
                f"(torch {torch.__version__}; loader said: {text}); the cpu/cuda backends are disabled. "
                f"Re-{REBUILD_HINT}."
            )
        elif "No module named" in text:
            why = f"mmsd_ext: the compiled extension is not built; the cpu/cuda backends are disabled. To get them, {REBUILD_HINT}."
        else:
            why = f"mmsd_ext: the compiled extension failed to load ({text}); the cpu/cuda backends are disabled."
        return None, info, why
    return module, info, None


def _sources_changed(info):
    """Whether the checkout this package sits in (setup.py and csrc/ beside it: an editable
    install or an in-place build) holds other C++/CUDA sources than the build was made from;
    None where that cannot be told (an installed copy, a build info without the digest)."""
    root = os.path.dirname(_HERE)
    if not info or not info.get("csrc_sha256") or not os.path.isfile(os.path.join(root, "setup.py")):
        return None
    digest = _sources.csrc_digest(os.path.join(root, "csrc"))
    return None if digest is None else digest != info["csrc_sha256"]


_C, BUILD_INFO, LOAD_ERROR = _load()
SOURCES_CHANGED = _sources_changed(BUILD_INFO) if _C is not None else None
if LOAD_ERROR is not None and not os.environ.get("MMSD_EXT_QUIET"):
    warnings.warn(LOAD_ERROR, RuntimeWarning, stacklevel=2)
if SOURCES_CHANGED and not os.environ.get("MMSD_EXT_QUIET"):
    warnings.warn(
        "mmsd_ext: the compiled extension was built from other C++/CUDA sources than this checkout's csrc/ "
        "(edited or updated since the build); it is loaded, and runs the kernels of its build. "
        f"Re-{REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def compiled_available():
    return _C is not None


def cuda_compiled():
    return _C is not None and bool(getattr(_C, "with_cuda", False))
