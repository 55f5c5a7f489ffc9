"""Reference (pure PyTorch) formulas of the modulated norm op: docs/math.md section 6. The oracle.

Layouts: ``num_groups=None`` is LayerNorm over the last dim of x (B, N, C); an int is GroupNorm of
x (B, C, H, W) (statistics over each group's C / num_groups channels and all spatial positions).
Per-channel parameters (weight, bias) are (C,); per-sample-and-channel ones (scale, shift and their
tangents) are (B, C). Everything here is plain differentiable torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["norm_modulate_eager", "norm_modulate_jvp_reference", "per_channel", "per_sample_channel"]


def per_channel(p: torch.Tensor, x: torch.Tensor, num_groups: int | None) -> torch.Tensor:
    """View a (C,) tensor so it broadcasts against x: (1, 1, C) for LayerNorm, (1, C, 1, 1) for GroupNorm."""
    return p.view(1, 1, -1) if num_groups is None else p.view(1, -1, 1, 1)


def per_sample_channel(p: torch.Tensor, x: torch.Tensor, num_groups: int | None) -> torch.Tensor:
    """View a (B, C) tensor so it broadcasts against x: (B, 1, C) for LayerNorm, (B, C, 1, 1) for GroupNorm."""
    return p.unsqueeze(1) if num_groups is None else p.view(*p.shape, 1, 1)


def _modulate(p: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
              num_groups: int | None) -> torch.Tensor:
    if scale is not None:
        p = p * (1 + per_sample_channel(scale, p, num_groups))
    if shift is not None:
        p = p + per_sample_channel(shift, p, num_groups)
    return p


def norm_modulate_eager(x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, *,
                        num_groups: int | None = None, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, eps: float = 1e-5,
                        activation: str | None = "silu") -> torch.Tensor:
    """y = act((norm(x) * weight + bias) * (1 + scale) + shift) with torch's own norm kernels.

    The no-tangent path of the op when a graph is needed (torch's kernels and backward). weight, bias, scale and
    shift may have another floating dtype than x (an fp32 modulation of bf16 activations: the modulation runs in
    the promoted dtype); the result is in x's dtype.
    """
    if num_groups is None:
        p = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    else:
        p = F.group_norm(x, num_groups, weight, bias, eps)
    y = _modulate(p, scale, shift, num_groups)
    return (F.silu(y) if activation == "silu" else y).to(x.dtype)


def norm_modulate_jvp_reference(x: torch.Tensor, tx: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                                shift: torch.Tensor | None = None, tscale: torch.Tensor | None = None,
                                tshift: torch.Tensor | None = None, *, num_groups: int | None = None,
                                weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                eps: float = 1e-5, activation: str | None = "silu",
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, ty) from the explicit formulas of docs/math.md section 6, accumulated in at least float32.

    x, tx: (B, N, C) or (B, C, H, W); scale, shift, tscale, tshift: (B, C); weight, bias: (C,); any may be
    None (a missing tangent is zero, a missing scale/shift is zero, a missing weight/bias is 1/0).
    ty is None when every tangent is None. Outputs in x's dtype; differentiable in every input.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    grouped = xa if num_groups is None else xa.reshape(x.shape[0], num_groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    centered = grouped - mean
    rstd = torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)
    xh_g = centered * rstd
    xh = xh_g.view_as(xa)

    def chan(p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else per_channel(p.to(acc), xa, num_groups)

    def samp(p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.to(acc)

    w, b = chan(weight), chan(bias)
    p = xh if w is None else xh * w
    if b is not None:
        p = p + b
    y = _modulate(p, samp(scale), samp(shift), num_groups)

    ty = None
    if tx is not None:
        txa = tx.to(acc)
        tg = txa if num_groups is None else txa.reshape(grouped.shape)
        dxh_g = (tg - tg.mean(dim=-1, keepdim=True) - xh_g * (xh_g * tg).mean(dim=-1, keepdim=True)) * rstd
        dp = dxh_g.view_as(xa) if w is None else dxh_g.view_as(xa) * w
        ty = _modulate(dp, samp(scale), None, num_groups)
    if tscale is not None:
        t = p * per_sample_channel(tscale.to(acc), xa, num_groups)
        ty = t if ty is None else ty + t
    if tshift is not None:
        t = per_sample_channel(tshift.to(acc), xa, num_groups).expand_as(xa)
        ty = t if ty is None else ty + t

    if activation == "silu":
        sig = torch.sigmoid(y)
        if ty is not None:
            ty = ty * sig * (1 + y * (1 - sig))
        y = y * sig
    return y.to(x.dtype), None if ty is None else ty.to(x.dtype)
