"""End to end with diffusers: examples/distill_diffusers.py in its quick mode, and ``ttfm distill
--teacher-diffusers`` on a tiny saved UNet2DModel (nothing downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ttfm_kernels.adapters import Teacher, load_two_time  # noqa: E402
from ttfm_kernels.cli import main  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distill_diffusers.py"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_example_runs_in_quick_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("distill_diffusers", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rmse = example.main(["--quick", "--out", str(tmp_path)])
    assert set(rmse) == {"rmse_1_steps", "rmse_2_steps", "rmse_4_steps"}
    assert all(np.isfinite(v) and v > 0 for v in rmse.values())
    assert (tmp_path / "grid.png").stat().st_size > 100
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "two_time.json",
                 "two_time_embedding.safetensors"):
        assert (tmp_path / "student" / name).is_file()
    diffusers.UNet2DModel.from_pretrained(tmp_path / "student")  # diffusers alone


def test_cli_distills_a_saved_diffusers_model(tmp_path, capsys):
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4).save_pretrained(tmp_path / "unet")
    np.save(tmp_path / "images.npy", np.random.default_rng(0).uniform(-1, 1, (20, 64)).astype(np.float32))
    out = tmp_path / "run"
    args = ["distill", "--teacher-diffusers", str(tmp_path / "unet"), "--prediction", "flow", "--data",
            str(tmp_path / "images.npy"), "--steps", "2", "--batch-size", "4", "--warmup", "1", "--out", str(out),
            "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert str(out / "student") in capsys.readouterr().out
    teacher = Teacher.from_pretrained(tmp_path / "unet", prediction="flow")
    student = load_two_time(out / "student", teacher)
    x, s, t = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.5]), torch.tensor([0.7, 0.5])
    with torch.no_grad():
        moved = (student(x, s, t) - teacher(x, s)).abs().max()
    assert 0 < moved < 1  # two small steps away from the teacher
    assert main([*args[:6], str(tmp_path / "missing.npy"), *args[7:]]) == 2  # a bad --data: one clear line
    assert main(["distill", "--data", "moons"]) == 2  # neither teacher
