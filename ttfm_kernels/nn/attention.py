"""Multi-head self-attention with the DiT / timm layout, on the fused attention ops."""

from __future__ import annotations

import torch
from torch import nn

from ttfm_kernels.nn.linear import Linear
from ttfm_kernels.nn.norm import ModulatedLayerNorm
from ttfm_kernels.ops.attention import attention, jvp_attention

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head self-attention of DiT / timm: ``qkv`` Linear, optional per-head QK LayerNorm, ``proj`` Linear.

    x: (B, N, dim) -> (B, N, dim). State dict keys as in timm's ``Attention`` (``qkv.weight``, ``qkv.bias``,
    ``q_norm.weight``, ``q_norm.bias``, ``k_norm.*``, ``proj.weight``, ``proj.bias``), so DiT checkpoints load.
    The attention is ``ttfm_kernels.attention``: torch's SDPA for plain forwards, ONE fused pass for the output
    and its tangent under ``torch.func.jvp`` / ``forward_ad``; ``forward_jvp`` is the explicit-tangent route.
    Eager equivalent: timm ``Attention(dim, num_heads, qkv_bias, qk_norm)`` without dropout.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = ModulatedLayerNorm(self.head_dim, activation=None) if qk_norm else None
        self.k_norm = ModulatedLayerNorm(self.head_dim, activation=None) if qk_norm else None
        self.proj = Linear(dim, dim)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, N, 3 dim) -> q, k, v of shape (B, H, N, D)."""
        batch, n, _ = qkv.shape
        return qkv.reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _norm(self, norm: ModulatedLayerNorm | None, x: torch.Tensor,
              tx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head LayerNorm of (B, H, N, D) (and its tangent); identity without qk_norm."""
        if norm is None:
            return x, tx
        flat = (-1, *x.shape[2:])
        y, ty = norm.forward_jvp(x.reshape(flat), tx=None if tx is None else tx.reshape(flat))
        return y.view_as(x), None if ty is None else ty.view_as(x)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> (B, N, H D)."""
        batch, _, n, _ = y.shape
        return y.transpose(1, 2).reshape(batch, n, self.num_heads * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.qkv(x))
        q, k = self._norm(self.q_norm, q)[0], self._norm(self.k_norm, k)[0]
        return self.proj(self._merge(attention(q, k, v, backend=self.backend)))

    def forward_jvp(self, x: torch.Tensor, tx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, ty) with an explicit tangent tx of x (None: ty is None): one fused attention JVP, no dual tensors."""
        if tx is None:
            return self.forward(x), None
        qkv, tqkv = self.qkv.forward_jvp(x, tx)
        (q, k, v), (tq, tk, tv) = self._heads(qkv), self._heads(tqkv)
        q, tq = self._norm(self.q_norm, q, tq)
        k, tk = self._norm(self.k_norm, k, tk)
        o, t_o = jvp_attention(q, k, v, tq, tk, tv, backend=self.backend)
        return self.proj.forward_jvp(self._merge(o), self._merge(t_o))
