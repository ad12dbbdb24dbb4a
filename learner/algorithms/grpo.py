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

Training (per denoising step j, samples from the SDE sampler with stored log-probs), the reference
being yifan123/flow_grpo (files cited per term):

    A_i    = clip( (r_i − mean_g r) / (std_B r + 1e-4), ±5 )      flow_grpo/stat_tracking.py
             (PerPromptStatTracker.update, global_std=True as config/grpo.py's SD3 configs set: std_B the
             population std of the raw rewards of the whole batch; the clip in scripts/train_sd3.py)
    I      = {i : A_i ≠ 0}                                       scripts/train_sd3.py: samples whose
             advantages are all zero are filtered out of the training set before training
    v^w    = sg(v(·, ∅)) + w·(v(·, c) − sg(v(·, ∅)))           scripts/train_sd3.py, compute_log_prob
             (noise_pred_uncond.detach(): the gradient flows through the conditional branch only)
    ρ_i    = exp(log p_θ(x_{j+1} | x_j) − log p_old(x_{j+1} | x_j))   (per-dimension mean log-densities,
             flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, sde_step_with_logprob)
    L_clip = mean_{i∈I} max(−A_i·ρ_i, −A_i·clip(ρ_i, 1 − ε, 1 + ε))   scripts/train_sd3.py (ε = 1e-4)
    KL_i   = mean_dims (μ_θ,i − μ_ref,i)² / (2·g_σ²)               scripts/train_sd3.py, kl_loss
             (std_dev_t = g_σ as sde_step_with_logprob returns it, not the step std g_σ·sqrt(−Δ))
    L_j    = L_clip + β·mean_{i∈I} KL_i                            (β = 0.04, config/grpo.py)

on the σ grid of diffusers' FlowMatchEulerDiscreteScheduler (``models/sde.py``, ``scheduler_sigmas``), for
the first ⌊0.99·S⌋ steps; the optimizer steps on the mean over j. ``KL_i`` is the exact KL of the two
step Gaussians N(μ, g_σ²·|Δ|·I) multiplied by |Δ| (4–25× weaker than the exact KL on the 10-step shift-3
grid, 9× at shift 1); ``kl_std="step"`` is the exact KL. ``GRPOConfig``'s docstring lists every option
and every remaining deviation from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffrl.config import require
from diffrl.learner.advantages import advantages
from diffrl.learner.algorithms.base import (
    EMA,
    Algorithm,
    Frozen,
    StepContext,
    StepResult,
    Trainable,
    register,
)
from diffrl.learner.batch import TrajectoryNeeds, trajectory_tensor
from diffrl.learner.losses import per_sample_mean

# The SDE step itself lives in models/sde.py: the sampler draws and records it with the same code
# (models do not import the learner), so recorded and recomputed log-probs agree exactly.
from diffrl.models.sde import (
    LOG_PROB_REDUCTIONS,
    SDE_GRIDS,
    gaussian_log_prob,
    sde_grid,
    sde_std,
    sde_step_mean_std,
)

Tensor = torch.Tensor

KL_STD_MODES = ("sde", "step")
ADV_STD_MODES = ("batch", "group")


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


