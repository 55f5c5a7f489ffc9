"""The benchmark harness measures what it claims: interleaving, speedups, peak memory, regression check."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmarks import compare
from benchmarks.harness import Comparison, peak_rss_mb

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[2]


def test_compare_fixture_checks_parity_first_interleaves_and_records(pytester: pytest.Pytester):
    pytester.makeconftest((ROOT / "benchmarks" / "conftest.py").read_text())
    pytester.makepyfile(bench_cases="""
        import pytest
        calls = []

        def test_ok(compare):
            res = compare(case="ok", fns={"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                          baseline="a", check=lambda: calls.append("check"), rounds=4, warmup=1)
            assert calls == ["check", *"abbaabbaab"]  # the check, 1 warm-up round, 4 rounds rotated
            res.record("peak_rss_mb.b", 1.5)

        def test_parity_failure_records_no_timing(compare):
            def check():
                raise AssertionError("not close")
            compare(case="bad", fns={"a": lambda: calls.append("x")}, baseline="a", check=check)

        @pytest.mark.gpu
        def test_gpu_case(compare):
            pass
    """)
    result = pytester.runpytest("bench_cases.py", "--benchmark-json=out.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, skipped=0 if torch.cuda.is_available() else 1)
    result.stdout.fnmatch_lines(["*ttfm benchmark ratios*", "ok  [[]4 rounds[]]", "*peak_rss_mb.b*1.5"])
    data = json.loads((pytester.path / "out.json").read_text())
    assert [b["extra_info"]["case"] for b in data["benchmarks"]] == ["ok"]
    info = data["benchmarks"][0]["extra_info"]
    assert info["rounds"] == 4 and set(info["median_s"]) == {"a", "b"} and info["peak_rss_mb.b"] == 1.5
    assert data["machine_info"]["ttfm"]["torch_num_threads"] == torch.get_num_threads()


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
