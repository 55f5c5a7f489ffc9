"""Data sets of points: built-in 2D toy distributions and a user's own ``.npy`` / ``.npz`` array. Nothing downloads.

Every data set draws batches from an explicit ``torch.Generator``, so a run is reproducible and its data
position is the generator's state (saved in checkpoints). ``held_out(n, seed)`` gives evaluation points that
training never sees: fresh draws from a separate stream for the toy sets, a fixed split for arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = ["TOY_DATASETS", "ArrayData", "PointData", "ToyData", "load_data"]

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
    """A distribution of points in R^dim: ``sample(n, generator) -> (n, dim)`` float32, ``held_out(n, seed)``."""

    name: str
    dim: int

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def held_out(self, n: int, seed: int) -> torch.Tensor:
        raise NotImplementedError


class ToyData(PointData):
    """One of ``TOY_DATASETS`` (2D). ``held_out`` draws from a stream seeded apart from training's."""

    def __init__(self, name: str):
        if name not in TOY_DATASETS:
            raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(TOY_DATASETS)}, "
                             "or give a path to a .npy/.npz array of points")
        self.name, self.dim, self._fn = name, 2, TOY_DATASETS[name]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._fn(n, generator)

    def held_out(self, n: int, seed: int) -> torch.Tensor:
        return self._fn(n, torch.Generator().manual_seed(10_007 + seed * 7919))


class ArrayData(PointData):
    """A user's points from a ``.npy`` file or a ``.npz`` archive: an array of shape (N, D), N >= 10.

    A ``.npz`` must hold exactly one array, or one named "data". The last 10% (at most 10,000 points, after a
    fixed shuffle) is held out for evaluation; training samples the rest with replacement.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        self.name = str(path)
        arr = self._read(path)
        perm = np.random.default_rng(0).permutation(len(arr))
        n_held = min(max(1, len(arr) // 10), 10_000)
        self._train = torch.from_numpy(arr[perm[n_held:]])
        self._held = torch.from_numpy(arr[perm[:n_held]])
        self.dim = arr.shape[1]

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
        if arr.ndim != 2 or arr.shape[0] < 10 or arr.shape[1] < 1:
            raise ValueError(f"data file {path} must hold an array of shape (N, D) with N >= 10, "
                             f"got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"data file {path} must hold numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"data file {path} holds non-finite values (NaN or inf)")
        return arr

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(self._train), (n,), generator=generator)
        return self._train[idx]

    def held_out(self, n: int, seed: int) -> torch.Tensor:
        if n >= len(self._held):
            return self._held.clone()
        idx = torch.randperm(len(self._held), generator=torch.Generator().manual_seed(seed))[:n]
        return self._held[idx]


def load_data(spec: str) -> PointData:
    """A data set by name (``TOY_DATASETS``) or by the path of a ``.npy`` / ``.npz`` file."""
    if spec in TOY_DATASETS:
        return ToyData(spec)
    if spec.endswith((".npy", ".npz")) or Path(spec).exists():
        return ArrayData(spec)
    return ToyData(spec)  # raises the "unknown data set" error
