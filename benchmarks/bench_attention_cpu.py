"""jvp_attention on the C++ CPU kernel (csrc/cpu/vec/attention.cpp) across shapes and dtypes, each timed side
by side with torch.func.jvp over math SDPA (the eager way, the baseline) and the plain SDPA forward (the
floor is about 3x the forward's time: 6 matmul-shaped products instead of 2).

The gated case is (2, 4, 1024, 64) fp32: its speedup over eager is asserted above a floor set below the
recorded runs (docs/performance.md), its goal recorded, and its peak extra memory at most a quarter of eager's;
the other shapes, causal and bf16 are recorded (``fused_over_forward`` = fused / forward).
The backward case times forward + backward through both outputs at (1, 4, 4096, 64) fp32, the fused CPU
backward against the reference backend (which materialises (Nq, Nk) tensors), with peak memory of each in a
fresh process, and the backward with only grad_o against the forward. The layout case runs nn.Attention's
permuted q/k/v and diffusers' transposed ones and counts the copies (profiler events: none). The bf16 case
times both GEMM paths of the bf16 forward against the bf16 SDPA forward (target: at most 4x it where the CPU
has avx512_bf16).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_attention import _check, _eager, _inputs
from benchmarks.harness import peak_rss_mb
from ttfm_kernels import _ext, jvp_attention
from ttfm_kernels.ops.attention import function
from ttfm_kernels.testing import assert_close_to_ref

pytestmark = pytest.mark.skipif(not _ext.has_kernel("jvp_attention_fwd", "CPU"),
                                reason="ttfm_kernels._C_vec (the AVX2 CPU kernels) is not loaded")

GATED = ((2, 4, 1024, 64), "float32", False)
#: The gated case's asserted floor (below every recorded run, with margin) and its goal (recorded, not asserted).
FLOOR_SPEEDUP, GOAL_SPEEDUP = 3.5, 5.0
# (B, H, N, D), dtype, causal, rounds: eager at N = 4096 materializes 512 MB per (N, N) matrix and takes seconds.
CASES = [
    (*GATED, 10),
    ((2, 4, 256, 64), "float32", False, 20),
    ((8, 6, 64, 64), "float32", False, 20),
    ((1, 8, 4096, 64), "float32", False, 3),
    ((2, 4, 1024, 64), "float32", True, 10),
    ((2, 4, 1024, 64), "bfloat16", False, 10),
]


def make_fn(method: str, shape: list[int], dtype: str) -> object:
    """A zero-arg call of one method on fresh inputs, warmed up (the ``peak_rss_mb`` entry point)."""
    args = _inputs(tuple(shape), getattr(torch, dtype))
    if method == "eager":
        return lambda: _eager(*args)
    jvp_attention(*(t[:1, :1, :16] for t in args), backend="cpu")  # loads the extension, touches the scratch
    return lambda: jvp_attention(*args, backend="cpu")


@pytest.mark.parametrize(("shape", "dtype", "causal", "rounds"), CASES,
                         ids=[f"B{s[0]}H{s[1]}N{s[2]}D{s[3]}-{d}{'-causal' if c else ''}" for s, d, c, _ in CASES])
def test_jvp_attention_cpu_kernel(compare, shape: tuple[int, ...], dtype: str, causal: bool, rounds: int) -> None:
    args = _inputs(shape, getattr(torch, dtype))
    b, h, n, d = shape
    res = compare(case=f"jvp_attention cpu-kernel B{b} H{h} N{n} D{d} {dtype}{' causal' if causal else ''}",
                  fns={"eager": lambda: _eager(*args, causal=causal),
                       "fused": lambda: jvp_attention(*args, causal=causal, backend="cpu"),
                       "sdpa_forward": lambda: F.scaled_dot_product_attention(*args[:3], is_causal=causal)},
                  baseline="eager", check=lambda: _check(args, causal), rounds=rounds)
    res.record("fused_over_forward", res.median("fused") / res.median("sdpa_forward"))
    if (shape, dtype, causal) != GATED:
        return
    for method in ("eager", "fused"):
        res.record(f"peak_rss_mb.{method}", peak_rss_mb("benchmarks.bench_attention_cpu:make_fn", method=method,
                                                        shape=list(shape), dtype=dtype))
    res.check_speedup("fused", floor=FLOOR_SPEEDUP, goal=GOAL_SPEEDUP)
    assert res.extra["peak_rss_mb.fused"] <= res.extra["peak_rss_mb.eager"] / 4


BWD_SHAPE = (1, 4, 4096, 64)


def _fwd_bwd(args: tuple[torch.Tensor, ...], backend: str, grad_t_o: bool = True) -> tuple[torch.Tensor, ...]:
    """Forward + backward of ``jvp_attention`` through o (and t_o): the gradients of all six inputs."""
    leaves = [t.detach().requires_grad_() for t in args]
    o, t_o = jvp_attention(*leaves, backend=backend)
    outs, cots = ((o, t_o), (args[0], args[3])) if grad_t_o else ((o,), (args[0],))
    return torch.autograd.grad(outs, leaves, cots, allow_unused=True)


def make_fwd_bwd(backend: str, shape: list[int]) -> object:
    """A zero-arg forward + backward on fresh inputs, warmed up (the ``peak_rss_mb`` entry point)."""
    args = _inputs(tuple(shape), torch.float32)
    _fwd_bwd(tuple(t[:1, :1, :16] for t in args), backend)  # loads the extension, touches small scratch
    return lambda: _fwd_bwd(args, backend)


def _check_bwd(args: tuple[torch.Tensor, ...]) -> None:
    small = tuple(t[:, :1, :512] for t in args)
    for got, ref in zip(_fwd_bwd(small, "cpu"), _fwd_bwd(tuple(t.double() for t in small), "reference"), strict=True):
        assert_close_to_ref(got, ref, dtype=torch.float32, name="grad")


def test_jvp_attention_cpu_backward(compare) -> None:
    args = _inputs(BWD_SHAPE, torch.float32)
    b, h, n, d = BWD_SHAPE
    res = compare(case=f"jvp_attention cpu-kernel fwd+bwd B{b} H{h} N{n} D{d} float32",
                  fns={"reference": lambda: _fwd_bwd(args, "reference"), "fused": lambda: _fwd_bwd(args, "cpu"),
                       "fused_grad_o_only": lambda: _fwd_bwd(args, "cpu", grad_t_o=False),
                       "fused_forward": lambda: jvp_attention(*args, backend="cpu")},
                  baseline="reference", check=lambda: _check_bwd(args), rounds=3)
    forward = res.median("fused_forward")
    res.record("backward_over_forward", (res.median("fused") - forward) / forward)
    res.record("backward_over_forward.grad_o_only", (res.median("fused_grad_o_only") - forward) / forward)
    for method in ("reference", "cpu"):
        res.record(f"peak_rss_mb.{method}", peak_rss_mb("benchmarks.bench_attention_cpu:make_fwd_bwd",
                                                         backend=method, shape=list(BWD_SHAPE)))
    res.record("peak_ratio", res.extra["peak_rss_mb.cpu"] / res.extra["peak_rss_mb.reference"])
    assert res.extra["peak_ratio"] < 0.10
    assert res.speedup("fused") >= 1.0


def _layouts(b: int, n: int, h: int, d: int) -> dict[str, list[torch.Tensor]]:
    """q, k, v, tq, tk, tv as nn.Attention makes them (a permuted packed qkv) and as diffusers does (transposes)."""
    packed = torch.randn(2, b, n, 3, h, d).unbind(0)
    return {"nn.Attention": [t for x in packed for t in x.permute(2, 0, 3, 1, 4).unbind(0)],
            "diffusers": [torch.randn(b, n, h, d).transpose(1, 2) for _ in range(6)]}


def _copies(fn: object) -> int:
    """How many copy ops (clone / copy_ / contiguous) one call of ``fn`` runs (torch profiler events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::clone", "aten::copy_", "aten::contiguous"))


@pytest.mark.parametrize("layout", ["nn.Attention", "diffusers"])
def test_jvp_attention_cpu_strided_layouts(compare, layout: str) -> None:
    args = _layouts(2, 1024, 4, 64)[layout]
    res = compare(case=f"jvp_attention cpu-kernel {layout} layout B2 H4 N1024 D64 float32",
                  fns={"copy_then_call": lambda: jvp_attention(*(t.contiguous() for t in args), backend="cpu"),
                       "strided": lambda: jvp_attention(*args, backend="cpu")},
                  baseline="copy_then_call", check=lambda: _check(tuple(args)), rounds=10)
    res.record("copies.strided_fwd_bwd", _copies(lambda: _fwd_bwd(tuple(args), "cpu")))
    res.record("copies.copy_then_call", _copies(lambda: jvp_attention(*(t.contiguous() for t in args),
                                                                      backend="cpu")))
    assert res.extra["copies.strided_fwd_bwd"] == 0


def _with_bf16_gemm(mode: int, fn: object) -> object:
    """``fn`` run with the CPU kernel's bf16 GEMM mode forced (1: bf16 GEMMs, 0: fp32 GEMMs on converted tiles)."""
    def run() -> object:
        saved, function._CPU_BF16_GEMM = function._CPU_BF16_GEMM, mode
        try:
            return fn()
        finally:
            function._CPU_BF16_GEMM = saved

    return run


def test_jvp_attention_cpu_bf16_gemm(compare) -> None:
    shape = (2, 4, 1024, 64)
    args = _inputs(shape, torch.bfloat16)
    call = lambda: jvp_attention(*args, backend="cpu")  # noqa: E731
    res = compare(case="jvp_attention cpu-kernel bf16 GEMM paths B2 H4 N1024 D64 bfloat16",
                  fns={"bf16_gemm": _with_bf16_gemm(1, call), "fp32_gemm": _with_bf16_gemm(0, call),
                       "sdpa_forward": lambda: F.scaled_dot_product_attention(*args[:3])},
                  baseline="fp32_gemm", check=_with_bf16_gemm(1, lambda: _check(args)), rounds=10)
    forward = res.median("sdpa_forward")
    res.record("bf16_gemm_over_forward", res.median("bf16_gemm") / forward)
    res.record("fp32_gemm_over_forward", res.median("fp32_gemm") / forward)
    if "avx512_bf16" in Path("/proc/cpuinfo").read_text():
        assert res.extra["bf16_gemm_over_forward"] <= 4.0
