"""Sample-quality metrics for point clouds (the demo's table).

- ``teacher_match_rmse(a, b)``: sqrt(mean_b ||a_b - b_b||^2) between paired samples (a student's N-step
  samples and the teacher's fine ODE solution from the SAME noise): distillation fidelity.
- ``sliced_w2(a, b)``: sliced Wasserstein-2 distance, sqrt of the mean over random unit directions of the
  1D W2^2 between the projected samples (quantiles matched by sorting).
- ``histogram_kl(data, samples)``: KL(data || samples) between 2D histograms on a fixed grid, with a small
  floor on the model's bin probabilities so an empty bin costs a finite amount.
"""

from __future__ import annotations

import math

import torch

__all__ = ["histogram_kl", "sliced_w2", "teacher_match_rmse"]


def _check_points(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a (N, D) tensor of points with N >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def teacher_match_rmse(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """sqrt(mean_b ||samples_b - reference_b||^2) for paired (N, D) point sets (same noise, same order)."""
    _check_points("samples", samples)
    _check_points("reference", reference)
    if samples.shape != reference.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} must be paired")
    return float((samples.double() - reference.double()).pow(2).sum(dim=1).mean().sqrt())


def _quantiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """(P, N) -> (P, n): each row's empirical quantiles at the n mid-points (k + 1/2) / n."""
    xs = torch.sort(x, dim=1).values
    m = xs.shape[1]
    if m == n:
        return xs
    pos = (torch.arange(n, dtype=x.dtype) + 0.5) / n * m - 0.5
    lo = pos.floor().clamp(0, m - 1).long()
    hi = (lo + 1).clamp(max=m - 1)
    w = (pos - lo).clamp(0, 1)
    return xs[:, lo] * (1 - w) + xs[:, hi] * w


def sliced_w2(a: torch.Tensor, b: torch.Tensor, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between point sets a (N, D) and b (M, D) (sizes may differ).

    Directions are ``num_projections`` Gaussian vectors normalised to unit length, drawn from ``seed`` (the
    same directions for every call with that seed, so rows of a table are comparable).
    """
    _check_points("a", a)
    _check_points("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(num_projections, a.shape[1], generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, pb = dirs @ a.detach().cpu().double().T, dirs @ b.detach().cpu().double().T  # (P, N), (P, M)
    n = max(pa.shape[1], pb.shape[1])
    return float((_quantiles(pa, n) - _quantiles(pb, n)).pow(2).mean().sqrt())


def histogram_kl(data: torch.Tensor, samples: torch.Tensor, *, bins: int = 64,
                 extent: tuple[float, float] | None = None, floor: float = 1e-6) -> float:
    """KL(p_data || p_samples) between 2D histograms of (N, 2) and (M, 2) points on a ``bins`` x ``bins`` grid.

    The grid covers ``extent`` (lo, hi) on both axes; by default the data's range padded by 10%. Samples
    outside the grid count against the model: their mass is lost (bin probabilities are counts / M, not
    renormalised). Model probabilities are floored at ``floor`` so an empty bin costs a finite amount.
    """
    _check_points("data", data)
    _check_points("samples", samples)
    if data.shape[1] != 2 or samples.shape[1] != 2:
        raise ValueError(f"histogram_kl needs 2D points, got dims {data.shape[1]} and {samples.shape[1]}")
    data, samples = data.detach().cpu().double(), samples.detach().cpu().double()
    if extent is None:
        lo, hi = float(data.min()), float(data.max())
        pad = 0.1 * (hi - lo) or 1.0
        extent = (lo - pad, hi + pad)
    rng = [extent[0], extent[1], extent[0], extent[1]]
    p = torch.histogramdd(data, bins=[bins, bins], range=rng).hist
    q = torch.histogramdd(samples, bins=[bins, bins], range=rng).hist
    p = p / data.shape[0]
    q = (q / samples.shape[0]).clamp(min=floor)
    mask = p > 0
    kl = float((p[mask] * (p[mask] / q[mask]).log()).sum())
    return kl if math.isfinite(kl) else float("inf")
