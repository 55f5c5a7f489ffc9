"""The one place ops allocate their outputs.

With ``TTFM_DEBUG_NAN_FILL=1`` (set by the test suite) floating outputs are NaN-filled instead of left
uninitialised, so a kernel that forgets to write part of an output cannot pass a parity test.
"""

from __future__ import annotations

import os

import torch

__all__ = ["empty", "empty_like"]


def empty(shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape)``, NaN-filled when ``TTFM_DEBUG_NAN_FILL=1`` and the dtype is floating."""
    if dtype.is_floating_point and os.environ.get("TTFM_DEBUG_NAN_FILL", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(t: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``empty(t.shape)`` on t's device, contiguous, with t's dtype unless ``dtype`` is given."""
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device)
