"""The runs behind the ``ttfm`` subcommands: train a teacher, distill a student, sample, evaluate.

Each function takes plain arguments (no argparse) so scripts and tests can call it directly. A run directory
holds ``ckpt_*.pt`` and ``log.jsonl``; the checkpoint's config names the model class and its arguments, the
data, the loss and (for students) the teacher's checkpoint, so ``load_model`` can rebuild any run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttfm_kernels.flow import EMA, TimeSampler, ode_solve, sample
from ttfm_kernels.losses import emd_loss, flow_matching_loss, itvm_loss, lfmd_loss
from ttfm_kernels.models import MLP, TwoTimeMLP
from ttfm_kernels.train.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from ttfm_kernels.train.data import PointData
from ttfm_kernels.train.metrics import histogram_kl, sliced_w2, teacher_match_rmse
from ttfm_kernels.train.trainer import LossFn, TrainConfig, Trainer

__all__ = ["LOSSES", "TARGETS", "distill", "evaluate", "load_model", "train_teacher"]

LOSSES = ("itvm", "lfmd", "emd")
TARGETS = ("jvp", "euler", "fd")
_MODEL_CLASSES: dict[str, type[nn.Module]] = {"MLP": MLP, "TwoTimeMLP": TwoTimeMLP}


def _model_spec(model: nn.Module) -> dict[str, Any]:
    return {"class": type(model).__name__, "args": dict(model.config)}


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's model from a checkpoint file or run directory, with its EMA (averaged) weights.

    Returns ``(model, config)``: the model in eval mode with ``requires_grad`` off, and the run's config.
    """
    state = load_checkpoint(path)
    config = state["config"]
    spec = config.get("model", {})
    cls = _MODEL_CLASSES.get(spec.get("class"))
    if cls is None:
        raise CheckpointError(f"checkpoint {resolve_checkpoint(path)} names no known model class: {spec!r}")
    model = cls(**spec["args"])
    ema = EMA(model)
    try:
        ema.load_state_dict(state["ema"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {resolve_checkpoint(path)}: EMA weights do not fit {spec}: {e}") from e
    model.load_state_dict(ema.module.state_dict())
    return model.to(device).eval().requires_grad_(False), config


def _fit(model: nn.Module, loss_fn: LossFn, data: PointData, cfg: TrainConfig, out_dir: str | Path,
         run_config: dict[str, Any], *, device: str, progress: bool, resume: bool, desc: str) -> dict[str, Any]:
    model.to(device)
    ema = EMA(model, decay=cfg.ema_decay)
    trainer = Trainer(model, ema, loss_fn, data, cfg, out_dir, run_config=run_config, device=device,
                      progress=progress, desc=desc)
    return trainer.fit(resume=resume)


def train_teacher(data: PointData, data_spec: str, out_dir: str | Path, cfg: TrainConfig, *, preset: str = "small",
                  sigma: float = 1.0, time_sampling: str = "uniform", device: str = "cpu", progress: bool = True,
                  resume: bool = False) -> dict[str, Any]:
    """Train a flow-matching teacher ``models.MLP`` on ``data``; returns the trainer's summary."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = MLP.from_preset(preset, dim=data.dim, sigma=sigma)
    sampler = TimeSampler(marginal=time_sampling)

    def loss_fn(m: nn.Module, ema: nn.Module, x1: torch.Tensor):
        return flow_matching_loss(m, x1, time_sampler=sampler)

    run_config = {"kind": "teacher", "model": _model_spec(model), "data": data_spec, "loss": "flow_matching",
                  "time_sampling": time_sampling}
    return _fit(model, loss_fn, data, cfg, out_dir, run_config, device=device, progress=progress, resume=resume,
                desc="teacher")


def distill(teacher_path: str | Path, data: PointData, data_spec: str, out_dir: str | Path, cfg: TrainConfig, *,
            loss: str = "itvm", target: str = "jvp", adaptive: float = 0.0, time_sampling: str = "uniform",
            device: str = "cpu", progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Distill the teacher checkpoint into a ``TwoTimeMLP`` (initialised from the teacher) with ``loss``.

    ``adaptive`` = p > 0 weights each sample's loss l_b by 1 / sg(l_b + 1e-3)^p (the adaptive weighting of
    MeanFlow; p = 1 normalises every sample's gradient), applied the same way to every loss.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    teacher, _ = load_model(teacher_path, device=device)
    if not isinstance(teacher, MLP):
        raise CheckpointError(f"{teacher_path} is not a teacher checkpoint (holds a {type(teacher).__name__})")
    if teacher.dim != data.dim:
        raise ValueError(f"the teacher models {teacher.dim}-D points but data {data_spec!r} is {data.dim}-D")
    student = TwoTimeMLP.from_teacher(teacher).requires_grad_(True)
    sampler = TimeSampler(marginal=time_sampling)

    reduction = "none" if adaptive > 0 else "mean"

    def loss_fn(m: nn.Module, ema: nn.Module, x1: torch.Tensor):
        if loss == "itvm":
            value, stats = itvm_loss(m, teacher, x1, ema=ema, target=target, time_sampler=sampler, reduction=reduction)
        elif loss == "lfmd":
            value, stats = lfmd_loss(m, teacher, x1, time_sampler=sampler, reduction=reduction)
        else:  # the student's own JVP (ema=None), as in MeanFlow-style EMD
            value, stats = emd_loss(m, teacher, x1, time_sampler=sampler, reduction=reduction)
        if adaptive > 0:
            value = (value / (value.detach() + 1e-3) ** adaptive).mean()
        return value, stats

    run_config = {"kind": "student", "model": _model_spec(student), "data": data_spec, "loss": loss,
                  "target": target if loss == "itvm" else None, "adaptive": adaptive,
                  "teacher": str(resolve_checkpoint(teacher_path)),
                  "time_sampling": time_sampling}
    return _fit(student, loss_fn, data, cfg, out_dir, run_config, device=device, progress=progress, resume=resume,
                desc=loss)


def _quality(samples: torch.Tensor, held: torch.Tensor, reference: torch.Tensor | None, seed: int) -> dict[str, float]:
    row = {"sw2": sliced_w2(samples, held, seed=seed)}
    if samples.shape[1] == 2:
        row["kl"] = histogram_kl(held, samples)
    if reference is not None:
        row["teacher_rmse"] = teacher_match_rmse(samples, reference)
    return row


@torch.no_grad()
def evaluate(students: dict[str, nn.Module], teacher: nn.Module, data: PointData, *,
             steps: tuple[int, ...] = (1, 2, 4, 8), n: int = 4096, teacher_steps: int = 100,
             seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of each student's N-step samples, and of the teacher's N-step Euler solve, for every N in ``steps``.

    All samples start from the same noise x0 ~ N(0, sigma^2 I) (sigma from the teacher). ``teacher_rmse`` is
    against the teacher's ``teacher_steps``-step Heun solve from that noise; ``sw2`` and ``kl`` are against
    ``n`` held-out data points. ``floor`` holds the same metrics between two independent held-out draws (what
    sampling noise alone gives: no method can be expected to go below it).
    Returns ``(metrics, samples)``: samples[row][str(N)] are the (n, D) points scored in metrics[row][str(N)]
    (rows: "teacher_euler" and each student; samples["teacher_heun"] and samples["data"] are single tensors).
    """
    g = torch.Generator().manual_seed(seed)
    sigma = float(getattr(teacher, "sigma", 1.0))
    x0 = sigma * torch.randn(n, data.dim, generator=g)
    held = data.held_out(n, seed)
    reference = ode_solve(teacher, x0, steps=teacher_steps, method="heun")
    samples: dict[str, Any] = {"data": held, "teacher_heun": reference,
                               "teacher_euler": {str(k): ode_solve(teacher, x0, steps=k, method="euler")
                                                 for k in steps}}
    for name, student in students.items():
        samples[name] = {str(k): sample(student, x0, steps=k) for k in steps}
    metrics: dict[str, Any] = {
        "n": n, "seed": seed, "steps": list(steps), "teacher_steps": teacher_steps,
        "floor": _quality(data.held_out(n, seed + 1), held, None, seed),
        "teacher_heun": _quality(reference, held, None, seed),
    }
    for row in ["teacher_euler", *students]:
        metrics[row] = {k: _quality(x, held, reference, seed) for k, x in samples[row].items()}
    return metrics, samples
