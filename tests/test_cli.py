"""The `ttfm` command line: the quick demo and an image run end to end, kill-and-resume, clear errors on bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ttfm_kernels
from ttfm_kernels.cli import main
from ttfm_kernels.train.checkpoint import latest_checkpoint, load_checkpoint

# Child processes import the same ttfm_kernels as this one.
_ROOT = str(Path(ttfm_kernels.__file__).resolve().parents[1])
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """`--threads` sets torch's thread count for the process: put it back for the tests that follow."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_quick_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--no-progress", "--threads", "1"]) == 0
    out = tmp_path / "ttfm_demo"
    assert "writing ttfm_demo/" in capsys.readouterr().out
    table = (out / "table.txt").read_text()
    assert all(name in table for name in ("ITVM", "LFMD", "EMD", "teacher Euler", "N=8", "ms"))
    res = json.loads((out / "results.json").read_text())
    for loss in ("itvm", "lfmd", "emd"):
        assert res["sec_per_step"][loss] > 0
        for k in ("1", "2", "4", "8"):
            row = res[loss][k]
            assert set(row) == {"teacher_rmse", "sw2", "kl", "kl16"} and all(math.isfinite(v) for v in row.values())
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"
    # running again into the same directory refuses, and leaves the results alone
    before = (out / "results.json").read_bytes()
    assert main(["demo", "--quick", "--no-progress"]) == 2
    assert "already holds a demo" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    common = ["train-teacher", "--data", "moons", "--preset", "tiny", "--steps", "120", "--batch-size", "64",
              "--ckpt-every", "10", "--warmup", "10", "--no-progress", "--threads", "1"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "ttfm_kernels", *common, "--out", str(tmp_path / "run")],
                            env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(tmp_path / "run") is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(tmp_path / "run")["step"]
    if killed_at == 120:
        pytest.skip("the run finished before it could be killed")
    assert main([*common, "--out", str(tmp_path / "run"), "--resume"]) == 0
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "run")
    assert a["step"] == b["step"] == 120
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name, killed_at)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("demo", "train-teacher", "distill", "sample", "eval"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--preset", "tiny", "--steps", "20", "--batch-size", "32", "--warmup", "2",
                 "--no-progress", "--out", str(out)]) == 0
    return out


