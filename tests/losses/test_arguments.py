"""The arguments every loss shares: bad input gets a clear error naming the argument; diagonal pairs;
conditioning reaches every model; sigma comes from the teacher."""

import pytest
import torch

from tests.flow_models import DTYPE, TwoTimeNet, VelocityNet, gaussian_case
from ttfm_kernels import (
    TimeSampler,
    emd_loss,
    flow_matching_loss,
    itvm_loss,
    itvm_residual_loss,
    lfmd_loss,
    progressive_loss,
)

N, D = 4, 3
LOSSES = {
    "itvm-jvp": lambda st, te, x1, **k: itvm_loss(st, te, x1, **k),
    "itvm-euler": lambda st, te, x1, **k: itvm_loss(st, te, x1, target="euler", **k),
    "itvm-fd": lambda st, te, x1, **k: itvm_loss(st, te, x1, target="fd", terminal_init=True, **k),
    "lfmd": lfmd_loss,
    "emd": emd_loss,
    "progressive": lambda st, te, x1, **k: progressive_loss(st, st, x1, **k),
}


def _models():
    return TwoTimeNet(D), VelocityNet(D)


def _times():
    s = torch.rand(N, dtype=DTYPE) * 0.5
    return s, s + 0.25


@pytest.mark.parametrize("name", LOSSES)
def test_diagonal_pairs_are_finite(name):
    student, teacher = _models()
    s = torch.rand(N, dtype=DTYPE)
    loss, stats = LOSSES[name](student, teacher, torch.randn(N, D, dtype=DTYPE), s=s, t=s.clone())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in student.net.parameters())
    assert all(torch.isfinite(v) for v in stats.values())
    assert stats["gap"] == 0


@pytest.mark.parametrize("name", LOSSES)
def test_conditioning_reaches_every_model(name):
    student, teacher = _models()
    y = torch.tensor([0, 1, 2, 3])
    LOSSES[name](student, teacher, torch.randn(N, D, dtype=DTYPE), cond={"y": y})
    for model in (student, teacher):
        assert model.calls or (model is teacher and name == "progressive")
        for seen in model.calls:  # batched calls see the labels repeated along the batch
            assert torch.equal(seen, y.repeat(len(seen) // N))


def test_conditioning_reaches_flow_matching_and_emd_ema():
    student, teacher = _models()
    ema = TwoTimeNet(D)
    y = torch.tensor([3, 2, 1, 0])
    emd_loss(student, teacher, torch.randn(N, D, dtype=DTYPE), ema=ema, cond={"y": y})
    flow_matching_loss(teacher, torch.randn(N, D, dtype=DTYPE), cond={"y": y})
    assert ema.calls and all(seen is y for seen in ema.calls + teacher.calls)


def _error(exc, match, **kwargs):
    student, teacher = _models()
    x1 = kwargs.pop("x1", torch.randn(N, D, dtype=DTYPE))
    for name, loss in LOSSES.items():
        if name == "progressive" and "teacher" in kwargs:
            continue  # PFMM has no teacher
        with pytest.raises(exc, match=match):
            loss(kwargs.get("student", student), kwargs.get("teacher", teacher), x1,
                 **{k: v for k, v in kwargs.items() if k not in ("student", "teacher")})
            pytest.fail(name)


def test_bad_batch_and_times_are_named():
    s, t = _times()
    _error(ValueError, "x0 has shape", x0=torch.randn(N + 1, D, dtype=DTYPE))
    _error(ValueError, r"s must have shape \(B,\)", s=s[:, None], t=t)
    _error(ValueError, r"t must have shape \(B,\)", s=s, t=t[:-1])
    _error(ValueError, "t has non-finite", s=s, t=t.clone().fill_(float("nan")))
    _error(ValueError, "s has non-finite", s=s.clone().fill_(float("inf")), t=t)
    _error(ValueError, "t < s", s=t, t=s)
    _error(ValueError, "both s and t", s=s)
    _error(ValueError, "empty batch", x1=torch.randn(0, D, dtype=DTYPE))
    _error(ValueError, "weight must have shape", weight=torch.ones(N + 1, dtype=DTYPE))
    _error(ValueError, "reduction", reduction="avg")
    with pytest.raises(ValueError, match="t must have shape"):
        flow_matching_loss(VelocityNet(D), torch.randn(N, D, dtype=DTYPE), t=torch.rand(N, 1, dtype=DTYPE))


def test_model_device_mismatch_is_named():
    _, teacher = _models()
    _error(ValueError, "teacher is on meta", teacher=teacher.to("meta"))
    # another parameter dtype is allowed (each model gets x in its own dtype: tests/test_precision.py)
    loss, _ = itvm_loss(TwoTimeNet(D), VelocityNet(D), torch.randn(N, D, dtype=DTYPE), ema=TwoTimeNet(D).float())
    assert loss.dtype == DTYPE


def test_sigma_comes_from_the_teacher_and_must_agree():
    """The drawn noise is sigma N(0, I) with the teacher's sigma: the same draw made by hand gives the same loss."""
    teacher, _ = gaussian_case(sigma=0.5)
    _, perturbed = gaussian_case(sigma=0.5, perturb=0.1)
    x1 = teacher.sample(N)
    for sigma in (None, 0.5):
        torch.manual_seed(0)
        drawn = itvm_loss(perturbed, teacher, x1, sigma=sigma)[0]
        torch.manual_seed(0)
        x0 = 0.5 * torch.randn_like(x1)
        s, t = TimeSampler()(N, dtype=DTYPE)
        assert drawn == itvm_loss(perturbed, teacher, x1, x0=x0, s=s, t=t)[0] > 0
    with pytest.raises(ValueError, match=r"student\.sigma = 0\.5 differs"):
        itvm_loss(perturbed, VelocityNet(D), x1)
    with pytest.raises(ValueError, match="sigma must be a finite positive"):
        emd_loss(TwoTimeNet(D), VelocityNet(D), x1, sigma=-1.0)


def test_itvm_options_are_checked():
    student, teacher = _models()
    x1 = torch.randn(N, D, dtype=DTYPE)
    with pytest.raises(ValueError, match="target must be one of"):
        itvm_loss(student, teacher, x1, target="heun")
    with pytest.raises(ValueError, match="delta must be in"):
        itvm_loss(student, teacher, x1, target="fd", delta=0.0)


def test_residual_target_that_requires_grad_is_an_error():
    u = torch.randn(N, D, dtype=DTYPE, requires_grad=True)
    a = torch.randn(N, D, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="target_a requires grad"):
        itvm_residual_loss(u, u, u.detach(), a, a.detach(), torch.ones(N, dtype=DTYPE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["itvm-jvp", "itvm-fd", "lfmd", "emd"])
def test_lower_precision_models_and_data(name, dtype):
    """Models and data in float32 / bfloat16 (times stay in float32): finite loss and gradients."""
    student, teacher = TwoTimeNet(D).to(dtype), VelocityNet(D).to(dtype)
    loss, _ = LOSSES[name](student, teacher, torch.randn(N, D, dtype=dtype))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in student.net.parameters())
