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

from ttfm_kernels.models import _tangent
from ttfm_kernels.models._image import ImageFlowModel, StudentModel, TeacherModel
from ttfm_kernels.models._tangent import Opt
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


def _modulation(adaln: nn.Sequential, c: torch.Tensor, tc: Opt, chunks: int) -> list[tuple[torch.Tensor, Opt]]:
    """The ``chunks`` (B, hidden) modulation vectors of ``_adaln`` and their tangents."""
    a, ta = _tangent.silu(c, tc)
    m, tm = _tangent.call(adaln[1], a, tx=ta)
    ms = m.chunk(chunks, dim=1)
    tms = (None,) * chunks if tm is None else tm.chunk(chunks, dim=1)
    return list(zip(ms, tms, strict=True))


def _rows(pair: tuple[torch.Tensor, Opt]) -> tuple[torch.Tensor, Opt]:
    """A (B, C) modulation vector and its tangent as (B, 1, C), to broadcast over the tokens."""
    return _tangent.map_pair(lambda v: v[:, None], *pair)


class _Mlp(_tangent.TangentModule):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim)

    def _jvp(self, x: torch.Tensor, tx: Opt = None) -> tuple[torch.Tensor, Opt]:
        h, th = _tangent.gelu_tanh(*_tangent.call(self.fc1, x, tx=tx))
        return _tangent.call(self.fc2, h, tx=th)


class _DiTBlock(_tangent.TangentModule):
    """(x (B, N, hidden), c (B, hidden)) -> (B, N, hidden); ``forward_jvp`` adds the tangents tx, tc."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden, eps=1e-6, elementwise_affine=False, activation=None)
        self.attn = Attention(hidden, num_heads, qkv_bias=True)
        self.norm2 = ModulatedLayerNorm(hidden, eps=1e-6, elementwise_affine=False, activation=None)
        self.mlp = _Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = _adaln(hidden, 6)

    def _jvp(self, x: torch.Tensor, c: torch.Tensor, tx: Opt = None,
             tc: Opt = None) -> tuple[torch.Tensor, Opt]:
        shift1, scale1, gate1, shift2, scale2, gate2 = _modulation(self.adaLN_modulation, c, tc, 6)
        for norm, layer, shift, scale, gate in ((self.norm1, self.attn, shift1, scale1, gate1),
                                                (self.norm2, self.mlp, shift2, scale2, gate2)):
            h, th = _tangent.call(norm, x, scale[0], shift[0], tx=tx, tscale=scale[1], tshift=shift[1])
            h, th = _tangent.call(layer, h, tx=th)
            x, tx = _tangent.add_mul(x, tx, *_rows(gate), h, th)
        return x, tx


class _FinalLayer(_tangent.TangentModule):
    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = ModulatedLayerNorm(hidden, eps=1e-6, elementwise_affine=False, activation=None)
        self.linear = Linear(hidden, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = _adaln(hidden, 2)

    def _jvp(self, x: torch.Tensor, c: torch.Tensor, tx: Opt = None,
             tc: Opt = None) -> tuple[torch.Tensor, Opt]:
        shift, scale = _modulation(self.adaLN_modulation, c, tc, 2)
        h, th = _tangent.call(self.norm_final, x, scale[0], shift[0], tx=tx, tscale=scale[1], tshift=shift[1])
        return _tangent.call(self.linear, h, tx=th)


class _DiTBody(_tangent.TangentModule):
    """(x (B, C, H, W), c (B, hidden)) -> (B, C, H, W); ``forward_jvp`` adds the tangents tx, tc."""

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

    def _unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, grid * grid, p * p * C) -> (B, C, H, W)."""
        batch, p, g = h.shape[0], self.patch_size, self.grid
        h = h.reshape(batch, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(batch, self.channels, g * p, g * p)

    def _jvp(self, x: torch.Tensor, c: torch.Tensor, tx: Opt = None,
             tc: Opt = None) -> tuple[torch.Tensor, Opt]:
        h, th = _tangent.map_pair(lambda e: e.flatten(2).transpose(1, 2),
                                  *_tangent.call(self.x_embedder, x, tx=tx))
        h = h + self.pos_embed.to(h.dtype)  # the fixed table never promotes a bf16 (autocast) residual stream
        for block in self.blocks:
            h, th = _tangent.call(block, h, c, tx=th, tc=tc)
        return _tangent.map_pair(self._unpatchify, *_tangent.call(self.final_layer, h, c, tx=th, tc=tc))


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
                 freq_dim: int = 128, time_scale: float = 1000.0, sigma: float = 1.0,
                 gap_scale: float | None = None) -> None:
        super().__init__()
        config = {"image_size": image_size, "in_channels": in_channels, "patch_size": patch_size,
                  "hidden_size": hidden_size, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
                  "num_classes": num_classes, "freq_dim": freq_dim, "time_scale": time_scale, "sigma": sigma}
        body = _DiTBody(image_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio)
        self._setup(config, body, hidden_size, gap_scale)


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

    The conditioning embeds s (scaled by ``time_scale``) and t - s (scaled by ``gap_scale``, default 1.0, kept in
    ``config``: with the teacher's 1000 the ITVM "jvp" and EMD targets diverge, docs/math.md section 1);
    ``TwoTimeDiT.from_teacher(dit, gap_scale=1.0)`` starts from u(x, s, t) == v(x, s).
    """

    teacher_class = DiT

