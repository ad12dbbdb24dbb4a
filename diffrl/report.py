"""``diffrl report RUN_DIR [RUN_DIR ...] [--out DIR] [--target T] [--target-metric M]``: curves,
before/after grids and a markdown summary of one or more finished (or partial) ``diffrl train`` run folders.

Loading is pure: :func:`load_run` reads a run folder into a :class:`Run` (config.yaml, metrics.jsonl,
eval.jsonl, summary.json, grids/) and never fails on a partial run: a missing file, a truncated last
line or a run killed mid-way become entries of ``Run.warnings``. A path that is not a run folder at
all raises :class:`NotARunFolder` (the command exits 2).

Conventions of the figures and tables:

- samples seen = cumulative ``samples`` of the learner's step records (``kind: train`` lines of
  metrics.jsonl) through a step; an evaluation at step s is placed at the samples and wall time of
  step s (step 0: 0 samples, 0 s);
- wall time = the step record's ``time`` (seconds since the job started); a resumed run (``--resume``
  appends to metrics.jsonl and restarts its clock) continues from the last time before the resume,
  and a step recorded twice (redone after the resume) keeps its last record;
- the run's wall time is summary.json's ``seconds`` (start to end of the job, evaluations and set-up
  included) for a finished, never-resumed run, else the wall time of its last step;
- held-out rewards: every task's evaluation logs, per reward NAME, ``reward_NAME`` (mean over the
  images), ``reward_NAME_sem`` (its standard error) and ``pass_NAME`` (pass rate, where the reward has a
  pass threshold); they are drawn (mean ± sem) and tabled for every run that logged them. The shapes
  world's keys (``strict``, per-clause accuracy, image metrics) are drawn and tabled only when a run
  logged them;
- target: ``--target 0.35`` (absolute) or ``--target +0.10`` (added to the first run's base value, the
  default, or with ``--target-from each`` to each run's own base value) of ``--target-metric`` (default ``strict``, the shapes world's strict accuracy; any held-out
  metric such as ``reward_ocr`` or ``pass_ocr``); a run reaches it at its first evaluation with the
  metric >= target, reported as (step, samples, wall time) or "not reached". Runs that were evaluated
  but have no strict accuracy get no target unless ``--target-metric`` names one.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from diffrl import run_folder

RUN_FILES = (run_folder.METRICS, run_folder.EVAL, run_folder.CONFIG, run_folder.SUMMARY)
"""A folder holding none of these is not a run folder."""
CLAUSES = ("count", "color", "shape", "partial")
ACCURACY_METRICS = ("strict", *CLAUSES)
FIDELITY_METRICS = ("fidelity", "off_palette", "fid_shapes", "diversity", "diversity_renders", "fid_text",
                    "background_clean")
"""Image metrics of the evaluation (diffrl/evaluation.py), when the run logged them."""
DEFAULT_TARGET = "+0.10"
DEFAULT_TARGET_METRIC = "strict"


class NotARunFolder(Exception):
    """A RUN_DIR argument that is not a ``diffrl train`` run folder (or a glob matching nothing)."""


@dataclass(frozen=True)
class TrainPoint:
    """One learner step (a ``kind: train`` line of metrics.jsonl)."""

    step: int
    samples: int
    """Samples trained through this step (cumulative)."""
    seconds: float
    """Wall seconds since the job started (resumed segments appended)."""
    reward: float | None
    kl: float | None


@dataclass(frozen=True)
class EvalPoint:
    """One held-out evaluation (a line of eval.jsonl)."""

    step: int
    samples: int
    seconds: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class TargetHit:
    """Where a run first reached the target value of a held-out metric."""

    step: int
    samples: int
    seconds: float
    value: float
    """The metric's value at that evaluation."""
    metric: str = DEFAULT_TARGET_METRIC

    @property
    def strict(self) -> float:
        """``value`` under its old name (the target metric was always strict accuracy)."""
        return self.value


