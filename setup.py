"""Build script for mmsd_ext.

One extension, ``mmsd_ext._C``: the C++ CPU kernels always, the CUDA kernels
whenever torch was built with CUDA and a CUDA toolkit is found (a GPU is not
needed to compile them). Switches, all environment variables:

  FORCE_CUDA=1            fail unless the CUDA kernels are compiled
  MMSD_EXT_NO_CUDA=1      never compile the CUDA kernels
  CUDA_HOME=/path         the toolkit to use (else found, see _find_cuda_home)
  TORCH_CUDA_ARCH_LIST    e.g. "9.0" (default "8.0;9.0+PTX")
  MAX_JOBS=N              parallel compile jobs (ninja)
  DEBUG=1                 -O0 -g, and -G for device code
  MMSD_EXT_SANITIZE=1     CPU kernels only, under AddressSanitizer and
                          UndefinedBehaviorSanitizer (run with libasan and libstdc++
                          preloaded: README, Tests)

Install with ``pip install --no-build-isolation -e .``: the extension must be
compiled against the torch already installed, which an isolated build
environment would replace with whatever torch it downloads.
"""

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _binary_interface():
    # One source of truth, mmsd_ext/_loader.py, read as text (importing the package
    # would load the extension being built).
    with open(os.path.join(ROOT, "mmsd_ext", "_loader.py"), encoding="utf-8") as f:
        match = re.search(r"^BINARY_INTERFACE = (\d+)$", f.read(), re.MULTILINE)
    return int(match.group(1))


