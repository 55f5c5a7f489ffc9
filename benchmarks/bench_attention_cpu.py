"""jvp_attention on the C++ CPU kernel (csrc/cpu/vec/attention.cpp) across shapes and dtypes, each timed side
by side with torch.func.jvp over math SDPA (the eager way, the baseline) and the plain SDPA forward (the
floor is about 3x the forward's time: 6 matmul-shaped products instead of 2).

The gated case is (2, 4, 1024, 64) fp32: its speedup over eager is asserted above a floor set below the
recorded runs (docs/performance.md), its goal recorded, and its peak extra memory at most a quarter of eager's;
the other shapes, causal and bf16 are recorded (``fused_over_forward`` = fused / forward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_attention import _check, _eager, _inputs
from benchmarks.harness import peak_rss_mb
from ttfm_kernels import _ext, jvp_attention

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
