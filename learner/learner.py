"""The learner: the networks of an algorithm's roles (DeepSpeed engines, EMA snapshots, the frozen
base), the experience-stream loop, one optimizer step per batch of groups, versioned p_samp
publishing and checkpoints. A plain class (the Ray actor is a thin shell around it,
``diffrl.learner.ray_learner``); it never looks at an algorithm's name: the algorithm
(``learner.algorithm``, one file under ``learner/algorithms/``) declares its roles and computes its
losses, the learner owns the infrastructure (docs/algorithms.md).

One learner step on this rank's G groups (``train_on_groups``): decode and check the groups once
(``diffrl.learner.batch``), hand them to the algorithm's ``step`` with a context that gives it the
roles' networks, the step's generator, the micro-chunks, batch-wide statistics and a backward per
role (gradient accumulation: each trainable role's DeepSpeed gradient_accumulation_steps = its
backward passes x chunks, so its optimizer steps exactly once per learner step, on the mean over the
passes of the batch loss); then blend every EMA role towards its source with s = optimizer steps
taken (this step included; every ``learner.blend_every`` steps), rank 0 publishes the sampler role as version s, and the step's
statistics go to the metrics.

The stream loop (``poll_and_step`` / ``run``, ``diffrl.learner.stream``): each rank is consumer
``learner-<rank>`` and collects G / world_size groups; stale (> max_staleness versions), masked,
invalid and already-trained groups are counted and acknowledged at once; trained entries are
acknowledged only after the checkpoint that covers them is complete (``diffrl.learner.checkpoint``),
so a restart (``resume``) re-reads them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffrl.learner import batch as experience
from diffrl.learner import distributed
from diffrl.learner.algorithms.base import Algorithm, StepResult, Trainable
from diffrl.learner.checkpoint import Checkpointing
from diffrl.learner.config import LearnerConfig
from diffrl.learner.metrics import LearnerMetrics
from diffrl.learner.networks import Networks
from diffrl.learner.stats import StatsAccumulator, step_stats
from diffrl.learner.stream import StreamLoop
from diffrl.proto import experience_pb2
from diffrl.utils import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Group = experience_pb2.Group

class StepRun:
    """The context of one learner step (the :class:`~diffrl.learner.algorithms.base.StepContext` an
    algorithm's ``step`` gets): networks by role, generator, chunks, backward and stat logging."""

    def __init__(self, learner: Learner, generator: torch.Generator, chunks: list[Tensor],
                 shared_generator: torch.Generator):
        self._learner = learner
        self.model = learner.model
        self.device = learner.device
        self.generator = generator
        self.shared_generator = shared_generator
        self.chunks = chunks
        self.world_size = learner.world_size
        self.stats = StatsAccumulator()
        self.grad_norms: dict[str, float | None] = {}
        self._passes: dict[str, int] = {}

    def net(self, role: str):
        return self._learner.nets.module(role)

    def autocast(self):
        return self._learner.autocast()

    def batch_wide(self, fn, rewards: Tensor, mask: Tensor):
        return self._learner.dist.batch_wide(fn, rewards, mask)

    def log(self, stats, share: float) -> None:
        self.stats.add(stats, share)

    def backward(self, role: str, loss: Tensor, share: float) -> None:
        lrn = self._learner
        net = lrn.nets.trained[role]
        chunks = len(self.chunks)
        # DeepSpeed divides by gradient_accumulation_steps = passes·chunks: Σ_pass Σ_c (share_c/passes)·L
        net.engine.backward(loss * (share * chunks))
        done = self._passes[role] = self._passes.get(role, 0) + 1
        boundary = done % (net.spec.backward_passes * chunks) == 0  # this pass ends an optimizer step
        if boundary and lrn.config.zero_stage == 0 and lrn.dtype == torch.float32:
            grads = [p.grad for p in net.params if p.grad is not None]
            self.grad_norms[role] = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        net.engine.step()


class Learner(StreamLoop, Checkpointing):
    """The learner of one rank.

    Args:
        config: validated :class:`LearnerConfig` (``config.algorithm`` picks the algorithm).
        model: the base model (``diffrl.models.adapter.FlowModel``) loaded on this rank's device in the
            learner's dtype; its transformer is the frozen base every role starts from, its text
            encoders encode the groups' prompts.
        publisher: where rank 0 publishes p_samp (``diffrl.proto.weight_sync.WeightPublisher``); None:
            not published.
        run_dir: run folder; checkpoints go to ``run_dir/checkpoints``. None: no checkpoints (entries
            are then acknowledged right after the step that used them).
        consumer: this rank's ``diffrl.proto.bus.ExperienceConsumer`` (see :meth:`connect_bus`).
        registry: Prometheus registry for the metrics (default: the global one).
        teacher: the teacher's denoiser (``load_teacher``), for algorithms whose roles start from it
            (TDM-R1); on the model's device and dtype, frozen.
        storage: the run's object storage (``diffrl.storage.RunStorage``): checkpoints are staged in
            ``run_dir`` and committed there (see :meth:`save_checkpoint`). None: ``run_dir`` is the run
            folder.
    """

    def __init__(self, config: LearnerConfig, model, publisher=None, run_dir: str | Path | None = None,
                 consumer=None, registry=None, teacher: nn.Module | None = None, storage=None):
        config.validate()
        self.config = config
        self.model = model
        self.publisher = publisher
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.storage = storage
        self._started_time = time.monotonic()  # the checkpoint outage clock starts here
        self.consumer = consumer
        self.algorithm: Algorithm = config.algorithm_class(config.algorithm_config, config)
        self.algorithm.check_roles()
        self.metrics = LearnerMetrics.for_registry(registry)
        self.gauges = {key: self.metrics.gauge(name, doc) for key, (name, doc) in self.algorithm.gauges.items()}
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)

        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if not distributed.same_device(self.device, model.device):
            raise ValueError(f"learner device {self.device} but the model is on {model.device}")
        self.dtype = resolve_dtype(config.dtype, self.device)
        if model.dtype != self.dtype:
            raise ValueError(f"learner dtype {self.dtype} but the model was loaded in {model.dtype}")

        self.rank, self.world_size, self._owns_process_group = distributed.init_distributed(
            config.dist_backend, self.device)
        if self.world_size != config.world_size:
            raise ValueError(f"world_size: expected the process group's size {self.world_size}, "
                             f"got {config.world_size}")
        self.dist = distributed.Collectives(self.rank, self.world_size, self.device)
        self.is_lora = config.lora.enabled
        self.num_chunks = config.num_chunks
        self.groups_per_rank = config.groups_per_rank

        torch.manual_seed(config.seed)  # identical LoRA init on every rank (DeepSpeed broadcasts θ anyway)
        self.nets = Networks(self.algorithm.roles(), model.transformer, config, self.deepspeed_config,
                             lambda spec: spec.lr if spec.lr is not None else config.lr, teacher=teacher)

        self.step = 0
        """Optimizer steps taken = version of the latest p_samp."""
        self.counters: dict[str, int] = {k: 0 for k in (
            "groups_trained", "samples_trained", "dropped_stale", "masked", "duplicate", "invalid")}
        self._trained_ids: OrderedDict[str, None] = OrderedDict()
        self._buffer: list[tuple[str, Group]] = []
        self._pending_ack: list[str] = []
        self._pending_groups: list[str] = []  # group ids of _pending_ack (same order)
        self._resume_commit: list[tuple[str, str]] = []  # (entry, group) of the restored checkpoint
        self._last_checkpoint_step: int | None = None
        self._malformed_seen = 0
        self.last_stats: dict[str, Any] | None = None
        self._stop_agreed = False
        self.metrics.policy_version.set(0)

    # ================================================================ roles
    def deepspeed_config(self, spec: Trainable) -> dict[str, Any]:
        """The DeepSpeed config of a trainable role."""
        cfg = self.config
        gas = spec.backward_passes * self.num_chunks
        clip = spec.grad_clip if spec.grad_clip is not None else (
            cfg.grad_clip if cfg.grad_clip is not None else self.algorithm.default_grad_clip)
        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": gas,
            "train_batch_size": gas * self.world_size,
            "gradient_clipping": float(clip),
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": False},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    @property
    def _main(self):
        """The first trainable role (θ of CRD, NFT and GRPO)."""
        return next(iter(self.nets.trained.values()))

    @property
    def engine(self):
        """The first trainable role's DeepSpeed engine."""
        return self._main.engine

    @property
    def T(self) -> int:
        """Backward passes per micro-chunk of the first trainable role in one step."""
        return self._main.spec.backward_passes

    @property
    def anchor(self) -> nn.Module:
        """The frozen base denoiser."""
        return self.nets.base

    @property
    def p_samp(self) -> nn.Module:
        """The module published to the samplers (the algorithm's sampler role)."""
        return self.nets.snapshots[self.algorithm.sampler_role].module

    @property
    def p_eval(self) -> nn.Module:
        """The module evaluated on held-out prompts (the algorithm's eval role, else p_samp)."""
        return self.nets.snapshots[self.algorithm.evaluated_role].module

    @property
    def p_old(self) -> nn.Module | None:
        """The snapshot role named p_old, if the algorithm has one."""
        snap = self.nets.snapshots.get("p_old")
        return None if snap is None else snap.module

    @property
    def version(self) -> int:
        """Version of the latest published p_samp (= optimizer steps taken)."""
        return self.step

    def theta_state_dict(self, role: str | None = None) -> dict[str, Tensor]:
        """CPU copies of a trainable role's trained parameters (default: the first; gathered under
        ZeRO-3), by parameter name."""
        return (self._main if role is None else self.nets.trained[role]).state_dict()

    def snapshot_state_dict(self, which: str) -> dict[str, Tensor]:
        """CPU copies of an EMA role's trained tensors (names as its source's); ``'p_samp'`` is the
        sampler role whatever its name."""
        name = self.algorithm.sampler_role if which == "p_samp" and which not in self.nets.snapshots else which
        return self.nets.snapshots[name].state_dict()

    def publish_tensors(self) -> tuple[dict[str, Tensor], str]:
        """What the samplers get: (tensors in the model dtype, kind). LoRA: the adapter state dict in
        peft's naming (no adapter name; load with ``peft.set_peft_model_state_dict`` on a base with the
        same LoraConfig); full: the denoiser's whole state dict (``load_state_dict``)."""
        if self.is_lora:
            from peft import get_peft_model_state_dict

            tensors = get_peft_model_state_dict(self.p_samp)
            kind = "lora"
        else:
            tensors = self.p_samp.state_dict()
            kind = "full"
        out = {n: (t.detach().to(self.dtype) if t.is_floating_point() else t.detach()) for n, t in tensors.items()}
        return out, kind

    def publish(self) -> None:
        """Publish p_samp with version = optimizer steps taken (rank 0 only; no-op elsewhere)."""
        if self.publisher is None or self.rank != 0:
            return
        tensors, kind = self.publish_tensors()
        self.publisher.publish(self.step, tensors, kind)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    # ================================================================ groups
    def group_problem(self, group: Group) -> str | None:
        """Why ``group`` cannot be trained (None when it can). Masked groups are not checked here."""
        return experience.group_problem(group, self.model.latent_shape, self.config.reward_weights,
                                        self.algorithm.record, self._sample_problem,
                                        self.algorithm.trajectory_needs)

    def _sample_problem(self, sample) -> str | None:
        return self.algorithm.sample_problem(sample, self.model)

    def decode(self, groups: Sequence[Group]) -> experience.ExperienceBatch:
        """Check and decode ``groups`` into the algorithm's batch (raises ValueError on a bad group)."""
        return experience.decode(groups, self.model.latent_shape, self.config.reward_weights,
                                 self.algorithm.record, self.step, self._sample_problem,
                                 self.algorithm.trajectory_needs)

    def step_context(self, num_groups: int | None = None) -> StepRun:
        """The context of the next step on ``num_groups`` groups (default: this rank's share): the
        step's generator and micro-chunks. Also for diagnostics that run the algorithm's forward passes
        without training (e.g. ``GRPO.log_ratios``)."""
        G = self.groups_per_rank if num_groups is None else num_groups
        chunks = [c for c in torch.arange(G).tensor_split(self.num_chunks) if len(c)]
        if len(chunks) != self.num_chunks:
            raise RuntimeError("empty micro-chunk")
        gen = torch.Generator().manual_seed(distributed.step_seed(self.config.seed, self.step, self.rank))
        shared = torch.Generator().manual_seed(distributed.shared_seed(self.config.seed, self.step))
        return StepRun(self, gen, chunks, shared)

    # ================================================================ one step
    def train_on_groups(self, groups: Sequence[Group]) -> dict[str, Any]:
        """One optimizer step of every trainable role on ``groups`` (this rank's share of the batch;
        every rank calls it together). Returns the step's stats (means over ranks where they are
        per-sample)."""
        t_start = time.perf_counter()
        if len(groups) < self.num_chunks:
            raise ValueError(f"groups: expected at least {self.num_chunks} (one per micro-chunk), got {len(groups)}")
        version_before = self.step
        engine_steps = {role: net.engine.global_steps for role, net in self.nets.trained.items()}
        batch = self.decode(groups)
        G = len(groups)
        run = self.step_context(G)
        lr = float(self.engine.get_lr()[0])  # this step's (learner.lr_warmup_steps moves it after the step)
        result: StepResult = self.algorithm.step(batch, run)
        for role, net in self.nets.trained.items():
            taken, want = net.engine.global_steps - engine_steps[role], net.spec.steps_per_batch
            if taken != want:
                raise RuntimeError(f"{role}: DeepSpeed took {taken} optimizer steps in one learner step (expected "
                                   f"{want}; does the algorithm call ctx.backward backward_passes times per chunk "
                                   "and optimizer step?)")
        grad_norm = run.grad_norms.get(self._main.spec.name)
        ds_norm = self.engine.get_global_grad_norm()
        if ds_norm is not None:
            grad_norm = float(ds_norm)

        s = version_before + 1  # learner steps taken, this one included (the policy version)
        decays = {name: float(snap.spec.decay(s)) for name, snap in self.nets.snapshots.items()}
        if s % self.config.blend_every == 0:  # the snapshot cadence (learner.blend_every)
            self.nets.blend(decays)
        self.step = s
        self.publish()

        stats = step_stats(groups, run.stats.means(), batch.rewards, batch.mask, result.advantages,
                           batch.staleness, result.adv_clip, self.config.reward_weights, self.world_size,
                           self.device)
        for alias, source in self.algorithm.stat_aliases.items():
            if source in stats:
                stats[alias] = stats[source]
        for name, d in decays.items():
            stats[f"decay_{name.removeprefix('p_')}"] = d
        stats.setdefault("decay_samp", decays[self.algorithm.sampler_role])
        stats.update(step=self.step, version=self.step, grad_norm=grad_norm,
                     lr=lr, groups=G * self.world_size,
                     samples=int(stats.pop("_samples")), staleness=batch.staleness,
                     step_seconds=time.perf_counter() - t_start)
        stats.update(result.stats or {})
        self.counters["groups_trained"] += len(groups)
        self.counters["samples_trained"] += int(batch.mask.sum())
        self.metrics.observe_step(stats)
        for key, gauge in self.gauges.items():
            if key in stats:
                gauge.set(stats[key])
        self.last_stats = stats
        return stats

    def close(self) -> None:
        """Leave the process group if this learner created it."""
        if self._owns_process_group:
            distributed.leave_distributed()
            self._owns_process_group = False
