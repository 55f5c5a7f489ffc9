"""Trainer and checkpoints: complete atomic files, exact resume, NaN stop, clear errors, nothing overwritten,
plain progress lines off a terminal."""

import io
import json
import re
import sys

import pytest
import torch

from ttfm_kernels.flow import EMA
from ttfm_kernels.models import MLP
from ttfm_kernels.train.checkpoint import (
    REQUIRED_KEYS,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from ttfm_kernels.train.data import load_data
from ttfm_kernels.train.trainer import PlainProgress, TrainConfig, Trainer, TrainingDiverged

CFG = {"steps": 12, "batch_size": 32, "lr": 3e-3, "warmup": 3, "ckpt_every": 4, "log_every": 2, "ema_decay": 0.9}


class Crash(Exception):
    pass


def _fm_loss(crash_at: int | None = None, nan_at: int | None = None):
    """A flow-matching loss with its own noise and times from the global RNG (like the library's losses);
    optionally crashes (a killed run) or returns NaN at a given call."""
    calls = {"n": 0}

    def loss_fn(model, ema, x1):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0])
        xt = (1 - t)[:, None] * x0 + t[:, None] * x1
        loss = (model(xt, t) - (x1 - x0)).square().mean()
        return (loss * float("nan") if calls["n"] == nan_at else loss), {"t_mean": t.mean()}

    return loss_fn


def _trainer(out, loss_fn, **overrides):
    torch.manual_seed(0)
    model = MLP.from_preset("tiny", hidden=32)
    return Trainer(model, EMA(model, decay=0.9), loss_fn, load_data("moons"), TrainConfig(**{**CFG, **overrides}),
                   out, run_config={"note": "test"}, progress=False)


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()] + \
        [p.detach().clone() for p in trainer.ema.state_dict().values() if isinstance(p, torch.Tensor)]


def test_interrupted_then_resumed_run_is_bitwise_equal(tmp_path):
    full = _trainer(tmp_path / "full", _fm_loss())
    summary = full.fit()
    assert summary["steps"] == 12 and summary["sec_per_step"] > 0
    crashed = _trainer(tmp_path / "run", _fm_loss(crash_at=7))  # dies during step 7, after the step-4 checkpoint
    with pytest.raises(Crash):
        crashed.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt_00000004.pt"]
    torch.manual_seed(123)  # the resumed process starts from other RNG states: the checkpoint must restore them
    resumed = _trainer(tmp_path / "run", _fm_loss())
    resumed.fit(resume=True)
    for a, b in zip(_params(full), _params(resumed), strict=True):
        assert torch.equal(a, b)
    # the log is the uninterrupted run's log: lines after the checkpoint were dropped and written again
    full_log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    run_log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in run_log] == [r["step"] for r in full_log] == [2, 4, 6, 8, 10, 12]
    assert [r["loss"] for r in run_log] == [r["loss"] for r in full_log]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "t_mean"} <= set(run_log[0])
    # keep=2: only the last two checkpoints remain, each complete
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt_00000008.pt", "ckpt_00000012.pt"]
    state = load_checkpoint(tmp_path / "run")
    assert set(REQUIRED_KEYS) <= set(state) and state["step"] == 12
    assert state["config"]["note"] == "test" and state["config"]["train"]["steps"] == 12
    assert {"torch", "numpy", "python"} <= set(state["rng"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, _fm_loss(nan_at=6))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 6.*ckpt_00000004\.pt is kept"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000004.pt"]
    assert load_checkpoint(tmp_path)["step"] == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_fresh_run_refuses_a_directory_with_checkpoints_and_resume_needs_one(tmp_path):
    _trainer(tmp_path, _fm_loss(), steps=4).fit()
    before = (tmp_path / "ckpt_00000004.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        _trainer(tmp_path, _fm_loss(), steps=4).fit()
    assert (tmp_path / "ckpt_00000004.pt").read_bytes() == before
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        _trainer(tmp_path / "empty", _fm_loss()).fit(resume=True)
    other = _trainer(tmp_path, _fm_loss(), steps=8)
    other.run_config["note"] = "another run"
    with pytest.raises(CheckpointError, match=r"belongs to a different run.*note: 'test' in the checkpoint"):
        other.fit(resume=True)
    assert list(tmp_path.glob("ckpt_*.pt")) == [tmp_path / "ckpt_00000004.pt"]


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "ckpt_00000001.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="incomplete"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}})
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.glob(".*tmp"))
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"incomplete: missing \['ema'"):
        load_checkpoint(tmp_path / "partial.pt")


def test_plain_progress_lines_every_few_percent_and_no_carriage_returns(tmp_path, monkeypatch):
    stream = io.StringIO()
    bar = PlainProgress(40, desc="teacher", stream=stream, every_percent=25, every_s=1e9)
    for k in range(40):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (k + 1):.3g}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 4
    assert [ln.split(" ")[1] for ln in lines] == ["10/40", "20/40", "30/40", "40/40"]
    assert re.fullmatch(r"teacher: 20/40 \(50%\) \d+s, loss=0\.0526", lines[1]), lines[1]  # postfix of step 19
    # a time-based line between percentages, and a final line at close for steps since the last line
    stream = io.StringIO()
    bar = PlainProgress(1000, desc="itvm", stream=stream, every_percent=50, every_s=0.0)
    bar.update(3)
    bar.close()
    assert stream.getvalue().splitlines()[0].startswith("itvm: 3/1000 (0%)")
    # the trainer uses it when stderr is not a terminal (pytest's capture is not)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    trainer = _trainer(tmp_path, _fm_loss())
    trainer.progress = True
    trainer.fit()
    assert err.getvalue().splitlines()[-1].startswith("train: 12/12 (100%)") and "\r" not in err.getvalue()
