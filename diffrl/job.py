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
diffrl/monitoring.py), summary.json, ledger.json (the experience ledger: groups produced, each fate,
pending; balanced at every checkpoint and at the end, see proto/bus.py and docs/reliability.md),
trained_groups.txt (every committed trained group id, once). Passwords in redis.url are written as ***.

Faults: a sampler actor that dies is restarted by Ray (sampler.max_restarts) and its loop started
again by the driver (a new incarnation id keeps group ids unique); Redis restarts are ridden out by
the bus's retries (redis.retry); reward replicas by the reward client; a learner that dies ends the
run with an error, and ``--resume RUN_DIR`` continues from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from diffrl import run_folder
from diffrl.actors.ray_sampler import SamplerSpec, spawn_samplers
from diffrl.actors.sampler import MaskedRoundsError
from diffrl.config import ConfigError, to_dict, to_yaml
from diffrl.embedded_redis import EmbeddedRedis, redact_url
from diffrl.learner.checkpoint import CheckpointOutageError
from diffrl.learner.config import LearnerConfig
from diffrl.learner.ray_learner import LearnerActor, LearnerSpec
from diffrl.monitoring import METRICS_HOST_ENV, remove_prometheus_sd, write_prometheus_targets
from diffrl.placement import in_bundle, learner_rendezvous, place_learners
from diffrl.reward_servers.client import RewardClientConfig, RewardEndpointConfig
from diffrl.reward_servers.process import LocalRewardServer
from diffrl.schema import TrainConfig
from diffrl.storage import RunStorage, StorageError, is_url, open_storage, run_location
from diffrl.tracking import Tracker, check_backends

log = logging.getLogger(__name__)

STEP_WAIT_S = 10.0
"""How long one learner step call waits for experience before the driver looks at the samplers again
(and calls again)."""
SUPERVISE_S = 2.0
"""How often the driver checks the sampler loops while a step is in flight."""


class NoProgressError(RuntimeError):
    """The job cannot make progress (e.g. every sampler gave up after all-masked rounds); the message
    says why."""

# Environment every Ray worker of the job gets from the driver where set (CPU DeepSpeed, the user's hub
# settings: offline only when HF_HUB_OFFLINE is set, no tokenizer threads).
WORKER_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HOME",
              "TOKENIZERS_PARALLELISM", "REDIS_URL", "DIFFRL_REWARD_TOKEN", METRICS_HOST_ENV,
              # object storage (run.storage): credentials and endpoints as boto/gcsfs read them
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
              "AWS_ENDPOINT_URL", "DIFFRL_S3_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS")


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, RunStorage | None]:
    """(the run folder on this machine, the run's object storage or None). A new run gets a fresh
    name (``-2``, ``-3``… when taken locally or in the storage); a resumed run from object storage gets
    its files that are not here yet (everything but the checkpoints, which the learner downloads).
    Storage that cannot be written fails here, before Redis, Ray or any model starts."""
    retry = cfg.run.storage_retry
    if cfg.run.resume:
        if is_url(cfg.run.resume):
            storage = open_storage(cfg.run.resume.rstrip("/"), retry)
            storage.check()
            if storage.latest_checkpoint() is None:
                raise FileNotFoundError(f"--resume {cfg.run.resume}: no complete checkpoint there")
            run_dir = Path(cfg.run.output_dir).expanduser().resolve() / storage.root.rsplit("/", 1)[-1]
            run_dir.mkdir(parents=True, exist_ok=True)
            here = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
            for rel in storage.list_files():
                if rel not in here and not rel.startswith((run_folder.CHECKPOINTS + "/", "redis/")):
                    storage.get_file(rel, run_dir / rel)
            return run_dir, storage
        run_dir = Path(cfg.run.resume).resolve()
        if is_url(cfg.run.storage):  # the working copy of a run in object storage: resume from the storage
            url = cfg.run.storage.rstrip("/") + "/" + run_dir.name
            return prepare_run_dir(replace(cfg, run=replace(cfg.run, resume=url, output_dir=str(run_dir.parent))))
        if not (run_dir / run_folder.CHECKPOINTS).is_dir():
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoints/ folder there")
        return run_dir, None
    n = 1
    while True:
        name = cfg.run.name if n == 1 else f"{cfg.run.name}-{n}"
        run_dir, url = run_location(cfg.run.storage, cfg.run.output_dir, name)
        storage = open_storage(url, retry)
        if storage is not None and n == 1:
            storage.check()
        if not run_dir.exists() and (storage is None or not storage.list_files()):
            break
        n += 1
    run_dir.mkdir(parents=True)
    return run_dir, storage


