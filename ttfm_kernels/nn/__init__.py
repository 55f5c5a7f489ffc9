"""Modules built on the fused ops: drop-in layers whose forward-mode tangents take the fused paths."""

from ttfm_kernels.nn.attention import Attention
from ttfm_kernels.nn.linear import Conv2d, Linear
from ttfm_kernels.nn.norm import ModulatedGroupNorm, ModulatedLayerNorm

__all__ = ["Attention", "Conv2d", "Linear", "ModulatedGroupNorm", "ModulatedLayerNorm"]
