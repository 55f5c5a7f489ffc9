"""Residual ops: ``flow_map_step`` and the fused ITVM residual loss ``itvm_residual_loss``."""

from ttfm_kernels.ops.residual.function import flow_map_step, itvm_residual_loss

__all__ = ["flow_map_step", "itvm_residual_loss"]
