"""The networks of an algorithm's roles on one learner rank.

Every trainable role is a copy of the loaded denoiser (full fine-tune) or that denoiser plus LoRA
adapters, owned by its own DeepSpeed engine (ZeRO 0-3, gradient clipping, bf16 with fp32 master weights)
and AdamW optimizer; a role declared to start from the teacher (a few-step student's base, TDM-R1's fake
score and surrogate) copies the teacher's denoiser instead. Every EMA role is a frozen fp32 copy of its
source's structure whose trained tensors are blended towards the source after each optimizer step. A
frozen role is the loaded denoiser or the teacher's itself.
With LoRA every module shares the frozen base weights (one copy in memory; under ZeRO-3 a trainable
role gets its own copy because ZeRO-3 partitions every parameter of the engine's module), and the
snapshots differ only in their adapter tensors.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any

import torch
from torch import nn

from diffrl.learner.algorithms.base import EMA, Frozen, Role, Trainable, start_of
from diffrl.learner.ema import ema_update_

Tensor = torch.Tensor

_GATHER_BUCKET_NUMEL = 1 << 26  # ZeRO-3: parameters gathered at once for the snapshot EMAs


class LinearWarmup:
    """LR factor of the ``epoch``-th optimizer step (0-based) under a linear warmup over ``steps``
    optimizer steps: min(1, (epoch + 1) / steps). A callable object, so LambdaLR checkpoints it."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.steps) if self.steps > 0 else 1.0


def warmup_scheduler(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of a trainable role: linear warmup over ``steps`` optimizer steps (``learner.
    lr_warmup_steps``; step k uses lr·min(1, k/steps)), then constant. DeepSpeed steps it once per
    optimizer step and keeps its state in the engine checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(steps))


def shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the very same tensors."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


class TrainedNet:
    """One trainable role: its engine, and its trained parameters by name (gathered bucket-wise
    under ZeRO-3)."""

    def __init__(self, spec: Trainable, engine, zero3: bool):
        self.spec = spec
        self.engine = engine
        self.zero3 = zero3
        self.names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
        named = dict(engine.module.named_parameters())
        self.params = [named[n] for n in self.names]

    def gathered(self, params: list[Tensor]):
        if not self.zero3:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero import GatheredParameters

        return GatheredParameters(params, modifier_rank=None)

    def buckets(self) -> list[list[int]]:
        buckets, cur, size = [], [], 0
        for i, p in enumerate(self.params):
            n = int(getattr(p, "ds_numel", p.numel()))
            if cur and size + n > _GATHER_BUCKET_NUMEL:
                buckets.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        if cur:
            buckets.append(cur)
        return buckets

    def state_dict(self) -> dict[str, Tensor]:
        """CPU copies of the trained parameters, by name."""
        out = {}
        for idx in self.buckets():
            params = [self.params[i] for i in idx]
            with self.gathered(params):
                for i, p in zip(idx, params):
                    out[self.names[i]] = p.detach().to("cpu", copy=True)
        return out


