"""t_range in the time sampler and the sampling grids: draws and grids stay inside the teacher's range."""

import pytest
import torch

from tests.flow_models import TwoTimeNet
from ttfm_kernels import EMA, TimeSampler, sample
from ttfm_kernels.flow import time_grid
from ttfm_kernels.flow.time_sampling import check_in_range, t_range_of

RANGE = (0.0063, 0.99)
N = 20000


@pytest.mark.parametrize("marginal", ["uniform", "lognormal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draws_stay_inside_the_range_with_the_gap_in_time(marginal, dtype):
    sampler = TimeSampler(marginal=marginal, diagonal=0.1, min_gap=0.2)
    s, t = sampler(N, dtype=dtype, t_range=RANGE)
    lo, hi = (torch.tensor(v, dtype=dtype) for v in RANGE)
    assert (s >= lo).all() and (t <= hi).all() and (s <= t).all()
    off = s != t
    assert (t[off] - s[off] >= 0.2 - 1e-6).all()
    single = sampler.single(N, dtype=dtype, t_range=RANGE)
    assert (single >= lo).all() and (single <= hi).all()
    if marginal == "uniform":  # the affine image of the triangle: E s = lo + w/3 at no gap
        s0, t0 = TimeSampler()(N, dtype=dtype, t_range=RANGE)
        w = RANGE[1] - RANGE[0]
        assert abs(float(s0.mean()) - (RANGE[0] + w / 3)) < 0.01 and float(t0.max()) > RANGE[1] - 0.01


def test_default_range_draws_are_unchanged():
    a = TimeSampler()(8, generator=torch.Generator().manual_seed(1))
    b = TimeSampler()(8, generator=torch.Generator().manual_seed(1), t_range=(0.0, 1.0))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_bad_ranges_and_gaps_are_named():
    with pytest.raises(ValueError, match="t_min < t_max"):
        TimeSampler()(4, t_range=(0.5, 0.5))
    with pytest.raises(ValueError, match="pair"):
        t_range_of(type("M", (), {"t_range": 0.5})())
    with pytest.raises(ValueError, match="min_gap"):
        TimeSampler(min_gap=0.5)(4, t_range=(0.2, 0.6))
    with pytest.raises(ValueError, match="outside the teacher's t_range"):
        check_in_range("t", torch.tensor([0.5, 0.995]), RANGE, extrapolate=False)
    check_in_range("t", torch.tensor([0.5, 0.995]), RANGE, extrapolate=True)
    check_in_range("t", torch.tensor([RANGE[1]], dtype=torch.float32), RANGE, extrapolate=False)  # rounded bound


def test_uniform_grid_spans_the_range():
    grid = time_grid(3, t_range=RANGE)
    assert grid[0] == RANGE[0] and grid[-1] == RANGE[1] and len(grid) == 4
    assert grid[1] == pytest.approx(RANGE[0] + (RANGE[1] - RANGE[0]) / 3)
    assert time_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="extrapolate=True"):
        time_grid(1, [0.0, 1.0], RANGE)
    assert time_grid(1, [0.0, 1.0], RANGE, extrapolate=True) == [0.0, 1.0]


def test_ema_of_a_ranged_model_samples_inside_its_range():
    student, times = TwoTimeNet(3), []
    student.t_range = RANGE
    ema = EMA(student)
    ema.module.register_forward_pre_hook(lambda module, args: times.append(args[1:3]))
    sample(ema, torch.randn(2, 3, dtype=torch.float64), steps=2)
    assert ema.t_range == RANGE
    assert [(float(s[0]), float(t[0])) for s, t in times] == [(RANGE[0], time_grid(2, t_range=RANGE)[1]),
                                                             (time_grid(2, t_range=RANGE)[1], RANGE[1])]
