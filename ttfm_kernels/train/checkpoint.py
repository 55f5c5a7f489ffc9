"""Checkpoints (docs/design.md, "Command line and files"): one complete file per save, written atomically.

A checkpoint is a dict with the keys in ``REQUIRED_KEYS``: model, EMA, optimizer and scheduler state dicts,
the step, the RNG states (torch, numpy, python), the data position (the data generator's state), the run's
config and the library version. It is written to a temporary file in the same directory, flushed to disk and
renamed over its final name, so a crash never leaves a partial checkpoint under a real name. Files are
``ckpt_<step>.pt`` inside a run directory; ``latest_checkpoint`` picks the highest step.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttfm_kernels._version import __version__

__all__ = ["REQUIRED_KEYS", "CheckpointError", "capture_rng", "checkpoint_path", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "resolve_checkpoint", "restore_rng", "save_checkpoint"]

REQUIRED_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "rng", "data_position", "config", "version")
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or incomplete."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run directory's checkpoint files, lowest step first (temporary files are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    files = list_checkpoints(run_dir)
    return files[-1] if files else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's latest checkpoint; a clear error when there is none."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint (ckpt_*.pt) in directory {path}")
        return latest
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def capture_rng() -> dict[str, Any]:
    """The global RNG states of torch (CPU and, when present, CUDA), numpy and python ``random``."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (must hold every key in ``REQUIRED_KEYS``; ``version`` is filled in) atomically to ``path``."""
    state = {**state, "version": __version__}
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"refusing to write an incomplete checkpoint: missing {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint file (or a run directory's latest); ``CheckpointError`` when unusable."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt or not a torch file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a ttfm checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a ttfm checkpoint (holds a {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    return state
