"""Flow-GRPO-style baseline (arXiv 2505.05470) as pure tensor functions. The math: docs/algorithms.md,
"Flow-GRPO". Notation as in ``crd.py``: σ ∈ [0, 1] the noise level (the paper's t), x_σ =
(1 − σ)·x0 + σ·ε, v(x, σ) ≈ E[ε − x0 | x_σ = x]. Per-sample tensors ``[N, ...]``, per-sample
scalars ``[N]`` (or ``[G, K]`` for rewards).

ODE -> SDE (derivation). For the interpolation above, E[x0 | x] = x − σ·v and E[ε | x] = x + (1 − σ)·v,
so the score is ∇log p_σ(x) = −E[ε | x]/σ = −(x + (1 − σ)·v)/σ. For any diffusion coefficient g_σ
the reverse-time SDE dx = [v − (g_σ²/2)·∇log p_σ(x)] dσ + g_σ dw̄ (dσ < 0, integrated from σ = 1
to 0) has the same marginals as the probability-flow ODE dx = v dσ. Flow-GRPO takes
g_σ = a·sqrt(σ/(1 − σ)) ("noise level" a, 0.7 by default) and steps it with Euler–Maruyama from σ
to σ' < σ, Δ = σ' − σ < 0:

    x_{σ'} = x_σ + [ v + g_σ²/(2σ)·(x_σ + (1 − σ)·v) ]·Δ + g_σ·sqrt(−Δ)·z,      z ~ N(0, I)

so p(x_{σ'} | x_σ) = N(μ, s²·I) with μ = x_σ + [v + g_σ²/(2σ)(x_σ + (1 − σ)v)]·Δ and
s = g_σ·sqrt(−Δ). a = 0 gives the Euler ODE step μ = x_σ + v·Δ. At σ = 1, g is infinite; like the
reference, ``sigma_max`` (the largest grid level below 1) replaces σ in the denominator 1 − σ.

Training (per denoising step j, samples from the SDE sampler with stored log-probs):
    ratio = exp(log p_θ(x_{j+1} | x_j) − log p_old(x_{j+1} | x_j))
    L_clip = mean_i max(−A_i·ratio_i, −A_i·clip(ratio_i, 1 − ε, 1 + ε))
    L = L_clip + β·mean_i KL(N(μ_θ, s²) ‖ N(μ_ref, s²)),  KL = ‖μ_θ − μ_ref‖²/(2s²)
with A the group-normalized advantage (r − mean_g r)/(std_g r + eps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffrl.config import require
from diffrl.learner.algorithms.base import (
    EMA,
    Algorithm,
    Frozen,
    StepContext,
    StepResult,
    Trainable,
    register,
)
from diffrl.learner.batch import extra_tensor
from diffrl.learner.losses import per_sample_mean

# The SDE step itself lives in models/sde.py: the sampler draws and records it with the same code
# (models do not import the learner), so recorded and recomputed log-probs agree exactly.
from diffrl.models.sde import (
    EXTRA_GUIDANCE_SCALE,
    EXTRA_NOISE_LEVEL,
    LOG_PROB_REDUCTIONS,
    gaussian_log_prob,
    sde_sigmas,
    sde_std,
    sde_step_mean_std,
)

Tensor = torch.Tensor

KL_STD_MODES = ("step", "sde")


def sde_step_log_prob(
    x_t: Tensor,
    v: Tensor,
    x_next: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    sigma_max: float | None = None,
    reduce: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """log p_v(x_next | x_t) of a recorded step under velocity ``v`` (with grad through v):
    ``(log_prob [N], mean [N, ...], std)``."""
    mean, std = sde_step_mean_std(x_t, v, sigma, sigma_next, noise_level, sigma_max)
    return gaussian_log_prob(x_next, mean, std, reduce), mean, std


def group_advantages(rewards: Tensor, eps: float = 1e-4, mask: Tensor | None = None) -> Tensor:
    """A_i = (r_i − mean_g r)/(std_g r + eps), population std within each prompt group (Flow-GRPO's
    per-prompt stat tracking). A zero-variance group gives A = 0. ``[G, K] -> [G, K]``; masked
    entries are left out of the statistics and get 0."""
    require(rewards.ndim == 2, "rewards", "a [G, K] tensor", tuple(rewards.shape))
    r = rewards.to(torch.float64)  # [G, K]
    m = torch.ones_like(r) if mask is None else mask.to(torch.float64)  # [G, K]
    n = m.sum(dim=1, keepdim=True).clamp_min(1.0)  # [G, 1]
    mean = (r * m).sum(dim=1, keepdim=True) / n  # [G, 1]
    c = (r - mean) * m  # [G, K]
    std = ((c**2).sum(dim=1, keepdim=True) / n).sqrt()  # [G, 1]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    return (c / (std + eps)).to(out_dtype)  # [G, K]


def ppo_clip_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    adv: Tensor,
    clip_range: float,
    adv_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate for one denoising step: mean_i max(−A_i·ρ_i, −A_i·clip(ρ_i, 1 ± ε)),
    ρ = exp(log_prob − old_log_prob), A clipped to ±``adv_clip`` first (if given).

    Args:
        log_prob: ``[N]`` under θ (with grad).  old_log_prob: ``[N]`` recorded at sampling.
        adv: ``[N]`` advantages.
    Returns:
        ``(loss, stats)``: stats are detached clipfrac (fraction with |ρ − 1| > ε) and approx_kl
        (½·mean (log ρ)²).
    """
    require(clip_range > 0, "clip_range", "> 0", clip_range)
    adv = adv.detach().to(log_prob.dtype)  # [N]
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)  # [N]
    log_ratio = log_prob - old_log_prob.detach().to(log_prob.dtype)  # [N]
    ratio = torch.exp(log_ratio)  # [N] ρ
    unclipped = -adv * ratio  # [N]
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)  # [N]
    loss = torch.maximum(unclipped, clipped).mean()  # []
    with torch.no_grad():
        stats = {
            "clipfrac": ((ratio - 1.0).abs() > clip_range).to(log_prob.dtype).mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return loss, stats


def gaussian_kl_same_std(mean_theta: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(μ_θ, s²I) ‖ N(μ_ref, s²I)) per element, averaged over the non-batch dims (the same
    per-dimension scale as ``gaussian_log_prob(reduce="mean")``): mean (μ_θ − μ_ref)²/(2s²).
    ``[N, ...]`` -> ``[N]``; μ_ref is detached."""
    std = torch.as_tensor(std, dtype=mean_theta.dtype, device=mean_theta.device)
    return per_sample_mean(
        (mean_theta - mean_ref.detach().to(mean_theta.dtype)) ** 2 / (2.0 * std**2)
    )  # [N]


@dataclass
class GRPOConfig:
    """Hyperparameters of the Flow-GRPO-style baseline (defaults from the Flow-GRPO code base).

    noise_level, num_sampling_steps, time_shift and guidance_scale describe the sampling policy: they
    must equal the samplers' ``sampling.sde_noise_level``, ``num_steps``, ``shift`` and
    ``guidance_scale`` (checked when a recipe loads, and per group against its records)."""

    noise_level: float = 0.7
    """a in the SDE diffusion g_σ = a·sqrt(σ/(1 − σ))."""
    num_sampling_steps: int = 10
    """SDE sampler steps for training rollouts (log-probs recorded for each)."""
    time_shift: float = 3.0
    """SD3 shift of the sampler's schedule."""
    guidance_scale: float = 1.0
    """CFG scale w of the policy's velocity v^w = v(·, ∅) + w·(v(·, c) − v(·, ∅)) in the SDE step, for
    sampling and training alike (Flow-GRPO: 4.5 on SD3); 1 = no CFG."""
    train_fraction: float = 0.99
    """Fraction of the denoising steps (from the noisiest) trained on per sample."""
    clip_range: float = 1e-4
    """PPO clip ε on the ratio (tiny because the log-probs are per-dimension means)."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip in the PPO loss."""
    adv_eps: float = 1e-4
    """eps in A = (r − mean_g r)/(std_g r + eps)."""
    kl_beta: float = 0.04
    """β of the KL to the frozen reference (0 = off)."""
    kl_std: str = "step"
    """Std in the KL's denominator: 'step' = the step's true std g·sqrt(−Δ) (the exact Gaussian KL),
    'sde' = g alone, as in the Flow-GRPO code (a KL scaled by 1/|Δ|)."""
    log_prob_reduce: str = "mean"
    """Reduction of the per-element log-density: 'mean' (Flow-GRPO) or 'sum' (joint)."""

    def validate(self) -> None:
        require(self.noise_level > 0, "noise_level", "> 0", self.noise_level)
        require(self.num_sampling_steps >= 1, "num_sampling_steps", ">= 1", self.num_sampling_steps)
        require(self.time_shift > 0, "time_shift", "> 0", self.time_shift)
        require(self.guidance_scale >= 0, "guidance_scale", ">= 0", self.guidance_scale)
        require(0.0 < self.train_fraction <= 1.0, "train_fraction", "in (0, 1]", self.train_fraction)
        require(self.clip_range > 0, "clip_range", "> 0", self.clip_range)
        require(self.adv_clip > 0, "adv_clip", "> 0", self.adv_clip)
        require(self.adv_eps >= 0, "adv_eps", ">= 0", self.adv_eps)
        require(self.kl_beta >= 0, "kl_beta", ">= 0", self.kl_beta)
        require(self.kl_std in KL_STD_MODES, "kl_std", f"one of {KL_STD_MODES}", self.kl_std)
        require(
            self.log_prob_reduce in LOG_PROB_REDUCTIONS,
            "log_prob_reduce",
            f"one of {LOG_PROB_REDUCTIONS}",
            self.log_prob_reduce,
        )

    def sigmas(self) -> Tensor:
        """The SDE sampler's levels ``[num_sampling_steps + 1]`` (1 -> 0, shifted)."""
        return sde_sigmas(self.num_sampling_steps, self.time_shift)  # the samplers' very function

    def sigma_max(self) -> float:
        """The largest level below 1, used for σ = 1 in g_σ's denominator."""
        return float(self.sigmas()[1])

    def num_train_steps(self) -> int:
        """Denoising steps trained on per sample: the first ⌊train_fraction·S⌋ (at least 1), as
        Flow-GRPO's int(num_steps·timestep_fraction)."""
        return max(1, int(self.train_fraction * self.num_sampling_steps + 1e-9))


def kl_std_for(
    std_step: Tensor, sigma: Tensor | float, config: GRPOConfig, sigma_max: float | None = None
) -> Tensor:
    """The std used in the KL per ``config.kl_std``: the step std itself ('step'), or g_σ ('sde'),
    shaped like ``std_step`` (``[]`` or ``[N, 1, ..., 1]``)."""
    if config.kl_std == "step":
        return std_step
    g = sde_std(torch.as_tensor(sigma, dtype=torch.float64), config.noise_level, sigma_max)  # [] or [N]
    g = g.to(dtype=std_step.dtype, device=std_step.device)
    return g.reshape(std_step.shape) if g.numel() == std_step.numel() else g


def grpo_step_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    adv: Tensor,
    config: GRPOConfig,
    mean_theta: Tensor | None = None,
    mean_ref: Tensor | None = None,
    kl_std: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip loss of one denoising step plus β·mean KL to the reference.

    Args:
        log_prob: ``[N]`` log p_θ(x_{j+1} | x_j) (``sde_step_log_prob``, with grad).
        old_log_prob: ``[N]`` recorded by the sampler.  adv: ``[N]`` advantages.
        mean_theta, mean_ref: ``[N, ...]`` step means under θ and the frozen reference (needed when
            ``config.kl_beta > 0``).  kl_std: the std for the KL (``kl_std_for``).
    Returns:
        ``(loss, stats)`` with detached policy_loss, kl, clipfrac, approx_kl, loss.
    """
    policy_loss, stats = ppo_clip_loss(log_prob, old_log_prob, adv, config.clip_range, config.adv_clip)
    loss = policy_loss  # []
    if config.kl_beta > 0:
        require(
            mean_theta is not None and mean_ref is not None and kl_std is not None,
            "mean_ref",
            "mean_theta, mean_ref and kl_std when kl_beta > 0",
            None,
        )
        kl = gaussian_kl_same_std(mean_theta, mean_ref, kl_std).mean()  # []
        loss = loss + config.kl_beta * kl.to(loss.dtype)  # []
        stats["kl"] = kl.detach()
    stats["policy_loss"] = policy_loss.detach()
    stats["loss"] = loss.detach()
    return loss, stats


@register
class GRPO(Algorithm):
    """The Flow-GRPO-style baseline on the learner's seam: θ (trainable), p_old = an exact copy of θ
    after every step (EMA decay 0: the samplers follow the policy being trained, and the recorded
    log-probs make stale samples correct) and the frozen base model (the KL reference). It trains on
    trajectory records: per denoising step j of the first ``num_train_steps()``, log p_θ(x_{j+1} | x_j)
    recomputed with θ's (CFG) velocity at the recorded x_j, the PPO-clipped ratio against the recorded
    log-prob, plus β·KL of θ's step to the base model's; one backward per step and micro-chunk."""

    name = "grpo"
    config_class = GRPOConfig
    record = "trajectory"
    sampler_role = "p_old"
    gauges: ClassVar[dict[str, tuple[str, str]]] = {
        "clip_fraction": ("diffrl_learner_grpo_clip_fraction", "GRPO: fraction of ratios outside 1 +- clip_range."),
        "ratio_mean": ("diffrl_learner_grpo_ratio_mean", "GRPO: mean ratio p_theta/p_sampler."),
        "approx_kl": ("diffrl_learner_grpo_approx_kl", "GRPO: half the mean squared log-ratio."),
        "policy_loss": ("diffrl_learner_grpo_policy_loss", "GRPO: PPO-clipped surrogate loss."),
    }

    def __init__(self, config: GRPOConfig, learner_config):
        super().__init__(config, learner_config)
        self.sigmas = config.sigmas()  # [S + 1] float64
        self.T = config.num_train_steps()

    def roles(self):
        return [Trainable("theta", backward_passes=self.T), EMA("p_old", "theta", lambda s: 0.0), Frozen("anchor")]

    @classmethod
    def check_recipe(cls, config: GRPOConfig, sampler) -> None:
        """The samplers record log-probs with the SDE and schedule that ``learner.grpo`` recomputes."""
        super().check_recipe(config, sampler)
        s = sampler.sampling
        for field_name, have, want, learner_field in (
            ("sde_noise_level", s.sde_noise_level, config.noise_level, "noise_level"),
            ("num_steps", s.num_steps, config.num_sampling_steps, "num_sampling_steps"),
            ("shift", s.shift, config.time_shift, "time_shift"),
            ("guidance_scale", s.guidance_scale, config.guidance_scale, "guidance_scale"),
        ):
            require(have == want, f"sampler.sampling.{field_name}",
                    f"learner.grpo.{learner_field}={want!r} (the policy GRPO recomputes the log-probs of)", have)

    def sample_problem(self, sample, model) -> str | None:
        """The record was sampled with this config's schedule, noise level and CFG scale."""
        c = self.config
        sigmas = extra_tensor(sample, "sigmas").to(torch.float64)
        if len(sigmas) != c.num_sampling_steps + 1:
            return (f"{len(sigmas) - 1} recorded steps, expected {c.num_sampling_steps} "
                    f"(learner.grpo.num_sampling_steps={c.num_sampling_steps})")
        if not torch.allclose(sigmas, self.sigmas, rtol=0.0, atol=1e-6):
            return "recorded noise levels differ from learner.grpo's schedule (num_sampling_steps, time_shift)"
        for key, mine, name in ((EXTRA_NOISE_LEVEL, c.noise_level, "noise_level"),
                                (EXTRA_GUIDANCE_SCALE, c.guidance_scale, "guidance_scale")):
            theirs = float(extra_tensor(sample, key))
            if not abs(theirs - mine) <= 1e-6:
                return f"sampled with {name}={theirs}, learner.grpo.{name}={mine}"
        return None

    def step(self, batch, ctx: StepContext) -> StepResult:
        c = self.config
        # per prompt group: (r − mean_g r)/(std_g r + eps), no cross-rank statistics
        a = group_advantages(batch.rewards, c.adv_eps, batch.mask if batch.padded else None)  # [G, K]
        a = a.to(torch.float32)
        cond_groups = ctx.model.encode_prompts(batch.prompts)  # [G] embeds
        for j in range(self.T):
            for idx in ctx.chunks:
                m_c = batch.mask[idx]  # [g, K]
                loss, st = self._chunk_loss(batch, ctx, j, idx, a, cond_groups)
                share = float(m_c.sum()) / batch.n_valid
                ctx.backward("theta", loss, share)
                ctx.log(st, share)
        return StepResult(advantages=a, adv_clip=c.adv_clip)

    def _step_terms(self, batch, ctx: StepContext, j: int, idx: Tensor, cond_groups, with_ref: bool):
        """Denoising step j of the recorded trajectories of groups ``idx`` (valid samples only, n of
        them): ``(log p_θ(x_{j+1} | x_j) [n] with grad, recorded log p [n], μ_θ [n, ...], μ_ref [n, ...]
        or None, step std, σ_j, σ_max, rows)``, log-probs reduced per ``grpo.log_prob_reduce``."""
        c, model, dev = self.config, ctx.model, ctx.device
        traj = batch.trajectory
        K = batch.mask.shape[1]
        m_c = batch.mask[idx]  # [g, K]
        rows = m_c.reshape(-1).nonzero().squeeze(1) if batch.padded else torch.arange(m_c.numel())  # [n]
        x_t = traj.latents[idx, :, j].flatten(0, 1)[rows].to(dev)  # [n, C, H, W] x_{σ_j}
        x_next = traj.latents[idx, :, j + 1].flatten(0, 1)[rows].to(dev)  # [n, C, H, W] x_{σ_{j+1}}
        old = traj.log_probs[idx, :, j].reshape(-1)[rows].to(dev)  # [n] per-dimension mean, as recorded
        if c.log_prob_reduce == "sum":
            old = old * x_t[0].numel()  # the joint log-density
        n = x_t.shape[0]
        sigma, sigma_next = float(self.sigmas[j]), float(self.sigmas[j + 1])
        sigma_max = float(self.sigmas[1])
        sig = torch.full((n,), sigma, device=dev)  # [n] as the sampler's velocity call
        cond = cond_groups[idx.tolist()].repeat_interleave(K)[rows.tolist()]
        uncond = model.empty_embeds(n) if c.guidance_scale != 1.0 else None
        mean_ref = None
        if with_ref:
            with torch.no_grad(), ctx.autocast():
                v_ref = model.guided_velocity(x_t, sig, cond, c.guidance_scale, transformer=ctx.net("anchor"),
                                              uncond=uncond).float()  # [n, C, H, W]
            mean_ref, _ = sde_step_mean_std(x_t, v_ref, sigma, sigma_next, c.noise_level, sigma_max)
        v_theta = model.guided_velocity(x_t, sig, cond, c.guidance_scale, transformer=ctx.net("theta"),
                                        uncond=uncond)  # [n, C, H, W] grad
        lp, mean_theta, std = sde_step_log_prob(x_t, v_theta, x_next, sigma, sigma_next, c.noise_level, sigma_max,
                                                reduce=c.log_prob_reduce)  # [n], [n, C, H, W], []
        return lp, old, mean_theta, mean_ref, std, sigma, sigma_max, rows

    def _chunk_loss(self, batch, ctx, j: int, idx: Tensor, a: Tensor, cond_groups):
        """``grpo_step_loss`` of denoising step j for the groups ``idx`` and its stats (clip_fraction,
        ratio_mean, approx_kl, policy_loss, kl, loss)."""
        c = self.config
        use_ref = c.kl_beta > 0
        lp, old, mean_theta, mean_ref, std, sigma, sigma_max, rows = self._step_terms(
            batch, ctx, j, idx, cond_groups, with_ref=use_ref)
        adv = a[idx].reshape(-1)[rows].to(ctx.device)  # [n]
        kl_std = kl_std_for(std, sigma, c, sigma_max) if use_ref else None
        loss, st = grpo_step_loss(lp, old, adv, c, mean_theta, mean_ref, kl_std)
        st["clip_fraction"] = st.pop("clipfrac")
        st["ratio_mean"] = torch.exp(lp.detach() - old).mean()
        return loss, st

    @torch.no_grad()
    def log_ratios(self, batch, ctx: StepContext) -> Tensor:
        """log p_θ − log p_recorded of every trained denoising step, ``[G, K, T]`` (NaN where a group
        has fewer than K samples): 0 on-policy, before θ moves away from the sampling weights."""
        G, K = batch.mask.shape
        cond_groups = ctx.model.encode_prompts(batch.prompts)
        out = torch.full((G * K, self.T), float("nan"), dtype=torch.float64)
        idx = torch.arange(G)
        for j in range(self.T):
            lp, old, *_, rows = self._step_terms(batch, ctx, j, idx, cond_groups, with_ref=False)
            out[rows, j] = (lp - old).double().cpu()
        return out.reshape(G, K, self.T)
