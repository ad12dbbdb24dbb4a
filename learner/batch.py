"""Experience decoding: the groups a learner step trains on, checked and turned into tensors once.

A group is trainable when it has >= 2 samples, each with a floating-point latent of the model's shape,
finite rewards (every name in ``learner.reward_weights``) and, for an algorithm that trains on
trajectories, a well-formed trajectory record (the keys of ``diffrl.models.sde``, written by samplers
with ``sampler.record_log_probs``). :func:`group_problem` says why one is not; :func:`decode` builds the
:class:`ExperienceBatch`, zero-padding groups with fewer than K samples (``mask`` marks the real ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from diffrl.models.sde import (
    EXTRA_GUIDANCE_SCALE,
    EXTRA_LATENTS,
    EXTRA_LOG_PROBS,
    EXTRA_NOISE_LEVEL,
    EXTRA_SIGMAS,
)
from diffrl.proto import experience_pb2
from diffrl.proto.codec import tensor_from_proto

Tensor = torch.Tensor
Group = experience_pb2.Group

FLOAT_WIRE = ("float32", "float16", "bfloat16", "float64")
_TRAJECTORY_KEYS = {"latents": EXTRA_LATENTS, "log_probs": EXTRA_LOG_PROBS, "sigmas": EXTRA_SIGMAS}


@dataclass
class Trajectory:
    """The samplers' per-step records (S denoising steps)."""

    latents: Tensor
    """``[G, K, S + 1, C, H, W]`` float32: x at σ_0..σ_S (x_S is the sample's latent)."""
    log_probs: Tensor
    """``[G, K, S]`` float32: log p(x_{j+1} | x_j) under the sampling policy, as recorded."""
    sigmas: Tensor
    """``[S + 1]`` float64: the noise levels σ_0 = 1 .. σ_S = 0 (of the first sample)."""


@dataclass
class ExperienceBatch:
    """This rank's groups of one learner step, decoded (CPU tensors; G groups, K = the largest group)."""

    groups: list[Group]
    prompts: list[str]
    x0: Tensor
    """``[G, K, C, H, W]`` float32 final latents (zeros where ``mask`` is False)."""
    rewards: Tensor
    """``[G, K]`` float64 trained reward (weighted sum per ``learner.reward_weights``)."""
    mask: Tensor
    """``[G, K]`` bool, True for real samples."""
    staleness: list[int]
    """Per group: versions between its sampling policy and the current one."""
    trajectory: Trajectory | None = None
    """The per-step records, for algorithms with ``record = "trajectory"``."""

    @property
    def padded(self) -> bool:
        """Whether any group has fewer than K samples (losses then take ``mask``)."""
        return not bool(self.mask.all())

    @property
    def n_valid(self) -> float:
        """Real samples in the batch."""
        return float(self.mask.sum())


def extra_tensor(sample, key: str) -> Tensor:
    """A sample's record ``key`` (a ``Trajectory`` field name or a ``diffrl.models.sde`` key) as a tensor."""
    key = _TRAJECTORY_KEYS.get(key, key)
    return tensor_from_proto(sample.extras[key], what=key)


def reward_of(sample, weights: Mapping[str, float]) -> float:
    """The trained reward: Σ weight·reward over ``weights``, or the sum of every reward when empty."""
    if weights:
        return float(sum(w * sample.rewards[k] for k, w in weights.items()))
    return float(sum(sample.rewards.values()))


def trajectory_problem(sample, latent_shape: Sequence[int]) -> str | None:
    """Why a sample's trajectory record is unusable (None when it is fine)."""
    if EXTRA_SIGMAS not in sample.extras:
        return f"no extras[{EXTRA_SIGMAS!r}] (needs samplers with sampler.record_log_probs=true)"
    sigma_shape = tuple(sample.extras[EXTRA_SIGMAS].shape)
    S = sigma_shape[0] - 1 if len(sigma_shape) == 1 else -1
    if S < 1:
        return f"extras[{EXTRA_SIGMAS!r}] shape {tuple(sample.extras[EXTRA_SIGMAS].shape)}, expected [S + 1]"
    want = {EXTRA_LATENTS: (S + 1, *latent_shape), EXTRA_LOG_PROBS: (S,), EXTRA_SIGMAS: (S + 1,),
            EXTRA_NOISE_LEVEL: (), EXTRA_GUIDANCE_SCALE: ()}
    for key, shape in want.items():
        if key not in sample.extras:
            return f"no extras[{key!r}] (needs samplers with sampler.record_log_probs=true)"
        t = sample.extras[key]
        if tuple(t.shape) != shape:
            return f"extras[{key!r}] shape {tuple(t.shape)}, expected {shape} ({S} recorded steps)"
        if t.dtype not in FLOAT_WIRE:
            return f"extras[{key!r}] dtype {t.dtype!r} is not floating point"
    if not bool(torch.isfinite(extra_tensor(sample, "log_probs")).all()):
        return "non-finite recorded log-probs"
    return None