def grpo_advantages(
    rewards: Tensor,
    mask: Tensor | None = None,
    std_mode: str = "batch",
    eps: float = 1e-4,
    clip: float = 5.0,
) -> Tensor:
    """Flow-GRPO's advantages, ``[G, K] -> [G, K]`` in the rewards' dtype:

        A_i = clip( (r_i − mean_g r) / (std + eps), ±clip )

    flow_grpo/stat_tracking.py (``PerPromptStatTracker.update``, cleared every epoch so the mean is the
    group's): ``std_mode="batch"`` (``global_std=True``, config/grpo.py's SD3 configs) takes the
    population std of the raw rewards of the whole batch, ``"group"`` (``global_std=False``) the
    group's; ``eps`` = 1e-4 is added to the std; the clip at ``adv_clip_max`` is scripts/train_sd3.py's.
    Computed by ``diffrl.learner.advantages.advantages(..., eps_mode="add")``.

    Near ties (a deviation): a group whose rewards differ by float rounding only (within-group std at or
    below ``RELATIVE_EPS`` = 1e-6 x the batch's largest |reward|, ``advantages``' relative guard) gets
    A = 0 exactly, as an exactly tied group does in the reference, so it is skipped like one: the
    reference would give such a group advantages of 1e-12 to 1e-7 and keep its samples in the loss (and its
    KL), which lets reward-server rounding decide the loss normalization. Masked entries get 0.
    """
    a, _ = advantages(rewards, mask, std_mode, clip, eps, eps_mode="add")  # [G, K]
    a_tie, _ = advantages(rewards, mask, "group", clip)  # [G, K] relative guard: 0 on a (near) tie
    tied = ~(a_tie != 0).any(dim=1, keepdim=True)  # [G, 1]
    return torch.where(tied, torch.zeros_like(a), a)  # [G, K]


def group_advantages(rewards: Tensor, eps: float = 1e-4, mask: Tensor | None = None) -> Tensor:
    """A_i = (r_i − mean_g r)/(std_g r + eps), population std within each prompt group (Flow-GRPO's
    per-prompt stat tracking with ``global_std=False``), unclipped: ``grpo_advantages(std_mode="group")``.
    A zero-variance group gives A = 0. ``[G, K] -> [G, K]``; masked entries get 0."""
    return grpo_advantages(rewards, mask, "group", eps, clip=float("inf"))


