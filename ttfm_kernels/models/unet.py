"""UNet teacher v(x, t) and two-time UNet student u(x, s, t), built on the fused layers of ``ttfm_kernels.nn``.

A small ADM-style UNet: ``conv_in``; per resolution level ``num_res_blocks`` ResBlocks and a strided-conv
downsample; a middle ResBlock -> self-attention -> ResBlock at the lowest resolution (the one attention level);
the mirrored up path with skip connections and nearest-neighbour upsampling; GroupNorm + SiLU + ``conv_out``.
Every ResBlock is

    h = conv1(SiLU(GroupNorm(x)))                                   # ModulatedGroupNorm (no modulation)
    scale, shift = emb_proj(SiLU(c))                                # FiLM from the conditioning vector
    h = conv2(SiLU(GroupNorm(h) * (1 + scale) + shift))             # ModulatedGroupNorm (one fused kernel)
    out = skip(x) + h

Norm + FiLM + SiLU run on ``ModulatedGroupNorm``, convolutions and linear layers on ``ttfm_kernels.nn``'s
stacked-tangent layers, attention on ``ttfm_kernels.nn.Attention``: under ``torch.func.jvp`` / ``forward_ad`` the
tangent pass runs on the fused ops. No BatchNorm (it breaks forward-mode AD). ``conv2`` of every ResBlock and
``conv_out`` start at zero, so a fresh teacher outputs 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ttfm_kernels.models import _tangent
from ttfm_kernels.models._image import ImageFlowModel, StudentModel, TeacherModel
from ttfm_kernels.models._tangent import Opt
from ttfm_kernels.nn import Attention, Conv2d, Linear, ModulatedGroupNorm

__all__ = ["TwoTimeUNet", "UNet"]


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _ResBlock(_tangent.TangentModule):
    """(x (B, in_ch, H, W), SiLU(c) (B, cond_dim)) -> (B, out_ch, H, W); ``forward_jvp`` adds tangents tx, tc."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = ModulatedGroupNorm(groups, in_ch)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = Linear(cond_dim, 2 * out_ch)
        self.norm2 = ModulatedGroupNorm(groups, out_ch)
        self.conv2 = _zero(Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _jvp(self, x: torch.Tensor, c_act: torch.Tensor, tx: Opt = None,
             tc: Opt = None) -> tuple[torch.Tensor, Opt]:
        h, th = _tangent.call(self.norm1, x, tx=tx)
        h, th = _tangent.call(self.conv1, h, tx=th)
        film, tfilm = _tangent.call(self.emb_proj, c_act, tx=tc)
        scale, shift = film.chunk(2, dim=1)
        tscale, tshift = (None, None) if tfilm is None else tfilm.chunk(2, dim=1)
        h, th = _tangent.call(self.norm2, h, scale, shift, tx=th, tscale=tscale, tshift=tshift)
        h, th = _tangent.call(self.conv2, h, tx=th)
        return _tangent.add(*_tangent.call(self.skip, x, tx=tx), h, th)


class _AttnBlock(_tangent.TangentModule):
    """x + Attention(GroupNorm(x)) over the H * W positions; ``forward_jvp`` adds the tangent tx."""

    def __init__(self, channels: int, groups: int, num_heads: int) -> None:
        super().__init__()
        self.norm = ModulatedGroupNorm(groups, channels, activation=None)
        self.attn = Attention(channels, num_heads, qkv_bias=True)

    def _jvp(self, x: torch.Tensor, tx: Opt = None) -> tuple[torch.Tensor, Opt]:
        batch, channels, height, width = x.shape
        h, th = _tangent.map_pair(lambda e: e.flatten(2).transpose(1, 2), *_tangent.call(self.norm, x, tx=tx))
        h, th = _tangent.call(self.attn, h, tx=th)  # (B, H * W, C)
        h, th = _tangent.map_pair(lambda e: e.transpose(1, 2).reshape(batch, channels, height, width), h, th)
        return _tangent.add(x, tx, h, th)


class _Upsample(_tangent.TangentModule):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def _jvp(self, x: torch.Tensor, tx: Opt = None) -> tuple[torch.Tensor, Opt]:
        h, th = _tangent.map_pair(lambda e: F.interpolate(e, scale_factor=2, mode="nearest"), x, tx)
        return _tangent.call(self.conv, h, tx=th)


class _UNetBody(_tangent.TangentModule):
    """(x (B, C, H, W), c (B, cond_dim)) -> (B, C, H, W); ``forward_jvp`` adds the tangents tx, tc."""

    def __init__(self, image_size: int, in_channels: int, channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, num_heads: int, groups: int, cond_dim: int) -> None:
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size={image_size} must be divisible by 2 ** (len(channel_mult) - 1) = "
                             f"{2 ** max(levels - 1, 0)}")
        widths = [channels * m for m in channel_mult]
        self.conv_in = Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [channels], channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(_ResBlock(ch, width, cond_dim, groups))
                ch = width
                skips.append(ch)
            if level < levels - 1:
                self.down.append(Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([_ResBlock(ch, ch, cond_dim, groups), _AttnBlock(ch, groups, num_heads),
                                  _ResBlock(ch, ch, cond_dim, groups)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(_ResBlock(ch + skips.pop(), width, cond_dim, groups))
                ch = width
            if level > 0:
                self.up.append(_Upsample(ch))
        self.norm_out = ModulatedGroupNorm(groups, ch)
        self.conv_out = _zero(Conv2d(ch, in_channels, 3, padding=1))

    @staticmethod
    def _call(layer: nn.Module, h: torch.Tensor, th: Opt, c_act: torch.Tensor,
              tc: Opt) -> tuple[torch.Tensor, Opt]:
        if isinstance(layer, _ResBlock):
            return _tangent.call(layer, h, c_act, tx=th, tc=tc)
        return _tangent.call(layer, h, tx=th)

    def _jvp(self, x: torch.Tensor, c: torch.Tensor, tx: Opt = None,
             tc: Opt = None) -> tuple[torch.Tensor, Opt]:
        c_act, tc = _tangent.silu(c, tc)
        h, th = _tangent.call(self.conv_in, x, tx=tx)
        skips = [(h, th)]
        for layer in self.down:
            h, th = self._call(layer, h, th, c_act, tc)
            skips.append((h, th))
        for layer in self.mid:
            h, th = self._call(layer, h, th, c_act, tc)
        for layer in self.up:
            if isinstance(layer, _ResBlock):
                h, th = _tangent.cat([(h, th), skips.pop()], dim=1)
            h, th = self._call(layer, h, th, c_act, tc)
        h, th = _tangent.call(self.norm_out, h, tx=th)
        return _tangent.call(self.conv_out, h, tx=th)


class _UNetBase(ImageFlowModel):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"image_size": 8, "in_channels": 3, "channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
                 "num_heads": 2, "groups": 8, "freq_dim": 32},
        "small": {"image_size": 32, "in_channels": 3, "channels": 64, "channel_mult": (1, 2, 2),
                  "num_res_blocks": 2, "num_heads": 4, "groups": 32, "freq_dim": 64},
    }

    def __init__(self, image_size: int, in_channels: int, channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 2, num_heads: int = 4,
                 groups: int = 32, num_classes: int = 0, *, freq_dim: int = 64, time_scale: float = 1000.0,
                 sigma: float = 1.0, gap_scale: float | None = None) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult)
        config = {"image_size": image_size, "in_channels": in_channels, "channels": channels,
                  "channel_mult": channel_mult, "num_res_blocks": num_res_blocks, "num_heads": num_heads,
                  "groups": groups, "num_classes": num_classes, "freq_dim": freq_dim, "time_scale": time_scale,
                  "sigma": sigma}
        cond_dim = 4 * channels
        body = _UNetBody(image_size, in_channels, channels, channel_mult, num_res_blocks, num_heads, groups,
                         cond_dim)
        self._setup(config, body, cond_dim, gap_scale)


