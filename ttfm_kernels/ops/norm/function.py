"""Public entry points of the modulated norm op: validation, backend dispatch, autograd and forward AD.

``jvp_norm_modulate_silu`` takes explicit tangents and returns (y, ty) (docs/math.md section 6);
``norm_modulate_silu`` is the same op for forward-mode AD (``torch.func.jvp`` / ``forward_ad``): it reads the
tangents off its dual inputs and attaches ty to y. Backends: "reference" (``reference.py``), "cpu"
(``csrc/cpu/vec/norm.cpp``) and "triton" (``triton.py``; GPU, or CPU under ``TRITON_INTERPRET=1``).

Kernel ops (private, functional; docs/design.md, "How to add an op"): ``ttfm::norm_modulate_jvp`` (C++) and
``ttfm::norm_modulate_jvp_triton`` (defined here), one signature, one fake kernel and one autograd registered on
both: ``(x, tx?, weight, bias, scale, shift, tscale, tshift, num_groups, eps, silu, with_ty) -> [y] or [y, ty]``.
With tangents, ONE kernel call produces y and ty; both are differentiable, and the backward recomputes from the
explicit reference formula. Without tangents the op is torch's own norm + modulation + SiLU when a graph is
needed, else the kernel without its tangent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD

from ttfm_kernels import _alloc, _ext
from ttfm_kernels._checks import FLOAT_DTYPES, check_float, check_like
from ttfm_kernels._dispatch import OpBackends, always, carries_tangent, ext_kernel, triton_kernel
from ttfm_kernels._precision import cast, no_autocast
from ttfm_kernels.ops.norm.reference import norm_modulate_eager, norm_modulate_jvp_reference

__all__ = ["group_norm_jvp", "jvp_norm_modulate_silu", "layer_norm_jvp", "norm_modulate_silu"]

_BACKENDS = OpBackends("jvp_norm_modulate_silu", {
    "reference": always,
    "cpu": ext_kernel("norm_modulate_jvp", "CPU", FLOAT_DTYPES),
    "triton": triton_kernel(),
}, gpu_order=("triton",))
_ACTIVATIONS = ("silu", None)
Opt = torch.Tensor | None


def _check_sized(name: str, t: torch.Tensor, shape: tuple[int, ...], layout: str, x: torch.Tensor) -> None:
    """Raise unless ``t`` is a floating tensor of ``shape`` on x's device (any floating dtype: the per-channel
    and per-sample inputs are read in the float32 accumulator)."""
    check_float(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, expected {x.device} like x")


def _validate(x: torch.Tensor, tx: Opt, scale: Opt, shift: Opt, tscale: Opt, tshift: Opt, num_groups: int | None,
              weight: Opt, bias: Opt, activation: str | None) -> None:
    check_float("x", x, FLOAT_DTYPES)
    if num_groups is None:
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, N, C) for LayerNorm (num_groups=None), got {tuple(x.shape)}")
        channels = x.shape[2]
    else:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be None (LayerNorm) or a positive int, got {num_groups!r}")
        if x.dim() != 4:
            raise ValueError(f"x must have shape (B, C, H, W) for GroupNorm (num_groups={num_groups}), "
                             f"got {tuple(x.shape)}")
        channels = x.shape[1]
        if channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide the channels C={channels} of x")
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if tx is not None:
        check_like("tx", tx, "x", x)
    for name, t in (("scale", scale), ("shift", shift), ("tscale", tscale), ("tshift", tshift)):
        if t is not None:
            _check_sized(name, t, (x.shape[0], channels), "(B, C)", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_sized(name, t, (channels,), "(C,)", x)
            if fwAD.unpack_dual(t).tangent is not None:
                raise ValueError(f"{name} carries a forward-AD tangent: a JVP with respect to the norm's "
                                 "parameters is not supported (docs/math.md section 6)")


def _kernel_fake(x: torch.Tensor, tx: Opt, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                 shift: torch.Tensor, tscale: torch.Tensor, tshift: torch.Tensor, num_groups: int, eps: float,
                 silu: bool, with_ty: bool) -> list[torch.Tensor]:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return [y, torch.empty_like(y)] if with_ty else [y]


def _kernel_triton(x: torch.Tensor, tx: Opt, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                   shift: torch.Tensor, tscale: torch.Tensor, tshift: torch.Tensor, num_groups: int, eps: float,
                   silu: bool, with_ty: bool) -> list[torch.Tensor]:
    """The Triton kernel op's implementation (GPU, or CPU under ``TRITON_INTERPRET=1``)."""
    from ttfm_kernels.ops.norm.triton import norm_modulate_jvp_triton

    out = [_alloc.empty_like(x) for _ in range(1 + with_ty)]
    norm_modulate_jvp_triton(x, tx, weight, bias, scale, shift, tscale, tshift, num_groups, eps, silu, out[0],
                             out[1] if with_ty else None)
    return out


def _kernel_setup_context(ctx, inputs: tuple, output: list) -> None:
    ctx.save_for_backward(*inputs[:8])
    ctx.options = inputs[8:11]


