"""Public entry points of the residual ops: validation, backend dispatch, forward AD (docs/design.md, "How to add
an op").

``flow_map_step`` builds X_{s,t}(x) = x + (t - s) u; ``itvm_residual_loss`` is the ITVM loss from its
residuals (docs/math.md section 2). Backends: "reference" (``reference.py``), "cpu" (``csrc/cpu/residual.cpp``) and
"cuda" (``csrc/cuda/ttfm_cuda.cu``; compiled, not run on a GPU), both built on ``csrc/include/ttfm/residual.h``.

Kernel ops (private, functional): ``ttfm::flow_map_step(x, u, s, t) -> y``, with its fake kernel and autograd
registered here; ``ttfm::itvm_residual_loss_fwd(...) -> [losses, terms(, grads)]`` (grads = {grad_u_st, grad_u_ss}
stacked), fake kernel here, no autograd (only the loss op calls it). ``flow_map_step`` is forward-AD aware by the
pattern: dual inputs are unpacked, the kernel op computes the primal and, in up to two more calls, the tangent
(tx + (t - s) tu, then + (tt - ts) u), and the result is made dual again.

The compiled residual loss is the functional op ``ttfm::itvm_residual_loss`` (csrc/cpu/residual.cpp, fake kernel
here) with its autograd registered in C++: the one documented exception to registering autograd from Python
(docs/design.md, "How to add an op"; measured in docs/performance.md: the same kernel and fusion with
``torch.library.register_autograd`` cost 0.1 - 0.27 ms more per forward + backward at B = 64, D = 4096, next to
0.36 ms). One kernel pass computes the weighted per-sample losses; on CPU, when gradients are needed, the same
pass writes them for a unit incoming gradient, which backward returns as they are (it recomputes them from the
inputs for any other gradient, and always on CUDA, where checking the gradient's value would synchronise). A loss
has no fused tangent kernel (it is a reduction) and C++ autograd functions do not run under torch.func
transforms, so a call carrying tangents or made inside torch.func.grad / vmap / jvp runs the reference formula,
which carries them. Non-contiguous inputs are copied to contiguous memory first. The same pass returns the two
statistics (``return_terms``).

Mixed input dtypes (autocast: a bf16 student against fp32 targets) are accepted: the kernels read one dtype, so
inputs of other dtypes are converted to the promoted dtype first (exact, one extra pass over those inputs only),
the residuals are combined in float32 (float64 when any input is float64), and autograd returns each gradient in
its input's own dtype.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd import forward_ad as fwAD

from ttfm_kernels import _ext
from ttfm_kernels._checks import FLOAT_DTYPES, check_float, check_like, check_per_sample
from ttfm_kernels._dispatch import OpBackends, always, carries_tangent, ext_kernel
from ttfm_kernels._per_sample import REDUCTIONS, per_sample
from ttfm_kernels._precision import accumulator
from ttfm_kernels.ops.residual.reference import (
    flow_map_step_reference,
    itvm_residual_loss_reference,
)

__all__ = ["flow_map_step", "itvm_residual_loss"]

_FLOW_MAP_STEP = OpBackends("flow_map_step", {
    "reference": always,
    "cpu": ext_kernel("flow_map_step", "CPU", FLOAT_DTYPES),
    "cuda": ext_kernel("flow_map_step", "CUDA", FLOAT_DTYPES),
}, gpu_order=("cuda",))
_RESIDUAL = OpBackends("itvm_residual_loss", {
    "reference": always,
    "cpu": ext_kernel("itvm_residual_loss_fwd", "CPU", FLOAT_DTYPES),
    "cuda": ext_kernel("itvm_residual_loss_fwd", "CUDA", FLOAT_DTYPES),
}, gpu_order=("cuda",))
Opt = torch.Tensor | None


def _autodiff_transform(*tensors: torch.Tensor | None) -> bool:
    """True inside a torch.func transform (grad, vmap, jvp, ...) or when a forward-AD tangent rides on one of
    these tensors: the compiled residual loss supports neither, so such calls run the reference formula."""
    return torch._C._functorch.peek_interpreter_stack() is not None or carries_tangent(*tensors)


def _residual_loss_fake(u_st, u_ss, v_s, target_a, target_b, coef, target_c, coef_c, weight, lambda_init,
                        lambda_term, reduction):
    shape = (u_st.shape[0],) if reduction == "none" else ()
    return (u_st.new_empty(shape, dtype=coef.dtype), u_st.new_empty((), dtype=coef.dtype),
            u_st.new_empty((), dtype=coef.dtype))


def _residual_kernel_fake(u_st, u_ss, v_s, target_a, target_b, coef, target_c, coef_c, weight, lambda_init,
                          lambda_term, grad_losses):
    batch = u_st.shape[0]
    out = [coef.new_empty((batch,)), coef.new_empty((batch, 2))]
    return out if grad_losses is None else [*out, u_st.new_empty((2, *u_st.shape))]


def _step_fake(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _step_setup_context(ctx, inputs, output) -> None:
    _, u, s, t = inputs
    ctx.save_for_backward(u, s, t)


def _step_backward(ctx, grad: torch.Tensor) -> tuple[Opt, Opt, Opt, Opt]:
    """Gradients of y = x + (t - s) u in plain torch ops (so they are themselves differentiable), formed in the
    accumulator dtype and returned in each input's dtype."""
    u, s, t = ctx.saved_tensors
    need_x, need_u, need_s, need_t = ctx.needs_input_grad
    g = grad.to(accumulator(u.dtype))
    grad_u = (per_sample(t - s, g).to(g.dtype) * g).to(u.dtype) if need_u else None
    rate = (g * u.to(g.dtype)).reshape(g.shape[0], -1).sum(1) if need_s or need_t else None
    return (grad if need_x else None, grad_u, (-rate).to(s.dtype) if need_s else None,
            rate.to(t.dtype) if need_t else None)


