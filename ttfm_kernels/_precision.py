"""The precision rules every op, loss and sampler shares (docs/design.md, "Precision policy").

An op resolves its compute dtype at its boundary, casts its inputs there, and runs its own arithmetic with
autocast switched off for the tensors' device (``no_autocast``), so what it computes in is what it declares,
under ``torch.autocast`` or not. Sums, statistics and times are kept in ``accumulator`` (float32, or float64
when an input is float64).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["accumulator", "autocast_dtype", "autocast_inputs", "cast", "model_dtype", "model_input", "no_autocast"]

#: Device types torch.autocast knows; others never autocast.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def accumulator(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or the widest of ``dtypes`` when that is wider (float64): the dtype of sums, statistics, times."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` is casting to on ``device``'s type, or None when autocast is off there."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The inputs of a matmul-class op (attention) as torch's autocast casts those of SDPA and matmuls: under
    autocast on the first tensor's device, every floating tensor but a float64 one in the autocast dtype;
    otherwise unchanged (mixed dtypes are then the op's error, as in SDPA). None stays None."""
    first = next(t for t in tensors if t is not None)
    dtype = autocast_dtype(first.device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)`` (differentiable, a no-op when it already has it); None stays None."""
    return None if t is None else t.to(dtype)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for ``device``'s type inside: an op's own arithmetic runs in the dtypes it cast to."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def model_dtype(model: object) -> torch.dtype | None:
    """The dtype of ``model``'s first floating parameter (None for a callable that is no nn.Module or has none):
    the dtype its inputs x are given in (teacher, student and EMA may hold different parameter dtypes)."""
    if not isinstance(model, torch.nn.Module):
        return None
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return None if param is None else param.dtype


def model_input(model: object, x: torch.Tensor) -> torch.Tensor:
    """x (data dtype) cast to ``model_dtype(model)`` for a call of the model; times are never cast."""
    dtype = model_dtype(model)
    return x if dtype is None else x.to(dtype)
