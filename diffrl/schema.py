"""The training recipe: every component's config composed into one typed tree (``diffrl train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffrl import run_folder
from diffrl.actors.config import SamplerConfig
from diffrl.config import ConfigError, require
from diffrl.data import DataConfig
from diffrl.embedded_redis import redact_url as _redact_url
from diffrl.evaluation import EvalConfig
from diffrl.learner.config import LearnerConfig
from diffrl.models.config import ModelConfig
from diffrl.proto.bus import RetryPolicy
from diffrl.proto.weight_sync import WeightsConfig
from diffrl.storage import StorageRetry, is_url

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
TRACKING_BACKENDS = ("tensorboard", "wandb", "mlflow", "none")


@dataclass
class RunConfig:
    name: str = "shapes-crd"
    """Run name; the run folder is output_dir/name (a suffix is added if it exists, unless resuming)."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    resume: str = ""
    """Run folder to continue from its latest checkpoint (same as --resume): a local path, or the
    run's URL in object storage (``s3://bucket/runs/NAME``)."""
    storage: str = ""
    """Where the run folder lives. Empty: ``output_dir/name`` on this machine. A path: a volume
    mounted at the same path on every node (the run folder is ``storage/name``). An fsspec URL
    (``s3://bucket/runs``, ``gs://…``): every process stages what it writes under ``output_dir/name``
    on its node and uploads it to ``storage/name``; checkpoints are committed there atomically and
    ``--resume`` reads them back (docs/operations.md, "Run storage")."""
    storage_retry: StorageRetry = field(default_factory=StorageRetry)
    """Retries and timeouts of object-storage operations, and the longest time the run may go
    without a saved checkpoint before it fails."""
    max_steps: int = 20
    """Learner optimizer steps to train (the run ends there)."""
    max_seconds: float = 0.0
    """Wall-clock limit of the training loop in seconds (0 = none)."""
    eval_every: int = 10
    """Held-out evaluation (metrics + image grid) every N learner steps, plus before and after (0 = never)."""
    progress: bool = True
    """Show a progress bar with step, reward and KL."""
    seed: int = 0
    """Seed of the run (sampler seeds, learner noise)."""

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", "a non-empty name without '/'", self.name)
        require(self.max_steps >= 1, "max_steps", "an int >= 1", self.max_steps)
        require(self.max_seconds >= 0, "max_seconds", "seconds >= 0", self.max_seconds)
        require(self.eval_every >= 0, "eval_every", "an int >= 0", self.eval_every)
        require(not self.resume or is_url(self.resume) or Path(self.resume, run_folder.CHECKPOINTS).is_dir(),
                "resume", "a run folder with a checkpoints/ folder", self.resume)
        if self.storage and is_url(self.storage):
            import fsspec

            scheme = self.storage.split("://", 1)[0]
            try:
                fsspec.get_filesystem_class(scheme)
            except (ImportError, ValueError) as err:
                raise ConfigError("storage", f"no fsspec filesystem for {scheme}:// ({err}); install its package "
                                  "(s3fs for s3://, gcsfs for gs://)") from err


@dataclass
class RewardSpec:
    """One reward of the run: existing replicas (urls) or servers the job starts locally."""

    name: str = "shapes"
    """Reward name, the key of its values in groups; with scorer empty, the built-in scorer local servers
    run (shapes, ocr, compressibility, detector, onnx)."""
    scorer: str = ""
    """The scorer local servers run: a built-in scorer name or pkg.module:Class (a Scorer subclass, its
    module importable, e.g. on PYTHONPATH; docs/custom_rewards.md); empty = name."""
    urls: list[str] = field(default_factory=list)
    """Replica base URLs of a running reward service; empty = start local_replicas servers here."""
    local_replicas: int = 1
    """Local server processes to start when urls is empty."""
    serve_args: list[str] = field(default_factory=list)
    """Extra arguments of `diffrl reward serve NAME` for local servers (e.g. scorer.metric=partial)."""
    weight: float = 1.0
    """Weight in the combined reward the learner trains on."""
    timeout_s: float = 30.0
    """Timeout of one scoring attempt, seconds."""
    retries: int = 3
    """Retries after the first attempt (timeouts, connection errors, 408/429/5xx)."""

    def validate(self) -> None:
        require(bool(self.name), "name", "a reward name")
        from diffrl.reward_servers.scorers import scorer_target_problem

        problem = scorer_target_problem(self.scorer) if self.scorer else None
        require(problem is None, "scorer", problem or "", self.scorer)
        require(bool(self.urls) or self.local_replicas >= 1, "local_replicas", "an int >= 1 when urls is empty")
        for u in self.urls:
            require(isinstance(u, str) and u.startswith(("http://", "https://")), "urls", "http(s):// URLs", u)
        require(self.timeout_s > 0, "timeout_s", "seconds > 0", self.timeout_s)
        require(self.retries >= 0, "retries", "an int >= 0", self.retries)


