"""Public entry points of the attention ops: validation, backend dispatch, autograd and forward-mode AD.

``jvp_attention`` (explicit tangents in, tangents out) and ``attention`` (a forward-AD-aware drop-in for
``F.scaled_dot_product_attention``) share one autograd function: its forward runs ONE fused pass that writes
o, t_o and lse; its backward recomputes with the explicit formula (``reference.py``), so gradients through the
tangent are exact (LFMD needs them). Backends: "reference", "cpu" (``csrc/cpu/vec/attention.cpp``, private op
``ttfm::jvp_attention_fwd``) and "triton" (``triton.py``; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from ttfm_kernels import _alloc
from ttfm_kernels._checks import check_float, check_like, check_rank
from ttfm_kernels._dispatch import BackendUnavailableError, OpBackends, always, ext_kernel, triton_kernel, warn_once
from ttfm_kernels._precision import autocast_inputs, no_autocast
from ttfm_kernels.ops.attention.reference import jvp_attention_reference

__all__ = ["attention", "jvp_attention", "patch_sdpa"]

_FLOAT = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = OpBackends("jvp_attention", {
    "reference": always,
    "cpu": ext_kernel("jvp_attention_fwd", "CPU", (torch.float32, torch.bfloat16)),
    "triton": triton_kernel(),
}, gpu_order=("triton",))
#: (block_q, block_k) tiles of the CPU kernel, 0 = its default. Tests shrink them so that small shapes run
#: several query and key blocks (the online rescaling); the results do not depend on them otherwise.
_CPU_TILES = (0, 0)
_LAYOUT = "(B, H, N, D)"
_ORIGINAL_SDPA = F.scaled_dot_product_attention  # captured at import, so patch_sdpa() cannot recurse into itself
Tangents = tuple["torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
              tk: torch.Tensor | None, tv: torch.Tensor | None) -> None:
    """Raise a clear error naming the argument unless the shapes, dtypes and devices fit together."""
    check_float("q", q, _FLOAT)
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


def _fused_forward(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tangents: Tangents,
                   causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of backend ``name``: (o, t_o, lse) with o, t_o like q and lse (B, H, Nq) float32."""
    if name == "reference":
        with no_autocast(q.device):
            o, t_o, lse = jvp_attention_reference(q, k, v, *tangents, causal=causal, scale=scale)
        return o, t_o, lse.float()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    tq, tk, tv = (None if t is None else t.contiguous() for t in tangents)
    o, t_o = _alloc.empty_like(q), _alloc.empty_like(q)
    lse = _alloc.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if name == "cpu":
        torch.ops.ttfm.jvp_attention_fwd(q, k, v, tq, tk, tv, causal, scale, o, t_o, lse, *_CPU_TILES)
    else:
        from ttfm_kernels.ops.attention.triton import jvp_attention_fwd_triton

        jvp_attention_fwd_triton(q, k, v, tq, tk, tv, o, t_o, lse, causal=causal, scale=scale)
    return o, t_o, lse


