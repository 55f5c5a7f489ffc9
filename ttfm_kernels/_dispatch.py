"""Backend selection shared by every op: ``backend="auto" | "reference" | "cpu" | "cuda" | "triton"``.

Precedence: an explicit ``backend=`` argument (anything but "auto") wins; otherwise the innermost
``use_backend(...)`` context; otherwise the ``TTFM_BACKEND`` environment variable; otherwise "auto".

"auto" picks, for CUDA tensors, the op's GPU backends in its preferred order; for CPU tensors the C++ CPU
backend; then the reference. It never picks Triton for CPU tensors. A backend skipped under "auto" warns
once per (op, reason); an explicitly requested backend that cannot run raises ``BackendUnavailableError``.

Each op declares its backends once, as an ``OpBackends`` whose checks return None (usable) or a reason::

    _BACKENDS = OpBackends("flow_map_step", {
        "reference": always,
        "cpu": ext_kernel("flow_map_step", "CPU"),
    })
    name = _BACKENDS.select(backend, x.device, x.dtype)

Under ``torch.compile`` the selection is resolved while Dynamo traces (``torch.compiler.assume_constant_result``:
the context variable, the environment and the extension registry are read then, outside the graph) and the
chosen name is a constant of the graph, so ``fullgraph=True`` works. A compiled graph keeps the backend it was
traced with: entering another ``use_backend`` later does not retrace it (``torch.compiler.reset()`` does).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from ttfm_kernels import _ext

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "OpBackends",
    "always",
    "carries_tangent",
    "current_backend",
    "ext_kernel",
    "triton_kernel",
    "use_backend",
    "warn_once",
]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
Check = Callable[[torch.device, torch.dtype], "str | None"]

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("ttfm_backend", default=None)
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()  # warn once even when threads race (fused_jvp runs on any thread)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call (the message says why)."""


def _validate(name: str, argname: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{argname} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: make ``name`` the default backend of every op called inside it."""
    token = _context_backend.set(_validate(name, "use_backend(name)"))
    try:
        yield
    finally:
        _context_backend.reset(token)


def current_backend() -> str:
    """The default backend in force here: the innermost ``use_backend``, else ``TTFM_BACKEND``, else "auto".

    Traceable: under ``torch.compile`` it is read once, while tracing, and is a constant of the graph.
    """
    if torch.compiler.is_compiling():
        return _traced_current_backend()
    return _current_backend()


def _current_backend() -> str:
    name = _context_backend.get()
    if name is not None:
        return name
    return _validate(os.environ.get("TTFM_BACKEND", "auto"), "TTFM_BACKEND")


@torch.compiler.assume_constant_result
def _traced_current_backend() -> str:
    return _current_backend()


def warn_once(op: str, reason: str) -> None:
    """Warn once per (op, reason) that ``op`` fell back to another backend."""
    with _warned_lock:
        if (op, reason) in _warned:
            return
        _warned.add((op, reason))
    warnings.warn(f"ttfm_kernels.{op}: {reason}", RuntimeWarning, stacklevel=4)


def carries_tangent(*tensors: torch.Tensor | None) -> bool:
    """True when a forward-AD tangent (``torch.func.jvp`` or ``forward_ad``) rides on one of ``tensors``.

    An op's explicit-tangent API sends such calls to its reference: a kernel op has no forward-AD rule and would
    return a zero tangent silently (docs/design.md, "The forward-AD pattern").
    """
    if fwAD._current_level < 0:  # no dual level open, so no tensor carries a tangent (the common, fast case)
        return False
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def always(device: torch.device, dtype: torch.dtype) -> str | None:
    """Availability check of a backend that runs everywhere (the reference)."""
    return None


def ext_kernel(op: str, dispatch_key: str, dtypes: tuple[torch.dtype, ...] | None = None) -> Check:
    """Availability check of a compiled kernel ``torch.ops.ttfm.<op>`` for one dispatch key ("CPU"/"CUDA")."""
    device_type = dispatch_key.lower()

    def check(device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != device_type:
            return f"the {device_type} backend needs {device_type} tensors, got {device.type}"
        if dtypes is not None and dtype not in dtypes:
            return f"the {device_type} kernel does not support {dtype}"
        if not _ext.has_kernel(op, dispatch_key):
            libraries = ("_C_cuda",) if dispatch_key == "CUDA" else ("_C", "_C_vec")
            status = _ext.status()
            why = "; ".join(f"ttfm_kernels.{k}: {status[k]}" for k in libraries if status[k] is not None)
            return f"no compiled {dispatch_key} kernel for ttfm::{op} ({why or 'not in the loaded extensions'})"
        return None

    return check


def triton_kernel(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)) -> Check:
    """Availability check of a Triton kernel: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    def check(device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ("Triton on CPU tensors needs TRITON_INTERPRET=1 in the environment before ttfm_kernels "
                    "is imported")
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels run on cuda tensors, got {device.type}"
        if dtype not in dtypes:
            return f"the Triton kernel does not support {dtype}"
        return None

    return check


@dataclass(frozen=True)
class OpBackends:
    """The backends of one op: name -> availability check, and the order "auto" tries on GPU."""

    op: str
    checks: Mapping[str, Check]
    gpu_order: tuple[str, ...] = ("triton", "cuda")

    def select(self, backend: str, device: torch.device, dtype: torch.dtype) -> str:
        """Resolve ``backend`` (possibly "auto") to a concrete backend name for this call.

        Traceable: under ``torch.compile`` the name is resolved while tracing and is a constant of the graph.
        """
        if torch.compiler.is_compiling():
            return _traced_select(self, backend, device, dtype)
        return self._select(backend, device, dtype)

    def _select(self, backend: str, device: torch.device, dtype: torch.dtype) -> str:
        name = _validate(backend, "backend")
        if name == "auto":
            name = _current_backend()
        if name != "auto":
            check = self.checks.get(name)
            if check is None:
                raise BackendUnavailableError(
                    f"ttfm_kernels.{self.op}: no {name!r} backend (available: {sorted(self.checks)})")
            reason = check(device, dtype)
            if reason is not None:
                raise BackendUnavailableError(f"ttfm_kernels.{self.op}: backend {name!r} unavailable: {reason}")
            return name
        order = (*self.gpu_order, "reference") if device.type == "cuda" else ("cpu", "reference")
        for candidate in order:
            check = self.checks.get(candidate)
            if check is None:
                continue
            reason = check(device, dtype)
            if reason is None:
                return candidate
            warn_once(self.op, f"backend {candidate!r} skipped: {reason}")
        raise BackendUnavailableError(f"ttfm_kernels.{self.op}: no backend can run {dtype} on {device}")


@torch.compiler.assume_constant_result
def _traced_select(op: OpBackends, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """``op.select`` run by Dynamo at trace time (Python values in, a constant string out)."""
    return op._select(backend, device, dtype)