@dataclass
class RedisConfig:
    url: str = ""
    """Redis URL (redis://, rediss:// with TLS, unix://); empty = $REDIS_URL, else an embedded
    redis-server for the run's lifetime. Prefer $REDIS_URL for a URL with a password: recipes are
    shared (the password is written to the run folder as ***)."""
    stream: str = "experience"
    """Stream of the experience groups."""
    consumer_group: str = "learner"
    """Consumer group of the learner ranks."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """How samplers and learner ride out an unreachable Redis (restart, failover): retries with
    backoff, counted in diffrl_bus_retries_total."""

    def validate(self) -> None:
        require(not self.url or self.url.split("://", 1)[0] in ("redis", "rediss", "unix"), "url",
                "a redis://, rediss:// or unix:// URL", _redact_url(self.url))


@dataclass
class RayConfig:
    address: str = ""
    """Address of a running Ray cluster ('auto' inside `ray job submit`); empty = start a local Ray."""
    num_cpus: int = 0
    """CPUs of a local Ray (0 = all cores)."""
    temp_dir: str = "/tmp/diffrl-ray"
    """Temp/session folder of a local Ray."""
    namespace: str = "diffrl"
    """Ray namespace of the job's named actors."""
    max_task_events: int = 10_000
    """Task events (what `ray list tasks` shows) the GCS of a local Ray keeps; older ones are dropped.
    Ray's own default, 100,000, lets gcs_server grow by ~3.7 KiB per actor call for hours
    (docs/benchmarks.md, "Soak"). A cluster started with `ray start` takes it from
    RAY_task_events_max_num_task_in_gcs instead."""

    def validate(self) -> None:
        require(self.max_task_events >= 1, "max_task_events", "an int >= 1", self.max_task_events)


@dataclass
class LearnerPlacement:
    num_cpus: float = 1.0
    """CPUs Ray reserves for each learner rank."""
    num_gpus: float = 0.0
    """GPUs Ray reserves for each learner rank (1 per rank on GPU clusters)."""
    metrics_port: int = 0
    """Port of the learner's Prometheus /metrics (0: a free port; -1: none)."""
    strategy: str = "PACK"
    """Ray placement-group strategy of the ranks' bundles (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD).
    Rank r runs in bundle r; the process group meets at an address and port of rank 0's node."""
    ready_timeout_s: float = 600.0
    """How long to wait for the cluster to fit the ranks' bundles before the job fails."""

    def validate(self) -> None:
        require(self.num_cpus >= 0, "num_cpus", "CPUs >= 0", self.num_cpus)
        require(self.num_gpus >= 0, "num_gpus", "GPUs >= 0", self.num_gpus)
        require(self.num_cpus > 0 or self.num_gpus > 0, "num_cpus",
                "> 0 when num_gpus is 0 (a Ray bundle needs a resource)", self.num_cpus)
        require(self.strategy in PLACEMENT_STRATEGIES, "strategy", f"one of {PLACEMENT_STRATEGIES}", self.strategy)
        require(self.ready_timeout_s > 0, "ready_timeout_s", "seconds > 0", self.ready_timeout_s)


