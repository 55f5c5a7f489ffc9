"""Public entry points of the residual ops: validation, backend dispatch, autograd.

``flow_map_step`` builds X_{s,t}(x) = x + (t - s) u; ``itvm_residual_loss`` is the ITVM loss from its
residuals (MATH.md section 2). Backends: "reference" (``reference.py``), "cpu" (``csrc/cpu/residual.cpp``) and
"cuda" (``csrc/cuda/ttfm_cuda.cu``; compiled, not run on a GPU), both built on ``csrc/include/ttfm/residual.h``.

The compiled residual loss is the functional custom op ``ttfm::itvm_residual_losses`` (weighted per-sample
losses, one pass over the inputs) with its autograd registered through ``torch.library.register_autograd``: the
backward is ``ttfm::itvm_residual_losses_backward`` (both gradients in one pass). The reduction over the batch
runs as torch ops on the (B,) losses. Non-contiguous inputs are copied to contiguous memory first.
"""

from __future__ import annotations

import torch

from ttfm_kernels import _alloc, _ext
from ttfm_kernels._checks import check_float, check_like, check_per_sample
from ttfm_kernels._dispatch import OpBackends, always, ext_kernel
from ttfm_kernels.ops.residual.reference import (
    flow_map_step_reference,
    itvm_residual_loss_reference,
    reduce_per_sample,
)

__all__ = ["flow_map_step", "itvm_residual_loss"]

_FLOAT = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_FLOW_MAP_STEP = OpBackends("flow_map_step", {
    "reference": always,
    "cpu": ext_kernel("flow_map_step", "CPU", _FLOAT),
    "cuda": ext_kernel("flow_map_step", "CUDA", _FLOAT),
}, gpu_order=("cuda",))
_RESIDUAL = OpBackends("itvm_residual_loss", {
    "reference": always,
    "cpu": ext_kernel("itvm_residual_loss_fwd", "CPU", _FLOAT),
    "cuda": ext_kernel("itvm_residual_loss_fwd", "CUDA", _FLOAT),
}, gpu_order=("cuda",))
_REDUCTIONS = ("mean", "sum", "none")


def _has_tangent(*tensors: torch.Tensor | None) -> bool:
    """True when a forward-AD tangent must be carried through these tensors."""
    return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    """True when a graph must be kept or a forward-AD tangent carried through these tensors."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return _has_tangent(*tensors)


@torch.library.custom_op("ttfm::itvm_residual_losses", mutates_args=())
def _residual_losses(u_st: torch.Tensor, u_ss: torch.Tensor, v_s: torch.Tensor, target_a: torch.Tensor,
                     target_b: torch.Tensor, coef: torch.Tensor, weight: torch.Tensor | None, lambda_init: float,
                     lambda_term: float) -> torch.Tensor:
    """Weighted per-sample ITVM losses (B,) in coef's dtype (the accumulation dtype) from the compiled kernel.

    All (B, ...) inputs contiguous and of one dtype; coef and weight contiguous (B,) in the accumulation dtype.
    """
    losses = _alloc.empty((u_st.shape[0],), dtype=coef.dtype, device=u_st.device)
    torch.ops.ttfm.itvm_residual_loss_fwd(u_st, u_ss, v_s, target_a, target_b, coef, weight, lambda_init,
                                          lambda_term, losses)
    return losses


@_residual_losses.register_fake
def _residual_losses_fake(u_st, u_ss, v_s, target_a, target_b, coef, weight, lambda_init, lambda_term):
    return u_st.new_empty((u_st.shape[0],), dtype=coef.dtype)


@torch.library.custom_op("ttfm::itvm_residual_losses_backward", mutates_args=())
def _residual_losses_backward(grad_losses: torch.Tensor, u_st: torch.Tensor, u_ss: torch.Tensor,
                              v_s: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor, coef: torch.Tensor,
                              weight: torch.Tensor | None, lambda_init: float,
                              lambda_term: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d/du_st, d/du_ss) of sum_b grad_losses[b] * losses[b], in u_st's dtype, from one kernel pass."""
    grad_u_st = _alloc.empty_like(u_st)
    grad_u_ss = _alloc.empty_like(u_ss)
    torch.ops.ttfm.itvm_residual_loss_bwd(grad_losses, u_st, u_ss, v_s, target_a, target_b, coef, weight,
                                          lambda_init, lambda_term, grad_u_st, grad_u_ss)
    return grad_u_st, grad_u_ss


@_residual_losses_backward.register_fake
def _residual_losses_backward_fake(grad_losses, u_st, u_ss, v_s, target_a, target_b, coef, weight, lambda_init,
                                   lambda_term):
    return torch.empty_like(u_st), torch.empty_like(u_ss)


def _residual_setup_context(ctx, inputs, output) -> None:
    u_st, u_ss, v_s, target_a, target_b, coef, weight, lambda_init, lambda_term = inputs
    ctx.save_for_backward(u_st, u_ss, v_s, target_a, target_b, coef, weight)
    ctx.lambdas = (lambda_init, lambda_term)


