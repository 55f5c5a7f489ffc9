"""Modulated norm modules (adaLN / FiLM): norm, then (1 + scale) and shift per sample and channel, then SiLU.

Both run on ``ttfm_kernels.ops.norm``: under ``torch.func.jvp`` or ``torch.autograd.forward_ad`` the tangents of
x, scale and shift go through ONE fused kernel call; ``forward_jvp`` is the explicit-tangent form.
"""

from __future__ import annotations

import torch
from torch import nn

from ttfm_kernels.ops.norm import jvp_norm_modulate_silu, norm_modulate_silu

__all__ = ["ModulatedGroupNorm", "ModulatedLayerNorm"]

Opt = torch.Tensor | None


class _ModulatedNorm(nn.Module):
    """Shared parameters and forward of the two layouts (``num_groups`` None: LayerNorm)."""

    num_groups: int | None

    def __init__(self, channels: int, eps: float, affine: bool, bias: bool, activation: str | None,
                 device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        if activation not in ("silu", None):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        self.eps = eps
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.ones(channels, **factory)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(channels, **factory)) if affine and bias else None)

    def _options(self) -> dict:
        return {"num_groups": self.num_groups, "weight": self.weight, "bias": self.bias, "eps": self.eps,
                "activation": self.activation}

    def forward(self, x: torch.Tensor, scale: Opt = None, shift: Opt = None) -> torch.Tensor:
        """act((norm(x) * weight + bias) * (1 + scale) + shift); scale, shift: (B, C) or None."""
        return norm_modulate_silu(x, scale, shift, **self._options())

    def forward_jvp(self, x: torch.Tensor, scale: Opt = None, shift: Opt = None, *, tx: Opt = None,
                    tscale: Opt = None, tshift: Opt = None) -> tuple[torch.Tensor, Opt]:
        """(y, ty) with explicit tangents (any may be None; ty is None when all are)."""
        return jvp_norm_modulate_silu(x, tx, scale, shift, tscale, tshift, **self._options())


class ModulatedLayerNorm(_ModulatedNorm):
    """LayerNorm over the last dim of x (B, N, C), then adaLN modulation and optional SiLU.

    Eager equivalent: ``silu(nn.LayerNorm(C)(x) * (1 + scale[:, None]) + shift[:, None])``. Parameters
    ``weight``, ``bias`` (C,) as nn.LayerNorm's (``elementwise_affine=False`` drops both, ``bias=False`` the bias).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 activation: str | None = "silu", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, activation, device, dtype)
        self.normalized_shape = (normalized_shape,)
        self.num_groups = None

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, activation={self.activation!r}"


class ModulatedGroupNorm(_ModulatedNorm):
    """GroupNorm of x (B, C, H, W), then FiLM modulation and optional SiLU.

    Eager equivalent: ``silu(nn.GroupNorm(G, C)(x) * (1 + scale[..., None, None]) + shift[..., None, None])``.
    Parameters ``weight``, ``bias`` (C,) as nn.GroupNorm's (``affine=False`` drops them).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = "silu", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        super().__init__(num_channels, eps, affine, True, activation, device, dtype)
        self.num_groups = num_groups
        self.num_channels = num_channels

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, activation={self.activation!r}"
