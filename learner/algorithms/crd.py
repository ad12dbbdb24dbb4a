"""Centered Reward Distillation (CRD, arXiv 2603.14128): the learner's primary algorithm, as pure
functions of tensors (no model code, no globals). The math: docs/algorithms.md, "CRD".

Notation (rectified flow, SD3 family):
    x0        clean sample (latent),             ε ~ N(0, I) noise
    σ ∈ (0,1] noise level,                       x_σ = (1 − σ)·x0 + σ·ε
    u = ε − x0 target velocity,                  v(x_σ, σ, c) a network's velocity for prompt c
    v_θ       trained model (grad),              v_old  slow EMA reference p_old (no grad)
    v_φ^w     frozen pretrained model with CFG scale w (the KL anchor, no grad)
    r_i       external reward of sample i,       a_i / ã_i its advantage / normalized advantage
    R̂_i       implicit reward,                   β (`beta`), s (`grad_scale`)

Batch layout: a batch is G prompt groups of K samples. Per-sample scalars are ``[G, K]``; per-sample
tensors (velocities, latents) are flattened group-major, ``[N, ...]`` with ``N = G·K`` and sample
``n = g·K + k`` (so ``x.view(G, K)`` of a per-sample ``[N]`` vector gives the groups).

One noise level of one learner step (``crd_step_loss``):
    R̂_i  = −( ‖v_θ − u‖²/w_θ,i − ‖v_old − u‖²/w_old,i )            (means over elements)
    R̂c_i = R̂_i − sg(mean_{j∈g} R̂_j),      ãc_i = ã_i − mean_{j∈g} ã_j
    L_CRD = (s/β)·mean_i (β·R̂c_i − ãc_i)²                          [or the logistic form]
    L_KL  = β_KL·mean_i[(c0 + ã_i(1 − c0))·‖v_θ − v_φ^w‖²],  c0 = β_min/β_KL
The prompt's log-partition log Z(c) is a per-group constant in R̂ and cancels under the centering;
the advantage is likewise invariant to adding a constant per prompt to the rewards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from diffrl.config import require
from diffrl.learner.advantages import STD_MODES, advantages
from diffrl.learner.algorithms.base import (
    EMA,
    Algorithm,
    Frozen,
    StepContext,
    StepResult,
    Trainable,
    register,
)
from diffrl.learner.ema import EMASchedule
from diffrl.learner.losses import (
    adaptive_weight,
    group_mean,
    kl_anchor,
    masked_mean,
    pearson,
    per_sample_mean,
)
from diffrl.learner.noise_levels import anchor_noise_levels, noise_levels, noised_chunk
from diffrl.models.sde import _compute_dtype

Tensor = torch.Tensor

LOSS_FORMS = ("mse", "logistic")


# --------------------------------------------------------------------------------------------------
# 1. Implicit reward, centering, matching loss
# --------------------------------------------------------------------------------------------------




def implicit_reward(v_theta: Tensor, v_old: Tensor, u: Tensor, adaptive: bool = True) -> Tensor:
    """R̂_i = −( ‖v_θ,i − u_i‖²/w_θ,i − ‖v_old,i − u_i‖²/w_old,i ), ‖·‖² a mean over elements.

    A (scaled) estimate of log p_θ/p_old at x0_i: lower denoising error than the reference at this
    noise level means higher likelihood. Gradients flow only into ``v_theta`` (``v_old`` and the
    weights are detached).

    Args:
        v_theta: ``[N, ...]`` velocity of θ (with grad).  v_old: ``[N, ...]`` velocity of p_old.
        u: ``[N, ...]`` target velocity ε − x0 (same ε as used for both forwards).
        adaptive: divide each error by its adaptive weight (``adaptive_weight``); else by 1.
    Returns:
        ``[N]`` float64.
    """
    return _implicit_reward_and_weights(v_theta, v_old, u, adaptive)[0]  # [N]


def _implicit_reward_and_weights(
    v_theta: Tensor, v_old: Tensor, u: Tensor, adaptive: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(R̂ [N], w_θ [N], w_old [N]); see ``implicit_reward``."""
    dt = _compute_dtype(v_theta)
    err_theta = per_sample_mean((v_theta.to(dt) - u.to(dt)) ** 2)  # [N] ‖v_θ − u‖²
    err_old = per_sample_mean((v_old.detach().to(dt) - u.to(dt)) ** 2)  # [N] ‖v_old − u‖²
    w_theta = adaptive_weight(v_theta, u, adaptive)  # [N] float64
    w_old = adaptive_weight(v_old, u, adaptive)  # [N] float64
    r_hat = -(err_theta.to(torch.float64) / w_theta - err_old.to(torch.float64) / w_old)  # [N]
    return r_hat, w_theta, w_old