def test_distill_sample_eval_roundtrip(tmp_path, teacher_dir, capsys):
    student = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher_dir), "--loss", "itvm", "--steps", "6", "--batch-size", "32",
                 "--warmup", "1", "--no-progress", "--out", str(student)]) == 0
    assert main(["distill", "--teacher", str(teacher_dir), "--loss", "lfmd", "--adaptive", "1", "--steps", "2",
                 "--batch-size", "16", "--warmup", "1", "--no-progress", "--out", str(tmp_path / "lfmd")]) == 0
    assert load_checkpoint(tmp_path / "lfmd")["config"]["adaptive"] == 1.0
    assert main(["sample", "--ckpt", str(student), "--steps", "2", "-n", "100", "--out", str(tmp_path / "s.npy"),
                 "--png", str(tmp_path / "s.png")]) == 0
    pts = np.load(tmp_path / "s.npy")
    assert pts.shape == (100, 2) and np.isfinite(pts).all() and (tmp_path / "s.png").exists()
    assert main(["eval", "--ckpt", str(student), "--steps", "1,2", "-n", "256", "--teacher-steps", "10",
                 "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "ITVM" in out
    assert set(json.loads((tmp_path / "m.json").read_text())["itvm"]) == {"1", "2"}


@pytest.mark.parametrize("args, message", [
    (["train-teacher", "--data", "chekerboard"], "unknown data set 'chekerboard'"),
    (["train-teacher", "--data", "{bad_npy}"], "must hold an array of shape (N, D)"),
    (["distill", "--teacher", "{teacher}", "--loss", "lfdm"], "unknown loss 'lfdm'"),
    (["distill", "--teacher", "{teacher}", "--target", "exact"], "unknown target 'exact'"),
    (["distill", "--teacher", "{missing}"], "does not exist"),
    (["distill", "--teacher", "{corrupt}"], "corrupt or not a ttfm checkpoint"),
    (["eval", "--ckpt", "{teacher}"], "not a student checkpoint"),
    (["train-teacher", "--out", "{teacher}"], "already holds checkpoints"),
    (["train-teacher", "--model", "vit"], "unknown model 'vit'; choose one of mlp, dit, unet"),
    (["train-teacher", "--model", "mlp", "--data", "digits"], "holds images (1, 8, 8); use --model dit or unet"),
    (["train-teacher", "--model", "unet", "--data", "moons"], "holds 2-D points; use --model mlp"),
    (["train-teacher", "--model", "unet", "--data", "digits", "--preset", "huge"], "unknown preset 'huge'"),
    (["train-teacher", "--data", "digts"], "digits, digits16"),
])
def test_bad_input_is_a_clear_error_and_overwrites_nothing(tmp_path, teacher_dir, capsys, args, message):
    np.save(tmp_path / "bad.npy", np.zeros((5, 2, 2)))
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    paths = {"bad_npy": tmp_path / "bad.npy", "teacher": teacher_dir, "missing": tmp_path / "missing.pt",
             "corrupt": tmp_path / "corrupt.pt"}
    args = [a.format(**paths) for a in args]
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in teacher_dir.iterdir()}
    if "--out" not in args:
        args += ["--out", str(out)]
    assert main([*args, "--steps", "3", "--no-progress"] if args[0] != "eval" else args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert {p.name: p.read_bytes() for p in teacher_dir.iterdir()} == before


def test_image_run_end_to_end(tmp_path, capsys):
    """UNet teacher on digits, a few dozen ITVM steps, a PNG grid, and eval's image metrics with their floors."""
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    common = ["--no-progress", "--threads", "1"]
    assert main(["train-teacher", "--model", "unet", "--data", "digits", "--preset", "tiny", "--steps", "300",
                 "--batch-size", "64", "--lr", "3e-3", "--warmup", "10", "--out", str(teacher), *common]) == 0
    assert main(["distill", "--teacher", str(teacher), "--loss", "itvm", "--steps", "30", "--batch-size", "32",
                 "--warmup", "3", "--out", str(student), *common]) == 0
    assert load_checkpoint(student)["config"]["model"]["class"] == "TwoTimeUNet"
    assert main(["sample", "--ckpt", str(student), "--steps", "2", "-n", "16", "--out", str(tmp_path / "x.npy"),
                 "--png", str(tmp_path / "grid.png"), "--threads", "1"]) == 0
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (16, 1, 8, 8) and np.isfinite(x).all()
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "--ckpt", str(student), "--steps", "1,2", "-n", "200", "--teacher-steps", "100",
                 "--out", str(tmp_path / "m.json"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "Frechet" in out and "mode coverage" in out
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["classifier_accuracy"] > 0.93 and (student / "classifier.pt").is_file()
    assert set(res["itvm"]["1"]) == {"teacher_rmse", "sw2", "frechet", "coverage_kl"}
    # the teacher's fine Heun solve lies closer to the data than its 1-step Euler solve (a blurred mean image):
    # measured 146 vs 154 after these 300 teacher steps (150 steps left a 1% gap), floor 2.35
    assert res["floor"]["frechet"] < res["teacher_heun"]["frechet"] < res["teacher_euler"]["1"]["frechet"]
    assert 0 <= res["floor"]["coverage_kl"] < 0.01


def test_time_scale_reaches_teacher_and_student(tmp_path):
    """--time-scale is the models' constructor argument; the student built by from_teacher inherits it."""
    common = ["--batch-size", "4", "--warmup", "1", "--steps", "1", "--no-progress", "--threads", "1"]
    assert main(["train-teacher", "--model", "unet", "--data", "digits", "--preset", "tiny", "--time-scale", "1",
                 "--out", str(tmp_path / "t"), *common]) == 0
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--loss", "itvm", "--target", "euler",
                 "--out", str(tmp_path / "s"), *common]) == 0
    for run in ("t", "s"):
        assert load_checkpoint(tmp_path / run)["config"]["model"]["args"]["time_scale"] == 1.0
