"""Checkpoints (docs/design.md, "Command line and files"): one complete file per save, written atomically.

A checkpoint is a dict with the keys in ``REQUIRED_KEYS``: model, EMA, optimizer and scheduler state dicts,
the step, the world size, the run's config and the library version. No RNG state: every draw is a function of
(seed, step, global sample index) (docs/design.md, "Many ranks"). It is written to a temporary file in the same
directory, flushed to disk and renamed over its final name, so a crash never leaves a partial checkpoint under a
real name. Files are ``ckpt_<step>.pt`` inside a run directory; ``latest_checkpoint`` picks the highest step.

FSDP2 runs write ``ckpt_<step>.dcp`` directories instead (``save_sharded``): the model, EMA and optimizer
through ``torch.distributed.checkpoint`` (each rank its shards), the rest in ``meta.pt``. ``load_checkpoint``
reads one in a single process as full tensors (the consolidation of ``torch.distributed.checkpoint.format_utils
.dcp_to_torch_save``), so ``ttfm sample`` / ``eval`` / ``load_model`` take it like a file;
``consolidate_checkpoint`` writes that single file.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from ttfm_kernels._version import __version__

__all__ = ["REQUIRED_KEYS", "CheckpointError", "checkpoint_path", "consolidate_checkpoint", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "load_sharded", "resolve_checkpoint", "save_checkpoint",
           "save_sharded"]

REQUIRED_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "world_size", "config", "version")
_NAME = re.compile(r"^ckpt_(\d+)\.(pt|dcp)$")
_SHARDED = ("model", "ema", "optimizer")
"""The entries an FSDP2 checkpoint stores through torch.distributed.checkpoint; the rest go to ``meta.pt``."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or incomplete."""


def checkpoint_path(run_dir: str | Path, step: int, *, sharded: bool = False) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.{'dcp' if sharded else 'pt'}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run directory's checkpoints (files, or FSDP2 directories), lowest step first (temporary ones are
    ignored)."""
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
    if path.is_dir() and not _NAME.match(path.name):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint (ckpt_*.pt) in directory {path}")
        return latest
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


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
        state = _read_sharded(path) if path.is_dir() else torch.load(path, map_location=map_location,
                                                                      weights_only=True)
    except Exception as e:  # truncated, corrupt or not a torch file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a ttfm checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a ttfm checkpoint (holds a {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    return state


def save_sharded(path: str | Path, sharded: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Collective (every rank calls it): write an FSDP2 checkpoint directory ``path`` atomically.

    ``sharded`` holds the ``_SHARDED`` entries (state dicts of DTensors: each rank writes its shards through
    ``torch.distributed.checkpoint``); ``meta`` the rest (rank 0 writes it to ``meta.pt``; ``version`` is filled
    in). Everything goes into a temporary directory that rank 0 renames once every rank has finished.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    meta = {**meta, "version": __version__}
    missing = [k for k in REQUIRED_KEYS if k not in meta and k not in sharded]
    if missing:
        raise CheckpointError(f"refusing to write an incomplete checkpoint: missing {missing}")
    tmp = path.with_name(f".{path.name}.tmp")
    dcp.save(sharded, checkpoint_id=tmp)
    if dist.get_rank() == 0:
        with (tmp / "meta.pt").open("wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    dist.barrier()
    return path


def load_sharded(path: str | Path, sharded: dict[str, Any]) -> dict[str, Any]:
    """Collective: load an FSDP2 checkpoint's shards into ``sharded`` (state dicts shaped like those saved, read
    in place) and return its ``meta.pt`` entries."""
    import torch.distributed.checkpoint as dcp

    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a single file (a DDP or one-process run), not an FSDP2 "
                              "checkpoint directory: resume it with --parallel ddp")
    meta = _read_meta(path)
    dcp.load(sharded, checkpoint_id=path)
    return meta


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # missing or truncated
        raise CheckpointError(f"checkpoint {path} is corrupt or not a ttfm checkpoint: {e}") from e


def _read_sharded(path: Path) -> dict[str, Any]:
    """An FSDP2 checkpoint directory as one state dict of full tensors, in this process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    return {**full, **_read_meta(path)}


def consolidate_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a checkpoint (an FSDP2 directory, or a file) as one complete ``ckpt`` file ``out``, in one process:
    the same file a one-process run writes, for sampling or sharing."""
    return save_checkpoint(out, load_checkpoint(path))
