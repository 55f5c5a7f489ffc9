"""flow_map_step: the C++ CPU kernel against the eager formula x + (t - s) u (one fused pass, no temporary)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchmarks.harness import peak_rss_mb
from ttfm_kernels import flow_map_step
from ttfm_kernels.ops.residual.reference import flow_map_step_reference
from ttfm_kernels.testing import assert_close_to_ref

SHAPE = (8, 4, 256, 256)  # (B, C, H, W): 2M elements, 8 MB in fp32


def _inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x, u = torch.randn(2, *shape).to(dtype)
    s, t = torch.rand(2, shape[0])
    return x, u, s, t


def _eager(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x + (t - s).to(x.dtype).view(-1, *[1] * (x.dim() - 1)) * u


def make_fn(method: str, shape: list[int], dtype: str) -> Callable[[], torch.Tensor]:
    """A zero-arg call of one method on fresh inputs (the ``peak_rss_mb`` entry point)."""
    x, u, s, t = _inputs(tuple(shape), getattr(torch, dtype))
    if method == "eager":
        return lambda: _eager(x, u, s, t)
    flow_map_step(x[:1], u[:1], s[:1], t[:1], backend="cpu")  # load the extension outside the measurement
    return lambda: flow_map_step(x, u, s, t, backend="cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flow_map_step_cpu(compare, dtype: str) -> None:
    x, u, s, t = _inputs(SHAPE, getattr(torch, dtype))

    def check() -> None:
        ref = flow_map_step_reference(x.double(), u.double(), s.double(), t.double())
        assert_close_to_ref(flow_map_step(x, u, s, t, backend="cpu"), ref, dtype=x.dtype)

    res = compare(case=f"flow_map_step cpu B8 C4 256x256 {dtype}",
                  fns={"eager": lambda: _eager(x, u, s, t), "cpu": lambda: flow_map_step(x, u, s, t, backend="cpu")},
                  baseline="eager", check=check, rounds=30)
    for method in ("eager", "cpu"):
        res.record(f"peak_rss_mb.{method}", peak_rss_mb("benchmarks.bench_flow_map_step:make_fn", method=method,
                                                        shape=list(SHAPE), dtype=dtype))
    # The fused kernel writes only its output; eager also materialises (t - s) u.
    assert res.extra["peak_rss_mb.cpu"] < res.extra["peak_rss_mb.eager"]
