"""Soak: run `diffrl train` on the embedded stack for N minutes at full CPU while sampling the resident
memory (RSS) of every process of the job, then report growth per process and the ledger.

    .venv/bin/python benchmarks/soak.py --minutes 15 [--model PATH] [--interval 10] [key=value ...]

Processes are the driver and all its descendants (local Ray: gcs_server, raylet, sampler and learner
actors, the weight channel, Ray's agents; the embedded redis-server; the reward servers), labelled by
their command line. For each: RSS after the warm-up, at the end, the maximum, and the growth rate
from a least-squares line over the samples after the warm-up (MiB per hour). The run folder gets
soak.json (every sample) and soak.md (the table, as pasted into docs/benchmarks.md "## Soak").
Overrides go to the training recipe (default deploy/configs/shapes-cpu.yaml, no evaluations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import psutil

from diffrl import run_folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


GENERIC = "ray worker (starting or idle)"


def label(proc: psutil.Process, driver: int) -> str | None:
    """A readable name from the process title (Ray workers retitle themselves ray::<actor>.<method>)."""
    if proc.pid == driver:
        return "driver (diffrl train)"
    try:
        argv = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    first, cmd = (argv[0] if argv else ""), " ".join(argv)
    if first.startswith("ray::"):
        title = first[5:]
        for key, name in (("SamplerActor", "sampler actor"), ("LearnerActor", "learner actor"),
                          ("_Registry", "weight channel actor"), ("WeightChannel", "weight channel actor"),
                          ("DashboardAgent", "ray dashboard agent"), ("RuntimeEnvAgent", "ray runtime_env agent"),
                          ("IDLE", GENERIC)):
            if key in title:
                return name
        return f"ray {title.split('.')[0]}"
    exe = first.split(" ")[0]  # redis-server retitles itself "<path>/redis-server 127.0.0.1:PORT"
    for key, name in (("redis-server", "redis-server"), ("gcs_server", "ray gcs_server"), ("raylet", "ray raylet")):
        if exe.endswith(key):
            return name
    for key, name in (("reward_servers", "reward server"), ("default_worker.py", GENERIC),
                      ("log_monitor.py", "ray log_monitor"), ("autoscaler/_private/monitor.py", "ray monitor"),
                      ("dashboard/dashboard.py", "ray dashboard"), ("dashboard/agent.py", "ray dashboard agent"),
                      ("runtime_env/agent", "ray runtime_env agent")):
        if key in cmd:
            return name
    return None


class Sampler(threading.Thread):
    """Samples the RSS of the driver and its descendants every ``interval`` seconds."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[dict] = []  # {"t", "pid", "name", "rss"}
        self.names: dict[int, str] = {}
        self.stop = threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            t = time.time() - self.t0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    name = self.names.get(proc.pid)
                    if name in (None, GENERIC):  # a worker becomes an actor: relabel until specific
                        name = label(proc, me.pid) or name
                    if name is None:
                        continue
                    self.names[proc.pid] = name
                    self.samples.append({"t": round(t, 1), "pid": proc.pid, "name": self.names[proc.pid],
                                         "rss": proc.memory_info().rss})
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.stop.wait(self.interval)


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    n = len(ts)
    if n < 3:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 0.0 if var == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var * 3600.0


