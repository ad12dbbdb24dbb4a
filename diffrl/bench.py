"""Benchmarks (not tests): ``diffrl bench sampler|loop|sync|sync-vs-async``. Figures go to
docs/benchmarks.md.

``bench loop`` runs the asynchronous service (``diffrl.job.train``: Ray sampler actors, reward servers,
Redis, DeepSpeed learner actor, all overlapping). ``bench sync`` runs the synchronous baseline built
from the same parts in one process and in lockstep: the same :class:`diffrl.actors.sampler.Sampler` (built by
``diffrl.actors.ray_sampler.build_sampler``), the same reward client over HTTP to the same local reward
servers, the same Redis stream and the same :class:`diffrl.learner.learner.Learner` (DeepSpeed) with its
checkpoints; only the schedule differs (sample and score a step's groups, then train on them, then
load the new weights, never two at once). ``bench sync-vs-async`` runs both with the same recipe and
a simulated reward latency (``execution.latency_ms`` of the reward servers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import textwrap
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Self

import torch

from diffrl import run_folder
from diffrl.config import ConfigError, require
from diffrl.models.config import ModelConfig, SamplingConfig

if TYPE_CHECKING:
    from diffrl.schema import TrainConfig

DEFAULT_LOOP_RECIPE = "deploy/configs/shapes-cpu.yaml"
"""Recipe of ``bench loop``, ``bench sync`` and ``bench sync-vs-async`` when none is given."""


@dataclass
class SamplerBenchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to sample from."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampler settings (steps, CFG, batch size)."""
    num_prompts: int = 8
    """Prompts per measured round."""
    k: int = 8
    """Samples per prompt (images per round = num_prompts * k)."""
    rounds: int = 3
    """Measured rounds (after one warm-up round)."""
    record_trajectory: bool = False
    """Sample through the trajectory recorder (every state, x̂0 and log-prob kept), as samplers with
    sampler.record_trajectory do; also taken for sampling.step_kind eta/flow_sde or explicit sigmas."""

    def validate(self) -> None:
        require(self.num_prompts >= 1, "num_prompts", "an int >= 1")
        require(self.k >= 1, "k", "an int >= 1")
        require(self.rounds >= 1, "rounds", "an int >= 1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_sampler(cfg: SamplerBenchConfig) -> dict:
    """Images/s of the full sampler (prompt encoding, Euler ODE with CFG, decoding to uint8) against
    the bound set by the denoiser alone: num_steps forwards of the same batch (x2 with CFG)."""
    from diffrl.models import shapes_world
    from diffrl.models.adapter import FlowModel

    model = FlowModel.from_config(cfg.model)
    s = cfg.sampling
    base = shapes_world.train_prompts()
    n = cfg.num_prompts * cfg.k
    recorded = cfg.record_trajectory or s.kind() != "euler" or bool(s.sigmas)

    def one_round(r: int) -> float:
        prompts = [base[(r * cfg.num_prompts + i) % len(base)] for i in range(cfg.num_prompts) for _ in range(cfg.k)]
        seeds = list(range(r * n, (r + 1) * n))
        _sync(model.device)
        start = time.perf_counter()
        if recorded:
            traj = model.sample_trajectory(prompts, seeds, [x + 1 for x in seeds], s.grid(model.num_train_timesteps),
                                           s.kind(), s.noise_level(), s.guidance_scale, batch_size=s.batch_size)
            model.to_uint8(model.decode(traj.x0))
        else:
            model.generate(prompts, seeds, num_steps=s.num_steps, guidance_scale=s.guidance_scale, shift=s.shift,
                           batch_size=s.batch_size)
        _sync(model.device)
        return time.perf_counter() - start

    one_round(0)
    sampler_s = min(one_round(r) for r in range(1, cfg.rounds + 1))

    # The bound: the bare transformer forward on a batch of the same size, num_steps times.
    cfg_factor = 1 if s.guidance_scale == 1.0 else 2
    batch = min(n, s.batch_size) * cfg_factor
    x = torch.randn(batch, *model.latent_shape, device=model.device, dtype=model.dtype)
    cond = model.encode_prompts(base[:1]).repeat_interleave(batch)
    sigma = torch.full((batch,), 0.5, device=model.device)
    with torch.no_grad():
        model.velocity(x, sigma, cond)
        times = []
        for _ in range(max(3, cfg.rounds)):
            _sync(model.device)
            t0 = time.perf_counter()
            model.velocity(x, sigma, cond)
            _sync(model.device)
            times.append(time.perf_counter() - t0)
    forward_s = min(times)
    chunks = -(-n // s.batch_size)
    bound_s = forward_s * s.num_steps * chunks
    return {
        "device": str(model.device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "images": n,
        "num_steps": s.num_steps,
        "step_kind": s.kind(),
        "recorded": recorded,
        "guidance_scale": s.guidance_scale,
        "batch_size": s.batch_size,
        "sampler_images_per_s": n / sampler_s,
        "bound_images_per_s": n / bound_s,
        "efficiency": bound_s / sampler_s,
        "forward_ms": forward_s * 1000,
    }


def load_bench_config(recipe: str | None, overrides: list[str], reward_latency_ms: float = 0.0,
                      reward_jitter_ms: float = 0.0) -> TrainConfig:
    """The training recipe of a loop benchmark: evaluations off, and every locally started reward server
    answering ``reward_latency_ms`` (+- ``reward_jitter_ms``) later (its ``execution.latency_ms``)."""
    from diffrl.config import load_config
    from diffrl.schema import TrainConfig

    cfg = load_config(TrainConfig, recipe, [*overrides, "run.eval_every=0"])
    return with_reward_latency(cfg, reward_latency_ms, reward_jitter_ms)


def with_reward_latency(cfg: TrainConfig, latency_ms: float, jitter_ms: float = 0.0) -> TrainConfig:
    """``cfg`` whose local reward servers add a simulated latency (reward_servers ExecutionConfig)."""
    from diffrl.reward_servers.config import ExecutionConfig

    if latency_ms == 0 and jitter_ms == 0:
        return cfg
    try:
        ExecutionConfig(latency_ms=latency_ms, latency_jitter_ms=jitter_ms).validate()
    except ConfigError as err:
        option = {"latency_ms": "--reward-latency-ms", "latency_jitter_ms": "--reward-jitter-ms"}[err.field]
        raise ConfigError(option, err.message) from None
    remote = [r.name for r in cfg.rewards if r.urls]
    if remote:
        raise ConfigError("rewards", f"a simulated latency needs locally started reward servers; {remote} "
                          "have urls (set their latency on those servers: execution.latency_ms)")
    extra = [f"execution.latency_ms={latency_ms:g}", f"execution.latency_jitter_ms={jitter_ms:g}"]
    return replace(cfg, rewards=[replace(r, serve_args=[*r.serve_args, *extra]) for r in cfg.rewards])


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}"


class CpuMeter:
    """CPU seconds (user + system) used by this process and all its descendants (reward servers,
    Redis, the local Ray's daemons and workers), sampled every ``interval`` s in a thread. A process's
    last sample still counts after it exits (it loses at most one interval). On a shared machine this
    is the job's own cost, whatever other processes take."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.series: list[tuple[float, float]] = []  # (time.time(), CPU seconds so far)
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        procs = [me]
        with contextlib.suppress(psutil.Error):
            procs += me.children(recursive=True)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                self._cpu[(proc.pid, proc.create_time())] = t.user + t.system
        self.series.append((time.time(), sum(self._cpu.values())))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def between(self, t0: float, t1: float) -> float:
        """CPU seconds used from ``t0`` to ``t1`` (``time.time()`` values), interpolated."""
        import numpy as np

        ts, cpu = zip(*self.series)
        return float(np.interp(t1, ts, cpu) - np.interp(t0, ts, cpu))


def _steady_rate(step_times: list[float], samples_per_step: int) -> float | None:
    """Samples trained per second from the end of the first step to the end of the last: leaves out
    the first step (warm-up, and the service's samplers starting a little before its loop)."""
    if len(step_times) < 2:
        return None
    return (len(step_times) - 1) * samples_per_step / max(step_times[-1] - step_times[0], 1e-9)


def _cpu_figures(meter: CpuMeter, t0: float, t1: float, samples_trained: int) -> dict:
    cpu = meter.between(t0, t1)
    return {"cpu_seconds": cpu, "cpu_cores_busy": cpu / max(t1 - t0, 1e-9),
            "samples_trained_per_cpu_s": samples_trained / max(cpu, 1e-9),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def bench_loop(recipe: str | None, overrides: list[str], reward_latency_ms: float = 0.0,
               reward_jitter_ms: float = 0.0) -> dict:
    """End-to-end throughput of the asynchronous actor-learner service on the embedded stack: trains
    ``run.max_steps`` steps without evaluations and reports samples/s, learner step time and idle
    fraction, and sampler utilisation (busy, paused by backpressure)."""
    return bench_loop_config(load_bench_config(recipe, overrides, reward_latency_ms, reward_jitter_ms),
                             reward_latency_ms)


RAY_NICENESS_ENV = "RAY_worker_niceness"
"""Ray starts its workers this much nicer than the driver (Ray's default 15); the loop benchmarks set it
to 0 unless it is set, so that on a shared machine the service's actors compete for the CPU like the
synchronous loop (which runs in the driver) and like the other processes there."""


def bench_loop_config(cfg: TrainConfig, reward_latency_ms: float = 0.0) -> dict:
    from diffrl.job import train

    os.environ.setdefault(RAY_NICENESS_ENV, "0")
    with CpuMeter() as meter:
        called = time.time()
        run_dir = train(cfg)
    summary = json.loads((run_dir / run_folder.SUMMARY).read_text())
    steps = [json.loads(line) for line in (run_dir / run_folder.METRICS).read_text().splitlines()]
    steps = [s for s in steps if s.get("kind") == "train"]
    wall = summary["train_seconds"]
    step_seconds = [s["step_seconds"] for s in steps]
    k = cfg.sampler.k
    trained = summary["learner_counters"]["groups_trained"]
    busy, paused = summary["sampler_busy_seconds"], summary["sampler_paused_seconds"]
    result = {
        "mode": "async",
        "machine": _machine(),
        "run_dir": str(run_dir),
        "reward_latency_ms": reward_latency_ms,
        "learner_steps": len(steps),
        "seconds": wall,
        "groups_trained": trained,
        "samples_trained": trained * k,
        "samples_trained_per_s": trained * k / wall,
        "samples_trained_per_s_after_first_step": _steady_rate([s["time"] for s in steps],
                                                               cfg.learner.groups_per_step * k),
        "samples_produced_per_s": summary["groups_published"] * k / wall,
        "learner_step_seconds_mean": sum(step_seconds) / max(len(step_seconds), 1),
        "learner_idle_fraction": max(0.0, 1 - sum(step_seconds) / wall),
        "sampler_utilisation": sum(busy) / (len(busy) * wall),
        "sampler_paused_fraction": sum(paused) / (len(paused) * wall),
        "staleness_mean": sum(s.get("staleness_mean", 0.0) for s in steps) / max(len(steps), 1),
        "ray_worker_niceness": int(os.environ[RAY_NICENESS_ENV]),
    }
    # the loop's window: it ended right after the last step's line (its time is from train()'s start)
    end = called + (steps[-1]["time"] if steps else wall)
    result.update(_cpu_figures(meter, end - wall, end, trained * k))
    (run_dir / "bench_loop.json").write_text(json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------------ sync
def bench_sync(recipe: str | None, overrides: list[str], reward_latency_ms: float = 0.0,
               reward_jitter_ms: float = 0.0) -> dict:
    """The synchronous baseline of ``bench loop`` (see :func:`run_sync_loop`)."""
    return run_sync_loop(load_bench_config(recipe, overrides, reward_latency_ms, reward_jitter_ms),
                         reward_latency_ms)


def _set_threads(n: int) -> None:
    if n:
        torch.set_num_threads(n)


def run_sync_loop(cfg: TrainConfig, reward_latency_ms: float = 0.0) -> dict:
    """Train ``run.max_steps`` learner steps in lockstep, in this process, with the parts of the
    service: per step, the sampler runs rounds (load the newest p_samp, sample, decode, score over HTTP,
    publish to Redis) until ``learner.groups_per_step`` scored groups are in the stream; then the
    learner reads them and takes one DeepSpeed step (checkpointing on its schedule) and publishes
    p_samp to a local weight channel, which the sampler loads at its next round. Nothing overlaps, so
    every group is trained at staleness 0.

    Differences from ``train`` that are not the schedule: one sampler walking all the prompts (the
    service shards them over ``sampler.num_samplers`` actors), an embedded Redis always, and no Ray
    (weights go through :class:`diffrl.proto.weight_sync.LocalWeightChannel`, the same serialized update).
    Torch threads follow the recipe per phase (``sampler.torch_threads`` while sampling,
    ``learner.torch_threads`` while training). Reports the figures of :func:`bench_loop` (same
    definitions) plus the sampler's time per stage."""
    from diffrl.actors.ray_sampler import SamplerSpec, build_sampler
    from diffrl.config import to_yaml
    from diffrl.embedded_redis import EmbeddedRedis, connect
    from diffrl.job import JsonLines, _start_rewards, prepare_run_dir, trained_learner_config
    from diffrl.learner.learner import Learner
    from diffrl.learner.ray_learner import load_learner_model
    from diffrl.proto.weight_sync import LocalWeightChannel

    if cfg.learner.world_size != 1:
        raise ConfigError("learner.world_size", f"1 for the synchronous loop (one process), got "
                          f"{cfg.learner.world_size}")
    if cfg.run.resume:
        raise ConfigError("run.resume", "not supported by the synchronous benchmark")
    cfg = replace(cfg, run=replace(cfg.run, name=f"{cfg.run.name}-sync"))
    G = cfg.learner.groups_per_step
    lcfg = trained_learner_config(cfg)
    # Backpressure never pauses the lockstep sampler: the stream holds at most one step's groups.
    scfg = replace(cfg.sampler, seed=cfg.sampler.seed + 1000 * cfg.run.seed, metrics_port=-1,
                   max_pending_groups=max(cfg.sampler.max_pending_groups, G + cfg.sampler.groups_per_round))
    if cfg.run.storage:
        raise ConfigError("run.storage", "not supported by the synchronous benchmark (it writes a local run folder)")
    run_dir, _ = prepare_run_dir(cfg)
    (run_dir / run_folder.CONFIG).write_text(to_yaml(cfg))
    metrics_log = JsonLines(run_dir / run_folder.METRICS)

    with contextlib.ExitStack() as stack:
        stack.callback(metrics_log.close)
        meter = stack.enter_context(CpuMeter())
        redis_url = stack.enter_context(EmbeddedRedis(data_dir=run_dir / "redis", port=0)).tcp_url
        rewards = _start_rewards(cfg, run_dir, stack)

        model = load_learner_model(lcfg, cfg.model)
        channel = LocalWeightChannel()
        learner = Learner(lcfg, model, publisher=channel, run_dir=run_dir)
        stack.callback(learner.close)
        learner.connect_bus(connect(redis_url), cfg.redis.stream, cfg.redis.consumer_group, retry=cfg.redis.retry)

        spec = SamplerSpec(sampler_id="sampler-0", shard_index=0, num_shards=1, redis_url=redis_url,
                           stream=cfg.redis.stream, consumer_group=cfg.redis.consumer_group,
                           bus_retry=cfg.redis.retry, weights_channel="", model=cfg.model, sampler=scfg,
                           rewards=rewards, lora=lcfg.lora)
        train_prompts, _ = cfg.data.load()
        sampler = build_sampler(spec, train_prompts.items)
        sampler.weights = channel  # in-process: the learner's published p_samp, loaded at each round
        stack.callback(sampler.scorer.close)

        stages: dict[str, float] = {}
        step_seconds: list[float] = []
        step_times: list[float] = []  # end of each step, seconds from the start of the loop
        staleness: list[float] = []
        waits: list[float] = []  # per step: the learner waiting for sampling and scoring
        ready = 0  # scored (unmasked) groups in the stream, not yet read by the learner
        start, start_abs = time.perf_counter(), time.time()
        while learner.step < lcfg.max_steps:
            if cfg.run.max_seconds and time.perf_counter() - start > cfg.run.max_seconds:
                break
            t_wait = time.perf_counter()
            _set_threads(scfg.torch_threads)
            while ready < G:
                r = sampler.run_round()
                ready += r.groups - r.masked
                for stage, sec in r.stage_seconds.items():
                    stages[stage] = stages.get(stage, 0.0) + sec
                sampler.backoff_after(r)
            waits.append(time.perf_counter() - t_wait)
            _set_threads(lcfg.torch_threads)
            stats, deadline = None, time.monotonic() + 120
            while stats is None:  # masked groups read in between are acknowledged as such
                stats = learner.poll_and_step(block_ms=1000)
                if stats is None and time.monotonic() > deadline:
                    raise RuntimeError(f"the learner took no step with {ready} scored groups published")
            ready -= G
            step_seconds.append(stats["step_seconds"])
            step_times.append(time.perf_counter() - start)
            staleness.append(stats.get("staleness_mean", 0.0))
            metrics_log.write({"step": learner.step, "kind": "train", "time": step_times[-1],
                               **{k: v for k, v in stats.items() if not k.startswith("_")}})
        wall = time.perf_counter() - start
        window = (start_abs, start_abs + wall)
        learner.finish()
        counters = dict(learner.counters)
        published, rounds, version = sampler.published, sampler.rounds, sampler.version
        busy, paused = sampler.busy_seconds, sampler.paused_seconds

    k = scfg.k
    result = {
        "mode": "sync",
        "machine": _machine(),
        "run_dir": str(run_dir),
        "reward_latency_ms": reward_latency_ms,
        "learner_steps": len(step_seconds),
        "seconds": wall,
        "groups_trained": counters["groups_trained"],
        "samples_trained": counters["samples_trained"],
        "samples_trained_per_s": counters["groups_trained"] * k / wall,
        "samples_trained_per_s_after_first_step": _steady_rate(step_times, G * k),
        "samples_produced_per_s": published * k / wall,
        "learner_step_seconds_mean": sum(step_seconds) / max(len(step_seconds), 1),
        "learner_idle_fraction": max(0.0, 1 - sum(step_seconds) / wall),
        "learner_wait_fraction": sum(waits) / wall,
        "sampler_utilisation": busy / wall,
        "sampler_paused_fraction": paused / wall,
        "staleness_mean": sum(staleness) / max(len(staleness), 1),
        "groups_published": published,
        "sampler_rounds": rounds,
        "sampler_version_end": version,
        "sampler_stage_seconds": stages,
        **_cpu_figures(meter, *window, counters["groups_trained"] * k),
    }
    (run_dir / "bench_sync.json").write_text(json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------------ both
def bench_sync_vs_async(recipe: str | None, overrides: list[str], reward_latency_ms: float = 500.0,
                        reward_jitter_ms: float = 0.0) -> dict:
    """``bench loop`` (asynchronous service) then ``bench sync`` (lockstep) with the same recipe,
    overrides and simulated reward latency; the 1-, 5- and 15-minute load averages are recorded
    before each and at the end (other processes on the machine change the figures)."""
    load = {"before_async": os.getloadavg()}
    cfg = load_bench_config(recipe, overrides, reward_latency_ms, reward_jitter_ms)
    a = bench_loop_config(cfg, reward_latency_ms)
    load["before_sync"] = os.getloadavg()
    s = run_sync_loop(cfg, reward_latency_ms)
    load["end"] = os.getloadavg()
    return {"recipe": recipe, "overrides": list(overrides), "reward_latency_ms": reward_latency_ms,
            "reward_jitter_ms": reward_jitter_ms, "machine": _machine(),
            "load_average": {k: [round(x, 2) for x in v] for k, v in load.items()},
            "async": a, "sync": s,
            "ratio_async_over_sync": _ratio(a, s, "samples_trained_per_s"),
            "ratio_async_over_sync_after_first_step": _ratio(a, s, "samples_trained_per_s_after_first_step"),
            "ratio_async_over_sync_per_cpu_s": _ratio(a, s, "samples_trained_per_cpu_s")}


def _ratio(a: dict, s: dict, key: str) -> float | None:
    if a.get(key) is None or not s.get(key):
        return None
    return a[key] / s[key]


def format_comparison(result: dict) -> str:
    """The table of :func:`bench_sync_vs_async` (markdown)."""
    a, s = result["async"], result["sync"]
    rows = [
        ("learner steps", "{:d}", "learner_steps"),
        ("wall time of the loop (s)", "{:.1f}", "seconds"),
        ("samples trained", "{:d}", "samples_trained"),
        ("samples trained / s", "{:.2f}", "samples_trained_per_s"),
        ("samples trained / s after the first step", "{:.2f}", "samples_trained_per_s_after_first_step"),
        ("samples produced / s", "{:.2f}", "samples_produced_per_s"),
        ("learner step time, mean (s)", "{:.2f}", "learner_step_seconds_mean"),
        ("learner idle fraction", "{:.3f}", "learner_idle_fraction"),
        ("sampler busy fraction (per sampler)", "{:.3f}", "sampler_utilisation"),
        ("sampler paused by backpressure", "{:.3f}", "sampler_paused_fraction"),
        ("mean staleness (versions)", "{:.2f}", "staleness_mean"),
        ("CPU seconds of the job's processes in the loop", "{:.0f}", "cpu_seconds"),
        ("cores busy with the job (CPU s / wall s)", "{:.2f}", "cpu_cores_busy"),
        ("samples trained / CPU-s", "{:.3f}", "samples_trained_per_cpu_s"),
    ]
    head = (f"reward latency {result['reward_latency_ms']:g} +- {result['reward_jitter_ms']:g} ms per request; "
            f"{result['machine']}; load average (1/5/15 min) {result['load_average']}")
    lines = [head, "", "| measure | sync (lockstep) | async (service) |", "| --- | ---: | ---: |"]
    def cell(r: dict, fmt: str, key: str) -> str:
        return "n/a" if r.get(key) is None else fmt.format(r[key])

    lines += [f"| {name} | {cell(s, fmt, key)} | {cell(a, fmt, key)} |" for name, fmt, key in rows]
    ratios = [("per s", "ratio_async_over_sync"), ("per s after the first step", "ratio_async_over_sync_after_first_step"),
              ("per CPU-s", "ratio_async_over_sync_per_cpu_s")]
    lines += ["", "async / sync samples trained: " + "; ".join(
        f"{name} {result[key]:.2f}" for name, key in ratios if result.get(key) is not None)]
    st = s.get("sampler_stage_seconds") or {}
    if st:
        lines.append("sync sampler time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def _add_loop_args(p: argparse.ArgumentParser, latency_default: float) -> None:
    from diffrl.config import format_help
    from diffrl.schema import TrainConfig

    p.add_argument("--reward-latency-ms", type=float, default=latency_default, metavar="MS",
                   help=f"simulated latency of every local reward server per request (execution.latency_ms; "
                        f"default {latency_default:g})")
    p.add_argument("--reward-jitter-ms", type=float, default=0.0, metavar="MS",
                   help="uniform spread of that latency, +- MS (default 0)")
    p.add_argument("config", nargs="*", metavar="[RECIPE] [key=value ...]",
                   help=f"optional training recipe (default {DEFAULT_LOOP_RECIPE}), then dotted overrides")
    p.epilog = "config keys (the training recipe's):\n" + format_help(TrainConfig)
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _recipe(args: argparse.Namespace) -> tuple[str, list[str]]:
    from diffrl.cli import split_recipe

    recipe, overrides = split_recipe(list(args.config))
    return recipe or DEFAULT_LOOP_RECIPE, overrides


def cmd_bench_sync(args: argparse.Namespace) -> int:
    recipe, overrides = _recipe(args)
    print(json.dumps(bench_sync(recipe, overrides, args.reward_latency_ms, args.reward_jitter_ms), indent=2))
    return 0


def cmd_bench_sync_vs_async(args: argparse.Namespace) -> int:
    recipe, overrides = _recipe(args)
    result = bench_sync_vs_async(recipe, overrides, args.reward_latency_ms, args.reward_jitter_ms)
    print(json.dumps(result, indent=2))
    print(format_comparison(result))
    return 0


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def register(bench_subparsers) -> None:
    """Add ``diffrl bench sync`` and ``diffrl bench sync-vs-async``."""
    p = bench_subparsers.add_parser(
        "sync", help="the synchronous baseline of `bench loop`: sample -> score -> train in lockstep",
        description=_wrap("Train run.max_steps learner steps in one process and in lockstep with the parts of the "
                    "service (the same Sampler, reward client and local reward servers over HTTP, Redis stream "
                    "and DeepSpeed Learner): sample and score a step's groups, train one step on them, load "
                    "the new weights, repeat. Reports the figures of `bench loop` (samples trained/s, learner "
                    "idle fraction, sampler busy fraction) plus the sampler's time per stage."))
    _add_loop_args(p, 0.0)
    p.set_defaults(func=cmd_bench_sync)
    p = bench_subparsers.add_parser(
        "sync-vs-async", help="`bench loop` (async service) vs `bench sync` with a slow remote reward",
        description=_wrap("Run `bench loop` (the asynchronous service: Ray samplers, reward servers, Redis, "
                    "learner, overlapping) and then `bench sync` (the same parts in lockstep) with the same "
                    "recipe and overrides and reward servers that answer --reward-latency-ms later (a remote "
                    "GPU reward model), and print both, the ratio async/sync of samples trained per second "
                    "and the load averages (other processes change the figures)."))
    _add_loop_args(p, 500.0)
    p.set_defaults(func=cmd_bench_sync_vs_async)
