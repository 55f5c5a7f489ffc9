"""itvm_residual_loss forward + backward: the fused kernels against the eager composite (docs/math.md section 2).

The eager composite (the reference formula in torch ops) builds the target, both residuals, their squares and
means, then backward walks the same chain again: about a dozen full passes over memory. The fused op on CPU reads
the five inputs once and writes both gradients in the same forward pass, which backward hands back (7 memory
accesses per element); on CUDA the forward reads the inputs and backward reads them again to write the gradients
(12 accesses, no device sync).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchmarks.harness import peak_dram_bytes_per_s, peak_rss_mb
from ttfm_kernels import itvm_residual_loss
from ttfm_kernels.ops.residual.reference import itvm_residual_loss_reference
from ttfm_kernels.testing import assert_close_to_ref

BATCH = 64
#: Accesses each element of the (B, D) inputs costs per forward + backward on CUDA: forward reads u_st, u_ss,
#: v_s, target_a, target_b; backward reads them again and writes grad_u_st and grad_u_ss.
CUDA_ACCESSES_PER_ELEMENT = 12


def _inputs(dim: int, dtype: torch.dtype, device: str = "cpu") -> tuple[list[torch.Tensor], torch.Tensor,
                                                                          torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(BATCH, dim, generator=gen).to(device, dtype) for _ in range(5)]
    tensors[0].requires_grad_()
    tensors[1].requires_grad_()
    coef = -torch.rand(BATCH, generator=gen).to(device)
    weight = (torch.rand(BATCH, generator=gen) + 0.5).to(device)
    return tensors, coef, weight


def _step(loss_fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], coef: torch.Tensor,
          weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    loss = loss_fn(*tensors, coef, weight=weight, lambda_init=1.0, lambda_term=1.0)
    return (loss.detach(), *torch.autograd.grad(loss, tensors[:2]))


def _methods(backend: str) -> dict[str, Callable[..., torch.Tensor]]:
    def fused(*args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return itvm_residual_loss(*args, backend=backend, **kwargs)

    return {"eager": itvm_residual_loss_reference, backend: fused}


def make_fn(method: str, dim: int, dtype: str) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A zero-arg forward + backward of one method on fresh inputs (the ``peak_rss_mb`` entry point)."""
    tensors, coef, weight = _inputs(dim, getattr(torch, dtype))
    loss_fn = _methods("cpu")[method]
    small = [t[:1].detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    _step(loss_fn, small, coef[:1], weight[:1])  # load the extension and warm autograd outside the measurement
    return lambda: _step(loss_fn, tensors, coef, weight)


def _check(tensors: list[torch.Tensor], coef: torch.Tensor, weight: torch.Tensor, backend: str) -> None:
    got = _step(_methods(backend)[backend], tensors, coef, weight)
    ref = _step(itvm_residual_loss_reference, [t.detach().double().requires_grad_(t.requires_grad) for t in tensors],
                coef.double(), weight.double())
    for name, a, r in zip(("loss", "grad u_st", "grad u_ss"), got, ref, strict=True):
        assert_close_to_ref(a, r.to(a.dtype), name=name)


#: Asserted floors of the speedup over the eager composite, below the worst recorded run of each size with margin
#: (the runs and why D = 4096 sits lower, a fixed per-call cost next to a small memory pass: docs/performance.md).
FLOOR_SPEEDUP = {4096: 1.8, 65536: 3.0}
#: What the op aims for at both sizes: printed and recorded, not asserted.
GOAL_SPEEDUP = 5.0


@pytest.mark.parametrize("dim", [4096, 65536])
def test_itvm_residual_loss_cpu(compare, dim: int) -> None:
    tensors, coef, weight = _inputs(dim, torch.float32)
    fns = {name: (lambda fn=fn: _step(fn, tensors, coef, weight)) for name, fn in _methods("cpu").items()}
    res = compare(case=f"itvm_residual_loss fwd+bwd cpu B{BATCH} D{dim} fp32", fns=fns, baseline="eager",
                  check=lambda: _check(tensors, coef, weight, "cpu"), rounds=10 if dim > 4096 else 100)
    for method in fns:
        res.record(f"peak_rss_mb.{method}", peak_rss_mb("benchmarks.bench_residual:make_fn", method=method,
                                                        dim=dim, dtype="float32"))
    res.check_speedup("cpu", floor=FLOOR_SPEEDUP[dim], goal=GOAL_SPEEDUP)
    assert res.extra["peak_rss_mb.cpu"] < res.extra["peak_rss_mb.eager"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_itvm_residual_loss_cuda(compare, dtype: str) -> None:
    dim = 65536
    tensors, coef, weight = _inputs(dim, getattr(torch, dtype), "cuda")
    fns = {name: (lambda fn=fn: _step(fn, tensors, coef, weight)) for name, fn in _methods("cuda").items()}
    res = compare(case=f"itvm_residual_loss fwd+bwd cuda B{BATCH} D{dim} {dtype}", fns=fns, baseline="eager",
                  check=lambda: _check(tensors, coef, weight, "cuda"), rounds=50)
    moved = CUDA_ACCESSES_PER_ELEMENT * tensors[0].element_size()
    res.record("bytes_per_element", moved)
    achieved = moved * tensors[0].numel() / res.median("cuda")
    res.record("achieved_GBps", achieved / 1e9)
    peak = peak_dram_bytes_per_s()
    if peak is not None:
        res.record("fraction_of_dram_bandwidth", achieved / peak)
    res.check_speedup("cuda", floor=1.0)
