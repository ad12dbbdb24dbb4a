"""The sampler as a Ray actor: a thin shell that builds a :class:`diffrl.actors.sampler.Sampler` inside the
actor process. Configs cross the process boundary as YAML text and are re-validated on arrival; the
training prompts (``diffrl.data.PromptItem``, loaded and checked once by the driver) are one object in
Ray's object store that every sampler reads, so a large prompt file is neither re-read on every node
nor copied into each spec."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

from diffrl.actors.config import SamplerConfig
from diffrl.config import load_config_text
from diffrl.data import PromptItem
from diffrl.models.config import ModelConfig
from diffrl.models.lora import LoraConfig
from diffrl.proto.bus import RetryPolicy
from diffrl.proto.weight_sync import WeightsConfig
from diffrl.reward_servers.client import RewardClientConfig

log = logging.getLogger(__name__)


@dataclass
class SamplerSpec:
    """Everything one sampler actor needs, sent as YAML."""

    sampler_id: str = "sampler-0"
    """Unique id of this sampler (labels, group ids)."""
    shard_index: int = 0
    """Which shard of the prompt list this sampler walks."""
    num_shards: int = 1
    """Shards in all (= number of samplers)."""
    redis_url: str = ""
    """Redis the groups are published to."""
    stream: str = "experience"
    """Redis stream of the groups."""
    consumer_group: str = "learner"
    """Consumer group whose backlog drives backpressure."""
    bus_retry: RetryPolicy = field(default_factory=RetryPolicy)
    """How publishing rides out an unreachable Redis."""
    weights_channel: str = "diffrl-weights"
    """Name of the Ray weight channel actor ('' = never update weights)."""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    """How p_samp arrives from the learner (object store or torch.distributed)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model of p_samp."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampler settings."""
    rewards: RewardClientConfig = field(default_factory=RewardClientConfig)
    """Rewards and their replicas."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The learner's LoRA settings (adapters published as kind=lora are applied with them)."""
    run_dir: str = ""
    """The run folder on this sampler's node (its log file goes to ``run_dir/logs/``)."""
    storage: str = ""
    """The run's object-storage URL (the log file is mirrored to it); empty: none."""
    log_process: str = ""
    """Send this process's output to ``run_dir/logs/<log_process>.log`` (empty: leave it where it goes)."""


def build_sampler(spec: SamplerSpec, prompts: list[PromptItem]):
    """A ready :class:`Sampler` (model loaded, reward client, producer, weight channel, metrics)."""
    import torch

    from diffrl.actors.metrics import SamplerMetrics
    from diffrl.actors.prompts import PromptSource
    from diffrl.actors.sampler import Sampler
    from diffrl.embedded_redis import connect
    from diffrl.models.adapter import FlowModel
    from diffrl.proto.bus import ExperienceProducer
    from diffrl.reward_servers.client import SyncRewardClient

    torch.set_num_threads(spec.sampler.torch_threads)
    model = FlowModel.from_config(spec.model)
    producer = ExperienceProducer(connect(spec.redis_url), stream=spec.stream, consumer_group=spec.consumer_group,
                                  retry=spec.bus_retry)
    weights = None
    if spec.weights_channel:
        from diffrl.proto.weight_sync import open_source

        weights = open_source(spec.weights, spec.weights_channel, spec.sampler_id, device=model.device)
    source = PromptSource(prompts, spec.shard_index, spec.num_shards, seed=spec.sampler.seed)
    return Sampler(spec.sampler_id, spec.sampler, model, SyncRewardClient(spec.rewards), producer, source,
                   weights=weights, metrics=SamplerMetrics(spec.sampler_id), lora=spec.lora)


class SamplerActor:
    """Body of the Ray actor (created with max_concurrency=2 so ``stop`` reaches a running ``run``)."""

    def __init__(self, spec_yaml: str, prompts: list[PromptItem]):
        self.spec = load_config_text(SamplerSpec, spec_yaml)
        self._log_mirror = None
        if self.spec.log_process and self.spec.run_dir:
            from diffrl.run_logs import start_process_log
            from diffrl.storage import open_storage

            self._log_mirror = start_process_log(self.spec.run_dir, self.spec.log_process,
                                                 open_storage(self.spec.storage))
        if not prompts or not all(isinstance(p, PromptItem) for p in prompts):
            raise TypeError("SamplerActor: prompts must be a non-empty list of diffrl.data.PromptItem")
        self.metrics_port = self.metrics_host = None
        if self.spec.sampler.metrics_port >= 0:
            import ray
            from prometheus_client import start_http_server

            host = os.environ.get("DIFFRL_METRICS_HOST") or "127.0.0.1"  # 0.0.0.0 on clusters
            server, _ = start_http_server(self.spec.sampler.metrics_port, addr=host)
            self.metrics_port = server.server_port
            self.metrics_host = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host
        self.sampler = build_sampler(self.spec, prompts)

    def run(self, max_rounds: int | None = None) -> int:
        try:
            return self.sampler.run(max_rounds)
        finally:
            if self._log_mirror is not None:
                self._log_mirror.upload()

    def run_round(self) -> dict:
        return asdict(self.sampler.run_round())

    def stop(self) -> None:
        self.sampler.stop()

    def status(self) -> dict:
        s = self.sampler
        return {"sampler_id": s.id, "version": s.version, "rounds": s.rounds, "published": s.published,
                "busy_seconds": s.busy_seconds, "paused_seconds": s.paused_seconds,
                "masked_backoffs": s.masked_backoffs, "masked_rounds_in_row": s.masked_rounds_in_row, "masked_backoff_seconds": s.masked_backoff_seconds,
                "bus_retries": getattr(s.sink, "retries_total", 0),
                "incarnation": s.incarnation, "pid": os.getpid(), "metrics_port": self.metrics_port,
                "metrics_host": self.metrics_host}


def spawn_samplers(specs: list[SamplerSpec], cfg: SamplerConfig, prompts_ref, runtime_env: dict | None = None):
    """Start one Ray actor per spec (restarted by Ray on failure) over the training prompts and return
    their handles. ``prompts_ref``: ``ray.put(list[PromptItem])``, which the caller keeps referenced for
    as long as the samplers live (Ray re-reads it to restart a sampler actor)."""
    import ray

    from diffrl.config import to_yaml

    actor_cls = ray.remote(SamplerActor)
    handles = []
    for spec in specs:
        handles.append(actor_cls.options(
            name=spec.sampler_id, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=cfg.max_restarts,
            max_task_retries=0, max_concurrency=2, runtime_env=runtime_env,
        ).remote(to_yaml(spec), prompts_ref))
    return handles
