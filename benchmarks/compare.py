"""Compare a benchmark run against the committed baseline; fail on a regression beyond a threshold.

    python -m benchmarks.compare benchmarks/results.json benchmarks/baseline-cpu.json --threshold 0.25
    python -m benchmarks.compare benchmarks/results.json benchmarks/baseline-cpu.json --update

RESULTS is pytest-benchmark's ``--benchmark-json`` output; the baseline is a small JSON keyed by case name
(the ``case=`` of ``compare``). ``--metric median`` (default) fails when a candidate's median time grew by
more than ``threshold`` (0.25 = 25 % slower); ``--metric speedup`` fails when a candidate's speedup over its
in-run baseline fell by more than ``threshold``, which survives a loaded machine better. Cases present on
only one side are listed, not failed (GPU cases are skipped on CPU machines). ``--update`` writes the run's
cases into the baseline, keeping the baseline's other cases, and does not compare.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: machine_info entries (from ``harness.machine_info``) that make two runs comparable.
MACHINE_KEYS = ("torch", "triton", "torch_num_threads", "torch_cpu_capability", "cpu_count", "cuda_device")


def load_results(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(machine facts, case -> {median_s, speedup, rounds}) from a pytest-benchmark JSON file."""
    data = json.loads(path.read_text())
    machine = data.get("machine_info", {})
    facts = {k: machine.get("ttfm", {}).get(k) for k in MACHINE_KEYS}
    facts["cpu"] = machine.get("cpu", {}).get("brand_raw")
    facts["loadavg_1m"] = machine.get("ttfm", {}).get("loadavg_1m")
    cases: dict[str, dict[str, Any]] = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "case" not in info:
            continue  # a plain pytest-benchmark test, not a compare() case
        if info["case"] in cases:
            raise SystemExit(f"{path}: case {info['case']!r} appears twice")
        cases[info["case"]] = {k: info[k] for k in ("median_s", "speedup", "rounds")}
    return facts, cases


def compare(results: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]], threshold: float,
            metric: str) -> list[str]:
    """Print the per-candidate comparison; return the regressions (empty: pass)."""
    regressions = []
    for case in sorted(results.keys() & baseline.keys()):
        print(case)
        new, old = results[case], baseline[case]
        for name in new["median_s"]:
            if name not in old["median_s"]:
                print(f"    {name:<16} new candidate")
                continue
            t_new, t_old = new["median_s"][name], old["median_s"][name]
            s_new, s_old = new["speedup"][name], old["speedup"][name]
            bad = (t_new > t_old * (1 + threshold)) if metric == "median" else (s_new < s_old * (1 - threshold))
            flag = "  REGRESSION" if bad else ""
            print(f"    {name:<16} {t_old * 1e3:9.3f} -> {t_new * 1e3:9.3f} ms ({t_new / t_old:5.2f}x)   "
                  f"speedup {s_old:5.2f} -> {s_new:5.2f}{flag}")
            if bad:
                regressions.append(f"{case} / {name}")
    for case in sorted(results.keys() - baseline.keys()):
        print(f"{case}: not in the baseline")
    for case in sorted(baseline.keys() - results.keys()):
        print(f"{case}: not run")
    return regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON of this run")
    parser.add_argument("baseline", type=Path, help="the committed baseline JSON")
    parser.add_argument("--threshold", type=float, default=0.25, help="allowed relative regression (0.25)")
    parser.add_argument("--metric", choices=("median", "speedup"), default="median")
    parser.add_argument("--update", action="store_true", help="merge this run's cases into the baseline")
    args = parser.parse_args(argv)

    facts, results = load_results(args.results)
    if args.update:
        base = json.loads(args.baseline.read_text()) if args.baseline.exists() else {"cases": {}}
        base["machine_info"] = facts
        base["cases"].update(results)
        args.baseline.write_text(json.dumps(base, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(results)} cases into {args.baseline} ({len(base['cases'])} in all)")
        return 0

    base = json.loads(args.baseline.read_text())
    for label, info in (("this run", facts), ("the baseline", base["machine_info"])):
        load, cores = info.get("loadavg_1m"), info.get("cpu_count")
        if load is not None and cores and load > cores:
            print(f"warning: {label} ran at load {load:.1f} on {cores} cores: its timings are unreliable")
    for key, value in facts.items():
        if key == "loadavg_1m":
            continue
        if base["machine_info"].get(key) != value:
            print(f"warning: {key} differs from the baseline: {base['machine_info'].get(key)!r} -> {value!r}")
    regressions = compare(results, base["cases"], args.threshold, args.metric)
    if regressions:
        print(f"FAIL: {len(regressions)} {args.metric} regressions beyond {args.threshold:.0%}: "
              + ", ".join(regressions))
        return 1
    print(f"OK: no {args.metric} regression beyond {args.threshold:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