def train_mask(a: Tensor, mask: Tensor, skip_zero_adv: bool = True) -> Tensor:
    """The samples the loss is taken over, ``[G, K]`` bool: the valid ones, less those with A = 0 when
    ``skip_zero_adv`` (scripts/train_sd3.py: ``mask = advantages.abs().sum(dim=1) != 0`` and
    ``samples = {k: v[mask]}`` before training, so they enter neither the PPO term nor the KL, nor the
    count the per-batch means divide by)."""
    m = mask.to(torch.bool)
    return m & (a != 0) if skip_zero_adv else m


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
    """Hyperparameters of the Flow-GRPO baseline. Every default is the reference's (yifan123/flow_grpo:
    config/base.py and the SD3.5-M configs of config/grpo.py, ``general_ocr_sd3``/``geneval_sd3``, read by
    scripts/train_sd3.py): noise level 0.7, 10 sampling steps on SD3's scheduler grid at shift 3, CFG 4.5
    with the unconditional branch detached in training, timestep_fraction 0.99, PPO clip 1e-4, advantage
    clip 5, global-std advantages + 1e-4 with zero-advantage samples skipped, β = 0.04 with the
    reference's KL scale, per-dimension mean log-probs, and (learner settings) gradient clip 1.0 and AdamW
    (0.9, 0.999), weight decay 1e-4, eps 1e-8. This baseline's earlier behaviour stays reachable as options:
    ``kl_std="step"``, ``cfg_uncond_grad=True``, ``adv_std="group"``, ``skip_zero_adv=False``,
    ``sigma_grid="uniform"`` (with samplers given that grid as ``sampling.sigmas``, e.g. a few-step
    student's own grid; see ``check_recipe``).

    noise_level, num_sampling_steps, time_shift, guidance_scale and sigma_grid describe the sampling
    policy: they must equal what the samplers use (``sampling.sde_noise_level``, ``num_steps``, ``shift``,
    ``guidance_scale``; the SDE sampler's grid is ``scheduler`` unless ``sampling.sigmas`` gives one),
    checked when a recipe loads and per group
    against its records.

    Deviations from the reference that remain, each on purpose:
      * near-tie groups (rewards equal up to float rounding) get A = 0 and are skipped like exact ties
        (``grpo_advantages``); the reference would keep them with |A| ~ 1e-12 (float64 rewards) to 1e-7
        (float32);
      * the skipped samples are not topped up: the reference re-adds random zero-advantage samples until
        the kept count divides its ``num_batches_per_epoch`` (a mini-batching constraint this learner does
        not have); here the means are over exactly the nonzero-advantage samples;
      * the batch is one optimizer step's groups (every rank's): the reference normalizes over an epoch that
        its SD3 configs split into 2 optimizer steps (gradient_accumulation_steps = num_batches/2); a group
        is a sampled group (the reference's tracker pools every sample of one prompt text in the epoch);
      * a step in which no sample has A ≠ 0 still takes its (zero-gradient) optimizer step, since the
        learner steps every role exactly once per step; AdamW's moments and weight decay still act;
      * asynchrony: samplers run on p_samp = θ of up to ``learner.max_staleness`` versions ago; the ratio
        is against the recorded log-probs, so stale samples are weighted as in PPO (the reference samples
        and trains in lockstep, 1 inner epoch);
      * the reference keeps an EMA of the LoRA weights (``train.ema``: decay 0.9 every 8 steps) for its
        evaluations and checkpoints only; here evaluations and exports measure p_samp = θ;
      * LoRA (r 32, α 64), lr 3e-4 and fp16 are learner settings (``learner.lora``, ``learner.lr``,
        ``learner.dtype``), set per recipe; σ levels are float64 (diffusers: float32, within 1e-7); the
        reference's log-density constant uses a float32 π (a 1.6e-8 offset that cancels in the ratio).
    """

    noise_level: float = 0.7
    """a in the SDE diffusion g_σ = a·sqrt(σ/(1 − σ)) (Flow-GRPO: config/base.py ``sample.noise_level``)."""
    num_sampling_steps: int = 10
    """SDE sampler steps for training rollouts, log-probs recorded for each (config/grpo.py: 10)."""
    time_shift: float = 3.0
    """Shift of the sampler's σ grid (SD3/SD3.5's scheduler config: 3.0)."""
    sigma_grid: str = "scheduler"
    """The σ grid: 'scheduler' = diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps grid that
    Flow-GRPO samples on (models/sde.py, ``scheduler_sigmas``); 'uniform' = τ_k = 1 − k/S shifted (the
    ODE sampler's grid, this baseline's earlier default; the recipe samplers cannot sample on it)."""
    guidance_scale: float = 4.5
    """CFG scale w of the policy's velocity v^w = v(·, ∅) + w·(v(·, c) − v(·, ∅)) in the SDE step, for
    sampling and training alike (config/grpo.py: 4.5 on SD3.5-M, ``train.cfg=True``); 1 = no CFG."""
    cfg_uncond_grad: bool = False
    """False (Flow-GRPO, scripts/train_sd3.py ``compute_log_prob``: ``noise_pred_uncond.detach()``): θ's
    gradient flows only through the conditional branch, with coefficient w. True: through both branches
    (the unconditional one with coefficient 1 − w), this baseline's earlier behaviour."""
    train_fraction: float = 0.99
    """Fraction of the denoising steps (from the noisiest) trained on per sample (``timestep_fraction``)."""
    clip_range: float = 1e-4
    """PPO clip ε on the ratio (config/base.py ``train.clip_range``; tiny because the log-probs are
    per-dimension means)."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip in the PPO loss (``train.adv_clip_max``)."""
    adv_std: str = "batch"
    """Std of the advantages: 'batch' = population std of the raw rewards over the whole batch (every
    rank's groups; flow_grpo/stat_tracking.py with ``global_std=True``, as config/grpo.py's SD3 configs
    set), 'group' = each prompt group's own std (``global_std=False``; the earlier default here)."""
    adv_eps: float = 1e-4
    """eps in A = (r − mean_g r)/(std + eps) (stat_tracking.py: + 1e-4)."""
    skip_zero_adv: bool = True
    """Leave samples with A = 0 out of the loss, PPO term and KL alike, and out of the count the means
    divide by (scripts/train_sd3.py filters them out of the training set). False: every valid sample
    counts (the earlier behaviour)."""
    kl_beta: float = 0.04
    """β of the KL to the frozen reference (config/grpo.py ``train.beta``: 0.04 for OCR and GenEval,
    0.01 for PickScore; 0 = off)."""
    kl_std: str = "sde"
    """Std s_KL in KL_i = mean_dims (μ_θ − μ_ref)²/(2·s_KL²). 'sde' (Flow-GRPO, scripts/train_sd3.py
    ``kl_loss`` with ``std_dev_t`` from sd3_sde_with_logprob.py): s_KL = g_σ, the diffusion coefficient
    alone, which is the exact KL of the two step Gaussians times |Δ| (weaker: |Δ| < 1). 'step': s_KL =
    g_σ·sqrt(|Δ|), the step's own std, the exact KL = the reference's divided by |Δ| (4–25× stronger on
    the 10-step shift-3 grid, 9× at shift 1; the earlier default here)."""
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
        require(self.adv_std in ADV_STD_MODES, "adv_std", f"one of {ADV_STD_MODES}", self.adv_std)
        require(self.sigma_grid in SDE_GRIDS, "sigma_grid", f"one of {SDE_GRIDS}", self.sigma_grid)
        require(
            self.log_prob_reduce in LOG_PROB_REDUCTIONS,
            "log_prob_reduce",
            f"one of {LOG_PROB_REDUCTIONS}",
            self.log_prob_reduce,
        )

    def sigmas(self, num_train_timesteps: int = 1000) -> Tensor:
        """The SDE sampler's levels ``[num_sampling_steps + 1]`` float64 (1 -> 0) on ``sigma_grid``:
        ``models.sde.sde_grid``, the samplers' very function (``num_train_timesteps``: the model's
        scheduler's, which the scheduler grid's smallest level depends on)."""
        return sde_grid(self.num_sampling_steps, self.time_shift, self.sigma_grid, num_train_timesteps)

    def sigma_max(self, num_train_timesteps: int = 1000) -> float:
        """The largest level below 1, used for σ = 1 in g_σ's denominator (sd3_sde_with_logprob.py:
        ``sigma_max = self.sigmas[1]``)."""
        return float(self.sigmas(num_train_timesteps)[1])

    def num_train_steps(self) -> int:
        """Denoising steps trained on per sample: the first ⌊train_fraction·S⌋ (at least 1), as
        Flow-GRPO's int(num_steps·timestep_fraction)."""
        return max(1, int(self.train_fraction * self.num_sampling_steps + 1e-9))


