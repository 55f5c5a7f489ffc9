"""The distillation losses (docs/math.md sections 2-3), each a thin composition of flow/, jvp and the residual ops.

Every loss returns ``(loss, stats)`` and takes the common arguments: ``cond`` (keyword arguments for every model
call), ``x0`` / ``s`` / ``t`` overrides (default: x0 ~ N(0, sigma^2 I), times from ``time_sampler``), ``sigma``
(default: the teacher's ``sigma`` attribute, else 1.0), per-sample ``weight`` (B,) and ``reduction``
("mean" | "sum" | "none").
"""

from ttfm_kernels.losses.emd import emd_loss
from ttfm_kernels.losses.flow_matching import flow_matching_loss
from ttfm_kernels.losses.itvm import itvm_loss
from ttfm_kernels.losses.lfmd import lfmd_loss
from ttfm_kernels.losses.progressive import progressive_loss

__all__ = ["emd_loss", "flow_matching_loss", "itvm_loss", "lfmd_loss", "progressive_loss"]