def report(samples: list[dict], warmup_s: float, end_s: float) -> list[dict]:
    rows = []
    by_pid: dict[int, list[dict]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    for pid, ss in by_pid.items():
        after = [s for s in ss if s["t"] >= warmup_s]
        if len(after) < 2:
            continue  # a short-lived process (e.g. a worker that started and went)
        mib = [s["rss"] / 2**20 for s in after]
        rows.append({
            "process": ss[-1]["name"], "pid": pid, "samples": len(after),
            "from_s": after[0]["t"], "to_s": after[-1]["t"],
            "rss_start_mib": round(mib[0], 1), "rss_end_mib": round(mib[-1], 1), "rss_max_mib": round(max(mib), 1),
            "growth_mib": round(mib[-1] - mib[0], 1),
            "slope_mib_per_h": round(slope_per_hour([s["t"] for s in after], mib), 1),
            "covers_run": after[-1]["t"] >= end_s - 60,
        })
    return sorted(rows, key=lambda r: (r["process"], r["pid"]))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [(f"{meta['minutes']:.1f} min of `diffrl train` ({meta['recipe']}, {meta['model']}) on {meta['machine']}; "
             f"{meta['steps']} learner steps, {meta['ledger'].get('produced', '?')} groups produced; RSS sampled every "
             f"{meta['interval']} s, growth measured after a {meta['warmup_s']:.0f} s warm-up."),
             "",
             "| process | RSS after warm-up (MiB) | RSS at end (MiB) | max (MiB) | growth (MiB) | trend (MiB/h) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if not r["covers_run"]:
            continue
        lines.append(f"| {r['process']} | {r['rss_start_mib']} | {r['rss_end_mib']} | {r['rss_max_mib']} | "
                     f"{r['growth_mib']:+} | {r['slope_mib_per_h']:+} |")
    led = meta["ledger"]
    if led:
        lines += ["", (f"Ledger at the end: produced {led['produced']} = trained {led['trained']} + stale "
                      f"{led['dropped_stale']} + masked {led['masked']} + duplicate {led['duplicate']} + invalid "
                      f"{led['invalid']} + malformed {led['malformed']} + lost {led['lost']} + pending {led['pending']} "
                      f"({'balanced' if led['balanced'] else 'NOT balanced'}); trained_groups.txt: "
                      f"{led['trained_groups_file']['lines']} lines, {led['trained_groups_file']['unique']} unique.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=120.0, help="seconds before growth is measured")
    ap.add_argument("--model", default="", help="model folder (default: assets/shapes-base, else a tiny SD3 "
                    "built here)")
    ap.add_argument("--recipe", default=str(REPO / "deploy/configs/shapes-cpu.yaml"))
    ap.add_argument("--output-dir", default="runs")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from diffrl.config import load_config
    from diffrl.job import train
    from diffrl.schema import TrainConfig

    model = args.model
    if not model:
        model = str(REPO / "assets/shapes-base")
        if not Path(model, "model_index.json").is_file():
            from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3

            root = Path(args.output_dir) / "soak-model"
            if not (root / "model" / "model_index.json").is_file():
                build_tiny_sd3(TinySD3Arch(), root / "work").save_pretrained(str(root / "model"))
            model = str(root / "model")
    name = f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = load_config(TrainConfig, args.recipe, [
        f"model.path={model}", f"run.name={name}", f"run.output_dir={args.output_dir}", "run.max_steps=100000000",
        f"run.max_seconds={args.minutes * 60}", "run.eval_every=0", "run.progress=false", *args.overrides])

    sampler = Sampler(args.interval)
    sampler.start()
    t0 = time.time()
    run_dir = train(cfg)
    sampler.stop.set()
    sampler.join()
    minutes = (time.time() - t0) / 60
    summary = json.loads((run_dir / run_folder.SUMMARY).read_text())
    end_s = max((s["t"] for s in sampler.samples), default=0.0)
    rows = report(sampler.samples, args.warmup, end_s)
    meta = {"minutes": minutes, "interval": args.interval, "warmup_s": args.warmup, "model": Path(model).name,
            "recipe": Path(args.recipe).name, "steps": summary.get("end_step"), "overrides": args.overrides,
            "machine": f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                       f"{platform.system()} {platform.machine()}",
            "ledger": summary.get("ledger", {})}
    (run_dir / "soak.json").write_text(json.dumps({"meta": meta, "rows": rows, "samples": sampler.samples}, indent=1))
    md = markdown(rows, meta)
    (run_dir / "soak.md").write_text(md)
    print(md)
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