class UNet(TeacherModel, _UNetBase):
    """UNet flow-matching teacher v(x, t, y=None) -> (B, C, H, W).

    x: (B, in_channels, image_size, image_size) with image_size divisible by 2 ** (len(channel_mult) - 1);
    t: (B,) float times in [0, 1]; y: optional (B,) class labels when ``num_classes > 0`` (``num_classes`` is
    the null class; None means null). ``groups`` must divide every level's width. ``sigma``: the noise scale
    of x0 ~ N(0, sigma^2 I). Presets (``from_preset``): "tiny" (8x8, 16 channels, 2 levels), "small" (32x32,
    64 channels, 3 levels, 2 ResBlocks per level).
    """


class TwoTimeUNet(StudentModel, _UNetBase):
    """Two-time UNet student u(x, s, t, y=None) (X_{s,t}(x) = x + (t - s) u), same arguments as ``UNet``.

    The conditioning embeds s (scaled by ``time_scale``) and t - s (scaled by ``gap_scale``, default 1.0, kept in
    ``config``: with the teacher's 1000 the ITVM "jvp" and EMD targets diverge, docs/math.md section 1);
    ``TwoTimeUNet.from_teacher(unet, gap_scale=1.0)`` starts from u(x, s, t) == v(x, s).
    """

    teacher_class = UNet
