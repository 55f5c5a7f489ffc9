"""The training loop shared by teacher training and distillation.

AdamW with linear warm-up then cosine decay (to ``final_lr_fraction`` of the peak), gradient clipping, an EMA
of the weights, progress on stderr (a tqdm bar on a terminal; otherwise ``PlainProgress``: one plain line every
5% of the steps or 30 s, so a log file holds no carriage-return updates), JSON-lines logs (``log.jsonl``), atomic
complete checkpoints every ``ckpt_every`` steps and at the end, exact resume (bitwise-equal parameters with the
same thread count and world size) and deterministic seeding. A non-finite loss or gradient stops the run with
``TrainingDiverged`` before the optimizer step, so the last good checkpoint stays the newest one on disk.

Randomness (docs/design.md, "Many ranks"): at step k the whole global batch of ``batch_size`` draws (data,
noise, times: what ``draw`` returns) comes from a generator seeded by ``step_seed(seed, k)``; rank r of W keeps
the global samples [r B / W, (r + 1) B / W). The global torch RNG (used only by randomness inside a model) is
reseeded every step from (seed, k, rank). So a W-rank run draws the samples of a one-rank run with the same
global batch, and the step alone positions a resumed run.

Many ranks (``parallel``, ``ttfm_kernels.train.parallel``): ``model`` is the wrapped student, its gradients
averaged by DDP or FSDP2; rank 0 logs and shows progress; stats are averaged over ranks only on log steps. DDP
checkpoints are one file written by rank 0; FSDP2 ones are sharded ``torch.distributed.checkpoint`` directories.
``TTFM_FAULT_AT_STEP=k`` in the environment makes rank 0 SIGKILL itself (and so the torchrun job) right after
the step-k checkpoint: a deterministic crash for testing resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ttfm_kernels.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_sharded,
    save_checkpoint,
    save_sharded,
)
from ttfm_kernels.train.data import PointData
from ttfm_kernels.train.parallel import Parallel

__all__ = ["Draw", "LossFn", "PlainProgress", "TrainConfig", "Trainer", "TrainingDiverged", "seed_everything",
           "step_seed"]

LossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]
"""``loss_fn(model, ema, **batch) -> (loss, stats)``: ``batch`` is this rank's part of what ``Draw`` returned
(at least ``x1``, a (B / W, ...) batch of data, points or images); stats maps names to 0-dim tensors (as the
losses return them) or numbers, converted to Python numbers only when a log line is written."""

Draw = Callable[[int, torch.Generator], dict[str, torch.Tensor]]
"""``draw(n, generator) -> {name: (n, ...) tensor}``: the random inputs of one global batch of n samples (data,
noise, times), every one from ``generator`` in a fixed order, sample i of each tensor belonging to global
sample i."""

FAULT_ENV = "TTFM_FAULT_AT_STEP"


class PlainProgress:
    """Progress for a stream that is not a terminal: ``desc: step/total (pct%) elapsed, postfix`` lines.

    A line is written when the step count crosses the next multiple of ``every_percent`` % of ``total``, or
    when ``every_s`` seconds passed since the last line, and at ``close`` if steps were made since the last
    line. Same ``update`` / ``set_postfix`` / ``close`` calls as the tqdm bar it replaces.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", stream: TextIO | None = None,
                 every_percent: float = 5.0, every_s: float = 30.0) -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.stream = stream if stream is not None else sys.stderr
        self.every_steps = max(1, math.ceil(total * every_percent / 100))
        self.every_s, self.postfix = every_s, ""
        self._start = self._last_t = time.perf_counter()
        self._last_n = initial

    def set_postfix(self, **values: object) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n // self.every_steps > self._last_n // self.every_steps or now - self._last_t >= self.every_s:
            self._write(now)

    def _write(self, now: float) -> None:
        pct = 100.0 * self.n / max(self.total, 1)
        tail = f", {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%) {now - self._start:.0f}s{tail}\n")
        self.stream.flush()
        self._last_t, self._last_n = now, self.n

    def close(self) -> None:
        if self.n != self._last_n:
            self._write(time.perf_counter())


