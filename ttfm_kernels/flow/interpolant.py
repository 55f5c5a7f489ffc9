"""The linear interpolant of docs/math.md section 1 and the one place sigma is resolved.

x_t = (1 - t) x0 + t x1 with x0 ~ N(0, sigma^2 I); sigma is one scalar stored with the teacher.
"""

from __future__ import annotations

import math

import torch

from ttfm_kernels._per_sample import per_sample

__all__ = ["interpolate", "resolve_sigma"]


def resolve_sigma(model: object, sigma: float | None = None) -> float:
    """The noise scale: ``sigma`` if given, else ``model.sigma`` if the model has one, else 1.0.

    Raises ValueError unless the result is a finite positive number (never estimate it per batch).
    """
    value = sigma if sigma is not None else getattr(model, "sigma", 1.0)
    if isinstance(value, torch.Tensor):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"sigma must be a finite positive number, got {value!r}")
    return float(value)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t x1. x0, x1: (B, ...); t: (B,) (used in x0's dtype). Differentiable."""
    tb = per_sample(t, x0).to(x0.dtype)
    return x0 + tb * (x1 - x0)
