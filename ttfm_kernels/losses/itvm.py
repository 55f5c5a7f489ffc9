"""ITVM: initial/terminal velocity matching (docs/math.md section 2), with the pluggable terminal target."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ttfm_kernels._per_sample import reduce_per_sample
from ttfm_kernels._precision import model_input
from ttfm_kernels.flow.time_sampling import TimeSampler
from ttfm_kernels.jvp import jvp_t
from ttfm_kernels.losses._common import loss_stats, prepare, repeat_cond, residual, squared_error
from ttfm_kernels.ops.residual import flow_map_step, itvm_residual_loss

__all__ = ["TARGETS", "itvm_loss"]

TARGETS = ("jvp", "euler", "fd")


def itvm_loss(student: nn.Module, teacher: nn.Module, x1: torch.Tensor, *, ema: nn.Module | None = None,
              cond: Mapping[str, object] | None = None, teacher_cond: Mapping[str, object] | None = None,
              x0: torch.Tensor | None = None, s: torch.Tensor | None = None, t: torch.Tensor | None = None,
              sigma: float | None = None, weight: torch.Tensor | None = None, reduction: str = "mean",
              time_sampler: TimeSampler | None = None, backend: str = "auto", extrapolate: bool = False,
              target: str = "jvp", delta: float = 0.1, lambda_init: float = 1.0, lambda_term: float = 1.0,
              terminal_init: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ITVM loss: lambda_init E w |u(x_s, s, s) - v(x_s, s)|^2 + lambda_term E w |u(x_s, s, t) - sg(target_T)|^2.

    student, ema: u(x, s, t, **cond) (``ema`` is the EMA copy theta^-; None: the student itself, run without a
    graph); teacher: v(x, t, **cond), its calls with ``teacher_cond`` merged into ``cond``. x1: data (B, ...).
    target_T (computed without a graph):
      "jvp" (default): v(phi^-, t) - (t - s) du^-/dt, phi^- = x_s + (t - s) u^-, one JVP of the EMA;
      "euler": (1 - delta) u^-(x_s, s, t') + delta v(phi'^-, t'), t' = t - delta (t - s), no JVP; the term is
        weighted by 1/delta so its gradient matches "jvp" (docs/math.md section 2);
      "fd": v(phi^-, t) - (u^-(t) - u^-(t')) / delta, two EMA forwards batched, no JVP; the three terms go to
        the residual op separately, which forms the cancelling difference in float32 (docs/math.md section 2).
    ``terminal_init`` adds lambda_init |u(y, r, r) - v(y, r)|^2 at the terminal point y = phi^- (r = t), or
    phi'^- (r = t') for "euler", reusing the teacher call. Times, noise, weights, sigma and ``reduction`` as in
    every loss (``ttfm_kernels.losses``). The two student calls are one batched forward, the two teacher calls
    one batched no-grad forward; the loss is ``itvm_residual_loss`` (``backend`` selects its kernel).
    Returns (loss, stats): stats "loss", "init" and "term" (the unweighted mean squared residuals, returned by
    the residual op from its own pass), "gap" (mean t - s) and, with ``terminal_init``, "terminal_init", all
    detached 0-dim tensors computed without a host sync.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target != "jvp" and not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must be in (0, 1] for target {target!r}, got {delta!r}")
    b = prepare(x1, {"student": student, "teacher": teacher, "ema": ema}, sigma_from=teacher, pair=True,
                cond=cond, teacher_cond=teacher_cond, x0=x0, s=s, t=t, sigma=sigma, weight=weight,
                reduction=reduction, time_sampler=time_sampler, extrapolate=extrapolate)
    xs, s, t, n, acc = b.xs, b.s, b.t, b.size, b.acc
    ema = ema if ema is not None else student
    cond2 = repeat_cond(b.cond, n, 2)
    with torch.no_grad():
        xe = model_input(ema, xs)
        if target == "jvp":
            u_ema, du_ema = jvp_t(ema, xe, s, t, **b.cond)
            end, t_end = flow_map_step(xs, u_ema, s, t, backend=backend), t
        else:
            t_prime = t - delta * (t - s)
            if target == "euler":
                u_prime = ema(xe, s, t_prime, **b.cond)
                end, t_end = flow_map_step(xs, u_prime, s, t_prime, backend=backend), t_prime
            else:
                u_ema, u_prime = ema(torch.cat([xe, xe]), torch.cat([s, s]), torch.cat([t, t_prime]),
                                     **cond2).chunk(2)
                end, t_end = flow_map_step(xs, u_ema, s, t, backend=backend), t
        v_s, v_end = teacher(model_input(teacher, torch.cat([xs, end])), torch.cat([s, t_end]),
                             **repeat_cond(b.teacher_cond, n, 2)).chunk(2)
        # The "fd" target's terms go to the op separately: it forms their cancelling difference in float32.
        third_term = {}
        if target == "jvp":
            target_a, target_b, coef = v_end, du_ema, s - t
        elif target == "euler":
            target_a, target_b, coef = delta * v_end.to(acc), u_prime, torch.full_like(t, 1.0 - delta)
        else:
            target_a, target_b, coef = v_end, u_ema, torch.full_like(t, -1.0 / delta)
            third_term = {"target_c": u_prime, "coef_c": torch.full_like(t, 1.0 / delta)}
    lambda_t = lambda_term / delta if target == "euler" else lambda_term
    if terminal_init:
        u_st, u_ss, u_end = student(model_input(student, torch.cat([xs, xs, end])), torch.cat([s, s, t_end]),
                                    torch.cat([t, s, t_end]), **repeat_cond(b.cond, n, 3)).chunk(3)
    else:
        xst = model_input(student, xs)
        u_st, u_ss = student(torch.cat([xst, xst]), torch.cat([s, s]), torch.cat([t, s]), **cond2).chunk(2)
    loss, init, term = itvm_residual_loss(u_st, u_ss, v_s, target_a, target_b, coef, **third_term, weight=b.weight,
                                          lambda_init=lambda_init, lambda_term=lambda_t,
                                          reduction="none" if terminal_init else reduction, return_terms=True,
                                          backend=backend)
    measured = {"init": init, "term": term}
    if terminal_init:
        extra = squared_error(residual(u_end, v_end), b.weight, "none")
        loss = reduce_per_sample(loss + lambda_init * extra, None, reduction)
        measured["terminal_init"] = squared_error(residual(u_end.detach(), v_end), None, "mean")
    return loss, loss_stats(loss, b, **measured)
