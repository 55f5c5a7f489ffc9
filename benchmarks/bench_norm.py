"""Fused norm + modulation + SiLU JVP (C++ CPU kernel) and the Conv2d tangent layer against torch.func.jvp.

The eager baseline is what a model built from torch modules pays under ``torch.func.jvp``: nn.GroupNorm /
nn.LayerNorm, the (1 + scale) / shift modulation and SiLU, each with its own forward-AD rule. Tangents on x,
scale and shift (the jvp_t case: the time embedding drives scale and shift). No graph is kept (the ITVM EMA
JVP runs under no_grad).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import peak_dram_bytes_per_s
from ttfm_kernels import jvp_norm_modulate_silu
from ttfm_kernels import nn as tnn
from ttfm_kernels.testing import assert_close_to_ref

# (label, num_groups, shape): the U-Net block (GroupNorm + FiLM) and the DiT block (LayerNorm + adaLN), CPU fp32.
CASES = [
    ("GN32 FiLM SiLU B8 C128 32x32", 32, (8, 128, 32, 32)),
    ("LN adaLN SiLU B8 N256 C384", None, (8, 256, 384)),
]
#: Asserted floor of the fused JVP's speedup over eager (below every recorded run, with margin:
#: docs/performance.md) and its goal (recorded, not asserted).
FLOOR_SPEEDUP, GOAL_SPEEDUP = 4.0, 6.0


def _inputs(num_groups: int | None, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
            device: str = "cpu"):
    channels = shape[-1] if num_groups is None else shape[1]
    x, tx = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    scale, shift, tscale, tshift = (0.5 * torch.randn(shape[0], channels, device=device, dtype=dtype)
                                    for _ in range(4))
    norm = nn.GroupNorm(num_groups, channels) if num_groups is not None else nn.LayerNorm(channels)
    norm = norm.to(device, dtype)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(channels, device=device, dtype=dtype))
        norm.bias.add_(0.1 * torch.randn(channels, device=device, dtype=dtype))
    return norm, (x, scale, shift), (tx, tscale, tshift)


def _eager_block(norm: nn.Module, num_groups: int | None):
    view = (lambda p: p[:, None]) if num_groups is None else (lambda p: p[:, :, None, None])
    return lambda x, scale, shift: F.silu(norm(x) * (1 + view(scale)) + view(shift))


def _norm_case(compare, label: str, num_groups: int | None, shape: tuple[int, ...], dtype: str, device: str,
               backend: str, rounds: int):
    """Time the fused op (``backend``) against torch.func.jvp over the eager block, after checking parity."""
    norm, primals, tangents = _inputs(num_groups, shape, getattr(torch, dtype), device)
    block = _eager_block(norm, num_groups)
    (x, scale, shift), (tx, tscale, tshift) = primals, tangents

    @torch.no_grad()
    def eager():
        return torch.func.jvp(block, primals, tangents)

    @torch.no_grad()
    def fused():
        return jvp_norm_modulate_silu(x, tx, scale, shift, tscale, tshift, num_groups=num_groups,
                                      weight=norm.weight, bias=norm.bias, backend=backend)

    def check() -> None:
        (y_ref, ty_ref), (y, ty) = eager(), fused()
        tol = 1.0 if dtype == "float32" else 2.0  # two low-precision evaluation orders
        assert_close_to_ref(y, y_ref, name="y", scale=tol)
        assert_close_to_ref(ty, ty_ref, name="ty", scale=tol)

    res = compare(case=f"jvp_norm_modulate_silu {device} {label} {'fp32' if dtype == 'float32' else dtype}",
                  fns={"eager": eager, "fused": fused}, baseline="eager", check=check, rounds=rounds)
    return res, x


@pytest.mark.parametrize(("label", "num_groups", "shape"), CASES, ids=[c[0] for c in CASES])
def test_jvp_norm_modulate_silu_cpu(compare, label: str, num_groups: int | None, shape: tuple[int, ...]) -> None:
    res, _ = _norm_case(compare, label, num_groups, shape, "float32", "cpu", "cpu", rounds=20)
    res.check_speedup("fused", floor=FLOOR_SPEEDUP, goal=GOAL_SPEEDUP)


#: GPU cases: DiT-XL/2 at 256 px (256 tokens of 1152 features) and a U-Net block at 32x32 (GroupNorm 32 of 256).
GPU_CASES = [
    ("LN adaLN SiLU B8 N256 C1152 (DiT-XL)", None, (8, 256, 1152)),
    ("GN32 FiLM SiLU B8 C256 32x32 (U-Net)", 32, (8, 256, 32, 32)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("label", "num_groups", "shape"), GPU_CASES, ids=["dit-xl", "unet"])
def test_jvp_norm_modulate_silu_gpu(compare, label: str, num_groups: int | None, shape: tuple[int, ...],
                                    dtype: str) -> None:
    """The Triton kernel against torch.func.jvp over the eager block on CUDA; bytes/s over x, tx, y, ty."""
    res, x = _norm_case(compare, label, num_groups, shape, dtype, "cuda", "triton", rounds=50)
    achieved = 4 * x.numel() * x.element_size() / res.median("fused")  # reads x, tx; writes y, ty
    res.record("achieved_GBps", achieved / 1e9)
    peak = peak_dram_bytes_per_s()
    if peak is not None:
        res.record("fraction_of_dram_bandwidth", achieved / peak)
    assert res.speedup("fused") >= 2.0


def test_conv2d_tangent_cpu(compare) -> None:
    """Conv2d(128, 128, 3) JVP: the bias-free convolution of tx beside the primal's, against torch's forward-AD
    rule (report the ratio)."""
    ref = nn.Conv2d(128, 128, 3, padding=1)
    conv = tnn.Conv2d(128, 128, 3, padding=1)
    conv.load_state_dict(ref.state_dict())
    x, tx = torch.randn(8, 128, 32, 32), torch.randn(8, 128, 32, 32)

    @torch.no_grad()
    def eager():
        return torch.func.jvp(ref, (x,), (tx,))

    @torch.no_grad()
    def fused():
        return torch.func.jvp(conv, (x,), (tx,))

    def check() -> None:
        (y_ref, ty_ref), (y, ty) = eager(), fused()
        assert_close_to_ref(y, y_ref, name="y")
        assert_close_to_ref(ty, ty_ref, name="ty")

    compare(case="conv2d_jvp cpu C128 k3 B8 32x32 fp32", fns={"eager": eager, "fused": fused},
            baseline="eager", check=check, rounds=10)
