"""Public entry points of the attention ops: validation, backend dispatch, autograd and forward-mode AD.

``jvp_attention`` (explicit tangents in, tangents out) and ``attention`` (a forward-AD-aware drop-in for
``F.scaled_dot_product_attention``) share one autograd function: its forward runs ONE fused pass that writes
o, t_o and lse; its backward gives exact gradients through both outputs (LFMD needs them). On the "cpu"
backend the backward is the fused O(N)-memory kernel ``ttfm::jvp_attention_bwd`` (recomputation from lse and
mu, docs/math.md "Backward of the attention JVP"); it falls back to recomputing the explicit formula
(``reference.py``, which materialises (Nq, Nk)) for the other backends and for double backward
(``create_graph=True``: the fused backward is not itself differentiable). Backends: "reference", "cpu"
(``csrc/cpu/vec/attention.cpp``, private ops ``ttfm::jvp_attention_fwd`` / ``_bwd``; any strides with a unit
last stride) and "triton" (``triton.py``; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from ttfm_kernels import _alloc
from ttfm_kernels._checks import FLOAT_DTYPES, check_float, check_like, check_rank
from ttfm_kernels._dispatch import BackendUnavailableError, OpBackends, always, ext_kernel, triton_kernel, warn_once
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
Tangents = tuple["torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]


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
    """``t`` itself when the CPU kernels can read it through its strides (unit last stride), else a copy."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _fused_forward(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tangents: Tangents,
                   causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pass of backend ``name``: (o, t_o, lse, mu) with o, t_o like q (contiguous) and lse (B, H, Nq) float32;
    mu (B, H, Nq) float32, the per-row mean of the score tangent, is written by the "cpu" backend only (None
    otherwise), for its fused backward."""
    if name == "reference":
        with no_autocast(q.device):
            o, t_o, lse = jvp_attention_reference(q, k, v, *tangents, causal=causal, scale=scale)
        return o, t_o, lse.float(), None
    o, t_o = _alloc.empty_like(q), _alloc.empty_like(q)
    lse = _alloc.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if name == "cpu":
        mu = _alloc.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        q, k, v, tq, tk, tv = (_unit_last(t) for t in (q, k, v, *tangents))
        torch.ops.ttfm.jvp_attention_fwd(q, k, v, tq, tk, tv, causal, scale, o, t_o, lse, mu, *_CPU_TILES,
                                         _CPU_BF16_GEMM)
        return o, t_o, lse, mu
    from ttfm_kernels.ops.attention.triton import jvp_attention_fwd_triton

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    tq, tk, tv = (None if t is None else t.contiguous() for t in tangents)
    jvp_attention_fwd_triton(q, k, v, tq, tk, tv, o, t_o, lse, causal=causal, scale=scale)
    return o, t_o, lse, None


def _cpu_backward(saved: tuple, grads: Tangents, causal: bool, scale: float) -> list[torch.Tensor | None]:
    """Gradients (q, k, v, tq, tk, tv) from the fused CPU backward; None for an absent tangent.

    ``saved``: (q, k, v, tq, tk, tv, o, t_o, lse, mu) of the forward; ``grads``: (g_o, g_t_o, g_lse), any None.
    Eager equivalent: ``torch.autograd.grad`` through ``jvp_attention_reference``, without its (Nq, Nk) tensors.
    """
    q, k, v, tq, tk, tv, o, t_o, lse, mu = saved
    g_o, g_t_o, g_lse = grads
    outs = [None if t is None else _alloc.empty_like(t) for t in (q, k, v, tq, tk, tv)]
    g_lse = None if g_lse is None else g_lse.float().contiguous()
    torch.ops.ttfm.jvp_attention_bwd(*(_unit_last(t) for t in (q, k, v, tq, tk, tv)), o, t_o, lse, mu,
                                     _unit_last(g_o), _unit_last(g_t_o), g_lse, causal, scale, *outs, *_CPU_TILES)
    return outs


class _JvpAttentionFn(torch.autograd.Function):
    """(q, k, v, tq, tk, tv) -> (o, t_o, lse, mu) in one fused pass (mu: the "cpu" backend's backward statistic,
    not differentiable, None on the others); backward: the fused CPU kernel or the explicit formula."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                tk: torch.Tensor | None, tv: torch.Tensor | None, causal: bool, scale: float,
                name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return _fused_forward(name, q, k, v, (tq, tk, tv), causal, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, tq, tk, tv, causal, scale, _ = inputs
        o, t_o, lse, mu = output
        fused = mu is not None
        ctx.save_for_backward(q, k, v, tq, tk, tv, *((o, t_o, lse, mu) if fused else ()))
        if fused:
            ctx.mark_non_differentiable(mu)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None and its products are skipped
        ctx.causal, ctx.scale, ctx.fused = causal, scale, fused

    @staticmethod
    def backward(ctx: Any, g_o: torch.Tensor | None, g_t_o: torch.Tensor | None,
                 g_lse: torch.Tensor | None, _g_mu: None) -> tuple:
        grads: list[torch.Tensor | None] = [None] * 9
        saved = ctx.saved_tensors
        wanted = [i for i, t in enumerate(saved[:6]) if t is not None and ctx.needs_input_grad[i]]
        if not wanted or (g_o is None and g_t_o is None and g_lse is None):
            return tuple(grads)
        create_graph = torch.is_grad_enabled()  # double backward: keep the saved inputs' own graph
        if ctx.fused and not create_graph:
            found = _cpu_backward(saved, (g_o, g_t_o, g_lse), ctx.causal, ctx.scale)
            for i in wanted:
                grads[i] = found[i]
            return tuple(grads)
        with torch.enable_grad(), no_autocast(saved[0].device):
            leaves = [t if t is None or create_graph else t.detach().requires_grad_(i in wanted)
                      for i, t in enumerate(saved[:6])]
            outs = jvp_attention_reference(*leaves, causal=ctx.causal, scale=ctx.scale)
        # t_o without any tangent is a constant zero (no graph): it contributes nothing.
        pairs = [(out, g) for out, g in zip(outs, (g_o, g_t_o, g_lse), strict=True)
                 if g is not None and out.requires_grad]
        if wanted and pairs:
            outs, gs = zip(*pairs, strict=True)
            found = torch.autograd.grad(outs, [leaves[i] for i in wanted], gs, allow_unused=True,
                                        create_graph=create_graph)
            for i, g in zip(wanted, found, strict=True):
                grads[i] = g
        return tuple(grads)


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
    name = _select(backend, q)
    o, t_o, lse, _ = _JvpAttentionFn.apply(q, k, v, tq, tk, tv, bool(causal), _scale(scale, q.shape[-1]), name)
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
    o, t_o, _, _ = _JvpAttentionFn.apply(q4, k4, v4, tq4, tk4, tv4, bool(is_causal), _scale(scale, qp.shape[-1]),
                                         name)
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
