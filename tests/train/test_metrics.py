"""Metrics: teacher-match RMSE, sliced W2, 2D histogram KL, Frechet distance, mode coverage, the digits classifier."""

import itertools
import math

import pytest
import torch

from ttfm_kernels.train.data import load_data
from ttfm_kernels.train.metrics import (
    coverage_kl,
    frechet_distance,
    histogram_kl,
    sliced_w2,
    teacher_match_rmse,
    train_classifier,
)
from ttfm_kernels.train.runs import KL_PROTOCOL


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


def test_frechet_zero_for_identical_sets_and_exact_for_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a[torch.randperm(3000, generator=g)]) == pytest.approx(0.0, abs=1e-9)
    # a shift c adds |c|^2; scaling by k gives (1 - k)^2 (|mu|^2 + tr(S)): tr(S + k^2 S - 2 k S) plus the mean term
    c = torch.full((8,), 0.5, dtype=torch.float64)
    assert frechet_distance(a, a + c) == pytest.approx(float(c.pow(2).sum()), rel=1e-9)
    tr = float(torch.trace(torch.cov(a.T)) + a.mean(0).pow(2).sum())
    assert frechet_distance(a, 3 * a) == pytest.approx(4 * tr, rel=1e-9)
    with pytest.raises(ValueError, match="same feature dimension"):
        frechet_distance(a, a[:, :3])
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(a[:1], a)


def test_coverage_kl_uniform_zero_collapse_log_k():
    assert coverage_kl(torch.arange(100) % 10) == pytest.approx(0.0, abs=1e-12)
    assert coverage_kl(torch.full((50,), 3)) == pytest.approx(math.log(10))
    assert coverage_kl(torch.tensor([0, 1] * 10)) == pytest.approx(math.log(5))
    with pytest.raises(ValueError, match="integer"):
        coverage_kl(torch.zeros(4))
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        coverage_kl(torch.tensor([12]))


def test_2d_kl_protocol_floor_is_near_zero():
    """The KL_PROTOCOL setting: two independent draws of the checkerboard score below 0.02 (the old
    64x64-bin, 4096-sample KL gives about 0.77 on the same data)."""
    data = load_data("checkerboard")
    n, bins = KL_PROTOCOL["n"], KL_PROTOCOL["bins"]
    a, b = data.held_out(n, 0), data.held_out(n, 1)
    floor = histogram_kl(a, b, bins=bins)
    old = histogram_kl(a[:4096], b[:4096])
    assert 0 < floor < 0.02 and old > 0.5


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    """Trained on one thread: two spinning threads made it many times slower on a loaded 2-core machine."""
    cache = tmp_path_factory.mktemp("clf") / "classifier.pt"
    data = load_data("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clf, acc = train_classifier(data.train, data.train_labels, data.held, data.held_labels, seed=0, cache=cache)
    finally:
        torch.set_num_threads(threads)
    return data, clf, acc, cache


def test_digits_classifier_accuracy_floor_and_cache(digits_classifier):
    data, clf, acc, cache = digits_classifier
    assert acc > 0.93  # held-out accuracy of the Frechet / coverage features (measured 0.974 at seed 0)
    state = torch.get_rng_state()
    again, acc2 = train_classifier(data.train, data.train_labels, data.held, data.held_labels, seed=0, cache=cache)
    assert acc2 == acc and torch.equal(state, torch.get_rng_state())  # loaded from the cache, RNG untouched
    for p, q in zip(clf.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_frechet_in_classifier_features_grows_with_noise(digits_classifier):
    data, clf, _, _ = digits_classifier
    held, _ = clf.embed(data.held)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(data.train.shape, generator=g)
    fd = [frechet_distance(clf.embed((data.train + std * noise).clamp(-1, 1))[0], held)
          for std in (0.0, 0.1, 0.3, 0.6)]
    assert fd[0] > 0 and all(b > a for a, b in itertools.pairwise(fd)) and fd[-1] > 10 * fd[0], fd