def _kernel_backward(ctx, grads: list[torch.Tensor]) -> tuple:
    """Gradients of (y, ty) by differentiating the reference formula (exact to any order)."""
    saved = ctx.saved_tensors
    num_groups, eps, silu = ctx.options
    wanted = ctx.needs_input_grad[:8]
    # On entry to backward, grad mode is on exactly when the caller asked for create_graph=True; a graph of
    # the gradients is only worth building when something in it requires grad.
    create_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*saved, *grads))
    with torch.enable_grad():
        if create_graph:
            # Differentiate the reference formula through the saved inputs themselves: the gradients then
            # carry their dependence on every input and on the incoming gradients, so a double backward is exact.
            inputs = list(saved)
        else:
            inputs = [None if t is None else t.detach().requires_grad_(need)
                      for t, need in zip(saved, wanted, strict=True)]
        x, tx, weight, bias, scale, shift, tscale, tshift = inputs
        outs = norm_modulate_jvp_reference(x, tx, scale, shift, tscale, tshift, num_groups=num_groups or None,
                                           weight=weight, bias=bias, eps=eps, activation="silu" if silu else None)
        leaves = [t for t, need in zip(inputs, wanted, strict=True) if need]
        found = iter(torch.autograd.grad(outs[:len(grads)], leaves, grads, allow_unused=True,
                                         create_graph=create_graph) if leaves else ())
    return (*(next(found) if need else None for need in wanted), None, None, None, None)


_KERNELS = {name: _ext.kernel_op(op, fake=_kernel_fake, backward=_kernel_backward,
                                 setup_context=_kernel_setup_context, impl=impl)
            for name, op, impl in (("cpu", "norm_modulate_jvp", None),
                                   ("triton", "norm_modulate_jvp_triton", _kernel_triton))}


def _run_kernel(name: str, x: torch.Tensor, tx: Opt, scale: Opt, shift: Opt, tscale: Opt, tshift: Opt,
                num_groups: int | None, weight: Opt, bias: Opt, eps: float, silu: bool,
                with_ty: bool) -> tuple[torch.Tensor, Opt]:
    """The kernel op of backend "cpu" or "triton": y (and ty when ``with_ty``) in x's dtype, contiguous."""
    acc = torch.promote_types(x.dtype, torch.float32)
    batch = x.shape[0]
    channels = x.shape[2] if num_groups is None else x.shape[1]

    def param(t: Opt, shape: tuple[int, ...], fill: float) -> torch.Tensor:
        if t is None:
            return torch.full(shape, fill, dtype=acc, device=x.device)
        return t.to(acc).contiguous()

    out = _KERNELS[name](x.contiguous(), None if tx is None else tx.contiguous(), param(weight, (channels,), 1.0),
                         param(bias, (channels,), 0.0), param(scale, (batch, channels), 0.0),
                         param(shift, (batch, channels), 0.0), param(tscale, (batch, channels), 0.0),
                         param(tshift, (batch, channels), 0.0), 0 if num_groups is None else num_groups, float(eps),
                         silu, with_ty)
    return out[0], out[1] if with_ty else None


def _norm_modulate(x: torch.Tensor, tx: Opt, scale: Opt, shift: Opt, tscale: Opt, tshift: Opt,
                   num_groups: int | None, weight: Opt, bias: Opt, eps: float, activation: str | None,
                   backend: str) -> tuple[torch.Tensor, Opt]:
    """Dispatch validated inputs (no forward-AD tangents on them) to a backend: (y, ty or None)."""
    name = _BACKENDS.select(backend, x.device, x.dtype)
    has_tangent = any(t is not None for t in (tx, tscale, tshift))
    if name == "reference":
        with no_autocast(x.device):
            return norm_modulate_jvp_reference(x, tx, scale, shift, tscale, tshift, num_groups=num_groups,
                                               weight=weight, bias=bias, eps=eps, activation=activation)
    if has_tangent:
        return _run_kernel(name, x, tx, scale, shift, tscale, tshift, num_groups, weight, bias, eps,
                           activation == "silu", with_ty=True)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scale, shift, weight, bias)):
        with no_autocast(x.device):
            return norm_modulate_eager(x, scale, shift, num_groups=num_groups, weight=weight, bias=bias, eps=eps,
                                       activation=activation), None
    return _run_kernel(name, x, None, scale, shift, None, None, num_groups, weight, bias, eps,
                       activation == "silu", with_ty=False)


