"""sample / flow_map / ode_solve on the analytic Gaussian case, where the exact map is known."""

import pytest
import torch

from tests.flow_models import DTYPE, TwoTimeNet, gaussian_case
from ttfm_kernels import flow_map, ode_solve, sample
from ttfm_kernels.flow import time_grid


@pytest.mark.parametrize("sigma", [1.0, 0.7])
def test_one_step_sample_is_the_exact_solution_and_composes(sigma):
    teacher, exact = gaussian_case(sigma=sigma)
    x0 = sigma * torch.randn(8, 3, dtype=DTYPE)
    solution = teacher.mu + teacher.sd / sigma * x0  # X_{0,1}(x0) = mu + (a_1 / a_0) x0
    torch.testing.assert_close(sample(exact, x0, steps=1), solution, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample(exact, x0, steps=4), solution, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample(exact, x0, grid=[0.0, 0.1, 0.5, 1.0]), solution, rtol=1e-12, atol=1e-12)
    mid = flow_map(exact, x0, 0.0, 0.3)
    torch.testing.assert_close(flow_map(exact, mid, 0.3, 1.0), solution, rtol=1e-12, atol=1e-12)


def test_ode_solve_converges_to_the_exact_solution_at_its_order():
    teacher, _ = gaussian_case()
    x0 = torch.randn(8, 3, dtype=DTYPE)
    solution = teacher.mu + teacher.sd * x0
    for method, order in (("euler", 1), ("heun", 2)):
        err = [float((ode_solve(teacher, x0, steps=n, method=method) - solution).abs().max()) for n in (20, 40)]
        assert 2**order * 0.8 < err[0] / err[1] < 2**order * 1.2, (method, err)


def test_noise_drawn_from_a_shape_uses_sigma():
    _, exact = gaussian_case(sigma=0.25)
    x = sample(exact, (4000, 3), steps=1, generator=torch.Generator().manual_seed(0))
    assert x.dtype == DTYPE
    x0 = (x - exact.mu) / (exact.sd / 0.25)  # invert the exact map: the draws' noise
    assert abs(float(x0.std()) - 0.25) < 0.01


def test_sample_passes_conditioning_and_keeps_no_graph():
    model = TwoTimeNet(3)
    y = torch.tensor([0, 1])
    x = sample(model, torch.randn(2, 3, dtype=DTYPE), steps=3, y=y)
    assert not x.requires_grad
    assert len(model.calls) == 3 and all(c is y for c in model.calls)


def test_time_grid_rejects_bad_grids():
    assert time_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="grid"):
        time_grid(2, [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="method"):
        ode_solve(gaussian_case()[0], torch.zeros(1, 3, dtype=DTYPE), method="rk4")
