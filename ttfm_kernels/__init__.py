"""ttfm_kernels: fast distillation of flow-matching models into two-time flow maps (ITVM, LFMD, EMD).

The public API, re-exported from the layers below (ops -> nn -> models -> losses -> training/CLI).
"""

from ttfm_kernels import _ext
from ttfm_kernels._dispatch import BackendUnavailableError, use_backend
from ttfm_kernels._version import __version__
from ttfm_kernels.flow import EMA, GuidedTeacher, TimeSampler, flow_map, ode_solve, sample
from ttfm_kernels.fused_jvp import fused_jvp
from ttfm_kernels.jvp import jvp_sx, jvp_t
from ttfm_kernels.losses import emd_loss, flow_matching_loss, itvm_loss, lfmd_loss, progressive_loss
from ttfm_kernels.ops.attention import attention, jvp_attention, patch_sdpa
from ttfm_kernels.ops.norm import jvp_norm_modulate_silu
from ttfm_kernels.ops.residual import flow_map_step, itvm_residual_loss

_ext.load()

__all__ = [
    "EMA",
    "BackendUnavailableError",
    "GuidedTeacher",
    "TimeSampler",
    "__version__",
    "attention",
    "emd_loss",
    "flow_map",
    "flow_map_step",
    "flow_matching_loss",
    "fused_jvp",
    "itvm_loss",
    "itvm_residual_loss",
    "jvp_attention",
    "jvp_norm_modulate_silu",
    "jvp_sx",
    "jvp_t",
    "lfmd_loss",
    "ode_solve",
    "patch_sdpa",
    "progressive_loss",
    "sample",
    "use_backend",
]
