"""The package foundation: build info, the loader's messages, backend resolution."""

import gc
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import mmsd_ext
from mmsd_ext import _backend


def test_build_info_keys_and_backends():
    info = mmsd_ext.build_info()
    for key in ("version", "torch", "cuda", "archs", "backends", "cpu_isa", "sanitize", "sources_changed"):
        assert key in info
    assert isinstance(info["sanitize"], bool)
    assert info["version"] == mmsd_ext.__version__
    assert info["backends"][0] == "reference"
    assert set(info["backends"]) <= set(mmsd_ext.BACKENDS)
    if info["compiled"]:
        assert info["torch"] == torch.__version__
        assert "cpu" in info["backends"]
        assert info["cpu_isa"] in ("avx512", "avx2", "baseline")
    else:
        assert info["cpu_isa"] is None
    if torch.cuda.is_available() and info["cuda"] is not None:
        assert "cuda" in info["backends"]


@pytest.mark.skipif(os.environ.get("MMSD_EXT_REQUIRE_CUDA_BUILD") != "1", reason="only where CI demands the CUDA build")
def test_cuda_kernels_were_compiled():
    info = mmsd_ext.build_info()
    assert info["compiled"] and info["cuda"] is not None and info["archs"]


def test_kernels_is_a_subpackage_not_top_level():
    import mmsd_ext.kernels as kernels

    assert kernels.__name__ == "mmsd_ext.kernels"
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('kernels') is None else 1)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_unknown_backend_names_the_argument():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="backend"):
        mmsd_ext.topk_mil_pool(x, 2, backend="fast")
    with pytest.raises(ValueError, match="use_backend"):
        mmsd_ext.use_backend("gpu")  # at the call, before any block is entered