def _progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm | PlainProgress:
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, initial=initial, desc=desc)
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the run stopped before the bad step touched the weights."""


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings of one run (stored in every checkpoint)."""

    steps: int = 2000
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    keep: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def step_seed(seed: int, step: int, rank: int | None = None) -> int:
    """The 63-bit seed of step ``step``'s draws in run ``seed`` (a hash, so nearby seeds and steps give unrelated
    streams); with ``rank``, the seed of that rank's global torch RNG during the step."""
    key = f"ttfm:{seed}:{step}" + ("" if rank is None else f":{rank}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Runs ``loss_fn`` on batches of ``data`` for ``config.steps`` steps, saving into ``out_dir``.

    ``ema`` is an ``ttfm_kernels.EMA``-like module (``update(model)``, ``state_dict``); ``run_config`` is any
    JSON-able dict describing the run (model class and arguments, data, loss ...), stored in checkpoints.
    ``draw`` gives each global batch's random inputs (default: ``{"x1": data.sample(n, generator)}``);
    ``parallel`` is this process's place in a many-rank run (``model`` then is the wrapped student and
    ``config.batch_size`` the global batch, which must divide by the world size).
    """

    def __init__(self, model: nn.Module, ema: nn.Module, loss_fn: LossFn, data: PointData, config: TrainConfig,
                 out_dir: str | Path, *, run_config: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                 progress: bool = True, desc: str = "train", draw: Draw | None = None,
                 parallel: Parallel | None = None):
        self.model, self.ema, self.loss_fn, self.data, self.cfg = model, ema, loss_fn, data, config
        self.out_dir = Path(out_dir)
        self.run_config = {**(run_config or {}), "train": dataclasses.asdict(config)}
        self.device = torch.device(device)
        self.parallel = parallel if parallel is not None else Parallel(device=self.device)
        self.local = self.parallel.local_slice(config.batch_size)
        self.progress, self.desc = progress and self.parallel.main, desc
        self.draw = draw if draw is not None else (lambda n, g: {"x1": data.sample(n, g)})
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: _lr_factor(k, self.cfg))
        self.step = 0
        self.step_times: list[float] = []

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.jsonl"

    @property
    def sharded(self) -> bool:
        return self.parallel.kind == "fsdp"

    def _meta(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "step": self.step, "world_size": self.parallel.world_size,
                "config": self.run_config}

    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model), "ema": self.ema.state_dict(),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}

    def save(self) -> Path:
        """Write the step's checkpoint (FSDP2: collective; otherwise rank 0 only) and drop all but the last
        ``keep``."""
        path = checkpoint_path(self.out_dir, self.step, sharded=self.sharded)
        if self.sharded:
            save_sharded(path, self._sharded_state(), self._meta())
        elif self.parallel.main:
            save_checkpoint(path, {"model": self.parallel.unwrap(self.model).state_dict(),
                                   "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                                   **self._meta()})
        if self.parallel.main:
            for old in list_checkpoints(self.out_dir)[:-self.cfg.keep]:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        return path

    def _resume(self) -> Path:
        path = latest_checkpoint(self.out_dir)
        if path is None:
            raise CheckpointError(f"--resume given but {self.out_dir} holds no checkpoint (ckpt_*)")
        if path.is_dir() != self.sharded:
            written = "an FSDP2 run (--parallel fsdp)" if path.is_dir() else "a one-process or DDP run"
            raise CheckpointError(f"checkpoint {path} was written by {written}: resume it the same way")
        state = load_sharded(path, sharded := self._sharded_state()) if self.sharded else load_checkpoint(path)
        world = int(state["world_size"])
        if world != self.parallel.world_size:
            raise CheckpointError(f"checkpoint {path} was written by a run on {world} rank(s), this one has "
                                  f"{self.parallel.world_size}: resume on {world} (exact resume needs the same "
                                  "world size), or start a new run in another output directory")
        differ = [f"{k}: {state['config'].get(k)!r} in the checkpoint, {v!r} now" for k, v in self.run_config.items()
                  if k != "train" and state["config"].get(k) != v]
        if differ:
            raise CheckpointError(f"checkpoint {path} belongs to a different run ({'; '.join(differ)}); resume it "
                                  "with the same settings, or choose another output directory")
        try:
            if self.sharded:
                from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

                set_model_state_dict(self.model, sharded["model"])
                self.ema.load_state_dict(sharded["ema"])
                set_optimizer_state_dict(self.model, self.optimizer, sharded["optimizer"])
            else:
                self.parallel.unwrap(self.model).load_state_dict(state["model"])
                self.ema.load_state_dict(state["ema"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model/run: {e}") from e
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if self.parallel.main:
            self._truncate_log(self.step)
        return path

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        if not self.log_path.exists():
            return
        lines = self.log_path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.log_path.write_text("".join(kept))

    def _log(self, record: dict[str, Any]) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _batch(self) -> dict[str, torch.Tensor]:
        """This rank's part of the step's global batch, on the device; reseeds the global RNG for the step."""
        torch.manual_seed(step_seed(self.cfg.seed, self.step, self.parallel.rank))
        drawn = self.draw(self.cfg.batch_size, torch.Generator().manual_seed(step_seed(self.cfg.seed, self.step)))
        return {k: v[self.local].to(self.device) for k, v in drawn.items()}

    def fit(self, *, resume: bool = False) -> dict[str, Any]:
        """Train to ``config.steps``; returns a summary (final loss, mean seconds per step, last checkpoint)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model.to(self.device).train()
        if resume:
            self._resume()
        else:
            if list_checkpoints(self.out_dir):
                raise CheckpointError(f"{self.out_dir} already holds checkpoints; pass --resume to continue that "
                                      "run, or choose another output directory (nothing was overwritten)")
            seed_everything(self.cfg.seed)
            if self.parallel.main:
                self.log_path.write_text("")
        fault = int(os.environ.get(FAULT_ENV, -1))
        bar = _progress_bar(self.cfg.steps, self.step, self.desc, self.progress)
        window_t, window_n, last = time.perf_counter(), 0, {}
        try:
            while self.step < self.cfg.steps:
                t0 = time.perf_counter()
                loss, stats = self.loss_fn(self.model, self.ema, **self._batch())
                # one rank alone must not stop (the others would wait in the gradient all-reduce): with many
                # ranks a non-finite loss shows as a non-finite averaged gradient norm, the same on every rank
                if not self.parallel.distributed and not torch.isfinite(loss):
                    self._diverged(f"the loss became {loss.item()}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = _full(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
                if not torch.isfinite(grad_norm):
                    self._diverged(f"the gradient norm became {grad_norm.item()}")
                self.optimizer.step()
                self.scheduler.step()
                self.ema.update(self.parallel.unwrap(self.model))
                self.step += 1
                self.step_times.append(time.perf_counter() - t0)
                window_n += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    now = time.perf_counter()
                    rate = window_n * self.cfg.batch_size / max(now - window_t, 1e-9)
                    values = self.parallel.all_mean({"loss": loss.item(), **{k: float(v) for k, v in stats.items()
                                                                            if _is_scalar(v)}})
                    last = {"step": self.step, "loss": values.pop("loss"), "grad_norm": grad_norm.item(),
                            "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate, **values}
                    if self.parallel.main:
                        self._log(last)
                    bar.set_postfix(loss=f"{last['loss']:.4g}", samples_s=f"{rate:.0f}")
                    window_t, window_n = now, 0
                if self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps:
                    self.save()
                    if self.step == fault and self.parallel.main:
                        os.kill(os.getpid(), signal.SIGKILL)
        finally:
            bar.close()
        timed = self.step_times[min(5, len(self.step_times) // 2):]  # skip warm-up steps
        return {"steps": self.step, "final_loss": last.get("loss"), "checkpoint": str(latest_checkpoint(self.out_dir)),
                "sec_per_step": sum(timed) / len(timed) if timed else None}

    def _diverged(self, what: str) -> None:
        good = latest_checkpoint(self.out_dir)
        keep = f"the last good checkpoint {good} is kept" if good else "no checkpoint had been written yet"
        raise TrainingDiverged(f"{what} at step {self.step + 1}; stopped before updating the weights, {keep}. "
                               "Try a lower --lr or a smaller --grad-clip.")


def _full(norm: torch.Tensor) -> torch.Tensor:
    """The gradient norm as a plain tensor (FSDP2's ``clip_grad_norm_`` returns a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
