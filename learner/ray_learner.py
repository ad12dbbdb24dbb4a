"""A learner rank as a Ray actor: a thin shell over :class:`diffrl.learner.learner.Learner` that also runs the
held-out evaluation of p_samp on rank 0. Configs arrive as YAML text and are validated again here."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field

from diffrl.config import load_config_text
from diffrl.data import PromptSet
from diffrl.evaluation import EvalConfig
from diffrl.learner.config import LearnerConfig
from diffrl.models.config import ModelConfig
from diffrl.proto.bus import RetryPolicy
from diffrl.proto.weight_sync import WeightsConfig
from diffrl.reward_servers.client import RewardClientConfig
from diffrl.storage import StorageRetry, open_storage

log = logging.getLogger(__name__)


@dataclass
class LearnerSpec:
    """Everything one learner rank needs, sent as YAML."""

    rank: int = 0
    """This rank."""
    world_size: int = 1
    """Learner ranks in all."""
    master_addr: str = "127.0.0.1"
    """Address of rank 0 for the process group."""
    master_port: int = 29500
    """Port of rank 0 for the process group."""
    run_dir: str = ""
    """Run folder (checkpoints, grids) on this rank's node: with object storage, its working copy."""
    resume: bool = False
    """Continue from the run's latest checkpoint (in the storage when there is one)."""
    storage: str = ""
    """The run's object-storage URL (``storage/run.name``); empty: ``run_dir`` is the run folder."""
    storage_retry: StorageRetry = field(default_factory=StorageRetry)
    """Retries, timeouts and the longest checkpoint outage for the object storage."""
    log_process: str = ""
    """Send this process's output to ``run_dir/logs/<log_process>.log`` (empty: leave it where it goes)."""
    redis_url: str = ""
    """Redis of the experience stream."""
    stream: str = "experience"
    """Stream name."""
    consumer_group: str = "learner"
    """Consumer group of the learner ranks."""
    bus_retry: RetryPolicy = field(default_factory=RetryPolicy)
    """How the consumer rides out an unreachable Redis."""
    weights_channel: str = "diffrl-weights"
    """Ray weight channel p_samp is published to (rank 0)."""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    """How p_samp travels to the samplers (object store or torch.distributed)."""
    metrics_port: int = 0
    """Prometheus /metrics port (0: free port; -1: none)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Learner settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation settings."""
    eval_prompts: PromptSet = field(default_factory=PromptSet)
    """The held-out prompts (data.eval), evaluated on rank 0."""
    rewards: RewardClientConfig = field(default_factory=RewardClientConfig)
    """The run's reward servers, which score the held-out samples."""


