"""What every image teacher/student pair must do (DiT and UNet alike), on the "tiny" presets at 8x8.

The oracle is ``eager_twin``: the same weights with every fused layer replaced by plain torch ops, under
``torch.func.jvp`` in float64.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from tests.models.twin import eager_twin
from ttfm_kernels import GuidedTeacher, itvm_loss, jvp_sx, jvp_t, models
from ttfm_kernels.nn import Attention, Conv2d, Linear, ModulatedGroupNorm, ModulatedLayerNorm
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

PAIRS = [pytest.param((models.DiT, models.TwoTimeDiT), id="dit"),
         pytest.param((models.UNet, models.TwoTimeUNet), id="unet")]
FUSED = {"dit": {Attention, ModulatedLayerNorm, Linear, Conv2d},
         "unet": {Attention, ModulatedGroupNorm, Linear, Conv2d}}
NUM_CLASSES = 3


def _randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Perturb every weight (zero-initialised layers included), as training would: no output is trivially 0."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def _model(cls: type, dtype: torch.dtype = torch.float64, **overrides) -> torch.nn.Module:
    return _randomize(cls.from_preset("tiny", num_classes=NUM_CLASSES, **overrides).to(dtype))


def _inputs(model: torch.nn.Module, batch: int = 2, dtype: torch.dtype = torch.float64):
    n = model.image_size
    x = torch.randn(batch, model.in_channels, n, n, dtype=dtype)
    s = 0.6 * torch.rand(batch, dtype=torch.float32).to(dtype)  # times exact in float32, for fp32-vs-fp64 parity
    t = s + 0.4 * torch.rand(batch, dtype=torch.float32).to(dtype)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    return x, s, t, y


@pytest.mark.parametrize("pair", PAIRS)
def test_shapes_presets_and_sigma(pair):
    teacher_cls, student_cls = pair
    for name in ("tiny", "small"):
        model = student_cls.from_preset(name)
        assert model.config["image_size"] == model.image_size and model.sigma == 1.0
    teacher = teacher_cls.from_preset("tiny", image_size=16, in_channels=1, sigma=0.5)
    student = student_cls.from_preset("tiny", image_size=16, in_channels=1)
    assert teacher.sigma == 0.5 and teacher.null_class is None
    x, t = torch.randn(3, 1, 16, 16), torch.rand(3)
    assert teacher(x, t).shape == student(x, t, t).shape == x.shape
    with pytest.raises(ValueError, match="unknown preset"):
        teacher_cls.from_preset("huge")
    with pytest.raises(ValueError, match="x must have shape"):
        teacher(torch.randn(3, 2, 16, 16), t)
    with pytest.raises(ValueError, match="s must be"):
        student(x, t[:2], t)
    with pytest.raises(ValueError, match="num_classes=0"):
        teacher(x, t, y=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("pair", PAIRS)
def test_fresh_teacher_starts_at_zero_on_fused_layers(pair):
    """adaLN-Zero (DiT) / zeroed output convolutions (UNet): an untrained teacher outputs 0; no BatchNorm."""
    teacher = pair[0].from_preset("tiny")
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(teacher(x, t), torch.zeros_like(x))
    kinds = {type(m) for m in teacher.modules()}
    assert FUSED[pair[0].__name__.lower()] <= kinds
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in teacher.modules())


@pytest.mark.parametrize("pair", PAIRS)
def test_from_teacher_starts_at_the_teacher(pair):
    teacher_cls, student_cls = pair
    teacher = _model(teacher_cls, sigma=0.7)
    student = student_cls.from_teacher(teacher)
    assert student.sigma == 0.7 and next(student.parameters()).dtype == torch.float64
    x, s, t, y = _inputs(teacher)
    with torch.no_grad():
        v = teacher(x, s, y=y)
        assert_nontrivial(v, "teacher output")
        assert torch.equal(student(x, s, s, y=y), v)
        assert torch.equal(student(x, s, t, y=y), v)
    with pytest.raises(TypeError, match="teacher must be"):
        student_cls.from_teacher(student)
    with pytest.raises(TypeError, match="is a teacher"):
        teacher_cls.from_teacher(teacher)


@pytest.mark.parametrize("pair", PAIRS)
def test_gap_scale_is_the_students_and_keeps_from_teacher_exact(pair):
    """s keeps the teacher's time_scale, t - s gets gap_scale (default 1.0, in config); teachers take none."""
    teacher_cls, student_cls = pair
    teacher = _model(teacher_cls)
    x, s, t, y = _inputs(teacher)
    for gap_scale in (1.0, 1000.0):
        student = student_cls.from_teacher(teacher, gap_scale=gap_scale)
        embed = student.cond.time_embed
        assert (embed.s_embed.scale, embed.d_embed.scale) == (teacher.config["time_scale"], gap_scale)
        assert student.config["gap_scale"] == gap_scale and type(student)(**student.config).config == student.config
        with torch.no_grad():
            assert torch.equal(student(x, s, t, y=y), teacher(x, s, y=y))
    assert student_cls.from_preset("tiny").config["gap_scale"] == 1.0
    assert "gap_scale" not in teacher.config
    with pytest.raises(ValueError, match="gap_scale is a two-time student's argument"):
        teacher_cls.from_preset("tiny", gap_scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("pair", PAIRS)
def test_jvp_matches_eager_twin(pair, dtype):
    """jvp_t (d/dt) and jvp_sx (tangent (v, 1, 0)) through the fused layers == torch.func.jvp over the twin."""
    student = _model(pair[1])
    twin = eager_twin(student)
    fused = student.to(dtype)
    x, s, t, y = _inputs(student)
    v = torch.randn_like(x)
    ones = torch.ones_like(t)
    u_ref, dt_ref = torch.func.jvp(lambda t_: twin(x, s, t_, y=y), (t,), (ones,))
    _, dsx_ref = torch.func.jvp(lambda x_, s_: twin(x_, s_, t, y=y), (x, s), (v, ones))
    cast = [a.to(dtype) for a in (x, s, t, v)]
    u, dt = jvp_t(fused, *cast[:3], y=y)
    _, dsx = jvp_sx(fused, *cast, y=y)
    with fwAD.dual_level():
        u_ad, dt_ad = fwAD.unpack_dual(fused(cast[0], cast[1], fwAD.make_dual(cast[2], ones.to(dtype)), y=y))
    scale = 1.0 if dtype == torch.float64 else 4.0  # a whole fp32 network vs fp64: roundoff compounds per layer
    for name, got, ref in (("u", u, u_ref), ("du/dt", dt, dt_ref), ("jvp_sx tangent", dsx, dsx_ref),
                           ("forward_ad u", u_ad, u_ref), ("forward_ad du/dt", dt_ad, dt_ref)):
        assert got.dtype == dtype
        assert_nontrivial(got, name)
        assert_close_to_ref(got, ref, dtype=dtype, name=name, scale=scale)


@pytest.mark.parametrize("pair", PAIRS)
def test_itvm_gradients_reach_the_student_only(pair):
    teacher_cls, student_cls = pair
    teacher = _model(teacher_cls, torch.float32)
    student = student_cls.from_teacher(teacher)
    ema = copy.deepcopy(student)
    x1, _, _, y = _inputs(teacher, batch=3, dtype=torch.float32)
    loss, stats = itvm_loss(student, teacher, x1, ema=ema, cond={"y": y}, target="jvp")
    loss.backward()
    assert torch.isfinite(loss) and stats["init"] < 1e-10  # u(x, s, s) == v(x, s) at the start (up to batching)
    for name, p in student.named_parameters():
        if "label_embed" not in name:  # rows of unused labels get no gradient
            assert p.grad is not None, name
    assert_nontrivial(student.cond.time_embed.d_embed.mlp[-1].weight.grad, "(t - s) branch gradient")
    assert_nontrivial(student.body.conv_in.weight.grad if hasattr(student.body, "conv_in")
                      else student.body.x_embedder.weight.grad, "first layer gradient")
    assert all(p.grad is None for p in [*teacher.parameters(), *ema.parameters()])


@pytest.mark.parametrize("pair", PAIRS)
def test_state_dict_round_trip(pair):
    student = _model(pair[1])
    buffer = io.BytesIO()
    torch.save(student.state_dict(), buffer)
    buffer.seek(0)
    copy_ = pair[1](**student.config).double()
    copy_.load_state_dict(torch.load(buffer))
    x, s, t, y = _inputs(student)
    with torch.no_grad():
        assert torch.equal(copy_(x, s, t, y=y), student(x, s, t, y=y))


@pytest.mark.parametrize("pair", PAIRS)
def test_class_conditioning(pair):
    teacher = _model(pair[0])
    x, _, t, _ = _inputs(teacher)
    with torch.no_grad():
        out = [teacher(x, t, y=torch.full((2,), label)) for label in range(NUM_CLASSES + 1)]
        assert not torch.allclose(out[0], out[1])
        assert torch.equal(teacher(x, t), out[teacher.null_class])
        guided = GuidedTeacher(teacher, 3.0, {"y": None})(x, t, y=torch.ones(2, dtype=torch.long))
        assert_close_to_ref(guided, out[-1] + 3.0 * (out[1] - out[-1]), name="guided teacher")
    for bad in (torch.zeros(2), 1):
        with pytest.raises(ValueError, match="integer class labels"):
            teacher(x, t, y=bad)
