"""Public entry points of the attention ops: validation, backend dispatch, autograd and forward-mode AD.

``jvp_attention`` (explicit tangents in, tangents out) and ``attention`` (a forward-AD-aware drop-in for
``F.scaled_dot_product_attention``) share the private functional kernel ops (docs/design.md, "How to add an op"):
``ttfm::jvp_attention_fwd`` (C++, ``csrc/cpu/vec/attention.cpp``) and ``ttfm::jvp_attention_fwd_triton``
(``triton.py``; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``), ``(q, k, v, tq?, tk?, tv?, causal, scale, ...)
-> (o, t_o, lse, mu)`` in ONE fused pass, with one fake kernel and one autograd registered on both. Their backward
gives exact gradients through o, t_o and lse (LFMD needs them): fused and O(N)-memory through the backward kernel
ops ``ttfm::jvp_attention_bwd`` / ``ttfm::jvp_attention_bwd_triton`` (recomputation from lse and mu, docs/math.md
"Backward of the attention JVP"; fake kernels, no autograd), or by recomputing the explicit formula
(``reference.py``, which materialises (Nq, Nk)) for a GPU head dim without a backward configuration (one warning)
and for double backward (``create_graph=True``: the fused backward is not itself differentiable). The "reference"
backend is that formula itself. Both kernels read any strides with a unit last stride; outputs are contiguous.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from ttfm_kernels import _alloc, _ext
from ttfm_kernels._checks import FLOAT_DTYPES, check_float, check_like, check_rank
from ttfm_kernels._dispatch import (
    BackendUnavailableError,
    OpBackends,
    always,
    carries_tangent,
    ext_kernel,
    triton_kernel,
    warn_once,
)
from ttfm_kernels._precision import autocast_inputs, no_autocast
from ttfm_kernels.ops.attention.reference import jvp_attention_reference

__all__ = ["attention", "jvp_attention", "patch_sdpa"]

_BACKENDS = OpBackends("jvp_attention", {
    "reference": always,
    "cpu": ext_kernel("jvp_attention_fwd", "CPU", (torch.float32, torch.bfloat16)),
    "triton": triton_kernel(),
}, gpu_order=("triton",))
#: (block_q, block_k) tiles of the CPU kernel, 0 = its default. Tests shrink them so that small shapes run
#: several query and key blocks (the online rescaling); the results do not depend on them otherwise.
_CPU_TILES = (0, 0)
#: bf16 inputs on the CPU kernel's forward: 1 = bf16 GEMMs with fp32 accumulation, 0 = fp32 GEMMs on converted
#: tiles, -1 = 1 where the CPU has avx512_bf16 (tests force both paths).
_CPU_BF16_GEMM = -1
_LAYOUT = "(B, H, N, D)"
# Captured at import: code that reassigns F.scaled_dot_product_attention to ``attention`` cannot recurse.
_SDPA = F.scaled_dot_product_attention
Opt = torch.Tensor | None
Tangents = tuple[Opt, Opt, Opt]


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
              tk: torch.Tensor | None, tv: torch.Tensor | None) -> None:
    """Raise a clear error naming the argument unless the shapes, dtypes and devices fit together."""
    check_float("q", q, FLOAT_DTYPES)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rank(name, t, 4, _LAYOUT)
    check_like("k", k, "q", q, shape=False)
    batch, heads, n_q, dim = q.shape
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != dim:
        raise ValueError(f"k has shape {tuple(k.shape)}: its B, H and D must match q's {tuple(q.shape)}")
    check_like("v", v, "k", k)
    if n_q == 0 or k.shape[2] == 0 or dim == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have Nq, Nk, D >= 1")
    for name, t, primal_name, primal in (("tq", tq, "q", q), ("tk", tk, "k", k), ("tv", tv, "v", v)):
        if t is not None:
            check_like(name, t, primal_name, primal)


def _select(backend: str, q: torch.Tensor) -> str:
    """The backend for this call; the Triton kernel also checks the head dim (else reference under "auto")."""
    name = _BACKENDS.select(backend, q.device, q.dtype)
    if name == "triton":
        from ttfm_kernels.ops.attention.triton import unsupported

        reason = unsupported(q.device, q.dtype, q.shape[-1])
        if reason is not None:
            if backend != "auto":
                raise BackendUnavailableError(f"ttfm_kernels.jvp_attention: backend 'triton' unavailable: {reason}")
            warn_once("jvp_attention", f"backend 'triton' skipped: {reason}")
            name = "reference"
    return name


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when the kernels can read it through its strides (unit last stride), else a copy."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _contiguous_like(t: torch.Tensor, dtype: torch.dtype | None = None,
                     shape: tuple[int, ...] | None = None) -> torch.Tensor:
    return _alloc.empty(t.shape if shape is None else shape, dtype=t.dtype if dtype is None else dtype,
                        device=t.device)


def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: Opt, tk: Opt, tv: Opt, causal: bool,
              scale: float, *options: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = tuple(q.shape[:3])
    return (_contiguous_like(q), _contiguous_like(q), _contiguous_like(q, torch.float32, rows),
            _contiguous_like(q, torch.float32, rows))


def _fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: Opt, tk: Opt, tv: Opt, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton forward kernel op's implementation."""
    from ttfm_kernels.ops.attention.triton import jvp_attention_fwd_triton

    o, t_o, lse, mu = _fwd_fake(q, k, v, tq, tk, tv, causal, scale)
    jvp_attention_fwd_triton(q, k, v, tq, tk, tv, o, t_o, lse, mu, causal=causal, scale=scale)
    return o, t_o, lse, mu


