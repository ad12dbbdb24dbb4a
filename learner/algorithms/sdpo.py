"""SDPO: stepwise dense-reward difference learning for few-step students (Zhang et al., "Aligning
Few-Step Diffusion Models with Dense Reward Difference Learning", arXiv 2411.11727; public code
ZiyiZhang27/sdpo, scripts/train_sdpo.py, config/base_sdpo.py and
sdpo_pytorch/diffusers_patch/pipeline_with_logprob_sdpo.py).

The samplers draw paired stochastic trajectories (two per initial noise, DDIM's η-step in flow form,
``sampler.paired``) and score each sample plus predicted clean states x̂0_j (``sampler.score_steps``:
SDPO's first/anchor/last rule, or every step). Per step the learner builds dense rewards (interpolated
by latent similarity, scored steps overwritten), discounted returns before any normalization,
per-(prompt, step) advantages, and regresses the difference of the pair's log-ratios onto the
difference of their clipped advantages, with temporal weights and the clamped variant; every pair's
steps are visited in its own random order, one optimizer step per time slot. p_samp = θ (published
after every learner step); the recorded behaviour log-probs make bounded staleness correct.

Deviations (docs/algorithms.md, "SDPO"): per-(prompt, step) statistics over the group instead of a
32-entry buffer across epochs (a streaming learner sees a prompt's K samples together); the last
step into σ = 0 is deterministic for the flow η-step and is not trained (its log-prob does not exist;
the public DDIM keeps a tiny variance there); one optimizer step per time slot over the whole batch
(the public code's ``train.batch_size`` minibatches of one epoch collapse into one per slot).

Notation: a trajectory of S steps j = 0 (noisiest) .. S − 1, its predicted clean states x̂0_j, the
rewards R of three scored predictions (the first, the anchor a, the last), the dense rewards r_j, the
returns G_j, advantages A_j. Two trajectories τ1, τ2 of a pair share the initial noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffrl.config import require
from diffrl.learner.algorithms.base import EMA, Algorithm, StepContext, StepResult, Trainable, register
from diffrl.learner.batch import TrajectoryNeeds, trajectory_tensor
from diffrl.models.sde import eta_step_mean_std, eta_step_std, gaussian_log_prob, sde_sigmas

# the anchor rule runs in the samplers (which step to score); models/ holds it for both sides
from diffrl.models.step_rewards import anchor_steps, cosine_to  # noqa: F401  (re-exported)

Tensor = torch.Tensor


def dense_rewards(scored: Tensor, anchor: Tensor, sim_first: Tensor, sim_anchor: Tensor, sim_last: Tensor
                  ) -> Tensor:
    """Dense per-step rewards from three scored predictions (train_sdpo.py, "compute dense rewards"):

        r_j = (R_first·s^first_j + R_anchor·s^anchor_j + R_last·s^last_j) / (s^first_j + s^anchor_j + s^last_j)

    then the scored steps are overwritten with their true rewards: r_0 = R_first, r_{S−1} = R_last,
    r_a = R_anchor (in that order, so an anchor at 0 or S − 1 keeps the anchor's reward).
    ``scored [N, 3]`` (first, anchor, last), ``anchor [N]``, sims ``[N, S]`` -> ``[N, S]`` float64."""
    R = scored.double()
    num = R[:, 0:1] * sim_first + R[:, 1:2] * sim_anchor + R[:, 2:3] * sim_last  # [N, S]
    r = num / (sim_first + sim_anchor + sim_last)  # [N, S]
    r[:, 0], r[:, -1] = R[:, 0], R[:, 2]
    r[torch.arange(len(anchor)), anchor] = R[:, 1]
    return r


def discounted_returns(r: Tensor, gamma: float) -> Tensor:
    """G_j = r_j + γ·G_{j+1}, G_{S−1} = r_{S−1}, before any normalization (train_sdpo.py, ``sample.gamma``
    0.99; γ = 0 leaves r). ``[N, S]`` -> ``[N, S]``."""
    G = r.clone().double()
    for j in reversed(range(G.shape[1] - 1)):
        G[:, j] = G[:, j] + gamma * G[:, j + 1]
    return G


def step_advantages(returns: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-(prompt, step) advantages A_j = (G_j − mean_k G_j)/(std_k G_j + eps) over a group's K samples.

    ``returns [G, K, S]``, ``mask [G, K]`` (real samples) -> ``[G, K, S]`` (0 where masked). Deviation: the
    public code normalizes by a per-(prompt, step) buffer of the last 32 returns across epochs
    (stat_tracking.py, min_count 16, else batch statistics); a streaming learner sees each prompt's K
    samples together, so the group itself is the buffer (population std, as numpy's ``np.std``)."""
    m = mask.unsqueeze(-1).double()  # [G, K, 1]
    n = m.sum(dim=1, keepdim=True).clamp_min(1.0)  # [G, 1, 1]
    mean = (returns * m).sum(dim=1, keepdim=True) / n  # [G, 1, S]
    var = (((returns - mean) ** 2) * m).sum(dim=1, keepdim=True) / n  # [G, 1, S]
    return (returns - mean) / (var.sqrt() + eps) * m  # [G, K, S]


def step_permutations(num_pairs: int, num_steps: int, generator: torch.Generator) -> Tensor:
    """One random permutation of the step indices per pair: ``[P, S]`` int64 (train_sdpo.py,
    ``shuffle_timestep``: the same permutation for both trajectories of a pair)."""
    return torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(num_pairs)])


