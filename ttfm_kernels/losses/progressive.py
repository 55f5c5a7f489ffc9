"""PFMM, progressive flow-map matching (docs/math.md section 3): a jump matches two half jumps of a frozen copy."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ttfm_kernels.flow.time_sampling import TimeSampler
from ttfm_kernels.losses._common import prepare, squared_error
from ttfm_kernels.ops.residual import flow_map_step

__all__ = ["progressive_loss"]


def progressive_loss(student: nn.Module, frozen: nn.Module, x1: torch.Tensor, *,
                     cond: Mapping[str, object] | None = None, x0: torch.Tensor | None = None,
                     s: torch.Tensor | None = None, t: torch.Tensor | None = None, sigma: float | None = None,
                     weight: torch.Tensor | None = None, reduction: str = "mean",
                     time_sampler: TimeSampler | None = None) -> tuple[torch.Tensor, dict[str, object]]:
    """E w |X_theta(x_s, s, t) - sg(Xc_{m,t}(Xc_{s,m}(x_s)))|^2, m = (s + t) / 2, Xc the ``frozen`` copy.

    student, frozen: two-time maps u(x, s, t, **cond); sigma from ``frozen.sigma`` unless given. No JVP. The
    residual is on the map X (not on u), so it vanishes like (t - s) near the diagonal. Arguments as in every loss.
    """
    b = prepare(x1, {"student": student, "frozen": frozen}, sigma_from=frozen, pair=True, cond=cond, x0=x0, s=s,
                t=t, sigma=sigma, weight=weight, reduction=reduction, time_sampler=time_sampler)
    m = (b.s + b.t) / 2
    with torch.no_grad():
        mid = flow_map_step(b.xs, frozen(b.xs, b.s, m, **b.cond), b.s, m)
        target = flow_map_step(mid, frozen(mid, m, b.t, **b.cond), m, b.t)
    r = flow_map_step(b.xs, student(b.xs, b.s, b.t, **b.cond), b.s, b.t) - target
    loss = squared_error(r, b.weight, reduction)
    return loss, {"loss": float(loss.detach().mean()), "gap": float((b.t - b.s).mean()), "sigma": b.sigma}
