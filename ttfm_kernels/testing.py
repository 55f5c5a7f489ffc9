"""Tolerances and comparison helpers shared by the tests and the benchmarks.

One tolerance table per dtype: a fast path computed in ``dtype`` is compared against the reference (computed
in float64 where possible) with ``TOLERANCES[dtype]``. ``atol`` is relative to the largest magnitude of the
reference, so the same table serves tensors of any scale.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "assert_close_to_ref", "assert_nontrivial", "tolerance"]

#: dtype -> (rtol, atol relative to max |reference|)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for results computed in ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise KeyError(f"no tolerance for {dtype}; known: {list(TOLERANCES)}") from None


def assert_close_to_ref(actual: torch.Tensor, reference: torch.Tensor, *, dtype: torch.dtype | None = None,
                        name: str = "output", scale: float = 1.0) -> None:
    """Assert ``actual`` matches ``reference`` within the tolerance of ``dtype`` (default: actual's dtype).

    Both are compared in float64 on CPU; NaN or Inf anywhere in ``actual`` fails. ``scale`` widens the
    tolerance for quantities with a known larger error growth (state why at the call site).
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    rtol, atol = tolerance(dtype or actual.dtype)
    a = actual.detach().to("cpu", torch.float64)
    r = reference.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values")
    magnitude = max(float(r.abs().max()) if r.numel() else 0.0, 1e-30)
    torch.testing.assert_close(a, r, rtol=rtol * scale, atol=atol * scale * magnitude,
                               msg=lambda m: f"{name} differs from the reference:\n{m}")


def assert_nontrivial(t: torch.Tensor, name: str = "tangent") -> None:
    """Assert ``t`` is finite and not all zeros: the classic silent failure of a dropped tangent."""
    if t is None:
        raise AssertionError(f"{name} is None")
    d = t.detach()
    if not torch.isfinite(d).all():
        raise AssertionError(f"{name} has non-finite values")
    if not d.ne(0).any():
        raise AssertionError(f"{name} is all zeros (a dropped tangent or gradient?)")