def permute_steps(x: Tensor, perms: Tensor) -> Tensor:
    """Apply each pair's permutation along dim 1: ``x [P, S, ...]``, ``perms [P, S]`` -> ``[P, S, ...]``
    with ``out[p, i] = x[p, perms[p, i]]`` (states, log-probs, advantages and weights alike)."""
    return x[torch.arange(x.shape[0]).unsqueeze(1), perms]


def temporal_weights(num_steps: int, lam: float = 0.99, log_scale: float = 1.0) -> Tensor:
    """w_j = λ^j / log_scale, j = 0 the noisiest step (train_sdpo.py: ``lam`` 0.99, ``log_scale`` 1). ``[S]``."""
    return torch.tensor(lam, dtype=torch.float64) ** torch.arange(num_steps, dtype=torch.float64) / log_scale


def sdpo_loss(logp1: Tensor, old1: Tensor, logp2: Tensor, old2: Tensor, adv1: Tensor, adv2: Tensor, w: Tensor,
              adv_clip: float = 5.0, clip_range: float = 1e-4) -> tuple[Tensor, Tensor]:
    """SDPO's pairwise loss at one step (train_sdpo.py, "compute advantage differences" ...):

        Δ = [log π_θ − log π_old](τ1) − [log π_θ − log π_old](τ2),  ΔA = clip(A1, ±c) − clip(A2, ±c)
        L = mean max((w·Δ − ΔA)², (w·Δ^clip − ΔA)²)

    with Δ^clip computed from log π_θ clamped to log π_old ± ``clip_range``. All inputs ``[P]`` (one
    entry per pair; ``w`` broadcastable). Returns ``(loss [], clamp_fraction [])``: the fraction of
    pairs where the clamped term is the larger one (the public code's ``clipfrac``)."""
    a_diff = adv1.clamp(-adv_clip, adv_clip) - adv2.clamp(-adv_clip, adv_clip)  # [P]
    log_diff = (logp1 - old1) - (logp2 - old2)  # [P]
    unclipped = (w * log_diff - a_diff) ** 2  # [P]
    c1 = torch.minimum(torch.maximum(logp1, old1 - clip_range), old1 + clip_range)  # [P]
    c2 = torch.minimum(torch.maximum(logp2, old2 - clip_range), old2 + clip_range)  # [P]
    clipped = (w * ((c1 - old1) - (c2 - old2)) - a_diff) ** 2  # [P]
    loss = torch.maximum(unclipped, clipped).mean()
    return loss, (clipped > unclipped).float().mean().detach()


# ----------------------------------------------------------------------------------------- config

STEP_REWARDS = ("anchor", "all")


