"""The learner: θ in a DeepSpeed engine, the snapshots p_old and p_samp, the frozen anchor p_φ, the
experience-stream loop, versioned p_samp publishing and checkpoints. A plain class (the Ray actor is
a thin shell around it elsewhere); ALGORITHMS.md is the spec of one step.

Parameter sets (ALGORITHMS.md, "CRD"):
    θ       trainable copy of the base denoiser (full fine-tune) or base + LoRA adapters; the
            DeepSpeed engine owns it (ZeRO 0-3, gradient clipping, bf16 with fp32 master weights).
    p_old   slow EMA of θ, the reference inside the implicit reward (fp32, no grad).
    p_samp  decoupled sampling model, EMA of θ on its own schedule (fp32, no grad), published to the
            samplers with version = optimizer steps taken (the initial p_samp = base is version 0).
    p_φ     the base model's transformer, frozen: its CFG velocity is the KL anchor.
With LoRA every module shares the frozen base weights with p_φ (one copy in memory; under ZeRO-3 θ
gets its own copy because ZeRO-3 partitions every parameter of the engine's module), and the
snapshots differ only in their adapter tensors.

One optimizer step on G groups (``train_on_groups``): advantages from the groups' rewards (over all
ranks' groups: the "global" std is the batch's), T noise levels, for each level a fresh ε per sample
shared by θ, p_old and p_φ (common random numbers), p_old and the anchor (cond + uncond batched)
evaluated without grad, ``crd_step_loss`` backpropagated per level and per micro-chunk of groups
(gradient accumulation: DeepSpeed's gradient_accumulation_steps = T x chunks, so the optimizer steps
exactly once per learner step, on the mean over levels of the batch loss), clip, step, then the
snapshots' EMAs with s = optimizer steps taken (this step included), then rank 0 publishes p_samp.

GRPO (``learner.algorithm=grpo``, ``learner/algorithms/grpo.py``): the groups carry the SDE
trajectories and the sampling policy's per-step log-probabilities (``Sample.extras``, keys in
models/sde.py). Group-normalized advantages; for each of the first ``grpo.num_train_steps()``
denoising steps j, log p_θ(x_{j+1} | x_j) recomputed with θ's (CFG) velocity at the recorded x_j, the
PPO-clipped ratio against the recorded log-prob, plus β·KL of θ's step to the frozen base model's;
one backward per step and micro-chunk, one optimizer step. p_samp = p_old is an exact copy of θ
(EMA decay 0): the samplers follow the policy, and the records make stale samples correct.

The stream loop (``poll_and_step`` / ``run``): each rank is consumer ``learner-<rank>`` and collects
G / world_size groups; stale (> max_staleness versions), masked, invalid and already-trained groups
are counted and acknowledged at once (explicitly discarded); trained entries are acknowledged only
after the checkpoint that covers them is complete (``latest`` written), so a restart
(``resume``) re-reads them; group ids of trained groups travel in the checkpoint and make
re-delivery idempotent.

The ledger: every acknowledgement names the entry's fate (trained, dropped_stale, masked, duplicate,
invalid; see ``proto.bus``), counted in Redis atomically with the XACK. Once a checkpoint is
complete each rank appends the group ids it covers to ``RUN_DIR/trained_groups.txt`` (one
``group_id<TAB>step`` line each); a checkpoint also lists them (``interval``), so a restart that
finds the acks or the lines of its last checkpoint missing (a crash right after ``latest``) adds
them, and each trained group appears there exactly once.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import shutil
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from learner import checkpoint as ckpt
from learner.algorithms.crd import (
    advantages,
    crd_anchor_loss,
    crd_step_loss,
    ema_update_,
    interpolate,
    velocity_target,
)
from learner.algorithms.grpo import (
    group_advantages,
    grpo_step_loss,
    kl_std_for,
    sde_step_log_prob,
    sde_step_mean_std,
)
from learner.algorithms.nft import nft_reward_weight, nft_step_loss
from learner.config import LearnerConfig
from learner.metrics import LearnerMetrics
from models.sde import EXTRA_GUIDANCE_SCALE, EXTRA_LATENTS, EXTRA_LOG_PROBS, EXTRA_NOISE_LEVEL, EXTRA_SIGMAS
from proto import experience_pb2
from proto.codec import tensor_from_proto

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Group = experience_pb2.Group

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_FLOAT_WIRE = ("float32", "float16", "bfloat16", "float64")
TRAINED_GROUPS_FILE = "trained_groups.txt"
"""Run-folder file listing every committed trained group (``group_id<TAB>step``)."""
_GATHER_BUCKET_NUMEL = 1 << 26  # ZeRO-3: parameters gathered at once for the snapshot EMAs


# ------------------------------------------------------------------------------------ process group


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def init_distributed(backend: str, device: torch.device) -> tuple[int, int, bool]:
    """Join (or start) the default process group through ``deepspeed.init_distributed``.

    Without a launcher (no RANK/WORLD_SIZE in the environment) this is a one-rank group:
    MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK=LOCAL_RANK=0, WORLD_SIZE=1 are set if absent.
    Returns ``(rank, world_size, created_here)``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("several learner ranks need MASTER_ADDR/MASTER_PORT set by the launcher")
        os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device()
    ib = b.index if b.index is not None else torch.cuda.current_device()
    return ia == ib


def _shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the very same tensors."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + 17) % (2**63 - 1)


# ----------------------------------------------------------------------------------------- learner


