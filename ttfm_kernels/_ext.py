"""Loads the compiled extensions once and reports what is available, and why not.

The extensions are plain shared libraries that register ``torch.ops.ttfm.*`` when loaded (no Python
bindings): ``_C`` (schemas and portable CPU kernels), ``_C_vec`` (AVX2 CPU kernels, loaded only when the
CPU supports them) and ``_C_cuda`` (CUDA kernels). A missing or broken library never breaks
``import ttfm_kernels``: it produces one warning and the reference paths keep working.
``TTFM_DISABLE_EXT=1`` skips loading on purpose (to test or to compare against the reference).
"""

from __future__ import annotations

import importlib.machinery
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["EXTENSIONS", "has_kernel", "has_op", "kernel_op", "load", "status"]

EXTENSIONS = ("_C", "_C_vec", "_C_cuda")
_status: dict[str, str | None] | None = None  # extension name -> None if loaded, else the reason


def _vec_capable() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    return None if cap in ("AVX2", "AVX512") else f"this CPU reports {cap}; the vectorized kernels need AVX2"


def _load_one(name: str) -> str | None:
    """Load ``ttfm_kernels.<name>``; return None on success, else why it is unavailable."""
    here = Path(__file__).parent
    paths = [here / f"{name}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        return "not built (install with a C++ compiler present: pip install --no-build-isolation .)"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:
        return f"failed to load {path}: {err}"
    return None


def load() -> dict[str, str | None]:
    """Load every extension once (later calls return the cached result): name -> None or the reason."""
    global _status
    if _status is not None:
        return _status
    status: dict[str, str | None] = {}
    if os.environ.get("TTFM_DISABLE_EXT", "0") == "1":
        _status = dict.fromkeys(EXTENSIONS, "disabled by TTFM_DISABLE_EXT=1")
        return _status
    status["_C"] = _load_one("_C")
    if status["_C"] is not None:
        status["_C_vec"] = status["_C_cuda"] = "needs _C, which is unavailable"
        warnings.warn(f"ttfm_kernels: compiled extension ttfm_kernels._C unavailable: {status['_C']}. "
                      "Ops fall back to their reference (pure PyTorch) paths.", RuntimeWarning, stacklevel=3)
    else:
        status["_C_vec"] = _vec_capable() or _load_one("_C_vec")
        if torch.version.cuda is None:
            status["_C_cuda"] = f"torch {torch.__version__} has no CUDA"
        else:
            status["_C_cuda"] = _load_one("_C_cuda")
    _status = status
    return status


def status() -> dict[str, str | None]:
    """Extension name -> None if loaded, else the reason it is not."""
    return load()


#: (op, dispatch key) pairs found to have a kernel: a registered kernel stays registered, and ops ask on every
#: call (a dispatcher query per call is costly next to a memory-bound kernel: docs/performance.md).
_kernels_found: set[tuple[str, str]] = set()


def has_op(name: str) -> bool:
    """True when ``torch.ops.ttfm.<name>`` exists (its schema was registered by a loaded extension)."""
    load()
    return hasattr(torch.ops.ttfm, name)


def has_kernel(name: str, dispatch_key: str) -> bool:
    """True when ``torch.ops.ttfm.<name>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA", "Meta" ...).

    Traceable: under ``torch.compile`` the registry is asked while tracing and the answer is a graph constant.
    """
    if torch.compiler.is_compiling():
        return _traced_has_kernel(name, dispatch_key)
    return _has_kernel(name, dispatch_key)


@torch.compiler.assume_constant_result
def _traced_has_kernel(name: str, dispatch_key: str) -> bool:
    return _has_kernel(name, dispatch_key)


def _has_kernel(name: str, dispatch_key: str) -> bool:
    if (name, dispatch_key) in _kernels_found:
        return True
    found = has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(f"ttfm::{name}", dispatch_key)
    if found:
        _kernels_found.add((name, dispatch_key))
    return found


def kernel_op(name: str, *, fake: Callable[..., Any], backward: Callable[..., Any] | None = None,
              setup_context: Callable[..., None] | None = None,
              impl: Callable[..., Any] | None = None) -> Any | None:
    """Register the private functional kernel op ``ttfm::<name>``: its fake kernel and, given ``backward``, its
    autograd (``torch.library.register_fake`` / ``register_autograd``; docs/design.md, "How to add an op").

    With ``impl`` (a Python kernel launcher such as a Triton one) the op is defined here from ``impl``'s type hints
    (``torch.library.custom_op``, no mutated arguments) for every device; without it the op is a compiled
    extension's schema, registered only when a loaded extension declared it (registering a fake kernel of a
    missing op raises). Returns ``torch.ops.ttfm.<name>``, or None when the compiled op is missing.
    """
    if impl is not None:
        torch.library.custom_op(f"ttfm::{name}", impl, mutates_args=())
    elif not has_op(name):
        return None
    torch.library.register_fake(f"ttfm::{name}", fake)
    if backward is not None:
        torch.library.register_autograd(f"ttfm::{name}", backward, setup_context=setup_context)
    return getattr(torch.ops.ttfm, name)
