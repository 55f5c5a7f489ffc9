"""CPU rehearsal of `make gpu-check` (scripts/gpu_check.py) and of the test switch in tests/conftest.py: every
part that needs no GPU (stage selection, arch and toolkit detection, the no-GPU stop, the pytest plugin and
the report writer on a recorded fake suite, the count of collected GPU tests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from scripts import gpu_check
from tests.conftest import INTERPRET_OVERRIDE, use_triton_interpreter

ROOT = Path(__file__).resolve().parents[2]
#: The @pytest.mark.gpu tests in tests/gpu (each later kernel issue raises it with its own cases).
EXPECTED_GPU_TESTS = 77
MACHINE = {"gpu": "Fake GPU", "capability": "9.0", "arch_list": "9.0a", "driver": "580.0", "torch": "2.11.0",
           "torch_cuda": "13.0", "triton": "3.6.0", "python": "3.12", "nvcc": "release 13.0", "gpu_memory_gib": 1}


@pytest.mark.parametrize(("cuda", "override", "interpret"), [
    (False, None, True), (True, None, False), (True, "1", True), (False, "0", False)])
def test_interpreter_only_without_cuda_unless_overridden(monkeypatch, cuda, override, interpret):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    environ = {} if override is None else {INTERPRET_OVERRIDE: override}
    assert use_triton_interpreter(environ) is interpret
    with pytest.raises(ValueError, match=INTERPRET_OVERRIDE):
        use_triton_interpreter({INTERPRET_OVERRIDE: "yes"})


def test_this_session_runs_triton_in_the_interpreter():
    assert os.environ["TRITON_INTERPRET"] == ("1" if use_triton_interpreter() else "0")


def test_collect_only_finds_every_gpu_test():
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "--collect-only", "-q", "-m", "gpu",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    found = re.search(r"(\d+)(?:/\d+)? tests? collected", proc.stdout)
    assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert int(found.group(1)) >= EXPECTED_GPU_TESTS


def test_stage_selection():
    assert gpu_check.parse_stages("bench,build") == ("build", "bench")  # always run in build, parity, bench order
    assert gpu_check.parse_stages(" parity ") == ("parity",)
    for bad in ("", "build,install", ","):
        with pytest.raises(ValueError, match="subset of build,parity,bench"):
            gpu_check.parse_stages(bad)


def test_arch_and_toolkit_detection(tmp_path: Path):
    assert gpu_check.cuda_arch((9, 0)) == "9.0a"
    assert gpu_check.cuda_arch((8, 0)) == "8.0"
    assert gpu_check.cuda_arch((8, 9)) == "8.9"
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").touch()
    real = toolkit / "bin" / "nvcc"  # a stand-in that answers -dryrun like nvcc does
    real.write_text(f"#!/bin/sh\necho '#$ _HERE_={toolkit}/bin' >&2\n")
    real.chmod(0o755)
    (tmp_path / "local" / "bin").mkdir(parents=True)
    link = tmp_path / "local" / "bin" / "nvcc"  # /usr/local/bin/nvcc -> the toolkit's: torch would guess /usr/local
    link.symlink_to(real)
    assert gpu_check.cuda_home(str(link)) == str(toolkit)
    wrapper = tmp_path / "local" / "bin" / "nvcc-wrapper"  # a script that execs the real nvcc, as on our machines
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    assert gpu_check.cuda_home(str(wrapper)) == str(toolkit)
    with pytest.raises(RuntimeError, match="not on PATH"):
        gpu_check.cuda_home(None)
    stray = tmp_path / "local" / "bin" / "stray"
    stray.write_text("#!/bin/sh\n")
    stray.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"belongs to no toolkit holding include/cuda_runtime\.h"):
        gpu_check.cuda_home(str(stray))


def test_report_dir_precedence():
    assert gpu_check.report_dir("a", {"GPU_REPORT_DIR": "b", "OUT": "c"}) == Path("a")
    assert gpu_check.report_dir(None, {"GPU_REPORT_DIR": "b", "OUT": "c"}) == Path("b")
    assert gpu_check.report_dir(None, {"OUT": "c"}) == Path("c")
    assert gpu_check.report_dir(None, {}) == Path("gpu-report")


@pytest.mark.skipif(torch.cuda.is_available(), reason="rehearses the machine without a GPU")
def test_without_cuda_it_stops_at_once(tmp_path: Path, monkeypatch, capsys):
    """`make gpu-check` here: exit 2 and the no-CUDA message, nothing built or written (in-process: the same
    main() the Makefile runs, with this session's CPU build of torch)."""
    monkeypatch.setenv("GPU_REPORT_DIR", str(tmp_path / "report"))
    assert gpu_check.main(["--stages", "build,parity"]) == 2
    err = capsys.readouterr().err
    assert "gpu-check: no CUDA device" in err and "is_available() == False" in err
    assert not (tmp_path / "report").exists()
    with pytest.raises(SystemExit):  # a bad stage name is an argument error (exit 2), before any CUDA check
        gpu_check.main(["--stages", "install"])


FAKE_SUITE = '''
import pytest

def test_passes():
    assert 1 + 1 == 2

def test_fails():
    assert 1 == 2, "planted failure"

def test_skips():
    pytest.skip("planted skip")

def test_benchmark_figures(benchmark):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"case": "fake case", "baseline": "eager", "rounds": 1,
                                 "median_s": {"eager": 2e-3, "fused": 1e-3}, "speedup": {"eager": 1.0, "fused": 2.0},
                                 "tflops_fused_3x_forward": 123.4})
'''


class _RecordedCheck(gpu_check.Check):
    """A check whose build stage is a recorded success and whose parity stage runs the fake suite."""

    suite: Path

    def _build(self, st, timeout):
        st.update(status="passed", seconds=1.0, problems=[])

    def _parity(self, st, timeout):
        self._pytest(st, timeout, [str(self.suite)], skips_fail=True)


def test_report_of_a_recorded_run(tmp_path: Path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_fake.py").write_text(textwrap.dedent(FAKE_SUITE))
    (suite / "test_needs_missing.py").write_text("import pytest\npytest.importorskip('no_such_module_xyz')\n")
    check = _RecordedCheck(tmp_path / "report", ("build", "parity", "bench"), deadline=120, machine=MACHINE)
    check.suite = suite
    check.save()
    check.run("build")
    check.run("parity")
    check.deadline = 0.0  # the bench stage finds no time left
    check.run("bench")

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["ok"] is False and report["machine"]["gpu"] == "Fake GPU"
    build, parity, bench = (report["stages"][s] for s in ("build", "parity", "bench"))
    assert build["status"] == "passed" and bench["status"] == "not run"
    assert parity["status"] == "failed"
    assert parity["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert any(p.endswith("test_fails: failed") for p in parity["problems"])
    assert any(p.endswith("test_skips: skipped") for p in parity["problems"])  # a skip on a GPU is a hole
    assert [r["id"].rsplit("/", 1)[-1] for r in parity["not_collected"]] == ["test_needs_missing.py"]
    failed = next(t for t in parity["tests"] if t["id"].endswith("test_fails"))
    assert "planted failure" in failed["message"]
    (fig,) = parity["figures"]
    assert fig["case"] == "fake case" and fig["tflops_fused_3x_forward"] == 123.4
    md = (tmp_path / "report" / "report.md").read_text()
    assert "**FAIL**" in md and "Fake GPU" in md and "| parity | failed |" in md
    assert "fake case" in md and "fused 1.000 ms" in md and "fused x2.00" in md
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["parity.log", "report.json", "report.md"]


def test_a_running_stage_reports_meanwhile_and_is_cut_at_its_limit(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(gpu_check, "TICK_S", 0.1)
    ticks = []
    log = tmp_path / "stage.log"
    rc, seconds = gpu_check._run_logged([sys.executable, "-c", "import time; print('hi'); time.sleep(0.6)"], log,
                                        os.environ, timeout=30, on_tick=lambda: ticks.append(1))
    assert rc == 0 and len(ticks) >= 2 and "hi" in log.read_text()
    rc, seconds = gpu_check._run_logged([sys.executable, "-c", "import time; time.sleep(30)"], log, os.environ,
                                        timeout=0.5)
    assert rc is None and seconds < 10 and "killed after" in log.read_text()
