"""The job driver of ``diffrl train``.

With no services configured it starts the embedded stack: a local Ray, an embedded redis-server
(data in the run folder, so ``--resume`` re-reads what was not acknowledged), and the recipe's reward
servers as local processes; it tears everything down at the end or on Ctrl-C. With addresses in the
config (``ray.address``, ``redis.url`` / ``$REDIS_URL``, ``rewards[i].urls``) it connects to existing
services instead. Under ``ray job submit`` set ``ray.address=auto``.

The run folder holds: config.yaml (resolved), metrics.jsonl (one line per learner step and per
evaluation), eval.jsonl, grids/ (image grids of held-out prompts with fixed seeds), checkpoints/,
logs/ (reward servers), endpoints.json (metrics URLs), prometheus_targets.json (the same as Prometheus
file_sd targets; also written to OUTPUT_DIR/prometheus/RUN_NAME.json while the run is live, see
diffrl/monitoring.py), summary.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from actors.ray_sampler import SamplerSpec, spawn_samplers
from diffrl.config import to_yaml
from diffrl.embedded_redis import EmbeddedRedis
from diffrl.learner_actor import LearnerActor, LearnerSpec
from diffrl.local_stack import LocalRewardServer, free_port
from diffrl.monitoring import METRICS_HOST_ENV, remove_prometheus_sd, write_prometheus_targets
from diffrl.schema import TrainConfig
from reward_servers.client import RewardClientConfig, RewardEndpointConfig

log = logging.getLogger(__name__)

# Environment every Ray worker of the job gets (CPU DeepSpeed, no hub, no tokenizer threads).
WORKER_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "REDIS_URL",
              "DIFFRL_REWARD_TOKEN", METRICS_HOST_ENV)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    if cfg.run.resume:
        run_dir = Path(cfg.run.resume)
        if not (run_dir / "checkpoints").is_dir():
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoints/ folder there")
        return run_dir
    base = Path(cfg.run.output_dir) / cfg.run.name
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


class JsonLines:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, default=float) + "\n")

    def close(self) -> None:
        self.file.close()


def _start_rewards(cfg: TrainConfig, run_dir: Path, stack: contextlib.ExitStack) -> RewardClientConfig:
    endpoints = []
    for spec in cfg.rewards:
        urls = list(spec.urls)
        if not urls:
            for i in range(spec.local_replicas):
                server = LocalRewardServer(spec.name, spec.serve_args,
                                           log_path=run_dir / "logs" / f"reward-{spec.name}-{i}.log").start()
                stack.callback(server.stop)
                urls.append(server.wait_ready().url)
        endpoints.append(RewardEndpointConfig(name=spec.name, urls=urls, weight=spec.weight,
                                              timeout_s=spec.timeout_s, retries=spec.retries))
    return RewardClientConfig(rewards=endpoints)


def _init_ray(cfg: TrainConfig, stack: contextlib.ExitStack) -> None:
    import ray

    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime_env = {"env_vars": env}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, namespace=cfg.ray.namespace, runtime_env=runtime_env,
                 log_to_driver=False)
    else:
        # Logical CPUs: every actor gets its reservation even on a 2-core laptop (they share cores).
        wanted = cfg.sampler.num_samplers * cfg.sampler.num_cpus + cfg.learner.world_size * cfg.placement.num_cpus
        num_cpus = max(cfg.ray.num_cpus or os.cpu_count() or 1, int(wanted + 0.999))
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        Path(cfg.ray.temp_dir).mkdir(parents=True, exist_ok=True)
        ray.init(num_cpus=num_cpus, namespace=cfg.ray.namespace, include_dashboard=False,
                 _temp_dir=cfg.ray.temp_dir, runtime_env=runtime_env, log_to_driver=False)
    stack.callback(ray.shutdown)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) one training job; returns its run folder."""
    import ray

    run_dir = prepare_run_dir(cfg)
    resuming = bool(cfg.run.resume)
    reward_weights = cfg.learner.reward_weights or {r.name: r.weight for r in cfg.rewards}
    cfg = replace(cfg, learner=replace(cfg.learner, reward_weights=reward_weights,
                                       max_steps=cfg.learner.max_steps or cfg.run.max_steps))
    (run_dir / "config.yaml" if not resuming else run_dir / "config.resumed.yaml").write_text(to_yaml(cfg))
    (run_dir / "grids").mkdir(exist_ok=True)
    metrics_log = JsonLines(run_dir / "metrics.jsonl")
    eval_log = JsonLines(run_dir / "eval.jsonl")
    summary: dict = {"run_dir": str(run_dir), "resumed": resuming}
    start = time.time()

    with contextlib.ExitStack() as stack:
        stack.callback(metrics_log.close)
        stack.callback(eval_log.close)
        redis_url = cfg.redis.url or os.environ.get("REDIS_URL", "")
        if not redis_url:
            redis = stack.enter_context(EmbeddedRedis(data_dir=run_dir / "redis", port=0))
            redis_url = redis.tcp_url
        rewards = _start_rewards(cfg, run_dir, stack)
        _init_ray(cfg, stack)

        channel = f"diffrl-weights-{run_dir.name}"
        world = cfg.learner.world_size
        master_port = free_port()
        learner_cls = ray.remote(LearnerActor)
        learners = []
        for rank in range(world):
            spec = LearnerSpec(rank=rank, world_size=world, master_addr=_host_ip(cfg), master_port=master_port,
                               run_dir=str(run_dir), resume=resuming, redis_url=redis_url,
                               stream=cfg.redis.stream, consumer_group=cfg.redis.consumer_group,
                               weights_channel=channel, metrics_port=cfg.placement.metrics_port if rank == 0 else -1,
                               model=cfg.model, learner=cfg.learner, eval=cfg.eval)
            learners.append(learner_cls.options(num_cpus=cfg.placement.num_cpus, num_gpus=cfg.placement.num_gpus,
                                                max_concurrency=1).remote(to_yaml(spec)))
        statuses = ray.get([lr.status.remote() for lr in learners])
        step = int(statuses[0]["step"])
        specs = [SamplerSpec(sampler_id=f"sampler-{i}", shard_index=i, num_shards=cfg.sampler.num_samplers,
                             redis_url=redis_url, stream=cfg.redis.stream, consumer_group=cfg.redis.consumer_group,
                             weights_channel=channel, model=cfg.model,
                             sampler=replace(cfg.sampler, seed=cfg.sampler.seed + 1000 * cfg.run.seed),
                             rewards=rewards, lora=cfg.learner.lora)
                 for i in range(cfg.sampler.num_samplers)]
        samplers = spawn_samplers(specs, cfg.sampler)
        sampler_runs = [s.run.remote() for s in samplers]
        stack.callback(_stop_samplers, samplers, sampler_runs)
        sampler_status = ray.get([s.status.remote() for s in samplers])
        lr0 = statuses[0]
        endpoints = {"learner_metrics": f"http://{lr0['metrics_host']}:{lr0['metrics_port']}/metrics",
                     "redis": redis_url, "rewards": {e.name: e.urls for e in rewards.rewards},
                     "sampler_metrics": [f"http://{s['metrics_host']}:{s['metrics_port']}/metrics"
                                         for s in sampler_status]}
        (run_dir / "endpoints.json").write_text(json.dumps(endpoints, indent=2))
        sd_file = write_prometheus_targets(run_dir, Path(cfg.run.output_dir), endpoints)
        stack.callback(remove_prometheus_sd, sd_file)
        summary["start_step"] = step
        summary["sampler_versions_start"] = [s["version"] for s in sampler_status]

        def evaluate(at_step: int) -> dict:
            grid = run_dir / "grids" / f"step_{at_step:06d}.png"
            m = ray.get(learners[0].evaluate.remote(str(grid)))
            eval_log.write({"step": at_step, **m})
            metrics_log.write({"step": at_step, "kind": "eval", **m})
            return m

        if cfg.run.eval_every and not resuming:
            summary["eval_start"] = evaluate(step)
        bar = tqdm(total=cfg.learner.max_steps, initial=step, desc="train", unit="step", disable=not cfg.run.progress)
        last: dict = {}
        try:
            while step < cfg.learner.max_steps:
                if cfg.run.max_seconds and time.time() - start > cfg.run.max_seconds:
                    break
                results = ray.get([lr.step.remote() for lr in learners])
                if results[0] is None:
                    continue
                step += 1
                last = results[0]
                metrics_log.write({"step": step, "kind": "train", "time": time.time() - start, **last})
                bar.update(1)
                bar.set_postfix(reward=f"{last.get('reward_mean', float('nan')):.3f}",
                                kl=f"{last.get('kl', float('nan')):.4f}", stale=f"{last.get('staleness_mean', 0):.1f}")
                if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.learner.max_steps:
                    evaluate(step)
        finally:
            bar.close()
            _stop_samplers(samplers, sampler_runs)
            step = max(ray.get([lr.finish.remote() for lr in learners]))
        if cfg.run.eval_every:
            summary["eval_end"] = evaluate(step)
        sampler_status = ray.get([s.status.remote() for s in samplers])
        learner_status = ray.get([lr.status.remote() for lr in learners])
        _save_scrape(endpoints["learner_metrics"], run_dir / "metrics_final.prom")
        ray.get([lr.close.remote() for lr in learners])
        summary.update(
            end_step=step, seconds=time.time() - start, last_train=last,
            sampler_versions_end=[s["version"] for s in sampler_status],
            groups_published=sum(s["published"] for s in sampler_status),
            learner_counters=learner_status[0]["counters"],
        )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return run_dir


def _save_scrape(url: str, path: Path) -> None:
    """The learner's /metrics at the end of the run, kept in the run folder."""
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        path.write_text(httpx.get(url, timeout=5.0).text)


def _host_ip(cfg: TrainConfig) -> str:
    if not cfg.ray.address:
        return "127.0.0.1"
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


def _stop_samplers(samplers, runs) -> None:
    import ray

    for s in samplers:
        with contextlib.suppress(Exception):
            s.stop.remote()
    with contextlib.suppress(Exception):
        ray.wait(runs, num_returns=len(runs), timeout=60)
