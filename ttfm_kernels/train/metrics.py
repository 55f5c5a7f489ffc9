"""Sample-quality metrics for point clouds (the demo's table) and images (docs/math.md, "Evaluation protocols").

- ``teacher_match_rmse(a, b)``: sqrt(mean_b ||a_b - b_b||^2) between paired samples (a student's N-step
  samples and the teacher's fine ODE solution from the SAME noise): distillation fidelity.
- ``sliced_w2(a, b)``: sliced Wasserstein-2 distance, sqrt of the mean over random unit directions of the
  1D W2^2 between the projected samples (quantiles matched by sorting).
- ``histogram_kl(data, samples)``: KL(data || samples) between 2D histograms on a fixed grid, with a small
  floor on the model's bin probabilities so an empty bin costs a finite amount.
- ``frechet_distance(a, b)``: squared Frechet distance between Gaussians fitted to two feature sets (FID's
  formula); the features come from ``DigitsClassifier``, a small CNN trained at run time (``train_classifier``).
- ``coverage_kl(labels)``: KL(predicted-class histogram || uniform), mode coverage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsClassifier", "coverage_kl", "frechet_distance", "histogram_kl", "sliced_w2", "teacher_match_rmse",
           "train_classifier"]


def _check_points(name: str, x: torch.Tensor, min_n: int = 1) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < min_n:
        raise ValueError(f"{name} must be a (N, D) tensor with N >= {min_n}, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def teacher_match_rmse(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """sqrt(mean_b ||samples_b - reference_b||^2) for paired (N, ...) samples (same noise, same order).

    Images (N, C, H, W) are flattened: the norm is over all C * H * W values of a sample.
    """
    if isinstance(samples, torch.Tensor) and isinstance(reference, torch.Tensor) and samples.dim() > 2:
        samples, reference = samples.flatten(1), reference.flatten(1)
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


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by ``torch.linalg.eigh`` (negative eigenvalues,
    rounding noise, are clamped to 0)."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Squared Frechet distance between Gaussians fitted to features a (N, F) and b (M, F), N, M >= 2.

    d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64, both square roots by
    ``torch.linalg.eigh`` (the inner matrix is symmetric PSD, so its root's trace is the sum of the roots of its
    eigenvalues). Covariances are unbiased (divide by N - 1). This is FID's formula in another feature space.
    """
    _check_points("a", a, 2)
    _check_points("b", b, 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return max(float(d2), 0.0)


def coverage_kl(labels: torch.Tensor, num_classes: int = 10) -> float:
    """KL(h || uniform) = sum_c h_c log(h_c K) of the histogram h of (N,) integer ``labels`` over K classes.

    0 when every class is predicted equally often, log K when one class takes everything (mode collapse).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.numel() == 0 \
            or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be a non-empty (N,) integer tensor, got {getattr(labels, 'shape', labels)}")
    h = torch.bincount(labels.cpu().long(), minlength=num_classes).double() / labels.numel()
    if h.numel() != num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got max {int(labels.max())}")
    nz = h > 0
    return float((h[nz] * (h[nz] * num_classes).log()).sum())


class DigitsClassifier(nn.Module):
    """A small CNN classifier of (B, C, H, W) images in [-1, 1] (any H, W >= 4): ``features`` -> (B, 64).

    conv 3x3 (C -> 32) -> SiLU -> conv 3x3 stride 2 (32 -> 64) -> SiLU -> conv 3x3 stride 2 (64 -> 64) -> SiLU ->
    global average pool (the 64 features) -> linear (64 -> ``num_classes``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes}
        self.body = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
                                  nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU())
        self.head = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, 64), predicted classes (N,)) of images x (N, C, H, W), in batches, without a graph."""
        feats = torch.cat([self.features(x[i:i + batch]) for i in range(0, len(x), batch)])
        return feats, self.head(feats).argmax(dim=1)


def train_classifier(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                     *, seed: int = 0, steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
                     cache: str | Path | None = None) -> tuple[DigitsClassifier, float]:
    """Train ``DigitsClassifier`` on (train, train_labels); returns it (eval mode, no grad) and its test accuracy.

    AdamW, ``steps`` steps of ``batch_size`` images drawn with replacement, cosine-decayed ``lr``; every random
    draw comes from ``seed`` (the global RNG is left untouched). With ``cache`` (a file path), a classifier saved
    there for the same data shape, labels count, seed and schedule is loaded instead of trained, and a new one
    is saved there.
    """
    if train.dim() != 4 or train.shape[1:] != test.shape[1:]:
        raise ValueError(f"train and test must be (N, C, H, W) images of one shape, got {tuple(train.shape)} and "
                         f"{tuple(test.shape)}")
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    key: dict[str, Any] = {"shape": list(train.shape), "num_classes": num_classes, "seed": seed, "steps": steps,
                           "batch_size": batch_size, "lr": lr}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(train.shape[1], num_classes)
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            model.load_state_dict(saved["model"])
            return model.eval().requires_grad_(False), float(saved["accuracy"])
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # callers may be under no_grad (evaluate)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            idx = torch.randint(0, len(train), (batch_size,), generator=g)
            loss = F.cross_entropy(model(train[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    accuracy = float((model.embed(test)[1] == test_labels).double().mean())
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "model": model.state_dict(), "accuracy": accuracy}, cache)
    return model, accuracy
