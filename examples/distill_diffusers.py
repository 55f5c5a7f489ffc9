"""Distill a diffusers model into a few-step two-time flow map, end to end, on a CPU in a few minutes.

1. Train a tiny diffusers ``UNet2DModel`` as a flow-matching teacher in diffusers' own convention (prediction
   eps - x1 at timestep 1000 sigma, as for FlowMatchEulerDiscreteScheduler) on 8x8 digits
   (``ttfm_kernels.train.data.digits``; where that is not available, a generated set of 8x8 shapes, said so).
2. Wrap it with ``adapters.Teacher(unet, "flow")``, build the student with ``adapters.two_time`` and distill it
   with ITVM (EMA target).
3. Write ``grid.png`` (rows: teacher Heun 32 steps, student 1, 2 and 4 steps, same noise) and save the student
   with ``save_pretrained`` (``student/``: loadable by diffusers alone, plus the (t - s) embedding), the teacher
   to ``teacher/``.

    python examples/distill_diffusers.py --out distill_diffusers      # ~75 s of one core (4.5 min wall, loaded)
    python examples/distill_diffusers.py --quick --out /tmp/quick      # seconds: checks the pipeline

Needs diffusers (``pip install diffusers``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from PIL import Image

import ttfm_kernels as tk
from ttfm_kernels.adapters import Teacher, load_two_time, two_time

GRID_STEPS = (1, 2, 4)


def shapes(n: int, generator: torch.Generator) -> torch.Tensor:
    """n 8x8 one-channel images in [-1, 1]: a filled square, a ring or a cross, of random size and place."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    kind = torch.randint(0, 3, (n,), generator=generator)
    cy, cx = (2.5 + 2 * torch.rand(2, n, generator=generator))[:, :, None, None]
    r = (1.5 + torch.rand(n, generator=generator))[:, None, None]
    dy, dx = (yy - cy).abs(), (xx - cx).abs()
    square = (torch.maximum(dy, dx) <= r).float()
    dist = (dy.square() + dx.square()).sqrt()
    ring = ((dist - r).abs() <= 0.6).float()
    cross = ((torch.minimum(dy, dx) <= 0.5) & (torch.maximum(dy, dx) <= r + 0.5)).float()
    img = torch.where(kind[:, None, None] == 0, square, torch.where(kind[:, None, None] == 1, ring, cross))
    return (2 * img - 1)[:, None]


def training_images(n_toy: int) -> tuple[torch.Tensor, str]:
    """The digits training split (N, 1, 8, 8) in [-1, 1], or ``n_toy`` generated shapes where it is unavailable."""
    try:
        from ttfm_kernels.train.data import digits
        return digits(8, "train"), "digits"
    except ImportError as err:  # older ttfm_kernels, or scikit-learn missing
        print(f"digits unavailable ({err}); training on generated 8x8 shapes instead")
        return shapes(n_toy, torch.Generator().manual_seed(0)), "shapes"


def tiny_unet() -> UNet2DModel:
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16)


def fit(model: torch.nn.Module, loss_fn, data: torch.Tensor, steps: int, batch: int, lr: float, name: str,
        ema: tk.EMA | None = None) -> None:
    """AdamW with a cosine decay over ``steps``; prints the loss every quarter."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
    gen, start = torch.Generator().manual_seed(1), time.perf_counter()
    for step in range(1, steps + 1):
        x1 = data[torch.randint(0, len(data), (batch,), generator=gen)]
        loss, _ = loss_fn(model, x1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        if step % max(1, steps // 4) == 0 or step == steps:
            print(f"{name} step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")


def write_grid(rows: list[torch.Tensor], path: Path, scale: int = 4) -> None:
    """Rows of (N, 1, 8, 8) images in [-1, 1] as one grayscale PNG, each pixel ``scale`` x ``scale``, 1 px gaps."""
    tiles = [[np.pad(((img[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy(), 1) for img in row]
             for row in rows]
    grid = np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0)
    Image.fromarray(grid.repeat(scale, 0).repeat(scale, 1), mode="L").save(path)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="distill_diffusers", help="output directory (default %(default)s)")
    p.add_argument("--teacher-steps", type=int, default=800, help="teacher training steps (default %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="ITVM steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s: tiny "
                   "convolutions spin, not speed up, on more threads of a loaded machine)")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the pipeline only")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.teacher_steps, a.steps, a.batch = 3, 3, 8
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data, data_name = training_images(n_toy=2048)
    print(f"data: {len(data)} {data_name} images {tuple(data.shape[1:])}")

    # 1. The teacher, in diffusers' flow-matching convention, trained through the adapter.
    teacher = Teacher(tiny_unet(), "flow")
    fit(teacher, lambda m, x1: tk.flow_matching_loss(m, x1), data, a.teacher_steps, a.batch, 2e-3, "teacher")
    teacher.eval().requires_grad_(False)
    teacher.model.save_pretrained(out / "teacher")

    # 2. The two-time student u(x, s, t) = teacher(x, s) at initialisation, distilled with ITVM.
    student = two_time(teacher)
    ema = tk.EMA(student, decay=0.99)
    fit(student, lambda m, x1: tk.itvm_loss(m, teacher, x1, ema=ema), data, a.steps, a.batch, 1e-3, "itvm", ema)
    student.load_state_dict(ema.module.state_dict())
    student.eval()
    student.save_pretrained(out / "student")

    # 3. Samples from the same noise: the teacher's ODE and the reloaded student at 1, 2 and 4 steps.
    loaded = load_two_time(out / "student", teacher).eval()
    x0 = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = tk.ode_solve(teacher, x0, steps=32, method="heun")
        rows = [reference] + [tk.sample(loaded, x0, steps=k) for k in GRID_STEPS]
    write_grid(rows, out / "grid.png")
    rmse = {f"rmse_{k}_steps": float((row - reference).square().mean().sqrt()) for k, row in zip(GRID_STEPS, rows[1:],
                                                                                                 strict=True)}
    print("student vs teacher (same noise), RMSE: " + ", ".join(f"{k} steps {v:.3f}" for k, v in
                                                              zip(GRID_STEPS, rmse.values(), strict=True)))
    print(f"wrote {out / 'grid.png'}, {out / 'student'} (diffusers UNet2DModel + two_time files), {out / 'teacher'}")
    return rmse


if __name__ == "__main__":
    main()
