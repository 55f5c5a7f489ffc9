"""The losses with an adapted teacher: one ITVM, LFMD and EMD step with a stock diffusers teacher equals the same
step with a hand-converted wrapper; every loss draws its times inside the teacher's t_range; outside it raises."""

import pytest
import torch

from tests.adapters.gaussian_models import DTYPE, FakeVP, gaussian_data, schedule
from tests.flow_models import TwoTimeNet
from ttfm_kernels import (
    EMA,
    GuidedTeacher,
    TimeSampler,
    emd_loss,
    flow_matching_loss,
    itvm_loss,
    lfmd_loss,
    progressive_loss,
)
from ttfm_kernels.adapters import Teacher

diffusers = pytest.importorskip("diffusers")

from tests.adapters.diffusers_models import load_dit, load_unet  # noqa: E402
from ttfm_kernels import models  # noqa: E402

B = 2


def _student() -> torch.nn.Module:
    """A library two-time U-Net (float64, 8 base channels), its weights moved off the initialisation so that
    du/dt != 0."""
    torch.manual_seed(1)
    student = models.TwoTimeUNet.from_preset("tiny", channels=8, groups=4).double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student


def _step(loss_fn, student, teacher, x1, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    student.zero_grad()
    loss, _ = loss_fn(student, teacher, x1, **kwargs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters()]


def _times(t_range: tuple[float, float]) -> dict[str, torch.Tensor]:
    lo, hi = t_range
    return {"s": torch.tensor([lo, 0.3], dtype=DTYPE), "t": torch.tensor([0.6, hi], dtype=DTYPE)}


@pytest.mark.parametrize("loss", ["itvm", "lfmd", "emd"])
def test_a_step_with_the_adapted_unet_equals_the_hand_converted_one(saved, loss):
    teacher, hand = load_unet(saved)
    student = _student()
    x1 = torch.randn(B, 3, 8, 8, dtype=DTYPE)
    kwargs = {"x0": torch.randn_like(x1), **_times(teacher.t_range)}
    if loss == "itvm":
        fn, kwargs["ema"] = itvm_loss, EMA(student)
    elif loss == "lfmd":
        fn = lfmd_loss
    else:
        fn, kwargs["ema"] = emd_loss, EMA(student)
    value, grads = _step(fn, student, teacher, x1, **kwargs)
    value_hand, grads_hand = _step(fn, student, hand, x1, **kwargs)
    torch.testing.assert_close(value, value_hand, rtol=1e-9, atol=0)
    assert float(value) > 0
    for g, g_hand in zip(grads, grads_hand, strict=True):
        torch.testing.assert_close(g, g_hand, rtol=1e-8, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_lfmd_with_a_guided_conditional_dit_through_teacher_cond(saved):
    teacher, hand = load_dit(saved)
    null = {"class_labels": torch.tensor([3])}
    student = _student()
    x1 = torch.randn(B, 3, 8, 8, dtype=DTYPE)
    kwargs = {"x0": torch.randn_like(x1), **_times(teacher.t_range),
              "teacher_cond": {"class_labels": torch.tensor([0, 2])}}
    value, grads = _step(lfmd_loss, student, GuidedTeacher(teacher, 2.0, null), x1, **kwargs)
    value_hand, grads_hand = _step(lfmd_loss, student, GuidedTeacher(hand, 2.0, null), x1, **kwargs)
    torch.testing.assert_close(value, value_hand, rtol=1e-9, atol=0)
    for g, g_hand in zip(grads, grads_hand, strict=True):
        torch.testing.assert_close(g, g_hand, rtol=1e-8, atol=1e-12)


def _recording_teacher() -> Teacher:
    abar = schedule("scaled_linear")  # t_range (0.064, 0.972): a draw on [0, 1] would leave it often
    return Teacher(FakeVP(*gaussian_data(), abar, "v_prediction", on_table=False), "v_prediction",
                   alphas_cumprod=abar)


CASES = {"itvm-jvp": (itvm_loss, {}), "itvm-euler": (itvm_loss, {"target": "euler"}),
         "itvm-fd": (itvm_loss, {"target": "fd"}), "lfmd": (lfmd_loss, {}), "emd": (emd_loss, {})}


@pytest.mark.parametrize("case", list(CASES))
def test_every_loss_draws_times_inside_t_range(case):
    fn, kwargs = CASES[case]
    teacher = _recording_teacher()
    fn(TwoTimeNet(3), teacher, torch.randn(256, 3, dtype=DTYPE),
       time_sampler=TimeSampler(marginal="lognormal", std=2.0), **kwargs)
    steps = torch.cat(teacher.model.timesteps)
    assert steps.min() > -1e-6 and steps.max() < 999 + 1e-6  # every teacher call inside the table
    assert steps.min() < 50 and steps.max() > 950  # and the range is used, not a corner of it


def test_flow_matching_and_progressive_draw_inside_their_models_range():
    teacher = _recording_teacher()
    flow_matching_loss(teacher, torch.randn(256, 3, dtype=DTYPE))
    steps = torch.cat(teacher.model.timesteps)
    assert steps.min() > -1e-6 and steps.max() < 999 + 1e-6
    frozen, student, times = TwoTimeNet(3), TwoTimeNet(3), []
    frozen.t_range = (0.25, 0.5)
    student.register_forward_pre_hook(lambda module, args: times.append(args[1:3]))
    progressive_loss(student, frozen, torch.randn(64, 3, dtype=DTYPE))
    ((s, t),) = times
    assert s.min() >= 0.25 and t.max() <= 0.5 and (s <= t).all()


@pytest.mark.parametrize("case", [*CASES, "progressive", "flow_matching"])
def test_given_times_outside_t_range_raise_unless_extrapolate(case):
    teacher, x1 = _recording_teacher(), torch.randn(4, 3, dtype=DTYPE)
    s, t = torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=DTYPE), torch.full((4,), 0.5, dtype=DTYPE)
    if case == "flow_matching":
        def call(**kw):
            return flow_matching_loss(teacher, x1, t=s, **kw)
    elif case == "progressive":
        frozen = TwoTimeNet(3)
        frozen.t_range = teacher.t_range

        def call(**kw):
            return progressive_loss(TwoTimeNet(3), frozen, x1, s=s, t=t, **kw)
    else:
        fn, kwargs = CASES[case]

        def call(**kw):
            return fn(TwoTimeNet(3), teacher, x1, s=s, t=t, **kwargs, **kw)
    with pytest.raises(ValueError, match=r"^[st]: 1 of 4 values lie outside the teacher's t_range"):
        call()
    loss, _ = call(extrapolate=True)
    assert torch.isfinite(loss)
