"""Sampling of training times: pairs s <= t for the flow-map losses, single times for flow matching."""

from __future__ import annotations

import torch

__all__ = ["TimeSampler"]

_MARGINALS = ("uniform", "lognormal")


class TimeSampler:
    """Draws time pairs (s, t) with 0 <= s <= t <= 1, and single times t in [0, 1].

    - ``marginal="uniform"`` (default): pairs uniform on the triangle {0 <= s <= t <= 1}; single times U(0, 1).
    - ``marginal="lognormal"``: each of the two times is logit-normal, sigmoid(N(mean, std^2)) (the
      "log-normal" schedule of rectified-flow training), then the pair is sorted; single times likewise.
    - ``min_gap``: pairs satisfy t - s >= min_gap (uniform case: uniform on that smaller triangle; log-normal
      case: the pair is spread about its midpoint to the gap, clamped into [0, 1]).
    - ``diagonal``: the fraction of pairs with s == t (drawn after the rest; these only train the
      initial-velocity identity u(x, s, s) = v(x, s)).

    ``sampler(batch, device=..., dtype=..., generator=None) -> (s, t)``, two (batch,) tensors;
    ``sampler.single(batch, ...) -> t``.
    """

    def __init__(self, *, marginal: str = "uniform", diagonal: float = 0.0, min_gap: float = 0.0,
                 mean: float = 0.0, std: float = 1.0) -> None:
        if marginal not in _MARGINALS:
            raise ValueError(f"marginal must be one of {_MARGINALS}, got {marginal!r}")
        if not 0.0 <= diagonal <= 1.0:
            raise ValueError(f"diagonal must be a fraction in [0, 1], got {diagonal!r}")
        if not 0.0 <= min_gap < 1.0:
            raise ValueError(f"min_gap must be in [0, 1), got {min_gap!r}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.marginal, self.diagonal, self.min_gap, self.mean, self.std = marginal, diagonal, min_gap, mean, std

    def __repr__(self) -> str:
        return (f"TimeSampler(marginal={self.marginal!r}, diagonal={self.diagonal}, min_gap={self.min_gap}, "
                f"mean={self.mean}, std={self.std})")

    def _draw(self, shape: tuple[int, ...], device: torch.device | str | None, dtype: torch.dtype,
              generator: torch.Generator | None) -> torch.Tensor:
        if self.marginal == "uniform":
            return torch.rand(shape, device=device, dtype=dtype, generator=generator)
        z = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        return torch.sigmoid(self.mean + self.std * z)

    def single(self, batch: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Single times t of shape (batch,) from the marginal."""
        return self._draw((batch,), device, dtype, generator)

    def __call__(self, batch: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._draw((2, batch), device, dtype, generator).sort(dim=0).values
        s, t = pair[0], pair[1]
        if self.min_gap > 0:
            if self.marginal == "uniform":  # uniform on {t - s >= g}: sorted pair on [0, 1 - g], t shifted by g
                s, t = s * (1 - self.min_gap), t * (1 - self.min_gap) + self.min_gap
            else:
                half = torch.clamp((self.min_gap - (t - s)) / 2, min=0)
                s, t = s - half, t + half
                shift = torch.clamp(t - 1, min=0) - torch.clamp(-s, min=0)  # back into [0, 1], gap kept
                s, t = s - shift, t - shift
        if self.diagonal > 0:
            diag = torch.rand((batch,), device=device, generator=generator) < self.diagonal
            t = torch.where(diag, s, t)
        return s, t
