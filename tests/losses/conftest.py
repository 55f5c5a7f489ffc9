"""Shared fixtures of the loss tests: one analytic Gaussian batch (float64)."""

import pytest
import torch

from tests.flow_models import gaussian_case
from ttfm_kernels import TimeSampler

B = 32


@pytest.fixture(params=[1.0, 0.7], ids=["sigma1", "sigma0.7"])
def gaussian(request):
    """(teacher, exact map, perturbed map, batch kwargs x0/s/t, x1) of the analytic case."""
    sigma = request.param
    teacher, exact = gaussian_case(sigma=sigma)
    _, perturbed = gaussian_case(sigma=sigma, perturb=0.1)
    x1 = teacher.sample(B)
    s, t = TimeSampler()(B, dtype=torch.float64)
    return teacher, exact, perturbed, {"x0": sigma * torch.randn_like(x1), "s": s, "t": t}, x1