def test_backend_that_does_not_fit_the_device():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="CUDA tensors, but the tensors of topk_mil_pool are on cpu$"):
        mmsd_ext.topk_mil_pool(x, 2, backend="cuda")
    # Set by a block or the environment, the error says where the name came from.
    with mmsd_ext.use_backend("cuda"), pytest.raises(ValueError, match="on cpu \\(the backend was set by a use_backend block\\)$"):
        mmsd_ext.topk_mil_pool(x, 2)
    # A call's "auto" is the automatic choice, whatever a block or the environment says, as
    # use_backend("auto") is inside its block.
    auto = _backend.resolve("topk_mil_pool", None, "cpu")
    with mmsd_ext.use_backend("cuda"):
        assert _backend.resolve("topk_mil_pool", "auto", "cpu") == auto
        torch.testing.assert_close(mmsd_ext.topk_mil_pool(x, 2, backend="auto"), x.topk(2, dim=1).values.mean(1))
    result = _run_isolated(
        """
        import torch, mmsd_ext
        from mmsd_ext import _backend
        x = torch.randn(2, 5, 3)
        print(_backend.resolve("topk_mil_pool", "auto", "cpu"), tuple(mmsd_ext.topk_mil_pool(x, 2, backend="auto").shape))
        try:
            mmsd_ext.topk_mil_pool(x, 2)
        except ValueError as error:
            print(error)
        """,
        {"MMSD_EXT_BACKEND": "cuda"},
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"{auto} (2, 3)", result.stdout + result.stderr
    assert lines[-1].endswith("on cpu (the backend was set by MMSD_EXT_BACKEND)"), result.stdout + result.stderr


def test_triton_on_cpu_tensors_without_the_interpreter_says_how_to_run_it():
    # The tests run the interpreter where there is no GPU; a user's process usually does not.
    if not _backend.triton_importable():
        pytest.skip("triton is not installed")
    result = _run_isolated(
        """
        import torch, mmsd_ext
        x = torch.randn(2, 5, 3)
        calls = [
            lambda: mmsd_ext.topk_mil_pool(x, 2, backend="triton"),
            lambda: mmsd_ext.snippet_distill_loss(x, x, backend="triton"),
            lambda: mmsd_ext.mmsd_distill_loss(x, x, x, backend="triton"),
            lambda: mmsd_ext.temporal_nms(torch.tensor([[0.0, 1.0]]), torch.tensor([1.0]), 0.5, backend="triton"),
            lambda: mmsd_ext.soft_temporal_nms(torch.tensor([[0.0, 1.0]]), torch.tensor([1.0]), backend="triton"),
        ]
        for call in calls:
            try:
                call()
                print("no error")
            except RuntimeError as error:
                print(error)
        """,
        {"TRITON_INTERPRET": ""},
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 5, result.stdout + result.stderr
    for line in lines:
        assert line.startswith("backend='triton': tensors are on cpu; Triton kernels run on CUDA devices") and "TRITON_INTERPRET=1" in line, line


def test_use_backend_overrides_auto_and_nests():
    assert _backend.resolve("topk_mil_pool", None, "cpu", supported=("reference", "cpu")) in ("cpu", "reference")
    with mmsd_ext.use_backend("reference"):
        assert _backend.resolve("topk_mil_pool", None, "cpu") == "reference"
        with mmsd_ext.use_backend("auto"):
            expected = "cpu" if "cpu" in mmsd_ext.available_backends() else "reference"
            assert _backend.resolve("topk_mil_pool", None, "cpu") == expected
        # An explicit argument wins over the context.
        if "cpu" in mmsd_ext.available_backends():
            assert _backend.resolve("topk_mil_pool", "cpu", "cpu") == "cpu"
    assert _backend.resolve("topk_mil_pool", "reference", "cpu") == "reference"


def test_use_backend_ends_with_an_exception_and_device_mismatches_are_named():
    default = _backend.resolve("topk_mil_pool", None, "cpu")
    with pytest.raises(KeyError):
        with mmsd_ext.use_backend("reference"):
            raise KeyError("inside the block")
    assert _backend.resolve("topk_mil_pool", None, "cpu") == default
    # Checked by name, so also on a machine without a GPU.
    with pytest.raises(ValueError, match=r"^backend='cpu' runs on CPU tensors, but the tensors of topk_mil_pool are on cuda$"):
        _backend.resolve("topk_mil_pool", "cpu", "cuda")
    with pytest.raises(ValueError, match=r"^backend='cuda' runs on CUDA tensors, but the tensors of topk_mil_pool are on cpu$"):
        _backend.resolve("topk_mil_pool", "cuda", "cpu")


def test_use_backend_belongs_to_the_thread_that_entered_it():
    # Before 2026-11-27 the blocks were one process-wide stack: a block in one thread
    # changed what the others resolved, and their exits popped each other's entries.
    import threading

    default = _backend.resolve("topk_mil_pool", None, "cpu")
    entered, leave = threading.Event(), threading.Event()
    seen = []

    def worker():
        with mmsd_ext.use_backend("reference"):
            seen.append(_backend.resolve("topk_mil_pool", None, "cpu"))
            entered.set()
            leave.wait(30)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert entered.wait(30)
        assert _backend.resolve("topk_mil_pool", None, "cpu") == default
        with mmsd_ext.use_backend("reference"):
            assert _backend.resolve("topk_mil_pool", None, "cpu") == "reference"
    finally:
        leave.set()
        thread.join(30)
    assert seen == ["reference"]
    assert _backend.resolve("topk_mil_pool", None, "cpu") == default


@pytest.fixture
def reference_calls(monkeypatch):
    """The calls of mmsd_distill_loss's reference implementation, in a list; dynamo reset."""
    from mmsd_ext import distill

    calls = []
    reference = distill._MMSD_IMPLS["reference"]

    def spy(*args):
        calls.append("reference")
        return reference(*args)

    monkeypatch.setitem(distill._MMSD_IMPLS, "reference", spy)
    torch._dynamo.reset()
    return calls


def test_use_backend_reaches_a_function_compiled_outside_the_block(reference_calls):
    # dynamo guards on the thread's stack of blocks: the compiled function is traced
    # again inside the block, not run with the backend it was first traced with.
    calls = reference_calls
    xs = [torch.randn(2, 5, 7) for _ in range(3)]
    compiled = torch.compile(lambda a, b, c: mmsd_ext.mmsd_distill_loss(a, b, c), fullgraph=True)
    outside = compiled(*xs)
    assert calls == ([] if "cpu" in mmsd_ext.available_backends() else ["reference"])
    calls.clear()
    with mmsd_ext.use_backend("reference"):
        inside = compiled(*xs)
    assert calls == ["reference"]
    torch.testing.assert_close(inside, outside)


def test_use_backend_never_entered_warns_and_changes_nothing():
    # Written as a statement, use_backend(...) reads as a setting; before 2026-11-28 it
    # silently did nothing.
    default = _backend.resolve("topk_mil_pool", None, "cpu")
    with pytest.warns(RuntimeWarning, match=r"^use_backend\('reference'\) was never entered, so it changed nothing: .*MMSD_EXT_BACKEND"):
        mmsd_ext.use_backend("reference")
        gc.collect()  # (CPython drops it at once; the collection is for other interpreters)
    assert _backend.resolve("topk_mil_pool", None, "cpu") == default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block = mmsd_ext.use_backend("reference")
        with block:
            assert _backend.resolve("topk_mil_pool", None, "cpu") == "reference"
        del block

        @mmsd_ext.use_backend("reference")  # as contextlib's blocks, also a decorator
        def resolved():
            return _backend.resolve("topk_mil_pool", None, "cpu")

        assert resolved() == "reference" and resolved() == "reference"
        gc.collect()
    assert _backend.resolve("topk_mil_pool", None, "cpu") == default
    # A decorator is used when it decorates, whether or not its function is ever called. (Not
    # with warnings as errors above: a warning raised in __del__ is printed, not raised.)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        @mmsd_ext.use_backend("reference")
        def never_called():
            pass

        del never_called
        gc.collect()
    assert not [w for w in caught if "never entered" in str(w.message)], [str(w.message) for w in caught]


def test_use_backend_block_inside_a_compiled_function(reference_calls):
    # dynamo traces the block (one graph, no warning about a block never entered) and the
    # op inside it resolves to the block's backend.
    from mmsd_ext.distill import mmsd_distill_loss_reference

    def loss(a, b, c):
        with mmsd_ext.use_backend("reference"):
            inside = mmsd_ext.mmsd_distill_loss(a, b, c)
        return inside, _backend.resolve("topk_mil_pool", None, "cpu")

    xs = [torch.randn(2, 5, 7) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, after = torch.compile(loss, fullgraph=True)(*xs)
        gc.collect()
    assert reference_calls == ["reference"]
    assert after == _backend.resolve("topk_mil_pool", None, "cpu")
    torch.testing.assert_close(got, mmsd_distill_loss_reference(*xs, 0.2, None))


# An editable install adds a finder that maps every mmsd_ext module to the source
# tree; a test of a copied package must not be handed the tree's shared object.
_NO_EDITABLE_FINDER = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
)


def _run_isolated(script, env_extra=None, copied=False):
    env = {k: v for k, v in os.environ.items() if k not in ("MMSD_EXT_QUIET", "MMSD_EXT_BACKEND")}
    env.update(env_extra or {})
    code = (_NO_EDITABLE_FINDER if copied else "") + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")


def test_environment_variable_override():
    result = _run_isolated(
        "import mmsd_ext, mmsd_ext._backend as b; print(b.resolve('topk_mil_pool', None, 'cpu'))",
        {"MMSD_EXT_BACKEND": "reference"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"
    # A bad name is refused where it would be read, not at import (a command line tool that
    # takes it as its --backend reports it as a flag: test_train); a call naming its backend,
    # or inside a use_backend block, does not read it.
    bad = _run_isolated(
        """
        import torch, mmsd_ext
        x = torch.ones(1, 2, 1)
        print(mmsd_ext.topk_mil_pool(x, 1, backend="reference").tolist())
        with mmsd_ext.use_backend("cpu"):
            print(mmsd_ext.topk_mil_pool(x, 1).tolist())
        mmsd_ext.topk_mil_pool(x, 1)
        """,
        {"MMSD_EXT_BACKEND": "quick"},
    )
    assert bad.stdout.split() == ["[[1.0]]", "[[1.0]]"], bad.stdout + bad.stderr
    assert bad.returncode != 0, bad.stdout
    assert bad.stderr.strip().splitlines()[-1] == (
        "ValueError: MMSD_EXT_BACKEND: expected one of reference, cpu, cuda, triton or 'auto', got 'quick'"
    ), bad.stderr


def test_import_survives_a_missing_extension(tmp_path):
    # A copy of the Python sources without the shared object: "not built".
    import shutil

    src = os.path.dirname(mmsd_ext.__file__)
    dst = tmp_path / "mmsd_ext"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "_build_info.json", "__pycache__"))
    result = _run_isolated(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mmsd_ext
        messages = [str(w.message) for w in caught if "mmsd_ext" in str(w.message)]
        assert len(messages) == 1, messages
        assert "not built" in messages[0], messages[0]
        assert mmsd_ext.build_info()["backends"][0] == "reference"
        x = torch.randn(2, 6, 3)
        torch.testing.assert_close(mmsd_ext.topk_mil_pool(x, 2), x.topk(2, dim=1).values.mean(1))
        from mmsd_ext.localize import mmsd_proposals
        seg, sc = torch.tensor([[0.0, 1.0]]), torch.tensor([1.0])
        calls = {
            "topk_mil_pool": lambda: mmsd_ext.topk_mil_pool(x, 2, backend="cpu"),
            "snippet_distill_loss": lambda: mmsd_ext.snippet_distill_loss(x, x, backend="cpu"),
            "temporal_nms": lambda: mmsd_ext.temporal_nms(seg, sc, 0.5, backend="cpu"),
            "mmsd_proposals": lambda: mmsd_proposals(torch.rand(1, 5, 1), torch.ones(1, 1), backend="cpu"),
        }
        for name, call in calls.items():
            try:
                call()
            except RuntimeError as exc:
                assert "pip install --no-build-isolation -e ." in str(exc), (name, str(exc))
            else:
                raise AssertionError(f"{name}: backend='cpu' should have failed")
        print("ok")
        """,
        {"PYTHONPATH": str(tmp_path)},
        copied=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


def _copy_with_build_info(tmp_path, info):
    """A copy of the installed package (shared object included) under tmp_path, with this build info."""
    import json
    import shutil

    dst = tmp_path / "mmsd_ext"
    shutil.copytree(os.path.dirname(mmsd_ext.__file__), dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "_build_info.json").write_text(json.dumps(info))


_BASE_TORCH = torch.__version__.split("+")[0]


# Another release, and the same release with another local label: torch 2.14.1+cpu and
# 2.14.1+cu130 are different builds.
@pytest.mark.parametrize("other", ["1.0.0+other", _BASE_TORCH + ("+cu999" if torch.__version__.endswith("+cpu") else "+cpu")])
def test_import_survives_an_extension_built_for_another_torch(tmp_path, other):
    _copy_with_build_info(tmp_path, {"version": mmsd_ext.__version__, "torch": other, "cuda": None, "archs": None})
    result = _run_isolated(
        f"""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mmsd_ext
        messages = [str(w.message) for w in caught if "mmsd_ext" in str(w.message)]
        assert len(messages) == 1 and "built for torch {other}" in messages[0], messages
        assert "cpu" not in mmsd_ext.build_info()["backends"]
        print("ok")
        """,
        {"PYTHONPATH": str(tmp_path)},
        copied=True,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_import_survives_an_extension_built_from_older_sources(tmp_path):
    # A checkout updated without a rebuild: the build info records an older binary
    # interface. The extension is not loaded (its ops would lack what these sources
    # expect, e.g. the C++ autograd), and the reference backend still gives gradients.
    info = dict(mmsd_ext._loader.BUILD_INFO or {"version": mmsd_ext.__version__})
    info["torch"] = torch.__version__
    info.pop("binary_interface", None)  # builds before the interface number existed have none
    _copy_with_build_info(tmp_path, info)
    result = _run_isolated(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mmsd_ext
        messages = [str(w.message) for w in caught if "mmsd_ext" in str(w.message)]
        assert len(messages) == 1 and "binary interface 1" in messages[0], messages
        assert "Re-build it with `pip install --no-build-isolation -e .`" in messages[0], messages[0]
        assert "cpu" not in mmsd_ext.build_info()["backends"]
        assert not hasattr(torch.ops.mmsd_ext, "topk_mil_pool"), "the stale extension was loaded"
        x = torch.randn(2, 6, 3, requires_grad=True)
        mmsd_ext.topk_mil_pool(x, 2).sum().backward()
        assert torch.equal((x.grad != 0).sum(1), torch.full((2, 3), 2))
        print("ok")
        """,
        {"PYTHONPATH": str(tmp_path)},
        copied=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


# Loaded into a process without libasan, an extension built with MMSD_EXT_SANITIZE=1 would
# end it (ASan aborts, no ImportError); with libasan but not libstdc++ preloaded, the first
# C++ exception would (ASan's CHECK on the __cxa_throw it wraps). The loader reads the build
# info first and leaves it unloaded, with the command that runs it; the reference works.
@pytest.mark.parametrize("preloaded", ["", "libasan"])
def test_import_survives_a_sanitized_extension_without_the_asan_runtime(tmp_path, preloaded):
    if preloaded:
        done = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True)
        libasan = done.stdout.strip()
        if done.returncode != 0 or not os.path.isabs(libasan):
            pytest.skip("gcc's libasan not found")
        preloaded = libasan
        expected = "not libstdc++ preloaded"
    else:
        expected = "has no AddressSanitizer runtime"
    info = dict(mmsd_ext._loader.BUILD_INFO or {"version": mmsd_ext.__version__})
    info.update(torch=torch.__version__, binary_interface=mmsd_ext._loader.BINARY_INTERFACE, sanitize=True)
    _copy_with_build_info(tmp_path, info)
    result = _run_isolated(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mmsd_ext
        messages = [str(w.message) for w in caught if "mmsd_ext" in str(w.message)]
        assert len(messages) == 1, messages
        assert "built with MMSD_EXT_SANITIZE=1" in messages[0] and "LD_PRELOAD=" in messages[0], messages[0]
        assert EXPECTED in messages[0], messages[0]
        info = mmsd_ext.build_info()
        assert "cpu" not in info["backends"] and info["sanitize"] is True and not info["compiled"], info
        x = torch.randn(2, 6, 3)
        torch.testing.assert_close(mmsd_ext.topk_mil_pool(x, 2), x.topk(2, dim=1).values.mean(1))
        print("ok")
        """.replace("EXPECTED", repr(expected)),
        {"PYTHONPATH": str(tmp_path), "LD_PRELOAD": preloaded,  # (a sanitized test run preloads both)
         "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1"},
        copied=True,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_setup_refuses_a_sanitized_cuda_build():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "setup.py")):
        pytest.skip("no source tree here")
    env = dict(os.environ, FORCE_CUDA="1", MMSD_EXT_SANITIZE="1")
    done = subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "FORCE_CUDA=1 and MMSD_EXT_SANITIZE=1 contradict each other" in done.stderr, done.stderr


def test_setup_run_from_another_folder_says_where_to_run_it(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "setup.py")):
        pytest.skip("no source tree here")
    done = subprocess.run(
        [sys.executable, os.path.join(root, "setup.py"), "--version"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "setup.py: run it from its own folder" in done.stderr, done.stdout + done.stderr


def test_sdist_holds_every_source_a_build_and_the_tests_need(tmp_path):
    # Made where no CUDA kernels are built (MMSD_EXT_NO_CUDA=1): setuptools alone would
    # leave out the .cu files and every header; MANIFEST.in adds them, and the tests with
    # what they import. A build's _build_info.json stays out.
    import shutil
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "setup.py")):
        pytest.skip("no source tree here")
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "*.so", ".hypothesis", "out")
    tree = tmp_path / "tree"
    shutil.copytree(root, tree, ignore=skip, symlinks=True)
    (tree / "mmsd_ext" / "_build_info.json").write_text("{}")
    env = dict(os.environ, MMSD_EXT_NO_CUDA="1")
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sd")], cwd=tree, capture_output=True, text=True,
        env=env, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (archive,) = (tmp_path / "sd").iterdir()
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {"setup.py", "pyproject.toml", "MANIFEST.in", "requirements.txt", "README.md"}
    for folder in ("csrc", "kernels", "mmsd_ext", "tests", "benchmarks"):
        for dirpath, _, files in os.walk(tree / folder):
            wanted.update(os.path.relpath(os.path.join(dirpath, f), tree) for f in files)
    wanted.discard(os.path.join("mmsd_ext", "_build_info.json"))
    assert any(name.endswith(".cu") for name in wanted) and any(name.endswith(".cuh") for name in wanted)
    assert not wanted - packed, sorted(wanted - packed)
    assert "mmsd_ext/_build_info.json" not in packed


def test_import_survives_a_malformed_build_info(tmp_path):
    _copy_with_build_info(tmp_path, {})
    (tmp_path / "mmsd_ext" / "_build_info.json").write_text("{ not json")
    result = _run_isolated("import mmsd_ext; print('ok')", {"PYTHONPATH": str(tmp_path)}, copied=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


# What the dynamic loader says decides the advice: a missing symbol means a build for
# another torch (rebuild), anything else is passed on as it came.
@pytest.mark.parametrize(
    "loader_says, expected",
    [
        ("_C.so: undefined symbol: _ZN3c1017RegisterOperators", "does not match this torch"),
        ("libcudart.so.13: cannot open shared object file", "failed to load (libcudart.so.13"),
    ],
)
def test_import_survives_an_extension_the_loader_refuses(tmp_path, loader_says, expected):
    info = dict(mmsd_ext._loader.BUILD_INFO or {"version": mmsd_ext.__version__})
    info.update(torch=torch.__version__, binary_interface=mmsd_ext._loader.BINARY_INTERFACE)
    _copy_with_build_info(tmp_path, info)
    for so in (tmp_path / "mmsd_ext").glob("_C*.so"):
        so.unlink()
    # A stand-in for the shared object that fails as the dynamic loader would.
    (tmp_path / "mmsd_ext" / "_C.py").write_text(f"raise ImportError({loader_says!r})\n")
    result = _run_isolated(
        f"""
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mmsd_ext
        messages = [str(w.message) for w in caught if "mmsd_ext" in str(w.message)]
        assert len(messages) == 1 and {expected!r} in messages[0], messages
        assert ("Re-build it with" in messages[0]) == ("undefined symbol" in {loader_says!r}), messages[0]
        assert "cpu" not in mmsd_ext.build_info()["backends"]
        x = torch.randn(2, 6, 3)
        torch.testing.assert_close(mmsd_ext.topk_mil_pool(x, 2), x.topk(2, dim=1).values.mean(1))
        print("ok")
        """,
        {"PYTHONPATH": str(tmp_path)},
        copied=True,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_mmsd_ext_quiet_silences_the_load_warning_and_an_empty_value_does_not(tmp_path):
    _copy_with_build_info(tmp_path, {"version": mmsd_ext.__version__, "torch": "1.0.0+other", "cuda": None, "archs": None})
    script = """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mmsd_ext
        print(len([w for w in caught if "mmsd_ext" in str(w.message)]))
        """
    for value, warnings_seen in (("1", "0"), ("", "1")):
        result = _run_isolated(script, {"PYTHONPATH": str(tmp_path), "MMSD_EXT_QUIET": value}, copied=True)
        assert result.returncode == 0 and result.stdout.strip() == warnings_seen, (value, result.stdout + result.stderr)


def test_cuda_compiled_says_whether_the_build_has_cuda_kernels():
    # Not whether the extension loaded: a CPU-only build on a GPU machine has no CUDA kernels.
    if not mmsd_ext._loader.compiled_available():
        assert not mmsd_ext._loader.cuda_compiled()
    else:
        assert mmsd_ext._loader.cuda_compiled() == (mmsd_ext.build_info()["cuda"] is not None)


@pytest.mark.skipif(mmsd_ext._loader.BUILD_INFO is None, reason="the extension is not built")
def test_build_records_the_binary_interface_of_these_sources():
    assert mmsd_ext._loader.BUILD_INFO["binary_interface"] == mmsd_ext._loader.BINARY_INTERFACE
    # and the digest of its C++/CUDA sources, which this checkout holds (the tests run the build
    # of these sources: a csrc/ edited without a rebuild fails here, as the import warned).
    csrc = os.path.join(os.path.dirname(os.path.dirname(mmsd_ext.__file__)), "csrc")
    if os.path.isdir(csrc):
        assert mmsd_ext._loader.BUILD_INFO["csrc_sha256"] == mmsd_ext._sources.csrc_digest(csrc)
        assert mmsd_ext.build_info()["sources_changed"] is False


@pytest.mark.skipif(mmsd_ext._loader._C is None, reason="the extension is not built")
@pytest.mark.parametrize("edited", [False, True])
def test_a_build_behind_its_checkouts_sources_loads_with_a_warning(tmp_path, edited):
    # A checkout whose csrc/ was edited (or updated) without a rebuild, same binary interface:
    # the extension loads, and the import says it runs the kernels of its build.
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    (csrc / "cpu" / "op_kernel.cpp").write_text("// the sources of the build\n")
    (csrc / "op.h").write_text("#pragma once\n")
    info = dict(mmsd_ext._loader.BUILD_INFO, csrc_sha256=mmsd_ext._sources.csrc_digest(str(csrc)))
    _copy_with_build_info(tmp_path, info)
    (tmp_path / "setup.py").write_text("# the checkout's\n")
    (csrc / "op.h~").write_text("an editor's backup: not a source\n")
    if edited:
        (csrc / "cpu" / "op_kernel.cpp").write_text("// edited since the build\n")
    result = _run_isolated(
        f"""
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mmsd_ext
        messages = [str(w.message) for w in caught if "mmsd_ext" in str(w.message)]
        info = mmsd_ext.build_info()
        assert info["compiled"] and "cpu" in info["backends"], info
        assert info["sources_changed"] is {edited}, info
        if {edited}:
            assert len(messages) == 1 and "other C++/CUDA sources than this checkout's csrc/" in messages[0], messages
            assert "Re-build it with `pip install --no-build-isolation -e .`" in messages[0], messages[0]
        else:
            assert not messages, messages
        print("ok")
        """,
        {"PYTHONPATH": str(tmp_path)},
        copied=True,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def _every_public_op_call():
    """One call of every public op (forward, and backward where there is one), on
    CPU inputs made here, as functions of the backend."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 17, 5, generator=gen, requires_grad=True)
    rgb, flow, fused = (torch.randn(3, 17, 5, generator=gen, requires_grad=True) for _ in range(3))
    valid = torch.rand(3, 17, generator=gen) > 0.3
    segments = torch.sort(torch.rand(40, 2, generator=gen, dtype=torch.float64) * 10, dim=1).values
    seg_scores = torch.rand(40, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 3, (40,), generator=gen)
    cas = torch.rand(3, 60, 4, generator=gen) * 0.02
    video_scores = torch.rand(3, 4, generator=gen)
    lengths = torch.tensor([60, 41, 9])

    def grads(loss, inputs):
        return (loss.detach(),) + torch.autograd.grad(loss, inputs)

    return {
        "topk_mil_pool": lambda b: grads(mmsd_ext.topk_mil_pool(scores, 4, backend=b).sum(), [scores]),
        "mil_k": lambda b: (mmsd_ext.mil_k(lengths),),
        "snippet_distill_loss": lambda b: grads(
            mmsd_ext.snippet_distill_loss(rgb, flow, 0.5, mask=valid.float(), backend=b), [rgb]
        ),
        "mmsd_distill_loss": lambda b: grads(
            mmsd_ext.mmsd_distill_loss(rgb, flow, fused, mask=valid, backend=b), [rgb, flow, fused]
        ),
        "temporal_nms": lambda b: (mmsd_ext.temporal_nms(segments, seg_scores, 0.3, groups=groups, backend=b),),
        "temporal_nms other": lambda b: (
            mmsd_ext.temporal_nms(segments, seg_scores, 0.3, groups=groups, overlap="other", offset=1, backend=b),
        ),
        "soft_temporal_nms": lambda b: mmsd_ext.soft_temporal_nms(segments, seg_scores, groups=groups, backend=b),
        "mmsd_proposals": lambda b: (mmsd_ext.mmsd_proposals(cas, video_scores, lengths, backend=b),),
    }


# The Triton interpreter computes with numpy, which warns at the -inf and NaN the kernels make on purpose.
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu", "triton") if b in mmsd_ext.available_backends()])
def test_no_op_creates_tensors_on_the_default_device(backend):
    # A stand-in, without a GPU, for "works on CUDA tensors": every tensor an op makes
    # must go to its inputs' device, never to torch's default device. With the default
    # device set to "meta" (no data), a tensor made without device= cannot mix with the
    # CPU inputs or be read, so the call fails or its result is not on the CPU.
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the triton backend runs on the GPU here; this test is for CPU inputs")
    for name, call in _every_public_op_call().items():
        want = call(backend)
        torch.set_default_device("meta")
        try:
            got = call(backend)
        finally:
            torch.set_default_device(None)
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            assert g.device.type == "cpu", f"{name}: a result on {g.device}"
            assert torch.equal(g, w), name


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize(
    "call, argument, what",
    [
        (lambda b: mmsd_ext.topk_mil_pool(_meta(2, 5, 3), 2, backend=b), "scores", "topk_mil_pool"),
        (lambda b: mmsd_ext.temporal_nms(_meta(4, 2), _meta(4), 0.5, backend=b), "segments", "temporal_nms"),
        (lambda b: mmsd_ext.soft_temporal_nms(_meta(4, 2), _meta(4), backend=b), "segments", "soft_temporal_nms"),
        (lambda b: mmsd_ext.mmsd_proposals(_meta(2, 5, 3), _meta(2, 3), backend=b), "cas", "mmsd_proposals"),
        (lambda b: mmsd_ext.detection_map(_meta(2, 5), [[0, 0, 0, 1]]), "predictions", "the evaluation"),
        (lambda b: mmsd_ext.classification_map(_meta(2, 3), _meta(2, 3)), "video_scores", "the evaluation"),
    ],
)
@pytest.mark.parametrize("backend", [None, "reference"])
def test_meta_tensors_where_values_are_read_name_the_argument(call, argument, what, backend):
    # Before 2026-11-27: torch's "Tensor.item() cannot be called on meta tensors" or
    # "Cannot copy out of meta tensor", which named neither the op nor the argument.
    with pytest.raises(ValueError, match=f"^{argument}: a meta tensor holds no values, and {what} reads them$"):
        call(backend)


def test_distillation_losses_take_meta_tensors():
    # No value is read: the result's shape and the backward come from meta tensors too.
    x = _meta(2, 5, 4).requires_grad_(True)
    loss = mmsd_ext.mmsd_distill_loss(x, _meta(2, 5, 4), _meta(2, 5, 4), backend="reference")
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    rows = mmsd_ext.snippet_distill_loss(_meta(3, 4), _meta(3, 4), reduction="none", backend="reference")
    assert rows.shape == (3,) and rows.device.type == "meta"


def _number_calls():
    """Each op's number and flag arguments: (call taking the value, argument name, a good value)."""
    s = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(3))
    seg = torch.tensor([[0.0, 10.0], [1.0, 11.0], [20.0, 30.0]])
    sc = torch.tensor([0.9, 0.8, 0.7])
    return [
        (lambda v: mmsd_ext.snippet_distill_loss(s, s.flip(0), v), "temperature", 0.5),
        (lambda v: mmsd_ext.mmsd_distill_loss(s, s.flip(0), s.flip(1), v), "temperature", 0.5),
        (lambda v: mmsd_ext.temporal_nms(seg, sc, v), "iou_threshold", 0.5),
        (lambda v: mmsd_ext.temporal_nms(seg, sc, 0.5, offset=v), "offset", 1.0),
        (lambda v: mmsd_ext.soft_temporal_nms(seg, sc, sigma=v), "sigma", 0.5),
        (lambda v: mmsd_ext.soft_temporal_nms(seg, sc, min_score=v), "min_score", 0.25),
        (lambda v: mmsd_ext.mil_k(torch.tensor([80]), v), "ratio", 8.0),
        (lambda v: mmsd_ext.mmsd_proposals(s, s[:, 0], class_threshold=v), "class_threshold", 0.5),
    ]


@pytest.mark.parametrize("index", range(len(_number_calls())))
def test_number_arguments_take_numpy_scalars_and_name_what_they_refuse(index):
    call, name, good = _number_calls()[index]
    want = call(good)
    for same in (np.float32(good), np.float64(good), np.longdouble(good)):
        got = call(same)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g, w), (name, type(same))
    # An int past the float range: a ValueError naming the argument, not an OverflowError.
    with pytest.raises(ValueError, match=f"^{name}: expected a number within the float range, got an int of 1101 bits"):
        call(2**1100)
    for bad in (True, np.bool_(True), "0.5", torch.tensor(good)):
        with pytest.raises(TypeError, match=f"^{name}: expected a number, got"):
            call(bad)


def test_int_and_bool_arguments_take_numpy_scalars():
    s = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(4))
    want = mmsd_ext.topk_mil_pool(s, 2, largest=False)
    assert torch.equal(mmsd_ext.topk_mil_pool(s, np.int64(2), largest=np.bool_(False)), want)
    assert mmsd_ext.mil_k(np.int64(80), min_k=np.int32(2)) == mmsd_ext.mil_k(80, min_k=2) == 10
    with pytest.raises(TypeError, match="^k: expected an int or an int64 tensor, got bool"):
        mmsd_ext.topk_mil_pool(s, np.bool_(True))
    with pytest.raises(TypeError, match="^min_k: expected an int >= 1, got float"):
        mmsd_ext.mil_k(80, min_k=2.0)
    with pytest.raises(TypeError, match="^min_k: expected an int >= 1, got bool"):  # (True is an int in Python)
        mmsd_ext.mil_k(80, min_k=True)
    with pytest.raises(ValueError, match="^min_k: expected an int >= 1, got 0"):
        mmsd_ext.mil_k(80, min_k=np.int64(0))


