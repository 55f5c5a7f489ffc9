"""``ttfm compare``: the quick run end to end, resuming, refusing another configuration, bad input, divergence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from ttfm_kernels.cli import main
from ttfm_kernels.train.compare import METHODS, CompareConfig, format_tables, run_compare

QUICK = ["compare", "--quick", "--methods", "itvm-euler,lfmd", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    assert main([*QUICK, "--out", str(out)]) == 0
    return out


def test_quick_compare_writes_finite_metrics(quick_dir: Path) -> None:
    runs = json.loads((quick_dir / "results.json").read_text())["runs"]
    assert {"teacher", "itvm-euler/seed0", "lfmd/seed0", "wallclock/itvm-euler", "wallclock/lfmd"} <= set(runs)
    for key in ("itvm-euler/seed0", "lfmd/seed0"):
        rec = runs[key]
        assert rec["status"] == "done" and rec["steps"] == 12 and rec["sec_per_step"] > 0
        assert sorted(rec["metrics"]) == ["1", "2", "4", "8"]
        for row in rec["metrics"].values():
            for name in ("teacher_rmse", "frechet", "coverage_kl"):
                assert math.isfinite(row[name]) and row[name] >= 0
        assert len(rec["loss_curve"]) == 12 and all(math.isfinite(v) for v in rec["loss_curve"])
    # equal wall-clock: the faster method keeps its steps, the slower gets at most as many
    wc = {m: runs[f"wallclock/{m}"]["steps"] for m in ("itvm-euler", "lfmd")}
    assert max(wc.values()) == 12 and 1 <= min(wc.values()) <= 12
    table = (quick_dir / "table.md").read_text()
    assert "itvm-euler" in table and "Equal wall-clock" in table and "floor" in table
    for n in (1, 4):
        assert (quick_dir / f"samples_{n}step.png").stat().st_size > 100


def test_resumed_compare_skips_finished_runs(quick_dir: Path) -> None:
    results = quick_dir / "results.json"
    held = json.loads(results.read_text())
    finished = sum(1 for r in held["runs"].values() if r["status"] == "done")
    del held["runs"]["lfmd/seed0"]  # as if the compare had been interrupted during that run
    results.write_text(json.dumps(held))
    cfg = CompareConfig(quick=True, seeds=1, methods=("itvm-euler", "lfmd"))
    summary = run_compare(cfg, quick_dir, progress=False, log=lambda _: None)
    assert summary["trained"] == 1 and summary["skipped"] == finished - 1
    again = run_compare(cfg, quick_dir, progress=False, log=lambda _: None)
    assert again["trained"] == 0 and again["skipped"] == finished
    # a second seed extends the directory: only its two runs train
    more = run_compare(CompareConfig(quick=True, seeds=2, methods=("itvm-euler", "lfmd")), quick_dir,
                       progress=False, log=lambda _: None)
    assert more["trained"] == 2 and more["skipped"] == finished
    assert {"itvm-euler/seed1", "lfmd/seed1"} <= set(json.loads(results.read_text())["runs"])


def test_every_method_and_ablation_trains(tmp_path: Path) -> None:
    cfg = CompareConfig(quick=True, seeds=1, methods=tuple(METHODS), student_steps=4, wallclock=False)
    summary = run_compare(cfg, tmp_path, progress=False, log=lambda _: None)
    assert summary["trained"] == 1 + len(METHODS)
    for name in METHODS:
        rec = summary["runs"][f"{name}/seed0"]
        assert rec["status"] == "done", (name, rec.get("error"))
        assert all(math.isfinite(row["teacher_rmse"]) for row in rec["metrics"].values())
    assert "itvm-jvp-ema0" in format_tables(summary)


def test_changed_configuration_is_refused(quick_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (quick_dir / "results.json").read_text()
    assert main([*QUICK, "--steps", "20", "--out", str(quick_dir)]) == 2
    err = capsys.readouterr().err
    assert "another compare configuration" in err and "student.steps: 12 there, 20 now" in err
    assert (quick_dir / "results.json").read_text() == before


@pytest.mark.parametrize(("args", "needle"), [(["--methods", "itvm,lfmd"], "unknown method(s) 'itvm'"),
                                              (["--data", "moons"], "unknown data 'moons'"),
                                              (["--model", "mlp"], "unknown model 'mlp'"),
                                              (["--seeds", "0"], "seeds must be at least 1")])
def test_bad_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                              needle: str) -> None:
    assert main(["compare", "--quick", *args, "--out", str(tmp_path / "c")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_table_reports_a_diverged_method() -> None:
    row = {str(n): {"teacher_rmse": 1.0, "frechet": 2.0, "coverage_kl": 0.1} for n in (1, 2, 4, 8)}
    shared = {"teacher_euler": row, "teacher_heun": row["8"], "floor": row["8"], "classifier_accuracy": 0.9,
              "teacher_steps": 8}
    runs = {"teacher": {"status": "done", "steps": 30},
            "lfmd/seed0": {"status": "done", "sec_per_step": 0.01, "steps": 12, "metrics": row,
                           "loss_curve": [1.0, 0.5]},
            "lfmd/seed1": {"status": "done", "sec_per_step": 0.01, "steps": 12, "metrics": row,
                           "loss_curve": [1.0, 0.5]},
            "emd/seed0": {"status": "diverged", "steps": 12, "loss_curve": [1.0, 50.0]},
            "emd/seed1": {"status": "done", "sec_per_step": 0.01, "steps": 12, "metrics": row,
                          "loss_curve": [0.01, 0.2, 0.5, 5.0]},
            "progressive/seed0": {"status": "done", "sec_per_step": 0.01, "steps": 12, "metrics": row,
                                  "loss_curve": [1.0, 0.5]}}
    cfg = CompareConfig(quick=True, seeds=2, methods=("lfmd", "emd", "progressive"), wallclock=False)
    table = format_tables({"runs": runs, "meta": {"shared": shared}, "config": cfg.as_json(), "budget": cfg.budget()})
    assert "emd (1/2 diverged, loss curve runs/emd/seed0/log.jsonl; unstable: final loss 500x its early peak)" in table
    assert "| lfmd | **1 ± 0** |" in table
    assert "| progressive (1/2 seeds run) | **1** |" in table  # an interrupted compare's table says so
