"""The models' explicit-tangent pass ``forward_jvp``: values, gradients through the tangent, and its routes.

Oracles: ``torch.autograd.functional.jvp`` (the double-backward trick, no forward AD at all) over the eager twin
for tangent values, in float64; fp64 central finite differences along a random parameter direction for the
gradients through the tangent (torch's own forward-AD rule of F.layer_norm gives wrong gradients in torch 2.13).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.models.twin import eager_twin
from ttfm_kernels import EMA, jvp_sx, jvp_t, models
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

NUM_CLASSES = 3
# (model class, extra constructor arguments): every teacher and student, image models class-conditioned.
MODELS = [
    pytest.param(models.MLP, {}, id="mlp"),
    pytest.param(models.TwoTimeMLP, {}, id="twotime-mlp"),
    pytest.param(models.DiT, {"num_classes": NUM_CLASSES}, id="dit"),
    pytest.param(models.TwoTimeDiT, {"num_classes": NUM_CLASSES}, id="twotime-dit"),
    pytest.param(models.UNet, {"num_classes": NUM_CLASSES}, id="unet"),
    pytest.param(models.TwoTimeUNet, {"num_classes": NUM_CLASSES}, id="twotime-unet"),
]
STUDENT_SUBSETS = [("tt",), ("tx", "ts"), ("tx",), ("ts", "tt"), ("tx", "ts", "tt")]
TEACHER_SUBSETS = [("tt",), ("tx",), ("tx", "tt")]


def _model(cls: type, extra: dict, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls.from_preset("tiny", **extra).to(dtype)
    with torch.no_grad():  # move every weight off its (partly zero) initialisation, as training would
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _two_time(model: torch.nn.Module) -> bool:
    return isinstance(model, (models.TwoTimeMLP, models.TwoTimeDiT, models.TwoTimeUNet))


def _inputs(model: torch.nn.Module, batch: int = 2, dtype: torch.dtype = torch.float64):
    """Primals {x, (s,) t}, tangents {tx, (ts,) tt}, and the conditioning keywords."""
    shape = (batch, model.dim) if isinstance(model, (models.MLP, models.TwoTimeMLP)) else \
        (batch, model.in_channels, model.image_size, model.image_size)
    gen = torch.Generator().manual_seed(1)
    s = 0.6 * torch.rand(batch, generator=gen, dtype=dtype)
    primals = {"x": torch.randn(shape, generator=gen, dtype=dtype), "s": s,
               "t": s + 0.4 * torch.rand(batch, generator=gen, dtype=dtype)}
    if not _two_time(model):
        del primals["s"]
    tangents = {f"t{n}": torch.randn(p.shape, generator=gen, dtype=dtype) for n, p in primals.items()}
    cond = {"y": torch.randint(0, NUM_CLASSES, (batch,), generator=gen)} if getattr(model, "num_classes", 0) \
        else {}
    return primals, tangents, cond


@pytest.mark.parametrize(("cls", "extra"), MODELS)
def test_forward_jvp_matches_double_backward_jvp(cls, extra):
    """Every tangent subset, fp64, against the eager twin: torch.autograd.functional.jvp (no forward AD) for all
    tangents at once, and by linearity the sums of torch.func.jvp's one-input JVPs for each subset."""
    model = _model(cls, extra)
    twin = eager_twin(model)
    primals, tangents, cond = _inputs(model, batch=1)
    names = list(primals)

    def fn(*args: torch.Tensor) -> torch.Tensor:
        return twin(*args, **cond)

    u_ref, du_all = torch.autograd.functional.jvp(fn, tuple(primals.values()), tuple(tangents.values()))
    single = {}  # the JVP along one input's tangent alone
    for i, name in enumerate(names):
        single[f"t{name}"] = torch.func.jvp(lambda p, i=i: fn(*[*primals.values()][:i], p,
                                                                *[*primals.values()][i + 1:]),
                                            (primals[name],), (tangents[f"t{name}"],))[1]
    assert_close_to_ref(sum(single.values()), du_all, name="linearity of the oracle")
    for subset in STUDENT_SUBSETS if _two_time(model) else TEACHER_SUBSETS:
        u, du = model.forward_jvp(*primals.values(), **{k: tangents[k] for k in subset}, **cond)
        assert_nontrivial(du, f"tangent along {subset}")
        assert_close_to_ref(u, u_ref, name="u")
        ref = du_all if len(subset) == len(names) else sum(single[k] for k in subset)
        assert_close_to_ref(du, ref, name=f"tangent along {subset}")
    assert_close_to_ref(model(*primals.values(), **cond), u_ref, name="forward")


