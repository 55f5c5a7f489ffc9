"""Attention JVP: the fused one-pass JVP against torch.func.jvp over math SDPA (the eager way) and against the
plain SDPA forward (the floor is about 3x the forward's time: 6 matmul-shaped products instead of 2).

CPU: the user's route, ``torch.func.jvp`` over ``ttfm_kernels.attention`` (what ``patch_sdpa`` gives a model), on
the "auto" backend (the C++ kernel when built, else the reference); the C++ kernel's own cases are in
``bench_attention_cpu.py``. GPU cases are declared (Triton kernel, fp16/bf16, causal and not, TFLOP/s counting
3x the forward FLOPs) and skipped here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import peak_rss_mb
from ttfm_kernels import attention, jvp_attention
from ttfm_kernels.ops.attention.function import _BACKENDS
from ttfm_kernels.testing import assert_close_to_ref

CPU_SHAPE = (2, 4, 1024, 64)  # (B, H, N, D)
GPU_SHAPE = (2, 12, 2048, 64)  # (B, H, N, D); the GPU cases also run N = 1024 and 4096


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(6))


def _eager(q, k, v, tq, tk, tv, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), (q, k, v),
                              (tq, tk, tv))


def _fused(q, k, v, tq, tk, tv) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.func.jvp(attention, (q, k, v), (tq, tk, tv))


def make_fn(method: str, shape: list[int], dtype: str) -> Callable[[], object]:
    """A zero-arg call of one method on fresh inputs (the ``peak_rss_mb`` entry point)."""
    args = _inputs(tuple(shape), getattr(torch, dtype))
    if method == "eager":
        return lambda: _eager(*args)
    _fused(*(t[:1, :1, :16] for t in args))  # load the extension / warm up outside the measurement
    return lambda: _fused(*args)


def _check(args: tuple[torch.Tensor, ...], causal: bool = False) -> None:
    o, t_o = jvp_attention(*args, causal=causal)
    ref = _eager(*(t.double() for t in args), causal=causal)
    assert_close_to_ref(o, ref[0], dtype=o.dtype, name="o")
    assert_close_to_ref(t_o, ref[1], dtype=o.dtype, name="t_o", scale=4.0)


@pytest.mark.parametrize("dtype", ["float32"])
def test_attention_func_jvp_cpu(compare, dtype: str) -> None:
    args = _inputs(CPU_SHAPE, getattr(torch, dtype))
    backend = _BACKENDS.select("auto", torch.device("cpu"), args[0].dtype)
    res = compare(case=f"attention func.jvp cpu B2 H4 N1024 D64 {dtype}",
                  fns={"eager": lambda: _eager(*args), "fused": lambda: _fused(*args),
                       "sdpa_forward": lambda: F.scaled_dot_product_attention(*args[:3])},
                  baseline="eager", check=lambda: _check(args), rounds=10)
    res.record("backend", backend)
    res.record("fused_over_forward", res.median("fused") / res.median("sdpa_forward"))
    for method in ("eager", "fused"):
        res.record(f"peak_rss_mb.{method}", peak_rss_mb("benchmarks.bench_attention:make_fn", method=method,
                                                        shape=list(CPU_SHAPE), dtype=dtype))
    if backend == "cpu":  # no (N, N) matrix, one pass; the kernel's speed target is in bench_attention_cpu.py
        res.check_speedup("fused", floor=1.2)
        assert res.extra["peak_rss_mb.fused"] < res.extra["peak_rss_mb.eager"] / 4
    else:  # the reference materializes the same matrices as eager: parity only, recorded
        res.check_speedup("fused", floor=0.5)


#: (N, causal) of the GPU cases at (B, H, D) = (2, 12, 64): N in {1024, 2048, 4096}, causal at 2048.
GPU_CASES = [(1024, False), (2048, False), (2048, True), (4096, False)]


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "causal"), GPU_CASES, ids=[f"N{n}{'-causal' * c}" for n, c in GPU_CASES])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_jvp_attention_gpu(compare, dtype: str, n: int, causal: bool) -> None:
    batch, heads, _, d = GPU_SHAPE
    args = _inputs((batch, heads, n, d), getattr(torch, dtype), "cuda")
    res = compare(case=f"jvp_attention cuda B{batch} H{heads} N{n} D{d} {dtype}{' causal' if causal else ''}",
                  fns={"eager": lambda: _eager(*args, causal=causal),
                       "fused": lambda: jvp_attention(*args, causal=causal, backend="triton"),
                       "sdpa_forward": lambda: F.scaled_dot_product_attention(*args[:3], is_causal=causal)},
                  baseline="eager", check=lambda: _check(args, causal), rounds=20)
    forward_flops = 4 * batch * heads * n * n * d / (2 if causal else 1)
    res.record("tflops_fused_3x_forward", 3 * forward_flops / res.median("fused") / 1e12)
    res.record("tflops_sdpa_forward", forward_flops / res.median("sdpa_forward") / 1e12)
    res.record("fused_over_forward", res.median("fused") / res.median("sdpa_forward"))
    res.check_speedup("fused", floor=1.0, goal=2.0)  # no GPU run recorded yet: the floor only catches a slowdown
