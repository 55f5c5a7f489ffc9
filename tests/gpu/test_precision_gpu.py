"""The autocast steps of tests/test_precision.py on CUDA, bf16 and fp16: ITVM ("jvp") and EMD on the "tiny"
TwoTimeDiT and TwoTimeUNet, against the fp32 step on the same GPU. 8 cases; Triton specialisations: the
attention and norm JVPs at D = 16 / 8 and rows of 64 / 16 channels, in bf16 and fp16 (about 8)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.test_precision import LOSSES, _batch, _copy, _pair

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["itvm-jvp", "emd"])
@pytest.mark.parametrize("arch", ["DiT", "UNet"])
def test_cuda_autocast_step_matches_fp32(arch, loss_name, dtype):
    """Loss within 2e-2 of the fp32 step, every gradient tensor of norm > 1e-6 at cosine >= 0.99."""
    teacher, student = (_copy(m).cuda() for m in _pair(arch))
    fn, kwargs = LOSSES[loss_name]
    b = {k: v.cuda() for k, v in _batch(arch).items()}
    x1 = b.pop("x1")
    losses, grads = [], []
    for autocast in (None, dtype):
        student.zero_grad(set_to_none=True)
        context = torch.autocast("cuda", dtype=autocast) if autocast else contextlib.nullcontext()
        with context:
            loss, _ = fn(student, teacher, x1, **b, **kwargs)
        loss.backward()
        losses.append(float(loss))
        grads.append([p.grad.clone() for p in student.parameters()])
    assert abs(losses[1] - losses[0]) <= 2e-2 * abs(losses[0]), losses
    for g32, g16 in zip(*grads, strict=True):
        if g32.norm() > 1e-6:
            assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) >= 0.99
