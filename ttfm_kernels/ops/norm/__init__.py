"""Modulated norm op: LayerNorm / GroupNorm + (1 + scale), shift modulation + SiLU, and its fused JVP."""

from ttfm_kernels.ops.norm.function import group_norm_jvp, jvp_norm_modulate_silu, layer_norm_jvp, norm_modulate_silu

__all__ = ["group_norm_jvp", "jvp_norm_modulate_silu", "layer_norm_jvp", "norm_modulate_silu"]