DRIVER_FILES = (run_folder.CONFIG, run_folder.CONFIG_RESUMED, run_folder.METRICS, run_folder.EVAL,
                run_folder.LEDGER, run_folder.SUMMARY, run_folder.ENDPOINTS, "metrics_final.prom", "mlflow.db",
                "wandb_run_id.txt", "mlflow_run_id.txt")
"""The files of the run folder the job driver writes (uploaded to object storage by :func:`sync_driver_files`)."""
TRACKER_FOLDERS = ("tensorboard", "wandb", "mlruns")
"""Folders of the run folder the experiment trackers write (``tracking.backends``), uploaded with them."""


def sync_driver_files(run_dir: Path, storage: RunStorage | None) -> None:
    """Upload the driver's files and the logs it holds (reward servers, driver) to the run's object
    storage; a failure is logged (the next sync tries again), the checkpoints are what must land."""
    if storage is None:
        return
    paths = [run_dir / f for f in DRIVER_FILES] + sorted((run_dir / run_folder.LOGS).glob("reward-*.log"))
    paths.append(run_dir / run_folder.LOGS / "driver.log")
    for folder in TRACKER_FOLDERS:  # the experiment trackers' files (event files, offline runs)
        paths += sorted(p for p in (run_dir / folder).rglob("*") if p.is_file())
    for path in paths:
        if path.is_file():
            try:
                storage.put_file(path, path.relative_to(run_dir).as_posix())
            except StorageError as err:
                log.warning("upload of %s failed: %s", path.name, err)


class JsonLines:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 -- held for the run, closed by close()

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
                server = LocalRewardServer(spec.name, spec.serve_args, scorer=spec.scorer,
                                           log_path=run_dir / run_folder.LOGS / f"reward-{spec.name}-{i}.log").start()
                stack.callback(server.stop)
                urls.append(server.wait_ready().url)
        endpoints.append(RewardEndpointConfig(name=spec.name, urls=urls, weight=spec.weight,
                                              timeout_s=spec.timeout_s, retries=spec.retries))
    return RewardClientConfig(rewards=endpoints)


def _init_ray(cfg: TrainConfig, stack: contextlib.ExitStack) -> None:
    import ray

    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Under `ray job submit` the job's runtime env (deploy/ray/runtime_env.yaml) already reaches every
    # worker; Ray refuses a ray.init runtime env that sets the same variables again.
    job_cfg = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    job_env = (job_cfg.get("runtime_env") or {}).get("env_vars") or {}
    env = {k: v for k, v in env.items() if k not in job_env}
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
                 _temp_dir=cfg.ray.temp_dir, runtime_env=runtime_env, log_to_driver=False,
                 _system_config={"task_events_max_num_task_in_gcs": cfg.ray.max_task_events})
    stack.callback(ray.shutdown)


