"""Configuration of the sampler actors."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffrl.config import require
from diffrl.models.config import SamplingConfig
from diffrl.models.step_rewards import SCORE_STEPS


@dataclass
class SamplerConfig:
    num_samplers: int = 2
    """Sampler actors (each holds its own copy of p_samp)."""
    k: int = 8
    """Samples per prompt: the size of a group (K)."""
    groups_per_round: int = 4
    """Prompts sampled together in one batched ODE solve (K x this images per forward)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampler settings for p_samp (CRD: the ODE, CFG 1.0, few steps; GRPO: the SDE,
    sampling.sde_noise_level > 0)."""
    record_trajectory: bool = False
    """Record in each Sample its trajectory (proto Trajectory): the states x_0..x_S, the σ grid, the
    behaviour log-probabilities of the steps, the predicted clean states x̂0_j, the initial-noise and
    step-noise seeds, the step kind and the pair id (~2S+1 latents per sample). Required by algorithms
    that train on steps (learner.algorithm=grpo needs sampling.step_kind flow_sde)."""
    paired: bool = False
    """Sample each group as K/2 pairs whose two samples share the initial noise and differ in the step
    noise (SDPO's dual trajectories). Needs an even k and a stochastic step kind."""
    trajectory_dtype: str = "float32"
    """Storage dtype of the recorded states and x̂0 predictions: float32, or float16 (half the Redis
    bytes; log-probs and σ stay float32/float64)."""
    score_steps: str = "final"
    """Which images the rewards score: final (each sample), anchor (also each sample's predicted clean
    state x̂0 at the first step and at SDPO's anchor step, the one least like the first and the last),
    all (also x̂0 at every step). The scores go into the trajectory record's step_rewards (needs
    record_trajectory); each adds a decode and a reward call per image."""
    anchor_center: bool = False
    """With score_steps=anchor: centre each x̂0 before the cosine similarities of the anchor rule (on
    near-white images the raw cosine is dominated by the background)."""
    max_pending_groups: int = 32
    """Backpressure: a sampler waits while the stream holds more unconsumed groups than this."""
    backpressure_poll_s: float = 0.2
    """How often a paused sampler looks at the backlog again, seconds."""
    masked_backoff_s: float = 1.0
    """Pause after a round whose groups were all masked (a reward is down), seconds; it doubles with
    each such round in a row up to masked_backoff_max_s and resets after a round with a scored group
    (0 = no pause). Counted in diffrl_sampler_masked_backoff_seconds_total."""
    masked_backoff_max_s: float = 30.0
    """Longest pause after all-masked rounds, seconds."""
    max_masked_rounds: int = 20
    """A sampler gives up after this many rounds in a row whose groups were all masked (every prompt
    refused, or a reward down through every retry and backoff), with the last reason; when every
    sampler has given up the job fails with that reason instead of waiting forever (0 = never)."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for each sampler actor."""
    num_gpus: float = 0.0
    """GPUs Ray reserves for each sampler actor (fractions share a GPU)."""
    torch_threads: int = 1
    """Torch intra-op threads inside each sampler (Ray sets 1 for actors with num_cpus <= 1)."""
    max_restarts: int = 3
    """Times Ray restarts a crashed sampler actor."""
    seed: int = 0
    """Seed of the prompt order and the per-sample noise seeds."""
    metrics_port: int = 0
    """Port of each sampler's Prometheus /metrics endpoint (0: a free port; -1: none)."""

    def validate(self) -> None:
        require(self.num_samplers >= 1, "num_samplers", "an int >= 1", self.num_samplers)
        require(self.k >= 2, "k", "an int >= 2 (centering needs at least two samples per prompt)", self.k)
        require(self.groups_per_round >= 1, "groups_per_round", "an int >= 1", self.groups_per_round)
        require(self.max_pending_groups >= 1, "max_pending_groups", "an int >= 1", self.max_pending_groups)
        require(self.backpressure_poll_s > 0, "backpressure_poll_s", "seconds > 0")
        require(self.masked_backoff_s >= 0, "masked_backoff_s", "seconds >= 0", self.masked_backoff_s)
        require(self.masked_backoff_max_s >= self.masked_backoff_s, "masked_backoff_max_s",
                "seconds >= masked_backoff_s", self.masked_backoff_max_s)
        require(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus", "non-negative resources")
        require(self.max_masked_rounds >= 0, "max_masked_rounds", "an int >= 0 (0 = never give up)",
                self.max_masked_rounds)
        require(self.torch_threads >= 1, "torch_threads", "an int >= 1", self.torch_threads)
        require(self.max_restarts >= -1, "max_restarts", "an int >= -1 (-1: forever)")
        require(self.metrics_port >= -1, "metrics_port", "a port, 0 or -1")
        require(self.score_steps in SCORE_STEPS, "score_steps", f"one of {SCORE_STEPS}", self.score_steps)
        require(self.score_steps == "final" or self.record_trajectory, "record_trajectory",
                f"true when score_steps={self.score_steps} (step rewards live in the trajectory record)",
                self.record_trajectory)
        require(self.trajectory_dtype in ("float32", "float16"), "trajectory_dtype", "float32|float16",
                self.trajectory_dtype)
        require(not self.paired or self.k % 2 == 0, "k", "an even int when paired is true (K/2 pairs)", self.k)
        require(not self.paired or self.sampling.kind() != "euler", "sampling.step_kind",
                "a stochastic kind (flow_sde or eta) when paired is true (Euler pairs would be identical)",
                self.sampling.step_kind)
