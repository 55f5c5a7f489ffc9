"""Reference (pure PyTorch) formulas of the residual ops: docs/math.md sections 1 and 2. The oracle."""

from __future__ import annotations

import torch

from ttfm_kernels._per_sample import per_sample, reduce_per_sample
from ttfm_kernels._precision import accumulator

__all__ = ["flow_map_step_reference", "itvm_residual_loss_reference"]


def flow_map_step_reference(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """X_{s,t}(x) = x + (t - s) u with per-sample times. x, u: (B, ...) of one dtype; s, t: (B,).

    t - s is formed in the times' dtype and the step in the accumulator (float32, float64 for float64 inputs),
    then rounded once to x's dtype: a half-precision x never rounds the step size. Differentiable."""
    acc = accumulator(x.dtype)
    return (x.to(acc) + per_sample(t - s, x).to(acc) * u.to(acc)).to(x.dtype)


def itvm_residual_loss_reference(u_st: torch.Tensor, u_ss: torch.Tensor, v_s: torch.Tensor,
                                 target_a: torch.Tensor, target_b: torch.Tensor, coef: torch.Tensor, *,
                                 weight: torch.Tensor | None = None, lambda_init: float = 1.0,
                                 lambda_term: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """The ITVM loss from its residuals (docs/math.md section 2), accumulated in at least float32.

    r_I = u_ss - v_s, r_T = u_st - (target_a + coef * target_b), l_b = lambda_init * mean(r_I^2) +
    lambda_term * mean(r_T^2) over the non-batch dims; then weights and ``reduction`` ("mean", "sum", "none").
    Tensors (B, ...) of one dtype; coef and weight (B,). Differentiable in every input.
    """
    acc = torch.promote_types(u_st.dtype, torch.float32)
    r_i = u_ss.to(acc) - v_s.to(acc)
    target = target_a.to(acc) + per_sample(coef.to(acc), u_st) * target_b.to(acc)
    r_t = u_st.to(acc) - target
    batch = u_st.shape[0]
    l_b = (lambda_init * r_i.reshape(batch, -1).square().mean(dim=1)
           + lambda_term * r_t.reshape(batch, -1).square().mean(dim=1))
    return reduce_per_sample(l_b, weight, reduction)