@dataclass
class Run:
    path: Path
    name: str
    algorithm: str
    seed: int | None
    train: list[TrainPoint] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    grids: list[tuple[int, Path]] = field(default_factory=list)
    """(step, image) of grids/step_XXXXXX.png, by step."""
    summary: dict = field(default_factory=dict)
    resumed: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.algorithm})"

    @property
    def finished(self) -> bool:
        return "end_step" in self.summary

    @property
    def steps(self) -> int:
        if self.train:
            return self.train[-1].step
        return int(self.summary.get("end_step", 0))

    @property
    def samples(self) -> int:
        """Samples trained: the learner's counter in summary.json, else the sum of the step records."""
        counters = self.summary.get("learner_counters") or {}
        if "samples_trained" in counters and not self.resumed:
            return int(counters["samples_trained"])
        return self.train[-1].samples if self.train else 0

    @property
    def wall_seconds(self) -> float | None:
        if self.finished and not self.resumed and "seconds" in self.summary:
            return float(self.summary["seconds"])
        return self.train[-1].seconds if self.train else None

    @property
    def base(self) -> EvalPoint | None:
        return self.evals[0] if self.evals else None

    @property
    def final(self) -> EvalPoint | None:
        return self.evals[-1] if self.evals else None


# --------------------------------------------------------------------------------- loading
def _read_jsonl(path: Path, warnings: list[str]) -> list[dict]:
    records = []
    if not path.is_file():
        return records
    lines = path.read_text(errors="replace").splitlines()
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
        else:
            bad += 1
    if bad:
        warnings.append(f"{path.name}: skipped {bad} unreadable line(s) (a run killed while writing?)")
    return records


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def find_runs(args: Sequence[str]) -> list[Path]:
    """RUN_DIR arguments (paths or glob patterns the shell left unexpanded) -> run folders, in order,
    without duplicates. Raises NotARunFolder for a path that is not a run folder or a glob matching
    none."""
    out: list[Path] = []
    for arg in args:
        if not Path(arg).exists() and any(ch in arg for ch in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(arg)) if is_run_folder(Path(p))]
            if not matches:
                raise NotARunFolder(f"{arg}: the pattern matches no run folder")
            found = matches
        else:
            path = Path(arg)
            if not path.exists():
                raise NotARunFolder(f"{arg}: no such folder")
            if not is_run_folder(path):
                raise NotARunFolder(f"{arg}: not a run folder (none of {', '.join(RUN_FILES)} there; a quoted "
                                    "glob pattern such as 'runs/*' skips folders that are not runs)")
            found = [path]
        for p in found:
            if p.resolve() not in {q.resolve() for q in out}:
                out.append(p)
    if not out:
        raise NotARunFolder("no run folder given")
    return out


def _train_points(records: list[dict], warnings: list[str]) -> tuple[list[TrainPoint], bool]:
    """Step records in file order -> TrainPoints by step (see the module docstring); resumed?"""
    by_step: dict[int, tuple[dict, float]] = {}
    offset, last_time, last_step, resumed = 0.0, 0.0, -1, False
    for rec in records:
        step = int(rec["step"])
        t = _number(rec.get("time")) or 0.0
        if step <= last_step or t < last_time:  # a resumed segment: its clock restarts
            resumed = True
            offset += last_time
        last_step, last_time = step, t
        by_step[step] = (rec, offset + t)
    points, total = [], 0
    for step in sorted(by_step):
        rec, seconds = by_step[step]
        total += int(rec.get("samples", 0) or 0)
        kl = rec.get("kl", rec.get("kl_mean"))
        points.append(TrainPoint(step, total, seconds, _number(rec.get("reward_mean")), _number(kl)))
    if points and not any(int(r.get("samples", 0) or 0) for r in records):
        warnings.append("metrics.jsonl: step records carry no 'samples' count; samples seen shown as 0")
    return points, resumed


def _at_step(train: list[TrainPoint], step: int) -> tuple[int, float]:
    """(samples, seconds) at the end of ``step``: the last step record <= step (0, 0 before any)."""
    best = (0, 0.0)
    for p in train:
        if p.step > step:
            break
        best = (p.samples, p.seconds)
    return best


