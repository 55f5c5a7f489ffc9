"""LFMD / LMD, the Lagrangian flow-map distillation baseline (docs/math.md section 3), semigradient form."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ttfm_kernels.flow.time_sampling import TimeSampler
from ttfm_kernels.jvp import jvp_t
from ttfm_kernels.losses._common import prepare, squared_error
from ttfm_kernels.ops.residual import flow_map_step
from ttfm_kernels.ops.residual.reference import per_sample

__all__ = ["lfmd_loss"]


def lfmd_loss(student: nn.Module, teacher: nn.Module, x1: torch.Tensor, *, cond: Mapping[str, object] | None = None,
              x0: torch.Tensor | None = None, s: torch.Tensor | None = None, t: torch.Tensor | None = None,
              sigma: float | None = None, weight: torch.Tensor | None = None, reduction: str = "mean",
              time_sampler: TimeSampler | None = None) -> tuple[torch.Tensor, dict[str, object]]:
    """E w |d/dt X_theta(x_s, s, t) - sg(v(X_theta(x_s, s, t), t))|^2, d/dt X = u + (t - s) du/dt.

    One JVP of the student in t with its graph kept (reverse-over-forward through ``torch.func.jvp``, or the
    model's ``forward_jvp``): the gradient flows through the tangent du/dt. The teacher runs without a graph at
    the detached endpoint. Arguments as in every loss (``ttfm_kernels.losses``). Returns (loss, stats).
    """
    b = prepare(x1, {"student": student, "teacher": teacher}, sigma_from=teacher, pair=True, cond=cond, x0=x0,
                s=s, t=t, sigma=sigma, weight=weight, reduction=reduction, time_sampler=time_sampler)
    u, du = jvp_t(student, b.xs, b.s, b.t, create_graph=True, **b.cond)
    end = flow_map_step(b.xs, u, b.s, b.t)
    with torch.no_grad():
        v_end = teacher(end.detach(), b.t, **b.cond)
    r = u + per_sample(b.t - b.s, u) * du - v_end
    loss = squared_error(r, b.weight, reduction)
    stats = {"loss": float(loss.detach().mean()), "residual": float(squared_error(r.detach(), None, "mean")),
             "gap": float((b.t - b.s).mean()), "sigma": b.sigma}
    return loss, stats
