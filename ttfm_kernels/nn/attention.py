"""Multi-head self-attention with the DiT / timm layout, on the fused attention ops."""

from __future__ import annotations

import torch
from torch import nn

from ttfm_kernels.ops.attention import attention

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head self-attention of DiT / timm: ``qkv`` Linear, optional per-head QK LayerNorm, ``proj`` Linear.

    x: (B, N, dim) -> (B, N, dim). State dict keys as in timm's ``Attention`` (``qkv.weight``, ``qkv.bias``,
    ``q_norm.weight``, ``q_norm.bias``, ``k_norm.*``, ``proj.weight``, ``proj.bias``), so DiT checkpoints load.
    The attention itself is ``ttfm_kernels.attention``: torch's SDPA for plain forwards, and ONE fused pass for
    the output and its tangent under ``torch.func.jvp`` / ``forward_ad`` (jvp_t, jvp_sx, the ITVM EMA pass).
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
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = attention(self.q_norm(q), self.k_norm(k), v, backend=self.backend)
        return self.proj(y.transpose(1, 2).reshape(batch, n, dim))
