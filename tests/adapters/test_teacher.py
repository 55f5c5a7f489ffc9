"""adapters.Teacher: each prediction type converted to this library's v, against the exact velocity of Gaussian
data (float64), on and between the schedule's table entries; t_range; ode_solve; errors."""

import ast
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ttfm_kernels
from tests.adapters.gaussian_models import DTYPE, FakeFlow, FakeVelocity, FakeVP, gaussian_data, schedule
from tests.flow_models import GaussianFlowMap, GaussianTeacher
from ttfm_kernels import GuidedTeacher, ode_solve, sample
from ttfm_kernels.adapters import Teacher

B = 6
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _teacher(prediction: str, abar: torch.Tensor, on_table: bool) -> Teacher:
    m, c = gaussian_data()
    if prediction == "velocity":
        return Teacher(FakeVelocity(m, c), "velocity")
    if prediction == "flow":
        return Teacher(FakeFlow(m, c), "flow")
    return Teacher(FakeVP(m, c, abar, prediction, on_table), prediction, alphas_cumprod=abar)


def _exact() -> GaussianTeacher:
    return GaussianTeacher(*gaussian_data(), sigma=1.0)


@pytest.mark.parametrize("prediction", ["velocity", "flow", "epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("where", ["on_table", "between"])
def test_adapted_teacher_is_the_exact_velocity(prediction, where):
    abar = schedule("linear")
    teacher = _teacher(prediction, abar, on_table=where == "on_table")
    lo, hi = teacher.t_range
    if where == "on_table" and prediction in ("epsilon", "v_prediction", "sample"):
        index = torch.tensor([0, 1, 17, 500, 998, 999])
        t = (abar.sqrt() / (abar.sqrt() + (1 - abar).sqrt()))[index]  # t of the table entries
        torch.testing.assert_close(teacher.timestep(t), index.to(DTYPE), rtol=0, atol=1e-9)
    else:
        t = lo + (hi - lo) * torch.rand(B, dtype=DTYPE)
    x = torch.randn(len(t), 3, dtype=DTYPE) * 2
    v = teacher(x, t)
    torch.testing.assert_close(v, _exact()(x, t), **TOL)
    assert v.dtype == DTYPE
    assert teacher(x, t, return_dict=False).equal(v)  # the tuple output is unwrapped the same way


def test_vp_timesteps_interpolate_between_entries_and_t_range_matches_diffusers_schedules():
    expected = {"linear": (0.0063, 0.990), "scaled_linear": (0.064, 0.972), "squaredcos_cap_v2": (0.00005, 0.9936)}
    for name, (lo, hi) in expected.items():
        teacher = Teacher(torch.nn.Identity(), "epsilon", alphas_cumprod=schedule(name))
        assert teacher.t_range[0] == pytest.approx(lo, rel=0.02) and teacher.t_range[1] == pytest.approx(hi, rel=1e-3)
    abar = schedule("linear")
    teacher = Teacher(torch.nn.Identity(), "v_prediction", alphas_cumprod=abar)
    tt = abar.sqrt() / (abar.sqrt() + (1 - abar).sqrt())
    mid = (tt[10] + tt[11]) / 2  # halfway in library time between entries 10 and 11
    assert float(teacher.timestep(mid.reshape(1))) == pytest.approx(10.5, abs=1e-9)
    dense = torch.linspace(*teacher.t_range, 2001, dtype=DTYPE)
    steps = teacher.timestep(dense)
    assert (steps.diff() < 0).all() and float(steps[0]) == pytest.approx(999) and float(steps[-1]) == pytest.approx(0)
    # outside the range the index continues linearly (used only with extrapolate=True)
    assert float(teacher.timestep(torch.tensor([tt[-1] - (tt[-2] - tt[-1])], dtype=DTYPE))) == pytest.approx(1000)


def test_velocity_and_flow_timesteps_and_scale():
    m, c = gaussian_data()
    t = torch.tensor([0.0, 0.25, 1.0], dtype=DTYPE)
    torch.testing.assert_close(Teacher(FakeFlow(m, c), "flow").timestep(t), 1000 * (1 - t))
    teacher = Teacher(FakeVelocity(m, c), "velocity", timestep_scale=1.0)
    torch.testing.assert_close(teacher.timestep(t), t)
    assert teacher.t_range == (0.0, 1.0) and teacher.sigma == 1.0


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_zero_terminal_snr_reaches_t_zero_for_v_and_sample_predictions(prediction):
    abar = schedule("linear").clone()
    abar[-1] = 0.0
    teacher = _teacher(prediction, abar, on_table=True)
    assert teacher.t_range[0] == 0.0
    t = torch.zeros(B, dtype=DTYPE)
    x = torch.randn(B, 3, dtype=DTYPE)
    torch.testing.assert_close(teacher(x, t), _exact()(x, t), **TOL)
    assert teacher.model.timesteps[-1].eq(999).all()


def test_bad_arguments_are_named():
    abar = schedule("linear")
    zero_snr = abar.clone()
    zero_snr[-1] = 0.0
    identity = torch.nn.Identity()
    cases = [
        ({"prediction": "x0"}, "prediction must be one of"),
        ({"prediction": "epsilon"}, "pass alphas_cumprod"),
        ({"prediction": "epsilon", "alphas_cumprod": abar.flip(0)}, "strictly decreasing"),
        ({"prediction": "epsilon", "alphas_cumprod": torch.ones(10)}, "strictly decreasing"),
        ({"prediction": "epsilon", "alphas_cumprod": zero_snr}, "zero terminal SNR"),
        ({"prediction": "sample", "alphas_cumprod": torch.cat([torch.ones(1, dtype=DTYPE), abar])}, "starts at 1"),
        ({"prediction": "epsilon", "alphas_cumprod": abar * 2}, r"in \[0, 1\]"),
        ({"prediction": "epsilon", "alphas_cumprod": abar[:1]}, "1-D table"),
        ({"prediction": "epsilon", "alphas_cumprod": abar, "timestep_scale": 1.0}, "timestep_scale applies"),
        ({"prediction": "flow", "alphas_cumprod": abar}, "takes none"),
        ({"prediction": "flow", "timestep_scale": 0.0}, "timestep_scale must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            Teacher(identity, **kwargs)
    with pytest.raises(ValueError, match="learned variance"):
        Teacher(lambda x, ts: torch.cat([x, x], dim=1), "flow")(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(TypeError, match="expected a tensor"):
        Teacher(lambda x, ts: {"sample": x}, "flow")(torch.zeros(2, 3), torch.zeros(2))


def test_ode_solve_through_the_vp_adapter_lands_where_the_exact_flow_does():
    m, c = gaussian_data()
    teacher = Teacher(FakeVP(m, c, schedule("scaled_linear"), "epsilon", on_table=False), "epsilon",
                      alphas_cumprod=schedule("scaled_linear"))
    lo, hi = teacher.t_range
    x0 = torch.randn(B, 3, dtype=DTYPE)
    exact = GaussianFlowMap(m, c, sigma=1.0)
    start = (1 - lo) * x0  # the start state: x_{t_min} without its t_min x1 part
    s, t = torch.full((B,), lo, dtype=DTYPE), torch.full((B,), hi, dtype=DTYPE)
    solution = (start + (hi - lo) * exact(start, s, t)).detach()
    err = [float((ode_solve(teacher, x0, steps=n, method="heun") - solution).abs().max()) for n in (20, 40)]
    assert err[1] < 6e-4 and 3.2 < err[0] / err[1] < 4.8, err  # Heun's second order, to the exact endpoint
    # a two-time map sampled over the same range starts from the same state and lands there exactly
    exact.t_range = teacher.t_range
    torch.testing.assert_close(sample(exact, x0, steps=2), solution, rtol=1e-12, atol=1e-12)


def test_grids_outside_t_range_raise_unless_extrapolate():
    teacher = Teacher(FakeVP(*gaussian_data(), schedule("linear"), "sample", on_table=False), "sample",
                      alphas_cumprod=schedule("linear"))
    x0 = torch.randn(2, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="t_range"):
        ode_solve(teacher, x0, grid=[0.0, 0.5, teacher.t_range[1]])
    with pytest.raises(ValueError, match="t_range"):
        sample(GuidedTeacher(teacher, 1.0, {}), x0, grid=[0.5, 1.0])  # a two-time signature is never reached
    x = ode_solve(teacher, x0, grid=[0.0, 0.5, 0.99], extrapolate=True)
    assert torch.isfinite(x).all() and float(teacher.model.timesteps[0][0]) > 999  # extrapolated past the table


def test_guided_teacher_composes_and_keeps_the_range():
    m, c = gaussian_data()

    class Conditional(FakeFlow):
        def forward(self, sample, timestep, class_labels=None, return_dict=True):
            out = super().forward(sample, timestep, return_dict=return_dict)
            return SimpleNamespace(sample=out.sample + class_labels[:, None].to(DTYPE))

    teacher = Teacher(Conditional(m, c), "flow")
    guided = GuidedTeacher(teacher, 3.0, {"class_labels": torch.zeros(1, dtype=torch.long)})
    x, t, y = torch.randn(B, 3, dtype=DTYPE), torch.rand(B, dtype=DTYPE), torch.arange(B)
    torch.testing.assert_close(guided(x, t, class_labels=y), _exact()(x, t) - 3.0 * y[:, None].to(DTYPE), **TOL)
    vp = Teacher(torch.nn.Identity(), "v_prediction", alphas_cumprod=schedule("linear"))
    assert GuidedTeacher(vp, 2.0, {}).t_range == vp.t_range


def test_import_needs_no_diffusers(monkeypatch):
    """No module of the package imports diffusers at import time (only inside functions), and from_pretrained
    without diffusers says how to get it."""
    for path in Path(ttfm_kernels.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "diffusers" for n in names), path
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        Teacher.from_pretrained(".", prediction="flow")
