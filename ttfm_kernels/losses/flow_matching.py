"""Flow matching, the teacher's training loss (docs/math.md section 3)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ttfm_kernels._precision import model_input
from ttfm_kernels.flow.time_sampling import TimeSampler
from ttfm_kernels.losses._common import loss_stats, prepare, residual, squared_error

__all__ = ["flow_matching_loss"]


def flow_matching_loss(model: nn.Module, x1: torch.Tensor, *, cond: Mapping[str, object] | None = None,
                       x0: torch.Tensor | None = None, t: torch.Tensor | None = None, sigma: float | None = None,
                       weight: torch.Tensor | None = None, reduction: str = "mean",
                       time_sampler: TimeSampler | None = None,
                       extrapolate: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """E w |v_theta(x_t, t) - (x1 - x0)|^2 with x_t = (1 - t) x0 + t x1, x0 ~ N(0, sigma^2 I).

    model: the velocity field v(x, t, **cond) being trained; its ``sigma`` attribute is the noise scale unless
    ``sigma`` is given. t: (B,) or drawn by ``time_sampler.single``. Arguments as in every loss
    (``ttfm_kernels.losses``); there is no teacher, no s and no op with a backend choice. Returns (loss, stats),
    stats["loss"] and stats["residual"] (the unweighted mean squared residual) as detached 0-dim tensors.
    """
    b = prepare(x1, {"model": model}, sigma_from=model, pair=False, cond=cond, teacher_cond=None, x0=x0, s=None,
                t=t, sigma=sigma, weight=weight, reduction=reduction, time_sampler=time_sampler,
                extrapolate=extrapolate)
    r = residual(model(model_input(model, b.xs), b.t, **b.cond), b.x1.to(b.acc) - b.x0.to(b.acc))
    loss = squared_error(r, b.weight, reduction)
    return loss, loss_stats(loss, b, residual=squared_error(r.detach(), None, "mean"))
