"""Build script for the compiled parts of ttfm_kernels.

Extensions (all optional: without a C++ compiler the package installs and runs on its reference paths):
- ``ttfm_kernels._C``: ``csrc/cpu/*.cpp``, portable flags. Declares every ``ttfm::`` op schema
  (``TORCH_LIBRARY_FRAGMENT``) and the portable CPU kernels.
- ``ttfm_kernels._C_vec``: ``csrc/cpu/vec/*.cpp``, compiled with AVX2/FMA on x86-64 (the hot vectorized CPU
  kernels). Loaded only when ``torch.backends.cpu.get_cpu_capability()`` reports AVX2 or better.
- ``ttfm_kernels._C_cuda``: ``csrc/cuda/*.cu``, only ``TORCH_LIBRARY_IMPL(ttfm, CUDA, m)`` registrations.
  Built when torch has CUDA and nvcc is found; ``TTFM_BUILD_CUDA=1`` forces it (fails loudly if impossible),
  ``TTFM_BUILD_CUDA=0`` skips it. Honours ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS`` and ``CUDA_HOME``;
  ``TTFM_NVCC_FLAGS`` adds nvcc flags (``make check-cuda`` passes ``--resource-usage``).

Install with torch already present: ``pip install --no-build-isolation .``
"""

from __future__ import annotations

import glob
import os
import platform
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
INCLUDE = [str(ROOT / "csrc" / "include")]
# at::parallel_for is an inline template that runs serially unless the extension itself is built with OpenMP;
# the extension then binds to the libgomp.so.1 torch already loaded (one OpenMP runtime in the process).
OPENMP = ["-fopenmp"] if platform.system() == "Linux" else []
CXX_FLAGS = ["-O3", "-fvisibility=hidden", *OPENMP]  # torch adds the -std it needs (C++20)
X86_VEC_FLAGS = ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-mavx2", "-mfma", "-mf16c"]


def _rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_wanted() -> bool:
    """Decide whether to build ``_C_cuda``; raise when it was forced but cannot be built."""
    flag = os.environ.get("TTFM_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return False
    import torch
    from torch.utils import cpp_extension

    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        reason = "nvcc not found (set CUDA_HOME to the toolkit root that holds bin/nvcc)"
    elif not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h")):
        # torch guesses CUDA_HOME as the parent of the first nvcc on PATH; a wrapper script such as
        # /usr/local/bin/nvcc makes that /usr/local, which holds no toolkit.
        reason = (f"CUDA_HOME={cpp_extension.CUDA_HOME} holds no CUDA toolkit (no include/cuda_runtime.h); set "
                  "CUDA_HOME to the toolkit root that holds the real bin/nvcc, e.g. /usr/local/cuda")
    if reason is None:
        return True
    if flag in ("1", "true", "yes"):
        raise RuntimeError(f"TTFM_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"ttfm_kernels: not building the CUDA extension: {reason}", file=sys.stderr)
    return False


def _pip_cuda_includes() -> list[str]:
    """Headers of the pip-installed CUDA toolkit pieces (nvidia/cu*/include), which torch's CUDA wheels use."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def _extensions() -> tuple[list, dict]:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("ttfm_kernels: no C++ compiler found; installing the reference (pure PyTorch) paths only",
              file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    exts = []
    cpu_sources = _rel(glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp")))
    if cpu_sources:
        exts.append(CppExtension("ttfm_kernels._C", cpu_sources, include_dirs=INCLUDE,
                                 extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=OPENMP))
    vec_sources = _rel(glob.glob(str(ROOT / "csrc" / "cpu" / "vec" / "*.cpp")))
    if vec_sources:
        flags = CXX_FLAGS + (X86_VEC_FLAGS if is_x86 else [])
        exts.append(CppExtension("ttfm_kernels._C_vec", vec_sources, include_dirs=INCLUDE,
                                 extra_compile_args={"cxx": flags}, extra_link_args=OPENMP))
    cuda_sources = _rel(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
    if cuda_sources and _cuda_wanted():
        exts.append(CUDAExtension(
            "ttfm_kernels._C_cuda", cuda_sources, include_dirs=INCLUDE + _pip_cuda_includes(),
            extra_compile_args={"cxx": CXX_FLAGS,
                                "nvcc": ["-O3", "-lineinfo", *shlex.split(os.environ.get("TTFM_NVCC_FLAGS", ""))]}))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
