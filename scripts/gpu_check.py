"""`make gpu-check`: prove the GPU paths on a machine with a CUDA device, in one call, and write a report.

    python3 scripts/gpu_check.py [--stages build,parity,bench] [--report-dir DIR] [--deadline SECONDS]

It uses the interpreter that runs it (its torch and triton), creates no venv and downloads nothing. Stages run
in this order, any subset alone (a rerun skips what passed):

- ``build``: ``setup.py build_ext --inplace`` with ``TTFM_BUILD_CUDA=1``, ``TORCH_CUDA_ARCH_LIST`` = this
  GPU's architecture (``cuda_arch``: 9.0a on an H100/H200), ``MAX_JOBS`` = the cores, and ``CUDA_HOME`` = the
  toolkit root of the real ``nvcc`` on PATH (symlinks resolved); then a fresh interpreter must load ``_C``,
  ``_C_vec`` (where the CPU has AVX2) and ``_C_cuda`` and find the CUDA kernels.
- ``parity``: ``pytest tests/gpu -m gpu -n 8`` with ``TTFM_TEST_TRITON_INTERPRET=0`` (compiled Triton, never
  the interpreter). It fails on any failure or error, on any SKIPPED ``gpu`` test (a skip on a GPU machine is a
  hole, not a pass) and when nothing was collected. Modules skipped at import (``pytest.importorskip`` of a
  package the machine lacks) are listed as not collected.
- ``bench``: ``pytest benchmarks -m gpu``: every figure (medians, speedups, TFLOP/s, bytes/s) goes to the report.

Output: ``report.md`` and ``report.json`` (GPU, driver, torch / triton / CUDA versions, date, every test's result,
every figure) and one log per stage (``build.log``, ``parity.log``, ``bench.log``, ``bench.json``) in
``--report-dir``, else ``$GPU_REPORT_DIR``, else ``$OUT`` when set, else ``gpu-report``: six files at most. The
report is rewritten after every stage and every test, so a time-out still leaves what finished. Each stage is
cut at ``--deadline`` seconds after the start (default 330: a whole check fits a 6-minute call).

Exit status: 0 when every selected stage passed; 1 when one failed; 2 without a CUDA device (within seconds,
"no CUDA device", nothing built or written) or on bad arguments.

The module is also the pytest plugin (``-p scripts.gpu_check``) that records each test's outcome as it ends,
in the JSON-lines file named by ``TTFM_GPU_RESULTS``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("build", "parity", "bench")
#: Longest time a stage may take (seconds), within the overall deadline.
STAGE_LIMITS = {"build": 240, "parity": 150, "bench": 150}
DEFAULT_DEADLINE = 330
PARITY_WORKERS = 8
RESULTS_ENV = "TTFM_GPU_RESULTS"
EXTENSIONS = ("_C", "_C_vec", "_C_cuda")
CUDA_KERNELS = ("flow_map_step", "itvm_residual_loss_fwd")
MESSAGE_CHARS = 1500
TICK_S = 10.0  # how often the report is rewritten while a pytest stage runs


class NoCudaDevice(RuntimeError):
    """This machine has no usable CUDA device (the message says what torch reports)."""


# --- pure helpers (rehearsed in make test) -------------------------------------------------------------------

def parse_stages(text: str) -> tuple[str, ...]:
    """"build,parity" -> the named stages in run order; raises ValueError naming an unknown or missing stage."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ValueError(f"--stages must be a comma-separated subset of {','.join(STAGES)}, got {text!r}")
    return tuple(s for s in STAGES if s in names)


def cuda_arch(capability: tuple[int, int]) -> str:
    """TORCH_CUDA_ARCH_LIST entry for a device of this compute capability: "9.0a" for Hopper (its arch-specific
    features, as ``make check-cuda`` builds), "major.minor" otherwise."""
    major, minor = capability
    return f"{major}.{minor}{'a' if (major, minor) == (9, 0) else ''}"