def trained_learner_config(cfg: TrainConfig) -> LearnerConfig:
    """The learner section as the job trains it: reward weights default to every reward's ``weight``,
    ``max_steps`` to ``run.max_steps``."""
    reward_weights = cfg.learner.reward_weights or {r.name: r.weight for r in cfg.rewards}
    return replace(cfg.learner, reward_weights=reward_weights, max_steps=cfg.learner.max_steps or cfg.run.max_steps)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) one training job; returns its run folder."""
    import ray

    from diffrl.models.adapter import check_model_source

    check_model_source(cfg.model.path)  # an unreachable hub id fails here, in one line, before Ray and Redis
    train_prompts, eval_prompts = cfg.data.load()  # a bad prompt file fails here, before anything starts
    check_backends(cfg.tracking)  # so does a tracker whose package is not installed
    if Path(cfg.model.path).exists():  # a local folder: absolute, so every actor finds it whatever its cwd
        cfg = replace(cfg, model=replace(cfg.model, path=str(Path(cfg.model.path).resolve())))
    run_dir, storage = prepare_run_dir(cfg)
    resuming = bool(cfg.run.resume)
    driver_log = _log_driver(run_dir)
    if cfg.ray.address and not cfg.run.storage and not storage:
        log.warning("run.storage is not set: on a multi-node cluster the learner's checkpoints and grids stay "
                    "on the learner's node; set run.storage to a shared path or an s3://, gs:// URL")
    cfg = replace(cfg, learner=trained_learner_config(cfg))
    shown = replace(cfg, redis=replace(cfg.redis, url=redact_url(cfg.redis.url)))  # no password in the run folder
    (run_dir / run_folder.CONFIG if not resuming else run_dir / run_folder.CONFIG_RESUMED).write_text(to_yaml(shown))
    sync_driver_files(run_dir, storage)
    (run_dir / run_folder.GRIDS).mkdir(exist_ok=True)
    metrics_log = JsonLines(run_dir / run_folder.METRICS)
    eval_log = JsonLines(run_dir / run_folder.EVAL)
    summary: dict = {"run_dir": str(run_dir), "resumed": resuming}
    start = time.time()

    try:
        with contextlib.ExitStack() as stack:
            stack.callback(driver_log.close)
            stack.callback(logging.getLogger("diffrl").removeHandler, driver_log)
            stack.callback(metrics_log.close)
            stack.callback(eval_log.close)
            tracker = Tracker.open(cfg.tracking, run_dir, run_dir.name, to_dict(shown), resumed=resuming)
            stack.callback(tracker.close)
            summary["tracking_errors"] = tracker.errors  # counted until the end (the same dict)
            redis_url = cfg.redis.url or os.environ.get("REDIS_URL", "")
            if ":***@" in redis_url:  # a resumed run's config.yaml: the password was not written there
                redis_url = os.environ.get("REDIS_URL", "")
                if not redis_url:
                    raise ConfigError("redis.url", "the password of this URL was redacted in the run folder; "
                                      "give the URL in $REDIS_URL or as redis.url=...")
            if not redis_url:
                redis = stack.enter_context(EmbeddedRedis(data_dir=run_dir / "redis", port=0))
                redis_url = redis.tcp_url
            rewards = _start_rewards(cfg, run_dir, stack)
            _init_ray(cfg, stack)

            channel = f"diffrl-weights-{run_dir.name}"
            world = cfg.learner.world_size
            placement = place_learners(cfg)
            stack.callback(ray.util.remove_placement_group, placement)
            master_addr, master_port, _ = learner_rendezvous(placement)
            if not cfg.ray.address:
                master_addr = "127.0.0.1"  # a local Ray is one node: stay on the loopback
            learner_cls = ray.remote(LearnerActor)
            learners = []
            for rank in range(world):
                spec = LearnerSpec(rank=rank, world_size=world, master_addr=master_addr, master_port=master_port,
                                   run_dir=str(run_dir), resume=resuming, redis_url=redis_url,
                                   storage=storage.root if storage else "", storage_retry=cfg.run.storage_retry,
                                   log_process=f"learner-{rank}",
                                   stream=cfg.redis.stream, consumer_group=cfg.redis.consumer_group,
                                   bus_retry=cfg.redis.retry,
                                   weights_channel=channel, weights=cfg.weights,
                                   metrics_port=cfg.placement.metrics_port if rank == 0 else -1,
                                   model=cfg.model, learner=cfg.learner, eval=cfg.eval, eval_prompts=eval_prompts,
                                   rewards=rewards)
                learners.append(learner_cls.options(name=f"learner-{rank}", num_cpus=cfg.placement.num_cpus,
                                                    num_gpus=cfg.placement.num_gpus, max_concurrency=1,
                                                    scheduling_strategy=in_bundle(placement, rank)).remote(to_yaml(spec)))
            statuses = ray.get([lr.status.remote() for lr in learners])
            step = int(statuses[0]["step"])
            specs = [SamplerSpec(sampler_id=f"sampler-{i}", shard_index=i, num_shards=cfg.sampler.num_samplers,
                                 redis_url=redis_url, stream=cfg.redis.stream, consumer_group=cfg.redis.consumer_group,
                                 bus_retry=cfg.redis.retry, weights_channel=channel, weights=cfg.weights,
                                 model=cfg.model,
                                 sampler=replace(cfg.sampler, seed=cfg.sampler.seed + 1000 * cfg.run.seed),
                                 rewards=rewards, lora=cfg.learner.lora, run_dir=str(run_dir),
                                 storage=storage.root if storage else "", log_process=f"sampler-{i}")
                     for i in range(cfg.sampler.num_samplers)]
            prompts_ref = ray.put(train_prompts.items)  # one copy for every sampler, held until the run ends
            samplers = spawn_samplers(specs, cfg.sampler, prompts_ref)
            sampler_runs = [s.run.remote() for s in samplers]
            stack.callback(_stop_samplers, samplers, sampler_runs)
            sampler_status = ray.get([s.status.remote() for s in samplers])
            lr0 = statuses[0]
            endpoints = {"learner_metrics": f"http://{lr0['metrics_host']}:{lr0['metrics_port']}/metrics",
                         "redis": redact_url(redis_url), "rewards": {e.name: e.urls for e in rewards.rewards},
                         "sampler_metrics": [f"http://{s['metrics_host']}:{s['metrics_port']}/metrics"
                                             for s in sampler_status]}
            (run_dir / run_folder.ENDPOINTS).write_text(json.dumps(endpoints, indent=2))
            sd_file = write_prometheus_targets(run_dir, Path(cfg.run.output_dir), endpoints)
            stack.callback(remove_prometheus_sd, sd_file)
            summary["start_step"] = step
            ledger = _Ledger(run_dir, redis_url, cfg)
            supervisor = _SamplerSupervisor(samplers, sampler_runs, limit=cfg.sampler.max_restarts + 3)
            summary["sampler_versions_start"] = [s["version"] for s in sampler_status]

            def evaluate(at_step: int) -> dict:
                grid = run_folder.grid_path(run_dir, at_step)
                m = ray.get(learners[0].evaluate.remote(str(grid)))
                eval_log.write({"step": at_step, **m})
                metrics_log.write({"step": at_step, "kind": "eval", **m})
                tracker.log_eval(at_step, m, grid)
                return m

            if cfg.run.eval_every and not resuming:
                summary["eval_start"] = evaluate(step)
            train_start = time.time()
            bar = tqdm(total=cfg.learner.max_steps, initial=step, desc="train", unit="step", disable=not cfg.run.progress)
            last: dict = {}
            try:
                while step < cfg.learner.max_steps:
                    if cfg.run.max_seconds and time.time() - train_start > cfg.run.max_seconds:
                        break
                    refs = [lr.step.remote(STEP_WAIT_S) for lr in learners]
                    while ray.wait(refs, num_returns=len(refs), timeout=SUPERVISE_S)[1]:
                        supervisor.check()  # raises NoProgressError when every sampler gave up
                    results = ray.get(refs)
                    supervisor.check()
                    if results[0] is None:
                        continue
                    step += 1
                    if cfg.learner.checkpoint_every and step % cfg.learner.checkpoint_every == 0:
                        ledger.write()
                        sync_driver_files(run_dir, storage)
                    last = results[0]
                    metrics_log.write({"step": step, "kind": "train", "time": time.time() - start, **last})
                    tracker.log_train(step, last)
                    bar.update(1)
                    bar.set_postfix(reward=f"{last.get('reward_mean', float('nan')):.3f}",
                                    kl=f"{last.get('kl', float('nan')):.4f}", stale=f"{last.get('staleness_mean', 0):.1f}")
                    if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.learner.max_steps:
                        evaluate(step)
            finally:
                bar.close()
                train_seconds = time.time() - train_start
                _stop_samplers(samplers, sampler_runs)
                step = max(ray.get([lr.finish.remote() for lr in learners]))
            if cfg.run.eval_every:
                summary["eval_end"] = evaluate(step)
            sampler_status = _sampler_statuses(samplers)
            learner_status = ray.get([lr.status.remote() for lr in learners])
            summary["ledger"] = ledger.write(
                learner_counters=learner_status[0]["counters"], sampler_runs_restarted=supervisor.restarts,
                bus_retries={"learner": sum(s.get("bus_retries", 0) for s in learner_status),
                             "samplers": sum(s.get("bus_retries", 0) for s in sampler_status)},
                sampler_masked_backoffs=sum(s.get("masked_backoffs", 0) for s in sampler_status))
            _save_scrape(endpoints["learner_metrics"], run_dir / "metrics_final.prom")
            ray.get([lr.close.remote() for lr in learners])
            summary.update(
                end_step=step, seconds=time.time() - start, last_train=last,
                sampler_versions_end=[s["version"] for s in sampler_status],
                groups_published=sum(s["published"] for s in sampler_status),
                sampler_busy_seconds=[s["busy_seconds"] for s in sampler_status],
                sampler_paused_seconds=[s["paused_seconds"] for s in sampler_status],
                train_seconds=train_seconds,
                learner_counters=learner_status[0]["counters"],
            )
    except (NoProgressError, CheckpointOutageError) as err:
        summary.update(error=str(err), seconds=time.time() - start)
        (run_dir / run_folder.SUMMARY).write_text(json.dumps(summary, indent=2, default=float))
        sync_driver_files(run_dir, storage)
        raise
    (run_dir / run_folder.SUMMARY).write_text(json.dumps(summary, indent=2, default=float))
    sync_driver_files(run_dir, storage)
    return run_dir


def _log_driver(run_dir: Path) -> logging.Handler:
    """The driver's ``diffrl.*`` log records also go to ``RUN/logs/driver.log``."""
    from diffrl.run_logs import LOG_FORMAT

    (run_dir / run_folder.LOGS).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / run_folder.LOGS / "driver.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("diffrl")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