def load_run(path: str | Path) -> Run:
    """Read a run folder (see the module docstring). Raises NotARunFolder if it is not one."""
    path = Path(path)
    if not is_run_folder(path):
        raise NotARunFolder(f"{path}: not a run folder (none of {', '.join(RUN_FILES)} there)")
    warnings: list[str] = []
    config: dict = {}
    if (path / run_folder.CONFIG).is_file():
        try:
            config = yaml.safe_load((path / run_folder.CONFIG).read_text()) or {}
        except yaml.YAMLError as err:
            warnings.append(f"config.yaml unreadable ({err.__class__.__name__}); algorithm and seed unknown")
    else:
        warnings.append("no config.yaml: algorithm and seed unknown")
    run_cfg = config.get("run") or {}
    algorithm = str((config.get("learner") or {}).get("algorithm", "?"))
    seed = run_cfg.get("seed")

    summary: dict = {}
    if (path / run_folder.SUMMARY).is_file():
        try:
            summary = json.loads((path / run_folder.SUMMARY).read_text())
        except json.JSONDecodeError:
            warnings.append("summary.json unreadable")
    metrics = _read_jsonl(path / run_folder.METRICS, warnings)
    if not (path / run_folder.METRICS).is_file():
        warnings.append("no metrics.jsonl: no training curves")
    train, resumed = _train_points([r for r in metrics if r.get("kind", "train") == "train"], warnings)
    if not train:
        warnings.append("no learner step recorded")
    if "end_step" not in summary:
        warnings.append("no finished summary.json: the run was killed or is still running; "
                        f"reporting the {len(train)} step(s) recorded")
    resumed = resumed or bool(summary.get("resumed")) or (path / run_folder.CONFIG_RESUMED).is_file()
    if resumed:
        warnings.append("resumed run: wall time counts each segment from its own start; a step redone "
                        "after the resume keeps its last record")

    if (path / run_folder.EVAL).is_file():
        eval_records = _read_jsonl(path / run_folder.EVAL, warnings)
    else:
        eval_records = [{k: v for k, v in r.items() if k != "kind"} for r in metrics if r.get("kind") == "eval"]
        warnings.append("no eval.jsonl" + (f": using the {len(eval_records)} evaluation line(s) of metrics.jsonl"
                                           if eval_records else ": no held-out evaluation"))
    by_step: dict[int, dict] = {}
    for rec in eval_records:
        by_step[int(rec["step"])] = rec  # the last evaluation of a step wins
    evals = []
    for step in sorted(by_step):
        samples, seconds = _at_step(train, step)
        m = {k: float(v) for k, v in by_step[step].items() if k != "step" and _number(v) is not None}
        if "fidelity" in m and "off_palette" not in m:  # runs from before off_palette was logged
            m["off_palette"] = 1.0 - m["fidelity"]
        evals.append(EvalPoint(step, samples, seconds, m))
    if len(evals) == 1:
        warnings.append("only one evaluation: no before/after comparison")

    grids = []
    for png in sorted((path / run_folder.GRIDS).glob("step_*.png")) if (path / run_folder.GRIDS).is_dir() else []:
        try:
            grids.append((int(png.stem.removeprefix("step_")), png))
        except ValueError:
            continue
    grids.sort()
    if not grids:
        warnings.append("no image grids in grids/")
    return Run(path=path, name=path.resolve().name, algorithm=algorithm, seed=seed if isinstance(seed, int) else None,
               train=train, evals=evals, grids=grids, summary=summary, resumed=resumed, warnings=warnings)


def load_runs(args: Sequence[str]) -> list[Run]:
    runs = [load_run(p) for p in find_runs(args)]
    names = [r.name for r in runs]
    for r in runs:  # same folder name under two output folders: tell them apart
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    return runs


# --------------------------------------------------------------------------------- analysis
def has_metric(runs: Sequence[Run], key: str) -> bool:
    """Whether any evaluation of any run logged ``key``."""
    return any(key in e.metrics for r in runs for e in r.evals)


def reward_names(runs: Sequence[Run]) -> list[str]:
    """The reward NAMEs of the ``reward_NAME`` held-out metrics, in the order they first appear
    (``reward_NAME_sem`` is NAME's standard error when ``reward_NAME`` is there too)."""
    names: list[str] = []
    for r in runs:
        for e in r.evals:
            for key in e.metrics:
                if not key.startswith("reward_") or (key.endswith("_sem") and key.removesuffix("_sem") in e.metrics):
                    continue
                name = key.removeprefix("reward_")
                if name and name not in names:
                    names.append(name)
    return names


def shapes_mode(runs: Sequence[Run]) -> bool:
    """Whether the shapes world's strict-accuracy columns and default target apply: some run logged
    ``strict``, or no run has any held-out metric (so nothing says which task it was)."""
    return has_metric(runs, "strict") or not any(e.metrics for r in runs for e in r.evals)