def cuda_home(nvcc: str | None) -> str:
    """The toolkit root holding the real ``bin/nvcc``: the nvcc on PATH with symlinks resolved, or, when that is a
    wrapper script outside any toolkit (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), the directory nvcc itself
    reports running from (``_HERE_`` in ``nvcc -dryrun``)."""
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH: the CUDA extension cannot be built")
    real = Path(os.path.realpath(nvcc))
    candidates = [real.parent.parent]
    try:
        proc = subprocess.run([str(real), "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60)
        here = re.search(r"^#\$ _HERE_=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
        if here:
            candidates.append(Path(here.group(1).strip()).parent)
    except OSError:
        pass
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    raise RuntimeError(f"nvcc at {nvcc} (resolved {real}) belongs to no toolkit holding include/cuda_runtime.h "
                       f"(looked in {', '.join(map(str, candidates))}); set CUDA_HOME")


def report_dir(arg: str | None, environ: Mapping[str, str]) -> Path:
    """--report-dir, else $GPU_REPORT_DIR, else $OUT (the device machine's returned folder), else gpu-report."""
    return Path(arg or environ.get("GPU_REPORT_DIR") or environ.get("OUT") or "gpu-report")


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records the plugin wrote (one JSON object per line; a line cut by a kill is dropped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def judge_tests(records: Sequence[Mapping[str, Any]], *, skips_fail: bool) -> dict[str, Any]:
    """Counts, per-test results, not-collected modules and the problems of one pytest stage's records."""
    tests = [r for r in records if r["kind"] == "test"]
    counts: dict[str, int] = {}
    for r in tests:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    not_collected = [r for r in records if r["kind"] == "collect" and r["outcome"] == "skipped"]
    problems = [f"{r['id']}: collection {r['outcome']}" for r in records
                if r["kind"] == "collect" and r["outcome"] == "failed"]
    problems += [f"{r['id']}: {r['outcome']}" for r in tests
                 if r["outcome"] in ("failed", "error") or (skips_fail and r["outcome"] == "skipped")]
    if not tests:
        problems.append("no test ran")
    return {"counts": counts, "tests": tests, "not_collected": not_collected, "problems": problems}


def figures(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The benchmark figures (``extra_info`` of each timed case) in the records of the bench stage."""
    return [{"test": r["id"], **r["figures"]} for r in records if r.get("figures")]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: the machine, each stage's status, every test result and every benchmark figure."""
    m = report["machine"]
    lines = [f"# gpu-check report ({report['updated']})", "",
             f"- GPU: {m.get('gpu')} (compute capability {m.get('capability')}, {m.get('gpu_memory_gib')} GiB), "
             f"driver {m.get('driver')}",
             f"- torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), triton {m.get('triton')}, "
             f"python {m.get('python')}, nvcc {m.get('nvcc')}",
             f"- started {report['started']}; stages asked: {', '.join(report['stages_asked'])}",
             f"- result: **{'PASS' if report['ok'] else 'FAIL'}**", "",
             "| stage | status | seconds | notes |", "|---|---|---|---|"]
    for name, st in report["stages"].items():
        notes = "; ".join(st.get("problems", [])[:5]) or _fmt(st.get("counts", ""))
        lines.append(f"| {name} | {st['status']} | {st.get('seconds', 0):.0f} | {notes} |")
    for name in ("parity", "bench"):
        st = report["stages"].get(name)
        if not st or not st.get("tests"):
            continue
        lines += ["", f"## {name}: {_fmt(st['counts'])}", "", "| test | outcome | seconds |", "|---|---|---|"]
        lines += [f"| `{t['id']}` | {t['outcome']} | {t['seconds']:.2f} |" for t in st["tests"]]
        for r in st.get("not_collected", []):
            lines.append(f"| `{r['id']}` | not collected: {r.get('message', '')[:200]} | |")
        for t in st["tests"]:
            if t["outcome"] != "passed" and t.get("message"):
                lines += ["", f"### {t['id']} ({t['outcome']})", "", "```", t["message"], "```"]
    all_figures = [f for st in report["stages"].values() for f in st.get("figures", [])]
    if all_figures:
        lines += ["", "## Benchmark figures (median of interleaved rounds; speedup = baseline / candidate)", ""]
        for f in all_figures:
            medians = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in f.get("median_s", {}).items())
            speedups = ", ".join(f"{k} x{v:.2f}" for k, v in f.get("speedup", {}).items())
            extra = {k: v for k, v in f.items()
                     if k not in ("test", "case", "baseline", "rounds", "median_s", "min_s", "speedup")}
            lines.append(f"- **{f.get('case', f['test'])}** ({f.get('rounds')} rounds, baseline "
                         f"{f.get('baseline')}): {medians}; {speedups}" + (f"; {_fmt(extra)}" if extra else ""))
    return "\n".join(lines) + "\n"


def write_report(directory: Path, report: Mapping[str, Any]) -> None:
    """Write report.json and report.md (each through a temporary name, so a kill never leaves half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=2, default=str) + "\n"),
                       ("report.md", render_markdown(report))):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(directory / name)


# --- the machine ---------------------------------------------------------------------------------------------

def require_cuda() -> dict[str, Any]:
    """Facts about this machine's GPU and software; raises NoCudaDevice without a usable CUDA device."""
    try:
        import torch
    except ImportError as err:
        raise NoCudaDevice(f"{sys.executable} cannot import torch ({err}); set PYTHON to the interpreter that "
                           "holds the CUDA build of torch") from None
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise NoCudaDevice(f"torch {torch.__version__} ({build}) at {sys.executable} reports "
                           "torch.cuda.is_available() == False")
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "gpu": props.name, "capability": f"{props.major}.{props.minor}", "arch_list": cuda_arch((props.major,
                                                                                                  props.minor)),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
        "executable": sys.executable, "cpus": len(os.sched_getaffinity(0)), "host": platform.node(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["driver"] = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    nvcc = _run_quiet(["nvcc", "--version"])
    info["nvcc"] = next((line.strip() for line in (nvcc or "").splitlines() if "release" in line), nvcc)
    return info


def _run_quiet(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _run_logged(cmd: list[str], log: Path, env: Mapping[str, str], timeout: float,
                on_tick: Callable[[], None] = lambda: None) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group, appending its output to ``log`` and calling ``on_tick`` every
    ``TICK_S`` seconds meanwhile; (return code or None on time-out, seconds). On time-out the whole group
    (pytest-xdist workers, nvcc) is killed."""
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        rc: int | None = None
        while rc is None and time.monotonic() - start < timeout:
            try:
                rc = proc.wait(timeout=min(TICK_S, max(timeout - (time.monotonic() - start), 0.1)))
            except subprocess.TimeoutExpired:
                on_tick()
        if rc is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\n[gpu-check] killed after {timeout:.0f} s\n")
    return rc, time.monotonic() - start


class Check:
    """One gpu-check run: the report it keeps up to date and the stages it runs."""

    def __init__(self, directory: Path, stages: tuple[str, ...], deadline: float, machine: dict[str, Any]):
        self.dir = directory
        self.deadline = time.monotonic() + deadline
        now = _now()
        self.report: dict[str, Any] = {"started": now, "updated": now, "stages_asked": list(stages),
                                       "machine": machine, "stages": {}, "ok": True}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                              os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1", "TTFM_TEST_TRITON_INTERPRET": "0"}

    def save(self) -> None:
        self.report["updated"] = _now()
        self.report["ok"] = all(s["status"] == "passed" for s in self.report["stages"].values())
        write_report(self.dir, self.report)

    def run(self, stage: str) -> None:
        left = self.deadline - time.monotonic()
        st: dict[str, Any] = {"status": "running", "log": f"{stage}.log"}
        self.report["stages"][stage] = st
        if left < 5:
            st.update(status="not run", problems=["out of time (--deadline)"])
        else:
            print(f"gpu-check: {stage} (at most {min(left, STAGE_LIMITS[stage]):.0f} s; log {self.dir / st['log']})",
                  flush=True)
            self.save()
            getattr(self, f"_{stage}")(st, min(left, STAGE_LIMITS[stage]))
        self.save()
        print(f"gpu-check: {stage} {st['status']} in {st.get('seconds', 0):.0f} s"
              + "".join(f"\n    {p}" for p in st.get("problems", [])[:20]), flush=True)

    def _build(self, st: dict[str, Any], timeout: float) -> None:
        env = {**self.env, "TTFM_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": self.report["machine"]["arch_list"],
               "MAX_JOBS": str(min(16, len(os.sched_getaffinity(0)))), "TTFM_NVCC_FLAGS": "--resource-usage"}
        log = self.dir / st["log"]
        try:
            env["CUDA_HOME"] = os.environ.get("CUDA_HOME") or cuda_home(shutil.which("nvcc"))
        except RuntimeError as err:
            st.update(status="failed", seconds=0.0, problems=[str(err)])
            return
        st["env"] = {k: env[k] for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
        rc, seconds = _run_logged([sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp",
                                   "build/gpu-check"], log, env, timeout)
        st["seconds"] = seconds
        if rc != 0:
            st.update(status="timeout" if rc is None else "failed",
                      problems=[f"setup.py build_ext {'timed out' if rc is None else f'exited {rc}'} (see {log.name})"])
            return
        text = log.read_text()
        st["cuda_spills"] = [line.strip() for line in text.splitlines()
                             if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)]
        probe = ("import json, torch\nfrom ttfm_kernels import _ext\n"
                 f"print(json.dumps({{'status': _ext.status(), 'kernels': {{k: _ext.has_kernel(k, 'CUDA') "
                 f"for k in {CUDA_KERNELS!r}}}}}))")
        proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        with log.open("a") as out:
            out.write(f"\n$ import check\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            st.update(status="failed", problems=[f"importing the built extensions failed (see {log.name})"])
            return
        loaded = json.loads(proc.stdout.strip().splitlines()[-1])
        st.update(extensions=loaded["status"], cuda_kernels=loaded["kernels"])
        problems = [f"ttfm_kernels.{k}: {why}" for k, why in loaded["status"].items()
                    if why is not None and not (k == "_C_vec" and "AVX2" in why)]
        problems += [f"no CUDA kernel registered for ttfm::{k}" for k, ok in loaded["kernels"].items() if not ok]
        st.update(status="failed" if problems else "passed", problems=problems)

    def _pytest(self, st: dict[str, Any], timeout: float, args: list[str], *, skips_fail: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            results = Path(tmp, "results.jsonl")
            env = {**self.env, RESULTS_ENV: str(results)}
            log = self.dir / st["log"]
            cmd = [sys.executable, "-m", "pytest", *args, "-p", "scripts.gpu_check", "-p", "no:cacheprovider",
                   "-v", "-rA", "--durations=15"]

            def fold() -> None:  # the results so far into the report (a kill from outside keeps them)
                records = read_results(results)
                st.update(judge_tests(records, skips_fail=skips_fail), figures=figures(records))

            def tick() -> None:
                fold()
                self.save()

            rc, seconds = _run_logged(cmd, log, env, timeout, tick)
            st["seconds"] = seconds
            fold()
        if rc is None:
            st["problems"].insert(0, f"timed out after {seconds:.0f} s (results so far are kept)")
        elif rc not in (0, 1, 5) and not st["problems"]:
            st["problems"].append(f"pytest exited {rc} (see {log.name})")
        st["status"] = "timeout" if rc is None else "failed" if st["problems"] or rc != 0 else "passed"

    def _parity(self, st: dict[str, Any], timeout: float) -> None:
        import importlib.util

        workers = min(PARITY_WORKERS, len(os.sched_getaffinity(0)))
        xdist = ["-n", str(workers)] if importlib.util.find_spec("xdist") and workers > 1 else []
        self._pytest(st, timeout, ["tests/gpu", "-m", "gpu", *xdist], skips_fail=True)

    def _bench(self, st: dict[str, Any], timeout: float) -> None:
        self._pytest(st, timeout, ["benchmarks", "-m", "gpu", f"--benchmark-json={self.dir / 'bench.json'}"],
                     skips_fail=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def main(argv: Sequence[str] | None = None, require: Callable[[], dict[str, Any]] = require_cuda) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--report-dir", help="default: $GPU_REPORT_DIR, else $OUT, else gpu-report")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE,
                        help="seconds after the start at which the running stage is cut")
    args = parser.parse_args(argv)
    try:
        stages = parse_stages(args.stages)
    except ValueError as err:
        parser.error(str(err))
    try:
        machine = require()
    except NoCudaDevice as err:
        print(f"gpu-check: no CUDA device: {err}. Nothing was built or written; run it on a machine with an "
              "NVIDIA GPU (see README, 'make gpu-check').", file=sys.stderr)
        return 2
    directory = report_dir(args.report_dir, os.environ)
    print(f"gpu-check: {machine['gpu']} (sm {machine['capability']}), torch {machine['torch']}, triton "
          f"{machine['triton']}; stages {','.join(stages)}; report in {directory}", flush=True)
    check = Check(directory, stages, args.deadline, machine)
    check.save()
    for stage in stages:
        check.run(stage)
    print(f"gpu-check: {'PASS' if check.report['ok'] else 'FAIL'}; report {directory / 'report.md'}", flush=True)
    return 0 if check.report["ok"] else 1


# --- the pytest plugin (-p scripts.gpu_check): one JSON line per test as it ends ---------------------------

_results_file: Path | None = None


def pytest_configure(config: Any) -> None:
    """Record on the controller only (pytest-xdist workers hand their reports to it)."""
    global _results_file
    path = os.environ.get(RESULTS_ENV)
    if path and not hasattr(config, "workerinput"):
        _results_file = Path(path)


def _record(record: dict[str, Any]) -> None:
    if _results_file is not None:
        with _results_file.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def _message(report: Any) -> str:
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    return str(report.longrepr or "")[-MESSAGE_CHARS:]


def pytest_runtest_logreport(report: Any) -> None:
    """One record per test: its call outcome, or its setup/teardown failure, or its skip at setup."""
    failed_phase = report.when != "call" and report.outcome == "failed"
    if report.when == "call" or failed_phase or (report.when == "setup" and report.outcome == "skipped"):
        outcome = "error" if failed_phase else report.outcome
        record: dict[str, Any] = {"kind": "test", "id": report.nodeid, "outcome": outcome,
                                  "seconds": round(report.duration, 3)}
        if outcome != "passed":
            record["message"] = _message(report)
        props = dict(report.user_properties)
        if props.get("figures"):
            record["figures"] = props["figures"]
        _record(record)


def pytest_collectreport(report: Any) -> None:
    """Modules skipped at import (``pytest.importorskip``) or failing to import."""
    if report.outcome != "passed":
        _record({"kind": "collect", "id": report.nodeid, "outcome": report.outcome, "message": _message(report)})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """Attach a benchmark's ``extra_info`` (the ``compare`` fixture's figures) to its call report."""
    outcome = yield
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if call.when == "call" and bench is not None and getattr(bench, "extra_info", None):
        outcome.get_result().user_properties.append(("figures", dict(bench.extra_info)))


if __name__ == "__main__":
    sys.exit(main())
