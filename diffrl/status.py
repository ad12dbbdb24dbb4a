"""``diffrl status [RUN_DIR]``: a running job's state for people without Grafana.

Reads RUN_DIR/endpoints.json (written by ``diffrl train`` once its services are up), scrapes the
learner's and samplers' /metrics, calls every reward replica's /healthz and /metrics, reads the tail
of RUN_DIR/metrics.jsonl, and prints a compact table: step, policy versions, stream backlog,
recent rewards and KL, the last held-out evaluation, and reward server health. Exit status 0 when
the run is live, 1 when it is not (not started, finished, or its learner is unreachable), 2 when
RUN_DIR is not a run folder. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import httpx

from diffrl import run_folder
from diffrl.learner import metrics as lm

Samples = dict[str, list[tuple[dict[str, str], float]]]

RUNNING, NOT_STARTED, FINISHED, NOT_RUNNING = "running", "not started", "finished", "not running"


def find_run_dir(arg: str | None, output_dir: str = "runs") -> Path:
    """RUN_DIR, or the run folder under ``output_dir`` whose endpoints.json is the newest."""
    if arg:
        return Path(arg)
    found = sorted(Path(output_dir).glob("*/endpoints.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no run folder with an endpoints.json under {output_dir}/; give RUN_DIR")
    return found[-1].parent


def scrape(client: httpx.Client, url: str) -> Samples:
    """Prometheus text exposition -> {sample name: [(labels, value)]} (raises httpx.HTTPError)."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = client.get(url)
    resp.raise_for_status()
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def _one(samples: Samples, name: str, **labels: str) -> float | None:
    for have, value in samples.get(name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            return value
    return None


def _sum(samples: Samples, name: str) -> float | None:
    values = [v for _, v in samples.get(name, [])]
    return sum(values) if values else None


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {have[label]: value for have, value in samples.get(name, []) if label in have}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _learner(samples: Samples) -> dict:
    eval_step = _one(samples, "diffrl_learner_eval_step")
    return {
        "step": _one(samples, lm.OPTIMIZER_STEPS_TOTAL),
        "policy_version": _one(samples, lm.POLICY_VERSION),
        "backlog_groups": _one(samples, lm.BACKLOG_GROUPS),
        "samples_per_second": _one(samples, lm.SAMPLES_PER_SECOND),
        "step_seconds_mean": _ratio(_one(samples, lm.STEP_SECONDS + "_sum"),
                                    _one(samples, lm.STEP_SECONDS + "_count")),
        "groups_consumed": _one(samples, lm.GROUPS_CONSUMED_TOTAL),
        "groups_dropped_stale": _one(samples, lm.GROUPS_DROPPED_STALE_TOTAL),
        "groups_masked": _one(samples, lm.GROUPS_MASKED_TOTAL),
        "staleness_mean": _ratio(_one(samples, lm.STALENESS_VERSIONS + "_sum"),
                                 _one(samples, lm.STALENESS_VERSIONS + "_count")),
        "reward_mean": _by(samples, lm.REWARD_MEAN, "reward"),
        "reward_std": _by(samples, lm.REWARD_STD, "reward"),
        "kl": _one(samples, lm.KL),
        "loss": _one(samples, lm.LOSS),
        # the algorithm's own gauges (Algorithm.gauges), those the scrape has
        "algorithm": {stat: value for stat, value in ((stat, _one(samples, name)) for stat, name in _algorithm_gauges())
                      if value is not None},
        "eval": None if eval_step is None else {
            "step": eval_step, "reward": _by(samples, "diffrl_learner_eval_reward", "reward"),
            "pass_rate": _by(samples, "diffrl_learner_eval_pass_rate", "reward"),
            "strict": _one(samples, "diffrl_learner_eval_strict_accuracy"),
            "fidelity": _one(samples, "diffrl_learner_eval_fidelity")},
    }


def _algorithm_gauges() -> list[tuple[str, str]]:
    """(stat, metric name) of every registered algorithm's own gauges."""
    from diffrl.learner.algorithms.base import registry

    return sorted({(stat, name) for alg in registry().values() for stat, (name, _) in alg.gauges.items()})


def _sampler(samples: Samples) -> dict:
    versions = _by(samples, "diffrl_sampler_policy_version", "sampler")
    return {"samplers": sorted(versions), "policy_version": versions,
            "groups_published": _by(samples, "diffrl_sampler_groups_published_total", "sampler"),
            "images": _by(samples, "diffrl_sampler_images_total", "sampler")}


def _reward_replica(client: httpx.Client, name: str, url: str) -> dict:
    rec: dict = {"reward": name, "url": url}
    try:
        resp = client.get(f"{url.rstrip('/')}/healthz")
        rec["healthy"] = resp.status_code == 200
        rec["health"] = resp.json().get("status", "?") if rec["healthy"] else f"HTTP {resp.status_code}"
    except (httpx.HTTPError, ValueError) as err:
        rec.update(healthy=False, health=f"unreachable ({type(err).__name__})")
        return rec
    try:
        m = scrape(client, f"{url.rstrip('/')}/metrics")
    except httpx.HTTPError:
        return rec
    rec.update(requests=_sum(m, "diffrl_reward_requests_total"), errors=_sum(m, "diffrl_reward_errors_total"),
               pending_images=_sum(m, "diffrl_reward_pending_images"),
               latency_mean_s=_ratio(_sum(m, "diffrl_reward_request_duration_seconds_sum"),
                                     _sum(m, "diffrl_reward_request_duration_seconds_count")))
    return rec


def _recent(run_dir: Path, n: int = 5) -> list[dict]:
    path = run_dir / run_folder.METRICS
    if not path.is_file():
        return []
    with open(path, "rb") as f:  # the tail only: a long run's file is large
        start = max(0, f.seek(0, 2) - 256 * 1024)
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()[1 if start else 0:]  # a cut first line
    rows = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if rec.get("kind") == "train":
            rows.append({"step": rec.get("step"), "reward_mean": rec.get("reward_mean"), "kl": rec.get("kl"),
                         "staleness_mean": rec.get("staleness_mean")})
    return rows[-n:]


_ERROR_MARKERS = ("Traceback", "ERROR", "Error:", "Exception", "FATAL", "Killed")


def _logs(run_dir: Path) -> list[dict]:
    """Every process's log file under RUN/logs (path, size, age) with its last line that looks like an
    error (a traceback, ERROR, ...), if any."""
    out = []
    for path in sorted((run_dir / run_folder.LOGS).glob("*.log")):
        entry = {"path": str(path), "bytes": path.stat().st_size, "age_s": time.time() - path.stat().st_mtime,
                 "last_error": None}
        with open(path, "rb") as f:  # the tail is enough: logs of long runs are large
            f.seek(max(0, entry["bytes"] - 65536))
            tail = f.read().decode("utf-8", errors="replace").splitlines()
        errors = [ln.strip() for ln in tail if any(m in ln for m in _ERROR_MARKERS)]
        entry["last_error"] = errors[-1][:300] if errors else None
        out.append(entry)
    return out


def _trouble(st: dict) -> bool:
    """Something is wrong: the run stopped without finishing, stopped with an error, or a sampler or a
    reward replica is down."""
    if st["state"] == NOT_RUNNING or (st.get("summary") or {}).get("error"):
        return True
    return any(not s["up"] for s in st.get("samplers", [])) or \
        any(not r.get("healthy", True) for r in st.get("rewards", []))


def collect_status(run_dir: str | Path, timeout_s: float = 3.0) -> dict:
    """Everything ``diffrl status`` prints, as a dict (``state`` is one of running, not started,
    finished, not running)."""
    run_dir = Path(run_dir)
    st: dict = {"run_dir": str(run_dir), "recent": _recent(run_dir), "logs": _logs(run_dir)}
    summary_path, endpoints_path = run_dir / run_folder.SUMMARY, run_dir / run_folder.ENDPOINTS
    if not endpoints_path.is_file():
        st.update(state=NOT_STARTED, message=f"no {endpoints_path.name} in {run_dir}: the run has not started "
                                             "its services yet (or this is not a run folder)")
        return st
    endpoints = json.loads(endpoints_path.read_text())
    st["endpoints_age_s"] = time.time() - endpoints_path.stat().st_mtime
    with httpx.Client(timeout=timeout_s) as client:
        try:
            url = endpoints["learner_metrics"]
            st["learner"] = {"url": url, **_learner(scrape(client, url))}
        except httpx.HTTPError as err:
            if summary_path.is_file() and summary_path.stat().st_mtime >= endpoints_path.stat().st_mtime:
                summary = json.loads(summary_path.read_text())
                st.update(state=FINISHED, summary=summary,
                          message=f"the run is not running: it finished at step {summary.get('end_step')} "
                                  f"after {summary.get('seconds', 0):.0f} s (see {summary_path})")
            else:
                st.update(state=NOT_RUNNING,
                          message=f"the run is not running: its learner ({endpoints['learner_metrics']}) is "
                                  f"unreachable ({type(err).__name__}); it stopped or crashed, see {run_dir}/logs")
            return st
        st["state"] = RUNNING
        samplers = []
        for url in endpoints.get("sampler_metrics", []):
            try:
                samplers.append({"url": url, "up": True, **_sampler(scrape(client, url))})
            except httpx.HTTPError as err:
                samplers.append({"url": url, "up": False, "error": type(err).__name__})
        st["samplers"] = samplers
        st["rewards"] = [_reward_replica(client, name, url)
                         for name, urls in endpoints.get("rewards", {}).items() for url in urls]
    return st


# --------------------------------------------------------------------------------- printing
def _f(value, fmt: str = ".3f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    if fmt == "d":
        return str(int(value))
    return format(value, fmt)


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _format_logs(st: dict) -> list[str]:
    """The log files, each with its last error line, when something is wrong (else nothing)."""
    if not st.get("logs") or not _trouble(st):
        return []
    lines = ["logs (one file per process)"]
    for entry in st["logs"]:
        lines.append(f"  {entry['path']}  {entry['bytes']} bytes, written {entry['age_s']:.0f} s ago")
        if entry["last_error"]:
            lines.append(f"    last error: {entry['last_error']}")
    return lines


def format_status(st: dict) -> str:
    lines = [f"run {st['run_dir']}: {st['state'].upper()}"]
    if st["state"] != RUNNING:
        lines.append(f"  {st['message']}")
        if (st.get("summary") or {}).get("error"):
            lines.append(f"  error: {st['summary']['error']}")
        return "\n".join(lines + _format_logs(st))
    lr = st["learner"]
    rewards = "  ".join(f"{name} {_f(mean)} ± {_f(lr['reward_std'].get(name))}"
                        for name, mean in sorted(lr["reward_mean"].items())) or "- (no step yet)"
    lines += [
        "learner",
        (f"  step {_f(lr['step'], 'd')}  policy version {_f(lr['policy_version'], 'd')}  "
         f"backlog {_f(lr['backlog_groups'], 'd')} groups  step time {_f(lr['step_seconds_mean'], '.2f')} s (mean)  "
         f"{_f(lr['samples_per_second'], '.1f')} samples/s"),
        (f"  groups consumed {_f(lr['groups_consumed'], 'd')}  dropped stale {_f(lr['groups_dropped_stale'], 'd')}  "
         f"masked {_f(lr['groups_masked'], 'd')}  staleness {_f(lr['staleness_mean'], '.2f')} versions (mean)"),
        f"  reward (last step)  {rewards}",
        f"  loss {_f(lr['loss'], '.4g')}  kl {_f(lr['kl'], '.4g')}  "
        + "  ".join(f"{stat} {_f(v, '.4g')}" for stat, v in sorted(lr["algorithm"].items())),
    ]
    if lr.get("eval"):
        ev = lr["eval"]
        held_out = "  ".join(f"{name} {_f(v)}" + (f" (pass {_f(ev['pass_rate'][name])})" if name in ev["pass_rate"]
                                                   else "") for name, v in sorted(ev.get("reward", {}).items()))
        if ev.get("strict") is not None:
            held_out += f"  strict {_f(ev['strict'])}  fidelity {_f(ev['fidelity'])}"
        lines.append(f"  held-out (step {_f(ev['step'], 'd')})  {held_out}")
    if st["recent"]:
        lines.append("recent steps")
        lines += _table([["step", "reward", "kl", "staleness"]] + [
            [_f(r["step"], "d"), _f(r["reward_mean"]), _f(r["kl"], ".4g"), _f(r["staleness_mean"], ".2f")]
            for r in st["recent"]])
    rows = [["sampler", "version", "groups", "images", "endpoint"]]
    for s in st["samplers"]:
        if not s["up"]:
            rows.append(["?", "-", "-", "-", f"{s['url']} (down: {s['error']})"])
        for sid in s.get("samplers", []):
            rows.append([sid, _f(s["policy_version"].get(sid), "d"), _f(s["groups_published"].get(sid), "d"),
                         _f(s["images"].get(sid), "d"), s["url"]])
    lines += ["samplers", *_table(rows)]
    rows = [["reward", "replica", "health", "requests", "errors", "mean ms", "pending"]]
    for r in st["rewards"]:
        ms = None if r.get("latency_mean_s") is None else 1000 * r["latency_mean_s"]
        rows.append([r["reward"], r["url"], r["health"], _f(r.get("requests"), "d"), _f(r.get("errors"), "d"),
                     _f(ms, ".1f"), _f(r.get("pending_images"), "d")])
    lines += ["rewards", *_table(rows)]
    return "\n".join(lines + _format_logs(st))


# --------------------------------------------------------------------------------- command
def cmd_status(args: argparse.Namespace) -> int:
    try:
        run_dir = find_run_dir(args.run_dir, args.output_dir)
    except FileNotFoundError as err:
        print(f"diffrl status: {err}")
        return 2
    if not run_dir.is_dir():
        print(f"diffrl status: {run_dir} is not a folder")
        return 2
    st = collect_status(run_dir, timeout_s=args.timeout)
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
    return 0 if st["state"] == RUNNING else 1


def register(sub) -> None:
    """Add ``status`` to the ``diffrl`` subcommands."""
    p = sub.add_parser("status", help="a running job's step, versions, backlog, rewards and reward server health",
                       description="Print a running job's state (for people without Grafana): step, policy "
                                   "versions, stream backlog, recent rewards and KL, held-out evaluation, "
                                   "samplers, reward replicas' health. Exit 0 when running, 1 when not.")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="run folder (default: the one under --output-dir with the newest endpoints.json)")
    p.add_argument("--output-dir", default="runs", help="where to look for run folders (run.output_dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--timeout", type=float, default=3.0, help="timeout of each HTTP call, seconds")
    p.set_defaults(func=cmd_status)