class _Ledger:
    """RUN_DIR/ledger.json: the experience stream's ledger (diffrl.proto.bus.ledger_snapshot, read atomically
    from Redis, so it balances at any instant and across restarts of any process) plus the learner's
    own counters and the trained-group ids recorded in RUN_DIR/trained_groups.txt."""

    def __init__(self, run_dir: Path, redis_url: str, cfg: TrainConfig):
        from diffrl.embedded_redis import connect

        self.path = run_dir / run_folder.LEDGER
        self.trained_file = run_dir / run_folder.TRAINED_GROUPS
        self.redis = connect(redis_url)
        self.stream, self.group = cfg.redis.stream, cfg.redis.consumer_group
        self.retry = cfg.redis.retry

    def write(self, **extra) -> dict:
        from diffrl.learner.checkpoint import write_json_atomic
        from diffrl.proto.bus import ExperienceProducer

        try:
            snap = ExperienceProducer(self.redis, self.stream, consumer_group=self.group, retry=self.retry).ledger()
        except Exception as err:  # noqa: BLE001 - the ledger must not end a run
            log.warning("ledger snapshot failed: %s", err)
            return {}
        ids = []
        if self.trained_file.is_file():
            ids = [ln.split("\t", 1)[0] for ln in self.trained_file.read_text().splitlines() if ln.strip()]
        record = {**snap, "time": time.time(),
                  "trained_groups_file": {"lines": len(ids), "unique": len(set(ids))}, **extra}
        write_json_atomic(self.path, record)
        return record


