"""Sampling with a two-time flow map (docs/math.md section 4) and the teacher's reference ODE solve."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from ttfm_kernels._checks import check_float, check_per_sample
from ttfm_kernels._precision import accumulator, model_input
from ttfm_kernels.flow.interpolant import resolve_sigma
from ttfm_kernels.flow.time_sampling import TRange, check_t_range, t_range_of
from ttfm_kernels.ops.residual import flow_map_step

__all__ = ["flow_map", "ode_solve", "sample", "time_grid"]

_METHODS = ("euler", "heun")


def _times(name: str, value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A time given as a number or a (B,) tensor, as a (B,) tensor on x's device in float32 (float64 for float64
    x): times are never rounded to a half-precision state's dtype."""
    dtype = accumulator(x.dtype)
    if isinstance(value, torch.Tensor):
        check_per_sample(name, value, x.shape[0], "x", x)
        times = value.to(dtype)
    else:
        times = torch.full((x.shape[0],), float(value), dtype=dtype, device=x.device)
    if not torch.isfinite(times).all():
        raise ValueError(f"{name} must be finite")
    return times


def time_grid(steps: int, grid: str | Sequence[float] | torch.Tensor = "uniform", t_range: TRange = (0.0, 1.0), *,
              extrapolate: bool = False) -> list[float]:
    """The sampling grid t_min = t_0 < ... < t_N = t_max: ``"uniform"`` over ``t_range`` (default (0, 1)), or
    explicit increasing times, which must lie inside ``t_range`` unless ``extrapolate``."""
    lo, hi = check_t_range(t_range)
    if isinstance(grid, str):
        if grid != "uniform":
            raise ValueError(f"grid must be 'uniform' or a sequence of increasing times, got {grid!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        return [lo, *(lo + (hi - lo) * k / steps for k in range(1, steps)), hi]
    times = [float(v) for v in (grid.tolist() if isinstance(grid, torch.Tensor) else grid)]
    if len(times) < 2 or any(not math.isfinite(v) for v in times) or any(b <= a for a, b in itertools.pairwise(times)):
        raise ValueError(f"grid must hold at least two finite, strictly increasing times, got {times}")
    if not extrapolate and (times[0] < lo or times[-1] > hi):
        raise ValueError(f"grid [{times[0]:.6g}, ..., {times[-1]:.6g}] leaves the model's t_range = "
                         f"({lo:.6g}, {hi:.6g}), where it was not trained; pass extrapolate=True to use it anyway")
    return times


def _start(model: nn.Module, x0: torch.Tensor | Sequence[int], t0: float, sigma: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """The state at the grid's first time t0: (1 - t0) x0, the interpolant there without its t0 x1 part (exact
    at t0 = 0). x0 as given, or a draw from N(0, sigma^2 I) of shape ``x0`` on the model's device, in float32 or
    the model's dtype if wider (the state of a bf16 model is kept in float32; each call gets it in the model's
    dtype)."""
    if isinstance(x0, torch.Tensor):
        check_float("x0", x0)
        if x0.dim() == 0 or x0.shape[0] == 0:
            raise ValueError(f"x0 must have shape (B, ...) with B >= 1, got {tuple(x0.shape)}")
    else:
        param = next((p for p in model.parameters() if p.is_floating_point()), None) \
            if isinstance(model, nn.Module) else None
        dtype, device = ((accumulator(param.dtype), param.device) if param is not None
                         else (torch.get_default_dtype(), None))
        noise = torch.randn(tuple(x0), dtype=dtype, device=device, generator=generator)
        x0 = resolve_sigma(model, sigma) * noise
    return x0 if t0 == 0 else (1 - t0) * x0


def flow_map(model: nn.Module, x: torch.Tensor, s: float | torch.Tensor, t: float | torch.Tensor,
             **cond: object) -> torch.Tensor:
    """X_{s,t}(x) = x + (t - s) * model(x, s, t, **cond): one jump of a two-time flow map.

    x: (B, ...), the state (returned in its dtype; the model gets it in its parameter dtype); s, t: numbers or
    (B,) tensors, used in float32 or wider. Differentiable (no no_grad inside).
    """
    check_float("x", x)
    s_, t_ = _times("s", s, x), _times("t", t, x)
    return flow_map_step(x, model(model_input(model, x), s_, t_, **cond), s_, t_)


@torch.no_grad()
def sample(model: nn.Module, x0: torch.Tensor | Sequence[int], steps: int = 4,
           grid: str | Sequence[float] | torch.Tensor = "uniform", *, sigma: float | None = None,
           generator: torch.Generator | None = None, extrapolate: bool = False, **cond: object) -> torch.Tensor:
    """Sample with a two-time flow map u(x, s, t) (use the EMA weights): x_{k+1} = X_{t_k, t_{k+1}}(x_k).

    x0: the noise x0 (B, ...) of the interpolant, or a shape to draw N(0, sigma^2 I) for (sigma from
    ``model.sigma`` unless given). ``steps`` jumps on a uniform grid over the model's ``t_range`` (default
    (0, 1)), or the explicit ``grid`` (inside ``t_range`` unless ``extrapolate``). The first state is
    (1 - t_0) x0 (exactly x0 when t_0 = 0; for t_0 > 0 the t_0 x1 part of x_{t_0} is dropped). No graph is kept.
    """
    times = time_grid(steps, grid, t_range_of(model), extrapolate=extrapolate)
    x = _start(model, x0, times[0], sigma, generator)
    for a, b in itertools.pairwise(times):
        x = flow_map(model, x, a, b, **cond)
    return x


@torch.no_grad()
def ode_solve(teacher: nn.Module, x0: torch.Tensor | Sequence[int], steps: int = 100, method: str = "euler",
              grid: str | Sequence[float] | torch.Tensor = "uniform", *, sigma: float | None = None,
              generator: torch.Generator | None = None, extrapolate: bool = False,
              **cond: object) -> torch.Tensor:
    """Solve the probability-flow ODE dx/dt = teacher(x, t, **cond) from x0 over the grid (the reference).

    ``method``: "euler" (one teacher call per step) or "heun" (two; second order). x0, the grid over the
    teacher's ``t_range``, ``extrapolate`` and the first state (1 - t_0) x0 as in ``sample``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    times = time_grid(steps, grid, t_range_of(teacher), extrapolate=extrapolate)
    x = _start(teacher, x0, times[0], sigma, generator)
    for a, b in itertools.pairwise(times):
        ta, tb = _times("t", a, x), _times("t", b, x)
        v = teacher(model_input(teacher, x), ta, **cond)
        x_next = flow_map_step(x, v, ta, tb)
        if method == "heun":
            v_next = teacher(model_input(teacher, x_next), tb, **cond)
            x_next = flow_map_step(x, (v.to(x.dtype) + v_next.to(x.dtype)) / 2, ta, tb)
        x = x_next
    return x