# -- the dispatcher ops called directly -------------------------------------------------------
# What the public functions check, the ops check again: they are callable on their own
# (torch.ops.mmsd_ext.*, torch.compile graphs), and a bad argument there must be an error,
# never an out-of-bounds read, a crash or an output made up. Found by an adversarial review.


def _direct_calls(device):
    ops = torch.ops.mmsd_ext
    s = torch.randn(2, 4, 3, device=device)
    seg, three = torch.zeros(3, 2, device=device), torch.zeros(3, device=device)
    calls = []
    if "triton" in mmsd_ext.available_backends() and (device != "cpu" or mmsd_ext._backend.triton_interpreting()):
        _, stats, count = ops.snippet_distill_loss_triton(s, s, 0.5, None, 1)
        _, stats8, count8 = ops.mmsd_distill_loss_triton(s, s, s, 0.5, None)
        _, kth, cut = ops.topk_mil_pool_triton(torch.randn(2, 8, 3, device=device), torch.tensor([2, 2], device=device),
                                               torch.tensor([8, 8], device=device), True)
        one = torch.ones((), device=device)
        x83, k2, l8 = torch.randn(2, 8, 3, device=device), torch.tensor([2, 2], device=device), torch.tensor([8, 8], device=device)
        g23 = torch.ones(2, 3, device=device)
        none = s[..., :0]
        calls += [
            (lambda: ops._snippet_distill_loss_triton_backward(one, s, s, stats, torch.empty(0, device=device), 0.5, 1), "count"),
            (lambda: ops._snippet_distill_loss_triton_backward(torch.ones(0, device=device), s, s, stats, count, 0.5, 1), "grad"),
            (lambda: ops._snippet_distill_loss_triton_backward(one, s, s, stats, count, 0.5, 9), "reduction"),
            (lambda: ops._snippet_distill_loss_triton_backward(one, s, s, stats, count, 0.0, 1), "temperature"),
            (lambda: ops._snippet_distill_loss_triton_backward(one, s, s, stats[:1], count, 0.5, 1), "row_stats"),
            (lambda: ops._snippet_distill_loss_triton_backward(one, s, s, stats, count.double(), 0.5, 1), "count"),
            (lambda: ops.snippet_distill_loss_triton(none, none, 0.5, None, 1), "student"),
            (lambda: ops.snippet_distill_loss_triton(s, s[:1], 0.5, None, 1), "teacher"),
            (lambda: ops.snippet_distill_loss_triton(s, s, 5e-31, None, 1), "temperature"),  # below 1e-30
            (lambda: ops.snippet_distill_loss_triton(s, s, 0.5, None, 7), "reduction"),
            (lambda: ops.snippet_distill_loss_triton(s, s, 0.5, torch.ones(2, dtype=torch.bool, device=device), 1), "mask"),
            (lambda: ops.mmsd_distill_loss_triton(none, none, none, 0.5, None), "rgb"),
            (lambda: ops._mmsd_distill_loss_triton_backward(one, s, s, s, stats8[..., :4].contiguous(), count8, 0.5), "row_stats"),
            (lambda: ops.topk_mil_pool_triton(torch.ones(2, 8, 3, dtype=torch.int64, device=device),
                                              torch.tensor([2, 2], device=device), torch.tensor([8, 8], device=device), True), "scores"),
            (lambda: ops.topk_mil_pool_triton(torch.randn(2, 8, 3, device=device), torch.tensor([2], device=device),
                                              torch.tensor([8, 8], device=device), True), "k"),
            (lambda: ops._topk_mil_pool_triton_backward(torch.ones(2, 1, device=device), torch.randn(2, 8, 3, device=device),
                                                        torch.tensor([2, 2], device=device), torch.tensor([8, 8], device=device),
                                                        kth, cut, True), "grad_out"),
            # The saved tensors and k, checked by the backward op itself (read out of bounds on a GPU).
            (lambda: ops._topk_mil_pool_triton_backward(g23, x83, k2[:1], l8, kth, cut, True), "k"),
            (lambda: ops._topk_mil_pool_triton_backward(g23, x83, k2, l8, kth[:, :2], cut, True), "kth_key"),
            (lambda: ops._topk_mil_pool_triton_backward(g23, x83, k2, l8, kth, cut[:1], True), "cut"),
            (lambda: ops._topk_mil_pool_triton_backward(g23.long(), x83, k2, l8, kth, cut, True), "grad_out"),
            (lambda: ops._topk_mil_pool_triton_backward(g23, x83, k2, l8, kth.int(), cut, True), "kth_key"),
            (lambda: ops.temporal_nms_triton(seg, three[:2], None, 0.5, "iou", 0.0), "scores"),
            (lambda: ops.temporal_nms_triton(seg, three, None, -0.5, "iou", 0.0), "iou_threshold"),
            (lambda: ops.soft_temporal_nms_triton(seg, three, None, "bogus", 0.5, 0.3, 0.0, 0.0), "method"),
            (lambda: ops.temporal_nms_triton(seg, three, None, 0.5, "bogus", 0.0), "overlap"),
            (lambda: ops.soft_temporal_nms_triton(seg, three, three[:2].long(), "gaussian", 0.5, 0.3, 0.0, 0.0), "groups"),
            (lambda: ops.soft_temporal_nms_triton(seg, three, None, "gaussian", 0.5, 0.3, math.nan, 0.0), "min_score"),
        ]
    calls += [
        (lambda: ops.temporal_nms_reference(seg, three[:2], None, 0.5, "iou", 0.0), "scores"),
        (lambda: ops.temporal_nms_reference(seg, three, None, 0.5, "bogus", 0.0), "overlap"),
        (lambda: ops.temporal_nms_reference(seg, three, None, 0.5, "iou", -1.0), "offset"),
        (lambda: ops.soft_temporal_nms_reference(seg, three, None, "bogus", 0.5, 0.3, 0.0, 0.0), "method"),
        (lambda: ops.soft_temporal_nms_reference(seg, three, None, "gaussian", -0.5, 0.3, 0.0, 0.0), "sigma"),
    ]
    if "cpu" in mmsd_ext.available_backends() and device == "cpu":
        meta_k = torch.empty(4, dtype=torch.long, device="meta")
        calls += [
            # A meta tensor among real ones runs the fake kernel: it must check, not make up outputs.
            (lambda: ops.topk_mil_pool(torch.randn(4, 5, 3), meta_k, torch.full((4,), 5), True), "k"),
            (lambda: ops.snippet_distill_loss(s, s, 1.0, torch.empty(2, 4, dtype=torch.bool, device="meta"), 1), "mask"),
            (lambda: ops.mmsd_distill_loss(s, s, s.to("meta"), 1.0, None), "fused"),
            (lambda: ops.temporal_nms(seg, three.to("meta"), None, 0.5, "iou", 0.0), "scores"),
            (lambda: ops.soft_temporal_nms(seg, three.to("meta"), None, "gaussian", 0.5, 0.3, 0.0, 0.0), "scores"),
            (lambda: ops._temporal_nms_gather(torch.zeros(3, 1, dtype=torch.int64), meta_k[:3]), "sorted_groups"),
            # offset + length past int64 wrapped around and passed the bounds check (a crash).
            (lambda: ops._threshold_runs(torch.zeros(4, dtype=torch.float64), torch.tensor([1]), torch.tensor([2**63 - 1]),
                                         torch.tensor([0.5], dtype=torch.float64), 1, 0.0, False), "offsets, lengths"),
            # Aliased gradients would be scaled once per name.
            (lambda: ops._distill_scale_grads_(torch.tensor(2.0), three.new_zeros(8), three, three, torch.ones(3)), "grad_rgb, grad_flow, grad_fused"),
            # The upstream gradient inside one of them: the CUDA kernel read it while writing.
            (lambda: ops._distill_scale_grads_(three[1], three.new_zeros(8), three, torch.ones(3), torch.ones(3)), "grad: expected a tensor that shares no memory"),
        ]
    return calls


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
def test_dispatcher_ops_called_directly_refuse_bad_arguments_by_name():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = _direct_calls(device)
    assert len(calls) >= 5
    for call, name in calls:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=f"^{name}"):
            call()