@dataclass
class SDPOConfig:
    """``learner.sdpo``. Defaults are the public code's (config/base_sdpo.py) unless noted."""

    num_sampling_steps: int = 4
    """Steps S of the student's sampler (= sampler.sampling.num_steps; the public runs use sd-turbo)."""
    time_shift: float = 1.0
    """σ-grid shift (= sampler.sampling.shift; the student's own grid)."""
    eta: float = 1.0
    """η of the η-step (sample.eta 1.0; = sampler.sampling.eta)."""
    guidance_scale: float = 1.0
    """CFG scale of sampling and training (sample.guidance_scale 1.0, train.cfg False)."""
    step_rewards: str = "anchor"
    """How the per-step rewards are made: anchor (the public rule: x̂0 scored at the first step, the
    anchor and the last, the others interpolated by cosine similarity; needs sampler.score_steps=anchor)
    or all (every x̂0 scored, nothing interpolated; sampler.score_steps=all)."""
    center_similarity: bool = False
    """Centre each x̂0 before the cosine similarities (= sampler.anchor_center; ours, an option)."""
    gamma: float = 0.99
    """Discount of the returns G_j = r_j + γ·G_{j+1} (sample.gamma)."""
    lam: float = 0.99
    """Temporal weight w_j = lam^j of the log-ratio difference (train.lam)."""
    log_scale: float = 1.0
    """w_j is divided by this (train.log_scale)."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip (train.adv_clip_max)."""
    clip_range: float = 1e-4
    """log π_θ is clamped to the behaviour log-prob ± clip_range in the clamped term (train.clip_range)."""
    adv_eps: float = 1e-8
    """Added to the per-(prompt, step) std (stat_tracking.py)."""

    def validate(self) -> None:
        require(self.num_sampling_steps >= 2, "num_sampling_steps", "an int >= 2 (the last step is not trained)",
                self.num_sampling_steps)
        require(self.time_shift > 0, "time_shift", "> 0", self.time_shift)
        require(self.eta > 0, "eta", "> 0 (η = 0 is deterministic: no log-probs)", self.eta)
        require(self.step_rewards in STEP_REWARDS, "step_rewards", f"one of {STEP_REWARDS}", self.step_rewards)
        require(0 <= self.gamma <= 1, "gamma", "in [0, 1]", self.gamma)
        require(self.lam > 0 and self.log_scale > 0, "lam", "lam > 0 and log_scale > 0", self.lam)
        require(self.adv_clip > 0 and self.clip_range > 0, "clip_range", "adv_clip > 0 and clip_range > 0")

    def sigmas(self) -> Tensor:
        """The student's levels ``[S + 1]`` float64 (the sampler's η-step grid)."""
        return sde_sigmas(self.num_sampling_steps, self.time_shift)

    def trained_steps(self) -> list[int]:
        """Steps j with noise (s > 0): all but the last η-step into σ = 0."""
        sig = self.sigmas()
        return [j for j in range(self.num_sampling_steps) if float(eta_step_std(sig[j], sig[j + 1], self.eta)) > 0]


MAX_STEP_GAUGES = 8