class _JvpAttentionFn(torch.autograd.Function):
    """(q, k, v, tq, tk, tv) -> (o, t_o, lse) in one fused pass; backward recomputes the explicit formula."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                tk: torch.Tensor | None, tv: torch.Tensor | None, causal: bool, scale: float,
                name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fused_forward(name, q, k, v, (tq, tk, tv), causal, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, tq, tk, tv, causal, scale, _ = inputs
        ctx.save_for_backward(q, k, v, tq, tk, tv)
        ctx.causal, ctx.scale = causal, scale

    @staticmethod
    def backward(ctx: Any, g_o: torch.Tensor | None, g_t_o: torch.Tensor | None,
                 g_lse: torch.Tensor | None) -> tuple:
        grads: list[torch.Tensor | None] = [None] * 9
        wanted = [i for i, t in enumerate(ctx.saved_tensors) if t is not None and ctx.needs_input_grad[i]]
        create_graph = torch.is_grad_enabled()  # double backward: keep the saved inputs' own graph
        with torch.enable_grad(), no_autocast(ctx.saved_tensors[0].device):
            leaves = [t if t is None or create_graph else t.detach().requires_grad_(i in wanted)
                      for i, t in enumerate(ctx.saved_tensors)]
            outs = jvp_attention_reference(*leaves, causal=ctx.causal, scale=ctx.scale)
        pairs = [(out, g) for out, g in zip(outs, (g_o, g_t_o, g_lse), strict=True) if g is not None]
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
    """Attention and its forward-mode tangent in one fused pass (MATH.md section 5).

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); tq, tk, tv: tangents shaped like q, k, v, or None (zero, and their
    products are skipped). float64/32/16 and bfloat16; accumulation in float32 (float64 on the reference).
    Precision: the compute and output dtype is q's, or under ``torch.autocast`` the autocast dtype (like
    torch's SDPA: every input but a float64 one is cast to it at the boundary); lse is float32.
    ``scale`` defaults to 1/sqrt(D); ``causal`` masks key j > query i (top-left, like SDPA's is_causal).
    Returns (o, t_o), or (o, t_o, lse) with lse = logsumexp of the scaled scores, (B, H, Nq) float32.
    Every output is differentiable in every input (backward recomputes the explicit formula).
    Eager equivalent: ``torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
    scale=scale), (q, k, v), (tq, tk, tv))`` with zeros for absent tangents.
    """
    q, k, v, tq, tk, tv = autocast_inputs(q, k, v, tq, tk, tv)
    _validate(q, k, v, tq, tk, tv)
    name = _select(backend, q)
    o, t_o, lse = _JvpAttentionFn.apply(q, k, v, tq, tk, tv, bool(causal), _scale(scale, q.shape[-1]), name)
    return (o, t_o, lse) if return_lse else (o, t_o)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
              causal: bool = False, is_causal: bool | None = None, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` (no dropout) that is forward-mode-AD aware.

    q: (B, H, Nq, D), k, v: (B, H, Nk, D), one floating dtype; returns (B, H, Nq, D). ``is_causal`` is an alias
    of ``causal``. Without a tangent (plain forward, training) it IS torch's SDPA with its own backward. When q,
    k or v carries a forward-AD tangent (``torch.func.jvp`` or ``torch.autograd.forward_ad``), o and its tangent
    come from one fused pass (``jvp_attention``), both differentiable (reverse-over-forward works). With
    ``attn_mask`` the call runs torch's math SDPA: correct tangents, not fused. Under ``torch.autocast`` the
    fused pass computes in the autocast dtype, like torch's SDPA (see ``jvp_attention``).
    """
    causal = bool(causal if is_causal is None else is_causal)
    (qp, tq), (kp, tk), (vp, tv) = (fwAD.unpack_dual(t) for t in (q, k, v))
    if tq is None and tk is None and tv is None:
        return _ORIGINAL_SDPA(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)
    if attn_mask is not None:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return _ORIGINAL_SDPA(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)
    qp, kp, vp, tq, tk, tv = autocast_inputs(qp, kp, vp, tq, tk, tv)  # the dtype autocast gives SDPA
    _validate(qp, kp, vp, tq, tk, tv)
    name = _select(backend, qp)
    o, t_o, _ = _JvpAttentionFn.apply(qp, kp, vp, tq, tk, tv, causal, _scale(scale, qp.shape[-1]), name)
    return fwAD.make_dual(o, t_o)


def _sdpa_with_fused_jvp(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                         scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with SDPA's signature, routed to ``attention`` when a tangent is present.

    Calls ``attention`` can fuse (4-D, same B and H, no mask, no dropout) take the fused JVP; other calls with a
    tangent run torch's math SDPA (which has a forward-AD rule); calls without a tangent run torch's SDPA.
    """
    has_tangent = any(fwAD.unpack_dual(t).tangent is not None for t in (query, key, value))
    fusable = (query.dim() == 4 and key.dim() == 4 and query.shape[:2] == key.shape[:2] and attn_mask is None
               and dropout_p == 0.0)
    if has_tangent and fusable:
        return attention(query, key, value, causal=is_causal, scale=scale)
    context = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if has_tangent
               else contextlib.nullcontext())
    with context:
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def patch_sdpa() -> Iterator[None]:
    """Context manager: route ``F.scaled_dot_product_attention`` through ``attention`` inside it.

    Models that call ``F.scaled_dot_product_attention`` (timm / DiT blocks) then get the fused JVP under
    ``torch.func.jvp`` or ``forward_ad``; calls without a tangent still run torch's SDPA. The patch replaces the
    attribute of ``torch.nn.functional`` for the whole process while the context is open (a module that imported
    the function by name before is not rerouted). Nesting is allowed; the previous function is restored on exit.
    """
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_with_fused_jvp
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
