"""The sampler: a plain class (the Ray actor in actors/ray_sampler.py is a thin shell over it).

One round: load a newer p_samp if the learner published one, wait while the stream backlog exceeds
``max_pending_groups`` (backpressure), take G prompts from its shard, generate K samples per prompt
with the Euler ODE sampler, or stochastic steps (``sampling.step_kind``: Flow-GRPO's SDE or DDIM's
η-step, optionally in pairs sharing the initial noise), decode, score every group with every reward,
and publish one Group per prompt to the Redis stream. With ``record_trajectory`` each sample of a
scored group also carries its trajectory (proto ``Trajectory``: states, σ grid, behaviour
log-probabilities, x̂0 predictions, seeds, step kind, pair id). A group whose reward failed
is published *masked* with the reason (the learner counts it and never trains on it); it is never
given a made-up score.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from diffrl.actors.config import SamplerConfig
from diffrl.actors.metrics import SamplerMetrics
from diffrl.actors.prompts import PromptSource
from diffrl.models.adapter import FlowModel
from diffrl.models.lora import LoraConfig, load_lora_weights
from diffrl.models.step_rewards import anchor_steps, steps_to_score
from diffrl.proto import experience_pb2
from diffrl.proto.codec import tensor_to_proto
from diffrl.proto.weight_sync import WeightSource
from diffrl.reward_servers.client import Group as RewardGroup
from diffrl.reward_servers.client import GroupScores

log = logging.getLogger(__name__)

STEP_KIND_PROTO = {"euler": experience_pb2.EULER, "flow_sde": experience_pb2.FLOW_SDE, "eta": experience_pb2.ETA}
"""models/sde.py's step kinds -> proto StepKind."""


class GroupScorer(Protocol):
    """What the sampler needs of the reward client (``SyncRewardClient`` fits)."""

    def score_groups(self, groups: Sequence[RewardGroup]) -> list[GroupScores]: ...


class GroupSink(Protocol):
    """Where groups go (``diffrl.proto.bus.ExperienceProducer`` fits)."""

    def publish(self, group: experience_pb2.Group) -> str: ...

    def backlog(self) -> int: ...


class ListSink:
    """A GroupSink that keeps the published groups in a list and has no backlog (in-process use:
    ``diffrl bench learner``, tests)."""

    def __init__(self):
        self.groups: list[experience_pb2.Group] = []

    def publish(self, group: experience_pb2.Group) -> str:
        self.groups.append(group)
        return str(len(self.groups))

    def backlog(self) -> int:
        return 0


@dataclass
class RoundResult:
    groups: int = 0
    masked: int = 0
    images: int = 0
    version: int = -1
    seconds: float = 0.0
    paused_seconds: float = 0.0
    reward_means: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def sample_seeds(seed: int, sampler_id: str, incarnation: str, round_index: int, n: int) -> list[int]:
    """Distinct 31-bit noise seeds per (sampler, incarnation, round); reproducible from the ids."""
    key = [seed, round_index, *np.frombuffer(f"{sampler_id}/{incarnation}".encode().ljust(32, b"\0")[:32],
                                             dtype=np.uint32).tolist()]
    return [int(s) & 0x7FFFFFFF for s in np.random.SeedSequence(key).generate_state(n, dtype=np.uint32)]


def trajectory_proto(traj, n: int, noise_seed: int, step_seed: int, step_kind: str, noise_level: float,
                     guidance_scale: float, pair_id: int = -1, dtype: str = "float32") -> experience_pb2.Trajectory:
    """The proto Trajectory of sample ``n`` of a ``SampledTrajectory`` (states and x̂0 stored as ``dtype``,
    float32 or float16; log-probs float32; σ float64)."""
    store = torch.float16 if dtype == "float16" else torch.float32
    return experience_pb2.Trajectory(
        states=tensor_to_proto(traj.states[n].to(store)), sigmas=tensor_to_proto(traj.sigmas.to(torch.float64)),
        log_probs=tensor_to_proto(traj.log_probs[n].float()), x0_preds=tensor_to_proto(traj.x0_preds[n].to(store)),
        noise_seed=noise_seed, step_seed=step_seed, step_kind=STEP_KIND_PROTO[step_kind], noise_level=noise_level,
        guidance_scale=guidance_scale, pair_id=pair_id, anchor_step=-1)


