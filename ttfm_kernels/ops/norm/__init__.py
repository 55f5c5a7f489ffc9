"""Modulated norm op: LayerNorm / GroupNorm + (1 + scale), shift modulation + SiLU, and its fused JVP."""

from ttfm_kernels.ops.norm.function import jvp_norm_modulate_silu, norm_modulate_silu

__all__ = ["jvp_norm_modulate_silu", "norm_modulate_silu"]
