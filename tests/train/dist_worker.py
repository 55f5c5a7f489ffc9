"""One rank of the many-rank tests (test_distributed.py starts it under torchrun): ``python dist_worker.py MODE OUT
[TEACHER]``. Each rank writes ``OUT/rank<r>.pt`` with what the test compares.

MODE "teacher": a DDP teacher run (train_teacher, gloo); the rank's first local batch, its final parameters and
EMA. MODE "fsdp": with the TEACHER checkpoint, LFMD distillation runs under DDP and under FSDP2 (final parameters
and EMA gathered to full tensors, the local shard sizes, a resume that only loads the sharded checkpoint back),
and one LFMD gradient (through the tangent) of the FSDP2 student on the rank's part of a fixed global batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ttfm_kernels.losses import lfmd_loss
from ttfm_kernels.train import runs
from ttfm_kernels.train.data import load_data
from ttfm_kernels.train.parallel import Parallel, init_parallel
from ttfm_kernels.train.trainer import TrainConfig, Trainer

CFG = {"steps": 4, "batch_size": 16, "lr": 3e-3, "warmup": 1, "ckpt_every": 2, "log_every": 2, "ema_decay": 0.9}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _record(results: dict[str, dict]) -> None:
    """Patch Trainer so that each run (by its output directory's name) leaves its first batch and final state."""
    fit, batch = Trainer.fit, Trainer._batch

    def recording_batch(self: Trainer) -> dict[str, torch.Tensor]:
        drawn = batch(self)
        results.setdefault(self.out_dir.name, {}).setdefault("x1", drawn["x1"].clone())
        return drawn

    def recording_fit(self: Trainer, **kw: object) -> dict:
        summary = fit(self, **kw)
        model = self.parallel.unwrap(self.model)
        row = results.setdefault(self.out_dir.name, {})
        row["params"] = {k: _full(v) for k, v in model.state_dict().items()}
        row["ema"] = {k: _full(v) for k, v in self.ema.state_dict().items()}
        row["local_numel"] = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        row["full_numel"] = sum(_full(p).numel() for p in model.parameters())
        row["log"] = self.log_path.read_text() if self.log_path.exists() else ""
        return summary

    Trainer._batch, Trainer.fit = recording_batch, recording_fit


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    par = init_parallel("ddp", "cpu")
    results: dict[str, dict] = {}
    _record(results)
    cfg = TrainConfig(**CFG)
    if mode == "teacher":
        runs.train_teacher(load_data("moons"), "moons", out / "teacher", cfg, preset="tiny", progress=False,
                           parallel=par)
    else:
        teacher = sys.argv[3]
        for kind in ("ddp", "fsdp"):
            runs.distill(teacher, load_data("moons"), "moons", out / kind, cfg, loss="lfmd", progress=False,
                         parallel=Parallel(kind, par.rank, par.world_size, par.device))
        fsdp = Parallel("fsdp", par.rank, par.world_size, par.device)
        results["fsdp_trained"] = dict(results["fsdp"])
        runs.distill(teacher, load_data("moons"), "moons", out / "fsdp", cfg, loss="lfmd", progress=False,
                     parallel=fsdp, resume=True)  # at the last step already: only loads the checkpoint
        results["grad"] = _lfmd_grad(teacher, fsdp)
    torch.save(results, out / f"rank{par.rank}.pt")
    torch.distributed.destroy_process_group()


def _lfmd_grad(teacher_path: str, par: Parallel) -> dict[str, torch.Tensor]:
    """The full gradient of the FSDP2 student's LFMD loss, this rank taking its part of ``gradient_batch()``."""
    teacher, _ = runs.load_model(teacher_path)
    student = runs._STUDENTS[type(teacher)].from_teacher(teacher).requires_grad_(True)
    wrapped = par.wrap(student)
    part = par.local_slice(16)
    batch = {k: v[part] for k, v in gradient_batch().items()}
    loss, _ = lfmd_loss(wrapped, teacher, batch["x1"], x0=batch["x0"], s=batch["s"], t=batch["t"])
    loss.backward()
    return {k: _full(p.grad) for k, p in wrapped.named_parameters()}


def gradient_batch() -> dict[str, torch.Tensor]:
    """A fixed global batch of 16 for the gradient check (the test computes the one-rank gradient on all of it)."""
    g = torch.Generator().manual_seed(7)
    s, t = torch.rand(2, 16, generator=g).sort(dim=0).values
    return {"x1": torch.randn(16, 2, generator=g), "x0": torch.randn(16, 2, generator=g), "s": s, "t": t}


if __name__ == "__main__":
    main()