def target_metric_for(runs: Sequence[Run], metric: str | None, spec: str | float | None) -> str | None:
    """``--target-metric`` (None: not given) -> the metric the target is on, or None for no target.
    Not given: ``strict`` in :func:`shapes_mode`, else no target. Raises ValueError for a ``--target``
    without a metric the runs have, or a metric no run logged."""
    if metric is None:
        if shapes_mode(runs):
            return DEFAULT_TARGET_METRIC
        if spec is not None:
            names = reward_names(runs)
            example = f"reward_{names[0]}" if names else "reward_NAME"
            raise ValueError(f"--target {spec}: the default target metric, strict accuracy, is a shapes-world "
                             f"metric (data.eval = shapes:eval) and these runs have none; name the held-out "
                             f"metric with --target-metric, e.g. --target-metric {example}")
        return None
    metric = metric.strip()
    if any(r.evals for r in runs) and not has_metric(runs, metric):
        logged = sorted({k for r in runs for e in r.evals for k in e.metrics})
        raise ValueError(f"--target-metric {metric}: no evaluation of these runs logged it "
                         f"(held-out metrics: {', '.join(logged) or 'none'})")
    return metric


def _metric_label(metric: str) -> str:
    return "strict accuracy" if metric == DEFAULT_TARGET_METRIC else metric


def resolve_target(spec: str | float | None, runs: Sequence[Run],
                   metric: str = DEFAULT_TARGET_METRIC) -> tuple[float | None, str]:
    """``--target`` -> (value of ``metric``, how it was chosen). "+D" (default "+0.10") adds D to the
    first run's base value of the metric; a plain number is absolute. None when relative and the first
    run has no evaluation of the metric."""
    spec = DEFAULT_TARGET if spec is None else str(spec).strip()
    try:
        value = float(spec)
    except ValueError as err:
        raise ValueError(f"--target {spec!r}: expected a value like 0.35 or an increment like +0.10") from err
    if not spec.startswith(("+", "-")):
        return value, f"{value:.3f} (absolute)"
    base = runs[0].base if runs else None
    if base is None or metric not in base.metrics:
        why = "no evaluation" if base is None else f"no base {metric}"
        return None, f"base {spec} (the first run has {why}: no target)"
    short = "strict" if metric == DEFAULT_TARGET_METRIC else metric
    target = base.metrics[metric] + value
    return target, f"{target:.3f} = base {short} {base.metrics[metric]:.3f} of {runs[0].name} {spec}"


Target = float | None | dict[str, float | None]
"""One target for every run, or one per run name (``--target-from each``)."""


def per_run_targets(spec: str | float | None, runs: Sequence[Run], metric: str = DEFAULT_TARGET_METRIC
                    ) -> tuple[dict[str, float | None], str]:
    """``--target +D --target-from each``: each run's own base value of ``metric`` + D (runs that start
    from different models: a base, a few-step student, a one-step student). An absolute ``--target`` is
    the same for every run."""
    targets = {r.name: resolve_target(spec, [r], metric)[0] for r in runs}
    spec = DEFAULT_TARGET if spec is None else str(spec).strip()
    how = "each run's own base" if spec.startswith(("+", "-")) else "absolute"
    return targets, f"{spec} ({how})"


def _target_of(target: Target, run: Run) -> float | None:
    return target.get(run.name) if isinstance(target, dict) else target


def first_reaching(run: Run, target: Target, metric: str = DEFAULT_TARGET_METRIC) -> TargetHit | None:
    """The first evaluation (by step) with ``metric`` >= target, or None."""
    target = _target_of(target, run)
    if target is None:
        return None
    for e in run.evals:
        if e.metrics.get(metric, -math.inf) >= target - 1e-12:
            return TargetHit(e.step, e.samples, e.seconds, e.metrics[metric], metric)
    return None


def relative_change(base: float | None, final: float | None) -> float | None:
    """(final - base) / |base| in percent; None when either is missing or base is 0."""
    if base is None or final is None or base == 0:
        return None
    return 100.0 * (final - base) / abs(base)


# --------------------------------------------------------------------------------- formatting
def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"


def _fmt_hit(hit: TargetHit | None, target: float | None) -> str:
    if target is None:
        return "n/a (no target)"
    if hit is None:
        return "not reached"
    short = "strict" if hit.metric == DEFAULT_TARGET_METRIC else hit.metric
    return f"step {hit.step}, {hit.samples} samples, {fmt_seconds(hit.seconds)} ({short} {hit.value:.3f})"


def _fmt_mean_sem(e: EvalPoint | None, name: str) -> str:
    """``reward_NAME`` of an evaluation as "mean ± sem" ("mean" without a sem, "n/a" without a mean)."""
    if e is None or f"reward_{name}" not in e.metrics:
        return "n/a"
    sem = e.metrics.get(f"reward_{name}_sem")
    return f"{e.metrics[f'reward_{name}']:.3f}" + ("" if sem is None else f" ± {sem:.3f}")


