"""Data sets: built-in 2D toy distributions, the digits images, and a user's own points or images. Nothing downloads.

Every data set draws batches from an explicit ``torch.Generator``, so a run is reproducible and its data
position is the generator's state (saved in checkpoints). ``held_out(n, seed)`` gives evaluation points that
training never sees: fresh draws from a separate stream for the toy sets, a fixed split for stored data.

Images are float32 (N, C, H, W) in [-1, 1]. ``digits`` are scikit-learn's ``load_digits`` (1797 8x8 grey
images of the digits 0-9, shipped inside scikit-learn; the optional extra ``ttfm_kernels[images]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGE_DATASETS", "TOY_DATASETS", "ArrayData", "DigitsData", "PointData", "StoredData", "ToyData", "digits",
           "load_data"]

_Sampler = Callable[[int, torch.Generator], torch.Tensor]


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # 4 x 4 board on [-2, 2]^2, alternate squares filled.
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g) * 2.0
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1)


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    # Two interleaved half circles, centred and scaled to about unit spread.
    upper = torch.rand(n, generator=g) < 0.5
    a = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, torch.cos(a), 1 - torch.cos(a))
    y = torch.where(upper, torch.sin(a), 0.5 - torch.sin(a))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.0
    return pts + 0.1 * torch.randn(n, 2, generator=g)


def _spirals(n: int, g: torch.Generator) -> torch.Tensor:
    # Two arms of an Archimedean spiral, radius up to about 3.
    r = torch.sqrt(torch.rand(n, generator=g)) * 3.0
    arm = torch.randint(0, 2, (n,), generator=g) * math.pi
    a = r * 2.5 + arm
    pts = torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=1)
    return pts + 0.08 * torch.randn(n, 2, generator=g)


def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    # Eight narrow Gaussians evenly spaced on a circle of radius 2.
    k = torch.randint(0, 8, (n,), generator=g).float() * (2 * math.pi / 8)
    centres = torch.stack([torch.cos(k), torch.sin(k)], dim=1) * 2.0
    return centres + 0.1 * torch.randn(n, 2, generator=g)


def _rings(n: int, g: torch.Generator) -> torch.Tensor:
    # Four concentric rings, radii 0.5 .. 2, points spread in proportion to circumference.
    radii = torch.tensor([0.5, 1.0, 1.5, 2.0])
    idx = torch.multinomial(radii / radii.sum(), n, replacement=True, generator=g)
    a = torch.rand(n, generator=g) * 2 * math.pi
    r = radii[idx] + 0.05 * torch.randn(n, generator=g)
    return torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=1)


TOY_DATASETS: dict[str, _Sampler] = {
    "checkerboard": _checkerboard,
    "moons": _moons,
    "spirals": _spirals,
    "8gaussians": _eight_gaussians,
    "rings": _rings,
}


class PointData:
    """A distribution of points or images: ``sample(n, generator) -> (n, *shape)`` float32, ``held_out(n, seed)``.

    ``shape`` is one sample's shape: (D,) for points, (C, H, W) for images; ``dim`` = D for points, C * H * W
    for images. ``labels``-carrying sets (digits) also give ``train_labels`` / ``held_labels``.
    """

    name: str
    shape: tuple[int, ...]

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def held_out(self, n: int, seed: int) -> torch.Tensor:
        raise NotImplementedError


class ToyData(PointData):
    """One of ``TOY_DATASETS`` (2D). ``held_out`` draws from a stream seeded apart from training's."""

    def __init__(self, name: str):
        if name not in TOY_DATASETS:
            raise ValueError(f"unknown data set {name!r}; choose one of {', '.join([*TOY_DATASETS, *IMAGE_DATASETS])}, "
                             "or give a path to a .npy/.npz array of points (N, D) or images (N, C, H, W), or to "
                             "a folder of .png images")
        self.name, self.shape, self._fn = name, (2,), TOY_DATASETS[name]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._fn(n, generator)

    def held_out(self, n: int, seed: int) -> torch.Tensor:
        return self._fn(n, torch.Generator().manual_seed(10_007 + seed * 7919))


class StoredData(PointData):
    """Points (N, D) or images (N, C, H, W) held in memory with a fixed split.

    Training samples ``train`` with replacement; ``held_out(n, seed)`` is a seeded subset of ``held`` (all of it
    when n >= its size). ``train_labels`` / ``held_labels``: (N,) int64 class labels, or None.
    """

    def __init__(self, name: str, train: torch.Tensor, held: torch.Tensor, *,
                 train_labels: torch.Tensor | None = None, held_labels: torch.Tensor | None = None):
        self.name, self.train, self.held = name, train, held
        self.train_labels, self.held_labels = train_labels, held_labels
        self.shape = tuple(train.shape[1:])

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(self.train), (n,), generator=generator)
        return self.train[idx]

    def held_out(self, n: int, seed: int) -> torch.Tensor:
        if n >= len(self.held):
            return self.held.clone()
        idx = torch.randperm(len(self.held), generator=torch.Generator().manual_seed(seed))[:n]
        return self.held[idx]


