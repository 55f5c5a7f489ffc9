"""The ``ttfm`` command line (also ``python -m ttfm_kernels``).

    ttfm demo                         teacher + ITVM / LFMD / EMD on 2D checkerboard, table and figure
    ttfm train-teacher --out runs/teacher
    ttfm distill --teacher runs/teacher --loss itvm --out runs/itvm
    ttfm sample --ckpt runs/itvm --steps 4 --out samples.npy
    ttfm eval --ckpt runs/itvm
    ttfm compare --data digits --model unet --seeds 3 --out runs/compare   every method, seeds, ablations

Images: ``ttfm train-teacher --model unet --data digits`` (or dit; ``--data`` may also be a .npy/.npz of
(N, C, H, W) images or a folder of PNGs), then distill / sample (``--png`` writes an image grid) / eval (Frechet
distance and mode coverage in a digits classifier's features) as for points.

Many processes: ``torchrun --nproc_per_node N -m ttfm_kernels train-teacher|distill ... [--parallel ddp|fsdp]``
(DDP by default under torchrun; ``--batch-size`` is the global batch; README, "Many GPUs").

Every command that writes prints where. Errors a user can fix (bad names, missing or corrupt files, a
diverged run) print one clear line and exit with status 2 (usage) or 1 (the run failed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttfm_kernels.flow import ode_solve, sample
from ttfm_kernels.train.checkpoint import CheckpointError
from ttfm_kernels.train.compare import METHODS as COMPARE_METHODS
from ttfm_kernels.train.compare import CompareConfig, format_tables, run_compare
from ttfm_kernels.train.data import IMAGE_DATASETS, TOY_DATASETS, load_data
from ttfm_kernels.train.parallel import PARALLEL, Parallel, init_parallel
from ttfm_kernels.train.runs import (
    KL_PROTOCOL,
    LOSSES,
    MODELS,
    TARGETS,
    distill,
    evaluate,
    load_model,
    sample_shape,
    train_teacher,
)
from ttfm_kernels.train.trainer import TrainConfig, TrainingDiverged

__all__ = ["main"]

_DATA_HELP = (f"data set: points {', '.join(TOY_DATASETS)}; images {', '.join(IMAGE_DATASETS)} (scikit-learn's "
              "8x8 digits, digits16 upsampled to 16x16); or a path to a .npy/.npz array of shape (N, D) or "
              "(N, C, H, W), or to a folder of .png images")
_METRICS = (("teacher_rmse", "teacher-match RMSE vs teacher Heun solve, same noise (distillation fidelity)"),
            ("sw2", "sliced W2 to held-out data"),
            ("kl", "2D histogram KL(data || samples), 64x64 bins, the eval's samples"),
            ("kl16", f"2D histogram KL(data || samples), {KL_PROTOCOL['bins']}x{KL_PROTOCOL['bins']} bins, "
                     f"{KL_PROTOCOL['n']} samples"),
            ("frechet", "Frechet distance in digits-classifier features, to held-out data"),
            ("coverage_kl", "mode coverage: KL(predicted-class histogram || uniform)"))


def _steps_list(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts like 1,2,4,8, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be >= 1, got {text!r}")
    return steps


def _add_train_args(p: argparse.ArgumentParser, *, steps: int, lr: float, out: str) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=512, help="data points per step (default %(default)s)")
    g.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay "
                   "(default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (default %(default)s)")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the weights (default %(default)s)")
    g.add_argument("--time-sampling", choices=("uniform", "lognormal"), default="uniform",
                   help="how training times are drawn (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data and noise (default %(default)s)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default %(default)s; under "
                   "torchrun each rank takes cuda:LOCAL_RANK)")
    g.add_argument("--parallel", choices=PARALLEL, default=None, help="under torchrun: ddp (replicated student, "
                   "the default there) or fsdp (FSDP2, student and EMA sharded, sharded checkpoints); "
                   "--batch-size is then the global batch")
    g.add_argument("--out", default=out, help="run directory for checkpoints and log.jsonl (default %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps (default %(default)s)")
    g.add_argument("--log-every", type=int, default=50, help="log every N steps (default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; "
                   "a resumed run is bitwise equal to an uninterrupted one with the same thread count)")


def _train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                       warmup=a.warmup, grad_clip=a.grad_clip, ema_decay=a.ema_decay, seed=a.seed,
                       log_every=a.log_every, ckpt_every=a.ckpt_every)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttfm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distill flow-matching teachers into two-time flow maps (ITVM, LFMD, EMD).",
        epilog="Start with `ttfm demo` (a few minutes on a laptop CPU). The usual sequence by hand:\n"
               "  ttfm train-teacher --data moons --out runs/teacher\n"
               "  ttfm distill --teacher runs/teacher --loss itvm --out runs/itvm\n"
               "  ttfm eval --ckpt runs/itvm --steps 1,2,4,8\n"
               "  ttfm sample --ckpt runs/itvm --steps 2 --out samples.npy --png samples.png\n"
               "`ttfm COMMAND --help` lists each command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="teacher + ITVM/LFMD/EMD on 2D checkerboard: table, results.json, samples.png",
                       description="Train a flow-matching teacher on 2D checkerboard, distill it with ITVM, LFMD "
                       "and EMD under the same budget and seed, and evaluate 1/2/4/8-step sampling.")
    p.add_argument("--quick", action="store_true", help="a tiny run (well under a minute) to check the pipeline")
    p.add_argument("--out", default="ttfm_demo", help="output directory (default ./%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")

    p = sub.add_parser("train-teacher", help="train a flow-matching teacher v(x, t) (models.MLP, DiT or UNet)",
                       description="Train a flow-matching teacher on a data set: models.MLP on points, models.DiT "
                       "or models.UNet on square images.")
    p.add_argument("--data", default="checkerboard", help=_DATA_HELP + " (default %(default)s)")
    p.add_argument("--model", default="mlp", help=f"architecture: {', '.join(MODELS)} (mlp for points, dit or "
                   "unet for images; default %(default)s)")
    p.add_argument("--preset", default="small", help="model size: tiny or small (mlp also base; default "
                   "%(default)s). On 2 CPU cores: unet/dit tiny on digits trains at tens of ms per step of 128")
    p.add_argument("--sigma", type=float, default=1.0, help="noise scale of x0 ~ N(0, sigma^2 I) (default 1)")
    p.add_argument("--time-scale", type=float, default=None, help="multiplier of t in the time embedding "
                   "(default: the model's, 1 for mlp and 1000 for dit/unet); the student inherits it")
    _add_train_args(p, steps=5000, lr=1e-3, out="runs/teacher")

    p = sub.add_parser("distill", help="distill a teacher into a two-time flow map u(x, s, t)",
                       description="Distill a teacher checkpoint into models.TwoTimeMLP, initialised from the "
                       "teacher so that u(x, s, t) = v(x, s) at the start.")
    p.add_argument("--teacher", default=None, help="teacher checkpoint file or run directory")
    p.add_argument("--teacher-diffusers", metavar="DIR", default=None, help="instead of --teacher: a diffusers "
                   "model saved with save_pretrained (local files only), adapted by adapters.Teacher; the student "
                   "is adapters.two_time of it, trained on --data (reshaped to the model's sample shape) and saved "
                   "with save_pretrained to OUT/student. With --prediction and/or --scheduler-dir (a saved "
                   "scheduler: VP models need one)")
    p.add_argument("--prediction", default=None, help="with --teacher-diffusers: what the model predicts, one of "
                   "velocity, flow, epsilon, v_prediction, sample (default: the scheduler's)")
    p.add_argument("--scheduler-dir", default=None, help="with --teacher-diffusers: the model's saved scheduler")
    p.add_argument("--loss", default="itvm", help=f"distillation loss: {', '.join(LOSSES)} (default %(default)s)")
    p.add_argument("--target", default="jvp", help=f"ITVM terminal target: {', '.join(TARGETS)} "
                   "(default %(default)s)")
    p.add_argument("--adaptive", type=float, default=0.0, metavar="P", help="weight each sample's loss by "
                   "1 / (loss + 1e-3)^P, no gradient through the weight (MeanFlow's adaptive weighting; 0 = off, "
                   "the default)")
    p.add_argument("--data", default=None, help=_DATA_HELP + " (default: the teacher's)")
    _add_train_args(p, steps=2000, lr=3e-4, out="runs/student")

    p = sub.add_parser("sample", help="draw samples from a student (N flow-map steps) or a teacher (N Heun steps)")
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--steps", type=int, default=1, help="sampling steps (default %(default)s)")
    p.add_argument("-n", "--num", type=int, default=None, help="number of samples (default 10000 points or 64 "
                   "images)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    p.add_argument("--out", default="samples.npy", help="output .npy file (default %(default)s)")
    p.add_argument("--png", default=None, help="also write a .png: a scatter plot (2D points) or an image grid")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")

    p = sub.add_parser("eval", help="metrics of a student at several step counts against its teacher and the data")
    p.add_argument("--ckpt", required=True, help="student checkpoint file or run directory")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the one the student names)")
    p.add_argument("--data", default=None, help=_DATA_HELP + " (default: the student's)")
    p.add_argument("--steps", type=_steps_list, default=(1, 2, 4, 8), help="step counts (default 1,2,4,8)")
    p.add_argument("-n", "--num", type=int, default=None, help="samples per evaluation (default 4096 points or "
                   "1000 images)")
    p.add_argument("--teacher-steps", type=int, default=100, help="Heun steps of the teacher reference "
                   "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    p.add_argument("--out", default=None, help="also write the metrics to this .json file")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")

    p = sub.add_parser("compare", help="every distillation method on one image teacher: seeds, ablations, "
                       "equal steps and equal wall-clock; resumable",
                       description="Train one teacher (cached in --out), distill it with every method under the "
                       "same budget, seeds and time sampler, evaluate 1/2/4/8-step sampling; results.json is "
                       "written after every run (rerun the same command to resume), table.md and grids at the end.")
    p.add_argument("--data", default="digits", help="labelled image data: digits or digits16 (default %(default)s)")
    p.add_argument("--model", default="unet", help="teacher architecture: unet or dit (default %(default)s)")
    p.add_argument("--seeds", type=int, default=None, help="student seeds of the main methods (default 3; "
                   "--quick 1)")
    p.add_argument("--methods", default=None, help="comma-separated methods and ablations (default: all of "
                   f"{', '.join(COMPARE_METHODS)}; --quick: itvm-euler,lfmd)")
    p.add_argument("--steps", type=int, default=None, help="student steps (default: the budget's, 300; quick 12)")
    p.add_argument("--batch-size", type=int, default=None, help="student batch (default: the budget's, 64)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the budget's, 2000)")
    p.add_argument("--no-wallclock", action="store_true", help="skip the equal wall-clock runs")
    p.add_argument("--quick", action="store_true", help="a test-sized run (seconds) to check the pipeline")
    p.add_argument("--out", default="ttfm_compare", help="output directory (default ./%(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return parser


def _print_summary(what: str, summary: dict[str, Any], out: str, parallel: Parallel | None = None) -> None:
    if parallel is not None and not parallel.main:
        return
    spt = summary.get("sec_per_step")
    print(f"{what}: {summary['steps']} steps, final loss {summary['final_loss']:.4g}"
          + (f", {spt * 1000:.1f} ms/step" if spt else "") + f"; wrote {out} (latest {summary['checkpoint']})")


def _cmd_train_teacher(a: argparse.Namespace) -> None:
    parallel = init_parallel(a.parallel, a.device)
    data = load_data(a.data)
    summary = train_teacher(data, a.data, a.out, _train_config(a), model=a.model, preset=a.preset, sigma=a.sigma,
                            time_scale=a.time_scale, time_sampling=a.time_sampling, device=a.device,
                            progress=not a.no_progress, resume=a.resume, parallel=parallel)
    _print_summary("teacher", summary, a.out, parallel)


def _distill_diffusers(a: argparse.Namespace) -> None:
    """``ttfm distill --teacher-diffusers DIR``: adapters.two_time of the diffusers teacher, trained by the shared
    Trainer (checkpoints and log in --out), its EMA weights saved with save_pretrained to OUT/student."""
    from ttfm_kernels.adapters import Teacher, two_time
    from ttfm_kernels.flow import EMA, TimeSampler
    from ttfm_kernels.losses import emd_loss, itvm_loss, lfmd_loss
    from ttfm_kernels.train.trainer import Trainer

    if a.teacher is not None or a.data is None or a.adaptive:
        raise ValueError("--teacher-diffusers takes --data (the training images) and neither --teacher nor "
                         "--adaptive")
    teacher = Teacher.from_pretrained(a.teacher_diffusers, prediction=a.prediction, scheduler_dir=a.scheduler_dir)
    teacher = teacher.to(a.device).requires_grad_(False)
    config = teacher.model.config
    size = config.sample_size
    shape = (config.in_channels, *(size if isinstance(size, (list, tuple)) else (size, size)))
    data = load_data(a.data)
    if data.sample(1, torch.Generator()).numel() != int(np.prod(shape)):
        raise ValueError(f"--data {a.data!r} holds {data.dim}-D points; the model's samples are {shape}")
    student = two_time(teacher)
    sampler = TimeSampler(marginal=a.time_sampling)
    losses = {"itvm": lambda m, e, x1: itvm_loss(m, teacher, x1, ema=e, target=a.target, time_sampler=sampler),
              "lfmd": lambda m, e, x1: lfmd_loss(m, teacher, x1, time_sampler=sampler),
              "emd": lambda m, e, x1: emd_loss(m, teacher, x1, time_sampler=sampler)}
    cfg = _train_config(a)
    ema = EMA(student, decay=cfg.ema_decay)
    run_config = {"kind": "two_time_student", "teacher_diffusers": str(a.teacher_diffusers),
                  "prediction": teacher.prediction, "data": a.data, "loss": a.loss, "target": a.target}
    trainer = Trainer(student, ema, lambda m, e, x1: losses[a.loss](m, e, x1.reshape(len(x1), *shape)), data, cfg,
                      a.out, run_config=run_config, device=a.device, progress=not a.no_progress, desc=a.loss)
    summary = trainer.fit(resume=a.resume)
    student.load_state_dict(ema.module.state_dict())
    saved = student.save_pretrained(Path(a.out) / "student")
    _print_summary(f"distill ({a.loss}, diffusers)", summary, a.out)
    print(f"wrote {saved} (the EMA student: diffusers {type(student.model).__name__} + two_time files; "
          "load it with adapters.load_two_time(dir, teacher))")


def _cmd_distill(a: argparse.Namespace) -> None:
    if a.loss not in LOSSES:
        raise ValueError(f"unknown loss {a.loss!r}; choose one of {', '.join(LOSSES)}")
    parallel = init_parallel(a.parallel, a.device)
    if a.teacher_diffusers is not None:
        if parallel.distributed:
            raise ValueError("--teacher-diffusers runs in one process (no torchrun / --parallel yet)")
        return _distill_diffusers(a)
    if a.teacher is None:
        raise ValueError("pass --teacher (a checkpoint) or --teacher-diffusers (a saved diffusers model)")
    _, tconfig = load_model(a.teacher)
    spec = a.data or tconfig.get("data", "checkerboard")
    summary = distill(a.teacher, load_data(spec), spec, a.out, _train_config(a), loss=a.loss, target=a.target,
                      adaptive=a.adaptive, time_sampling=a.time_sampling, device=a.device,
                      progress=not a.no_progress, resume=a.resume, parallel=parallel)
    _print_summary(f"distill ({a.loss})", summary, a.out, parallel)


def _draw(model: torch.nn.Module, config: dict[str, Any], n: int, steps: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = float(getattr(model, "sigma", 1.0)) * torch.randn(n, *sample_shape(model), generator=g)
    with torch.no_grad():
        if config.get("kind") == "teacher":
            return ode_solve(model, x0, steps=steps, method="heun")
        return sample(model, x0, steps=steps)


def _cmd_sample(a: argparse.Namespace) -> None:
    model, config = load_model(a.ckpt)
    images = len(sample_shape(model)) == 3
    num = a.num or (64 if images else 10000)
    x = _draw(model, config, num, a.steps, a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x.numpy())
    print(f"wrote {num} samples ({a.steps} steps) to {out}")
    if a.png:
        if images:
            _image_grid_png(a.png, x)
        else:
            _scatter_png(a.png, [[(f"{config.get('loss', 'teacher')} N={a.steps}", x)]])
        print(f"wrote {a.png}")


def _cmd_eval(a: argparse.Namespace) -> None:
    student, config = load_model(a.ckpt)
    if config.get("kind") != "student":
        raise CheckpointError(f"{a.ckpt} is not a student checkpoint; `ttfm eval` evaluates distilled students")
    teacher, _ = load_model(a.teacher or config["teacher"])
    data = load_data(a.data or config["data"])
    name = config.get("loss", "student")
    ckpt = Path(a.ckpt)
    cache = (ckpt if ckpt.is_dir() else ckpt.parent) / "classifier.pt"
    res, _ = evaluate({name: student}, teacher, data, steps=a.steps, n=a.num or (1000 if data.is_image else 4096),
                      teacher_steps=a.teacher_steps, seed=a.seed, classifier_cache=cache)
    print(format_table(res, [name]))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {a.out}")


def format_table(res: dict[str, Any], methods: list[str]) -> str:
    """One block per metric: rows are methods (and the teacher's N-step Euler solve), columns step counts."""
    steps = [str(k) for k in res["steps"]]
    rows = ["teacher_euler", *methods]
    lines = []
    if "classifier_accuracy" in res:
        lines += [f"digits classifier (the Frechet / coverage features): held-out accuracy "
                  f"{res['classifier_accuracy']:.4f}", ""]
    for key, title in _METRICS:
        if key not in res[rows[-1]][steps[0]]:
            continue
        lines.append(f"{title} (lower is better)")
        lines.append(f"  {'method':<16}" + "".join(f"{'N=' + k:>10}" for k in steps))
        for r in rows:
            label = "teacher Euler" if r == "teacher_euler" else r.upper()
            lines.append(f"  {label:<16}" + "".join(f"{res[r][k][key]:>10.4f}" for k in steps))
        if key != "teacher_rmse":
            lines.append(f"  {'teacher Heun-' + str(res['teacher_steps']):<16}{res['teacher_heun'][key]:>10.4f}"
                         f"   (data vs data floor: {res['floor'][key]:.4f})")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _image_grid_png(path: str | Path, x: torch.Tensor, *, max_images: int = 64, min_pixels: int = 32,
                    cols: int | None = None) -> None:
    """A grid of the first ``max_images`` images of x (N, C, H, W) in [-1, 1] (``cols`` per row, default
    square-ish), 1-pixel white gaps, each image enlarged (nearest) to at least ``min_pixels`` pixels; grey for
    C = 1, RGB for C = 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x[:max_images].detach().cpu().float().clamp(-1, 1).add(1).div(2)
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"an image grid needs 1 or 3 channels, got {c}")
    zoom = max(1, -(-min_pixels // h))
    x = x.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    hz, wz = h * zoom, w * zoom
    grid = torch.ones(c, rows * (hz + 1) + 1, cols * (wz + 1) + 1)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (hz + 1):1 + r * (hz + 1) + hz, 1 + q * (wz + 1):1 + q * (wz + 1) + wz] = x[i]
    img = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    plt.imsave(path, img, cmap="gray" if c == 1 else None, vmin=0.0, vmax=1.0)


def _scatter_png(path: str | Path, grid: list[list[tuple[str, torch.Tensor] | None]], *,
                 extent: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows, ncols = len(grid), max(len(r) for r in grid)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.2 * nrows), squeeze=False)
    for i, row in enumerate(grid):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            cell = row[j] if j < len(row) else None
            if cell is None:
                ax.axis("off")
                continue
            title, pts = cell
            pts = pts.detach().cpu().numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.4, linewidths=0, rasterized=True)
            ax.set_title(title, fontsize=8)
            if extent is not None:
                ax.set_xlim(-extent, extent)
                ax.set_ylim(-extent, extent)
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The demo's budgets. Full: sized to finish in a few minutes on 2 CPU cores with meaningful gaps between losses.
_DEMO = {
    "full": {"preset": "small", "teacher": {"steps": 6000, "batch_size": 512, "lr": 3e-3, "warmup": 200},
             "student": {"steps": 1000, "batch_size": 512, "lr": 3e-4, "warmup": 50, "ema_decay": 0.99},
             "eval": {"n": 4096, "teacher_steps": 100}},
    "quick": {"preset": "tiny", "teacher": {"steps": 150, "batch_size": 256, "lr": 2e-3, "warmup": 20},
              "student": {"steps": 20, "batch_size": 128, "lr": 3e-4, "warmup": 5, "ema_decay": 0.9},
              "eval": {"n": 512, "teacher_steps": 10}},
}


def _cmd_demo(a: argparse.Namespace) -> None:
    budget = _DEMO["quick" if a.quick else "full"]
    out = Path(a.out)
    runs = out / "runs"
    if runs.exists() and any(runs.iterdir()):
        raise CheckpointError(f"{out} already holds a demo; remove it or pass --out DIR (nothing was overwritten)")
    data_spec, progress = "checkerboard", not a.no_progress
    data = load_data(data_spec)
    command = "ttfm demo" + (" --quick" if a.quick else "") + (f" --seed {a.seed}" if a.seed else "")
    print(f"{command}: torch {torch.__version__}, {torch.get_num_threads()} threads; writing {out}/")
    start = time.perf_counter()
    tcfg = TrainConfig(**budget["teacher"], seed=a.seed, ckpt_every=10**9, log_every=50)
    teacher_sum = train_teacher(data, data_spec, runs / "teacher", tcfg, preset=budget["preset"], progress=progress)
    _print_summary("teacher", teacher_sum, str(runs / "teacher"))
    students, timing = {}, {"teacher": teacher_sum["sec_per_step"]}
    scfg = TrainConfig(**budget["student"], seed=a.seed, ckpt_every=10**9, log_every=50)
    for loss in LOSSES:
        summary = distill(runs / "teacher", data, data_spec, runs / loss, scfg, loss=loss, progress=progress)
        _print_summary(f"distill ({loss})", summary, str(runs / loss))
        students[loss] = load_model(runs / loss)[0]
        timing[loss] = summary["sec_per_step"]
    teacher, _ = load_model(runs / "teacher")
    res, drawn = evaluate(students, teacher, data, seed=a.seed, **budget["eval"])
    res.update(command=command, data=data_spec, budget=budget, sec_per_step=timing,
               threads=torch.get_num_threads(), torch=torch.__version__, wall_s=time.perf_counter() - start)
    header = (f"{command}  ({data_spec}; teacher {budget['preset']} MLP {tcfg.steps} steps x {tcfg.batch_size}; "
              f"each student {scfg.steps} steps x {scfg.batch_size}, same seed; {res['n']} samples)\n"
              "wall-clock per training step: "
              + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timing.items() if v) + "\n\n")
    table = header + format_table(res, list(LOSSES))
    print(table, end="")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(table)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    grid: list[list[tuple[str, torch.Tensor] | None]] = [
        [(f"teacher Euler N={k}", drawn["teacher_euler"][str(k)]) for k in res["steps"]]
        + [("data (held out)", drawn["data"])]]
    for i, loss in enumerate(students):
        extra = (f"teacher Heun-{res['teacher_steps']}", drawn["teacher_heun"]) if i == 0 else None
        grid.append([(f"{loss.upper()} N={k}", drawn[loss][str(k)]) for k in res["steps"]] + [extra])
    _scatter_png(out / "samples.png", grid, extent=2.6)
    print(f"wrote {out / 'table.txt'}, {out / 'results.json'}, {out / 'samples.png'} "
          f"({res['wall_s']:.0f} s)")


def _cmd_compare(a: argparse.Namespace) -> None:
    methods = a.methods.split(",") if a.methods else (["itvm-euler", "lfmd"] if a.quick else list(COMPARE_METHODS))
    seeds = a.seeds if a.seeds is not None else (1 if a.quick else 3)
    cfg = CompareConfig(data=a.data, model=a.model, seeds=seeds, quick=a.quick, methods=tuple(methods),
                        student_steps=a.steps, student_batch=a.batch_size, teacher_steps=a.teacher_steps,
                        wallclock=not a.no_wallclock)
    out = Path(a.out)
    print(f"ttfm compare: {cfg.data}, {cfg.model}, {cfg.seeds} seed(s), methods {', '.join(cfg.methods)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; writing {out}/")
    summary = run_compare(cfg, out, progress=not a.no_progress)
    table, grids = format_tables(summary), []
    for n_steps, rows in summary["samples"].items():
        path = out / f"samples_{n_steps}step.png"
        x = torch.cat(list(rows.values()))
        _image_grid_png(path, x, max_images=len(x), cols=len(next(iter(rows.values()))))
        grids.append(str(path))
        table += f"\n{path.name}: {n_steps}-step samples from one noise, rows top to bottom: {', '.join(rows)}.\n"
    (out / "table.md").write_text(table)
    print(table, end="")
    print(f"{summary['trained']} runs trained, {summary['skipped']} already finished (skipped), "
          f"{summary['wall_s']:.0f} s; wrote {out / 'results.json'}, {out / 'table.md'}, {', '.join(grids)}")


_COMMANDS = {"demo": _cmd_demo, "train-teacher": _cmd_train_teacher, "distill": _cmd_distill,
             "sample": _cmd_sample, "eval": _cmd_eval, "compare": _cmd_compare}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ttfm`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        _COMMANDS[args.command](args)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"ttfm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"ttfm {args.command}: training diverged: {e}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