def center_in_group(x: Tensor, detach_mean: bool, mask: Tensor | None = None) -> Tensor:
    """x_i − mean_{j∈g} x_j for a ``[G, K]`` tensor; with ``detach_mean`` the group mean is a
    constant for autograd (sg(·), used for R̂). Masked entries come out as 0."""
    mean = group_mean(x, mask)  # [G, 1]
    if detach_mean:
        mean = mean.detach()
    out = x - mean  # [G, K]
    if mask is not None:
        out = out * mask.to(out.dtype)  # [G, K]
    return out


def crd_matching_loss(
    r_hat: Tensor,
    a_tilde: Tensor,
    beta: float = 1.0,
    grad_scale: float = 5.0,
    form: str = "mse",
    mask: Tensor | None = None,
) -> Tensor:
    """The centered reward-matching loss L_CRD (scalar).

    R̂c = R̂ − sg(mean_g R̂),  ãc = ã − mean_g ã  (both within the prompt group), then
        form="mse":      L = (s/β)·mean_i (β·R̂c_i − ãc_i)²
        form="logistic": L = (s/β)·mean_i BCEWithLogits(β·R̂c_i, target=sigmoid(ãc_i))
    The logistic form gets the same s/β factor as the MSE form (as in the reference port, which
    scales whichever loss it computed by adv_clip_max/β). The mean is over the valid samples.

    Note on sg: for the MSE form the gradient w.r.t. R̂ is the same with or without sg, because
    the residual β·R̂c − ãc already has zero group mean; for the logistic form the residual
    sigmoid(β·R̂c) − sigmoid(ãc) does not, and sg keeps each sample's gradient on its own R̂_i.

    Args:
        r_hat: ``[G, K]`` implicit rewards (with grad).  a_tilde: ``[G, K]`` normalized advantages.
        mask: optional ``[G, K]`` bool of valid samples.
    """
    require(beta > 0, "beta", "> 0", beta)
    require(form in LOSS_FORMS, "form", f"one of {LOSS_FORMS}", form)
    require(r_hat.shape == a_tilde.shape, "a_tilde", f"shape {tuple(r_hat.shape)}", tuple(a_tilde.shape))
    r_c = center_in_group(r_hat, detach_mean=True, mask=mask)  # [G, K] R̂c
    a_c = center_in_group(a_tilde.detach().to(r_hat.dtype), detach_mean=False, mask=mask)  # [G, K] ãc
    logits = beta * r_c  # [G, K]
    if form == "mse":
        per_sample = (logits - a_c) ** 2  # [G, K]
    else:
        per_sample = F.binary_cross_entropy_with_logits(
            logits, torch.sigmoid(a_c), reduction="none"
        )  # [G, K]
    return (grad_scale / beta) * masked_mean(per_sample, mask)  # []


# --------------------------------------------------------------------------------------------------
# 2. KL anchor with reward-adaptive strength
# --------------------------------------------------------------------------------------------------


