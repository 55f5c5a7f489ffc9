"""LFMD / LMD, the Lagrangian flow-map distillation baseline (docs/math.md section 3), semigradient form."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ttfm_kernels._per_sample import per_sample
from ttfm_kernels._precision import model_input
from ttfm_kernels.flow.time_sampling import TimeSampler
from ttfm_kernels.jvp import jvp_t
from ttfm_kernels.losses._common import check_no_ema, loss_stats, prepare, residual, squared_error
from ttfm_kernels.ops.residual import flow_map_step

__all__ = ["lfmd_loss"]


def lfmd_loss(student: nn.Module, teacher: nn.Module, x1: torch.Tensor, *, ema: nn.Module | None = None,
              cond: Mapping[str, object] | None = None, teacher_cond: Mapping[str, object] | None = None,
              x0: torch.Tensor | None = None, s: torch.Tensor | None = None, t: torch.Tensor | None = None,
              sigma: float | None = None, weight: torch.Tensor | None = None, reduction: str = "mean",
              time_sampler: TimeSampler | None = None,
              backend: str = "auto", extrapolate: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """E w |d/dt X_theta(x_s, s, t) - sg(v(X_theta(x_s, s, t), t))|^2, d/dt X = u + (t - s) du/dt.

    One JVP of the student in t with its graph kept (reverse-over-forward through ``torch.func.jvp``, or the
    model's ``forward_jvp``): the gradient flows through the tangent du/dt. The teacher runs without a graph at
    the detached endpoint (with ``teacher_cond``); no target network, so no ``ema``. The common arguments and
    stats ("loss", "residual", "gap") are those of every loss (``ttfm_kernels.losses``).
    """
    check_no_ema("lfmd_loss", ema)
    b = prepare(x1, {"student": student, "teacher": teacher}, sigma_from=teacher, pair=True, cond=cond,
                teacher_cond=teacher_cond, x0=x0, s=s, t=t, sigma=sigma, weight=weight, reduction=reduction,
                time_sampler=time_sampler, extrapolate=extrapolate)
    u, du = jvp_t(student, model_input(student, b.xs), b.s, b.t, create_graph=True, **b.cond)
    with torch.no_grad():
        end = flow_map_step(b.xs, u.detach(), b.s, b.t, backend=backend)
        v_end = teacher(model_input(teacher, end), b.t, **b.teacher_cond)
    r = residual(u.to(b.acc) + per_sample(b.t - b.s, u).to(b.acc) * du.to(b.acc), v_end)
    loss = squared_error(r, b.weight, reduction)
    return loss, loss_stats(loss, b, residual=squared_error(r.detach(), None, "mean"))
