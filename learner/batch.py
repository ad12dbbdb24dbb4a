"""Experience decoding: the groups a learner step trains on, checked and turned into tensors once.

A group is trainable when it has >= 2 samples, each with a floating-point latent of the model's shape,
finite rewards (every name in ``learner.reward_weights``) and, for an algorithm that trains on
trajectories, a well-formed trajectory record (proto ``Trajectory``, written by samplers with
``sampler.record_trajectory``) of a step kind the algorithm takes (``TrajectoryNeeds``), in pairs when
it needs pairs. :func:`group_problem` says why one is not; :func:`decode` builds the
:class:`ExperienceBatch`, zero-padding groups with fewer than K samples (``mask`` marks the real ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from diffrl.models.sde import STEP_KINDS
from diffrl.proto import experience_pb2
from diffrl.proto.codec import tensor_from_proto

Tensor = torch.Tensor
Group = experience_pb2.Group

FLOAT_WIRE = ("float32", "float16", "bfloat16", "float64")
STEP_KIND_NAMES = {experience_pb2.EULER: "euler", experience_pb2.FLOW_SDE: "flow_sde", experience_pb2.ETA: "eta"}
"""proto StepKind -> models/sde.py's step kind."""


@dataclass(frozen=True)
class TrajectoryNeeds:
    """What an algorithm that trains on trajectories (``record = "trajectory"``) needs of them; the
    recipe is checked against it when it loads and every group when it arrives (a group that lacks it
    is dropped as invalid and counted)."""

    step_kinds: tuple[str, ...] = STEP_KINDS
    """Step kinds it can train on (models/sde.py ``STEP_KINDS``)."""
    paired: bool = False
    """Groups of K/2 pairs that share the initial noise (``sampler.paired``)."""


@dataclass
class Trajectory:
    """The samplers' per-step records (S steps), decoded for a batch."""

    states: Tensor
    """``[G, K, S + 1, C, H, W]`` float32: x at σ_0..σ_S (x_S is the sample's latent)."""
    log_probs: Tensor
    """``[G, K, S]`` float32: log p(x_{j+1} | x_j) under the sampling policy, as recorded."""
    sigmas: Tensor
    """``[S + 1]`` float64: the noise levels σ_0 = 1 .. σ_S = 0 (of the first sample)."""
    x0_preds: Tensor | None = None
    """``[G, K, S, C, H, W]`` float32: the sampler's x̂0_j = x_j − σ_j·v_j (decoded batches always have it)."""
    pair_ids: Tensor | None = None
    """``[G, K]`` int64: the pair of each sample (-1: unpaired or padding)."""
    noise_seeds: Tensor | None = None
    """``[G, K]`` int64: initial-noise seeds."""
    step_seeds: Tensor | None = None
    """``[G, K]`` int64: step-noise seeds."""
    step_rewards: Tensor | None = None
    """``[G, K, S]`` float64: the trained reward (``learner.reward_weights``) of each x̂0_j the samplers
    scored (``sampler.score_steps``), NaN where unscored; None when no sample has step rewards."""
    anchors: Tensor | None = None
    """``[G, K]`` int64: SDPO's anchor step of each sample (-1: none)."""

    @property
    def latents(self) -> Tensor:
        """The states (the name GRPO's code uses)."""
        return self.states


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


def trajectory_tensor(sample, field: str) -> Tensor:
    """A field (``states``, ``sigmas``, ``log_probs``, ``x0_preds``) of a sample's trajectory record."""
    return tensor_from_proto(getattr(sample.trajectory, field), what=f"trajectory.{field}")


def reward_of(sample, weights: Mapping[str, float]) -> float:
    """The trained reward: Σ weight·reward over ``weights``, or the sum of every reward when empty."""
    if weights:
        return float(sum(w * sample.rewards[k] for k, w in weights.items()))
    return float(sum(sample.rewards.values()))


def trajectory_problem(sample, latent_shape: Sequence[int], needs: TrajectoryNeeds | None = None) -> str | None:
    """Why a sample's trajectory record is unusable (None when it is fine)."""
    hint = "needs samplers with sampler.record_trajectory=true"
    if not sample.HasField("trajectory"):
        return f"no trajectory record ({hint})"
    t = sample.trajectory
    sigma_shape = tuple(t.sigmas.shape)
    S = sigma_shape[0] - 1 if len(sigma_shape) == 1 else -1
    if S < 1:
        return f"trajectory.sigmas shape {sigma_shape}, expected [S + 1]"
    want = {"states": (S + 1, *latent_shape), "log_probs": (S,), "x0_preds": (S, *latent_shape)}
    for name, shape in want.items():
        have = getattr(t, name)
        if tuple(have.shape) != shape:
            return f"trajectory.{name} shape {tuple(have.shape)}, expected {shape} ({S} recorded steps)"
        if have.dtype not in FLOAT_WIRE:
            return f"trajectory.{name} dtype {have.dtype!r} is not floating point"
    for name, r in t.step_rewards.items():
        if tuple(r.shape) != (S,):
            return f"trajectory.step_rewards[{name!r}] shape {tuple(r.shape)}, expected ({S},)"
    kind = STEP_KIND_NAMES.get(t.step_kind)
    if kind is None:
        return f"trajectory.step_kind {t.step_kind} is not a known step kind"
    if needs is not None and kind not in needs.step_kinds:
        return f"sampled with {kind} steps; the algorithm trains on {', '.join(needs.step_kinds)} steps"
    if not bool(torch.isfinite(trajectory_tensor(sample, "log_probs")).all()):
        return "non-finite recorded log-probs"
    return None


