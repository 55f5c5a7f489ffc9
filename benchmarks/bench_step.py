"""A whole ITVM training step and the student JVP alone, on the "small" DiT and UNet (CPU fp32).

- ITVM step (target "jvp": EMA JVP, teacher forwards, batched student forward, fused residual loss, backward),
  fused ops under backend "auto" against the same step under ``use_backend("reference")`` (every op on its
  PyTorch reference: attention JVP, norm JVP and the residual loss as plain formulas). No optimizer update, so
  every round runs the same step.
- The JVP alone: ``jvp_t`` through the fused layers against ``torch.func.jvp`` over the eager twin (the same
  weights in plain torch modules: math SDPA, nn.LayerNorm / GroupNorm + modulation + SiLU), which is what a user
  without this library runs.
- GPU: the ITVM step of a DiT with 256 tokens ("small": 32x32, patch 2, hidden 192, 3 heads of 64) on CUDA, fp32,
  fused ("auto": Triton attention and norm JVPs, CUDA residual loss) against the reference ops on the same GPU.
Weights are perturbed away from their zero initialisation, as after training, so every tangent is non-trivial.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.models.twin import eager_twin
from ttfm_kernels import itvm_loss, jvp_t, models, use_backend
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

# (label, teacher class, student class, batch): batches sized for about 0.1-1 s per step on 2 cores.
CASES = [
    ("TwoTimeDiT small 32x32x3 B2", models.DiT, models.TwoTimeDiT, 2),
    ("TwoTimeUNet small 32x32x3 B2", models.UNet, models.TwoTimeUNet, 2),
]
IDS = [c[0].split()[0] for c in CASES]
# A whole fp32 network against another fp32 evaluation order: roundoff compounds layer after layer.
NETWORK_SCALE = 20.0
#: Asserted floor of the student jvp_t's speedup over torch.func.jvp on the eager twin, below every recorded run
#: with margin (docs/performance.md).
STUDENT_JVP_FLOOR = 0.9


def _trained(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _setup(teacher_cls: type, student_cls: type, batch: int, device: str = "cpu"):
    torch.manual_seed(0)
    teacher = _trained(teacher_cls.from_preset("small"))
    student = _trained(student_cls.from_teacher(teacher))
    n = teacher.image_size
    x1, x0 = torch.randn(batch, 3, n, n), torch.randn(batch, 3, n, n)
    s = 0.5 * torch.rand(batch)
    t = s + 0.5 * torch.rand(batch)
    return teacher.to(device), student.to(device), tuple(b.to(device) for b in (x1, x0, s, t))


def _itvm_step_case(compare, label: str, teacher_cls: type, student_cls: type, batch: int, device: str,
                    rounds: int):
    """Time one ITVM step (loss + backward) fused ("auto") against the reference ops, after checking parity."""
    teacher, student, (x1, x0, s, t) = _setup(teacher_cls, student_cls, batch, device)
    ema = copy.deepcopy(student)

    def step(backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        student.zero_grad(set_to_none=True)
        with use_backend(backend):
            loss, _ = itvm_loss(student, teacher, x1, ema=ema, x0=x0, s=s, t=t, target="jvp")
            loss.backward()
        return loss.detach(), [p.grad for p in student.parameters()]

    def check() -> None:
        loss_ref, grads_ref = step("reference")
        loss, grads = step("auto")
        assert_close_to_ref(loss, loss_ref, name="loss", scale=NETWORK_SCALE)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            assert_close_to_ref(g, g_ref, name="student gradient", scale=NETWORK_SCALE)

    return compare(case=f"itvm step jvp {device} {label} fp32", fns={"reference": lambda: step("reference"),
                                                                      "fused": lambda: step("auto")},
                   baseline="reference", check=check, rounds=rounds)


@pytest.mark.parametrize(("label", "teacher_cls", "student_cls", "batch"), CASES, ids=IDS)
def test_itvm_step_cpu(compare, label, teacher_cls, student_cls, batch) -> None:
    res = _itvm_step_case(compare, label, teacher_cls, student_cls, batch, "cpu", rounds=5)
    # Only the EMA JVP and the no-grad forwards differ between the two; the student's forward and backward (most
    # of the step) are the same ops, so the ratio stays near 1 and the floor only catches a slowdown.
    res.check_speedup("fused", floor=0.75, goal=1.0)


@pytest.mark.gpu
def test_itvm_step_dit_256_tokens_gpu(compare) -> None:
    res = _itvm_step_case(compare, "TwoTimeDiT small 32x32x3 (256 tokens) B8", models.DiT, models.TwoTimeDiT, 8,
                          "cuda", rounds=20)
    assert res.speedup("fused") >= 1.0


@pytest.mark.parametrize(("label", "teacher_cls", "student_cls", "batch"), CASES, ids=IDS)
def test_student_jvp_cpu(compare, label, teacher_cls, student_cls, batch) -> None:
    _, student, (x, _, s, t) = _setup(teacher_cls, student_cls, batch)
    twin = eager_twin(student)
    ones = torch.ones_like(t)

    @torch.no_grad()
    def eager():
        return torch.func.jvp(lambda t_: twin(x, s, t_), (t,), (ones,))

    def fused():
        return jvp_t(student, x, s, t)

    def check() -> None:
        u_ref, du_ref = eager()
        u, du = fused()
        assert_nontrivial(du, "du/dt")
        assert_close_to_ref(u, u_ref, name="u", scale=NETWORK_SCALE)
        assert_close_to_ref(du, du_ref, name="du/dt", scale=NETWORK_SCALE)

    res = compare(case=f"student jvp_t cpu {label} fp32", fns={"eager": eager, "fused": fused},
                  baseline="eager", check=check, rounds=5)
    res.check_speedup("fused", floor=STUDENT_JVP_FLOOR)