def run_table(run: Run, target: Target, metric: str | None = DEFAULT_TARGET_METRIC) -> str:
    """The markdown tables of one run: facts, then held-out rewards, accuracy and image metrics
    base -> final. ``metric`` None: no target row."""
    base, final = run.base, run.final
    wall = fmt_seconds(run.wall_seconds) + ("" if run.finished else " (partial)")
    rows = [
        ("run folder", f"`{run.path}`"),
        ("algorithm", run.algorithm),
        ("seed", "n/a" if run.seed is None else str(run.seed)),
        ("steps", str(run.steps) + ("" if run.finished else " (partial run)")),
        ("samples trained", str(run.samples)),
        ("wall time", wall),
        ("evaluations", f"{len(run.evals)}" + (f" (steps {base.step} to {final.step})" if base else "")),
    ]
    if metric is not None:
        short = "strict" if metric == DEFAULT_TARGET_METRIC else metric
        target = _target_of(target, run)
        rows.append((f"reached target {short} {_fmt(target)}", _fmt_hit(first_reaching(run, target, metric), target)))
    lines = ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]
    if base is None:
        return "\n".join(lines) + "\n\nNo held-out evaluation in this run.\n"
    lines += ["", f"| held-out metric | base (step {base.step}) | final (step {final.step}) | change | relative |",
              "| --- | --- | --- | --- | --- |"]
    for key in (*ACCURACY_METRICS, *FIDELITY_METRICS):
        b, f = base.metrics.get(key), final.metrics.get(key)
        if b is None and f is None:
            continue
        change = None if b is None or f is None else f - b
        digits = {"fid_shapes": 2, "fidelity": 4, "off_palette": 4}.get(key, 3)
        sign = "n/a" if change is None else f"{change:+.{digits}f}"
        lines.append(f"| {key} | {_fmt(b, digits)} | {_fmt(f, digits)} | {sign} | {_fmt_pct(relative_change(b, f))} |")
    for name in reward_names([run]):
        for key, shown in ((f"reward_{name}", _fmt_mean_sem), (f"pass_{name}", None)):
            b, f = base.metrics.get(key), final.metrics.get(key)
            if b is None and f is None:
                continue
            change = "n/a" if b is None or f is None else f"{f - b:+.3f}"
            bs, fs = (shown(base, name), shown(final, name)) if shown else (_fmt(b), _fmt(f))
            lines.append(f"| {key} | {bs} | {fs} | {change} | {_fmt_pct(relative_change(b, f))} |")
    masked = [base.metrics.get("eval_groups_masked", 0.0), final.metrics.get("eval_groups_masked", 0.0)]
    if any(masked):
        lines.append(f"| eval_groups_masked (not in the means) | {masked[0]:.0f} | {masked[1]:.0f} "
                     f"| {masked[1] - masked[0]:+.0f} | n/a |")
    return "\n".join(lines) + "\n"


TEXT_COLUMNS: tuple[tuple[str, int], ...] = (("ocr_exact", 3), ("rapid_exact", 3), ("off_palette", 4),
                                             ("background_clean", 4), ("fid_text", 2), ("diversity", 3))
"""The text world's held-out columns of the overview (metric, digits), when a run logged ``ocr_exact``."""


