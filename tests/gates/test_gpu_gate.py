"""The GPU compile gate passes a sound Triton configuration and fails an oversized one.

The gate runs in a subprocess without TRITON_INTERPRET (this test session sets it, and under the
interpreter @triton.jit builds no compilable kernel), exactly as `make check-gpu-compile` runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ttfm_kernels._gpu_gate import Result, judge

ROOT = Path(__file__).resolve().parents[2]


def _gate(tmp_path: Path, *args: str) -> tuple[int, str]:
    report = tmp_path / "gpu-compile.txt"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ttfm_kernels._gpu_gate", "--jobs", "1", "--report", str(report),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert report.exists(), proc.stderr
    assert report.read_text() in proc.stdout
    return proc.returncode, report.read_text()


def test_gate_passes_a_configuration_within_limits(tmp_path: Path):
    rc, report = _gate(tmp_path, "--module", "tests.gates.gate_kernels")
    assert rc == 0, report
    rows = [line for line in report.splitlines() if line.startswith("gate_test/matmul/BM64/BK64/S2")]
    assert len(rows) == 2 and all(row.endswith(" ok") for row in rows), report
    assert "OK: 2/2 compilations passed" in report


def test_gate_fails_an_oversized_configuration(tmp_path: Path):
    rc, report = _gate(tmp_path, "--module", "tests.gates.gate_kernels_oversized", "--only", "*/BK256/*")
    assert rc == 1, report
    assert "shared memory 196608 B > 166912 B limit of sm_80" in report
    assert "shared memory 262144 B > 232448 B limit of sm_90" in report
    assert "BK64" not in report  # --only selected the oversized configuration alone


def _result(**kw) -> Result:
    return Result(**{"config": "k", "arch": 90, "default": True, "num_warps": 4, "shared": 1024, "registers": 64,
                     "spill_stores": 0, "spill_loads": 0, **kw})


def test_judge_spills_fail_only_default_configurations_and_registers_are_bounded():
    assert judge(_result()) == []
    assert judge(_result(default=False, spill_stores=16, spill_loads=8)) == []
    assert judge(_result(spill_stores=16, spill_loads=8)) == ["default configuration spills (16 B stores, 8 B loads)"]
    assert judge(_result(registers=255, num_warps=8)) == []  # 255 x 256 threads fits in 64 K registers
    assert "per block" in judge(_result(registers=200, num_warps=16))[0]
    assert judge(_result(error="CompilationError: x")) == ["compile failed: CompilationError: x"]