@register
class SDPO(Algorithm):
    """SDPO on paired η-step trajectories (module docstring). Roles: θ (trained, one optimizer step per
    trained time slot) and p_samp = θ (EMA decay 0)."""

    name = "sdpo"
    config_class = SDPOConfig
    record = "trajectory"
    trajectory_needs = TrajectoryNeeds(step_kinds=("eta",), paired=True)
    gauges: ClassVar[dict[str, tuple[str, str]]] = {
        "clamp_fraction": ("diffrl_learner_sdpo_clamp_fraction",
                           "SDPO: fraction of pairs where the clamped term is the larger."),
        "adv_clip_fraction": ("diffrl_learner_sdpo_adv_clip_fraction", "SDPO: fraction of advantages clipped."),
        "log_ratio_mean": ("diffrl_learner_sdpo_log_ratio_mean", "SDPO: mean log pi_theta - log pi_behaviour."),
        **{f"reward_step{j}": (f"diffrl_learner_sdpo_reward_step{j}", f"SDPO: mean dense reward at step {j}.")
           for j in range(MAX_STEP_GAUGES)},
        **{f"adv_abs_step{j}": (f"diffrl_learner_sdpo_adv_abs_step{j}", f"SDPO: mean |advantage| at step {j}.")
           for j in range(MAX_STEP_GAUGES)},
    }

    def __init__(self, config: SDPOConfig, learner_config):
        super().__init__(config, learner_config)
        self.J = config.trained_steps()

    def roles(self):
        return [Trainable("theta", backward_passes=1, steps_per_batch=len(self.J)), EMA("p_samp", "theta",
                                                                                        lambda s: 0.0)]

    @classmethod
    def check_recipe(cls, config: SDPOConfig, sampler) -> None:
        super().check_recipe(config, sampler)
        s = sampler.sampling
        require(sampler.score_steps == config.step_rewards, "sampler.score_steps",
                f"{config.step_rewards!r} like learner.sdpo.step_rewards", sampler.score_steps)
        require(not s.sigmas, "sampler.sampling.sigmas", "empty (SDPO trains on the uniform grid of "
                "learner.sdpo.num_sampling_steps and time_shift)", s.sigmas)
        for field_name, have, want, mine in (("num_steps", s.num_steps, config.num_sampling_steps, "num_sampling_steps"),
                                             ("shift", s.shift, config.time_shift, "time_shift"),
                                             ("eta", s.eta, config.eta, "eta"),
                                             ("guidance_scale", s.guidance_scale, config.guidance_scale,
                                              "guidance_scale")):
            require(have == want, f"sampler.sampling.{field_name}", f"learner.sdpo.{mine}={want!r}", have)
        require(sampler.anchor_center == config.center_similarity, "sampler.anchor_center",
                f"learner.sdpo.center_similarity={config.center_similarity}", sampler.anchor_center)

    def sample_problem(self, sample, model) -> str | None:
        c, t = self.config, sample.trajectory
        sig = trajectory_tensor(sample, "sigmas").double()
        if len(sig) != c.num_sampling_steps + 1 or not torch.allclose(sig, c.sigmas(), rtol=0, atol=1e-6):
            return "recorded noise levels differ from learner.sdpo's grid (num_sampling_steps, time_shift)"
        if abs(t.noise_level - c.eta) > 1e-6 or abs(t.guidance_scale - c.guidance_scale) > 1e-6:
            return f"sampled with eta={t.noise_level}, cfg={t.guidance_scale}; learner.sdpo has {c.eta}, {c.guidance_scale}"
        if not t.step_rewards:
            return "no step rewards (needs samplers with sampler.score_steps)"
        return None

    # ------------------------------------------------------------------------------ the step
    def dense(self, batch) -> Tensor:
        """Per-step rewards ``[G, K, S]`` float64 from the recorded step rewards."""
        traj = batch.trajectory
        G, K, S = traj.log_probs.shape
        scored = traj.step_rewards.reshape(G * K, S)  # NaN where unscored
        if self.config.step_rewards == "all":
            return torch.nan_to_num(scored, nan=0.0).reshape(G, K, S)
        anchor = traj.anchors.reshape(-1).clamp_min(0)  # [N]
        _, s_first, s_anchor, s_last = anchor_steps(traj.x0_preds.reshape(G * K, S, *traj.x0_preds.shape[3:]),
                                                    self.config.center_similarity)
        rows = torch.arange(G * K)
        three = torch.stack([scored[:, 0], scored[rows, anchor], scored[:, -1]], dim=1)  # [N, 3]
        r = dense_rewards(torch.nan_to_num(three, nan=0.0), anchor, s_first, s_anchor, s_last)
        return r.reshape(G, K, S)

    def pairs(self, batch) -> list[tuple[int, int, int]]:
        """(group, k1, k2) of every pair of the batch."""
        out = []
        for g in range(batch.mask.shape[0]):
            ids = batch.trajectory.pair_ids[g]
            for pid in sorted(set(ids[batch.mask[g]].tolist())):
                k1, k2 = (ids == pid).nonzero().flatten().tolist()
                out.append((g, k1, k2))
        return out

    def log_probs(self, batch, ctx: StepContext, g: Tensor, k: Tensor, j: Tensor, cond_groups) -> tuple[Tensor, Tensor]:
        """log π_θ(x_{j+1} | x_j) with grad and the recorded behaviour log-prob of samples (g, k) at steps j
        (all ``[n]``): θ's CFG velocity at the recorded x_j, the η-step's Gaussian, the per-dimension mean
        (the samplers' formula, models/sde.py)."""
        c, traj, dev = self.config, batch.trajectory, ctx.device
        x, x_next = traj.states[g, k, j].to(dev), traj.states[g, k, j + 1].to(dev)  # [n, C, H, W]
        sig = traj.sigmas.float()
        sigma, sigma_next = sig[j].to(dev), sig[j + 1].to(dev)  # [n]
        with ctx.autocast():
            v = ctx.model.guided_velocity(x, sigma, cond_groups[g], c.guidance_scale,
                                          transformer=ctx.net("theta")).float()
        mean, std = eta_step_mean_std(x, v, sigma, sigma_next, c.eta)  # [n, ...], [n, 1, ...]
        return gaussian_log_prob(x_next, mean, std), traj.log_probs[g, k, j].to(dev)

    def log_ratios(self, batch, ctx: StepContext) -> Tensor:
        """log π_θ − log π_behaviour of every trained step, ``[G, K, |J|]`` (no grad): 0 on-policy."""
        G, K = batch.mask.shape
        g = torch.arange(G).repeat_interleave(K)
        k = torch.arange(K).repeat(G)
        cond_groups = ctx.model.encode_prompts(batch.prompts)
        out = []
        with torch.no_grad():
            for j in self.J:
                lp, old = self.log_probs(batch, ctx, g, k, torch.full((G * K,), j), cond_groups)
                out.append((lp - old).reshape(G, K))
        return torch.stack(out, dim=-1)

    def step(self, batch, ctx: StepContext) -> StepResult:
        c, traj, model = self.config, batch.trajectory, ctx.model
        G, K, S = traj.log_probs.shape
        r = self.dense(batch)  # [G, K, S]
        returns = discounted_returns(r.reshape(G * K, S), c.gamma).reshape(G, K, S)
        A = step_advantages(returns, batch.mask, c.adv_eps)  # [G, K, S]
        pairs = self.pairs(batch)
        perms = step_permutations(len(pairs), len(self.J), ctx.generator)  # [P, |J|]
        w = temporal_weights(S, c.lam, c.log_scale).float()  # [S]
        cond_groups = model.encode_prompts(batch.prompts)
        for slot in range(len(self.J)):  # one optimizer step per time slot
            for chunk in ctx.chunks:
                in_chunk = set(chunk.tolist())
                members = [p for p, (g, _, _) in enumerate(pairs) if g in in_chunk]
                if not members:
                    continue
                g_idx = torch.tensor([pairs[p][0] for p in members])
                k1 = torch.tensor([pairs[p][1] for p in members])
                k2 = torch.tensor([pairs[p][2] for p in members])
                j = torch.tensor([self.J[int(perms[p, slot])] for p in members])  # [n] each pair's step
                lp, old = self.log_probs(batch, ctx, torch.cat([g_idx, g_idx]), torch.cat([k1, k2]), j.repeat(2),
                                         cond_groups)  # [2n] each
                n = len(members)
                a1, a2 = A[g_idx, k1, j].float().to(ctx.device), A[g_idx, k2, j].float().to(ctx.device)
                loss, clamp_frac = sdpo_loss(lp[:n], old[:n], lp[n:], old[n:], a1, a2, w[j].to(ctx.device),
                                             c.adv_clip, c.clip_range)
                share = n / len(pairs)
                ctx.backward("theta", loss, share)
                ctx.log({"loss": loss.detach(), "clamp_fraction": clamp_frac,
                         "log_ratio_mean": (lp - old).detach().mean(),
                         "adv_clip_fraction": ((a1.abs() > c.adv_clip).float().mean()
                                               + (a2.abs() > c.adv_clip).float().mean()) / 2}, share)
        valid = batch.mask.unsqueeze(-1).expand(G, K, S)
        stats = {}
        for step_j in range(min(S, MAX_STEP_GAUGES)):
            m = valid[:, :, step_j]
            stats[f"reward_step{step_j}"] = float(r[:, :, step_j][m].mean())
            stats[f"adv_abs_step{step_j}"] = float(A[:, :, step_j][m].abs().mean())
        return StepResult(advantages=A[:, :, self.J].mean(dim=-1).float(), adv_clip=c.adv_clip, stats=stats)