_STEP_OP = _ext.kernel_op("flow_map_step", fake=_step_fake, backward=_step_backward,
                          setup_context=_step_setup_context)
_ext.kernel_op("itvm_residual_loss_fwd", fake=_residual_kernel_fake)
_ext.kernel_op("itvm_residual_loss", fake=_residual_loss_fake)


def _kernel_step(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _STEP_OP(x.contiguous(), u.contiguous(), s.contiguous(), t.contiguous())


def _step_tangent(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, t: torch.Tensor, tx: Opt, tu: Opt, ts: Opt,
                  tt: Opt) -> Opt:
    """The tangent tx + (t - s) tu + (tt - ts) u through the kernel op (None when every tangent is)."""
    ty = None
    if tx is not None or tu is not None:
        ty = _kernel_step(torch.zeros_like(x) if tx is None else tx, torch.zeros_like(u) if tu is None else tu, s, t)
    if ts is not None or tt is not None:
        rate = (torch.zeros_like(t) if tt is None else tt) - (0 if ts is None else ts)
        ty = _kernel_step(torch.zeros_like(x) if ty is None else ty, u, torch.zeros_like(rate), rate)
    return ty


def flow_map_step(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *,
                  out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The flow-map step X_{s,t}(x) = x + (t - s) * u with per-sample times.

    x: (B, ...) floating, the state (its dtype is the data dtype); u: (B, ...) of any floating dtype (a model's
    output, bf16 under autocast), cast to x's dtype at the boundary; s, t: (B,) of any floating dtype (float32
    or wider by the precision policy). t - s and the step are formed in float32 (float64 for float64 x) and
    rounded once: returns (B, ...) in x's dtype (copied into ``out`` if given). Eager equivalent:
    ``(x.float() + (t - s).float().view(-1, *[1] * (x.dim() - 1)) * u.float()).to(x.dtype)``. Differentiable in
    every input, and forward-AD aware: tangents of x, u, s, t (``torch.func.jvp`` / ``forward_ad``) come back on
    the result, computed by the same kernel op.
    """
    check_float("x", x)
    check_float("u", u)
    u = u.to(x.dtype)
    check_like("u", u, "x", x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
    check_per_sample("s", s, x.shape[0], "x", x)
    check_per_sample("t", t, x.shape[0], "x", x)
    if out is not None:
        check_like("out", out, "x", x)
    name = _FLOW_MAP_STEP.select(backend, x.device, x.dtype)
    if name == "reference":
        y = flow_map_step_reference(x, u, s, t)  # plain torch ops: carries forward AD itself
    else:
        (xp, tx), (up, tu), (sp, ts), (tp, tt) = (fwAD.unpack_dual(a) for a in (x, u, s, t))
        y = _kernel_step(xp, up, sp, tp)
        ty = _step_tangent(xp, up, sp, tp, tx, tu, ts, tt)
        if ty is not None:
            y = fwAD.make_dual(y, ty)
    return y if out is None else out.copy_(y)


def _check_residual_tensor(name: str, t: torch.Tensor, u_st: torch.Tensor) -> None:
    """Raise unless ``t`` is a floating tensor shaped like u_st on its device (its dtype may differ)."""
    check_float(name, t)
    if t.shape != u_st.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(u_st.shape)} like u_st")
    if t.device != u_st.device:
        raise ValueError(f"{name} is on {t.device}, expected {u_st.device} like u_st")


def itvm_residual_loss(u_st: torch.Tensor, u_ss: torch.Tensor, v_s: torch.Tensor, target_a: torch.Tensor,
                       target_b: torch.Tensor, coef: torch.Tensor, *, target_c: torch.Tensor | None = None,
                       coef_c: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                       lambda_init: float = 1.0, lambda_term: float = 1.0, reduction: str = "mean",
                       return_terms: bool = False, backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The ITVM loss from its residuals, with target_T = target_a + coef * target_b + coef_c * target_c
    (docs/math.md section 2; the last term only when ``target_c`` is given).

    u_st, u_ss, v_s, target_a, target_b, target_c: (B, ...) floating, of any dtypes (each read in its own, all
    combined in float32, or float64 when any input is float64, so a cancelling pair such as the "fd" target's
    -u / delta + u' / delta is never rounded to the inputs' dtype); coef, coef_c, weight: (B,), used in that
    accumulation dtype. l_b = lambda_init * mean(|u_ss - v_s|^2) + lambda_term * mean(|u_st - target_T|^2) over
    non-batch dims, weighted by ``weight``, reduced by ``reduction`` ("mean" -> scalar, "sum" -> scalar,
    "none" -> (B,)), in the accumulation dtype. With ``return_terms`` returns (loss, init_mean, term_mean): the
    unweighted means of |u_ss - v_s|^2 and |u_st - target_T|^2 over the whole batch, 0-dim, detached, from the
    same pass. Gradients flow to u_st and u_ss only, each in its own dtype: v_s, the targets and the
    coefficients are stop-gradient by definition, so one that requires grad is an error.
    Eager equivalent: ``itvm_residual_loss_reference`` (ops/residual/reference.py).
    """
    check_float("u_st", u_st)
    if u_st.dim() == 0 or u_st.shape[0] == 0:
        raise ValueError(f"u_st must have shape (B, ...) with B >= 1, got {tuple(u_st.shape)}")
    if (target_c is None) != (coef_c is None):
        raise ValueError("target_c and coef_c must be given together (the term coef_c * target_c of target_T)")
    tensors = {"u_st": u_st, "u_ss": u_ss, "v_s": v_s, "target_a": target_a, "target_b": target_b}
    if target_c is not None:
        tensors["target_c"] = target_c
    for name, tensor in tensors.items():
        _check_residual_tensor(name, tensor, u_st)
    per_sample_args = {"coef": coef, "coef_c": coef_c, "weight": weight}
    for name, tensor in per_sample_args.items():
        if tensor is not None:
            check_per_sample(name, tensor, u_st.shape[0], "u_st", u_st)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, tensor in (*list(tensors.items())[2:], *per_sample_args.items()):
        if tensor is not None and tensor.requires_grad:
            raise ValueError(f"{name} requires grad, but it is a stop-gradient target: pass {name}.detach() "
                             "(gradients flow only to u_st and u_ss)")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors.values()))
    name = _RESIDUAL.select(backend, u_st.device, dtype)
    if name == "reference" or _autodiff_transform(*tensors.values(), coef, coef_c, weight):
        return itvm_residual_loss_reference(u_st, u_ss, v_s, target_a, target_b, coef, target_c=target_c,
                                            coef_c=coef_c, weight=weight, lambda_init=lambda_init,
                                            lambda_term=lambda_term, reduction=reduction, return_terms=return_terms)
    acc = torch.promote_types(dtype, torch.float32)
    u_st, u_ss, v_s, target_a, target_b, *rest = (t.to(dtype).contiguous() for t in tensors.values())
    loss, init_mean, term_mean = torch.ops.ttfm.itvm_residual_loss(
        u_st, u_ss, v_s, target_a, target_b, coef.to(acc).contiguous(), rest[0] if rest else None,
        None if coef_c is None else coef_c.to(acc).contiguous(),
        None if weight is None else weight.to(acc).contiguous(), float(lambda_init), float(lambda_term), reduction)
    return (loss, init_mean, term_mean) if return_terms else loss