def _residual_backward(ctx, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    u_st, u_ss, v_s, target_a, target_b, coef, weight = ctx.saved_tensors
    grad_u_st, grad_u_ss = _residual_losses_backward(grad_losses.to(coef.dtype).contiguous(), u_st, u_ss, v_s,
                                                     target_a, target_b, coef, weight, *ctx.lambdas)
    return (grad_u_st if ctx.needs_input_grad[0] else None, grad_u_ss if ctx.needs_input_grad[1] else None,
            *[None] * 7)


torch.library.register_autograd("ttfm::itvm_residual_losses", _residual_backward,
                                setup_context=_residual_setup_context)


def _register_kernel_fakes() -> None:
    """Fake (meta) kernels of the private C++ ops, so they trace under torch.compile and pass opcheck.

    They write only into their ``out`` arguments, so the fakes do nothing. Registered only when the extension
    declared the ops (registering a fake of a missing op raises).
    """
    for op in ("flow_map_step", "itvm_residual_loss_fwd", "itvm_residual_loss_bwd"):
        if _ext.has_op(op):
            torch.library.register_fake(f"ttfm::{op}", lambda *args, **kwargs: None)


_register_kernel_fakes()


def flow_map_step(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *,
                  out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The flow-map step X_{s,t}(x) = x + (t - s) * u with per-sample times.

    x, u: (B, ...) of one floating dtype; s, t: (B,) floating (any float dtype, used in x's dtype).
    Returns (B, ...) in x's dtype (written into ``out`` if given). Eager equivalent:
    ``x + (t - s).view(-1, *[1] * (x.dim() - 1)) * u``. Differentiable in every input (the compiled kernel
    runs only when no graph or tangent is needed; otherwise the same formula runs as torch ops).
    """
    check_float("x", x)
    check_like("u", u, "x", x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
    check_per_sample("s", s, x.shape[0], "x", x)
    check_per_sample("t", t, x.shape[0], "x", x)
    if out is not None:
        check_like("out", out, "x", x)
    name = _FLOW_MAP_STEP.select(backend, x.device, x.dtype)
    if name == "reference" or _needs_autograd(x, u, s, t):
        y = flow_map_step_reference(x, u, s, t)
        return y if out is None else out.copy_(y)
    result = out if out is not None else _alloc.empty_like(x)
    torch.ops.ttfm.flow_map_step(x.contiguous(), u.contiguous(), s.contiguous(), t.contiguous(), result)
    return result


def itvm_residual_loss(u_st: torch.Tensor, u_ss: torch.Tensor, v_s: torch.Tensor, target_a: torch.Tensor,
                       target_b: torch.Tensor, coef: torch.Tensor, *, weight: torch.Tensor | None = None,
                       lambda_init: float = 1.0, lambda_term: float = 1.0, reduction: str = "mean",
                       backend: str = "auto") -> torch.Tensor:
    """The ITVM loss from its residuals, with target_T = target_a + coef * target_b (MATH.md section 2).

    u_st, u_ss, v_s, target_a, target_b: (B, ...) of one floating dtype; coef, weight: (B,).
    l_b = lambda_init * mean(|u_ss - v_s|^2) + lambda_term * mean(|u_st - target_T|^2) over non-batch dims,
    weighted by ``weight``, reduced by ``reduction`` ("mean" -> scalar, "sum" -> scalar, "none" -> (B,)).
    Accumulates in float32 (float64 for float64 inputs). Gradients flow to u_st and u_ss only: v_s and the
    targets are stop-gradient by definition, so one that requires grad is an error.
    """
    check_float("u_st", u_st)
    if u_st.dim() == 0 or u_st.shape[0] == 0:
        raise ValueError(f"u_st must have shape (B, ...) with B >= 1, got {tuple(u_st.shape)}")
    for name, tensor in (("u_ss", u_ss), ("v_s", v_s), ("target_a", target_a), ("target_b", target_b)):
        check_like(name, tensor, "u_st", u_st)
    check_per_sample("coef", coef, u_st.shape[0], "u_st", u_st)
    if weight is not None:
        check_per_sample("weight", weight, u_st.shape[0], "u_st", u_st)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    for name, tensor in (("v_s", v_s), ("target_a", target_a), ("target_b", target_b), ("coef", coef),
                         ("weight", weight)):
        if tensor is not None and tensor.requires_grad:
            raise ValueError(f"{name} requires grad, but it is a stop-gradient target: pass {name}.detach() "
                             "(gradients flow only to u_st and u_ss)")
    name = _RESIDUAL.select(backend, u_st.device, u_st.dtype)
    if name == "reference" or _has_tangent(u_st, u_ss, v_s, target_a, target_b, coef, weight):
        return itvm_residual_loss_reference(u_st, u_ss, v_s, target_a, target_b, coef, weight=weight,
                                            lambda_init=lambda_init, lambda_term=lambda_term, reduction=reduction)
    acc = torch.promote_types(u_st.dtype, torch.float32)
    per_sample = _residual_losses(
        u_st.contiguous(), u_ss.contiguous(), v_s.contiguous(), target_a.contiguous(), target_b.contiguous(),
        coef.to(acc).contiguous(), None if weight is None else weight.to(acc).contiguous(), float(lambda_init),
        float(lambda_term))
    return reduce_per_sample(per_sample, None, reduction)