def _csrc_digest():
    # mmsd_ext/_sources.py loaded by itself, as _binary_interface reads _loader.py by itself.
    spec = importlib.util.spec_from_file_location("_mmsd_ext_sources", os.path.join(ROOT, "mmsd_ext", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.csrc_digest(os.path.join(ROOT, "csrc"))


DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

# The source globs and package_dir below are relative to the current folder, as
# setuptools wants them; from another folder the build would find no sources.
if os.path.realpath(os.getcwd()) != os.path.realpath(ROOT):
    sys.exit(
        f"setup.py: run it from its own folder: `cd {ROOT}` first (its source and package paths are "
        "relative to that folder; pip changes to it by itself)"
    )

# kernels/ installs as mmsd_ext.kernels (package_dir). The legacy editable install,
# `setup.py develop` (what pip runs for -e when it cannot use setuptools' PEP 660
# install, e.g. setuptools < 64), only puts this folder on sys.path: kernels/ would
# import as a top-level package and mmsd_ext.kernels (the triton backend) would be
# missing. Refuse it rather than build that.
if "develop" in sys.argv[1:]:
    sys.exit(
        f"setup.py: `setup.py develop` (the legacy editable install; setuptools here is {setuptools.__version__}) "
        "cannot install kernels/ as mmsd_ext.kernels. Use setuptools >= 64 "
        "(pip install 'setuptools>=64'; requirements.txt pins one) with "
        "`pip install --no-build-isolation -e .`, or install without -e."
    )


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(path):
    # A real toolkit has the compiler binary and the runtime headers side by side;
    # a wrapper script's folder (e.g. /usr/local/bin) has neither header.
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _find_cuda_home():
    """CUDA_HOME/CUDA_PATH if set, else the usual install folders, else nvcc's real location.

    torch guesses the toolkit from the ``nvcc`` on PATH (its parent's parent); on
    machines where that nvcc is a wrapper script outside the toolkit the guess is
    wrong, so we look for a folder that really holds a toolkit.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if not _is_toolkit(value):
                sys.exit(f"setup.py: {var}={value} is not a CUDA toolkit (no bin/nvcc and include/cuda_runtime.h)")
            return value
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
    for path in candidates:
        if _is_toolkit(path):
            return os.path.realpath(path)
    return None


NO_CUDA = _flag("MMSD_EXT_NO_CUDA")
FORCE_CUDA = _flag("FORCE_CUDA")
DEBUG = _flag("DEBUG")
SANITIZE = _flag("MMSD_EXT_SANITIZE")
if FORCE_CUDA and NO_CUDA:
    sys.exit("setup.py: FORCE_CUDA=1 and MMSD_EXT_NO_CUDA=1 contradict each other")
if FORCE_CUDA and SANITIZE:
    sys.exit("setup.py: FORCE_CUDA=1 and MMSD_EXT_SANITIZE=1 contradict each other (a sanitized build is CPU-only)")
# A sanitized build checks the C++ CPU kernels (they share their per-element maths with the
# CUDA ones). It leaves the CUDA kernels out: the CUDA runtime under ASan needs settings of
# its own (protect_shadow_gap=0), and compute-sanitizer is the tool for device code.
NO_CUDA = NO_CUDA or SANITIZE

CUDA_HOME = None if NO_CUDA else _find_cuda_home()
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension is imported: it reads it once.
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ["PATH"] = os.path.join(CUDA_HOME, "bin") + os.pathsep + os.environ.get("PATH", "")

try:
    import torch  # noqa: E402
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402
except ImportError as error:
    sys.exit(
        f"setup.py: torch cannot be imported here ({error}). The extension is compiled against the "
        "installed torch: install it first (pip install -r requirements.txt), then build without "
        "isolation: pip install --no-build-isolation -e ."
    )


def _nvcc_version(cuda_home):
    out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return token[1:]
    return out.strip().splitlines()[-1]


WITH_CUDA = bool(CUDA_HOME) and torch.version.cuda is not None and not NO_CUDA
if FORCE_CUDA and not WITH_CUDA:
    reason = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
    sys.exit(f"setup.py: FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None
NVCC_VERSION = _nvcc_version(CUDA_HOME) if WITH_CUDA else None

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))

macros = [("MMSD_EXT_VERSION", f'"{VERSION}"')]
cxx = ["-O0", "-g"] if DEBUG else ["-O3"]
cxx += ["-fopenmp"]
link = ["-fopenmp"]
if SANITIZE:
    # -fno-wrapv: Python's compile flags, which torch passes on, hold -fwrapv, under which
    # gcc's UBSan does not check signed overflow. -O1 (after -O3, so it wins) keeps the
    # reports' stacks readable; -fno-sanitize-recover: the first finding ends the process.
    sanitizers = "-fsanitize=address,undefined"
    cxx += [sanitizers, "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-fno-wrapv", "-g"]
    cxx += [] if DEBUG else ["-O1"]
    link += [sanitizers]
nvcc = ["-O0", "-g", "-G"] if DEBUG else ["-O3"]
nvcc += ["--expt-relaxed-constexpr", "-lineinfo"]
if WITH_CUDA:
    macros.append(("MMSD_EXT_WITH_CUDA", None))

ext_cls = CUDAExtension if WITH_CUDA else CppExtension
ext = ext_cls(
    name="mmsd_ext._C",
    sources=sources,
    include_dirs=[os.path.join(ROOT, "csrc")],
    define_macros=macros,
    extra_compile_args={"cxx": cxx, "nvcc": nvcc} if WITH_CUDA else {"cxx": cxx},
    extra_link_args=link,
)

BUILD_INFO = {
    "version": VERSION,
    "binary_interface": _binary_interface(),
    "torch": torch.__version__,
    "cuda": NVCC_VERSION,
    "torch_cuda": torch.version.cuda,
    "archs": ARCHS,
    "debug": DEBUG,
    "sanitize": SANITIZE,
    # The loader warns where the checkout's csrc/ no longer holds these sources.
    "csrc_sha256": _csrc_digest(),
}

print("mmsd_ext build settings:")
for key, value in [
    ("torch", torch.__version__),
    ("torch CUDA", torch.version.cuda),
    ("CUDA_HOME", CUDA_HOME),
    ("nvcc", NVCC_VERSION),
    ("CUDA kernels", WITH_CUDA),
    ("FORCE_CUDA", FORCE_CUDA),
    ("MMSD_EXT_NO_CUDA", NO_CUDA),
    ("TORCH_CUDA_ARCH_LIST", ARCHS),
    ("MAX_JOBS", os.environ.get("MAX_JOBS")),
    ("DEBUG", DEBUG),
    ("MMSD_EXT_SANITIZE", SANITIZE),
    ("sources", len(sources)),
]:
    print(f"  {key:<22} {value}")


class BuildWithInfo(BuildExtension):
    """Writes mmsd_ext/_build_info.json beside the extension.

    The loader reads it before touching the shared object, so that an extension
    built for another torch, or from older sources, is reported instead of
    crashing the import or running with what this tree no longer provides.
    """

    def run(self):
        super().run()
        targets = {os.path.join(ROOT, "mmsd_ext")}
        if not self.inplace:
            targets.add(os.path.join(self.build_lib, "mmsd_ext"))
        for folder in targets:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_info.json"), "w") as f:
                json.dump(BUILD_INFO, f, indent=2)


with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="mmsd_ext",
    version=VERSION,
    description="Fused Triton, CUDA and C++ kernels for weakly-supervised temporal action localization (MMSD)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mmsd_ext", "mmsd_ext.kernels", "mmsd_ext.train"],
    package_dir={"mmsd_ext": "mmsd_ext", "mmsd_ext.kernels": "kernels", "mmsd_ext.train": "mmsd_ext/train"},
    package_data={"mmsd_ext": ["_build_info.json"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithInfo.with_options(use_ninja=True)},
    install_requires=["torch", "numpy", "tqdm"],
    extras_require={"triton": ["triton"], "plot": ["matplotlib"], "test": ["pytest", "hypothesis", "torchvision"]},
    entry_points={"console_scripts": ["mmsd-train = mmsd_ext.train.__main__:main"]},
    zip_safe=False,
)