def group_problem(group: Group, latent_shape: Sequence[int], reward_weights: Mapping[str, float],
                  record: str, sample_problem=None) -> str | None:
    """Why ``group`` cannot be trained (None when it can). Masked groups are not checked here.
    ``sample_problem(sample)``: the algorithm's own check of one sample (its record's settings)."""
    if len(group.samples) < 2:
        return f"{len(group.samples)} samples (need >= 2 to center)"
    shape = tuple(latent_shape)
    for i, s in enumerate(group.samples):
        if not s.HasField("latent") or tuple(s.latent.shape) != shape:
            return f"sample {i}: latent shape {tuple(s.latent.shape)}, expected {shape}"
        if s.latent.dtype not in FLOAT_WIRE:
            return f"sample {i}: latent dtype {s.latent.dtype!r} is not floating point"
        if not s.rewards:
            return f"sample {i}: no rewards"
        missing = [k for k in reward_weights if k not in s.rewards]
        if missing:
            return f"sample {i}: no reward {missing[0]!r}"
        if not all(math.isfinite(v) for v in s.rewards.values()):
            return f"sample {i}: non-finite reward"
        problem = trajectory_problem(s, shape) if record == "trajectory" else None
        if problem is None and sample_problem is not None:
            problem = sample_problem(s)
        if problem is not None:
            return f"sample {i}: {problem}"
    return None


def decode(groups: Sequence[Group], latent_shape: Sequence[int], reward_weights: Mapping[str, float],
           record: str, version: int, sample_problem=None) -> ExperienceBatch:
    """Check and decode ``groups`` (raises ValueError on a group that cannot be trained)."""
    G = len(groups)
    K = max(len(g.samples) for g in groups)
    C, H, W = latent_shape
    x0 = torch.zeros(G, K, C, H, W, dtype=torch.float32)  # [G, K, C, H, W]
    rewards = torch.zeros(G, K, dtype=torch.float64)  # [G, K]
    mask = torch.zeros(G, K, dtype=torch.bool)  # [G, K]
    for gi, g in enumerate(groups):
        problem = group_problem(g, latent_shape, reward_weights, record, sample_problem)
        if problem is not None:
            raise ValueError(f"group {g.group_id!r} cannot be trained: {problem}")
        if g.masked:
            raise ValueError(f"group {g.group_id!r} is masked ({g.mask_reason}); it must not be trained")
        for ki, s in enumerate(g.samples):
            x0[gi, ki] = tensor_from_proto(s.latent, what="latent").to(torch.float32)
            rewards[gi, ki] = reward_of(s, reward_weights)
            mask[gi, ki] = True
    trajectory = _decode_trajectory(groups, K, latent_shape) if record == "trajectory" else None
    return ExperienceBatch(groups=list(groups), prompts=[g.prompt for g in groups], x0=x0, rewards=rewards,
                           mask=mask, staleness=[max(0, version - int(g.policy_version)) for g in groups],
                           trajectory=trajectory)


def _decode_trajectory(groups: Sequence[Group], K: int, latent_shape: Sequence[int]) -> Trajectory:
    sigmas = extra_tensor(groups[0].samples[0], "sigmas").to(torch.float64)  # [S + 1]
    S = len(sigmas) - 1
    G = len(groups)
    latents = torch.zeros(G, K, S + 1, *latent_shape, dtype=torch.float32)
    log_probs = torch.zeros(G, K, S, dtype=torch.float32)
    for gi, g in enumerate(groups):
        for ki, s in enumerate(g.samples):
            if len(s.extras[EXTRA_SIGMAS].shape) != 1 or s.extras[EXTRA_SIGMAS].shape[0] != S + 1:
                raise ValueError(f"group {g.group_id!r}: sample {ki} has another number of recorded steps")
            latents[gi, ki] = extra_tensor(s, "latents").float()
            log_probs[gi, ki] = extra_tensor(s, "log_probs").float()
    return Trajectory(latents=latents, log_probs=log_probs, sigmas=sigmas)