def test_scaling_gradients_in_place_bumps_their_version():
    # The op changes its tensors in place: autograd must refuse a backward that saved one.
    if "cpu" not in mmsd_ext.available_backends():
        pytest.skip("the compiled extension is not built")
    x = torch.ones(3, requires_grad=True)
    y = torch.ones(3)
    z = (x * y).sum()
    torch.ops.mmsd_ext._distill_scale_grads_(torch.tensor(2.0), torch.zeros(8), y, torch.ones(3), torch.ones(3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_ops_called_from_many_threads_give_the_sequential_results(backend):
    # Data-loading threads, a thread pool of evaluation jobs: every op, forward and backward,
    # called from 8 threads at once, bit for bit as the same calls made one after another.
    if backend not in mmsd_ext.available_backends():
        pytest.skip(f"{backend} backend not available")
    from concurrent.futures import ThreadPoolExecutor

    device = torch.device(backend)
    gen = torch.Generator().manual_seed(13)
    cases = []
    for _ in range(16):
        xs = [torch.randn(3, 200, 21, generator=gen).to(device) for _ in range(3)]
        start = torch.rand(300, generator=gen) * 100
        seg = torch.stack([start, start + torch.rand(300, generator=gen) * 10], 1).to(device)
        cases.append((xs, seg, torch.rand(300, generator=gen).to(device), torch.randint(0, 5, (300,), generator=gen).to(device)))

    def work(case):
        xs, seg, scores, groups = case
        ins = [x.clone().requires_grad_() for x in xs]
        loss = mmsd_ext.mmsd_distill_loss(*ins, backend=backend) + mmsd_ext.topk_mil_pool(ins[0], 7, backend=backend).sum()
        loss.backward()
        keep = mmsd_ext.temporal_nms(seg, scores, 0.5, groups=groups, backend=backend)
        picked, decayed = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend=backend)
        return [loss.detach(), *(x.grad for x in ins), keep, picked, decayed]

    one_by_one = [work(case) for case in cases]
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(work, cases))
        for a, b in zip(one_by_one, together):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.skipif("cpu" not in mmsd_ext.available_backends(), reason="the compiled extension is not built")