def _bwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: Opt, tk: Opt, tv: Opt,
              *rest: Any) -> list[torch.Tensor]:
    return [_contiguous_like(t) for t in (q, k, v, tq, tk, tv) if t is not None]


def _bwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: Opt, tk: Opt, tv: Opt, o: torch.Tensor,
                t_o: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor, g_o: Opt, g_t_o: Opt, g_lse: Opt,
                causal: bool, scale: float) -> list[torch.Tensor]:
    """The Triton backward kernel op's implementation: [dq, dk, dv] and the gradient of each given tangent."""
    from ttfm_kernels.ops.attention.triton import jvp_attention_bwd_triton

    found = iter(_bwd_fake(q, k, v, tq, tk, tv))
    outs = [next(found) if t is not None else None for t in (q, k, v, tq, tk, tv)]
    jvp_attention_bwd_triton((q, k, v, tq, tk, tv), o, t_o, lse, mu, (g_o, g_t_o, g_lse), outs, causal=causal,
                             scale=scale)
    return [t for t in outs if t is not None]


def _backward_unsupported(name: str, q: torch.Tensor) -> str | None:
    """Why fused backend ``name`` has no fused backward for this call (None when it has one)."""
    if name != "triton":
        return None
    from ttfm_kernels.ops.attention.triton import backward_unsupported

    return backward_unsupported(q.device, q.dtype, q.shape[-1])


def _fwd_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, tq, tk, tv, causal, scale = inputs[:8]
    o, t_o, lse, mu = output
    ctx.save_for_backward(q, k, v, tq, tk, tv, o, t_o, lse, mu)
    ctx.mark_non_differentiable(mu)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None and its products are skipped
    ctx.causal, ctx.scale, ctx.options = causal, scale, len(inputs) - 6


def _fwd_backward(ctx: Any, g_o: Opt, g_t_o: Opt, g_lse: Opt, _g_mu: None, *, name: str) -> tuple:
    """Gradients of (o, t_o, lse) for (q, k, v, tq, tk, tv): the fused backward kernel op of backend ``name``,
    or the explicit formula for double backward and a Triton head dim without a backward configuration."""
    grads: list[torch.Tensor | None] = [None] * (6 + ctx.options)
    saved = ctx.saved_tensors
    wanted = [i for i, t in enumerate(saved[:6]) if t is not None and ctx.needs_input_grad[i]]
    if not wanted or (g_o is None and g_t_o is None and g_lse is None):
        return tuple(grads)
    create_graph = torch.is_grad_enabled()  # double backward: keep the saved inputs' own graph
    reason = None if create_graph else _backward_unsupported(name, saved[0])
    if reason is not None:
        warn_once("jvp_attention_bwd", f"fused backward of backend {name!r} skipped: {reason}")
    if not create_graph and reason is None:
        g_o, g_t_o = _unit_last(g_o), _unit_last(g_t_o)
        g_lse = None if g_lse is None else g_lse.float().contiguous()
        extra = _CPU_TILES if name == "cpu" else ()
        found = iter(_BWD_OPS[name](*saved, g_o, g_t_o, g_lse, ctx.causal, ctx.scale, *extra))
        present = [next(found) if t is not None else None for t in saved[:6]]
        for i in wanted:
            grads[i] = present[i]
        return tuple(grads)
    with torch.enable_grad(), no_autocast(saved[0].device):
        leaves = [t if t is None or create_graph else t.detach().requires_grad_(i in wanted)
                  for i, t in enumerate(saved[:6])]
        outs = jvp_attention_reference(*leaves, causal=ctx.causal, scale=ctx.scale)
    # t_o without any tangent is a constant zero (no graph): it contributes nothing.
    pairs = [(out, g) for out, g in zip(outs, (g_o, g_t_o, g_lse), strict=True)
             if g is not None and out.requires_grad]
    if pairs:
        outs, gs = zip(*pairs, strict=True)
        found = torch.autograd.grad(outs, [leaves[i] for i in wanted], gs, allow_unused=True,
                                    create_graph=create_graph)
        for i, g in zip(wanted, found, strict=True):
            grads[i] = g
    return tuple(grads)