def overview_table(runs: Sequence[Run], target: Target, metric: str | None = DEFAULT_TARGET_METRIC) -> str:
    """One row per run. Columns: the run's facts; base and final strict, off_palette and fid_shapes in
    :func:`shapes_mode`; base → final mean ± sem of every held-out reward and its pass rate where
    logged; where ``metric`` (the target's; None: no target column) was first reached."""
    shapes = shapes_mode(runs)
    names = reward_names(runs)
    passes = [n for n in names if has_metric(runs, f"pass_{n}")]
    header = ["run", "algorithm", "seed", "steps", "samples", "wall time"]
    if shapes:
        header += ["base strict", "final strict", "off_palette base → final", "fid_shapes base → final",
                   "diversity base → final"]
    text = TEXT_COLUMNS if has_metric(runs, "ocr_exact") else ()
    header += [f"{key} base → final" for key, _ in text]
    for n in names:
        header.append(f"reward_{n} base → final")
        if n in passes:
            header.append(f"pass_{n} base → final")
    if metric is not None:
        header.append("target reached at" if metric == DEFAULT_TARGET_METRIC else f"target {metric} reached at")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def pair(b: EvalPoint | None, f: EvalPoint | None, key: str, digits: int) -> str:
        if b is None or f is None or key not in b.metrics or key not in f.metrics:
            return "n/a"
        return f"{b.metrics[key]:.{digits}f} → {f.metrics[key]:.{digits}f}"

    for r in runs:
        b, f = r.base, r.final
        cells = [r.name, r.algorithm, "n/a" if r.seed is None else str(r.seed),
                 f"{r.steps}{'' if r.finished else '*'}", str(r.samples), fmt_seconds(r.wall_seconds)]
        if shapes:
            cells += [_fmt(b.metrics.get("strict") if b else None), _fmt(f.metrics.get("strict") if f else None),
                      pair(b, f, "off_palette", 4), pair(b, f, "fid_shapes", 2), pair(b, f, "diversity", 3)]
        cells += [pair(b, f, key, digits) for key, digits in text]
        for n in names:
            has = [e is not None and f"reward_{n}" in e.metrics for e in (b, f)]
            cells.append(f"{_fmt_mean_sem(b, n)} → {_fmt_mean_sem(f, n)}" if any(has) else "n/a")
            if n in passes:
                cells.append(pair(b, f, f"pass_{n}", 3))
        if metric is not None:
            hit = first_reaching(r, target, metric)
            cells.append("n/a" if _target_of(target, r) is None else ("not reached" if hit is None else
                                                       f"{hit.samples} samples, {fmt_seconds(hit.seconds)}"))
        lines.append("| " + " | ".join(cells) + " |")
    if any(not r.finished for r in runs):
        lines.append("\n\\* partial run (no finished summary.json)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- figures
def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


PANELS = {
    "training": (("reward", "train reward (mean per step)"), ("kl", "KL (learner's estimate)")),
    "accuracy": (("strict", "held-out strict accuracy"), ("count", "held-out count"),
                 ("color", "held-out color"), ("shape", "held-out shape"),
                 ("ocr_exact", "held-out OCR exact match (tesseract)"),
                 ("rapid_exact", "held-out exact match (RapidOCR, never a reward)")),
    "fidelity": (("off_palette", "off-palette pixel fraction (1 - fidelity)"),
                 ("fid_shapes", "fid_shapes (vs renders; lower is better)"),
                 ("fid_text", "fid_text (vs renders; lower is better)"),
                 ("background_clean", "margin pixels that are background"),
                 ("diversity", "within-prompt diversity (dashed: renders)")),
}
"""Figure name -> panels (metric, title). Each figure is drawn against samples and against wall time."""
HELDOUT_REWARD_FIGURE = "heldout_reward"
"""The figure of the held-out rewards (any task): per reward NAME a panel of ``reward_NAME`` (mean ±
``reward_NAME_sem``) and, where logged, one of ``pass_NAME``; drawn between "training" and "accuracy"."""


def figure_panels(runs: Sequence[Run]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The figures to draw, in order, each with its panels (metric, title): PANELS plus the held-out
    reward figure, keeping only the panels of metrics some run logged and figures left with a panel."""
    rewards: list[tuple[str, str]] = []
    for name in reward_names(runs):
        rewards.append((f"reward_{name}", f"held-out reward {name} (mean ± sem)"))
        if has_metric(runs, f"pass_{name}"):
            rewards.append((f"pass_{name}", f"held-out pass rate {name}"))
    figures = [("training", list(PANELS["training"])), (HELDOUT_REWARD_FIGURE, rewards),
               *((f, list(p)) for f, p in PANELS.items() if f != "training")]

    def logged(figure: str, key: str) -> bool:
        if figure == "training":
            return any(getattr(p, key) is not None for r in runs for p in r.train)
        return has_metric(runs, key)

    out = []
    for figure, panels in figures:
        panels = [(k, t) for k, t in panels if logged(figure, k)]
        if panels:
            out.append((figure, panels))
    return out


def plot_curves(runs: Sequence[Run], out: Path) -> list[Path]:
    """One PNG per (figure of :func:`figure_panels`, x axis in samples | wall): every run overlaid,
    labelled with its name and algorithm; a held-out reward with error bars of ± its standard error.
    Figures and panels whose metrics no run logged are skipped. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for figure, panels in figure_panels(runs):
        for axis, xlabel in (("samples", "samples seen"), ("wall", "wall time (min)")):
            fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
            for ax, (key, title) in zip(axes[0], panels):
                for i, run in enumerate(runs):
                    color = colors[i % len(colors)]
                    if figure == "training":
                        pts = [p for p in run.train if getattr(p, key) is not None]
                        xs = [p.samples if axis == "samples" else p.seconds / 60 for p in pts]
                        ys = [getattr(p, key) for p in pts]
                        window = max(1, len(ys) // 25)
                        if window > 1:
                            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                        ax.plot(xs, _smooth(ys, window), color=color, label=run.label)
                    else:
                        pts = [e for e in run.evals if key in e.metrics]
                        if not pts:
                            continue
                        xs = [e.samples if axis == "samples" else e.seconds / 60 for e in pts]
                        ys = [e.metrics[key] for e in pts]
                        sems = [e.metrics.get(f"{key}_sem") for e in pts]
                        if any(v is not None for v in sems):
                            ax.errorbar(xs, ys, yerr=[v or 0.0 for v in sems], marker="o", markersize=3,
                                        capsize=2, color=color, label=run.label)
                        else:
                            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=run.label)
                        if key == "diversity":
                            ref = [e for e in run.evals if "diversity_renders" in e.metrics]
                            ax.plot([e.samples if axis == "samples" else e.seconds / 60 for e in ref],
                                    [e.metrics["diversity_renders"] for e in ref], linestyle="--",
                                    color=color, alpha=0.6)
                ax.set_title(title, fontsize=9)
                ax.set_xlabel(xlabel)
                ax.grid(alpha=0.3)
            legend: dict = {}  # every run drawn in some panel of the figure, once, in run order
            for ax in axes[0]:
                for handle, label in zip(*ax.get_legend_handles_labels()):
                    legend.setdefault(label, handle)
            order = [r.label for r in runs if r.label in legend]
            axes[0][0].legend([legend[k] for k in order], order, fontsize=7, loc="best")
            fig.tight_layout()
            path = out / f"{figure}_{axis}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def before_after(run: Run, out: Path) -> Path | None:
    """The first and the last evaluation grid of a run side by side, captioned with step, samples and
    strict accuracy (a run without strict: each held-out reward's mean ± sem and pass rate), as
    ``grids_<run>.png``; None when the run has no grid."""
    from PIL import Image, ImageDraw, ImageFont

    if not run.grids:
        return None
    chosen = [run.grids[0]] if len(run.grids) == 1 else [run.grids[0], run.grids[-1]]
    evals = {e.step: e for e in run.evals}
    images = [Image.open(p).convert("RGB") for _, p in chosen]
    header, gap = 22, 16
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = header + max(im.height for im in images)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 0
    for (step, _), im, tag in zip(chosen, images, ("before", "after")):
        e = evals.get(step)
        caption = f"{tag if len(images) > 1 else 'only grid'}: step {step}"
        if e is not None:
            caption += f", {e.samples} samples"
            if "strict" in e.metrics:
                caption += f", strict {e.metrics['strict']:.3f}"
            else:
                for name in reward_names([run]):
                    if f"reward_{name}" in e.metrics:
                        caption += f", {name} {_fmt_mean_sem(e, name)}"
                    if f"pass_{name}" in e.metrics:
                        caption += f" (pass {e.metrics[f'pass_{name}']:.3f})"
        draw.text((x + 4, 5), caption, fill=(0, 0, 0), font=font)
        canvas.paste(im, (x, header))
        x += im.width + gap
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"grids_{run.name.replace('/', '_')}.png"
    canvas.save(path)
    return path


def write_report(runs: Sequence[Run], out: str | Path, target: str | float | None = None,
                 command: str = "", target_metric: str | None = None, target_from: str = "first") -> Path:
    """Figures, grids and report.md under ``out``; returns the path of report.md. ``target_metric``
    None: strict accuracy in :func:`shapes_mode`, else no target (see :func:`target_metric_for`;
    ValueError for a target it cannot place)."""
    out = Path(out)
    metric = target_metric_for(runs, target_metric, target)
    if metric is None:
        target_value, target_text = None, ("none (the runs have no strict accuracy, a shapes-world metric; "
                                           "`--target-metric reward_NAME` or `pass_NAME` sets one)")
    elif target_from == "each":
        target_value, target_text = per_run_targets(target, runs, metric)
    else:
        target_value, target_text = resolve_target(target, runs, metric)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_curves(runs, out)
    grids = {r.name: before_after(r, out) for r in runs}
    about = ("Held-out metrics are those of `diffrl eval` (docs/shapes_world.md)." if shapes_mode(runs) else
             "Held-out metrics are those of `diffrl eval`: per reward the mean ± its standard error over the "
             "held-out images and, where the reward has a pass threshold, the pass rate (docs/your_model.md, "
             "\"Evaluate\").")
    md = ["# Training report", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
          + (f" by `{command}`" if command else "") + ".", "",
          f"Target {_metric_label(metric)}: {target_text}." if metric else f"Target: {target_text}.", "",
          ("Samples seen = samples trained by the learner; an evaluation is placed at the samples and wall "
           f"time of its step. {about}"), ""]
    warned = [(r, w) for r in runs for w in r.warnings]
    if warned:
        md += ["## Warnings", "", *(f"- **{r.name}**: {w}" for r, w in warned), ""]
    md += ["## Runs", "", overview_table(runs, target_value, metric), "## Curves", ""]
    for path in figures:
        if path.stem.endswith("_samples"):
            wall = path.with_name(path.stem.removesuffix("_samples") + "_wall.png")
            md += [f"![{path.stem}]({path.name})", "",
                   f"Against wall time: [{wall.name}]({wall.name})" if wall in figures else "", ""]
    if not figures:
        md += ["No curves: no run recorded a step or an evaluation.", ""]
    for r in runs:
        md += [f"## {r.label}", "", run_table(r, target_value, metric)]
        if grids[r.name] is not None:
            md += [f"![before and after: {r.name}]({grids[r.name].name})", ""]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"


# --------------------------------------------------------------------------------- command
def cmd_report(args: argparse.Namespace) -> int:
    try:
        runs = load_runs(args.run_dirs)
    except NotARunFolder as err:
        print(f"diffrl report: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    for r in runs:
        for w in r.warnings:
            print(f"warning: {r.name}: {w}", file=sys.stderr)
    try:
        command = " ".join(["diffrl report", *args.run_dirs, *(["--out", args.out] if args.out else []),
                            *(["--target", args.target] if args.target else []),
                            *(["--target-metric", args.target_metric] if args.target_metric else []),
                            *(["--target-from", args.target_from] if args.target_from != "first" else [])])
        path = write_report(runs, out, args.target, command=command, target_metric=args.target_metric,
                            target_from=args.target_from)
    except ValueError as err:
        print(f"diffrl report: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def register(sub) -> None:
    """Add ``report`` to the ``diffrl`` subcommands."""
    p = sub.add_parser(
        "report", help="curves, before/after grids and a markdown summary of run folders",
        description="Read one or more `diffrl train` run folders (metrics.jsonl, eval.jsonl, summary.json, "
                    "config.yaml, grids/) and write under --out: PNG curves of train reward, KL, the held-out "
                    "reward of every reward (mean ± standard error) and its pass rate, and on the shapes world "
                    "held-out strict and per-clause accuracy and image metrics (off_palette, fid_shapes, "
                    "diversity), against samples seen and wall time, every run overlaid (label: run name + "
                    "algorithm); the first and last evaluation grid of each run side by side; and report.md "
                    "with a table per run (algorithm, seed, steps, samples, wall time, base and final held-out "
                    "rewards and accuracy, fidelity drift, samples and wall time to reach --target of "
                    "--target-metric). Partial runs (killed, missing eval.jsonl) are reported with warnings; a "
                    "path that is not a run folder exits 2.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  diffrl report runs/shapes-crd\n"
               "  diffrl report runs/shapes-* --out report --target 0.35\n"
               "  diffrl report 'runs/*-seed*' --target +0.05   (quoted globs are expanded too)\n"
               "  diffrl report runs/sd35m-ocr --target-metric pass_ocr --target 0.5\n"
               "  diffrl report runs/*/ --target +0.10 --target-from each   (base, 4-step and 1-step students)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (or glob patterns)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: RUN_DIR/report for one run, ./report for several)")
    p.add_argument("--target", metavar="T", default=None,
                   help="target value of --target-metric: absolute (0.35) or an increment on the first run's "
                        f"base value (+0.10; the default is {DEFAULT_TARGET})")
    p.add_argument("--target-metric", metavar="M", default=None,
                   help="held-out metric of the target: strict (the default; shapes world only), or any logged "
                        "metric such as reward_ocr or pass_ocr. Runs without strict get no target unless "
                        "this names one")
    p.add_argument("--target-from", choices=("first", "each"), default="first",
                   help="what an increment --target is added to: the first run's base value (first, the "
                        "default) or each run's own (each: runs that start from different models)")
    p.set_defaults(func=cmd_report)