class Snapshot:
    """One EMA role: a frozen module and the tensors of it that follow the source's trained ones."""

    def __init__(self, spec: EMA, module: nn.Module, source: TrainedNet):
        self.spec = spec
        self.module = module
        self.source = source
        named = dict(module.named_parameters())
        missing = [n for n in source.names if n not in named]
        if missing:
            raise RuntimeError(f"snapshot {spec.name} lacks {spec.source}'s parameters {missing[:3]}")
        self.params = [named[n] for n in source.names]

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in zip(self.source.names, self.params)}

    def load(self, tensors: dict[str, Tensor], where: str) -> None:
        missing = [n for n in self.source.names if n not in tensors]
        if missing:
            raise ValueError(f"{where}: missing tensors {missing[:3]}")
        with torch.no_grad():
            for name, p in zip(self.source.names, self.params):
                src = tensors[name]
                if tuple(src.shape) != tuple(p.shape):
                    raise ValueError(f"{where}: {name} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
                p.copy_(src.to(p.device, p.dtype))


class Networks:
    """Builds and holds the roles' networks (in the order the algorithm declares them)."""

    def __init__(self, roles: list[Role], base: nn.Module, config, deepspeed_config, lr_of,
                 teacher: nn.Module | None = None):
        """``base``: the loaded denoiser (frozen); ``deepspeed_config(spec)``: the engine config of a
        trainable role; ``lr_of(spec)``: its learning rate; ``teacher``: the teacher's denoiser (frozen),
        for roles that start from it (``init``/``weights`` = ``teacher``)."""
        self.config = config
        self.lora = config.lora.enabled
        self.base = base
        self.base.requires_grad_(False).eval()
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        wanting = [r.name for r in roles if start_of(r) == "teacher"]
        if wanting and teacher is None:
            raise ValueError(f"roles {wanting} start from the teacher, but no teacher was loaded (learner.teacher)")
        init_of = {r.name: start_of(r) for r in roles}
        self.trained: dict[str, TrainedNet] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.frozen: dict[str, nn.Module] = {}
        for spec in roles:
            if isinstance(spec, Trainable):
                module = self._trainable_module(self._start(spec.init))
                self.trained[spec.name] = TrainedNet(
                    spec, self._engine(module, deepspeed_config(spec), lr_of(spec), spec.betas), config.zero_stage == 3)
            elif isinstance(spec, EMA):
                start = self._start(init_of[spec.source])
                self.snapshots[spec.name] = Snapshot(spec, self._snapshot_module(start), self.trained[spec.source])
            elif isinstance(spec, Frozen):
                self.frozen[spec.name] = self._start(spec.weights)
        self.blend({name: 0.0 for name in self.snapshots})  # exact copies of their sources

    # ------------------------------------------------------------ construction
    def _inject_lora(self, module: nn.Module) -> nn.Module:
        from diffrl.models.lora import inject_lora

        return inject_lora(module, self.config.lora)

    def _start(self, init: str) -> nn.Module:
        """The frozen denoiser a role starts from (``model``: the loaded one, ``teacher``)."""
        return self.teacher if init == "teacher" else self.base

    def _trainable_module(self, start: nn.Module) -> nn.Module:
        if self.lora:
            base = copy.deepcopy(start) if self.config.zero_stage == 3 else shared_copy(start)
            module = self._inject_lora(base)
            for n, p in module.named_parameters():
                p.requires_grad_(".lora_" in n)
        else:
            module = copy.deepcopy(start)
            module.requires_grad_(True)
        module.train()
        if self.config.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        return module

    def _engine(self, module: nn.Module, ds_config: dict[str, Any], lr: float, betas: tuple[float, float] | None):
        import deepspeed

        cfg = self.config
        params = [p for p in module.parameters() if p.requires_grad]
        # A client torch AdamW: no native op to compile (FusedAdam/CPUAdam) on CPU machines.
        optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas or cfg.betas), eps=cfg.adam_eps,
                                      weight_decay=cfg.weight_decay)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                               lr_scheduler=warmup_scheduler(optimizer, cfg.lr_warmup_steps))
        return engine

    def _snapshot_module(self, start: nn.Module) -> nn.Module:
        """A frozen fp32 copy of a trainable role's structure (LoRA: sharing the base weights of the
        denoiser the role started from)."""
        if self.lora:
            snap = self._inject_lora(shared_copy(start))
            for n, p in snap.named_parameters():
                p.requires_grad_(False)
                if ".lora_" in n:
                    p.data = p.data.to(torch.float32)  # adapters only: the base is shared
        else:
            snap = copy.deepcopy(start).to(torch.float32)
            snap.requires_grad_(False)
        return snap.eval()

    # ------------------------------------------------------------ use
    def module(self, role: str):
        """What a forward pass takes as ``transformer=``: a trainable role's engine, a snapshot's or
        the frozen base's module."""
        if role in self.trained:
            return self.trained[role].engine
        if role in self.snapshots:
            return self.snapshots[role].module
        if role in self.frozen:
            return self.frozen[role]
        raise KeyError(f"no role {role!r} (roles: {self.names()})")

    def names(self) -> list[str]:
        return [*self.trained, *self.snapshots, *self.frozen]

    def blend(self, decays: dict[str, float]) -> None:
        """snap ← d·snap + (1 − d)·source for each snapshot role in ``decays``; sources gathered
        bucket-wise under ZeRO-3."""
        for source_name, source in self.trained.items():
            targets = [(self.snapshots[n], d) for n, d in decays.items() if self.snapshots[n].spec.source == source_name]
            if not targets:
                continue
            for idx in source.buckets():
                theta = [source.params[i] for i in idx]
                with source.gathered(theta):
                    for snap, d in targets:
                        ema_update_([snap.params[i] for i in idx], theta, d)