def cfg(v_uncond: Tensor, v_cond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance v^w = v(·, ∅) + w·(v(·, c) − v(·, ∅)). Shapes ``[N, ...]``."""
    return v_uncond + w * (v_cond - v_uncond)  # [N, ...]




def reward_adaptive_kl_loss(
    kl: Tensor,
    a_tilde: Tensor,
    beta_kl: float = 0.1,
    beta_min: float = 1e-4,
    adaptive: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """L_KL = β_KL·mean_i[(c0 + ã_i·(1 − c0))·kl_i], c0 = β_min/β_KL (scalar).

    Per-sample strength runs from β_min (ã = 0, worst sample) to β_KL (ã = 1, best sample): the
    well-rewarded samples are held closest to the anchor. ``adaptive=False`` is the fixed-strength
    ablation β_KL·mean_i kl_i. ``beta_kl == 0`` gives 0.

    Args:
        kl: ``[G, K]`` per-sample KL proxies (with grad).  a_tilde: ``[G, K]`` (uncentered) ã.
    """
    require(beta_kl >= 0, "beta_kl", ">= 0", beta_kl)
    if beta_kl == 0:
        return kl.new_zeros(())  # []
    if adaptive:
        require(0 <= beta_min <= beta_kl, "beta_min", f"in [0, beta_kl={beta_kl}]", beta_min)
        c0 = beta_min / beta_kl
        coef = c0 + a_tilde.detach().to(kl.dtype) * (1.0 - c0)  # [G, K]
    else:
        coef = torch.ones_like(kl)  # [G, K]
    return beta_kl * masked_mean(coef * kl, mask)  # []


# --------------------------------------------------------------------------------------------------
# 3. Configuration and the per-noise-level loss
# --------------------------------------------------------------------------------------------------




def _old_ema_default() -> EMASchedule:
    return EMASchedule(start_step=0, start_decay=0.25, slope=0.005, max_decay=0.999)


def _sampler_ema_default() -> EMASchedule:
    return EMASchedule(start_step=75, start_decay=0.0, slope=0.0075, max_decay=0.999)


@dataclass
class CRDConfig:
    """Hyperparameters of Centered Reward Distillation (defaults: the SD3.5-M reference, docs/algorithms.md)."""

    beta: float = 1.0
    """β (crd_beta): scale of the implicit reward in the matching loss (β·R̂c vs ãc)."""
    grad_scale: float = 5.0
    """s: the matching loss is multiplied by s/β (the reference's adv_clip_max/β)."""
    loss_form: str = "mse"
    """Matching loss: 'mse' (β·R̂c − ãc)² or 'logistic' BCEWithLogits(β·R̂c, sigmoid(ãc)); both ×s/β."""
    adaptive_weighting: bool = True
    """Divide each squared velocity error in R̂ by its detached per-sample mean|v − u| (float64, ≥1e-5)."""
    std_mode: str = "global"
    """Advantage scale: std of within-group-centered rewards over the whole batch ('global'), per group
    ('group'), or of the raw rewards over the batch ('batch')."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip; ã = a/(2·adv_clip) + 0.5 ∈ [0, 1]."""
    std_eps: float = 1e-6
    """Relative tie guard: where the advantage std is ≤ std_eps × the batch's largest |reward| (equal
    rewards up to float rounding) the advantages are 0 (learner/advantages.py)."""
    num_noise_levels: int = 20
    """T: training noise levels per learner step (gradients accumulated across them)."""
    num_sampling_steps: int = 10
    """Steps of the training sampler; noise levels are drawn from its (shifted) grid. 0 = continuous."""
    time_shift: float = 3.0
    """SD3 shift of the sampler's schedule, σ' = shift·σ/(1 + (shift − 1)·σ); 1 = no shift."""
    top_fraction: float = 0.99
    """Noise levels are restricted to σ ∈ [1 − top_fraction, 1] (skips the near-clean tail)."""
    num_anchor_levels: int = 0
    """T_a: extra noise levels per learner step below the matching range (σ < 1 − top_fraction) where
    only the KL anchor is applied (``anchor_noise_levels``): match where the layout is decided, keep
    the near-clean details anchored. 0 = off (the anchor acts only at the T matching levels)."""
    group_shared_noise: bool = False
    """Draw one ε per (prompt group, t), shared by the group's K samples, instead of one per (sample, t).
    The matching loss is a within-group contrast, so noise common to the group cancels in it."""
    use_kl_anchor: bool = True
    """Add the KL anchor to the CFG-guided frozen model (off: ablation without L_KL)."""
    beta_kl: float = 0.1
    """β_KL: KL anchor strength for the best-rewarded samples (ã = 1)."""
    beta_min: float = 1e-4
    """β_min: KL anchor strength for the worst samples (ã = 0) under reward-adaptive KL."""
    kl_cfg_scale: float = 4.5
    """w_kl: CFG scale of the frozen anchor's velocity (4.5 for SD3.5-M; a small base model may differ)."""
    reward_adaptive_kl: bool = True
    """Per-sample KL strength β_min..β_KL by ã (off: fixed β_KL for every sample, an ablation)."""
    decoupled_sampler: bool = True
    """Sample with a separate snapshot p_samp (``sampler_ema``); off: p_old is also the sampler."""
    old_ema: EMASchedule = field(default_factory=_old_ema_default)
    """Blend schedule of p_old, the reference inside R̂: (s0, a, k, d_max) = (0, 0.25, 0.005, 0.999)."""
    sampler_ema: EMASchedule = field(default_factory=_sampler_ema_default)
    """Blend schedule of p_samp, the sampling model: (75, 0.0, 0.0075, 0.999), an exact copy of θ
    for 75 steps, then an ever slower EMA."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip applied by the learner before each optimizer step."""

    def validate(self) -> None:
        require(self.beta > 0, "beta", "> 0", self.beta)
        require(self.grad_scale > 0, "grad_scale", "> 0", self.grad_scale)
        require(self.loss_form in LOSS_FORMS, "loss_form", f"one of {LOSS_FORMS}", self.loss_form)
        require(self.std_mode in STD_MODES, "std_mode", f"one of {STD_MODES}", self.std_mode)
        require(self.adv_clip > 0, "adv_clip", "> 0", self.adv_clip)
        require(0 < self.std_eps < 1, "std_eps", "a relative tolerance in (0, 1)", self.std_eps)
        require(self.num_noise_levels >= 1, "num_noise_levels", ">= 1", self.num_noise_levels)
        require(self.num_sampling_steps >= 0, "num_sampling_steps", ">= 0", self.num_sampling_steps)
        require(self.time_shift > 0, "time_shift", "> 0", self.time_shift)
        require(0.0 < self.top_fraction <= 1.0, "top_fraction", "in (0, 1]", self.top_fraction)
        require(self.beta_kl >= 0, "beta_kl", ">= 0", self.beta_kl)
        require(
            0.0 <= self.beta_min <= self.beta_kl or not (self.use_kl_anchor and self.reward_adaptive_kl),
            "beta_min",
            f"in [0, beta_kl={self.beta_kl}]",
            self.beta_min,
        )
        require(
            math.isfinite(self.kl_cfg_scale) and self.kl_cfg_scale >= 0,
            "kl_cfg_scale",
            ">= 0",
            self.kl_cfg_scale,
        )
        require(self.max_grad_norm > 0, "max_grad_norm", "> 0", self.max_grad_norm)
        require(self.num_anchor_levels >= 0, "num_anchor_levels", ">= 0", self.num_anchor_levels)
        if self.num_anchor_levels:
            require(self.use_kl_anchor and self.beta_kl > 0, "num_anchor_levels",
                     "0 without the KL anchor (use_kl_anchor and beta_kl > 0)", self.num_anchor_levels)
            # raises on a top_fraction that leaves no level below it (own generator: the global RNG is untouched)
            self.anchor_noise_levels(torch.Generator())
        for name in ("old_ema", "sampler_ema"):
            try:
                getattr(self, name).validate()
            except ValueError as err:
                raise ValueError(f"{name}.{err}") from None

    def noise_levels(self, generator: torch.Generator | None = None) -> Tensor:
        """This config's T training noise levels, ``[T]`` (see ``noise_levels``)."""
        return noise_levels(
            self.num_noise_levels, self.num_sampling_steps, self.time_shift, self.top_fraction, generator
        )


    def anchor_noise_levels(self, generator: torch.Generator | None = None) -> Tensor:
        """This config's T_a anchor-only noise levels, ``[T_a]`` (see ``anchor_noise_levels``)."""
        return anchor_noise_levels(
            self.num_anchor_levels, self.num_sampling_steps, self.time_shift, self.top_fraction, generator
        )

    @property
    def levels_per_step(self) -> int:
        """Backward passes per micro-chunk in one learner step: T matching + T_a anchor-only levels."""
        return self.num_noise_levels + self.num_anchor_levels




def crd_step_loss(
    v_theta: Tensor,
    v_old: Tensor,
    u: Tensor,
    a_tilde: Tensor,
    config: CRDConfig,
    v_anchor: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_CRD + L_KL for one noise level σ_t of one batch; backpropagate it per t (accumulation).

    The caller draws ε per (sample, t), builds x_σ = interpolate(x0, ε, σ_t) and u = ε − x0, and
    evaluates θ (with grad), p_old and the anchor (no grad) at the same x_σ (common random numbers).

    Args:
        v_theta: ``[N, ...]`` v_θ(x_σ), N = G·K group-major.  v_old: ``[N, ...]`` v_old(x_σ).
        u: ``[N, ...]`` target ε − x0.  a_tilde: ``[G, K]`` normalized advantages (``advantages``).
        config: the CRD hyperparameters.
        v_anchor: ``[N, ...]`` CFG-guided frozen velocity v_φ^{w_kl}(x_σ) (``cfg``); required when
            ``config.use_kl_anchor`` and ``config.beta_kl > 0``.
        mask: optional ``[G, K]`` bool of valid samples.
    Returns:
        ``(loss, stats)``: the scalar loss (with grad) and detached scalar diagnostics: loss,
        matching_loss, kl_loss, kl_mean, r_hat_mean, r_hat_std, r_hat_centered_std, reward_corr
        (correlation of R̂c with ãc: how well the implicit reward already ranks the samples),
        w_theta_mean, w_old_mean.
    """
    G, K = a_tilde.shape
    require(v_theta.shape[0] == G * K, "v_theta", f"first dim G*K={G * K}", tuple(v_theta.shape))
    r_hat, w_theta, w_old = _implicit_reward_and_weights(
        v_theta, v_old, u, config.adaptive_weighting
    )  # [N] x3
    r_hat = r_hat.view(G, K)  # [G, K]
    l_crd = crd_matching_loss(r_hat, a_tilde, config.beta, config.grad_scale, config.loss_form, mask)  # []
    use_kl = config.use_kl_anchor and config.beta_kl > 0
    if use_kl:
        require(v_anchor is not None, "v_anchor", "a tensor when the KL anchor is on", None)
        kl = kl_anchor(v_theta, v_anchor).view(G, K)  # [G, K]
        l_kl = reward_adaptive_kl_loss(
            kl, a_tilde, config.beta_kl, config.beta_min, config.reward_adaptive_kl, mask
        ).to(l_crd.dtype)  # []
    else:
        kl = None
        l_kl = l_crd.new_zeros(())  # []
    loss = l_crd + l_kl  # []

    with torch.no_grad():

        def valid(x: Tensor) -> Tensor:  # [G, K] -> [M], M valid samples (no host sync without a mask)
            return x.reshape(-1) if mask is None else x[mask.bool()]

        r_valid = valid(r_hat.detach())  # [M]
        r_c = valid(center_in_group(r_hat.detach(), True, mask))  # [M]
        a_c = valid(center_in_group(a_tilde.detach().to(r_hat.dtype), False, mask))  # [M]
        stats = {
            "loss": loss.detach(),
            "matching_loss": l_crd.detach(),
            "kl_loss": l_kl.detach(),
            "kl_mean": masked_mean(kl.detach(), mask) if kl is not None else l_crd.new_zeros(()),
            "r_hat_mean": r_valid.mean(),
            "r_hat_std": r_valid.std(unbiased=False),
            "r_hat_centered_std": r_c.pow(2).mean().sqrt(),
            "reward_corr": pearson(r_c, a_c),
            "w_theta_mean": w_theta.mean(),
            "w_old_mean": w_old.mean(),
        }
    return loss, stats


def crd_anchor_loss(
    v_theta: Tensor,
    v_anchor: Tensor,
    a_tilde: Tensor,
    config: CRDConfig,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_KL alone, for one anchor-only noise level (``CRDConfig.num_anchor_levels``): no matching term,
    so p_old is not needed. Same reward-adaptive strength as in ``crd_step_loss``.

    Args:
        v_theta: ``[N, ...]`` v_θ(x_σ) (with grad).  v_anchor: ``[N, ...]`` v_φ^{w_kl}(x_σ).
        a_tilde: ``[G, K]`` normalized advantages.  mask: optional ``[G, K]`` bool of valid samples.
    Returns:
        ``(loss, stats)``; stats (detached scalars): loss (so the learner's mean loss over all levels is
        the objective it optimizes), anchor_kl_loss, anchor_kl_mean.
    """
    G, K = a_tilde.shape
    require(v_theta.shape[0] == G * K, "v_theta", f"first dim G*K={G * K}", tuple(v_theta.shape))
    kl = kl_anchor(v_theta, v_anchor).view(G, K)  # [G, K]
    loss = reward_adaptive_kl_loss(kl, a_tilde, config.beta_kl, config.beta_min, config.reward_adaptive_kl, mask)  # []
    stats = {"loss": loss.detach(), "anchor_kl_loss": loss.detach(), "anchor_kl_mean": masked_mean(kl.detach(), mask)}
    return loss, stats


# --------------------------------------------------------------------------------------------------
# 4. The algorithm: roles and one learner step
# --------------------------------------------------------------------------------------------------


@register
class CRD(Algorithm):
    """Centered Reward Distillation on the learner's seam.

    Roles: θ (trainable), p_old (EMA of θ on ``old_ema``, the reference inside R̂), p_samp (EMA of θ on
    ``sampler_ema``, published to the samplers; without ``decoupled_sampler`` p_old is published
    instead) and the frozen base model (the CFG-guided KL anchor).

    One step: advantages over every rank's groups (the global std is the batch's), the T matching
    levels and then T_a anchor-only levels drawn from the step's generator, a fresh ε per sample and
    level (or per group, ``group_shared_noise``) shared by θ, p_old and the anchor (common random
    numbers), one backward per level and micro-chunk of ``crd_step_loss`` (``crd_anchor_loss`` at the
    anchor-only levels), one optimizer step on the mean over levels of the batch loss.
    """

    name = "crd"
    config_class = CRDConfig
    record = "final"
    gauges: ClassVar[dict[str, tuple[str, str]]] = {
        "matching_loss": ("diffrl_learner_crd_matching_loss", "CRD centered reward-matching loss."),
        "beta": ("diffrl_learner_beta", "CRD beta."),
        "implicit_reward_mean": ("diffrl_learner_implicit_reward_mean", "Mean implicit reward."),
        "implicit_reward_std": ("diffrl_learner_implicit_reward_std", "Implicit reward standard deviation."),
        "implicit_reward_corr": ("diffrl_learner_implicit_reward_corr",
                                 "Correlation of centered implicit reward and centered advantage."),
    }
    stat_aliases: ClassVar[dict[str, str]] = {"implicit_reward_mean": "r_hat_mean", "implicit_reward_std": "r_hat_std",
                    "implicit_reward_corr": "reward_corr"}

    def __init__(self, config: CRDConfig, learner_config):
        super().__init__(config, learner_config)
        self.sampler_role = "p_samp" if config.decoupled_sampler else "p_old"
        self.default_grad_clip = float(config.max_grad_norm)

    def roles(self):
        c = self.config
        roles = [Trainable("theta", backward_passes=c.levels_per_step), EMA("p_old", "theta", c.old_ema.decay)]
        if c.decoupled_sampler:
            roles.append(EMA("p_samp", "theta", c.sampler_ema.decay))
        return [*roles, Frozen("anchor")]

    def step(self, batch, ctx: StepContext) -> StepResult:
        c, model, dev = self.config, ctx.model, ctx.device
        a, a_tilde = ctx.batch_wide(
            lambda r, m: advantages(r, m, c.std_mode, c.adv_clip, c.std_eps), batch.rewards, batch.mask)  # [G, K] x2
        a, a_tilde = a.to(torch.float32), a_tilde.to(torch.float32)
        sigmas = c.noise_levels(ctx.generator)  # [T] matching levels
        if c.num_anchor_levels:  # then T_a anchor-only levels below them
            sigmas = torch.cat([sigmas, c.anchor_noise_levels(ctx.generator)])  # [T + T_a]
        cond_groups = model.encode_prompts(batch.prompts)  # [G] embeds
        x0, mask = batch.x0, batch.mask  # [G, K, C, H, W], [G, K]
        G, K = mask.shape
        use_kl = c.use_kl_anchor and c.beta_kl > 0
        for t in range(c.levels_per_step):
            anchor_only = t >= c.num_noise_levels
            sigma = float(sigmas[t])
            if c.group_shared_noise:  # one ε per (group, t): common to the contrast
                eps_all = torch.randn(G, 1, *x0.shape[2:], generator=ctx.generator).expand(G, K, *x0.shape[2:])
            else:
                eps_all = torch.randn(G, K, *x0.shape[2:], generator=ctx.generator)  # [G, K, C, H, W]
            for idx in ctx.chunks:
                m_c = mask[idx]  # [g, K]
                ch = noised_chunk(x0, eps_all, idx, sigma, cond_groups, dev)  # x_t, u [n, C, H, W]
                with torch.no_grad(), ctx.autocast():
                    v_old = None if anchor_only else model.velocity(
                        ch.x_t, ch.sigma, ch.cond, transformer=ctx.net("p_old")).float()  # [n, C, H, W]
                    v_anchor = None if not use_kl else model.guided_velocity(
                        ch.x_t, ch.sigma, ch.cond, c.kl_cfg_scale, transformer=ctx.net("anchor"),
                        uncond=model.empty_embeds(m_c.numel())).float()  # [n, C, H, W]
                v_theta = model.velocity(ch.x_t, ch.sigma, ch.cond, transformer=ctx.net("theta"))  # [n, ...] grad
                m_dev = m_c.to(dev) if batch.padded else None
                if anchor_only:
                    loss, st = crd_anchor_loss(v_theta, v_anchor, a_tilde[idx].to(dev), c, m_dev)
                else:
                    loss, st = crd_step_loss(v_theta, v_old, ch.u, a_tilde[idx].to(dev), c, v_anchor, m_dev)
                share = float(m_c.sum()) / batch.n_valid  # this chunk's share of the rank's mean
                ctx.backward("theta", loss, share)
                ctx.log(st, share)
        return StepResult(advantages=a, adv_clip=c.adv_clip, stats={"beta": float(c.beta)})
