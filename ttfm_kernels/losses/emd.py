"""EMD, the Eulerian flow-map distillation baseline in regression form (docs/math.md section 3)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ttfm_kernels._dispatch import BACKENDS
from ttfm_kernels._per_sample import per_sample
from ttfm_kernels._precision import model_input
from ttfm_kernels.flow.time_sampling import TimeSampler
from ttfm_kernels.jvp import jvp_sx
from ttfm_kernels.losses._common import loss_stats, prepare, residual, squared_error

__all__ = ["emd_loss"]


def emd_loss(student: nn.Module, teacher: nn.Module, x1: torch.Tensor, *, ema: nn.Module | None = None,
             cond: Mapping[str, object] | None = None, teacher_cond: Mapping[str, object] | None = None,
             x0: torch.Tensor | None = None, s: torch.Tensor | None = None, t: torch.Tensor | None = None,
             sigma: float | None = None, weight: torch.Tensor | None = None, reduction: str = "mean",
             time_sampler: TimeSampler | None = None,
             backend: str = "auto", extrapolate: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """E w |u_theta(x_s, s, t) - sg(v(x_s, s) + (t - s) [d/ds u + (grad_x u) v(x_s, s)])|^2.

    The bracket is ONE JVP with tangent (v(x_s, s), 1, 0) of ``ema`` (theta^-), or of the student itself when
    ``ema`` is None, taken without a graph: no backprop through the JVP. The target is the Eulerian identity of
    the exact map. The teacher's call gets ``teacher_cond`` merged into ``cond``. The target is formed in eager
    ops in the times' precision (at least float32), so no op here has a backend choice: ``backend`` is only
    checked, for the common signature. Arguments and stats ("loss", "residual", "gap") as in every loss
    (``ttfm_kernels.losses``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    b = prepare(x1, {"student": student, "teacher": teacher, "ema": ema}, sigma_from=teacher, pair=True,
                cond=cond, teacher_cond=teacher_cond, x0=x0, s=s, t=t, sigma=sigma, weight=weight,
                reduction=reduction, time_sampler=time_sampler, extrapolate=extrapolate)
    target_net = ema if ema is not None else student
    with torch.no_grad():
        v_s = teacher(model_input(teacher, b.xs), b.s, **b.teacher_cond)
        _, du = jvp_sx(target_net, model_input(target_net, b.xs), b.s, b.t, model_input(target_net, v_s), **b.cond)
        target = v_s.to(b.acc) + per_sample(b.t - b.s, du).to(b.acc) * du.to(b.acc)
    r = residual(student(model_input(student, b.xs), b.s, b.t, **b.cond), target)
    loss = squared_error(r, b.weight, reduction)
    return loss, loss_stats(loss, b, residual=squared_error(r.detach(), None, "mean"))