def _sampler_statuses(samplers) -> list[dict]:
    """Each sampler's status; a sampler that is restarting (or gone) reports zeros instead of failing the run."""
    import collections

    import ray

    out = []
    for s in samplers:
        try:
            out.append(ray.get(s.status.remote(), timeout=120))
        except Exception as err:  # noqa: BLE001 - ActorUnavailableError, RayActorError, GetTimeoutError
            log.warning("sampler status unavailable: %s", type(err).__name__)
            out.append(collections.defaultdict(int, metrics_host="127.0.0.1"))
    return out


class _SamplerSupervisor:
    """Starts a sampler's loop again when its ``run`` ended with an error: its actor died and Ray is
    restarting it (sampler.max_restarts; meanwhile calls fail with ActorUnavailableError and are
    submitted again, without limit), or its loop raised (at most ``limit`` times per sampler; negative:
    no limit). The restarted actor has a new incarnation id, so its group ids stay unique. Counted
    per sampler in ``restarts`` (one per death or failure). A loop that ended with
    :class:`MaskedRoundsError` (every group masked for ``sampler.max_masked_rounds`` rounds) is not
    started again; once every sampler has given up, :meth:`check` raises :class:`NoProgressError`."""

    SETTLED_S = 30.0  # a loop running this long after a restart counts as recovered

    def __init__(self, samplers, runs: list, limit: int):
        self.samplers, self.runs, self.limit = samplers, runs, limit
        self.restarts = [0] * len(samplers)
        self._failures = [0] * len(samplers)
        self._restarting = [False] * len(samplers)
        self._submitted = [time.monotonic()] * len(samplers)
        self.gave_up: dict[int, str] = {}

    def _submit(self, i: int) -> None:
        self.runs[i] = self.samplers[i].run.remote()
        self._submitted[i] = time.monotonic()

    def check(self) -> None:
        import ray

        done, _ = ray.wait(list(self.runs), num_returns=len(self.runs), timeout=0)
        now = time.monotonic()
        for ref in done:
            i = next(k for k, r in enumerate(self.runs) if r == ref)
            if i in self.gave_up:
                continue
            try:
                ray.get(ref)
                continue  # returned: it was stopped
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, MaskedRoundsError):
                    self._give_up(i, str(err.cause))
                    continue
                self._retry_failed(i, err)
                continue
            except ray.exceptions.ActorUnavailableError:
                if not self._restarting[i]:
                    log.warning("sampler-%d is restarting; its loop will start again", i)
                    self.restarts[i] += 1
                    self._restarting[i] = True
                self._submit(i)
                continue
            except Exception as err:  # noqa: BLE001 - RayActorError, ...
                self._retry_failed(i, err)
        if len(self.gave_up) == len(self.samplers):
            raise NoProgressError("no sampler can produce trainable groups: " + next(iter(self.gave_up.values()))
                                  + ". Check that the rewards accept the prompts (data.train) and are up; "
                                  "sampler.max_masked_rounds sets how long samplers try")
        for i, ref in enumerate(self.runs):
            if self._restarting[i] and ref not in done and now - self._submitted[i] > self.SETTLED_S:
                self._restarting[i] = False

    def _give_up(self, i: int, reason: str) -> None:
        if i not in self.gave_up:
            log.error("%s", reason)
            self.gave_up[i] = reason

    def _retry_failed(self, i: int, err: Exception) -> None:
        if 0 <= self.limit <= self._failures[i]:
            return
        log.warning("sampler-%d stopped (%s); starting its loop again", i, type(err).__name__)
        self._failures[i] += 1
        self.restarts[i] += 1
        self._submit(i)


def _save_scrape(url: str, path: Path) -> None:
    """The learner's /metrics at the end of the run, kept in the run folder."""
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        path.write_text(httpx.get(url, timeout=5.0).text)


def _stop_samplers(samplers, runs) -> None:
    import ray

    for s in samplers:
        with contextlib.suppress(Exception):
            s.stop.remote()
    with contextlib.suppress(Exception):
        ray.wait(runs, num_returns=len(runs), timeout=60)
