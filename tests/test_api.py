"""The public API is pinned: a change to it is deliberate and shows up here."""

import subprocess
import sys

import ttfm_kernels

PUBLIC = {
    "BackendUnavailableError",
    "EMA",
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
}


def test_all_is_pinned():
    assert set(ttfm_kernels.__all__) == PUBLIC
    for name in ttfm_kernels.__all__:
        assert hasattr(ttfm_kernels, name), name


def test_info_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "ttfm_kernels.info"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    for word in ("torch", "triton", "reference", "C++ CPU", "CUDA", "Triton interpreter"):
        assert word in out, out
    assert "Triton interpreter (CPU)                   available" in out  # conftest sets TRITON_INTERPRET=1