#: backend -> its forward kernel op, and backend -> its backward kernel op (None: the extension is not loaded).
_FWD_OPS = {name: _ext.kernel_op(op, fake=_fwd_fake, backward=functools.partial(_fwd_backward, name=name),
                                 setup_context=_fwd_setup_context, impl=impl)
            for name, op, impl in (("cpu", "jvp_attention_fwd", None),
                                   ("triton", "jvp_attention_fwd_triton", _fwd_triton))}
_BWD_OPS = {name: _ext.kernel_op(op, fake=_bwd_fake, impl=impl)
            for name, op, impl in (("cpu", "jvp_attention_bwd", None),
                                   ("triton", "jvp_attention_bwd_triton", _bwd_triton))}


def _fused_forward(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tangents: Tangents,
                   causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, t_o, lse) of backend ``name``: o, t_o like q (contiguous on the kernels), lse (B, H, Nq) float32; every
    output differentiable in every input (q, k, v and the tangents carry no forward-AD tangent here)."""
    if name == "reference":
        with no_autocast(q.device):
            o, t_o, lse = jvp_attention_reference(q, k, v, *tangents, causal=causal, scale=scale)
        return o, t_o, lse.float()
    extra = (*_CPU_TILES, _CPU_BF16_GEMM) if name == "cpu" else ()
    o, t_o, lse, _ = _FWD_OPS[name](*(_unit_last(t) for t in (q, k, v, *tangents)), causal, scale, *extra)
    return o, t_o, lse


def _scale(scale: float | None, dim: int) -> float:
    return 1.0 / math.sqrt(dim) if scale is None else float(scale)


def jvp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None = None,
                  tk: torch.Tensor | None = None, tv: torch.Tensor | None = None, *, causal: bool = False,
                  scale: float | None = None, return_lse: bool = False,
                  backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """Attention and its forward-mode tangent in one fused pass (docs/math.md section 5).

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); tq, tk, tv: tangents shaped like q, k, v, or None (zero, and their
    products are skipped). float64/32/16 and bfloat16; accumulation in float32 (float64 on the reference).
    Precision: the compute and output dtype is q's, or under ``torch.autocast`` the autocast dtype (like
    torch's SDPA: every input but a float64 one is cast to it at the boundary); lse is float32.
    ``scale`` defaults to 1/sqrt(D); ``causal`` masks key j > query i (top-left, like SDPA's is_causal).
    Returns (o, t_o), or (o, t_o, lse) with lse = logsumexp of the scaled scores, (B, H, Nq) float32.
    Every output is differentiable in every input (on "cpu" by the fused O(N)-memory backward).
    Eager equivalent: ``torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
    scale=scale), (q, k, v), (tq, tk, tv))`` with zeros for absent tangents.
    """
    q, k, v, tq, tk, tv = autocast_inputs(q, k, v, tq, tk, tv)
    _validate(q, k, v, tq, tk, tv)
    # Nested forward AD through the explicit API: the plain formula carries it (a kernel op would zero it).
    name = "reference" if carries_tangent(q, k, v, tq, tk, tv) else _select(backend, q)
    o, t_o, lse = _fused_forward(name, q, k, v, (tq, tk, tv), bool(causal), _scale(scale, q.shape[-1]))
    return (o, t_o, lse) if return_lse else (o, t_o)


def _as_4d(t: torch.Tensor | None) -> torch.Tensor | None:
    """(..., N, D) -> (B', H, N, D): 4-D stays as is, fewer dims get leading ones, more are flattened into B'."""
    if t is None or t.dim() == 4:
        return t
    return t.reshape((-1, *t.shape[-3:]) if t.dim() > 4 else (1,) * (4 - t.dim()) + tuple(t.shape))


def _unfusable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               dropout_p: float) -> str | None:
    """Why the fused JVP cannot run this SDPA call (None: it can); k, v already repeated for GQA."""
    if attn_mask is not None:
        return "an explicit attn_mask"
    if dropout_p > 0.0:
        return "dropout_p > 0"
    if q.dim() < 2 or q.dim() != k.dim() or k.shape != v.shape or k.shape[:-2] != q.shape[:-2] \
            or k.shape[-1] != q.shape[-1]:
        return "q, k, v shapes that broadcast or a value dim unlike the query's"
    return None


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` (same signature, plus ``backend``), forward-mode-AD aware.

    query: (..., Nq, D), key: (..., Nk, D), value: (..., Nk, Dv), one floating dtype; returns (..., Nq, Dv).
    Without a tangent (plain forward, training) it IS torch's SDPA with its own backward. When query, key or
    value carries a forward-AD tangent (``torch.func.jvp`` or ``torch.autograd.forward_ad``), the output and its
    tangent come from one fused pass (``jvp_attention``), both differentiable (reverse-over-forward works);
    ``enable_gqa`` repeats the key/value heads first, as SDPA does. An explicit ``attn_mask``, ``dropout_p > 0``
    or shapes the fused op does not take (broadcast batch dims, Dv != D) run torch's math SDPA instead (exact
    tangents, not fused), with one warning per reason. Under ``torch.autocast`` the fused pass computes in the
    autocast dtype, like torch's SDPA (see ``jvp_attention``). Eager equivalent: ``F.scaled_dot_product_attention``.
    """
    (qp, tq), (kp, tk), (vp, tv) = (fwAD.unpack_dual(t) for t in (query, key, value))
    if tq is None and tk is None and tv is None:
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and qp.dim() >= 3 and kp.dim() >= 3 and kp.shape[-3] != qp.shape[-3] \
            and qp.shape[-3] % kp.shape[-3] == 0:
        repeats = qp.shape[-3] // kp.shape[-3]
        kp, tk, vp, tv = (None if t is None else t.repeat_interleave(repeats, dim=-3) for t in (kp, tk, vp, tv))
    reason = _unfusable(qp, kp, vp, attn_mask, dropout_p)
    if reason is not None:
        warn_once("attention", f"{reason}: this JVP runs torch's math SDPA (exact, not fused)")
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    qp, kp, vp, tq, tk, tv = autocast_inputs(qp, kp, vp, tq, tk, tv)  # the dtype autocast gives SDPA
    q4, k4, v4, tq4, tk4, tv4 = (_as_4d(t) for t in (qp, kp, vp, tq, tk, tv))
    _validate(q4, k4, v4, tq4, tk4, tv4)
    name = _select(backend, q4)
    o, t_o, _ = _fused_forward(name, q4, k4, v4, (tq4, tk4, tv4), bool(is_causal), _scale(scale, qp.shape[-1]))
    return fwAD.make_dual(o.view(qp.shape), t_o.view(qp.shape))


def patch_sdpa() -> contextlib.AbstractContextManager:
    """Deprecated: ``ttfm_kernels.fused_jvp(ops=("sdpa",))``, which it returns (with a DeprecationWarning).

    The old process-wide reassignment of ``F.scaled_dot_product_attention`` is gone: the mode reroutes SDPA
    calls on the thread that entered it, including modules that imported the function by name.
    """
    from ttfm_kernels.fused_jvp import fused_jvp

    warnings.warn("ttfm_kernels.patch_sdpa() is deprecated: use ttfm_kernels.fused_jvp(ops=('sdpa',)), or "
                  "fused_jvp() to route linear, conv and norm tangents too", DeprecationWarning, stacklevel=2)
    return fused_jvp(ops=("sdpa",))
