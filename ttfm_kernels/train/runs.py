"""The runs behind the ``ttfm`` subcommands: train a teacher, distill a student, sample, evaluate.

Each function takes plain arguments (no argparse) so scripts and tests can call it directly. A run directory
holds ``ckpt_*.pt`` and ``log.jsonl``; the checkpoint's config names the model class and its arguments, the
data, the loss and (for students) the teacher's checkpoint, so ``load_model`` can rebuild any run. Teachers are
``models.MLP`` (points), ``models.DiT`` or ``models.UNet`` (images); students are their two-time twins, built
with ``from_teacher``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttfm_kernels.flow import EMA, TimeSampler, ode_solve, sample
from ttfm_kernels.flow.interpolant import resolve_sigma
from ttfm_kernels.flow.time_sampling import t_range_of
from ttfm_kernels.losses import emd_loss, flow_matching_loss, itvm_loss, lfmd_loss
from ttfm_kernels.models import MLP, DiT, TwoTimeDiT, TwoTimeMLP, TwoTimeUNet, UNet
from ttfm_kernels.train.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from ttfm_kernels.train.data import PointData, StoredData
from ttfm_kernels.train.metrics import (
    coverage_kl,
    frechet_distance,
    histogram_kl,
    sliced_w2,
    teacher_match_rmse,
    train_classifier,
)
from ttfm_kernels.train.parallel import Parallel
from ttfm_kernels.train.trainer import Draw, LossFn, TrainConfig, Trainer

__all__ = ["KL_PROTOCOL", "LOSSES", "MODELS", "TARGETS", "build_teacher", "distill", "evaluate", "load_model",
           "sample_shape", "train_teacher"]

LOSSES = ("itvm", "lfmd", "emd")
TARGETS = ("jvp", "euler", "fd")
MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "dit": DiT, "unet": UNet}
"""Teacher architectures by ``--model`` name; each student class is ``_STUDENTS[type(teacher)]``."""
_STUDENTS: dict[type[nn.Module], type[nn.Module]] = {MLP: TwoTimeMLP, DiT: TwoTimeDiT, UNet: TwoTimeUNet}
_MODEL_CLASSES: dict[str, type[nn.Module]] = {c.__name__: c for c in (*_STUDENTS, *_STUDENTS.values())}
KL_PROTOCOL = {"bins": 16, "n": 16384}
"""The 2D KL with a near-zero floor (docs/math.md, "Evaluation protocols"): 16 x 16 bins, 16384 samples."""


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


def _draw(data: PointData, sampler: TimeSampler, sigma: float, t_range: tuple[float, float], *,
          pair: bool) -> Draw:
    """The random inputs of a global batch, in this order from one generator: the data x1, the noise
    x0 = sigma * N(0, I), then the times (``(s, t)`` when ``pair``, else ``t``), drawn inside ``t_range``."""
    def draw(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        x1 = data.sample(n, g)
        x0 = sigma * torch.randn(x1.shape, generator=g, dtype=x1.dtype)
        if pair:
            s, t = sampler(n, generator=g, t_range=t_range)
            return {"x1": x1, "x0": x0, "s": s, "t": t}
        return {"x1": x1, "x0": x0, "t": sampler.single(n, generator=g, t_range=t_range)}
    return draw


def _fit(model: nn.Module, loss_fn: LossFn, data: PointData, cfg: TrainConfig, out_dir: str | Path,
         run_config: dict[str, Any], *, draw: Draw, parallel: Parallel | None, device: str, progress: bool,
         resume: bool, desc: str) -> dict[str, Any]:
    parallel = parallel if parallel is not None else Parallel(device=torch.device(device))
    model.to(parallel.device)
    ema = parallel.ema(model, cfg.ema_decay)
    trainer = Trainer(parallel.wrap(model), ema, loss_fn, data, cfg, out_dir, run_config=run_config,
                      device=parallel.device, progress=progress, desc=desc, draw=draw, parallel=parallel)
    return trainer.fit(resume=resume)


def build_teacher(model: str, preset: str, data: PointData, *, sigma: float = 1.0,
                  time_scale: float | None = None) -> nn.Module:
    """A fresh teacher ``MODELS[model]`` of size ``preset`` fitted to ``data``'s shape.

    "mlp" needs points (N, D); "dit" and "unet" need square images (N, C, H, W) and take image_size = H and
    in_channels = C from the data. ``time_scale`` (default: the class's) multiplies t in the time embedding.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[model]
    extra = {"sigma": sigma, **({"time_scale": time_scale} if time_scale is not None else {})}
    if model == "mlp":
        if data.is_image:
            raise ValueError(f"--model mlp models points (N, D) but data {data.name!r} holds images "
                             f"{data.shape}; use --model dit or unet")
        return cls.from_preset(preset, dim=data.dim, **extra)
    if not data.is_image:
        raise ValueError(f"--model {model} models images (N, C, H, W) but data {data.name!r} holds "
                         f"{data.dim}-D points; use --model mlp")
    channels, height, width = data.shape
    if height != width:
        raise ValueError(f"--model {model} needs square images, data {data.name!r} holds {height}x{width}")
    return cls.from_preset(preset, image_size=height, in_channels=channels, **extra)


def train_teacher(data: PointData, data_spec: str, out_dir: str | Path, cfg: TrainConfig, *, model: str = "mlp",
                  preset: str = "small", sigma: float = 1.0, time_scale: float | None = None,
                  time_sampling: str = "uniform", device: str = "cpu", progress: bool = True,
                  resume: bool = False, parallel: Parallel | None = None) -> dict[str, Any]:
    """Train a flow-matching teacher (``build_teacher``) on ``data``; returns the trainer's summary.

    ``parallel``: this process's place in a many-rank run (``train.parallel.init_parallel``; it then sets the
    device), or None for one process."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_teacher(model, preset, data, sigma=sigma, time_scale=time_scale)
    sampler = TimeSampler(marginal=time_sampling)

    def loss_fn(m: nn.Module, ema: nn.Module, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
        return flow_matching_loss(m, x1, x0=x0, t=t)

    run_config = {"kind": "teacher", "model": _model_spec(model), "data": data_spec, "loss": "flow_matching",
                  "time_sampling": time_sampling}
    draw = _draw(data, sampler, resolve_sigma(model), t_range_of(model), pair=False)
    return _fit(model, loss_fn, data, cfg, out_dir, run_config, draw=draw, parallel=parallel, device=device,
                progress=progress, resume=resume, desc="teacher")


def distill(teacher_path: str | Path, data: PointData, data_spec: str, out_dir: str | Path, cfg: TrainConfig, *,
            loss: str = "itvm", target: str = "jvp", adaptive: float = 0.0, time_sampling: str = "uniform",
            device: str = "cpu", progress: bool = True, resume: bool = False,
            parallel: Parallel | None = None) -> dict[str, Any]:
    """Distill the teacher checkpoint into its two-time student (``from_teacher``: u(x, s, t) = v(x, s)) with ``loss``.

    ``adaptive`` = p > 0 weights each sample's loss l_b by 1 / sg(l_b + 1e-3)^p (the adaptive weighting of
    MeanFlow; p = 1 normalises every sample's gradient), applied the same way to every loss. ``parallel`` as in
    ``train_teacher``: the student is wrapped (DDP or FSDP2), the teacher stays a frozen replica on every rank.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    device = str(parallel.device) if parallel is not None else device
    teacher, _ = load_model(teacher_path, device=device)
    if type(teacher) not in _STUDENTS:
        raise CheckpointError(f"{teacher_path} is not a teacher checkpoint (holds a {type(teacher).__name__})")
    if sample_shape(teacher) != data.shape:
        raise ValueError(f"the teacher models samples of shape {sample_shape(teacher)} but data {data_spec!r} "
                         f"holds {data.shape}")
    torch.manual_seed(cfg.seed)  # the student's weights not copied from the teacher
    student = _STUDENTS[type(teacher)].from_teacher(teacher).requires_grad_(True)
    sampler = TimeSampler(marginal=time_sampling)

    reduction = "none" if adaptive > 0 else "mean"

    def loss_fn(m: nn.Module, ema: nn.Module, x1: torch.Tensor, x0: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
        drawn = {"x0": x0, "s": s, "t": t, "reduction": reduction}
        if loss == "itvm":
            value, stats = itvm_loss(m, teacher, x1, ema=ema, target=target, **drawn)
        elif loss == "lfmd":
            value, stats = lfmd_loss(m, teacher, x1, **drawn)
        else:  # the student's own JVP (ema=None), as in MeanFlow-style EMD
            value, stats = emd_loss(m, teacher, x1, **drawn)
        if adaptive > 0:
            value = (value / (value.detach() + 1e-3) ** adaptive).mean()
        return value, stats

    run_config = {"kind": "student", "model": _model_spec(student), "data": data_spec, "loss": loss,
                  "target": target if loss == "itvm" else None, "adaptive": adaptive,
                  "teacher": str(resolve_checkpoint(teacher_path)),
                  "time_sampling": time_sampling}
    draw = _draw(data, sampler, resolve_sigma(teacher), t_range_of(teacher), pair=True)
    return _fit(student, loss_fn, data, cfg, out_dir, run_config, draw=draw, parallel=parallel, device=device,
                progress=progress, resume=resume, desc=loss)


def sample_shape(model: nn.Module) -> tuple[int, ...]:
    """One sample's shape for a model of ``_MODEL_CLASSES``: (dim,) or (in_channels, image_size, image_size)."""
    if isinstance(model, (MLP, TwoTimeMLP)):
        return (model.dim,)
    return (model.in_channels, model.image_size, model.image_size)


class _ImageScorer:
    """Frechet distance and mode coverage in the features of a ``DigitsClassifier`` trained on ``data``'s labels.

    ``accuracy``: the classifier's accuracy on the held-out half; ``floor()``: the metrics of the training half
    against the held-out half (what two draws of the data give).
    """

    def __init__(self, data: StoredData, seed: int, cache: str | Path | None) -> None:
        self.data = data
        self.classifier, self.accuracy = train_classifier(data.train, data.train_labels, data.held, data.held_labels,
                                                          seed=seed, cache=cache)
        self.held_feats, _ = self.classifier.embed(data.held)

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        feats, labels = self.classifier.embed(samples)
        return {"frechet": frechet_distance(feats, self.held_feats),
                "coverage_kl": coverage_kl(labels, self.classifier.config["num_classes"])}

    def floor(self) -> dict[str, float]:
        return self(self.data.train)


def _quality(samples: torch.Tensor, held: torch.Tensor, reference: torch.Tensor | None, seed: int,
             images: _ImageScorer | None = None) -> dict[str, float]:
    row = {"sw2": sliced_w2(samples.flatten(1), held.flatten(1), seed=seed)}
    if samples.dim() == 2 and samples.shape[1] == 2:
        row["kl"] = histogram_kl(held, samples)
    if images is not None:
        row.update(images(samples))
    if reference is not None:
        row["teacher_rmse"] = teacher_match_rmse(samples, reference)
    return row


@torch.no_grad()
def evaluate(students: dict[str, nn.Module], teacher: nn.Module, data: PointData, *,
             steps: tuple[int, ...] = (1, 2, 4, 8), n: int = 4096, teacher_steps: int = 100,
             seed: int = 0, classifier_cache: str | Path | None = None,
             teacher_solves: dict[tuple, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of each student's N-step samples, and of the teacher's N-step Euler solve, for every N in ``steps``.

    All samples start from the same noise x0 ~ N(0, sigma^2 I) (sigma from the teacher). ``teacher_rmse`` is
    against the teacher's ``teacher_steps``-step Heun solve from that noise; ``sw2`` and ``kl`` are against
    ``n`` held-out data points. 2D data also gets ``kl16``: the ``KL_PROTOCOL`` histogram KL on a separate
    draw of ``KL_PROTOCOL["n"]`` noise and held-out points. Labelled image data (digits) gets ``frechet`` and
    ``coverage_kl`` in the features of a classifier trained on its training half (cached at
    ``classifier_cache``; its held-out accuracy is ``classifier_accuracy``). ``floor`` holds the same metrics
    between two draws of the data (two independent held-out draws for the toy sets; the training half against
    the held-out half for stored data): what sampling noise alone gives.
    ``teacher_solves``: a dict the caller keeps across calls with the same teacher and data; the teacher's Heun
    and Euler solves are stored there on the first call (keyed by n, seed and step counts) and reused after.
    Returns ``(metrics, samples)``: samples[row][str(N)] are the (n, ...) samples scored in metrics[row][str(N)]
    (rows: "teacher_euler" and each student; samples["teacher_heun"] and samples["data"] are single tensors).
    """
    g = torch.Generator().manual_seed(seed)
    sigma = float(getattr(teacher, "sigma", 1.0))
    x0 = sigma * torch.randn(n, *data.shape, generator=g)
    held = data.held_out(n, seed)
    images = None
    if isinstance(data, StoredData) and data.train_labels is not None and data.is_image:
        images = _ImageScorer(data, seed, classifier_cache)
    key = (n, seed, teacher_steps, tuple(steps))
    solves = (teacher_solves or {}).get(key)
    if solves is None:
        solves = (ode_solve(teacher, x0, steps=teacher_steps, method="heun"),
                  {str(k): ode_solve(teacher, x0, steps=k, method="euler") for k in steps})
        if teacher_solves is not None:
            teacher_solves[key] = solves
    reference = solves[0]
    samples: dict[str, Any] = {"data": held, "teacher_heun": reference, "teacher_euler": solves[1]}
    for name, student in students.items():
        samples[name] = {str(k): sample(student, x0, steps=k) for k in steps}
    if isinstance(data, StoredData):
        floor = _quality(data.train[:len(held)], held, None, seed)
        if images is not None:
            floor.update(images.floor())
    else:
        floor = _quality(data.held_out(n, seed + 1), held, None, seed)
    metrics: dict[str, Any] = {
        "n": n, "seed": seed, "steps": list(steps), "teacher_steps": teacher_steps, "floor": floor,
        "teacher_heun": _quality(reference, held, None, seed, images),
    }
    if images is not None:
        metrics["classifier_accuracy"] = images.accuracy
    for row in ["teacher_euler", *students]:
        metrics[row] = {k: _quality(x, held, reference, seed, images) for k, x in samples[row].items()}
    if data.shape == (2,):
        _add_kl16(metrics, students, teacher, data, sigma * torch.randn(KL_PROTOCOL["n"], 2, generator=g), seed)
    return metrics, samples


def _add_kl16(metrics: dict[str, Any], students: dict[str, nn.Module], teacher: nn.Module, data: PointData,
              x0: torch.Tensor, seed: int) -> None:
    """The ``KL_PROTOCOL`` 2D KL of every row, on its own larger draw x0 of noise and of held-out data."""
    if isinstance(data, StoredData):  # a fixed split: the held-out part against the training part
        held, other = data.held, data.train
    else:
        held, other = data.held_out(len(x0), seed + 2), data.held_out(len(x0), seed + 3)

    def kl16(x: torch.Tensor) -> float:
        return histogram_kl(held, x, bins=KL_PROTOCOL["bins"])

    metrics["kl16_n"] = len(x0)
    metrics["floor"]["kl16"] = kl16(other)
    metrics["teacher_heun"]["kl16"] = kl16(ode_solve(teacher, x0, steps=metrics["teacher_steps"], method="heun"))
    for k in metrics["steps"]:
        metrics["teacher_euler"][str(k)]["kl16"] = kl16(ode_solve(teacher, x0, steps=k, method="euler"))
        for name, student in students.items():
            metrics[name][str(k)]["kl16"] = kl16(sample(student, x0, steps=k))
