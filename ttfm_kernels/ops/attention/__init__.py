"""Attention ops: ``jvp_attention`` (fused JVP), ``attention`` (forward-AD-aware SDPA drop-in), ``patch_sdpa``."""

from ttfm_kernels.ops.attention.function import attention, jvp_attention, patch_sdpa

__all__ = ["attention", "jvp_attention", "patch_sdpa"]