def test_cpu_ops_give_the_same_bits_at_any_thread_count():
    # Each cpu kernel splits its work with at::parallel_for (rows, (video, class) pairs, groups,
    # videos); the sizes here give every split several tasks. A run on one thread and runs on
    # two and three give the same bits, forward and backward, mmsd_proposals included.
    gen = torch.Generator().manual_seed(41)
    xs = [torch.randn(16, 700, 21, generator=gen) for _ in range(3)]
    mask = torch.rand(16, 700, generator=gen) > 0.1
    lengths = torch.randint(1, 701, (16,), generator=gen)
    start = torch.rand(6000, generator=gen) * 500
    seg = torch.stack([start, start + torch.rand(6000, generator=gen) * 30], 1)
    scores = torch.rand(6000, generator=gen)
    groups = torch.randint(0, 60, (6000,), generator=gen)
    cas = torch.rand(8, 900, 20, generator=gen)
    cas_lengths = torch.randint(100, 901, (8,), generator=gen)
    video_scores = torch.rand(8, 20, generator=gen)

    def run():
        ins = [x.clone().requires_grad_() for x in xs]
        three = mmsd_ext.mmsd_distill_loss(*ins, mask=mask, backend="cpu")
        pair = mmsd_ext.snippet_distill_loss(ins[0], ins[1], 0.5, reduction="sum", backend="cpu")
        pooled = mmsd_ext.topk_mil_pool(ins[2], mmsd_ext.mil_k(lengths), lengths, backend="cpu")
        (three + pair + (pooled * torch.arange(21.0)).sum()).backward()
        keep = mmsd_ext.temporal_nms(seg, scores, 0.4, groups=groups, backend="cpu")
        picked, decayed = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend="cpu")
        proposals = mmsd_ext.mmsd_proposals(cas, video_scores, cas_lengths, backend="cpu")
        return [three.detach(), pair.detach(), pooled.detach(), *(x.grad for x in ins), keep, picked, decayed, proposals]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        keep, picked, proposals = one[6], one[7], one[9]
        assert 0 < len(keep) < 6000 and 0 < len(picked) < 6000 and len(proposals) > 100  # work to split
        for n in (2, 3):
            torch.set_num_threads(n)
            for a, b in zip(one, run()):
                assert torch.equal(a, b), n
    finally:
        torch.set_num_threads(threads)
