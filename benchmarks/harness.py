"""The measurement rules every benchmark follows, in one place.

- Candidates of one case are timed interleaved in the same run (round r runs every candidate once, in an
  order rotated by r), so machine load and clock drift hit them alike; ratios are taken within the run.
- A timing counts only after the case's parity check passed (``ttfm_kernels.testing`` inside ``check``).
- Peak memory is the ``ru_maxrss`` growth of a fresh subprocess running the method once (no CPU
  peak-memory API exists in torch; a fresh process keeps earlier cases out of the number).

The pytest side (the ``compare`` fixture, JSON output, printing) is in ``benchmarks/conftest.py``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["SUMMARY_KEYS", "Comparison", "machine_info", "peak_dram_bytes_per_s", "peak_rss_mb", "time_round"]

ROOT = Path(__file__).resolve().parents[1]
#: The keys ``Comparison.summary`` writes into a benchmark's ``extra_info`` (others come from ``record``).
SUMMARY_KEYS = ("case", "baseline", "rounds", "median_s", "min_s", "speedup")


def _sync() -> None:
    """Wait for queued GPU work, so a timing covers the kernels and not just their launches."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_round(fns: Mapping[str, Callable[[], Any]], r: int) -> dict[str, float]:
    """Run every candidate once, starting from the ``r``-th (round r of an interleaved run); seconds by name."""
    names = list(fns)
    times = {}
    for i in range(len(names)):
        name = names[(r + i) % len(names)]
        _sync()
        start = time.perf_counter()
        fns[name]()
        _sync()
        times[name] = time.perf_counter() - start
    return times


@dataclass
class Comparison:
    """The timings of one case: ``median(name)`` in seconds, ``speedup(name)`` = baseline / name."""

    case: str
    baseline: str
    times: dict[str, list[float]]
    extra: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def speedup(self, name: str) -> float:
        return self.median(self.baseline) / self.median(name)

    def record(self, key: str, value: Any) -> None:
        """Store another measurement of this case (e.g. ``peak_rss_mb.fused``) in the JSON and the printout."""
        self.extra[key] = value

    def check_speedup(self, name: str, *, floor: float, goal: float | None = None) -> None:
        """Assert ``speedup(name) >= floor``; record the floor and, when given, the goal and whether it was met.

        The floor is a regression check set with margin below the worst run recorded (docs/performance.md), so a
        healthy build passes; the goal (what the op aims for) is printed and stored in the JSON, not asserted.
        """
        speedup = self.speedup(name)
        self.record(f"floor_speedup.{name}", floor)
        if goal is not None:
            self.record(f"goal_speedup.{name}", goal)
            self.record(f"meets_goal.{name}", speedup >= goal)
        assert speedup >= floor, (f"{self.case}: {name} runs {speedup:.2f}x the {self.baseline!r} baseline, below "
                                  f"its floor of {floor}x")

    def summary(self) -> dict[str, Any]:
        """The ``SUMMARY_KEYS`` of the JSON's ``extra_info``: medians and minima (seconds), speedups, rounds."""
        return {
            "case": self.case,
            "baseline": self.baseline,
            "rounds": len(self.times[self.baseline]),
            "median_s": {n: self.median(n) for n in self.times},
            "min_s": {n: min(t) for n, t in self.times.items()},
            "speedup": {n: self.speedup(n) for n in self.times},
        }


def machine_info() -> dict[str, Any]:
    """Versions and hardware facts a timing depends on (stored in the JSON's ``machine_info``)."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # Above the core count, threads wait on descheduled peers and ratios drift (docs/performance.md).
        "loadavg_1m": os.getloadavg()[0],
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import ttfm_kernels
        from ttfm_kernels import _ext
        info["ttfm_kernels"] = ttfm_kernels.__version__
        info["ttfm_extensions"] = {k: v or "loaded" for k, v in _ext.status().items()}
    except ImportError as err:
        info["ttfm_kernels"] = f"import failed: {err}"
    return info


def peak_dram_bytes_per_s() -> float | None:
    """The current GPU's DRAM bandwidth (bytes/s, double data rate) from its memory clock and bus width, when
    torch reports them; GPU bandwidth figures are given as a fraction of it."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


_RSS_CHILD = """
import importlib, json, resource, sys
module, _, attr = sys.argv[1].partition(":")
fn = getattr(importlib.import_module(module), attr)(**json.loads(sys.argv[2]))

def status_kb(key):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))

try:  # reset the peak to the current RSS (Linux >= 4.0), so transient peaks of the setup do not hide fn's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, peak = status_kb("VmRSS"), lambda: status_kb("VmHWM")
except OSError:  # no reset: growth above the peak reached so far (can under-count)
    before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, None
fn()
after = peak() if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK_RSS_KB", after - before)
"""


def peak_rss_mb(target: str, **kwargs: Any) -> float:
    """Peak-memory growth (MB) of running a method once, in a fresh Python process.

    ``target`` is "module:make_fn"; the child calls ``fn = make_fn(**kwargs)`` (which builds the inputs and
    does any warm-up it wants counted out), resets the process's peak resident size (``ru_maxrss``, kept by
    Linux as VmHWM) to its current resident size, runs ``fn()`` once and reports how far the peak grew:
    every page the call touched beyond what was resident (outputs and temporaries, freed or not). kwargs
    must be JSON-serialisable (pass dtypes and shapes as strings and lists). CPU memory only.
    """
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, target, json.dumps(kwargs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"peak_rss_mb({target!r}, {kwargs}) failed:\n{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_KB "):
            return int(line.split()[1]) / 1024  # Linux reports ru_maxrss in KiB
    raise RuntimeError(f"peak_rss_mb({target!r}): no measurement in the child's output:\n{proc.stdout[-2000:]}")
