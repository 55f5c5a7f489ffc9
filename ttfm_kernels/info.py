"""``python -m ttfm_kernels.info``: versions, and which backends are available here and why not."""

from __future__ import annotations

import os
import platform

import torch

from ttfm_kernels import _ext
from ttfm_kernels._version import __version__

__all__ = ["backend_report", "main"]


def _triton() -> tuple[str, str | None, str | None]:
    """(version, reason Triton cannot run on GPU, reason the interpreter cannot run)."""
    try:
        import triton
    except ImportError as err:
        return "not installed", f"import failed: {err}", f"import failed: {err}"
    gpu = None if torch.cuda.is_available() else "no CUDA device visible to torch"
    interp = None if os.environ.get("TRITON_INTERPRET", "0") == "1" else "set TRITON_INTERPRET=1 to enable"
    return triton.__version__, gpu, interp


def backend_report() -> dict[str, str | None]:
    """Backend -> None if available, else the reason it is not."""
    status = _ext.status()
    _, triton_gpu, triton_interp = _triton()
    cuda = status["_C_cuda"]
    if cuda is None and not torch.cuda.is_available():
        cuda = "built, but no CUDA device visible to torch"
    return {
        "reference (pure PyTorch)": None,
        "C++ CPU (ttfm_kernels._C)": status["_C"],
        "C++ CPU vectorized (ttfm_kernels._C_vec)": status["_C_vec"],
        "CUDA (ttfm_kernels._C_cuda)": cuda,
        "Triton on GPU": triton_gpu,
        "Triton interpreter (CPU)": triton_interp,
    }


def main() -> None:
    """Print versions and the backend report."""
    print(f"ttfm_kernels {__version__}")
    print(f"python       {platform.python_version()} ({platform.machine()})")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)")
    print(f"triton       {_triton()[0]}")
    print("backends:")
    for name, reason in backend_report().items():
        print(f"  {name:42s} {'available' if reason is None else 'unavailable: ' + reason}")


if __name__ == "__main__":
    main()
