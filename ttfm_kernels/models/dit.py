"""DiT teacher v(x, t) and two-time DiT student u(x, s, t), built on the fused layers of ``ttfm_kernels.nn``.

A standard Diffusion Transformer: patchify (a strided ``Conv2d``) plus a fixed 2-D sin-cos position embedding,
``depth`` adaLN-Zero blocks, an adaLN final layer and unpatchify. Every block is

    shift1, scale1, gate1, shift2, scale2, gate2 = adaLN_modulation(c)          # SiLU -> Linear(C, 6C)
    x = x + gate1 * attn(LayerNorm(x) * (1 + scale1) + shift1)                  # ModulatedLayerNorm + Attention
    x = x + gate2 * mlp(LayerNorm(x) * (1 + scale2) + shift2)                   # Linear -> GELU(tanh) -> Linear

The layer norms with their modulation are ``ModulatedLayerNorm`` (one fused kernel for y and its tangent),
attention is ``ttfm_kernels.nn.Attention`` (the fused attention JVP), the linear layers are ``ttfm_kernels.nn``'s
(primal and tangent in one matmul): under ``torch.func.jvp`` / ``forward_ad`` (``jvp_t``, ``jvp_sx``, the losses)
the whole tangent pass runs on the fused ops. As in DiT, the adaLN projections and the output layer start at
zero, so a fresh teacher outputs 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ttfm_kernels.models._image import ImageFlowModel, StudentModel, TeacherModel
from ttfm_kernels.nn import Attention, Conv2d, Linear, ModulatedLayerNorm

__all__ = ["DiT", "TwoTimeDiT"]


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid * grid, dim) fixed position embedding: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D position embedding, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:
        args = p.reshape(-1, 1) * freqs
        return torch.cat([args.sin(), args.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def _adaln(hidden: int, chunks: int) -> nn.Sequential:
    """SiLU -> Linear(hidden, chunks * hidden), zero-initialised (adaLN-Zero)."""
    proj = Linear(hidden, chunks * hidden)
    nn.init.zeros_(proj.weight)
    nn.init.zeros_(proj.bias)
    return nn.Sequential(nn.SiLU(), proj)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _DiTBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden, eps=1e-6, elementwise_affine=False, activation=None)
        self.attn = Attention(hidden, num_heads, qkv_bias=True)
        self.norm2 = ModulatedLayerNorm(hidden, eps=1e-6, elementwise_affine=False, activation=None)
        self.mlp = _Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = _adaln(hidden, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(self.norm1(x, scale1, shift1))
        return x + gate2[:, None] * self.mlp(self.norm2(x, scale2, shift2))


class _FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = ModulatedLayerNorm(hidden, eps=1e-6, elementwise_affine=False, activation=None)
        self.linear = Linear(hidden, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = _adaln(hidden, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x, scale, shift))


class _DiTBody(nn.Module):
    """(x (B, C, H, W), c (B, hidden)) -> (B, C, H, W)."""

    def __init__(self, image_size: int, in_channels: int, patch_size: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
        self.patch_size, self.channels = patch_size, in_channels
        self.grid = image_size // patch_size
        self.x_embedder = Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", _sincos_2d(hidden_size, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(_DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = _FinalLayer(hidden_size, patch_size * patch_size * in_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x).flatten(2).transpose(1, 2)
        h = h + self.pos_embed.to(h.dtype)  # the fixed table never promotes a bf16 (autocast) residual stream
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)  # (B, grid * grid, p * p * C)
        batch, p, g = x.shape[0], self.patch_size, self.grid
        h = h.reshape(batch, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(batch, self.channels, g * p, g * p)


class _DiTBase(ImageFlowModel):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"image_size": 8, "in_channels": 3, "patch_size": 2, "hidden_size": 64, "depth": 2,
                 "num_heads": 4, "freq_dim": 64},
        "small": {"image_size": 32, "in_channels": 3, "patch_size": 2, "hidden_size": 192, "depth": 6,
                  "num_heads": 3, "freq_dim": 128},
        "base": {"image_size": 32, "in_channels": 3, "patch_size": 2, "hidden_size": 384, "depth": 12,
                 "num_heads": 6, "freq_dim": 256},
    }

    def __init__(self, image_size: int, in_channels: int, patch_size: int = 2, hidden_size: int = 192,
                 depth: int = 6, num_heads: int = 3, mlp_ratio: float = 4.0, num_classes: int = 0, *,
                 freq_dim: int = 128, time_scale: float = 1000.0, sigma: float = 1.0) -> None:
        super().__init__()
        config = {"image_size": image_size, "in_channels": in_channels, "patch_size": patch_size,
                  "hidden_size": hidden_size, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
                  "num_classes": num_classes, "freq_dim": freq_dim, "time_scale": time_scale, "sigma": sigma}
        body = _DiTBody(image_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio)
        self._setup(config, body, hidden_size)


class DiT(TeacherModel, _DiTBase):
    """DiT flow-matching teacher v(x, t, y=None) -> (B, C, H, W).

    x: (B, in_channels, image_size, image_size); t: (B,) float times in [0, 1]; y: optional (B,) class labels
    when ``num_classes > 0`` (``num_classes`` is the null class; None means null). ``sigma``: the noise scale
    of x0 ~ N(0, sigma^2 I) (docs/math.md section 1). ``time_scale`` multiplies t in the sinusoidal embedding.
    Presets (``from_preset``): "tiny" (8x8, hidden 64, depth 2), "small" (32x32, hidden 192, depth 6),
    "base" (32x32, hidden 384, depth 12).
    """


class TwoTimeDiT(StudentModel, _DiTBase):
    """Two-time DiT student u(x, s, t, y=None) (X_{s,t}(x) = x + (t - s) u), same arguments as ``DiT``.

    The conditioning embeds s and t - s; ``TwoTimeDiT.from_teacher(dit)`` starts from u(x, s, t) == v(x, s).
    """

    teacher_class = DiT

