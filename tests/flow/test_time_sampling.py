"""TimeSampler: s <= t in [0, 1], the triangle's moments, diagonal fraction, minimum gap, log-normal marginals."""

import pytest
import torch

from ttfm_kernels import TimeSampler

N = 20000


def test_uniform_on_the_triangle():
    s, t = TimeSampler()(N, dtype=torch.float64)
    assert s.shape == t.shape == (N,) and s.dtype == torch.float64
    assert (s <= t).all() and (s >= 0).all() and (t <= 1).all()
    # uniform on {0 <= s <= t <= 1}: E s = 1/3, E t = 2/3, P(s < 1/2 and t > 1/2) = 1/2
    assert abs(float(s.mean()) - 1 / 3) < 0.01 and abs(float(t.mean()) - 2 / 3) < 0.01
    assert abs(float(((s < 0.5) & (t > 0.5)).double().mean()) - 0.5) < 0.015


@pytest.mark.parametrize("marginal", ["uniform", "lognormal"])
def test_diagonal_fraction_and_min_gap(marginal):
    s, t = TimeSampler(marginal=marginal, diagonal=0.25, min_gap=0.1)(N)
    diag = s == t
    assert abs(float(diag.float().mean()) - 0.25) < 0.015
    assert (t[~diag] - s[~diag] >= 0.1 - 1e-6).all()
    assert (s >= 0).all() and (t <= 1).all()


def test_lognormal_marginal_concentrates_around_its_mean():
    t = TimeSampler(marginal="lognormal", mean=0.0, std=0.5).single(N)
    assert abs(float(t.median()) - 0.5) < 0.01 and float(t.std()) < 0.15
    s, t = TimeSampler(marginal="lognormal", mean=1.0)(N)
    assert (s <= t).all() and float(t.mean()) > 0.7


def test_bad_options_are_named():
    for kwargs, word in (({"marginal": "beta"}, "marginal"), ({"diagonal": 1.5}, "diagonal"),
                         ({"min_gap": 1.0}, "min_gap"), ({"std": 0.0}, "std")):
        with pytest.raises(ValueError, match=word):
            TimeSampler(**kwargs)


def test_generator_makes_draws_reproducible():
    sampler = TimeSampler(diagonal=0.5)
    first = sampler(8, generator=torch.Generator().manual_seed(3))
    second = sampler(8, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
