"""EMD, the Eulerian flow-map distillation baseline in regression form (docs/math.md section 3)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ttfm_kernels.flow.time_sampling import TimeSampler
from ttfm_kernels.jvp import jvp_sx
from ttfm_kernels.losses._common import prepare, squared_error
from ttfm_kernels.ops.residual.reference import per_sample

__all__ = ["emd_loss"]


def emd_loss(student: nn.Module, teacher: nn.Module, x1: torch.Tensor, *, ema: nn.Module | None = None,
             cond: Mapping[str, object] | None = None, x0: torch.Tensor | None = None,
             s: torch.Tensor | None = None, t: torch.Tensor | None = None, sigma: float | None = None,
             weight: torch.Tensor | None = None, reduction: str = "mean",
             time_sampler: TimeSampler | None = None) -> tuple[torch.Tensor, dict[str, object]]:
    """E w |u_theta(x_s, s, t) - sg(v(x_s, s) + (t - s) [d/ds u + (grad_x u) v(x_s, s)])|^2.

    The bracket is ONE JVP with tangent (v(x_s, s), 1, 0) of ``ema`` (theta^-), or of the student itself when
    ``ema`` is None, taken without a graph: no backprop through the JVP. The target is the Eulerian identity of
    the exact map. Arguments as in every loss (``ttfm_kernels.losses``). Returns (loss, stats).
    """
    b = prepare(x1, {"student": student, "teacher": teacher, "ema": ema}, sigma_from=teacher, pair=True,
                cond=cond, x0=x0, s=s, t=t, sigma=sigma, weight=weight, reduction=reduction,
                time_sampler=time_sampler)
    with torch.no_grad():
        v_s = teacher(b.xs, b.s, **b.cond)
        _, du = jvp_sx(ema if ema is not None else student, b.xs, b.s, b.t, v_s, **b.cond)
        target = v_s + per_sample(b.t - b.s, du) * du
    r = student(b.xs, b.s, b.t, **b.cond) - target
    loss = squared_error(r, b.weight, reduction)
    stats = {"loss": float(loss.detach().mean()), "residual": float(squared_error(r.detach(), None, "mean")),
             "gap": float((b.t - b.s).mean()), "sigma": b.sigma}
    return loss, stats
