"""Argument handling shared by every loss: validation, sigma, noise and time sampling, conditioning batching,
and the per-sample squared error with weights and reduction (docs/math.md section 1)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ttfm_kernels._checks import check_float, check_like, check_per_sample
from ttfm_kernels.flow.interpolant import interpolate, resolve_sigma
from ttfm_kernels.flow.time_sampling import TimeSampler
from ttfm_kernels.ops.residual.reference import reduce_per_sample

__all__ = ["REDUCTIONS", "Batch", "prepare", "repeat_cond", "squared_error"]

REDUCTIONS = ("mean", "sum", "none")
_DEFAULT_SAMPLER = TimeSampler()


@dataclass
class Batch:
    """One training batch: x0 (noise), x1 (data), times s <= t (B,) in at least float32, x_s on the
    interpolant (x1's dtype), and the rest."""

    x0: torch.Tensor
    x1: torch.Tensor
    s: torch.Tensor | None
    t: torch.Tensor
    xs: torch.Tensor
    sigma: float
    cond: dict[str, object]
    weight: torch.Tensor | None

    @property
    def size(self) -> int:
        return self.x1.shape[0]


def _check_model(name: str, model: object, x1: torch.Tensor) -> None:
    """Raise unless ``model``'s floating parameters have x1's dtype and device (nothing to check if it has none)."""
    if not callable(model):
        raise TypeError(f"{name} must be callable (an nn.Module), got {type(model).__name__}")
    if not isinstance(model, nn.Module):
        return
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return
    if param.dtype != x1.dtype:
        raise TypeError(f"{name} has {param.dtype} parameters but x1 is {x1.dtype}: cast one to match")
    if param.device != x1.device:
        raise ValueError(f"{name} is on {param.device} but x1 is on {x1.device}: move one to match")


def _time_dtype(x1: torch.Tensor) -> torch.dtype:
    """Times are kept in at least float32: in half precision t - s near the diagonal would round to 0."""
    return torch.promote_types(x1.dtype, torch.float32)


def _check_times(name: str, times: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    check_per_sample(name, times, x1.shape[0], "x1", x1)
    if not torch.isfinite(times).all():
        raise ValueError(f"{name} has non-finite values")
    return times.to(_time_dtype(x1))


def prepare(x1: torch.Tensor, models: Mapping[str, object], *, sigma_from: object, pair: bool,
            cond: Mapping[str, object] | None, x0: torch.Tensor | None, s: torch.Tensor | None,
            t: torch.Tensor | None, sigma: float | None, weight: torch.Tensor | None, reduction: str,
            time_sampler: TimeSampler | None) -> Batch:
    """Validate the common loss arguments and fill in what was not given.

    ``models``: name -> model, checked for dtype and device against x1. ``sigma_from``: the model whose ``sigma``
    attribute is the noise scale (the teacher) unless ``sigma`` is given; another model in ``models`` with a
    different ``sigma`` attribute is an error. ``pair``: draw (s, t) with s <= t, else only t (s is None).
    x0 defaults to sigma * N(0, I); times default to ``time_sampler`` (uniform on the triangle).
    """
    check_float("x1", x1)
    if x1.dim() == 0 or x1.shape[0] == 0:
        raise ValueError(f"x1 must have shape (B, ...) with B >= 1 (an empty batch has no loss), "
                         f"got {tuple(x1.shape)}")
    batch = x1.shape[0]
    for name, model in models.items():
        if model is not None:
            _check_model(name, model, x1)
    sigma_value = resolve_sigma(sigma_from, sigma)
    for name, model in models.items():
        other = getattr(model, "sigma", None)
        if model is not sigma_from and other is not None and not math.isclose(float(other), sigma_value):
            raise ValueError(f"{name}.sigma = {other} differs from the noise scale sigma = {sigma_value} "
                             "(from the teacher or sigma=): a model trained with one sigma fails with another")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if cond is not None and not isinstance(cond, Mapping):
        raise TypeError(f"cond must be a mapping of keyword arguments for the models, got {type(cond).__name__}")
    if weight is not None:
        check_per_sample("weight", weight, batch, "x1", x1)
        if weight.requires_grad:
            raise ValueError("weight requires grad; per-sample weights are constants: pass weight.detach()")
    if x0 is None:
        x0 = sigma_value * torch.randn_like(x1)
    else:
        check_like("x0", x0, "x1", x1)
    if (s is None) != (t is None) and pair:
        raise ValueError("give both s and t, or neither (they are then drawn by time_sampler)")
    sampler = time_sampler if time_sampler is not None else _DEFAULT_SAMPLER
    if t is None:
        if pair:
            s, t = sampler(batch, device=x1.device, dtype=_time_dtype(x1))
        else:
            t = sampler.single(batch, device=x1.device, dtype=_time_dtype(x1))
    t = _check_times("t", t, x1)
    if pair:
        s = _check_times("s", s, x1)
        if (t < s).any():
            raise ValueError(f"t < s for {int((t < s).sum())} samples; the flow-map losses need s <= t per sample")
    elif s is not None:
        raise ValueError("this loss takes no s")
    xs = interpolate(x0, x1, s if pair else t)
    return Batch(x0, x1, s, t, xs, sigma_value, dict(cond or {}), weight)


def repeat_cond(cond: Mapping[str, object], batch: int, n: int) -> dict[str, object]:
    """Conditioning for ``n`` model calls concatenated along the batch: tensors whose leading dim is the batch
    are repeated n times; anything else (shared tensors, flags) is passed unchanged."""
    def rep(value: object) -> object:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            return torch.cat([value] * n)
        return value
    return {k: rep(v) for k, v in cond.items()}


def squared_error(r: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """The per-sample squared error of docs/math.md section 1: l_b = mean over non-batch dims of r^2, then weighted
    and reduced ("mean", "sum", "none"). Accumulates in at least float32."""
    acc = torch.promote_types(r.dtype, torch.float32)
    l_b = r.to(acc).reshape(r.shape[0], -1).square().mean(dim=1)
    return reduce_per_sample(l_b, weight, reduction)