class ArrayData(StoredData):
    """A user's data from a path: a ``.npy`` file or ``.npz`` archive, or a folder of ``.png`` images.

    Arrays: shape (N, D) (points) or (N, C, H, W) (images), N >= 10; a ``.npz`` must hold exactly one array, or
    one named "data". Float arrays are used as given (images are expected in [-1, 1]); uint8 images are
    mapped from [0, 255] to [-1, 1]. A folder: every ``*.png`` in it (not recursive), all of one size; grey
    images give C = 1, and if any image has colour all become RGB (C = 3; alpha is dropped), mapped from
    [0, 255] to [-1, 1]. The last 10% (at most 10,000 samples, after a fixed shuffle) is held out for
    evaluation; training samples the rest with replacement.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        arr = _read_png_folder(path) if path.is_dir() else self._read(path)
        perm = np.random.default_rng(0).permutation(len(arr))
        n_held = min(max(1, len(arr) // 10), 10_000)
        super().__init__(str(path), torch.from_numpy(arr[perm[n_held:]]), torch.from_numpy(arr[perm[:n_held]]))

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as e:  # numpy raises several types for a bad file
            raise ValueError(f"data file {path} is not a readable .npy/.npz array: {e}") from e
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = list(loaded.keys())
                if "data" in keys:
                    key = "data"
                elif len(keys) == 1:
                    key = keys[0]
                else:
                    raise ValueError(f"data file {path} holds arrays {keys}; name the points array 'data'")
                arr = loaded[key]
        else:
            arr = loaded
        if arr.ndim not in (2, 4) or arr.shape[0] < 10 or min(arr.shape[1:]) < 1:
            raise ValueError(f"data file {path} must hold an array of shape (N, D) (points) or (N, C, H, W) "
                             f"(images) with N >= 10, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"data file {path} must hold numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float32) / 127.5 - 1.0 if arr.dtype == np.uint8 and arr.ndim == 4 \
            else arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"data file {path} holds non-finite values (NaN or inf)")
        return arr


def _read_png_folder(folder: Path) -> np.ndarray:
    """Every ``*.png`` directly in ``folder`` as float32 (N, C, H, W) in [-1, 1] (see ``ArrayData``)."""
    try:
        from PIL import Image
    except ImportError as e:  # Pillow comes with matplotlib (the "demo" and "images" extras)
        raise ImportError("reading a folder of PNGs needs Pillow: pip install 'ttfm_kernels[images]'") from e
    files = sorted(folder.glob("*.png"))
    if len(files) < 10:
        raise ValueError(f"image folder {folder} must hold at least 10 .png files, found {len(files)}")
    images, sizes = [], {}
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except Exception as e:  # Pillow raises several types for a bad file
            raise ValueError(f"image {f} is not a readable PNG: {e}") from e
        sizes.setdefault(images[-1].size, f.name)
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h} ({name})" for (w, h), name in list(sizes.items())[:3])
        raise ValueError(f"images in {folder} must all have one size, found {shown}")
    grey = all(im.mode in ("1", "L", "LA", "I", "I;16") for im in images)
    mode = "L" if grey else "RGB"
    arr = np.stack([np.asarray(im.convert(mode), dtype=np.float32) for im in images])
    arr = arr[:, None] if grey else arr.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(arr / 127.5 - 1.0, dtype=np.float32)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data needs scikit-learn: pip install 'ttfm_kernels[images]'") from e
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits(size: int = 8, split: str = "train", seed: int = 0, *,
           return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as float32 (N, 1, size, size) in [-1, 1] (pixel value p in 0..16 -> p / 8 - 1).

    ``split``: "train" or "test", a fixed class-stratified half/half split (each class's images shuffled with
    ``seed``, the first half to "train": 901 train, 896 test), or "all" (1797, in sklearn's order).
    ``size``: 8 (the original pixels) or a larger multiple of 8, reached by bilinear upsampling
    (``F.interpolate(mode="bilinear", align_corners=False)``; 16 is the usual choice). ``return_labels=True``
    also returns the (N,) int64 digit labels.
    """
    if not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"size must be 8 or a larger multiple of 8 (e.g. 16), got {size!r}")
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    images, labels = _load_digits()
    if split != "all":
        rng = np.random.default_rng(seed)
        idx = []
        for c in range(10):
            members = rng.permutation(np.flatnonzero(labels == c))
            half = (len(members) + 1) // 2
            idx.append(members[:half] if split == "train" else members[half:])
        keep = np.sort(np.concatenate(idx))
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images)[:, None] / 8.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x, torch.from_numpy(labels)) if return_labels else x


class DigitsData(StoredData):
    """``digits(size)``: training samples the "train" half, ``held_out`` the "test" half; both with labels."""

    def __init__(self, size: int = 8, seed: int = 0):
        train, train_labels = digits(size, "train", seed, return_labels=True)
        held, held_labels = digits(size, "test", seed, return_labels=True)
        super().__init__("digits" if size == 8 else f"digits{size}", train, held, train_labels=train_labels,
                         held_labels=held_labels)


IMAGE_DATASETS: dict[str, int] = {"digits": 8, "digits16": 16}
"""Built-in image sets: name -> image size (``DigitsData``)."""


def load_data(spec: str) -> PointData:
    """A data set by name (``TOY_DATASETS``, ``IMAGE_DATASETS``) or by path (a .npy / .npz file, a folder of PNGs)."""
    if spec in TOY_DATASETS:
        return ToyData(spec)
    if spec in IMAGE_DATASETS:
        return DigitsData(IMAGE_DATASETS[spec])
    if spec.endswith((".npy", ".npz")) or Path(spec).exists():
        return ArrayData(spec)
    return ToyData(spec)  # raises the "unknown data set" error
