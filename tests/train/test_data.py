"""Data sets: the 2D toys and a user's .npy/.npz array."""

import numpy as np
import pytest
import torch

from ttfm_kernels.train.data import TOY_DATASETS, ArrayData, load_data


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_sets_are_2d_finite_spread_and_reproducible(name):
    data = load_data(name)
    a = data.sample(2000, torch.Generator().manual_seed(3))
    b = data.sample(2000, torch.Generator().manual_seed(3))
    assert a.shape == (2000, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(a.std(dim=0).min()) > 0.3 and float(a.abs().max()) < 4.5  # about unit scale, like N(0, I)
    held = data.held_out(500, seed=0)
    assert held.shape == (500, 2) and not torch.equal(held, a[:500])


def test_checkerboard_fills_alternate_squares_only():
    x = load_data("checkerboard").sample(5000, torch.Generator().manual_seed(0))
    parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2
    assert parity.eq(0).all() or parity.eq(1).all()


def test_unknown_name_is_clear():
    with pytest.raises(ValueError, match=r"unknown data set 'chekerboard'.*checkerboard"):
        load_data("chekerboard")


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_user_array_split_and_sampling(tmp_path, suffix):
    pts = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float64)
    path = tmp_path / f"pts{suffix}"
    np.save(path, pts) if suffix == ".npy" else np.savez(path, data=pts, other=np.zeros(3))
    data = load_data(str(path))
    assert isinstance(data, ArrayData) and data.dim == 3
    held = data.held_out(1000, seed=0)
    assert held.shape == (20, 3) and held.dtype == torch.float32
    batch = data.sample(64, torch.Generator().manual_seed(0))
    rows = {tuple(r) for r in pts.astype(np.float32).tolist()}
    assert all(tuple(r) in rows for r in batch.tolist())
    held_rows = {tuple(r) for r in held.tolist()}
    assert not any(tuple(r) in held_rows for r in data.sample(2000, torch.Generator().manual_seed(1)).tolist())


@pytest.mark.parametrize("make, match", [
    (lambda p: np.save(p, np.zeros(50)), r"shape \(N, D\)"),
    (lambda p: np.save(p, np.full((50, 2), np.nan)), "non-finite"),
    (lambda p: np.save(p, np.array([["a", "b"]] * 20)), "numbers"),
    (lambda p: p.write_bytes(b"not an array"), "not a readable"),
])
def test_malformed_arrays_are_rejected(tmp_path, make, match):
    path = tmp_path / "bad.npy"
    make(path)
    with pytest.raises(ValueError, match=match):
        load_data(str(path))


def test_npz_with_several_unnamed_arrays_and_missing_file(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((20, 2)), b=np.zeros((20, 2)))
    with pytest.raises(ValueError, match="name the points array 'data'"):
        load_data(str(tmp_path / "two.npz"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(str(tmp_path / "missing.npy"))
