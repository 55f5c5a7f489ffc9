"""ttfm_kernels: fast distillation of flow-matching models into two-time flow maps (ITVM, LFMD, EMD).

The public API, re-exported from the layers below (ops -> nn -> models -> losses -> training/CLI).
"""

from ttfm_kernels import _ext
from ttfm_kernels._dispatch import BackendUnavailableError, use_backend
from ttfm_kernels._version import __version__
from ttfm_kernels.ops.attention import attention, jvp_attention, patch_sdpa
from ttfm_kernels.ops.residual import flow_map_step, itvm_residual_loss

_ext.load()

__all__ = [
    "BackendUnavailableError",
    "__version__",
    "attention",
    "flow_map_step",
    "itvm_residual_loss",
    "jvp_attention",
    "patch_sdpa",
    "use_backend",
]