class Learner:
    """The learner of one rank.

    Args:
        config: validated :class:`LearnerConfig`.
        model: the base model (``models.adapter.FlowModel``) loaded on this rank's device in the
            learner's dtype; its transformer becomes the frozen anchor p_φ, its text encoders encode
            the groups' prompts.
        publisher: where rank 0 publishes p_samp (``proto.weight_sync.WeightPublisher``); None: not
            published.
        run_dir: run folder; checkpoints go to ``run_dir/checkpoints``. None: no checkpoints (entries
            are then acknowledged right after the step that used them).
        consumer: this rank's ``proto.bus.ExperienceConsumer`` (see :meth:`connect_bus`).
        registry: Prometheus registry for the metrics (default: the global one).
    """

    def __init__(self, config: LearnerConfig, model, publisher=None, run_dir: str | Path | None = None,
                 consumer=None, registry=None):
        config.validate()
        self.config = config
        self.model = model
        self.publisher = publisher
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.consumer = consumer
        self.metrics = LearnerMetrics.for_registry(registry)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)

        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if not _same_device(self.device, model.device):
            raise ValueError(f"learner device {self.device} but the model is on {model.device}")
        dtype_name = config.dtype if config.dtype != "auto" else (
            "bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = _DTYPES[dtype_name]
        if model.dtype != self.dtype:
            raise ValueError(f"learner dtype {dtype_name} but the model was loaded in {model.dtype}")

        self.rank, self.world_size, self._owns_process_group = init_distributed(config.dist_backend, self.device)
        if self.world_size != config.world_size:
            raise ValueError(f"world_size: expected the process group's size {self.world_size}, "
                             f"got {config.world_size}")
        self.is_lora = config.lora.enabled
        self.alg = config.algorithm
        self.alg_config = {"crd": config.crd, "nft": config.nft, "grpo": config.grpo}[self.alg]
        self._grpo_sigmas = config.grpo.sigmas() if self.alg == "grpo" else None  # [S + 1] float64
        self.T = config.num_noise_levels
        self.num_chunks = config.num_chunks
        self.groups_per_rank = config.groups_per_rank

        # ------------------------------------------------------------ modules
        self.anchor: nn.Module = model.transformer
        self.anchor.requires_grad_(False).eval()
        torch.manual_seed(config.seed)  # identical LoRA init on every rank (DeepSpeed broadcasts θ anyway)
        theta = self._build_theta()
        self.engine = self._build_engine(theta)
        self._train_names = [n for n, p in self.engine.module.named_parameters() if p.requires_grad]
        named = dict(self.engine.module.named_parameters())
        self._theta_params = [named[n] for n in self._train_names]
        self.p_old = self._build_snapshot()
        # p_samp is p_old when the sampler is not decoupled (CRD ablation, NFT and GRPO by design)
        decoupled = self.alg == "crd" and config.crd.decoupled_sampler
        self.p_samp = self._build_snapshot() if decoupled else self.p_old
        self._old_params = self._snapshot_params(self.p_old)
        self._samp_params = self._snapshot_params(self.p_samp)
        self._blend([(self._old_params, 0.0), (self._samp_params, 0.0)])  # exact copies of θ0

        # ------------------------------------------------------------ state
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

    # ================================================================ construction
    def _inject_lora(self, module: nn.Module) -> nn.Module:
        from models.lora import inject_lora

        return inject_lora(module, self.config.lora)

    def _build_theta(self) -> nn.Module:
        if self.is_lora:
            base = copy.deepcopy(self.anchor) if self.config.zero_stage == 3 else _shared_copy(self.anchor)
            theta = self._inject_lora(base)
            for n, p in theta.named_parameters():
                p.requires_grad_(".lora_" in n)
        else:
            theta = copy.deepcopy(self.anchor)
            theta.requires_grad_(True)
        theta.train()
        if self.config.gradient_checkpointing:
            theta.enable_gradient_checkpointing()
        return theta

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config built from the LearnerConfig."""
        cfg = self.config
        gas = self.T * self.num_chunks
        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": gas,
            "train_batch_size": gas * self.world_size,
            "gradient_clipping": cfg.effective_grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": False},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def _build_engine(self, theta: nn.Module):
        import deepspeed

        cfg = self.config
        params = [p for p in theta.parameters() if p.requires_grad]
        # A client torch AdamW: no native op to compile (FusedAdam/CPUAdam) on CPU machines.
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                                      weight_decay=cfg.weight_decay)
        engine, _, _, _ = deepspeed.initialize(model=theta, optimizer=optimizer, config=self.deepspeed_config())
        return engine

    def _build_snapshot(self) -> nn.Module:
        """A frozen fp32 copy of θ's structure (LoRA: sharing the base weights with the anchor)."""
        if self.is_lora:
            snap = self._inject_lora(_shared_copy(self.anchor))
            for n, p in snap.named_parameters():
                p.requires_grad_(False)
                if ".lora_" in n:
                    p.data = p.data.to(torch.float32)  # adapters only: the base is shared
        else:
            snap = copy.deepcopy(self.anchor).to(torch.float32)
            snap.requires_grad_(False)
        return snap.eval()

    def _snapshot_params(self, snap: nn.Module) -> list[Tensor]:
        named = dict(snap.named_parameters())
        missing = [n for n in self._train_names if n not in named]
        if missing:
            raise RuntimeError(f"snapshot lacks θ's parameters {missing[:3]}")
        return [named[n] for n in self._train_names]

    # ================================================================ helpers
    @property
    def version(self) -> int:
        """Version of the latest published p_samp (= optimizer steps taken)."""
        return self.step

    def _zero3(self) -> bool:
        return self.config.zero_stage == 3

    def _gathered(self, params: list[Tensor]):
        if not self._zero3():
            return contextlib.nullcontext()
        from deepspeed.runtime.zero import GatheredParameters

        return GatheredParameters(params, modifier_rank=None)

    def _theta_buckets(self) -> list[list[int]]:
        buckets, cur, size = [], [], 0
        for i, p in enumerate(self._theta_params):
            n = int(getattr(p, "ds_numel", p.numel()))
            if cur and size + n > _GATHER_BUCKET_NUMEL:
                buckets.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        if cur:
            buckets.append(cur)
        return buckets

    def _blend(self, targets: list[tuple[list[Tensor], float]]) -> None:
        """snap ← d·snap + (1 − d)·θ for each (snapshot params, d); θ gathered bucket-wise under ZeRO-3."""
        seen: set[int] = set()
        unique = []
        for params, d in targets:  # p_samp may be p_old: blend once
            if id(params) not in seen:
                seen.add(id(params))
                unique.append((params, d))
        for idx in self._theta_buckets():
            theta = [self._theta_params[i] for i in idx]
            with self._gathered(theta):
                for params, d in unique:
                    ema_update_([params[i] for i in idx], theta, d)

    def theta_state_dict(self) -> dict[str, Tensor]:
        """CPU copies of θ's trainable parameters (gathered under ZeRO-3), by parameter name."""
        out = {}
        for idx in self._theta_buckets():
            theta = [self._theta_params[i] for i in idx]
            with self._gathered(theta):
                for i, p in zip(idx, theta):
                    out[self._train_names[i]] = p.detach().to("cpu", copy=True)
        return out

    def snapshot_state_dict(self, which: str) -> dict[str, Tensor]:
        """CPU copies of the trained tensors of ``'p_old'`` or ``'p_samp'`` (names as θ's)."""
        params = {"p_old": self._old_params, "p_samp": self._samp_params}[which]
        return {n: p.detach().to("cpu", copy=True) for n, p in zip(self._train_names, params)}

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

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    # ================================================================ groups
    def _reward_of(self, sample) -> float:
        weights = self.config.reward_weights
        if weights:
            return float(sum(w * sample.rewards[k] for k, w in weights.items()))
        return float(sum(sample.rewards.values()))

    def group_problem(self, group: Group) -> str | None:
        """Why ``group`` cannot be trained (None when it can). Masked groups are not checked here."""
        if len(group.samples) < 2:
            return f"{len(group.samples)} samples (need >= 2 to center)"
        shape = tuple(self.model.latent_shape)
        for i, s in enumerate(group.samples):
            if not s.HasField("latent") or tuple(s.latent.shape) != shape:
                return f"sample {i}: latent shape {tuple(s.latent.shape)}, expected {shape}"
            if s.latent.dtype not in _FLOAT_WIRE:
                return f"sample {i}: latent dtype {s.latent.dtype!r} is not floating point"
            if not s.rewards:
                return f"sample {i}: no rewards"
            missing = [k for k in self.config.reward_weights if k not in s.rewards]
            if missing:
                return f"sample {i}: no reward {missing[0]!r}"
            if not all(math.isfinite(v) for v in s.rewards.values()):
                return f"sample {i}: non-finite reward"
            if self.alg == "grpo":
                problem = self._grpo_record_problem(s)
                if problem is not None:
                    return f"sample {i}: {problem}"
        return None

    def _grpo_record_problem(self, sample) -> str | None:
        """Why a sample's SDE records cannot be trained by GRPO (None when they can)."""
        c = self.config.grpo
        S = c.num_sampling_steps
        want = {EXTRA_LATENTS: (S + 1, *self.model.latent_shape), EXTRA_LOG_PROBS: (S,), EXTRA_SIGMAS: (S + 1,),
                EXTRA_NOISE_LEVEL: (), EXTRA_GUIDANCE_SCALE: ()}
        for key, shape in want.items():
            if key not in sample.extras:
                return f"no extras[{key!r}] (GRPO needs samplers with sampler.record_log_probs=true)"
            t = sample.extras[key]
            if tuple(t.shape) != shape:
                return f"extras[{key!r}] shape {tuple(t.shape)}, expected {shape} (learner.grpo.num_sampling_steps={S})"
            if t.dtype not in _FLOAT_WIRE:
                return f"extras[{key!r}] dtype {t.dtype!r} is not floating point"
        sigmas = tensor_from_proto(sample.extras[EXTRA_SIGMAS], what="sde_sigmas").to(torch.float64)
        if not torch.allclose(sigmas, self._grpo_sigmas, rtol=0.0, atol=1e-6):
            return "recorded noise levels differ from learner.grpo's schedule (num_sampling_steps, time_shift)"
        for key, mine, name in ((EXTRA_NOISE_LEVEL, c.noise_level, "noise_level"),
                                (EXTRA_GUIDANCE_SCALE, c.guidance_scale, "guidance_scale")):
            theirs = float(tensor_from_proto(sample.extras[key], what=key))
            if not abs(theirs - mine) <= 1e-6:
                return f"sampled with {name}={theirs}, learner.grpo.{name}={mine}"
        log_probs = tensor_from_proto(sample.extras[EXTRA_LOG_PROBS], what="sde_log_probs")
        if not bool(torch.isfinite(log_probs).all()):
            return "non-finite recorded log-probs"
        return None

    def _reward_names(self, groups: Sequence[Group]) -> list[str]:
        if self.config.reward_weights:
            return sorted(self.config.reward_weights)
        return sorted({k for g in groups for s in g.samples for k in s.rewards})

    def _make_batch(self, groups: Sequence[Group]):
        G = len(groups)
        K = max(len(g.samples) for g in groups)
        C, H, W = self.model.latent_shape
        x0 = torch.zeros(G, K, C, H, W, dtype=torch.float32)  # [G, K, C, H, W]
        rewards = torch.zeros(G, K, dtype=torch.float64)  # [G, K]
        mask = torch.zeros(G, K, dtype=torch.bool)  # [G, K]
        for gi, g in enumerate(groups):
            problem = self.group_problem(g)
            if problem is not None:
                raise ValueError(f"group {g.group_id!r} cannot be trained: {problem}")
            if g.masked:
                raise ValueError(f"group {g.group_id!r} is masked ({g.mask_reason}); it must not be trained")
            for ki, s in enumerate(g.samples):
                x0[gi, ki] = tensor_from_proto(s.latent, what="latent").to(torch.float32)
                rewards[gi, ki] = self._reward_of(s)
                mask[gi, ki] = True
        return x0, rewards, mask

    def _advantages(self, rewards: Tensor, mask: Tensor, padded: bool) -> tuple[Tensor, Tensor]:
        """(a, ã) ``[G, K]`` of this rank's groups, normalized over every rank's groups."""
        ac = self.alg_config
        if self.world_size == 1:
            return advantages(rewards, mask if padded else None, ac.std_mode, ac.adv_clip, ac.std_eps)
        G, K = rewards.shape
        dims = self._all_reduce(torch.tensor([G, K], dtype=torch.int64, device=self.device), dist.ReduceOp.MAX)
        Gm, Km = (int(v) for v in dims.tolist())
        r = torch.zeros(Gm, Km, dtype=torch.float64, device=self.device)
        m = torch.zeros(Gm, Km, dtype=torch.float64, device=self.device)
        r[:G, :K] = rewards.to(self.device)
        m[:G, :K] = mask.to(self.device, torch.float64)
        rs = [torch.empty_like(r) for _ in range(self.world_size)]
        ms = [torch.empty_like(m) for _ in range(self.world_size)]
        dist.all_gather(rs, r)
        dist.all_gather(ms, m)
        full_r, full_m = torch.cat(rs).cpu(), torch.cat(ms).cpu() > 0.5  # [W·Gm, Km]
        a, a_tilde = advantages(full_r, full_m, ac.std_mode, ac.adv_clip, ac.std_eps)
        rows = slice(self.rank * Gm, self.rank * Gm + G)
        return a[rows, :K], a_tilde[rows, :K]

    # ================================================================ one step
    def train_on_groups(self, groups: Sequence[Group]) -> dict[str, Any]:
        """One optimizer step on ``groups`` (this rank's share of the batch; every rank calls it
        together). Returns the step's stats (means over ranks where they are per-sample)."""
        t_start = time.perf_counter()
        if len(groups) < self.num_chunks:
            raise ValueError(f"groups: expected at least {self.num_chunks} (one per micro-chunk), got {len(groups)}")
        cfg, ac = self.config, self.alg_config
        version_before = self.step
        staleness = [max(0, version_before - int(g.policy_version)) for g in groups]
        x0, rewards, mask = self._make_batch(groups)  # [G, K, C, H, W], [G, K], [G, K]
        G, K = rewards.shape
        padded = not bool(mask.all())
        if self.alg == "grpo":  # per prompt group: (r − mean_g r)/(std_g r + eps), no cross-rank statistics
            a = a_tilde = group_advantages(rewards, ac.adv_eps, mask if padded else None)  # [G, K]
        else:
            a, a_tilde = self._advantages(rewards, mask, padded)  # [G, K] each
        a = a.to(torch.float32)
        a_tilde = a_tilde.to(torch.float32)
        weight_r = nft_reward_weight(a, ac.adv_clip) if self.alg == "nft" else None  # [G, K]

        gen = torch.Generator().manual_seed(_step_seed(cfg.seed, version_before, self.rank))
        records = None
        if self.alg == "crd":
            sigmas = ac.noise_levels(gen)  # [T] matching levels
            if ac.num_anchor_levels:  # then T_a anchor-only levels below them
                sigmas = torch.cat([sigmas, ac.anchor_noise_levels(gen)])  # [T + T_a]
        elif self.alg == "nft":
            sigmas = self._nft_noise_levels(gen)  # [T]
        else:
            records = self._grpo_records(groups)  # latents [G, K, T + 1, C, H, W], log-probs [G, K, T]
        cond_groups = self.model.encode_prompts([g.prompt for g in groups])  # [G] embeds
        chunks = [c for c in torch.arange(G).tensor_split(self.num_chunks) if len(c)]
        if len(chunks) != self.num_chunks:
            raise RuntimeError("empty micro-chunk")
        n_valid = float(mask.sum())
        acc: dict[str, float] = {}
        acc_levels: dict[str, float] = {}  # levels that reported each stat (anchor-only levels report fewer)
        use_kl = self.alg == "crd" and ac.use_kl_anchor and ac.beta_kl > 0
        use_ref = self.alg == "nft" and ac.beta_kl > 0
        grad_norm = None
        micro = 0
        for t in range(self.T):
            anchor_only = self.alg == "crd" and t >= ac.num_noise_levels
            if records is None:
                sigma = float(sigmas[t])
                if self.alg == "crd" and ac.group_shared_noise:  # one ε per (group, t): common to the contrast
                    eps_all = torch.randn(G, 1, *x0.shape[2:], generator=gen).expand(G, K, *x0.shape[2:])
                else:
                    eps_all = torch.randn(G, K, *x0.shape[2:], generator=gen)  # [G, K, C, H, W] fresh per (sample, t)
            for idx in chunks:
                micro += 1
                m_c = mask[idx]  # [g, K]
                n = m_c.numel()
                if records is not None:  # GRPO: denoising step t of the recorded trajectories
                    loss, st = self._grpo_chunk_loss(records, t, idx, m_c, a, cond_groups, padded)
                else:
                    x0_c = x0[idx].flatten(0, 1).to(self.device)  # [n, C, H, W]
                    eps_c = eps_all[idx].flatten(0, 1).to(self.device)  # [n, C, H, W]
                    sig = torch.full((n,), sigma, device=self.device)  # [n]
                    x_t = interpolate(x0_c, eps_c, sig)  # [n, C, H, W]
                    u = velocity_target(x0_c, eps_c)  # [n, C, H, W]
                    cond = cond_groups[idx.tolist()].repeat_interleave(K)
                    with torch.no_grad(), self._autocast():
                        v_old = None if anchor_only else self.model.velocity(
                            x_t, sig, cond, transformer=self.p_old).float()
                        v_anchor = None
                        if use_kl:
                            v_anchor = self.model.guided_velocity(
                                x_t, sig, cond, ac.kl_cfg_scale, transformer=self.anchor,
                                uncond=self.model.empty_embeds(n)).float()
                        elif use_ref:
                            v_anchor = self.model.velocity(x_t, sig, cond, transformer=self.anchor).float()
                    v_theta = self.model.velocity(x_t, sig, cond, transformer=self.engine)  # [n, C, H, W] grad
                    if anchor_only:
                        loss, st = crd_anchor_loss(v_theta, v_anchor, a_tilde[idx].to(self.device), ac,
                                                   m_c.to(self.device) if padded else None)
                    elif self.alg == "crd":
                        loss, st = crd_step_loss(v_theta, v_old, u, a_tilde[idx].to(self.device), ac, v_anchor,
                                                 m_c.to(self.device) if padded else None)
                    else:
                        flat = m_c.reshape(-1).nonzero().squeeze(1).to(self.device) if padded else slice(None)
                        loss, st = nft_step_loss(v_theta[flat], v_old[flat], u[flat],
                                                 weight_r[idx].reshape(-1).to(self.device)[flat], ac,
                                                 None if v_anchor is None else v_anchor[flat])
                w = float(m_c.sum()) / n_valid  # this chunk's share of the rank's mean
                # DeepSpeed divides by gradient_accumulation_steps = T·chunks: Σ_t Σ_c (w_c/T)·L_{t,c}
                self.engine.backward(loss * (w * self.num_chunks))
                if micro == self.T * self.num_chunks and cfg.zero_stage == 0 and self.dtype == torch.float32:
                    grads = [p.grad for p in self._theta_params if p.grad is not None]
                    grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                self.engine.step()
                for k, v in st.items():
                    acc[k] = acc.get(k, 0.0) + float(v) * w
                    acc_levels[k] = acc_levels.get(k, 0.0) + w  # the chunks' w sum to 1 per level
        acc = {k: v / acc_levels[k] for k, v in acc.items()}  # means over the levels
        if self.engine.global_steps != version_before + 1:
            raise RuntimeError(f"DeepSpeed took {self.engine.global_steps - version_before} optimizer "
                               "steps in one learner step (expected exactly 1)")
        ds_norm = self.engine.get_global_grad_norm()
        if ds_norm is not None:
            grad_norm = float(ds_norm)

        # snapshots: s = optimizer steps taken, this one included
        s = self.engine.global_steps
        if self.alg == "crd":
            d_old = ac.old_ema.decay(s)
            d_samp = ac.sampler_ema.decay(s) if self.p_samp is not self.p_old else d_old
        elif self.alg == "grpo":
            d_old = d_samp = 0.0  # p_samp = θ: the samplers follow the policy being trained
        else:
            d_old = d_samp = ac.old_ema.decay(s)
        self._blend([(self._old_params, d_old), (self._samp_params, d_samp)])
        self.step = s
        self.publish()

        stats = self._step_stats(groups, acc, rewards, mask, a, n_valid, staleness)
        stats.update(step=self.step, version=self.step, grad_norm=grad_norm, decay_old=d_old, decay_samp=d_samp,
                     lr=float(self.engine.get_lr()[0]), groups=G * self.world_size,
                     samples=int(stats.pop("_samples")), staleness=staleness,
                     step_seconds=time.perf_counter() - t_start)
        if self.alg == "crd":
            stats["beta"] = float(ac.beta)
        self.counters["groups_trained"] += len(groups)
        self.counters["samples_trained"] += int(mask.sum())
        self.metrics.observe_step(stats)
        self.last_stats = stats
        return stats

    def _nft_noise_levels(self, gen: torch.Generator) -> Tensor:
        from learner.algorithms.crd import noise_levels

        c = self.config.nft
        return noise_levels(c.num_noise_levels, c.num_sampling_steps, c.time_shift, c.top_fraction, gen)

    # ================================================================ GRPO
    def _grpo_records(self, groups: Sequence[Group]) -> tuple[Tensor, Tensor]:
        """The trained part of the groups' SDE records (checked by ``group_problem``): latents
        ``[G, K, T + 1, C, H, W]`` (x at σ_0..σ_T) and recorded log-probs ``[G, K, T]``, zero-padded
        where a group has fewer than K samples."""
        T = self.T
        G = len(groups)
        K = max(len(g.samples) for g in groups)
        latents = torch.zeros(G, K, T + 1, *self.model.latent_shape, dtype=torch.float32)
        log_probs = torch.zeros(G, K, T, dtype=torch.float32)
        for gi, g in enumerate(groups):
            for ki, s in enumerate(g.samples):
                latents[gi, ki] = tensor_from_proto(s.extras[EXTRA_LATENTS], what=EXTRA_LATENTS)[: T + 1].float()
                log_probs[gi, ki] = tensor_from_proto(s.extras[EXTRA_LOG_PROBS], what=EXTRA_LOG_PROBS)[:T].float()
        return latents, log_probs

    def _grpo_step_terms(self, records: tuple[Tensor, Tensor], j: int, idx: Tensor, m_c: Tensor,
                         cond_groups, padded: bool, with_ref: bool):
        """Denoising step j of the recorded trajectories of groups ``idx`` (valid samples only, n of
        them): ``(log p_θ(x_{j+1} | x_j) [n] with grad, recorded log p [n], μ_θ [n, ...], μ_ref [n, ...]
        or None, step std, σ_j, σ_max, rows)``, log-probs reduced per ``grpo.log_prob_reduce``."""
        ac = self.config.grpo
        latents, old_lp = records
        K = latents.shape[1]
        rows = m_c.reshape(-1).nonzero().squeeze(1) if padded else torch.arange(m_c.numel())  # [n]
        x_t = latents[idx, :, j].flatten(0, 1)[rows].to(self.device)  # [n, C, H, W] x_{σ_j}
        x_next = latents[idx, :, j + 1].flatten(0, 1)[rows].to(self.device)  # [n, C, H, W] x_{σ_{j+1}}
        old = old_lp[idx, :, j].reshape(-1)[rows].to(self.device)  # [n] per-dimension mean, as recorded
        if ac.log_prob_reduce == "sum":
            old = old * x_t[0].numel()  # the joint log-density
        n = x_t.shape[0]
        sigma, sigma_next = float(self._grpo_sigmas[j]), float(self._grpo_sigmas[j + 1])
        sigma_max = float(self._grpo_sigmas[1])
        sig = torch.full((n,), sigma, device=self.device)  # [n] as the sampler's velocity call
        cond = cond_groups[idx.tolist()].repeat_interleave(K)[rows.tolist()]
        uncond = self.model.empty_embeds(n) if ac.guidance_scale != 1.0 else None
        mean_ref = None
        if with_ref:
            with torch.no_grad(), self._autocast():
                v_ref = self.model.guided_velocity(x_t, sig, cond, ac.guidance_scale, transformer=self.anchor,
                                                   uncond=uncond).float()  # [n, C, H, W]
            mean_ref, _ = sde_step_mean_std(x_t, v_ref, sigma, sigma_next, ac.noise_level, sigma_max)
        v_theta = self.model.guided_velocity(x_t, sig, cond, ac.guidance_scale, transformer=self.engine,
                                             uncond=uncond)  # [n, C, H, W] grad
        lp, mean_theta, std = sde_step_log_prob(x_t, v_theta, x_next, sigma, sigma_next, ac.noise_level, sigma_max,
                                                reduce=ac.log_prob_reduce)  # [n], [n, C, H, W], []
        return lp, old, mean_theta, mean_ref, std, sigma, sigma_max, rows

    def _grpo_chunk_loss(self, records, j: int, idx: Tensor, m_c: Tensor, a: Tensor, cond_groups,
                         padded: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """``grpo_step_loss`` of denoising step j for the groups ``idx`` and its stats (clip_fraction,
        ratio_mean, approx_kl, policy_loss, kl, loss)."""
        ac = self.config.grpo
        use_ref = ac.kl_beta > 0
        lp, old, mean_theta, mean_ref, std, sigma, sigma_max, rows = self._grpo_step_terms(
            records, j, idx, m_c, cond_groups, padded, with_ref=use_ref)
        adv = a[idx].reshape(-1)[rows].to(self.device)  # [n]
        kl_std = kl_std_for(std, sigma, ac, sigma_max) if use_ref else None
        loss, st = grpo_step_loss(lp, old, adv, ac, mean_theta, mean_ref, kl_std)
        st["clip_fraction"] = st.pop("clipfrac")
        st["ratio_mean"] = torch.exp(lp.detach() - old).mean()
        return loss, st

    @torch.no_grad()
    def grpo_log_ratios(self, groups: Sequence[Group]) -> Tensor:
        """log p_θ − log p_recorded of every trained denoising step, ``[G, K, T]`` (NaN where a group
        has fewer than K samples): 0 on-policy, before θ moves away from the sampling weights."""
        if self.alg != "grpo":
            raise RuntimeError("grpo_log_ratios needs learner.algorithm=grpo")
        for g in groups:
            problem = self.group_problem(g)
            if problem is not None:
                raise ValueError(f"group {g.group_id!r} cannot be trained: {problem}")
        records = self._grpo_records(groups)
        G, K = records[1].shape[:2]
        mask = torch.zeros(G, K, dtype=torch.bool)
        for gi, g in enumerate(groups):
            mask[gi, : len(g.samples)] = True
        padded = not bool(mask.all())
        cond_groups = self.model.encode_prompts([g.prompt for g in groups])
        out = torch.full((G * K, self.T), float("nan"), dtype=torch.float64)
        idx = torch.arange(G)
        for j in range(self.T):
            lp, old, *_, rows = self._grpo_step_terms(records, j, idx, mask, cond_groups, padded, with_ref=False)
            out[rows, j] = (lp - old).double().cpu()
        return out.reshape(G, K, self.T)

    def _step_stats(self, groups, acc, rewards, mask, a, n_valid, staleness) -> dict[str, Any]:
        """Per-step statistics, reduced over ranks (sample-weighted)."""
        names = self._reward_names(groups)
        m = mask.to(torch.float64)
        sums: list[float] = [n_valid]
        keys = sorted(acc)
        sums += [acc[k] * n_valid for k in keys]
        r = rewards * m
        sums += [float(r.sum()), float((r**2).sum())]
        af = a.to(torch.float64) * m
        sums += [float(af.sum()), float((af**2).sum()), float(af.abs().max()) if n_valid else 0.0,
                 float(((a.abs() >= self.alg_config.adv_clip - 1e-6) & mask).sum())]
        per_reward = []
        for name in names:
            vals = torch.tensor([s.rewards[name] for g in groups for s in g.samples if name in s.rewards],
                                dtype=torch.float64)
            per_reward += [float(vals.sum()), float((vals**2).sum()), float(vals.numel())]
        shared_names = bool(self.config.reward_weights) or self.world_size == 1
        vec = torch.tensor(sums + (per_reward if shared_names else []), dtype=torch.float64, device=self.device)
        staleness_vec = torch.tensor([float(sum(staleness)), float(max(staleness)), float(len(staleness))],
                                     dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(vec)
            # the abs-max of the advantages is a max, not a sum: redo it
            amax = torch.tensor([sums[len(keys) + 5]], dtype=torch.float64, device=self.device)
            dist.all_reduce(amax, op=dist.ReduceOp.MAX)
            smax = staleness_vec[1:2].clone()
            dist.all_reduce(smax, op=dist.ReduceOp.MAX)
            dist.all_reduce(staleness_vec)
            staleness_vec[1] = smax[0]
        v = vec.cpu().tolist()
        total = max(v[0], 1.0)
        out: dict[str, Any] = {}
        for i, k in enumerate(keys):
            out[k] = v[1 + i] / total
        j = 1 + len(keys)
        r_mean = v[j] / total
        out["reward_mean"] = r_mean
        out["reward_std"] = math.sqrt(max(v[j + 1] / total - r_mean**2, 0.0))
        a_mean = v[j + 2] / total
        out["advantage_mean"] = a_mean
        out["advantage_std"] = math.sqrt(max(v[j + 3] / total - a_mean**2, 0.0))
        out["advantage_abs_max"] = float(amax[0]) if self.world_size > 1 else v[j + 4]
        out["advantage_clip_fraction"] = v[j + 5] / total
        out["_samples"] = v[0]
        by_mean, by_std = {}, {}
        if shared_names:
            base = j + 6
            for i, name in enumerate(names):
                s1, s2, cnt = v[base + 3 * i: base + 3 * i + 3]
                mu = s1 / max(cnt, 1.0)
                by_mean[name] = mu
                by_std[name] = math.sqrt(max(s2 / max(cnt, 1.0) - mu**2, 0.0))
        else:  # per-reward stats of this rank's groups (reward names may differ between ranks)
            for i, name in enumerate(names):
                s1, s2, cnt = per_reward[3 * i: 3 * i + 3]
                mu = s1 / max(cnt, 1.0)
                by_mean[name] = mu
                by_std[name] = math.sqrt(max(s2 / max(cnt, 1.0) - mu**2, 0.0))
        out["reward_mean_by"] = by_mean
        out["reward_std_by"] = by_std
        out["staleness_mean"] = float(staleness_vec[0]) / max(float(staleness_vec[2]), 1.0)
        out["staleness_max"] = float(staleness_vec[1])
        # friendlier names for the implicit-reward diagnostics
        if "r_hat_mean" in out:
            out["implicit_reward_mean"] = out["r_hat_mean"]
            out["implicit_reward_std"] = out["r_hat_std"]
            out["implicit_reward_corr"] = out["reward_corr"]
            out["kl"] = out.get("kl_mean", 0.0)
        elif "kl_mean" in out:
            out["kl"] = out["kl_mean"]
        return out

    # ================================================================ the stream loop
    def connect_bus(self, redis, stream: str | None = None, consumer_group: str | None = None, retry=None):
        """Create this rank's consumer ``<consumer_name_prefix>-<rank>`` on ``redis`` and use it
        (``retry``: a ``proto.bus.RetryPolicy`` for an unreachable Redis)."""
        from proto.bus import DEFAULT_CONSUMER_GROUP, DEFAULT_STREAM, ExperienceConsumer

        self.consumer = ExperienceConsumer(redis, stream or DEFAULT_STREAM, consumer_group or DEFAULT_CONSUMER_GROUP,
                                           f"{self.config.consumer_name_prefix}-{self.rank}", retry=retry)
        return self.consumer

    @property
    def pending_entry_ids(self) -> list[str]:
        """Entries trained on but not acknowledged yet (waiting for a checkpoint)."""
        return list(self._pending_ack)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _is_stale(self, group: Group) -> bool:
        return self.step - int(group.policy_version) > self.config.max_staleness

    def _admit(self, entries: list[tuple[str, Group]]) -> None:
        """Sort freshly read entries into the buffer or discard (count + ack with their fate) them."""
        discard: dict[str, list[str]] = {}
        buffered_ids = {g.group_id for _, g in self._buffer}
        held = {e for e, _ in self._buffer} | set(self._pending_ack)
        for entry_id, group in entries:
            if entry_id in held:  # the same entry again (re-read after a reconnect): already ours
                continue
            held.add(entry_id)
            if group.group_id in self._trained_ids or group.group_id in buffered_ids:
                self.counters["duplicate"] += 1
                self.metrics.groups_duplicate.inc()
                discard.setdefault("duplicate", []).append(entry_id)
            elif group.masked:
                self.counters["masked"] += 1
                self.metrics.groups_masked.inc()
                discard.setdefault("masked", []).append(entry_id)
            elif self._is_stale(group):
                self.counters["dropped_stale"] += 1
                self.metrics.groups_dropped_stale.inc()
                discard.setdefault("dropped_stale", []).append(entry_id)
            else:
                problem = self.group_problem(group)
                if problem is not None:
                    log.warning("experience entry %s (group %s) dropped: %s", entry_id, group.group_id, problem)
                    self.counters["invalid"] += 1
                    self.metrics.groups_invalid.inc()
                    discard.setdefault("invalid", []).append(entry_id)
                else:
                    self._buffer.append((entry_id, group))
                    buffered_ids.add(group.group_id)
        for fate, ids in discard.items():
            self.consumer.ack(ids, fate=fate)

    def _drop_stale_buffered(self) -> None:
        keep, discard = [], []
        for entry_id, group in self._buffer:
            (discard if self._is_stale(group) else keep).append((entry_id, group))
        if discard:
            self._buffer = keep
            self.counters["dropped_stale"] += len(discard)
            self.metrics.groups_dropped_stale.inc(len(discard))
            self.consumer.ack([e for e, _ in discard], fate="dropped_stale")

    def _sync_malformed(self) -> None:
        total = int(getattr(self.consumer, "malformed_total", 0))
        if total > self._malformed_seen:
            self.metrics.entries_malformed.inc(total - self._malformed_seen)
            self._malformed_seen = total

    def _agree(self, ready: bool, stop: bool) -> tuple[bool, bool]:
        """Every rank steps only when all are ready; any rank's stop request stops all."""
        if self.world_size == 1:
            return ready, stop
        flags = torch.tensor([0 if ready else 1, 1 if stop else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags[0].item() == 0, flags[1].item() == 1

    def update_backlog(self) -> None:
        """Rank 0: the backlog gauge and the ledger gauges from one atomic ledger snapshot."""
        if self.consumer is not None and self.rank == 0:
            try:
                ledger = self.consumer.ledger() if hasattr(self.consumer, "ledger") else None
                if ledger is None:
                    self.metrics.backlog.set(self.consumer.backlog())
                    return
                self.metrics.backlog.set(ledger["pending"])
                for key, value in ledger.items():
                    if key != "balanced":
                        self.metrics.ledger.labels(key).set(value)
            except Exception as err:  # noqa: BLE001 - a metric must not stop training
                log.warning("backlog query failed: %s", err)

    def poll_and_step(self, block_ms: int | None = None, stop: bool = False) -> dict[str, Any] | None:
        """Read groups (up to this rank's share), and when every rank has its share, train one step,
        checkpoint when due, and acknowledge what the checkpoint covers. Returns the step's stats, or
        None when no step was taken (not enough groups yet, or ``stop``)."""
        if self.consumer is None:
            raise RuntimeError("no consumer: pass one to Learner(...) or call connect_bus()")
        if self._resume_commit:
            self._commit_resumed()
        self._drop_stale_buffered()
        need = self.groups_per_rank - len(self._buffer)
        if need > 0 and not stop:
            block = self.config.read_block_ms if block_ms is None else block_ms
            self._admit(self.consumer.read(max_groups=need, block_ms=block))
            self._sync_malformed()
        ready, stop_all = self._agree(len(self._buffer) >= self.groups_per_rank, stop)
        self._stop_agreed = stop_all
        if stop_all or not ready:
            self.update_backlog()
            return None
        batch, self._buffer = self._buffer[: self.groups_per_rank], self._buffer[self.groups_per_rank:]
        stats = self.train_on_groups([g for _, g in batch])
        for entry_id, group in batch:
            self._remember_trained(group.group_id)
            self._pending_ack.append(entry_id)
            self._pending_groups.append(group.group_id)
        if self.run_dir is None or self.config.checkpoint_every == 0:
            self._ack_pending()  # nothing to commit to: the step itself is the commit
        elif self.step % self.config.checkpoint_every == 0:
            self.save_checkpoint()
        self.update_backlog()
        return stats

    def run(self, max_steps: int | None = None, stop: Callable[[], bool] | None = None) -> int:
        """Poll and train until ``max_steps`` optimizer steps (default ``config.max_steps``; 0 = no
        limit) or until ``stop()`` returns True on any rank; then :meth:`finish`. Returns the step
        reached."""
        limit = self.config.max_steps if max_steps is None else max_steps
        while not (limit and self.step >= limit):
            self.poll_and_step(stop=bool(stop is not None and stop()))
            if self._stop_agreed:
                break
        self.finish()
        return self.step

    def finish(self) -> None:
        """Checkpoint what was trained since the last checkpoint (which acknowledges its entries);
        without checkpoints, acknowledge. Groups read but not trained stay pending (re-read later)."""
        if self.run_dir is not None and self.config.checkpoint_every:
            if self.step > 0 and self._last_checkpoint_step != self.step:
                self.save_checkpoint()
        else:
            self._ack_pending()

    def _remember_trained(self, group_id: str) -> None:
        self._trained_ids[group_id] = None
        self._trained_ids.move_to_end(group_id)
        while len(self._trained_ids) > self.config.dedup_window:
            self._trained_ids.popitem(last=False)

    def _ack_pending(self) -> None:
        """The trained entries are committed: record their group ids, then acknowledge them."""
        if self._pending_ack and self.run_dir is not None and (self.config.checkpoint_every == 0
                                                                or self._last_checkpoint_step == self.step):
            self._append_trained(self._pending_groups, self.step)
        if self._pending_ack and self.consumer is not None:
            self.consumer.ack(self._pending_ack, fate="trained")
            if self.config.trim_acknowledged and self.rank == 0 and hasattr(self.consumer, "trim_acknowledged"):
                try:  # keep Redis at the backlog's size (acknowledged entries are done with)
                    self.consumer.trim_acknowledged()
                except Exception as err:  # noqa: BLE001 - housekeeping must not stop training
                    log.warning("trimming acknowledged stream entries failed: %s", err)
        self._pending_ack, self._pending_groups = [], []

    @property
    def trained_groups_file(self) -> Path | None:
        """``RUN_DIR/trained_groups.txt``: ``group_id<TAB>step`` per committed trained group."""
        return None if self.run_dir is None else self.run_dir / TRAINED_GROUPS_FILE

    def _append_trained(self, group_ids: Sequence[str], step: int) -> None:
        if not group_ids or self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = "".join(f"{gid}\t{step}\n" for gid in group_ids).encode()
        fd = os.open(self.trained_groups_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # one write per call: lines of concurrent ranks do not interleave
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _commit_resumed(self) -> None:
        """After a resume: the restored checkpoint's trained entries are committed. Acknowledge them
        (a no-op for those acknowledged before the crash) and add missing trained_groups.txt lines."""
        interval, self._resume_commit = self._resume_commit, []
        path = self.trained_groups_file
        if path is not None:
            have = set()
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    have = {line.split("\t", 1)[0] for line in f if line.strip()}
            self._append_trained([g for _, g in interval if g not in have], self.step)
        self.consumer.ack([e for e, _ in interval], fate="trained")

    def close(self) -> None:
        """Leave the process group if this learner created it (barrier first: ZeRO-3 aborts otherwise)."""
        if self._owns_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self._owns_process_group = False
            # DeepSpeed caches a clone of the world group; a later learner in this process (a new group)
            # would otherwise be handed the destroyed one ("Group ... is not registered").
            from deepspeed.utils import groups as ds_groups

            ds_groups._WORLD_GROUP = None

    # ================================================================ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``run_dir/checkpoints/step_XXXXXX`` (every rank takes part), point ``latest`` at it,
        prune old ones, then acknowledge the entries it covers."""
        if self.run_dir is None:
            raise RuntimeError("no run_dir: checkpoints are off")
        t0 = time.perf_counter()
        folder = ckpt.checkpoints_dir(self.run_dir) / ckpt.step_name(self.step)
        if self.rank == 0:
            if folder.exists():  # a partial folder from a crashed attempt at this step
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        self._barrier()
        self.engine.save_checkpoint(str(folder), tag=ckpt.ENGINE_TAG, save_latest=False,
                                    exclude_frozen_parameters=self.is_lora)
        tensors, rng_meta = ckpt.rng_state()
        ckpt.save_tensors(folder / ckpt.rank_tensors(self.rank), tensors)
        ckpt.write_json_atomic(folder / ckpt.rank_json(self.rank), {
            "rank": self.rank,
            "counters": self.counters,
            "trained_group_ids": list(self._trained_ids),
            # the (entry, group) pairs this checkpoint commits: acked / recorded again after a crash
            "interval": [list(p) for p in zip(self._pending_ack, self._pending_groups)],
            "rng": rng_meta,
        })
        if self.rank == 0:
            ckpt.save_tensors(folder / ckpt.P_OLD_FILE, self.snapshot_state_dict("p_old"))
            if self.p_samp is not self.p_old:
                ckpt.save_tensors(folder / ckpt.P_SAMP_FILE, self.snapshot_state_dict("p_samp"))
            ckpt.write_json_atomic(folder / ckpt.STATE_FILE, {
                "format": ckpt.FORMAT_VERSION,
                "step": self.step,
                "p_samp_version": self.step,
                "world_size": self.world_size,
                "algorithm": self.alg,
                "lora": self.is_lora,
                "zero_stage": self.config.zero_stage,
                "groups_per_step": self.config.groups_per_step,
                "created_at": time.time(),
            })
        self._barrier()  # every rank's files are in place
        if self.rank == 0:
            ckpt.write_latest(self.run_dir, folder)
            ckpt.prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        self._barrier()  # `latest` names the new checkpoint: now the entries are committed
        self._last_checkpoint_step = self.step
        self._ack_pending()
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        return folder

    def resume(self, run_dir: str | Path | None = None) -> int | None:
        """Continue from the latest complete checkpoint of ``run_dir`` (default: this learner's):
        θ and the optimizer (DeepSpeed), p_old, p_samp, step/version, trained group ids, counters and
        RNG states; then publish p_samp at the restored version. Call before training. Returns the
        restored step, or None when there is no checkpoint (nothing changes). Unacknowledged entries
        come back from the stream by themselves (the consumer re-delivers its pending entries)."""
        run_dir = Path(run_dir) if run_dir is not None else self.run_dir
        if run_dir is None:
            raise ValueError("run_dir: expected a run folder to resume from")
        if self.step != 0:
            raise RuntimeError("resume() must be called before training")
        folder = ckpt.latest_checkpoint(run_dir)
        if folder is None:
            return None
        state = ckpt.read_json(folder / ckpt.STATE_FILE)
        for key, mine in (("algorithm", self.alg), ("lora", self.is_lora)):
            if state.get(key) != mine:
                raise ValueError(f"checkpoint {folder} has {key}={state.get(key)!r}, this learner {mine!r}")
        if self.config.zero_stage > 0 and state.get("world_size") != self.world_size:
            raise ValueError(f"checkpoint {folder} was written by {state.get('world_size')} ranks with ZeRO; "
                             f"this learner has {self.world_size}")
        load_path, _ = self.engine.load_checkpoint(str(folder), tag=ckpt.ENGINE_TAG,
                                                   load_module_strict=not self.is_lora)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {folder / ckpt.ENGINE_TAG}")
        step = int(state["step"])
        if self.engine.global_steps != step:
            raise RuntimeError(f"engine restored at step {self.engine.global_steps}, checkpoint says {step}")
        self._load_snapshot(folder / ckpt.P_OLD_FILE, self._old_params)
        if self.p_samp is not self.p_old:
            self._load_snapshot(folder / ckpt.P_SAMP_FILE, self._samp_params)
        trained: list[str] = []
        for path in sorted(folder.glob("rank_*.json")):  # union: any rank may see any group again
            trained += ckpt.read_json(path)["trained_group_ids"]
        for gid in trained:
            self._remember_trained(gid)
        mine_json = folder / ckpt.rank_json(self.rank)
        interval: list[tuple[str, str]] = []
        if mine_json.is_file():
            meta = ckpt.read_json(mine_json)
            self.counters.update(meta["counters"])
            interval = [(str(e), str(g)) for e, g in meta.get("interval", [])]
            ckpt.set_rng_state(ckpt.load_tensors(folder / ckpt.rank_tensors(self.rank)), meta["rng"])
        self.step = step
        self._last_checkpoint_step = step
        self._buffer, self._pending_ack, self._pending_groups = [], [], []
        self._resume_commit = interval
        if self.consumer is not None and interval:
            self._commit_resumed()
        self.metrics.policy_version.set(step)
        self.publish()
        log.info("learner rank %d resumed from %s (step %d)", self.rank, folder, step)
        return step

    def _load_snapshot(self, path: Path, params: list[Tensor]) -> None:
        tensors = ckpt.load_tensors(path)
        missing = [n for n in self._train_names if n not in tensors]
        if missing:
            raise ValueError(f"{path}: missing tensors {missing[:3]}")
        with torch.no_grad():
            for name, p in zip(self._train_names, params):
                src = tensors[name]
                if tuple(src.shape) != tuple(p.shape):
                    raise ValueError(f"{path}: {name} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
                p.copy_(src.to(p.device, p.dtype))