def kl_std_for(
    std_step: Tensor, sigma: Tensor | float, config: GRPOConfig, sigma_max: float | None = None
) -> Tensor:
    """The std s_KL of the KL per ``config.kl_std``: g_σ ('sde', Flow-GRPO's ``std_dev_t``: σ = 1 uses
    ``sigma_max`` as in sd3_sde_with_logprob.py) or the step std g_σ·sqrt(−Δ) itself ('step'), shaped
    like ``std_step`` (``[]`` or ``[N, 1, ..., 1]``)."""
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
    """The Flow-GRPO baseline on the learner's seam: θ (trainable), p_old = an exact copy of θ
    after every step (EMA decay 0: the samplers follow the policy being trained, and the recorded
    log-probs make stale samples correct) and the frozen base model (the KL reference; the reference
    code disables its LoRA adapters for it). It trains on trajectory records: advantages over the whole
    batch (``grpo_advantages``), the samples with A ≠ 0 (``train_mask``), and per denoising step j of
    the first ``num_train_steps()``, log p_θ(x_{j+1} | x_j) recomputed with θ's CFG velocity (the
    unconditional branch detached) at the recorded x_j, the PPO-clipped ratio against the recorded
    log-prob, plus β·KL of θ's step mean to the base model's; one backward per step and micro-chunk,
    each chunk weighted by its share of the rank's trained samples, so the step's loss is the mean over
    those samples as in the reference (scripts/train_sd3.py: per-process mean over the filtered
    samples, then the data-parallel mean over processes)."""

    name = "grpo"
    config_class = GRPOConfig
    record = "trajectory"
    trajectory_needs = TrajectoryNeeds(step_kinds=("flow_sde",))
    sampler_role = "p_old"
    gauges: ClassVar[dict[str, tuple[str, str]]] = {
        "clip_fraction": ("diffrl_learner_grpo_clip_fraction", "GRPO: fraction of ratios outside 1 +- clip_range."),
        "ratio_mean": ("diffrl_learner_grpo_ratio_mean", "GRPO: mean ratio p_theta/p_sampler."),
        "approx_kl": ("diffrl_learner_grpo_approx_kl", "GRPO: half the mean squared log-ratio."),
        "policy_loss": ("diffrl_learner_grpo_policy_loss", "GRPO: PPO-clipped surrogate loss."),
        "trained_fraction": ("diffrl_learner_grpo_trained_fraction",
                             "GRPO: fraction of the valid samples in the loss (nonzero advantage)."),
    }

    def __init__(self, config: GRPOConfig, learner_config):
        super().__init__(config, learner_config)
        self.T = config.num_train_steps()
        self._grids: dict[int, Tensor] = {}

    def sigmas(self, model) -> Tensor:
        """The σ grid ``[S + 1]`` float64 for ``model`` (its scheduler's ``num_train_timesteps``)."""
        n = int(getattr(model, "num_train_timesteps", 1000))
        if n not in self._grids:
            self._grids[n] = self.config.sigmas(n)
        return self._grids[n]

    def roles(self):
        return [Trainable("theta", backward_passes=self.T), EMA("p_old", "theta", lambda s: 0.0), Frozen("anchor")]

    @classmethod
    def check_recipe(cls, config: GRPOConfig, sampler) -> None:
        """The samplers record log-probs with the SDE and schedule that ``learner.grpo`` recomputes."""
        super().check_recipe(config, sampler)
        theirs = sampler.sampling.grid()  # [S + 1]: sampling.sigmas, or the flow SDE's scheduler grid
        if len(theirs) == config.num_sampling_steps + 1:  # (a step-count mismatch is reported below)
            same = torch.allclose(theirs, config.sigmas(), rtol=0.0, atol=1e-6)
            require(same, "learner.grpo.sigma_grid", "the grid the samplers sample on (sampler.sampling.sigmas, "
                    "else diffusers' scheduler grid)", config.sigma_grid)
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
        sigmas = trajectory_tensor(sample, "sigmas").to(torch.float64)
        if len(sigmas) != c.num_sampling_steps + 1:
            return (f"{len(sigmas) - 1} recorded steps, expected {c.num_sampling_steps} "
                    f"(learner.grpo.num_sampling_steps={c.num_sampling_steps})")
        if not torch.allclose(sigmas, self.sigmas(model), rtol=0.0, atol=1e-6):
            return ("recorded noise levels differ from learner.grpo's schedule (num_sampling_steps, time_shift, "
                    "sigma_grid)")
        for theirs, mine, name in ((sample.trajectory.noise_level, c.noise_level, "noise_level"),
                                   (sample.trajectory.guidance_scale, c.guidance_scale, "guidance_scale")):
            if not abs(theirs - mine) <= 1e-6:
                return f"sampled with {name}={theirs}, learner.grpo.{name}={mine}"
        return None

    def step(self, batch, ctx: StepContext) -> StepResult:
        c = self.config
        # A over every rank's groups (the batch std), then the samples the loss is taken over
        (a,) = ctx.batch_wide(lambda r, m: (grpo_advantages(r, m, c.adv_std, c.adv_eps, c.adv_clip),),
                              batch.rewards, batch.mask)  # [G, K]
        a = a.to(torch.float32)
        train = train_mask(a, batch.mask, c.skip_zero_adv)  # [G, K]
        n_train = int(train.sum())
        cond_groups = ctx.model.encode_prompts(batch.prompts)  # [G] embeds
        for j in range(self.T):
            for idx in ctx.chunks:
                sel = train[idx]  # [g, K]
                loss, st = self._chunk_loss(batch, ctx, j, idx, a, cond_groups, sel)
                share = float(sel.sum()) / n_train if n_train else 0.0  # the chunk's share of the trained
                ctx.backward("theta", loss, share)
                if st:
                    ctx.log(st, share)
        ctx.log({"trained_fraction": n_train / float(batch.n_valid)}, 1.0)
        if not n_train:  # nothing to train on: a zero-gradient step
            ctx.log({"loss": 0.0, "policy_loss": 0.0}, 1.0)
        return StepResult(advantages=a, adv_clip=c.adv_clip)

    def _step_terms(self, batch, ctx: StepContext, j: int, idx: Tensor, cond_groups, with_ref: bool,
                    sel: Tensor | None = None):
        """Denoising step j of the recorded trajectories of groups ``idx``, the samples ``sel`` ``[g, K]``
        (default: the valid ones; n of them): ``(log p_θ(x_{j+1} | x_j) [n] with grad, recorded log p [n],
        μ_θ [n, ...], μ_ref [n, ...] or None, step std, σ_j, σ_max, rows)``, log-probs reduced per
        ``grpo.log_prob_reduce``; θ's unconditional CFG branch is detached unless
        ``grpo.cfg_uncond_grad``."""
        c, model, dev = self.config, ctx.model, ctx.device
        traj = batch.trajectory
        K = batch.mask.shape[1]
        m_c = batch.mask[idx] if sel is None else sel  # [g, K]
        rows = m_c.reshape(-1).nonzero().squeeze(1)  # [n]
        sigmas = self.sigmas(model)  # [S + 1]
        x_t = traj.states[idx, :, j].flatten(0, 1)[rows].to(dev)  # [n, C, H, W] x_{σ_j}
        x_next = traj.states[idx, :, j + 1].flatten(0, 1)[rows].to(dev)  # [n, C, H, W] x_{σ_{j+1}}
        old = traj.log_probs[idx, :, j].reshape(-1)[rows].to(dev)  # [n] per-dimension mean, as recorded
        if c.log_prob_reduce == "sum":
            old = old * x_t[0].numel()  # the joint log-density
        n = x_t.shape[0]
        sigma, sigma_next = float(sigmas[j]), float(sigmas[j + 1])
        sigma_max = float(sigmas[1])
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
                                        uncond=uncond, detach_uncond=not c.cfg_uncond_grad)  # [n, C, H, W] grad
        lp, mean_theta, std = sde_step_log_prob(x_t, v_theta, x_next, sigma, sigma_next, c.noise_level, sigma_max,
                                                reduce=c.log_prob_reduce)  # [n], [n, C, H, W], []
        return lp, old, mean_theta, mean_ref, std, sigma, sigma_max, rows

    def _chunk_loss(self, batch, ctx, j: int, idx: Tensor, a: Tensor, cond_groups, sel: Tensor):
        """``grpo_step_loss`` of denoising step j over the samples ``sel`` ``[g, K]`` of the groups ``idx``
        (the chunk's trained samples) and its stats (clip_fraction, ratio_mean, approx_kl, policy_loss, kl,
        loss). A chunk without trained samples gives a zero loss (on one valid sample's forward, so the
        backward still has a graph) and no stats."""
        c = self.config
        if not bool(sel.any()):
            one = torch.zeros_like(sel)
            one.view(-1)[int(batch.mask[idx].reshape(-1).nonzero()[0])] = True  # [g, K] one valid sample
            lp, *_ = self._step_terms(batch, ctx, j, idx, cond_groups, with_ref=False, sel=one)
            return lp.sum() * 0.0, {}
        use_ref = c.kl_beta > 0
        lp, old, mean_theta, mean_ref, std, sigma, sigma_max, rows = self._step_terms(
            batch, ctx, j, idx, cond_groups, with_ref=use_ref, sel=sel)
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
