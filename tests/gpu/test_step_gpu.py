"""One ITVM training step of the "tiny" TwoTimeDiT on CUDA (Triton attention and norm JVPs, CUDA residual loss,
all under "auto") against the same step on the CPU: the loss and every student gradient. 2 Triton
specialisations (fp32 attention at D = 16, LayerNorm rows of 64)."""

from __future__ import annotations

import copy

import pytest
import torch

from ttfm_kernels import itvm_loss, models
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

pytestmark = pytest.mark.gpu
#: A whole fp32 network in another evaluation order: roundoff compounds layer after layer (as benchmarks/).
NETWORK_SCALE = 20.0


def _step(teacher, student, ema, batch, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    teacher, student, ema = (m.to(device) for m in (teacher, student, ema))
    x1, x0, s, t = (b.to(device) for b in batch)
    student.zero_grad(set_to_none=True)
    loss, _ = itvm_loss(student, teacher, ema, x1, x0=x0, s=s, t=t, target="jvp")
    loss.backward()
    return loss.detach(), [p.grad for p in student.parameters()]


def test_itvm_step_cuda_matches_cpu():
    teacher = models.DiT.from_preset("tiny")
    student = models.TwoTimeDiT.from_teacher(teacher)
    with torch.no_grad():  # away from the zero initialisation, as after training: every tangent non-trivial
        for p in (*teacher.parameters(), *student.parameters()):
            p.add_(0.02 * torch.randn_like(p))
    ema = copy.deepcopy(student)
    n = teacher.image_size
    x1, x0 = torch.randn(2, 4, 3, n, n)
    s = 0.5 * torch.rand(4)
    batch = (x1, x0, s, s + 0.5 * torch.rand(4))
    loss_cpu, grads_cpu = _step(*(copy.deepcopy(m) for m in (teacher, student, ema)), batch, "cpu")
    loss_gpu, grads_gpu = _step(teacher, student, ema, batch, "cuda")
    assert loss_gpu.is_cuda
    assert_close_to_ref(loss_gpu, loss_cpu, name="loss", scale=NETWORK_SCALE)
    for (name, _), g, g_cpu in zip(student.named_parameters(), grads_gpu, grads_cpu, strict=True):
        assert g is not None and g.is_cuda, name
        assert_close_to_ref(g, g_cpu, name=f"grad {name}", scale=NETWORK_SCALE)
    assert_nontrivial(torch.cat([g.flatten() for g in grads_gpu]), "student gradients")
