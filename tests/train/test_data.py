"""Data sets: the 2D toys, the digits images, a user's .npy/.npz array or folder of PNGs."""

import numpy as np
import pytest
import torch

from ttfm_kernels.train.data import TOY_DATASETS, ArrayData, digits, load_data


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
    (lambda p: np.save(p, np.zeros(50)), r"shape \(N, D\) \(points\) or \(N, C, H, W\)"),
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


def test_digits_shape_range_and_fixed_stratified_split():
    train, ytrain = digits(8, "train", return_labels=True)
    test, ytest = digits(8, "test", return_labels=True)
    assert train.shape == (901, 1, 8, 8) and test.shape == (896, 1, 8, 8) and train.dtype == torch.float32
    assert float(train.min()) == -1.0 and float(train.max()) == 1.0  # pixel values 0..16 -> p / 8 - 1
    assert torch.equal(digits(8, "train"), train)  # fixed: the same call gives the same split
    counts = torch.bincount(torch.cat([ytrain, ytest]), minlength=10)
    assert torch.equal(torch.bincount(ytrain, minlength=10), (counts + 1) // 2)  # half of each class
    all_x = digits(8, "all")
    rows = {tuple(r) for r in all_x.flatten(1).tolist()}
    assert len(rows) > 1700 and all(tuple(r) in rows for r in test.flatten(1).tolist())
    assert not torch.equal(digits(8, "train", seed=1), train)


def test_digits_16_is_bilinear_upsampling_of_8():
    x8, x16 = digits(8, "test"), digits(16, "test")
    assert x16.shape == (896, 1, 16, 16)
    torch.testing.assert_close(x16, torch.nn.functional.interpolate(x8, size=(16, 16), mode="bilinear",
                                                                    align_corners=False))
    assert float(x16.min()) >= -1.0 and float(x16.max()) <= 1.0
    data = load_data("digits16")
    assert data.shape == (1, 16, 16) and data.is_image and data.sample(5, torch.Generator()).shape == (5, 1, 16, 16)


@pytest.mark.parametrize("kwargs, match", [({"size": 12}, "multiple of 8"), ({"split": "val"}, "split must be")])
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits(**kwargs)


def test_user_images_npy_and_uint8_scaling(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(40, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", imgs)
    data = load_data(str(tmp_path / "imgs.npy"))
    assert data.shape == (3, 8, 8) and data.is_image and len(data.held) == 4
    allx = torch.cat([data.train, data.held])
    assert float(allx.min()) >= -1.0 and float(allx.max()) <= 1.0
    assert sorted(allx.flatten().tolist()) == sorted((imgs.astype(np.float32) / 127.5 - 1).flatten().tolist())


def _pngs(folder, sizes, modes):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (size, mode) in enumerate(zip(sizes, modes, strict=True)):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(folder / f"{i:02d}.png")


def test_png_folder_grey_and_colour(tmp_path):
    _pngs(tmp_path / "grey", [8] * 12, ["L"] * 12)
    data = load_data(str(tmp_path / "grey"))
    assert data.shape == (1, 8, 8) and len(data.train) + len(data.held) == 12
    _pngs(tmp_path / "mixed", [8] * 12, ["L"] * 11 + ["RGB"])
    assert load_data(str(tmp_path / "mixed")).shape == (3, 8, 8)  # one colour image makes every image RGB


def test_png_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"at least 10 \.png files, found 0"):
        load_data(str(tmp_path / "empty"))
    _pngs(tmp_path / "sizes", [8] * 11 + [16], ["L"] * 12)
    with pytest.raises(ValueError, match=r"one size, found 8x8 \(00.png\), 16x16 \(11.png\)"):
        load_data(str(tmp_path / "sizes"))
    _pngs(tmp_path / "bad", [8] * 12, ["L"] * 12)
    (tmp_path / "bad" / "05.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"05\.png is not a readable PNG"):
        load_data(str(tmp_path / "bad"))