@dataclass
class TrackingConfig:
    """Experiment trackers (TensorBoard, W&B, MLflow) the job logs to (diffrl/tracking.py)."""

    backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers the job logs train stats, held-out metrics and evaluation grids to: tensorboard (event
    files in RUN_DIR/tensorboard/), wandb (pip install 'diffrl[wandb]'), mlflow (pip install
    'diffrl[mlflow]'), several of them, or [none]."""
    project: str = "diffrl"
    """W&B project and MLflow experiment name."""
    tags: list[str] = field(default_factory=list)
    """Tags of the run (W&B tags; MLflow tags with an empty value)."""
    wandb_mode: str = ""
    """W&B mode: online, offline (files under RUN_DIR/wandb/, uploaded later by `wandb sync`) or
    disabled; empty = $WANDB_MODE, else online, as the wandb package itself decides. A machine without
    network needs offline."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking URI (a server, or sqlite:///PATH); empty = $MLFLOW_TRACKING_URI, else a SQLite
    store in the run folder (RUN_DIR/mlflow.db, artifacts in RUN_DIR/mlruns/)."""

    def validate(self) -> None:
        unknown = [b for b in self.backends if b not in TRACKING_BACKENDS]
        require(not unknown, "backends", f"names among {list(TRACKING_BACKENDS)}", unknown)
        require(len(set(self.backends)) == len(self.backends), "backends", "each backend once", self.backends)
        require("none" not in self.backends or self.backends == ["none"], "backends",
                "[none] alone (no tracker), or trackers without none", self.backends)
        require(self.wandb_mode in ("", "online", "offline", "disabled"), "wandb_mode",
                "online, offline, disabled or empty ($WANDB_MODE)", self.wandb_mode)
        require(bool(self.project) and "/" not in self.project, "project", "a non-empty name without '/'",
                self.project)

    @property
    def active(self) -> list[str]:
        """The backends to open (``none`` left out)."""
        return [b for b in self.backends if b != "none"]


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """The run: length, evaluation, resume."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model (p_φ, and the start of θ, p_old and p_samp)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training prompts and the held-out prompts."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampler actors."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    """The rewards (combined by weight)."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The DeepSpeed learner and its algorithm (CRD by default)."""
    placement: LearnerPlacement = field(default_factory=LearnerPlacement)
    """Where Ray puts the learner ranks."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(seeds_per_prompt=2, grid_prompts=8))
    """Held-out evaluation during training."""
    redis: RedisConfig = field(default_factory=RedisConfig)
    """The experience bus."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The Ray cluster."""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    """How p_samp travels from learner rank 0 to the samplers: Ray object store or torch.distributed
    (docs/operations.md, "Weight sync")."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment trackers: TensorBoard (default), W&B, MLflow (docs/operations.md, "Experiment tracking")."""

    def validate(self) -> None:
        names = [r.name for r in self.rewards]
        require(len(names) > 0, "rewards", "at least one reward")
        require(len(set(names)) == len(names), "rewards", "distinct reward names", names)
        if self.learner.reward_weights:
            unknown = set(self.learner.reward_weights) - set(names)
            require(not unknown, "learner.reward_weights", f"names among the rewards {names}", sorted(unknown))
        # what the algorithm trains on must come from the samplers (e.g. GRPO's recorded log-probs)
        self.learner.algorithm_class.check_recipe(self.learner.algorithm_config, self.sampler)


@dataclass
class EvalCommandConfig:
    """What ``diffrl eval`` reads. Rewards are given as in a training recipe (local servers are started
    for rewards without urls)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to evaluate (``--model`` also takes a run folder or a checkpoint folder)."""
    prompts: str = "shapes:eval"
    """The prompt set: a built-in set (shapes:eval, shapes:train, shapes:all) or a .txt/.jsonl file."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    """The rewards that score the samples (empty: none; a built-in world still gets its own metrics)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """How to sample."""
    output_dir: str = "runs/eval"
    """Where the image grid and metrics.json are written (reward-server logs in its logs/)."""

    def validate(self) -> None:
        names = [r.name for r in self.rewards]
        require(len(set(names)) == len(names), "rewards", "distinct reward names", names)
