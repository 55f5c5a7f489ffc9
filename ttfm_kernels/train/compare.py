"""``ttfm compare``: every distillation method on one image teacher, same budget, seeds and time sampler.

One teacher is trained once (cached in ``out/runs/teacher``); each method's student starts from
``from_teacher`` (u(x, s, t) = v(x, s)) and trains for the same steps x batch, with the same seeds and the
uniform time sampler; each is evaluated at 1/2/4/8 sampling steps on the same noise with ``runs.evaluate``
(teacher-match RMSE, Frechet distance and mode coverage in a digits classifier's features, with their floors).

Runs are keyed ``teacher``, ``<method>/seed<k>`` (the ablations only at seed 0) and ``wallclock/<method>``
(one seed: each method retrained for the steps that fit the wall-clock of the fastest method's equal-step run).
``out/results.json`` holds the configuration's identity (data, model, budget) and every finished run, written
after each one, so an interrupted compare picks up where it stopped (an unfinished run restarts from its first
step) and a compare with more seeds or methods adds only their runs; a directory holding another data, model or
budget's results is refused. A run whose loss or gradient became non-finite is recorded as diverged;
its loss curve stays in ``out/runs/<key>/log.jsonl``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttfm_kernels.flow import EMA, TimeSampler, ode_solve, sample
from ttfm_kernels.losses import emd_loss, itvm_loss, lfmd_loss, progressive_loss
from ttfm_kernels.train.data import IMAGE_DATASETS, PointData, load_data
from ttfm_kernels.train.runs import _STUDENTS, _model_spec, evaluate, load_model, sample_shape, train_teacher
from ttfm_kernels.train.trainer import TrainConfig, Trainer, TrainingDiverged

__all__ = ["ABLATIONS", "MAIN_METHODS", "METHODS", "CompareConfig", "ConfigMismatch", "format_tables",
           "run_compare"]


@dataclass(frozen=True)
class Method:
    """One student recipe: a loss with its keywords, and an EMA decay overriding the budget's (None: keep)."""

    loss: str
    options: dict[str, Any] = field(default_factory=dict)
    ema_decay: float | None = None
    about: str = ""


MAIN_METHODS: dict[str, Method] = {
    "itvm-jvp": Method("itvm", {"target": "jvp"}, about="ITVM, terminal target from one EMA JVP"),
    "itvm-euler": Method("itvm", {"target": "euler"}, about="ITVM, derivative-free Euler target (delta 0.1)"),
    "itvm-fd": Method("itvm", {"target": "fd"}, about="ITVM, finite-difference target (delta 0.1)"),
    "itvm-jvp-ti": Method("itvm", {"target": "jvp", "terminal_init": True},
                          about="ITVM jvp + the initial term also at the terminal point"),
    "lfmd": Method("lfmd", about="Lagrangian flow-map distillation"),
    "emd": Method("emd", about="Eulerian map distillation, the student's own JVP"),
    "progressive": Method("progressive", about="PFMM: a jump matches two half jumps of a frozen copy, "
                                              "refreshed from the EMA every quarter of the steps"),
}
ABLATIONS: dict[str, Method] = {
    "itvm-jvp-init0": Method("itvm", {"target": "jvp", "lambda_init": 0.0},
                             about="ITVM jvp without the initial term (weight 0 vs 1)"),
    "itvm-jvp-ema0": Method("itvm", {"target": "jvp"}, ema_decay=0.0,
                            about="ITVM jvp, EMA decay 0: the student itself is the target network"),
    "itvm-euler-ema0": Method("itvm", {"target": "euler"}, ema_decay=0.0,
                              about="ITVM euler, EMA decay 0"),
}
"""The ablations of ITVM's parts, run at seed 0 only; the three targets' ablation is the main grid at seed 0."""
METHODS: dict[str, Method] = {**MAIN_METHODS, **ABLATIONS}
PROGRESSIVE_ROUNDS = 4
"""The progressive student's frozen copy is refreshed from its EMA at every 1/4 of the steps."""

BUDGETS: dict[str, dict[str, Any]] = {
    "full": {"preset": "tiny", "teacher": {"steps": 2000, "batch_size": 128, "lr": 2e-3, "warmup": 100},
             "student": {"steps": 300, "batch_size": 64, "lr": 3e-4, "warmup": 20, "ema_decay": 0.99},
             "eval": {"n": 500, "teacher_steps": 100}},
    "quick": {"preset": "tiny", "teacher": {"steps": 30, "batch_size": 32, "lr": 2e-3, "warmup": 5},
              "student": {"steps": 12, "batch_size": 16, "lr": 3e-4, "warmup": 2, "ema_decay": 0.9},
              "eval": {"n": 64, "teacher_steps": 8}},
}
EVAL_STEPS = (1, 2, 4, 8)


