"""The benchmark harness measures what it claims: interleaving, speedups, peak memory, regression check."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmarks import compare
from benchmarks.harness import Comparison, peak_rss_mb, time_interleaved


def test_time_interleaved_rotates_the_order():
    calls: list[str] = []
    times = time_interleaved({n: (lambda n=n: calls.append(n)) for n in "abc"}, rounds=3)
    assert calls == list("abcbcacab")
    assert all(len(t) == 3 for t in times.values())


def test_comparison_speedup_is_baseline_over_candidate():
    res = Comparison("case", "eager", {"eager": [3.0, 1.0, 2.0], "fused": [0.5, 0.4, 0.6]})
    assert res.median("eager") == 2.0
    assert res.speedup("fused") == pytest.approx(4.0)
    assert res.summary()["rounds"] == 3


def make_alloc(mb: int) -> Callable[[], torch.Tensor]:
    """peak_rss_mb entry point: a call that touches ``mb`` MB (the setup's transient 3x peak must not hide it)."""
    torch.ones(3 * mb * 2**18).sum()
    return lambda: torch.ones(mb * 2**18)


def test_peak_rss_mb_measures_one_call_in_a_fresh_process():
    assert 30 <= peak_rss_mb("tests.gates.test_bench_harness:make_alloc", mb=32) < 40


def _results(path: Path, medians: dict[str, float]) -> Path:
    bench = {"extra_info": {"case": "op cpu fp32", "rounds": 5, "median_s": medians,
                            "speedup": {k: medians["eager"] / v for k, v in medians.items()}}}
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": [bench]}))
    return path


def test_compare_fails_on_a_median_regression_beyond_the_threshold(tmp_path: Path):
    baseline = tmp_path / "baseline.json"
    base_run = _results(tmp_path / "base.json", {"eager": 1.0, "fused": 0.2})
    assert compare.main([str(base_run), str(baseline), "--update"]) == 0
    assert set(json.loads(baseline.read_text())["cases"]) == {"op cpu fp32"}
    ok = _results(tmp_path / "ok.json", {"eager": 1.1, "fused": 0.24})
    slow = _results(tmp_path / "slow.json", {"eager": 1.0, "fused": 0.26})
    assert compare.main([str(ok), str(baseline), "--threshold", "0.25"]) == 0
    assert compare.main([str(slow), str(baseline), "--threshold", "0.25"]) == 1
    assert compare.main([str(slow), str(baseline), "--threshold", "0.25", "--metric", "speedup"]) == 0
