"""The training loop shared by teacher training and distillation.

AdamW with linear warm-up then cosine decay (to ``final_lr_fraction`` of the peak), gradient clipping, an EMA
of the weights, progress on stderr (a tqdm bar on a terminal; otherwise ``PlainProgress``: one plain line every
5% of the steps or 30 s, so a log file holds no carriage-return updates), JSON-lines logs (``log.jsonl``), atomic
complete checkpoints every ``ckpt_every`` steps and at the end, exact resume (bitwise-equal parameters with the
same thread count) and deterministic seeding. A non-finite loss or gradient stops the run with
``TrainingDiverged`` before the optimizer step, so the last good checkpoint stays the newest one on disk.

Randomness: the batch of data points comes from a dedicated generator (its state is the checkpoint's data
position); everything the loss draws (noise, times) comes from the global torch RNG, seeded from ``seed``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
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
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from ttfm_kernels.train.data import PointData

__all__ = ["LossFn", "PlainProgress", "TrainConfig", "Trainer", "TrainingDiverged", "seed_everything"]

LossFn = Callable[[nn.Module, nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
"""``loss_fn(model, ema, x1) -> (loss, stats)``: x1 is a (B, ...) batch of data (points or images); stats maps
names to 0-dim tensors (as the losses return them) or numbers, converted to Python numbers only when a log line is
written."""


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
    """

    def __init__(self, model: nn.Module, ema: nn.Module, loss_fn: LossFn, data: PointData, config: TrainConfig,
                 out_dir: str | Path, *, run_config: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                 progress: bool = True, desc: str = "train"):
        self.model, self.ema, self.loss_fn, self.data, self.cfg = model, ema, loss_fn, data, config
        self.out_dir = Path(out_dir)
        self.run_config = {**(run_config or {}), "train": dataclasses.asdict(config)}
        self.device = torch.device(device)
        self.progress, self.desc = progress, desc
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: _lr_factor(k, self.cfg))
        self.data_gen = torch.Generator()
        self.step = 0
        self.step_times: list[float] = []

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.jsonl"

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "rng": capture_rng(), "data_position": self.data_gen.get_state(),
                "config": self.run_config}

    def save(self) -> Path:
        path = save_checkpoint(checkpoint_path(self.out_dir, self.step), self._state())
        for old in list_checkpoints(self.out_dir)[:-self.cfg.keep]:
            old.unlink(missing_ok=True)
        return path

    def _resume(self) -> Path:
        path = latest_checkpoint(self.out_dir)
        if path is None:
            raise CheckpointError(f"--resume given but {self.out_dir} holds no checkpoint (ckpt_*.pt)")
        state = load_checkpoint(path)
        differ = [f"{k}: {state['config'].get(k)!r} in the checkpoint, {v!r} now" for k, v in self.run_config.items()
                  if k != "train" and state["config"].get(k) != v]
        if differ:
            raise CheckpointError(f"checkpoint {path} belongs to a different run ({'; '.join(differ)}); resume it "
                                  "with the same settings, or choose another output directory")
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model/run: {e}") from e
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        restore_rng(state["rng"])
        self.data_gen.set_state(state["data_position"])
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
            self.data_gen.manual_seed(self.cfg.seed + 1)
            self.log_path.write_text("")
        bar = _progress_bar(self.cfg.steps, self.step, self.desc, self.progress)
        window_t, window_n, last = time.perf_counter(), 0, {}
        try:
            while self.step < self.cfg.steps:
                t0 = time.perf_counter()
                x1 = self.data.sample(self.cfg.batch_size, self.data_gen).to(self.device)
                loss, stats = self.loss_fn(self.model, self.ema, x1)
                if not torch.isfinite(loss):
                    self._diverged(f"the loss became {loss.item()}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                if not torch.isfinite(grad_norm):
                    self._diverged(f"the gradient norm became {grad_norm.item()}")
                self.optimizer.step()
                self.scheduler.step()
                self.ema.update(self.model)
                self.step += 1
                self.step_times.append(time.perf_counter() - t0)
                window_n += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    now = time.perf_counter()
                    rate = window_n * self.cfg.batch_size / max(now - window_t, 1e-9)
                    last = {"step": self.step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                            "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate,
                            **{k: float(v) for k, v in stats.items() if _is_scalar(v)}}
                    self._log(last)
                    bar.set_postfix(loss=f"{last['loss']:.4g}", samples_s=f"{rate:.0f}")
                    window_t, window_n = now, 0
                if self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps:
                    self.save()
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


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