def load_learner_model(learner: LearnerConfig, model: ModelConfig):
    """The model a learner trains, on ``learner.device`` in ``learner.dtype`` (auto: bfloat16 on CUDA,
    float32 on CPU); DeepSpeed's CPU accelerator is selected on CPU."""
    from diffrl.models.adapter import FlowModel
    from diffrl.utils import resolve_device

    device = resolve_device(learner.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dtype = learner.dtype if learner.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return FlowModel.from_pretrained(model.path, device=str(device), dtype=dtype,
                                     max_sequence_length=model.max_sequence_length, resolution=model.resolution)


def teacher_path(learner: LearnerConfig, model: ModelConfig) -> str:
    """``learner.teacher``, else the teacher the student's student.json records (a relative path is
    taken from the working directory, else from the student's folder)."""
    from pathlib import Path

    from diffrl.config import ConfigError
    from diffrl.models.distill import read_student

    if learner.teacher:
        return learner.teacher
    info = read_student(model.path) or {}
    found = info.get("teacher")
    if not found:
        raise ConfigError(f"learner.teacher: learner.algorithm={learner.algorithm} starts roles from a teacher, and "
                          f"model.path={model.path} has no student.json naming one; set learner.teacher")
    if not Path(found).is_absolute() and not Path(found).exists() and (Path(model.path) / found).exists():
        return str(Path(model.path) / found)
    return found


def load_teacher(learner: LearnerConfig, model: ModelConfig, device, dtype):
    """The teacher's denoiser (frozen, on ``device`` in ``dtype``) when the algorithm's roles start
    from it, else None."""
    algorithm = learner.algorithm_class(learner.algorithm_config, learner)
    if not algorithm.needs_teacher():
        return None
    import torch

    from diffrl.models.adapter import load_pipeline

    pipe = load_pipeline(teacher_path(learner, model), dtype=torch.float32, with_t5=False)
    net = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    return net.to(device, dtype).requires_grad_(False).eval()


class LearnerActor:
    def __init__(self, spec_yaml: str):
        self.spec = spec = load_config_text(LearnerSpec, spec_yaml)
        self._log_mirror = None
        storage = open_storage(spec.storage, spec.storage_retry)
        if spec.log_process:
            from diffrl.run_logs import start_process_log

            self._log_mirror = start_process_log(spec.run_dir, spec.log_process, storage)
        os.environ.update({"RANK": str(spec.rank), "WORLD_SIZE": str(spec.world_size),
                           "LOCAL_RANK": os.environ.get("LOCAL_RANK", "0"),
                           "MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port)})
        import torch

        from diffrl.embedded_redis import connect
        from diffrl.learner.learner import Learner

        if spec.learner.torch_threads:
            torch.set_num_threads(spec.learner.torch_threads)
        self.model = load_learner_model(spec.learner, spec.model)
        publisher = None
        if spec.rank == 0 and spec.weights_channel:
            from diffrl.proto.weight_sync import open_publisher

            publisher = open_publisher(spec.weights, spec.weights_channel, host=spec.master_addr,
                                       device=self.model.device)
        teacher = load_teacher(spec.learner, spec.model, self.model.device, self.model.dtype)
        self.learner = Learner(spec.learner, self.model, publisher=publisher, run_dir=spec.run_dir, teacher=teacher,
                               storage=storage)
        self.learner.connect_bus(connect(spec.redis_url), spec.stream, spec.consumer_group, retry=spec.bus_retry)
        self.resumed_step = None
        if spec.resume:
            restored = self.learner.restore_from_storage() if storage is not None else spec.run_dir
            self.resumed_step = self.learner.resume(restored) if restored is not None else None
            if storage is not None and restored is not None:
                shutil.rmtree(restored, ignore_errors=True)  # the engines are loaded: the download is done with
        self.storage = storage
        if self.resumed_step:
            self.learner.publish()  # samplers continue from the checkpoint's p_samp
        self._reward_client = None  # opened by the first evaluation
        self.metrics_port = self.metrics_host = None
        if spec.metrics_port >= 0:
            from prometheus_client import start_http_server

            from diffrl.monitoring import advertised_host, metrics_bind_host

            server, _ = start_http_server(spec.metrics_port, addr=metrics_bind_host())
            self.metrics_port = server.server_port
            self.metrics_host = advertised_host()

    def step(self, max_wait_s: float = 300.0) -> dict | None:
        """Poll until one optimizer step is taken (stats) or ``max_wait_s`` passes (None)."""
        deadline = time.monotonic() + max_wait_s
        while True:
            # past its deadline a rank asks every rank to give up this call at the same poll, so the ranks'
            # calls stay paired (a rank that just left would leave the others blocked in a collective)
            stats = self.learner.poll_and_step(stop=time.monotonic() >= deadline)
            if stats is not None:
                return {k: v for k, v in stats.items() if not k.startswith("_")}
            if self.learner.stop_agreed:
                return None

    def evaluate(self, grid_path: str | None = None) -> dict[str, float]:
        """Held-out rewards of the evaluated role (p_samp, what the samplers use, unless the algorithm names
        another: TDM-R1's EMA of G) with the fixed eval seeds, scored by the run's
        reward servers; also set as the ``diffrl_learner_eval_*`` gauges of this process's /metrics."""
        from diffrl.evaluation import evaluate
        from diffrl.monitoring import EvalMetrics
        from diffrl.reward_servers.client import SyncRewardClient

        if self._reward_client is None and self.spec.rewards.rewards:
            self._reward_client = SyncRewardClient(self.spec.rewards)
        names = [r.name for r in self.spec.rewards.rewards]
        metrics = evaluate(self.model, self.spec.eval, self.spec.eval_prompts, self._reward_client, names,
                           transformer=self.learner.p_eval, grid_path=grid_path)
        if self.storage is not None and grid_path and os.path.isfile(grid_path):
            from diffrl import run_folder
            from diffrl.storage import StorageError

            try:  # the grid is a picture of the run, not a commit: a failed upload is only logged
                self.storage.put_file(grid_path, f"{run_folder.GRIDS}/{os.path.basename(grid_path)}")
            except StorageError as err:
                log.warning("grid upload failed: %s", err)
        EvalMetrics.for_registry().observe(metrics, step=self.learner.step)
        return metrics

    def finish(self) -> int:
        """Checkpoint what is not yet covered (acknowledging its entries); returns the step."""
        self.learner.finish()
        return self.learner.step

    def close(self) -> None:
        if self._reward_client is not None:
            self._reward_client.close()
        self.learner.close()
        if self._log_mirror is not None:
            self._log_mirror.close()

    def status(self) -> dict:
        lr = self.learner
        return {"rank": self.spec.rank, "step": lr.step, "counters": dict(lr.counters),
                "pending_ack": len(lr.pending_entry_ids), "buffered": lr.buffered,
                "metrics_host": self.metrics_host, "metrics_port": self.metrics_port,
                "resumed_step": self.resumed_step, "pid": os.getpid(),
                "bus_retries": getattr(lr.consumer, "retries_total", 0)}
