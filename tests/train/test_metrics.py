"""Metrics: teacher-match RMSE, sliced W2, 2D histogram KL."""

import math

import pytest
import torch

from ttfm_kernels.train.metrics import histogram_kl, sliced_w2, teacher_match_rmse


def test_teacher_match_rmse_is_root_mean_squared_point_distance():
    a = torch.zeros(4, 2)
    b = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert teacher_match_rmse(a, b) == pytest.approx(math.sqrt(25 / 4))
    with pytest.raises(ValueError, match="paired"):
        teacher_match_rmse(a, b[:3])


def test_sliced_w2_zero_for_equal_sets_and_shift_for_translates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g)
    assert sliced_w2(x, x[torch.randperm(2000, generator=g)]) == pytest.approx(0.0, abs=1e-12)
    # a translate by c: projected W2^2 = (c . theta)^2, whose mean over unit directions in 2D is |c|^2 / 2
    c = torch.tensor([3.0, 0.0])
    assert sliced_w2(x, x + c, num_projections=1024) == pytest.approx(3.0 / math.sqrt(2), rel=0.03)
    # different sizes work (quantile matching)
    assert sliced_w2(x, (x + c)[:500], num_projections=1024) == pytest.approx(3.0 / math.sqrt(2), rel=0.05)
    with pytest.raises(ValueError, match="same dimension"):
        sliced_w2(x, torch.zeros(5, 3))


def test_histogram_kl_zero_for_same_points_large_for_disjoint():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5000, 2, generator=g)
    assert histogram_kl(x, x, bins=16) == pytest.approx(0.0, abs=1e-12)
    near = histogram_kl(x, torch.rand(5000, 2, generator=g), bins=16)
    far = histogram_kl(x, torch.rand(5000, 2, generator=g) + 5, bins=16, extent=(0.0, 1.0))  # every sample off the grid
    assert 0 < near < 0.1 and far == pytest.approx(math.log(1e6) - math.log(16 * 16), rel=0.01)  # log(1/floor) - H(p)
    with pytest.raises(ValueError, match="2D"):
        histogram_kl(torch.zeros(5, 3), torch.zeros(5, 3))
