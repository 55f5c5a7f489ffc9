"""Many ranks on CPU (gloo): each test starts its own 2-process torchrun job (--standalone: a free port; no
restarts) on the tiny MLP. DDP equals one rank with the same global batch, exact resume after a SIGKILL,
FSDP2 sharding, sharded checkpoints and the LFMD gradient, and the errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ttfm_kernels.cli import main
from ttfm_kernels.losses import lfmd_loss
from ttfm_kernels.train import runs
from ttfm_kernels.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ttfm_kernels.train.data import load_data
from ttfm_kernels.train.parallel import Parallel
from ttfm_kernels.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402  (the worker's settings and fixed batch)

TOL = {"rtol": 1e-5, "atol": 1e-6}  # fp32: the averaged gradient sums in another order than one rank's


def _torchrun(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def _one_rank(monkeypatch, fn, *args, **kwargs) -> dict[str, dict]:
    """Run ``fn`` in this process, one rank, recording like the worker does."""
    monkeypatch.setattr(Trainer, "fit", Trainer.fit)
    monkeypatch.setattr(Trainer, "_batch", Trainer._batch)
    results: dict[str, dict] = {}
    dist_worker._record(results)
    torch.set_num_threads(1)
    fn(*args, **kwargs)
    return results


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    cfg = TrainConfig(**{**dist_worker.CFG, "steps": 2})
    runs.train_teacher(load_data("moons"), "moons", out, cfg, preset="tiny", progress=False)
    return out


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=k)


def test_ddp_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, monkeypatch):
    _torchrun(str(HERE / "dist_worker.py"), "teacher", str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt")["teacher"] for r in (0, 1))
    assert r0["x1"].shape == (8, 2) and not torch.equal(r0["x1"], r1["x1"])  # each rank its half
    for key in ("params", "ema"):
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key])  # bitwise across ranks
    one = _one_rank(monkeypatch, runs.train_teacher, load_data("moons"), "moons", tmp_path / "one" / "teacher",
                    TrainConfig(**dist_worker.CFG), preset="tiny", progress=False)["teacher"]
    assert torch.equal(torch.cat([r0["x1"], r1["x1"]]), one["x1"])  # the same global samples
    _assert_close(r0["params"], one["params"])
    _assert_close(r0["ema"], one["ema"])
    first = load_checkpoint(tmp_path / "one" / "teacher" / "ckpt_00000002.pt")["model"]
    assert any(not torch.equal(first[k], v) for k, v in one["params"].items())  # steps 3-4 moved the weights
    # the logged loss is the mean over ranks: the one-rank loss of the whole batch
    two_log = [json.loads(x) for x in r0["log"].splitlines()]
    one_log = [json.loads(x) for x in one["log"].splitlines()]
    assert [r["step"] for r in two_log] == [2, 4]
    for a, b in zip(two_log, one_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(tmp_path, teacher, capsys):
    base = ["-m", "ttfm_kernels", "distill", "--teacher", str(teacher), "--loss", "itvm", "--steps", "6",
            "--batch-size", "16", "--warmup", "1", "--ckpt-every", "2", "--log-every", "2", "--no-progress"]
    _torchrun(*base, "--out", str(tmp_path / "full"))
    killed = _torchrun(*base, "--out", str(tmp_path / "run"), env={"TTFM_FAULT_AT_STEP": "4"}, check=False)
    assert killed.returncode != 0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    _torchrun(*base, "--out", str(tmp_path / "run"), "--resume")
    full, resumed = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "run")
    assert full["step"] == resumed["step"] == 6 and full["world_size"] == 2
    for key in ("model", "ema"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("full", "run")]
    assert [(r["step"], r["loss"]) for r in logs[0]] == [(r["step"], r["loss"]) for r in logs[1]]
    assert [r["step"] for r in logs[1]] == [2, 4, 6]
    # the 2-rank run's checkpoint does not resume on one rank
    assert main([*base[2:], "--out", str(tmp_path / "run"), "--steps", "8", "--resume"]) == 2
    assert "written by a run on 2 rank(s), this one has 1: resume on 2" in capsys.readouterr().err


def test_fsdp2_shards_matches_ddp_round_trips_and_gives_the_one_rank_lfmd_gradient(tmp_path, teacher):
    _torchrun(str(HERE / "dist_worker.py"), "fsdp", str(tmp_path), str(teacher))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    ddp, fsdp = r0["ddp"], r0["fsdp_trained"]
    assert fsdp["local_numel"] * 2 == fsdp["full_numel"] == ddp["full_numel"] == ddp["local_numel"]
    assert r1["fsdp_trained"]["local_numel"] == fsdp["local_numel"]
    _assert_close(fsdp["params"], ddp["params"])
    _assert_close(fsdp["ema"], ddp["ema"])
    losses = [[json.loads(x)["loss"] for x in run["log"].splitlines()] for run in (ddp, fsdp)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # the sharded checkpoint: loaded back by the ranks (resume) and consolidated in one process
    for k, v in fsdp["params"].items():
        assert torch.equal(r0["fsdp"]["params"][k], v)
        assert torch.equal(r1["fsdp"]["params"][k], v)
    ckpt = tmp_path / "fsdp" / "ckpt_00000004.dcp"
    assert ckpt.is_dir() and [p.name for p in list_checkpoints(tmp_path / "fsdp")][-1] == ckpt.name
    state = load_checkpoint(ckpt)
    assert state["world_size"] == 2 and state["step"] == 4
    for k, v in fsdp["params"].items():
        assert torch.equal(state["model"][k], v)
    model, _ = runs.load_model(ckpt)  # sampling takes the directory like a file: the EMA weights
    for k, v in model.state_dict().items():
        assert torch.equal(v, fsdp["ema"][f"module.{k}"])
    # one LFMD gradient through the tangent: each rank's half, averaged by FSDP2, is the one-rank gradient
    teacher_model, _ = runs.load_model(teacher)
    student = runs._STUDENTS[type(teacher_model)].from_teacher(teacher_model).requires_grad_(True)
    b = dist_worker.gradient_batch()
    lfmd_loss(student, teacher_model, b["x1"], x0=b["x0"], s=b["s"], t=b["t"])[0].backward()
    grads = {k: p.grad for k, p in student.named_parameters()}
    assert sum(g.abs().sum() for g in grads.values()) > 0
    _assert_close(r0["grad"], grads)
    _assert_close(r1["grad"], grads)


def test_bad_input_gets_clear_errors(tmp_path, monkeypatch, capsys, teacher):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train-teacher", "--parallel", "fsdp", "--steps", "1", "--out", str(tmp_path / "a")]) == 2
    assert "--parallel fsdp needs several processes: start the command with torchrun" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--batch-size 33 \(the global batch\) is not divisible by the world "
                                         r"size 2"):
        Parallel(rank=1, world_size=2).local_slice(33)
    assert Parallel(rank=1, world_size=2).local_slice(32) == slice(16, 32)
    # a one-rank checkpoint does not resume on two ranks
    trainer = Trainer(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), lambda *a, **k: None, load_data("moons"),
                      TrainConfig(batch_size=4), teacher, parallel=Parallel(rank=0, world_size=2))
    with pytest.raises(CheckpointError, match=r"written by a run on 1 rank\(s\), this one has 2: resume on 1"):
        trainer._resume()
