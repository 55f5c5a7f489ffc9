"""Sampling of training times: pairs s <= t for the flow-map losses, single times for flow matching, inside
the teacher's time range ``t_range`` (an adapted teacher covers only part of [0, 1])."""

from __future__ import annotations

import math

import torch

__all__ = ["TimeSampler", "check_in_range", "check_t_range", "t_range_of"]

TRange = tuple[float, float]


def t_range_of(model: object) -> TRange:
    """``getattr(model, "t_range", (0.0, 1.0))``, checked by ``check_t_range``."""
    return check_t_range(getattr(model, "t_range", (0.0, 1.0)))


def check_t_range(value: object) -> TRange:
    """A time range as two floats (t_min, t_max); raises ValueError unless finite with t_min < t_max."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"t_range must be a pair (t_min, t_max) of numbers, got {value!r}") from err
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"t_range must be finite with t_min < t_max, got {value!r}")
    return lo, hi


def check_in_range(name: str, times: torch.Tensor, t_range: TRange, extrapolate: bool) -> None:
    """Raise ValueError if any of ``times`` lies outside ``t_range`` (bounds rounded to the times' dtype), unless
    ``extrapolate``."""
    if extrapolate:
        return
    lo, hi = (torch.tensor(v, dtype=times.dtype, device=times.device) for v in t_range)
    outside = (times < lo) | (times > hi)
    if outside.any():
        raise ValueError(f"{name}: {int(outside.sum())} of {times.numel()} values lie outside the teacher's t_range = "
                         f"({t_range[0]:.6g}, {t_range[1]:.6g}) (times in [{float(times.min()):.6g}, "
                         f"{float(times.max()):.6g}]): the teacher was not trained there; pass extrapolate=True "
                         "to evaluate it anyway")


_MARGINALS = ("uniform", "lognormal")


class TimeSampler:
    """Draws time pairs (s, t) with t_min <= s <= t <= t_max, and single times t in [t_min, t_max].

    The draws below are made on [0, 1] and mapped affinely onto ``t_range = (t_min, t_max)`` (a call argument,
    default (0, 1): the losses pass their teacher's), then clamped into it against rounding; ``min_gap`` stays
    a gap in time (it is divided by t_max - t_min before the draw and must stay below 1 after).

    - ``marginal="uniform"`` (default): pairs uniform on the triangle {0 <= s <= t <= 1}; single times U(0, 1).
    - ``marginal="lognormal"``: each of the two times is logit-normal, sigmoid(N(mean, std^2)) (the
      "log-normal" schedule of rectified-flow training), then the pair is sorted; single times likewise.
    - ``min_gap``: pairs satisfy t - s >= min_gap (uniform case: uniform on that smaller triangle; log-normal
      case: the pair is spread about its midpoint to the gap, clamped into [0, 1]).
    - ``diagonal``: the fraction of pairs with s == t (drawn after the rest; these only train the
      initial-velocity identity u(x, s, s) = v(x, s)).

    ``sampler(batch, device=..., dtype=..., generator=None, t_range=(0.0, 1.0)) -> (s, t)``, two (batch,)
    tensors; ``sampler.single(batch, ...) -> t``. ``dtype`` (default float32) must be float32 or wider.
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
        if not dtype.is_floating_point or dtype.itemsize < 4:
            raise ValueError(f"dtype must be float32 or wider (times are never drawn in half precision, where "
                             f"t - s near the diagonal rounds to 0), got {dtype}")
        if self.marginal == "uniform":
            return torch.rand(shape, device=device, dtype=dtype, generator=generator)
        z = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        return torch.sigmoid(self.mean + self.std * z)

    def single(self, batch: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               generator: torch.Generator | None = None, t_range: TRange = (0.0, 1.0)) -> torch.Tensor:
        """Single times t of shape (batch,) from the marginal, inside ``t_range``."""
        lo, hi = check_t_range(t_range)
        return _into(self._draw((batch,), device, dtype, generator), lo, hi)

    def __call__(self, batch: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None,
                 t_range: TRange = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = check_t_range(t_range)
        gap = self.min_gap / (hi - lo)
        if gap >= 1:
            raise ValueError(f"min_gap = {self.min_gap} does not fit in t_range = {t_range}")
        pair = self._draw((2, batch), device, dtype, generator).sort(dim=0).values
        s, t = pair[0], pair[1]
        if gap > 0:
            if self.marginal == "uniform":  # uniform on {t - s >= g}: sorted pair on [0, 1 - g], t shifted by g
                s, t = s * (1 - gap), t * (1 - gap) + gap
            else:
                half = torch.clamp((gap - (t - s)) / 2, min=0)
                s, t = s - half, t + half
                shift = torch.clamp(t - 1, min=0) - torch.clamp(-s, min=0)  # back into [0, 1], gap kept
                s, t = s - shift, t - shift
        if self.diagonal > 0:
            diag = torch.rand((batch,), device=device, generator=generator) < self.diagonal
            t = torch.where(diag, s, t)
        return _into(s, lo, hi), _into(t, lo, hi)


def _into(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """u in [0, 1] mapped onto [lo, hi] (clamped against rounding); the identity for (0, 1)."""
    if (lo, hi) == (0.0, 1.0):
        return u
    return (lo + (hi - lo) * u).clamp(lo, hi)