def pairs_problem(group: Group) -> str | None:
    """Why a group is not K/2 pairs sharing their initial noise (None when it is)."""
    by_pair: dict[int, list] = {}
    for s in group.samples:
        by_pair.setdefault(int(s.trajectory.pair_id), []).append(s)
    if -1 in by_pair or len(group.samples) % 2:
        return "not sampled in pairs (needs sampler.paired=true)"
    for pid, members in by_pair.items():
        if len(members) != 2:
            return f"pair {pid} has {len(members)} samples, expected 2"
        a, b = members
        if a.trajectory.noise_seed != b.trajectory.noise_seed or a.trajectory.step_seed == b.trajectory.step_seed:
            return f"pair {pid}: its samples must share the noise seed and differ in the step seed"
    return None


def group_problem(group: Group, latent_shape: Sequence[int], reward_weights: Mapping[str, float],
                  record: str, sample_problem=None, needs: TrajectoryNeeds | None = None) -> str | None:
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
        problem = trajectory_problem(s, shape, needs) if record == "trajectory" else None
        if problem is None and sample_problem is not None:
            problem = sample_problem(s)
        if problem is not None:
            return f"sample {i}: {problem}"
    if record == "trajectory" and needs is not None and needs.paired:
        return pairs_problem(group)
    return None


def decode(groups: Sequence[Group], latent_shape: Sequence[int], reward_weights: Mapping[str, float],
           record: str, version: int, sample_problem=None, needs: TrajectoryNeeds | None = None) -> ExperienceBatch:
    """Check and decode ``groups`` (raises ValueError on a group that cannot be trained)."""
    G = len(groups)
    K = max(len(g.samples) for g in groups)
    C, H, W = latent_shape
    x0 = torch.zeros(G, K, C, H, W, dtype=torch.float32)  # [G, K, C, H, W]
    rewards = torch.zeros(G, K, dtype=torch.float64)  # [G, K]
    mask = torch.zeros(G, K, dtype=torch.bool)  # [G, K]
    for gi, g in enumerate(groups):
        problem = group_problem(g, latent_shape, reward_weights, record, sample_problem, needs)
        if problem is not None:
            raise ValueError(f"group {g.group_id!r} cannot be trained: {problem}")
        if g.masked:
            raise ValueError(f"group {g.group_id!r} is masked ({g.mask_reason}); it must not be trained")
        for ki, s in enumerate(g.samples):
            x0[gi, ki] = tensor_from_proto(s.latent, what="latent").to(torch.float32)
            rewards[gi, ki] = reward_of(s, reward_weights)
            mask[gi, ki] = True
    trajectory = _decode_trajectory(groups, K, latent_shape, reward_weights) if record == "trajectory" else None
    return ExperienceBatch(groups=list(groups), prompts=[g.prompt for g in groups], x0=x0, rewards=rewards,
                           mask=mask, staleness=[max(0, version - int(g.policy_version)) for g in groups],
                           trajectory=trajectory)


def _step_rewards(record, S: int, weights: Mapping[str, float]) -> Tensor:
    """``[S]`` float64: Σ weight·step_rewards[name] (every reward when ``weights`` is empty); NaN where
    any of them is unscored or missing."""
    names = list(weights) or list(record.step_rewards)
    out = torch.zeros(S, dtype=torch.float64)
    for name in names:
        if name not in record.step_rewards:
            return torch.full((S,), float("nan"), dtype=torch.float64)
        r = tensor_from_proto(record.step_rewards[name], what=f"trajectory.step_rewards[{name!r}]").double()
        out = out + (weights.get(name, 1.0) if weights else 1.0) * r
    return out


def _decode_trajectory(groups: Sequence[Group], K: int, latent_shape: Sequence[int],
                       reward_weights: Mapping[str, float] | None = None) -> Trajectory:
    sigmas = trajectory_tensor(groups[0].samples[0], "sigmas").to(torch.float64)  # [S + 1]
    S = len(sigmas) - 1
    G = len(groups)
    states = torch.zeros(G, K, S + 1, *latent_shape, dtype=torch.float32)
    x0_preds = torch.zeros(G, K, S, *latent_shape, dtype=torch.float32)
    log_probs = torch.zeros(G, K, S, dtype=torch.float32)
    ids = {name: torch.full((G, K), -1, dtype=torch.int64)
           for name in ("pair_id", "noise_seed", "step_seed", "anchor_step")}
    scored = any(len(s.trajectory.step_rewards) for g in groups for s in g.samples)
    step_rewards = torch.full((G, K, S), float("nan"), dtype=torch.float64) if scored else None
    for gi, g in enumerate(groups):
        for ki, s in enumerate(g.samples):
            if tuple(s.trajectory.sigmas.shape) != (S + 1,):
                raise ValueError(f"group {g.group_id!r}: sample {ki} has another number of recorded steps")
            states[gi, ki] = trajectory_tensor(s, "states").float()
            x0_preds[gi, ki] = trajectory_tensor(s, "x0_preds").float()
            log_probs[gi, ki] = trajectory_tensor(s, "log_probs").float()
            for name, t in ids.items():
                t[gi, ki] = int(getattr(s.trajectory, name))
            if step_rewards is not None:
                step_rewards[gi, ki] = _step_rewards(s.trajectory, S, reward_weights or {})
    return Trajectory(states=states, log_probs=log_probs, x0_preds=x0_preds, sigmas=sigmas,
                      pair_ids=ids["pair_id"], noise_seeds=ids["noise_seed"], step_seeds=ids["step_seed"],
                      step_rewards=step_rewards, anchors=ids["anchor_step"] if scored else None)