@pytest.mark.parametrize(("cls", "extra"), MODELS)
def test_gradients_through_the_tangent_match_finite_differences(cls, extra):
    """d/d(eps) of L(theta + eps delta), L = <w1, du> + <w2, u>, equals <grad L, delta> (fp64, central FD)."""
    model = _model(cls, extra)
    primals, tangents, cond = _inputs(model, batch=1)
    given = {"tt": tangents["tt"]} if _two_time(model) else {"tx": tangents["tx"], "tt": tangents["tt"]}
    gen = torch.Generator().manual_seed(2)
    w1, w2 = (torch.randn(primals["x"].shape, generator=gen, dtype=torch.float64) for _ in range(2))
    params = [p for p in model.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]

    def objective() -> torch.Tensor:
        u, du = model.forward_jvp(*primals.values(), **given, **cond)
        return (w1 * du).sum() + (w2 * u).sum()

    grads = torch.autograd.grad(objective(), params)
    assert all(g is not None for g in grads)
    predicted = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    eps = 1e-6
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
            values.append(objective())
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
    measured = (values[0] - values[1]) / (2 * eps)
    predicted = float(predicted.detach())
    assert abs(predicted) > 1e-3
    assert abs(predicted - float(measured)) <= 1e-6 * max(1.0, abs(float(measured)))


@pytest.mark.parametrize(("cls", "extra"), [MODELS[1], MODELS[3], MODELS[5]])
def test_jvp_t_and_jvp_sx_use_forward_jvp(cls, extra, monkeypatch):
    model = _model(cls, extra)
    calls = []
    original = cls.forward_jvp

    def counting(self, *args, **kwargs):
        calls.append(sorted(k for k, v in kwargs.items() if k in ("tx", "ts", "tt") and v is not None))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward_jvp", counting)
    primals, tangents, cond = _inputs(model)
    x, s, t = primals.values()
    _, du = jvp_t(model, x, s, t, **cond)
    _, dsx = jvp_sx(model, x, s, t, tangents["tx"], **cond)
    _, du_ema = jvp_t(EMA(model), x, s, t, **cond)  # EMA exposes its copy's forward_jvp
    assert calls == [["tt"], ["ts", "tx"], ["tt"]]
    twin = eager_twin(model)
    ones = torch.ones_like(t)
    _, du_ref = torch.func.jvp(lambda t_: twin(x, s, t_, **cond), (t,), (ones,))
    _, dsx_ref = torch.func.jvp(lambda x_, s_: twin(x_, s_, t, **cond), (x, s), (tangents["tx"], ones))
    for name, got, ref in (("jvp_t", du, du_ref), ("jvp_sx", dsx, dsx_ref), ("jvp_t of the EMA", du_ema, du_ref)):
        assert_nontrivial(got, name)
        assert_close_to_ref(got, ref, name=name)


def test_forward_with_tangents_and_argument_errors():
    model = _model(models.TwoTimeDiT, {"num_classes": NUM_CLASSES})
    primals, tangents, cond = _inputs(model)
    u, du = model(*primals.values(), tangents={"tt": tangents["tt"]}, **cond)
    u_ref, du_ref = model.forward_jvp(*primals.values(), tt=tangents["tt"], **cond)
    assert torch.equal(u, u_ref) and torch.equal(du, du_ref)
    with pytest.raises(ValueError, match="tangents must be a mapping with keys among"):
        model(*primals.values(), tangents={"tv": tangents["tt"]})
    with pytest.raises(ValueError, match="tt has shape"):
        model.forward_jvp(*primals.values(), tt=tangents["tt"][:1])
    with pytest.raises(TypeError, match="tx has dtype"):
        model.forward_jvp(*primals.values(), tx=tangents["tx"].float())
    assert model.forward_jvp(*primals.values(), **cond)[1] is None


def test_lfmd_style_graph_and_no_grad():
    """Under no_grad the pass keeps no graph; with grad it reaches the (t - s) branch's zero-initialised layer."""
    teacher = _model(models.DiT, {})
    student = models.TwoTimeDiT.from_teacher(teacher)
    primals, tangents, _ = _inputs(student)
    with torch.no_grad():
        u, du = student.forward_jvp(*primals.values(), tt=tangents["tt"])
    assert not u.requires_grad and not du.requires_grad
    _, du = student.forward_jvp(*primals.values(), tt=tangents["tt"])
    (du * torch.randn_like(du)).sum().backward()  # du == 0 at the start, its weight gradient is not
    assert_nontrivial(student.cond.time_embed.d_embed.mlp[-1].weight.grad, "(t - s) branch gradient")
    copy_ = copy.deepcopy(student)
    assert_close_to_ref(copy_.forward_jvp(*primals.values(), tt=tangents["tt"])[1], du, name="deepcopy")