class MaskedRoundsError(RuntimeError):
    """A sampler gave up: ``sampler.max_masked_rounds`` rounds in a row had every group masked."""


class Sampler:
    def __init__(self, sampler_id: str, cfg: SamplerConfig, model: FlowModel, scorer: GroupScorer,
                 sink: GroupSink, prompts: PromptSource, weights: WeightSource | None = None,
                 metrics: SamplerMetrics | None = None, lora: LoraConfig | None = None):
        self.id = sampler_id
        self.cfg = cfg
        self.model = model
        self.scorer = scorer
        self.sink = sink
        self.prompts = prompts
        self.weights = weights
        self.metrics = metrics or SamplerMetrics(sampler_id)
        self.lora = lora or LoraConfig()  # must match the learner's when it trains LoRA adapters
        self.incarnation = uuid.uuid4().hex[:12]  # group ids stay unique across actor restarts
        self.version = 0  # p_samp version in use; 0 = the base model
        self.rounds = 0
        self.published = 0
        self.busy_seconds = 0.0  # sampling, decoding, scoring, publishing
        self.paused_seconds = 0.0  # backpressure
        self.masked_backoffs = 0  # pauses after all-masked rounds
        self.masked_backoff_seconds = 0.0
        self._next_backoff = cfg.masked_backoff_s
        self.masked_rounds_in_row = 0
        self.last_mask_reason = ""
        self._stop = threading.Event()
        self.metrics.version.set(self.version)

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ steps of a round
    def maybe_update_weights(self) -> bool:
        """Load the newest published p_samp if it is newer than ours."""
        if self.weights is None:
            return False
        update = self.weights.fetch_newer(self.version)
        if update is None:
            return False
        version, kind, tensors = update
        if kind == "full":
            self.model.transformer.load_state_dict(tensors, strict=True)
        elif kind == "lora":
            load_lora_weights(self.model.transformer, tensors, self.lora)
        else:
            raise ValueError(f"sampler {self.id}: unknown weight update kind {kind!r}")
        self.version = version
        self.metrics.version.set(version)
        self.metrics.weight_updates.inc()
        return True

    def wait_for_room(self) -> float:
        """Backpressure: block while the backlog exceeds max_pending_groups, loading newer p_samp
        versions meanwhile (the next round starts on the newest). Returns seconds paused."""
        start = time.perf_counter()
        while not self.stopped and self.sink.backlog() > self.cfg.max_pending_groups:
            self._stop.wait(self.cfg.backpressure_poll_s)
            self.maybe_update_weights()
        paused = time.perf_counter() - start
        self.metrics.backpressure.inc(paused)
        return paused

    def run_round(self) -> RoundResult:
        result = RoundResult()
        stages: dict[str, float] = {}
        t_round = time.perf_counter()

        result.paused_seconds = self.wait_for_room()
        if self.stopped:
            return result
        t = time.perf_counter()
        self.maybe_update_weights()  # after any pause: the learner has likely published since
        stages["weights"] = time.perf_counter() - t

        cfg, k = self.cfg, self.cfg.k
        items = self.prompts.take(cfg.groups_per_round)
        prompts = [item.prompt for item in items]
        flat_prompts = [p for p in prompts for _ in range(k)]
        noise_seeds, step_seeds = self.round_seeds(len(flat_prompts))
        version = self.version

        t = time.perf_counter()
        s = cfg.sampling
        traj = None
        if s.kind() == "euler" and not s.sigmas and not cfg.record_trajectory:
            x0 = self.model.sample(flat_prompts, noise_seeds, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                                   shift=s.shift, batch_size=s.batch_size)  # [G*K, C, H, W]
        else:
            traj = self.model.sample_trajectory(flat_prompts, noise_seeds, step_seeds,
                                                s.grid(self.model.num_train_timesteps), s.kind(), s.noise_level(),
                                                s.guidance_scale, batch_size=s.batch_size)
            x0 = traj.x0  # [G*K, C, H, W]
        stages["sample"] = time.perf_counter() - t

        t = time.perf_counter()
        images = self.model.to_uint8(self.model.decode(x0))  # [G*K, H, W, 3]
        plan, anchors = self.step_plan(traj, len(flat_prompts))
        step_images = self.decode_steps(traj, plan)  # per sample: its x̂0_j images in plan order
        stages["decode"] = time.perf_counter() - t

        t = time.perf_counter()
        metadata = [dict(item.metadata) for item in items]
        # one request per prompt: its K samples, then the scored x̂0_j of each sample (sampler.score_steps)
        requests = [RewardGroup(images=list(images[g * k:(g + 1) * k])
                                + [im for n in range(g * k, (g + 1) * k) for im in step_images[n]],
                                prompt=p, metadata=metadata[g]) for g, p in enumerate(prompts)]
        scores = self.scorer.score_groups(requests)
        stages["reward"] = time.perf_counter() - t

        t = time.perf_counter()
        x0_cpu = x0.detach().to("cpu", torch.float32)
        record = cfg.record_trajectory and traj is not None
        reward_sums: dict[str, list[float]] = {}
        for g, prompt in enumerate(prompts):
            group = experience_pb2.Group(
                group_id=f"{self.id}:{self.incarnation}:{self.rounds}:{g}",
                prompt=prompt, policy_version=version, sampler_id=self.id, created_at=time.time())
            group.prompt_metadata.update(metadata[g])
            outcome = scores[g]
            if not outcome.ok:
                group.masked = True
                group.mask_reason = self.last_mask_reason = str(outcome.failure)
                kind = getattr(outcome.failure, "kind", "error")
                self.metrics.masked.labels(self.id, kind).inc()
                result.masked += 1
            for i in range(k):
                n = g * k + i
                sample = group.samples.add(seed=noise_seeds[n])
                sample.latent.CopyFrom(tensor_to_proto(x0_cpu[n]))
                if record and outcome.ok:  # a masked group is never trained: no records
                    sample.trajectory.CopyFrom(self.trajectory_record(traj, n, noise_seeds[n], step_seeds[n],
                                                                      i // 2 if cfg.paired else -1))
                    self.record_step_rewards(sample.trajectory, outcome, plan, g, i, anchors)
                if outcome.ok:
                    for name, values in outcome.scores.items():
                        sample.rewards[name] = float(values[i])
                        reward_sums.setdefault(name, []).append(float(values[i]))
            self.sink.publish(group)
            self.metrics.groups.inc()
            result.groups += 1
        stages["publish"] = time.perf_counter() - t

        for name, values in reward_sums.items():
            result.reward_means[name] = float(np.mean(values))
            self.metrics.reward_mean.labels(self.id, name).set(result.reward_means[name])
        for stage, seconds in stages.items():
            self.metrics.stage_seconds.labels(self.id, stage).inc(seconds)
        result.images = len(flat_prompts)
        result.version = version
        result.seconds = time.perf_counter() - t_round
        result.stage_seconds = stages
        self.metrics.images.inc(result.images)
        self.metrics.round_seconds.observe(result.seconds)
        self.rounds += 1
        self.published += result.groups
        self.busy_seconds += result.seconds - result.paused_seconds
        self.paused_seconds += result.paused_seconds
        return result

    def round_seeds(self, n: int) -> tuple[list[int], list[int]]:
        """Initial-noise and step-noise seeds of this round's ``n`` samples (group-major). Paired: the two
        samples of a pair (positions 2p, 2p + 1 of a group) share the first one's noise seed."""
        cfg = self.cfg
        seeds = sample_seeds(cfg.seed, self.id, self.incarnation, self.rounds, 2 * n)
        noise, steps = seeds[:n], seeds[n:]
        if cfg.paired:
            noise = [noise[i - i % 2] for i in range(n)]  # k is even: pairs never straddle groups
        return noise, steps

    def step_plan(self, traj, n: int) -> tuple[list[list[int]], torch.Tensor | None]:
        """Per sample, the steps whose x̂0 is scored besides the sample (``sampler.score_steps``), and
        SDPO's anchors ``[n]`` (None unless score_steps is anchor)."""
        mode = self.cfg.score_steps
        if mode == "final" or traj is None:
            return [[] for _ in range(n)], None
        S = traj.x0_preds.shape[1]
        anchors = anchor_steps(traj.x0_preds, self.cfg.anchor_center)[0] if mode == "anchor" else None
        return steps_to_score(mode, anchors if anchors is not None else torch.zeros(n, dtype=torch.long), S), anchors

    def decode_steps(self, traj, plan: list[list[int]]) -> list[list[np.ndarray]]:
        """The planned x̂0_j of every sample decoded to uint8 images (one batch)."""
        picks = [(n, j) for n, steps in enumerate(plan) for j in steps]
        out: list[list[np.ndarray]] = [[] for _ in plan]
        if not picks:
            return out
        preds = torch.stack([traj.x0_preds[n, j] for n, j in picks]).to(self.model.device)  # [M, C, H, W]
        for (n, _), image in zip(picks, self.model.to_uint8(self.model.decode(preds))):
            out[n].append(image)
        return out

    def record_step_rewards(self, record: experience_pb2.Trajectory, outcome, plan: list[list[int]], g: int, i: int,
                            anchors: torch.Tensor | None) -> None:
        """Fill ``record.step_rewards`` of sample i of group g: the scored x̂0_j (its plan) and, at the
        last step, the sample's own reward; NaN elsewhere. Scores follow the request's order: the K
        samples, then each sample's planned steps."""
        if self.cfg.score_steps == "final":
            return
        k = self.cfg.k
        S = record.log_probs.shape[0]
        start = k + sum(len(plan[g * k + m]) for m in range(i))  # this sample's first step score
        steps = plan[g * k + i]
        for name, values in outcome.scores.items():
            r = torch.full((S,), float("nan"))
            for offset, j in enumerate(steps):
                r[j] = float(values[start + offset])
            r[S - 1] = float(values[i])  # the last step's x̂0 is the sample (η-step into σ = 0)
            record.step_rewards[name].CopyFrom(tensor_to_proto(r))
        record.anchor_step = int(anchors[g * k + i]) if anchors is not None else -1

    def trajectory_record(self, traj, n: int, noise_seed: int, step_seed: int, pair_id: int
                          ) -> experience_pb2.Trajectory:
        """Sample ``n``'s proto Trajectory (states and x̂0 in ``sampler.trajectory_dtype``)."""
        s = self.cfg.sampling
        return trajectory_proto(traj, n, noise_seed, step_seed, s.kind(), s.noise_level(), s.guidance_scale,
                                pair_id, self.cfg.trajectory_dtype)

    def backoff_after(self, result: RoundResult) -> float:
        """After a round whose groups were all masked (a reward is down), pause before sampling more
        (exponential, capped; reset by a round with a scored group). Returns seconds paused."""
        if result.groups == 0 or result.masked < result.groups or self.cfg.masked_backoff_s <= 0:
            if result.groups:
                self._next_backoff = self.cfg.masked_backoff_s
            return 0.0
        delay = self._next_backoff
        self._next_backoff = min(delay * 2, self.cfg.masked_backoff_max_s)
        log.warning("sampler %s: all %d groups of the round were masked; pausing %.1f s", self.id,
                    result.groups, delay)
        start = time.perf_counter()
        self._stop.wait(delay)
        paused = time.perf_counter() - start
        self.masked_backoffs += 1
        self.masked_backoff_seconds += paused
        self.metrics.masked_backoffs.inc()
        self.metrics.masked_backoff_seconds.inc(paused)
        return paused

    def check_progress(self, result: RoundResult) -> None:
        """Count rounds in a row whose groups were all masked; raise :class:`MaskedRoundsError` with the
        last reason once there are ``max_masked_rounds`` of them."""
        if result.groups == 0:
            return
        self.masked_rounds_in_row = self.masked_rounds_in_row + 1 if result.masked == result.groups else 0
        limit = self.cfg.max_masked_rounds
        if limit and self.masked_rounds_in_row >= limit:
            raise MaskedRoundsError(f"sampler {self.id}: every group of the last {self.masked_rounds_in_row} "
                                    f"rounds was masked; last reason: {self.last_mask_reason}")

    def run(self, max_rounds: int | None = None) -> int:
        """Sample until stopped (or ``max_rounds``). Returns the rounds done."""
        done = 0
        while not self.stopped and (max_rounds is None or done < max_rounds):
            result = self.run_round()
            self.check_progress(result)
            self.backoff_after(result)
            done += 1
        return done