class ConfigMismatch(ValueError):
    """The output directory holds results of another configuration."""


@dataclass(frozen=True)
class CompareConfig:
    """A compare: data, teacher model, seeds, methods and budget (``identity`` is stored in results.json).

    ``student_steps`` / ``student_batch`` / ``teacher_steps``: None keeps the budget's value.
    """

    data: str = "digits"
    model: str = "unet"
    seeds: int = 3
    quick: bool = False
    methods: tuple[str, ...] = tuple(METHODS)
    student_steps: int | None = None
    student_batch: int | None = None
    teacher_steps: int | None = None
    wallclock: bool = True

    def __post_init__(self) -> None:
        if self.data not in IMAGE_DATASETS:
            raise ValueError(f"unknown data {self.data!r} for compare; choose one of {', '.join(IMAGE_DATASETS)} "
                             "(labelled images: the metrics need a digits classifier)")
        if self.model not in ("unet", "dit"):
            raise ValueError(f"unknown model {self.model!r} for compare; choose unet or dit")
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
                             f"{', '.join(METHODS)}")
        for name in ("student_steps", "student_batch", "teacher_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    def budget(self) -> dict[str, Any]:
        """The budget of ``BUDGETS`` with this configuration's overrides applied."""
        b = copy.deepcopy(BUDGETS["quick" if self.quick else "full"])
        for key, part, name in (("student_steps", "student", "steps"), ("student_batch", "student", "batch_size"),
                                ("teacher_steps", "teacher", "steps")):
            if getattr(self, key) is not None:
                b[part][name] = getattr(self, key)
        b["student"]["warmup"] = min(b["student"]["warmup"], b["student"]["steps"] // 4)
        return b

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "methods": list(self.methods)}

    def identity(self) -> dict[str, Any]:
        """What every run's result depends on: data, model and budget. ``seeds``, ``methods`` and ``wallclock``
        only choose which runs are made, so a compare with more of them extends a directory's results."""
        budget = self.budget()
        return {"data": self.data, "model": self.model, "preset": budget["preset"],
                **{f"{part}.{k}": v for part in ("teacher", "student", "eval") for k, v in budget[part].items()}}


def run_keys(cfg: CompareConfig) -> list[str]:
    """The equal-step runs in order: each main method at every seed, then the ablations at seed 0."""
    main = [m for m in cfg.methods if m in MAIN_METHODS]
    ablations = [m for m in cfg.methods if m in ABLATIONS]
    return [f"{m}/seed{k}" for k in range(cfg.seeds) for m in main] + [f"{m}/seed0" for m in ablations]


def _loss_fn(method: Method, teacher: nn.Module, sampler: TimeSampler,
             refresh_every: int) -> Callable[[nn.Module, nn.Module, torch.Tensor], tuple[torch.Tensor, dict]]:
    """``loss_fn(student, ema, x1)`` of the trainer for ``method``. The progressive one keeps its frozen copy
    (from the EMA at the first call and every ``refresh_every`` calls after)."""
    frozen: dict[str, Any] = {"calls": 0, "model": None}

    def loss_fn(m: nn.Module, ema: nn.Module, x1: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if method.loss == "itvm":
            return itvm_loss(m, teacher, x1, ema=ema, time_sampler=sampler, **method.options)
        if method.loss == "lfmd":
            return lfmd_loss(m, teacher, x1, time_sampler=sampler)
        if method.loss == "emd":
            return emd_loss(m, teacher, x1, time_sampler=sampler)
        if frozen["calls"] % refresh_every == 0:
            frozen["model"] = copy.deepcopy(ema.module).eval()
        frozen["calls"] += 1
        return progressive_loss(m, frozen["model"], x1, time_sampler=sampler)

    return loss_fn


def _train_student(name: str, teacher: nn.Module, teacher_dir: Path, data: PointData, cfg: CompareConfig,
                   out_dir: Path, tcfg: TrainConfig, *, progress: bool) -> dict[str, Any]:
    """Train method ``name``'s student (``from_teacher``) into ``out_dir``; returns the trainer's summary."""
    method = METHODS[name]
    student = _STUDENTS[type(teacher)].from_teacher(teacher).requires_grad_(True)
    ema = EMA(student, decay=tcfg.ema_decay)
    loss_fn = _loss_fn(method, teacher, TimeSampler(marginal="uniform"), max(1, tcfg.steps // PROGRESSIVE_ROUNDS))
    run_config = {"kind": "student", "model": _model_spec(student), "data": cfg.data, "loss": method.loss,
                  "method": name, "options": method.options, "teacher": str(teacher_dir),
                  "time_sampling": "uniform"}
    trainer = Trainer(student, ema, loss_fn, data, tcfg, out_dir, run_config=run_config, progress=progress, desc=name)
    return trainer.fit()


def _loss_curve(log: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines() if line.strip()]


class _Store:
    """results.json: {"config": ..., "runs": {key: record}, "meta": {"shared": ..., "wallclock_s": ...}},
    rewritten atomically after every finished run."""

    def __init__(self, out: Path, cfg: CompareConfig) -> None:
        self.path = out / "results.json"
        config = cfg.identity()
        if self.path.exists():
            held = json.loads(self.path.read_text())
            if held.get("config") != config:
                differ = [f"{k}: {held.get('config', {}).get(k)!r} there, {v!r} now" for k, v in config.items()
                          if held.get("config", {}).get(k) != v]
                raise ConfigMismatch(f"{out} holds the results of another compare configuration ({'; '.join(differ)}); "
                                     "use another --out (nothing was mixed or overwritten)")
            self.runs: dict[str, Any] = held["runs"]
            self.meta: dict[str, Any] = held["meta"]
        else:
            out.mkdir(parents=True, exist_ok=True)
            self.runs, self.meta = {}, {}
        self.config = config

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self.config, "runs": self.runs, "meta": self.meta}, indent=1))
        tmp.replace(self.path)


def run_compare(cfg: CompareConfig, out: str | Path, *, progress: bool = True,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate every run of ``cfg`` not yet in ``out/results.json``; returns a summary.

    The summary: "runs" (every record by key: "status" "done" or "diverged", "sec_per_step", "steps",
    "loss_curve", "metrics" = ``evaluate``'s rows for the method, or "error" and "log"), "meta" ("shared": the
    teacher Euler rows, the teacher Heun row, the floors and the classifier accuracy of the common evaluation;
    "wallclock_s": the equal wall-clock budget), "config", "budget", "skipped" (how many
    runs this call found finished), "trained" (how many it ran), "wall_s", and "samples": per main method the
    seed-0 student's ``grid_n`` samples at 1 and 4 steps, with the teacher's Heun solve, for the grids.
    """
    out = Path(out)
    store = _Store(out, cfg)
    budget = cfg.budget()
    data = load_data(cfg.data)
    runs_dir, start = out / "runs", time.perf_counter()
    skipped = trained = 0
    teacher_dir = runs_dir / "teacher"
    if store.runs.get("teacher", {}).get("status") == "done":
        skipped += 1
    else:
        shutil.rmtree(teacher_dir, ignore_errors=True)
        tcfg = TrainConfig(**budget["teacher"], seed=0, ckpt_every=10**9, log_every=25)
        summary = train_teacher(data, cfg.data, teacher_dir, tcfg, model=cfg.model, preset=budget["preset"],
                                progress=progress)
        store.runs["teacher"] = {"status": "done", "sec_per_step": summary["sec_per_step"], "steps": summary["steps"]}
        store.save()
        trained += 1
        log(f"teacher: {summary['steps']} steps, {summary['sec_per_step'] * 1000:.1f} ms/step")
    teacher, _ = load_model(teacher_dir)
    ev = {"steps": EVAL_STEPS, "seed": 0, "classifier_cache": out / "classifier.pt", "teacher_solves": {},
          **budget["eval"]}

    def run(key: str, name: str, steps: int, seed: int, same_as: str | None = None) -> None:
        nonlocal skipped, trained
        if store.runs.get(key, {}).get("status") in ("done", "diverged"):
            skipped += 1
            return
        if same_as is not None:  # the same settings as a finished run: its record, not a second training
            store.runs[key] = {**store.runs[same_as], "same_as": same_as}
            store.save()
            return
        run_dir = runs_dir / key
        shutil.rmtree(run_dir, ignore_errors=True)
        scfg = {**budget["student"], "steps": steps}
        if METHODS[name].ema_decay is not None:
            scfg["ema_decay"] = METHODS[name].ema_decay
        scfg["warmup"] = min(scfg["warmup"], steps // 4)
        tcfg = TrainConfig(**scfg, seed=seed, ckpt_every=10**9, log_every=max(1, steps // 50))
        try:
            summary = _train_student(name, teacher, teacher_dir, data, cfg, run_dir, tcfg, progress=progress)
        except TrainingDiverged as e:
            store.runs[key] = {"status": "diverged", "error": str(e), "log": str(run_dir / "log.jsonl"),
                               "steps": steps, "loss_curve": _loss_curve(run_dir / "log.jsonl")}
            log(f"{key}: diverged ({e}); loss curve in {run_dir / 'log.jsonl'}")
        else:
            student, _ = load_model(run_dir)
            metrics, _ = evaluate({name: student}, teacher, data, **ev)
            curve = _loss_curve(run_dir / "log.jsonl")
            store.runs[key] = {"status": "done", "sec_per_step": summary["sec_per_step"], "steps": steps,
                               "metrics": metrics[name], "loss_curve": curve}
            store.meta.setdefault("shared", {k: metrics[k] for k in
                                             ("teacher_euler", "teacher_heun", "floor", "classifier_accuracy", "n",
                                              "teacher_steps") if k in metrics})
            log(f"{key}: {steps} steps, {summary['sec_per_step'] * 1000:.1f} ms/step, teacher-match RMSE "
                + " ".join(f"N={k} {metrics[name][str(k)]['teacher_rmse']:.3f}" for k in EVAL_STEPS))
        trained += 1
        store.save()

    steps = budget["student"]["steps"]
    for key in run_keys(cfg):
        name, seed = key.split("/seed")
        run(key, name, steps, int(seed))
    if cfg.wallclock:
        main = [m for m in cfg.methods if m in MAIN_METHODS]
        spt = {m: store.runs[f"{m}/seed0"].get("sec_per_step") for m in main}
        spt = {m: v for m, v in spt.items() if v and store.runs[f"{m}/seed0"]["status"] == "done"}
        if spt:
            wall = store.meta.setdefault("wallclock_s", steps * min(spt.values()))
            for m, v in spt.items():
                n = max(1, min(steps, math.floor(wall / v + 1e-9)))
                run(f"wallclock/{m}", m, n, 0, same_as=f"{m}/seed0" if n == steps else None)
    samples = _grid_samples(cfg, store, teacher, runs_dir, budget["eval"]["teacher_steps"])
    return {"runs": store.runs, "meta": store.meta, "skipped": skipped, "trained": trained,
            "wall_s": time.perf_counter() - start, "samples": samples, "budget": budget, "config": cfg.as_json()}


@torch.no_grad()
def _grid_samples(cfg: CompareConfig, store: _Store, teacher: nn.Module, runs_dir: Path, teacher_steps: int,
                  grid_n: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    """Per N in (1, 4): {"teacher Heun": ..., method: ...} of ``grid_n`` (n, C, H, W) samples from one noise."""
    g = torch.Generator().manual_seed(1234)
    x0 = float(getattr(teacher, "sigma", 1.0)) * torch.randn(grid_n, *sample_shape(teacher), generator=g)
    heun = ode_solve(teacher, x0, steps=teacher_steps, method="heun")
    grids: dict[str, dict[str, torch.Tensor]] = {}
    for n_steps in (1, 4):
        rows = {f"teacher Heun-{teacher_steps}": heun}
        for m in cfg.methods:
            if m in MAIN_METHODS and store.runs.get(f"{m}/seed0", {}).get("status") == "done":
                rows[m] = sample(load_model(runs_dir / m / "seed0")[0], x0, steps=n_steps)
        grids[str(n_steps)] = rows
    return grids


_TABLE_METRICS = (("teacher_rmse", "Teacher-match RMSE (vs the teacher's Heun solve from the same noise)"),
                  ("frechet", "Frechet distance in digits-classifier features (to held-out data)"),
                  ("coverage_kl", "Mode coverage: KL(predicted-class histogram || uniform)"))


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4g} ± {std:.2g}"


def _growth(curve: list[float]) -> float:
    """The last logged loss over the largest one of the run's first quarter: far above 1 for a run drifting away
    (a student starts at from_teacher's near-zero loss, so the first quarter holds its early peak)."""
    early = max(curve[:max(1, len(curve) // 4)])
    return curve[-1] / max(early, 1e-12)


def _row_label(runs: dict[str, Any], keys: list[str], name: str) -> str:
    diverged = [k for k in keys if runs.get(k, {}).get("status") == "diverged"]
    growth = max((_growth(runs[k]["loss_curve"]) for k in keys if runs.get(k, {}).get("status") == "done"),
                 default=1.0)
    missing = [k for k in keys if k not in runs]
    notes = [f"{len(keys) - len(missing)}/{len(keys)} seeds run"] if missing else []
    if diverged:
        notes.append(f"{len(diverged)}/{len(keys)} diverged, loss curve runs/{diverged[0]}/log.jsonl")
    if growth > 10:
        notes.append(f"unstable: final loss {growth:.0f}x its early peak")
    return name + (f" ({'; '.join(notes)})" if notes else "")


def _metric_table(runs: dict[str, Any], groups: dict[str, list[str]], key: str, shared: dict[str, Any]) -> list[str]:
    cols = [str(k) for k in EVAL_STEPS]
    means: dict[str, list[float | None]] = {}
    cells: dict[str, list[str]] = {}
    for name, keys in groups.items():
        done = [runs[k] for k in keys if runs.get(k, {}).get("status") == "done"]
        vals = [[r["metrics"][c][key] for r in done] for c in cols]
        cells[name] = [_cell(v) for v in vals]
        means[name] = [sum(v) / len(v) if v else None for v in vals]
    best = [min((m[i] for m in means.values() if m[i] is not None), default=None) for i in range(len(cols))]
    lines = ["| method | " + " | ".join(f"N={c}" for c in cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| teacher, Euler N steps | " + " | ".join(f"{shared['teacher_euler'][c][key]:.4g}" for c in cols) + " |"]
    for name, keys in groups.items():
        row = [f"**{cell}**" if means[name][i] is not None and means[name][i] == best[i] else cell
               for i, cell in enumerate(cells[name])]
        lines.append(f"| {_row_label(runs, keys, name)} | " + " | ".join(row) + " |")
    if key != "teacher_rmse":
        lines.append(f"\nTeacher Heun-{shared['teacher_steps']}: {shared['teacher_heun'][key]:.4g}; floor (training "
                     f"half vs held-out half): {shared['floor'][key]:.4g}.")
    return lines


def format_tables(summary: dict[str, Any]) -> str:
    """table.md: the equal-step tables (mean ± sample std over seeds), the ablations, the wall-clock tables."""
    runs, cfg, budget = summary["runs"], summary["config"], summary["budget"]
    shared = summary["meta"].get("shared")
    s, t = budget["student"], budget["teacher"]
    lines = [f"# ttfm compare: {cfg['data']}, {cfg['model']} \"{budget['preset']}\"", "",
             f"Teacher: {runs['teacher']['steps']} steps x {t['batch_size']}. Each student: {s['steps']} steps x "
             f"{s['batch_size']}, lr {s['lr']}, EMA decay {s['ema_decay']}, uniform times, from_teacher; seeds "
             f"0..{cfg['seeds'] - 1} (ablations seed 0). Evaluation: {budget['eval']['n']} samples from one noise, "
             f"reference = the teacher's Heun-{budget['eval']['teacher_steps']} solve"
             + (f"; digits classifier held-out accuracy {shared['classifier_accuracy']:.3f}." if shared else ".")]
    if shared is None:
        return "\n".join([*lines, "", "No student finished: nothing to tabulate."]) + "\n"
    main = [m for m in cfg["methods"] if m in MAIN_METHODS]
    groups = {m: [f"{m}/seed{k}" for k in range(cfg["seeds"])] for m in main}
    for key, title in _TABLE_METRICS:
        lines += ["", f"## {title}, equal steps (lower is better)", "", *_metric_table(runs, groups, key, shared)]
    ablations = [m for m in cfg["methods"] if m in ABLATIONS]
    if ablations:
        ab = {m: [f"{m}/seed0"] for m in [*(x for x in ("itvm-jvp", "itvm-euler", "itvm-fd") if x in main),
                                          *ablations]}
        lines += ["", "## Ablations of ITVM (seed 0; teacher-match RMSE)", "",
                  *(f"- {m}: {METHODS[m].about}" for m in ab), "", *_metric_table(runs, ab, "teacher_rmse", shared)]
    timed = {m: runs[f"{m}/seed0"]["sec_per_step"] for m in main if runs.get(f"{m}/seed0", {}).get("sec_per_step")}
    if timed:
        fastest = min(timed.values())
        lines += ["", "## Wall-clock per training step (seed 0)", "", "| method | ms / step | x fastest |",
                  "|---|---|---|", *(f"| {m} | {v * 1000:.1f} | {v / fastest:.2f} |" for m, v in timed.items())]
    wc = {m: [f"wallclock/{m}"] for m in main if f"wallclock/{m}" in runs}
    if wc:
        lines += ["", f"## Equal wall-clock ({summary['meta']['wallclock_s']:.1f} s of training each, seed 0; "
                  "teacher-match RMSE)", "",
                  "Steps: " + ", ".join(f"{m} {runs[k[0]]['steps']}" for m, k in wc.items()) + ".", "",
                  *_metric_table(runs, wc, "teacher_rmse", shared)]
    return "\n".join(lines) + "\n"
