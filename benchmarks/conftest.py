"""pytest side of the benchmarks: the ``compare`` fixture, machine info, GPU skips, the printed table.

    def test_step(compare):
        res = compare(case="flow_map_step cpu B8 C4 64x64 fp32",
                      fns={"eager": eager, "cpu": fused}, baseline="eager", check=check, rounds=20)
        res.check_speedup("cpu", floor=1.0, goal=2.0)  # asserts the floor, records the goal

``compare`` runs ``check()`` first (it asserts parity with ``ttfm_kernels.testing``; a failure fails the
test and no timing is recorded), then times the candidates interleaved through pytest-benchmark's
``benchmark.pedantic`` (its own statistics are of one whole round: all candidates once). Per-candidate
medians and speedups go to the JSON's ``extra_info`` and to the table printed at the end of the run.
``@pytest.mark.gpu`` cases are skipped when CUDA is unavailable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import SUMMARY_KEYS, Comparison, time_round

_RESULTS: list[Comparison] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU case: no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    machine_info["ttfm"] = harness.machine_info()


@pytest.fixture
def compare(benchmark: Any) -> Callable[..., Comparison]:
    """Time zero-arg callables interleaved after a parity check; returns a ``Comparison``."""

    def run(*, case: str, fns: dict[str, Callable[[], Any]], baseline: str, check: Callable[[], None],
            rounds: int = 10, warmup: int = 1) -> Comparison:
        if baseline not in fns:
            raise ValueError(f"baseline {baseline!r} is not one of the candidates {list(fns)}")
        if any(r.case == case for r in _RESULTS):
            raise ValueError(f"benchmark case {case!r} is used twice: case names key the baseline JSON")
        check()
        times: dict[str, list[float]] = {name: [] for name in fns}

        def one_round() -> None:
            for name, t in time_round(fns, len(times[baseline])).items():
                times[name].append(t)

        benchmark.group = case
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup, iterations=1)
        kept = min(rounds, min(len(t) for t in times.values()))  # drop the warm-up rounds
        res = Comparison(case, baseline, {name: t[-kept:] for name, t in times.items()},
                         extra=benchmark.extra_info)  # record() writes straight into the JSON
        benchmark.extra_info.update(res.summary())
        _RESULTS.append(res)
        return res

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("ttfm benchmark ratios (median of interleaved rounds; speedup = baseline / candidate)")
    load = os.getloadavg()[0]
    tr.write_line(f"threads={torch.get_num_threads()}  torch={torch.__version__}  load={load:.1f} on {os.cpu_count()} "
                  f"cores{'  (overloaded: timings unreliable)' if load > (os.cpu_count() or 1) else ''}")
    for res in _RESULTS:
        tr.write_line(f"{res.case}  [{len(res.times[res.baseline])} rounds]")
        for name in res.times:
            tag = "  (baseline)" if name == res.baseline else ""
            tr.write_line(f"    {name:<16} {res.median(name) * 1e3:10.3f} ms   x{res.speedup(name):6.2f}{tag}")
        for key, value in res.extra.items():
            if key not in SUMMARY_KEYS:
                shown = f"{value:.4g}" if isinstance(value, float) else value
                tr.write_line(f"    {key:<28} {shown}")
