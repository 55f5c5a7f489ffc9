"""PFMM, progressive flow-map matching (docs/math.md section 3): a jump matches two half jumps of a frozen copy."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ttfm_kernels._precision import model_input
from ttfm_kernels.flow.time_sampling import TimeSampler
from ttfm_kernels.losses._common import check_no_ema, loss_stats, prepare, residual, squared_error
from ttfm_kernels.ops.residual import flow_map_step

__all__ = ["progressive_loss"]


def progressive_loss(student: nn.Module, frozen: nn.Module, x1: torch.Tensor, *, ema: nn.Module | None = None,
                     cond: Mapping[str, object] | None = None, teacher_cond: Mapping[str, object] | None = None,
                     x0: torch.Tensor | None = None, s: torch.Tensor | None = None, t: torch.Tensor | None = None,
                     sigma: float | None = None, weight: torch.Tensor | None = None, reduction: str = "mean",
                     time_sampler: TimeSampler | None = None,
                     backend: str = "auto", extrapolate: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """E w |X_theta(x_s, s, t) - sg(Xc_{m,t}(Xc_{s,m}(x_s)))|^2, m = (s + t) / 2, Xc the ``frozen`` copy.

    student, frozen: two-time maps u(x, s, t, **cond); ``frozen`` plays the teacher (its calls get
    ``teacher_cond`` merged into ``cond``; sigma from ``frozen.sigma`` unless given) and is the target, so there
    is no ``ema`` (it must be None). No JVP. The residual is on the map X (not on u), so it vanishes like (t - s)
    near the diagonal; ``backend`` picks the kernel of its three ``flow_map_step`` calls. Arguments and stats
    ("loss", "residual" on the map, "gap") as in every loss (``ttfm_kernels.losses``).
    """
    check_no_ema("progressive_loss", ema)
    b = prepare(x1, {"student": student, "frozen": frozen}, sigma_from=frozen, pair=True, cond=cond,
                teacher_cond=teacher_cond, x0=x0, s=s, t=t, sigma=sigma, weight=weight, reduction=reduction,
                time_sampler=time_sampler, extrapolate=extrapolate)
    m = (b.s + b.t) / 2
    with torch.no_grad():
        mid = flow_map_step(b.xs, frozen(model_input(frozen, b.xs), b.s, m, **b.teacher_cond), b.s, m,
                            backend=backend)
        target = flow_map_step(mid, frozen(model_input(frozen, mid), m, b.t, **b.teacher_cond), m, b.t,
                               backend=backend)
    u = student(model_input(student, b.xs), b.s, b.t, **b.cond)
    r = residual(flow_map_step(b.xs, u, b.s, b.t, backend=backend), target)
    loss = squared_error(r, b.weight, reduction)
    return loss, loss_stats(loss, b, residual=squared_error(r.detach(), None, "mean"))
