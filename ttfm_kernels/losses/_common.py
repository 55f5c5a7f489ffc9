"""Argument handling shared by every loss: validation, sigma, noise and time sampling, conditioning batching,
the per-sample squared error with weights and reduction (docs/math.md section 1), and the stats every loss returns."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ttfm_kernels._checks import check_float, check_like, check_per_sample
from ttfm_kernels._per_sample import REDUCTIONS, reduce_per_sample
from ttfm_kernels._precision import accumulator
from ttfm_kernels.flow.interpolant import interpolate, resolve_sigma
from ttfm_kernels.flow.time_sampling import TimeSampler, check_in_range, t_range_of

__all__ = ["Batch", "check_no_ema", "loss_stats", "prepare", "repeat_cond", "residual", "squared_error"]

_DEFAULT_SAMPLER = TimeSampler()


@dataclass
class Batch:
    """One training batch: x0 (noise), x1 (data), times s <= t (B,) in at least float32, x_s on the
    interpolant (x1's dtype), the conditioning of the student (``cond``) and of the teacher (``teacher_cond``:
    ``cond`` updated with the loss's ``teacher_cond`` argument), and the rest."""

    x0: torch.Tensor
    x1: torch.Tensor
    s: torch.Tensor | None
    t: torch.Tensor
    xs: torch.Tensor
    sigma: float
    cond: dict[str, object]
    teacher_cond: dict[str, object]
    weight: torch.Tensor | None

    @property
    def size(self) -> int:
        return self.x1.shape[0]

    @property
    def acc(self) -> torch.dtype:
        """The dtype targets and residuals are formed in: float32 (float64 for float64 data), whatever the
        models' output dtype (bf16 under autocast)."""
        return accumulator(self.x1.dtype)


def _check_model(name: str, model: object, x1: torch.Tensor) -> None:
    """Raise unless ``model`` is callable and its floating parameters are on x1's device (nothing to check if
    it has none). Their dtype may differ from x1's (a bf16 teacher beside an fp32 student): each model gets x in
    its own parameter dtype (``model_input``)."""
    if not callable(model):
        raise TypeError(f"{name} must be callable (an nn.Module), got {type(model).__name__}")
    if not isinstance(model, nn.Module):
        return
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and param.device != x1.device:
        raise ValueError(f"{name} is on {param.device} but x1 is on {x1.device}: move one to match")


def _time_dtype(x1: torch.Tensor) -> torch.dtype:
    """Times are kept in at least float32: in half precision t - s near the diagonal would round to 0."""
    return accumulator(x1.dtype)


def _check_times(name: str, times: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Validate user-given times (B,) and cast them to the time dtype. The finiteness check reads the values
    (a host sync on a GPU), so it runs on times the caller passed, never on times the loss drew."""
    check_per_sample(name, times, x1.shape[0], "x1", x1)
    if not torch.isfinite(times).all():
        raise ValueError(f"{name} has non-finite values")
    return times.to(_time_dtype(x1))


def _check_cond(name: str, cond: Mapping[str, object] | None) -> dict[str, object]:
    if cond is not None and not isinstance(cond, Mapping):
        raise TypeError(f"{name} must be a mapping of keyword arguments for the models, got {type(cond).__name__}")
    return dict(cond or {})


def prepare(x1: torch.Tensor, models: Mapping[str, object], *, sigma_from: object, pair: bool,
            cond: Mapping[str, object] | None, teacher_cond: Mapping[str, object] | None,
            x0: torch.Tensor | None, s: torch.Tensor | None, t: torch.Tensor | None, sigma: float | None,
            weight: torch.Tensor | None, reduction: str, time_sampler: TimeSampler | None,
            extrapolate: bool) -> Batch:
    """Validate the common loss arguments and fill in what was not given.

    ``models``: name -> model (None: absent), checked for dtype and device against x1. ``sigma_from``: the
    model whose ``sigma`` attribute is the noise scale (the teacher) unless ``sigma`` is given; another model in
    ``models`` with a different ``sigma`` attribute is an error. ``pair``: draw (s, t) with s <= t, else only t
    (s is None). x0 defaults to sigma * N(0, I); times default to ``time_sampler`` (uniform on the triangle),
    drawn inside ``sigma_from``'s ``t_range`` (default (0, 1)); given times outside it raise unless ``extrapolate``.
    ``teacher_cond`` updates ``cond`` (top-level keys replaced) for the teacher's calls only.
    Nothing here reads a tensor's values on the host unless the caller gave the times (see ``_check_times``).
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
    cond_dict = _check_cond("cond", cond)
    teacher_dict = {**cond_dict, **_check_cond("teacher_cond", teacher_cond)}
    if weight is not None:
        check_per_sample("weight", weight, batch, "x1", x1)
        if weight.requires_grad:
            raise ValueError("weight requires grad; per-sample weights are constants: pass weight.detach()")
    if x0 is None:
        x0 = sigma_value * torch.randn_like(x1)
    else:
        check_like("x0", x0, "x1", x1)
    if not pair and s is not None:
        raise ValueError("this loss takes no s")
    if pair and (s is None) != (t is None):
        raise ValueError("give both s and t, or neither (they are then drawn by time_sampler)")
    sampler = time_sampler if time_sampler is not None else _DEFAULT_SAMPLER
    t_range = t_range_of(sigma_from)
    if t is None:  # drawn: valid by construction, so nothing is read back
        if pair:
            s, t = sampler(batch, device=x1.device, dtype=_time_dtype(x1), t_range=t_range)
        else:
            t = sampler.single(batch, device=x1.device, dtype=_time_dtype(x1), t_range=t_range)
    else:
        t = _check_times("t", t, x1)
        check_in_range("t", t, t_range, extrapolate)
        if pair:
            s = _check_times("s", s, x1)
            check_in_range("s", s, t_range, extrapolate)
            if (t < s).any():
                raise ValueError(f"t < s for {int((t < s).sum())} samples; the flow-map losses need s <= t "
                                 "per sample")
    xs = interpolate(x0, x1, s if pair else t)
    return Batch(x0, x1, s, t, xs, sigma_value, cond_dict, teacher_dict, weight)


def repeat_cond(cond: Mapping[str, object], batch: int, n: int) -> dict[str, object]:
    """Conditioning for ``n`` model calls concatenated along the batch, built recursively through mappings,
    lists and tuples (e.g. diffusers' ``added_cond_kwargs``): a tensor whose leading dim is ``batch`` is repeated
    n times along it (``torch.cat([value] * n)``); anything else (shared tensors of another size, flags, None)
    is passed unchanged. Nested mappings come back as dicts, lists as lists, tuples (named or not) as their type.
    """
    def rep(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return torch.cat([value] * n) if value.dim() >= 1 and value.shape[0] == batch else value
        if isinstance(value, Mapping):
            return {k: rep(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rep(v) for v in value]
        if isinstance(value, tuple):
            items = [rep(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value
    return {k: rep(v) for k, v in cond.items()}


def check_no_ema(loss: str, ema: object) -> None:
    """The losses without a target network take ``ema`` only to share the common signature: reject one given."""
    if ema is not None:
        raise ValueError(f"{loss} uses no target network, so it takes no ema: pass ema=None")


def residual(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b formed in the accumulator (float32, float64 if either is float64), whatever the models' output
    dtypes: differentiable, so gradients reach a bf16 output in its own dtype."""
    acc = accumulator(a.dtype, b.dtype)
    return a.to(acc) - b.to(acc)


def squared_error(r: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """The per-sample squared error of docs/math.md section 1: l_b = mean over non-batch dims of r^2, then weighted
    and reduced ("mean", "sum", "none"). Accumulates in at least float32."""
    acc = torch.promote_types(r.dtype, torch.float32)
    l_b = r.to(acc).reshape(r.shape[0], -1).square().mean(dim=1)
    return reduce_per_sample(l_b, weight, reduction)


def loss_stats(loss: torch.Tensor, b: Batch, **measured: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stats a loss returns: detached 0-dim tensors, never Python numbers (converting one would synchronise
    the host with the device on every step; loggers convert). ``loss``: the mean of the returned loss (of the
    per-sample losses under reduction="none"); then ``measured`` (e.g. ``residual``, ``init``, ``term``: unweighted
    mean squared residuals); ``gap``: mean t - s, for the two-time losses."""
    stats = {"loss": loss.detach().mean(), **{k: v.detach() for k, v in measured.items()}}
    if b.s is not None:
        stats["gap"] = (b.t - b.s).detach().mean()
    return stats