def jvp_norm_modulate_silu(x: torch.Tensor, tx: Opt = None, scale: Opt = None, shift: Opt = None,
                           tscale: Opt = None, tshift: Opt = None, *, num_groups: int | None = None,
                           weight: Opt = None, bias: Opt = None, eps: float = 1e-5,
                           activation: str | None = "silu", backend: str = "auto") -> tuple[torch.Tensor, Opt]:
    """Fused norm + modulation + SiLU and its JVP with explicit tangents (docs/math.md section 6).

    x, tx: (B, N, C) with ``num_groups=None`` (LayerNorm over C), or (B, C, H, W) with ``num_groups=G``
    (GroupNorm, G dividing C); scale, shift, tscale, tshift: (B, C); weight, bias: (C,) (the norm's affine,
    no tangent), on x's device; any of them may be None. Precision: x (float64/32/16, bfloat16; bf16 activations
    under autocast) sets the compute and output dtype, tx is cast to it at the boundary; the per-channel and
    per-sample inputs (scale, shift, their tangents, weight, bias) may have any floating dtype (e.g. an fp32
    modulation beside bf16 activations) and are read in float32, where the statistics are accumulated
    (float64 for float64 x); autocast does not change this op (its arithmetic runs with autocast off).
    Returns (y, ty) in x's dtype; ty is None when every tangent is None. Eager equivalent::

        y = silu((F.layer_norm(x, (C,), weight, bias, eps) * (1 + scale[:, None]) + shift[:, None]))
        ty = the JVP of that with tangents (tx, tscale, tshift)   # GroupNorm: F.group_norm, scale[..., None, None]

    ``activation=None`` drops the SiLU. y and ty are differentiable in every input (gradients through the
    tangent included).
    """
    tx = cast(tx, x.dtype) if isinstance(x, torch.Tensor) else tx
    _validate(x, tx, scale, shift, tscale, tshift, num_groups, weight, bias, activation)
    if carries_tangent(x, tx, scale, shift, tscale, tshift):
        backend = "reference"  # nested forward AD through the explicit API: the plain formula carries it
    return _norm_modulate(x, tx, scale, shift, tscale, tshift, num_groups, weight, bias, eps, activation, backend)


def norm_modulate_silu(x: torch.Tensor, scale: Opt = None, shift: Opt = None, *, num_groups: int | None = None,
                       weight: Opt = None, bias: Opt = None, eps: float = 1e-5, activation: str | None = "silu",
                       backend: str = "auto") -> torch.Tensor:
    """y = act((norm(x) * weight + bias) * (1 + scale) + shift), forward-AD aware (shapes as in
    ``jvp_norm_modulate_silu``).

    Forward-mode tangents on x, scale and shift (``torch.func.jvp`` or ``torch.autograd.forward_ad``) go through
    ONE fused kernel call and come back attached to y; without them this is a plain differentiable op.
    """
    xp, tx = fwAD.unpack_dual(x)
    sp, tscale = fwAD.unpack_dual(scale) if scale is not None else (None, None)
    shp, tshift = fwAD.unpack_dual(shift) if shift is not None else (None, None)
    tx = cast(tx, xp.dtype)
    _validate(xp, tx, sp, shp, tscale, tshift, num_groups, weight, bias, activation)
    y, ty = _norm_modulate(xp, tx, sp, shp, tscale, tshift, num_groups, weight, bias, eps, activation, backend)
    return y if ty is None else fwAD.make_dual(y, ty)


def _flat(t: Opt, shape: tuple[int, ...]) -> Opt:
    return None if t is None else t.reshape(shape)


def layer_norm_jvp(x: torch.Tensor, tx: Opt, normalized_shape: Sequence[int], weight: Opt = None,
                   bias: Opt = None, eps: float = 1e-5, *, backend: str = "auto") -> tuple[torch.Tensor, Opt]:
    """``F.layer_norm`` and its tangent in one fused call (the norm op without modulation or activation).

    x, tx: (..., *normalized_shape), viewed as the op's (1, rows, C) LayerNorm form with C = prod(normalized_shape);
    weight, bias: ``normalized_shape`` or None, no tangent. Returns (y, ty) shaped like x (ty None when tx is).
    Eager equivalent: ``torch.func.jvp(lambda x: F.layer_norm(x, normalized_shape, weight, bias, eps), (x,), (tx,))``.
    """
    channels = math.prod(normalized_shape)
    rows = (1, -1, channels)
    y, ty = jvp_norm_modulate_silu(_flat(x, rows), _flat(tx, rows), weight=_flat(weight, (channels,)),
                                   bias=_flat(bias, (channels,)), eps=eps, activation=None, backend=backend)
    return y.view(x.shape), _flat(ty, x.shape)


def group_norm_jvp(x: torch.Tensor, tx: Opt, num_groups: int, weight: Opt = None, bias: Opt = None,
                   eps: float = 1e-5, *, backend: str = "auto") -> tuple[torch.Tensor, Opt]:
    """``F.group_norm`` and its tangent in one fused call (the norm op without modulation or activation).

    x, tx: (N, C, *) with any number of spatial dims (none included), viewed as the op's (N, C, L, 1) GroupNorm
    form; weight, bias: (C,) or None, no tangent. Returns (y, ty) shaped like x (ty None when tx is).
    Eager equivalent: ``torch.func.jvp(lambda x: F.group_norm(x, num_groups, weight, bias, eps), (x,), (tx,))``.
    """
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *) for group_norm, got {tuple(x.shape)}")
    form = (x.shape[0], x.shape[1], -1, 1)
    y, ty = jvp_norm_modulate_silu(x.reshape(form), _flat(tx, form), num_groups=num_groups, weight=weight,
                                   bias=bias, eps=eps, activation=None, backend=backend)
    return y.view(x.shape), _flat(ty, x.shape)
