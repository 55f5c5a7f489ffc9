"""Reference (pure PyTorch) formulas of the residual ops: docs/math.md sections 1 and 2. The oracle."""

from __future__ import annotations

import functools

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
                                 target_c: torch.Tensor | None = None, coef_c: torch.Tensor | None = None,
                                 weight: torch.Tensor | None = None, lambda_init: float = 1.0,
                                 lambda_term: float = 1.0, reduction: str = "mean",
                                 return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The ITVM loss from its residuals (docs/math.md section 2), accumulated in at least float32.

    r_I = u_ss - v_s, r_T = u_st - (target_a + (coef * target_b + coef_c * target_c)) (the last term only with
    target_c), every input converted to the accumulation dtype first (float32, or float64 when any input is);
    l_b = lambda_init * mean(r_I^2) + lambda_term * mean(r_T^2) over the non-batch dims; then weights and
    ``reduction`` ("mean", "sum", "none"). Tensors (B, ...) of any floating dtypes; coef, coef_c and weight (B,).
    With ``return_terms`` returns (loss, mean(r_I^2), mean(r_T^2)), the two means unweighted over the whole batch,
    0-dim and detached. Differentiable in every input.
    """
    tensors = [u_st, u_ss, v_s, target_a, target_b] + ([] if target_c is None else [target_c])
    acc = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    r_i = u_ss.to(acc) - v_s.to(acc)
    scaled = per_sample(coef.to(acc), u_st) * target_b.to(acc)
    if target_c is not None:
        scaled = scaled + per_sample(coef_c.to(acc), u_st) * target_c.to(acc)
    r_t = u_st.to(acc) - (target_a.to(acc) + scaled)
    batch = u_st.shape[0]
    init_b = r_i.reshape(batch, -1).square().mean(dim=1)
    term_b = r_t.reshape(batch, -1).square().mean(dim=1)
    loss = reduce_per_sample(lambda_init * init_b + lambda_term * term_b, weight, reduction)
    if return_terms:
        return loss, init_b.detach().mean(), term_b.detach().mean()
    return loss
