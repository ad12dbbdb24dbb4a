"""TDM-R1: reinforcing a few-step student with non-differentiable rewards through a learned surrogate
(Luo et al., arXiv 2603.07700). Follows the official training script, Luo-Yihong/TDM-R1
scripts/train_tdmr1_pub.py (in the repository's history at cc55d8975345e565b09d9c02c2800b69ca26fe90),
with defaults from its config/tdmr1_clean.py.

The samplers run the student G deterministically (Euler, at CFG 1, on its own σ grid) and record the
trajectory x_0 .. x_S; the rewards score the final samples over HTTP. One learner step draws M of the
S step indices (shared by every rank) and, for each drawn j at the recorded state x_j:

(a) **fake score** f: G's x̂0 and x_next (no grad), renoised to τ (uniform in unshifted time between
    σ_next + margin and 1, then shifted), regressed onto (x_τ − x̂0)/σ_τ, plus 0.02·‖v_real − v_f‖²;
(b) **surrogate reward** s, a diffusion model trained by group Bradley–Terry on renoised recorded
    states: step j' ∝ j' + 1, x_next(j') diffused to τ' with noise shared within the prompt group,
    the denoising target v*, dsm = ‖v* − v_s‖², a trust region against its slow copy s_old and a
    gate against the reference, weight t_w = (j' + 1)/S;
(c) **generator** G, with grad at x_j, towards three x0-space targets: KL x̂0 + (x̂0_real − x̂0_fake),
    CFG-as-reward x̂0 + 3.5·(x̂0_cond − x̂0_uncond) and the surrogate's x̂0 + (x̂0_s^cfg − x̂0_ref),
    normalized by mean |x̂0 − x̂0_real^{CFG 4.5}| (and |x̂0 − x̂0_s^cfg| for the surrogate term).

Gradients accumulate over the M draws and the batch; each network takes one optimizer step per
learner step. s_old follows s with decay min(0.3, 0.001 + 0.001·(s − 1)); G's EMA (decay
min(s/(9 + s), 0.9)) is what the learner evaluates and exports; the samplers use G itself.

Deviations (docs/algorithms.md, "TDM-R1"), each on purpose:
* advantages divide the within-group-centred rewards by their batch-wide std (the script's
  ``global_std`` divides by the std of the raw rewards, which leaks between-prompt scale; ``adv_std:
  batch`` restores it);
* the networks are full copies on the shapes world (the official run uses LoRAs on one frozen SD3.5-M;
  ``learner.lora`` gives LoRAs here too): G starts from the student, f and s from the teacher (the
  script's zero-initialized LoRAs on the base are the base);
* asynchrony: the script is on-policy; here groups may be up to ``learner.max_staleness`` versions old
  (2 in the recipes) and the staleness is recorded;
* the τ draws use ``tau_shift`` (the script hard-codes SD3's 3; the shapes base samples unshifted).

Notation: x_j the recorded state at σ_j (j = 0 noisiest), σ_n = σ_{j+1}; x̂0 = x_j − σ_j·v_G; the
renoising of x_next to σ_τ: x_τ = α·x_next + β·ε, α = (1 − σ_τ)/(1 − σ_n), β = √(σ_τ² − (σ_n·α)²);
A the advantages; K samples per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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
from diffrl.learner.batch import TrajectoryNeeds
from diffrl.models.adapter import PromptEmbeds

Tensor = torch.Tensor


# ------------------------------------------------------------------------------ noise levels


def shift_sigma(t: Tensor, shift: float) -> Tensor:
    """σ = s·t / (1 + (s − 1)·t) (the script's ``convert`` in 0..1000 units)."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """The inverse of :func:`shift_sigma` (the script's ``inv_convert``)."""
    return sigma / (shift - (shift - 1) * sigma)


def draw_tau(sigma_next: Tensor, u: Tensor, shift: float, floor: float = 0.0, margin: float = 0.02,
             clamp: bool = False) -> Tensor:
    """A renoising level above σ_next: lower = max(σ_next, floor), lo = unshift(lower) + margin,
    τ = shift(lo + u·(1 − lo)) for u ∈ [0, 1); ``clamp``: τ = max(τ, lower) (the generator's surrogate
    level, ``tau_dgpo``). The script's 20/1000 margin is ``margin`` 0.02. Shapes broadcast."""
    lower = torch.clamp_min(sigma_next, floor)
    lo = unshift_sigma(lower, shift) + margin
    tau = shift_sigma(lo + u * (1 - lo), shift)
    return torch.maximum(tau, lower) if clamp else tau


def renoise_coefficients(sigma_tau: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """(α, β) of x_τ = α·x_next + β·ε that takes a flow state at σ_next to σ_τ ≥ σ_next:
    α = (1 − σ_τ)/(1 − σ_n), β = √(σ_τ² − (σ_n·α)²) (the x0 coefficient becomes 1 − σ_τ and the noise
    variance σ_τ²)."""
    alpha = (1 - sigma_tau) / (1 - sigma_next)
    beta = (sigma_tau**2 - (sigma_next * alpha) ** 2).clamp_min(0).sqrt()
    return alpha, beta


def surrogate_target(x_next: Tensor, eps: Tensor, sigma_tau: Tensor, sigma_next: Tensor, alpha: Tensor,
                     beta: Tensor) -> Tensor:
    """The surrogate's velocity target at x_τ = α·x_next + β·ε (train_tdmr1_pub.py, ``target_v_dgpo``):

        v* = −x_next/(1 − σ_n) + (ε/β)·(σ_τ + σ_n²·α/(1 − σ_n))

    which is ε − x0 when σ_n = 0 (then x_next = x0, α = 1 − σ_τ, β = σ_τ)."""
    return -x_next / (1 - sigma_next) + eps / beta * (sigma_tau + sigma_next**2 * alpha / (1 - sigma_next))


# ---------------------------------------------------------------------------------- (a) fake score


def fake_score_loss(v_fake: Tensor, target_v: Tensor, v_real: Tensor, reg: float = 0.02) -> Tensor:
    """L_f = mean (target − v_f)² + reg·mean (v_real − v_f)² (``loss_fake + 0.02 * loss_reg_fake``).
    ``[n, C, H, W]`` each (target and v_real without grad) -> scalar."""
    return (target_v.detach() - v_fake).square().mean() + reg * (v_real.detach() - v_fake).square().mean()


# ----------------------------------------------------------------------------- (b) surrogate reward


def trust_region_mask(adv: Tensor, dsm: Tensor, dsm_old: Tensor, clip_range: float) -> Tensor:
    """Samples whose denoising loss moved too far from s_old's in the direction the advantage pushes:
    ratio = exp(dsm_old − dsm); A > 0: ratio > 1 + c; A ≤ 0: ratio < 1 − c (``should_clip``). ``[n]``."""
    ratio = torch.exp(dsm_old - dsm)
    return torch.where(adv > 0, ratio > 1 + clip_range, ratio < 1 - clip_range)


def reference_gate_mask(adv: Tensor, dsm: Tensor, dsm_ref: Tensor, reg_mean: Tensor, threshold: float) -> Tensor:
    """While s is far from the reference (batch mean ‖v_s − v_ref‖² > threshold), samples already past
    the reference in the advantage's direction: A > 0 and dsm < dsm_ref, or A ≤ 0 and dsm > dsm_ref
    (``should_clip_ref``). ``[n]``; ``reg_mean`` a scalar."""
    ref_ratio = torch.exp(dsm_ref - dsm)
    return (reg_mean > threshold) & torch.where(adv > 0, ref_ratio > 1, ref_ratio < 1)


def group_bradley_terry_loss(dsm: Tensor, dsm_ref: Tensor, adv: Tensor, group: Tensor, beta_dpo: float, K: int
                             ) -> tuple[Tensor, Tensor]:
    """The group Bradley–Terry term (``compute_group_dgpo_loss_allreduce``):

        z_g = Σ_{i∈g} A_i·β_dpo·(dsm_i − dsm_ref,i)/K   (detached),   L = mean_i σ(z_{g(i)})·A_i·dsm_i

    ``dsm``, ``dsm_ref``, ``adv`` ``[n]``; ``group [n]`` int64 group index of each sample (every group
    whole); returns ``(loss [], mean weight σ(z) [])``."""
    term = adv * beta_dpo * (dsm.detach() - dsm_ref.detach()) / K  # [n]
    sums = torch.zeros(int(group.max()) + 1, dtype=term.dtype, device=term.device).index_add_(0, group, term)
    weight = torch.sigmoid(sums)[group].detach()  # [n]
    return (weight * adv * dsm).mean(), weight.mean()


def surrogate_loss(v_s: Tensor, v_old: Tensor, v_ref: Tensor, target: Tensor, adv: Tensor, group: Tensor, K: int,
                   beta_dpo: float, reg: float, clip_range: float, reg_threshold: float, t_weight: float
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """L_s = t_w·[BT(dsm') + reg·mean ‖v_s − v_ref‖²] with dsm' = dsm detached where the trust region or
    the reference gate says so. Velocities ``[n, C, H, W]`` (only ``v_s`` with grad), ``adv``/``group``
    ``[n]``. Returns the loss and detached stats (dsm, trust-region and gate fractions, BT weight)."""
    n = v_s.shape[0]
    dsm = (target - v_s).square().reshape(n, -1).mean(dim=1)  # [n]
    dsm_old = (target - v_old).square().reshape(n, -1).mean(dim=1).detach()  # [n]
    dsm_ref = (target - v_ref).square().reshape(n, -1).mean(dim=1).detach()  # [n]
    reg_loss = (v_s.float() - v_ref.detach().float()).square().reshape(n, -1).mean(dim=1).mean()  # []
    trust = trust_region_mask(adv, dsm.detach(), dsm_old, clip_range)  # [n]
    dsm = torch.where(trust, dsm.detach(), dsm)
    gate = reference_gate_mask(adv, dsm.detach(), dsm_ref, reg_loss.detach(), reg_threshold)  # [n]
    dsm = torch.where(gate, dsm.detach(), dsm)
    bt, weight = group_bradley_terry_loss(dsm, dsm_ref, adv, group, beta_dpo, K)
    loss = t_weight * (bt + reg * reg_loss)
    return loss, {"surrogate_dsm": dsm.detach().mean(), "trust_region_fraction": trust.float().mean(),
                  "gate_fraction": gate.float().mean(), "bt_weight": weight, "surrogate_reg": reg_loss.detach(),
                  "surrogate_bt": bt.detach()}


# ------------------------------------------------------------------------------------ (c) generator


def generator_loss(x0: Tensor, x0_real_cond: Tensor, x0_real_uncond: Tensor, x0_real_cfg: Tensor, x0_fake: Tensor,
                   x0_s_cfg: Tensor | None, x0_ref: Tensor | None, tdm_weight: float = 0.3,
                   cfg_reward_scale: float = 3.5) -> tuple[Tensor, dict[str, Tensor]]:
    """G's loss towards three x0-space targets (train_tdmr1_pub.py, "TDM-R1 Training of few-step generator"):

        Δkl = x̂0_real,cond − x̂0_fake,  Δcfg = cfg_reward_scale·(x̂0_cond − x̂0_uncond),  Δrew = x̂0_s^cfg − x̂0_ref
        w = mean |x̂0 − x̂0_real^cfg| (per sample),  w_d = mean |x̂0 − x̂0_s^cfg|
        L = tdm_weight·mean(‖Δcfg‖²/w) + (1 − tdm_weight)·mean(‖Δrew‖²/w_d) + mean(‖Δkl‖²/w)

    each target ``x̂0 + Δ`` detached, so the gradient moves x̂0 along Δ. Without the surrogate term
    (``x0_s_cfg`` None: steps j ≥ trunc_steps) L = tdm_weight·mean((‖Δcfg‖² + ‖Δkl‖²)/w). ``x0 [n, C, H, W]``
    with grad, the rest without. Returns the loss and detached stats."""
    dims = list(range(1, x0.ndim))
    kl_target = (x0 + (x0_real_cond - x0_fake)).detach()
    cfg_target = (x0 + cfg_reward_scale * (x0_real_cond - x0_real_uncond)).detach()
    w = (x0.double() - x0_real_cfg.double()).abs().mean(dim=dims, keepdim=True).detach()  # [n, 1, 1, 1]
    err_kl = (kl_target - x0).square()
    err_cfg = (cfg_target - x0).square()
    loss_kl = (err_kl / w).mean()
    loss_cfg = (err_cfg / w).mean()
    stats = {"gen_kl_loss": loss_kl.detach(), "gen_cfg_loss": loss_cfg.detach(), "gen_weight": w.mean().detach()}
    if x0_s_cfg is None:
        return tdm_weight * ((err_cfg + err_kl) / w).mean(), stats
    rew_target = (x0 + (x0_s_cfg - x0_ref)).detach()
    w_d = (x0.double() - x0_s_cfg.double()).abs().mean(dim=dims, keepdim=True).detach()
    loss_rew = ((rew_target - x0).square() / w_d).mean()
    stats.update(gen_reward_loss=loss_rew.detach(), gen_reward_weight=w_d.mean().detach())
    return tdm_weight * loss_cfg + (1 - tdm_weight) * loss_rew + loss_kl, stats


# ------------------------------------------------------------------------------------------- metric


def rank_agreement(scores: Tensor, rewards: Tensor, mask: Tensor) -> float:
    """Mean over groups of the Spearman correlation between ``scores`` and ``rewards`` (``[G, K]``,
    valid where ``mask``); groups with tied rewards or fewer than 3 valid samples are skipped. NaN when
    none counts."""
    out = []
    for s, r, m in zip(scores, rewards, mask):
        s, r = s[m].double(), r[m].double()
        if len(r) < 3 or float(r.std()) == 0.0 or float(s.std()) == 0.0:
            continue
        rs, rr = _ranks(s), _ranks(r)
        out.append(float(torch.corrcoef(torch.stack([rs, rr]))[0, 1]))
    return sum(out) / len(out) if out else float("nan")


def _ranks(x: Tensor) -> Tensor:
    """Ranks with ties averaged (Spearman's)."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for v in x.unique():
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


# ------------------------------------------------------------------------------------------- config

ADV_STD = ("global", "batch")


@dataclass
class TDMR1Config:
    """``learner.tdmr1``. Defaults are the official GenEval run's (config/tdmr1_clean.py,
    ``geneval_sd3_8gpu_G24_24_4step``) unless noted; the OCR run differs in ``rl_cfg`` 4.5,
    ``t_min_reward`` 0.3, ``t_min_surrogate`` 0.3 and ``beta_dpo`` 10 (deploy/configs/sd35m-tdmr1-ocr.yaml)."""

    train_steps: int = 2
    """M: step indices trained per learner step, drawn without replacement and shared by every rank
    (num_train_timesteps)."""
    trunc_steps: int = 4
    """Steps j < trunc_steps get the surrogate term in G's loss; later ones only the distillation terms
    (trunc_steps)."""
    tau_shift: float = 3.0
    """Shift of the τ draws (the script's convert/inv_convert with s = 3, SD3.5's shift; the shapes
    recipe samples unshifted, 1.0)."""
    tau_margin: float = 0.02
    """τ is drawn at least this far (in unshifted time) above its lower bound (the script's 20/1000)."""
    t_min_reward: float = 0.25
    """Floor of the generator's surrogate level τ_d (t_min_dgpo / 1000: 250 GenEval, 300 OCR)."""
    t_min_surrogate: float = 0.55
    """Floor of the surrogate's training level τ' (t_min_dgpo_reward / 1000: 550 by default, 300 OCR)."""
    real_guidance: float = 4.5
    """CFG of the teacher's x̂0 in G's normalizer w (hard-coded 4.5)."""
    cfg_reward_scale: float = 3.5
    """Scale of CFG-as-reward, x̂0 + scale·(x̂0_cond − x̂0_uncond) (hard-coded 3.5)."""
    rl_cfg: float = 2.5
    """CFG of the surrogate's x̂0 in G's reward target (rl_cfg: 2.5 GenEval, 4.5 OCR)."""
    tdm_weight: float = 0.3
    """Weight of the CFG-as-reward term; the surrogate term gets 1 − tdm_weight (train.tdm_weight)."""
    fake_reg: float = 0.02
    """Weight of ‖v_real − v_f‖² in the fake-score loss (hard-coded 0.02)."""
    beta_dpo: float = 1.0
    """β of the group Bradley–Terry term (train.beta_dpo: 1, 10 for OCR)."""
    surrogate_reg: float = 0.001
    """Weight of ‖v_s − v_ref‖² in the surrogate loss (train.beta)."""
    clip_range: float = 1e-3
    """Trust region c of the surrogate against s_old (clip_range)."""
    reg_threshold: float = 0.05
    """The reference gate opens when the batch mean ‖v_s − v_ref‖² exceeds this (reg_threshold)."""
    step_weight: bool = True
    """Weight the surrogate loss by t_w = (j' + 1)/S (use_tweight)."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip (train.adv_clip_max)."""
    adv_eps: float = 1e-4
    """Added to the advantages' std (stat_tracking.py)."""
    adv_std: str = "global"
    """global: std of the within-group-centred rewards over the batch (ours); batch: std of the raw
    rewards, the script's global_std."""
    lr_generator: float = 7.5e-5
    """G's learning rate (train.learning_rate / 4)."""
    lr_fake: float = 3e-4
    """f's learning rate (train.learning_rate)."""
    lr_surrogate: float = 3e-4
    """s's learning rate (train.learning_rate)."""
    betas_generator: list[float] = field(default_factory=lambda: [0.0, 0.999])
    """G's AdamW betas (train.adam_beta1 0)."""
    betas_fake: list[float] = field(default_factory=lambda: [0.0, 0.999])
    """f's AdamW betas (train.adam_beta1 0)."""
    betas_surrogate: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """s's AdamW betas (train.rl_adam_beta1/2)."""
    ema_decay: float = 0.9
    """Cap of the decay of G's EMA (the evaluated model): min(s/(9 + s), ema_decay) (ema_decay_g)."""
    old_decay_min: float = 0.001
    """s_old's decay at the first step (ema_old_decay_min); + old_decay_rate per step."""
    old_decay_rate: float = 0.001
    """Growth of s_old's decay per learner step (the script's 0.001·global_step)."""
    old_decay_max: float = 0.3
    """Cap of s_old's decay (ema_old_decay_max)."""

    def validate(self) -> None:
        require(self.train_steps >= 1, "train_steps", "an int >= 1", self.train_steps)
        require(self.trunc_steps >= 0, "trunc_steps", "an int >= 0", self.trunc_steps)
        require(self.tau_shift > 0, "tau_shift", "> 0", self.tau_shift)
        require(0 <= self.tau_margin < 1, "tau_margin", "in [0, 1)", self.tau_margin)
        for name in ("t_min_reward", "t_min_surrogate"):
            require(0 <= getattr(self, name) < 1, name, "in [0, 1)", getattr(self, name))
        require(0 <= self.tdm_weight <= 1, "tdm_weight", "in [0, 1]", self.tdm_weight)
        require(self.adv_std in ADV_STD, "adv_std", f"one of {ADV_STD}", self.adv_std)
        require(self.adv_clip > 0 and self.adv_eps >= 0, "adv_clip", "adv_clip > 0 and adv_eps >= 0", self.adv_clip)
        require(self.clip_range > 0, "clip_range", "> 0", self.clip_range)
        for name in ("lr_generator", "lr_fake", "lr_surrogate"):
            require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("betas_generator", "betas_fake", "betas_surrogate"):
            b = getattr(self, name)
            require(len(b) == 2 and all(0 <= x < 1 for x in b), name, "two floats in [0, 1)", b)
        require(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)", self.ema_decay)
        require(0 <= self.old_decay_min <= self.old_decay_max < 1, "old_decay_max",
                "old_decay_min <= old_decay_max < 1", self.old_decay_max)

    def old_decay(self, s: int) -> float:
        """s_old's decay after learner step s (1-based): min(max, min + rate·(s − 1))."""
        return min(self.old_decay_max, self.old_decay_min + self.old_decay_rate * (s - 1))

    def generator_ema_decay(self, s: int) -> float:
        """G's EMA decay after learner step s (1-based): min(s/(9 + s), ema_decay) (EMAModuleWrapper)."""
        return min(s / (9 + s), self.ema_decay)


# ---------------------------------------------------------------------------------------- algorithm


@dataclass
class Draw:
    """The shared randomness of one trained step index: j, the surrogate's j' and the τ uniforms."""

    j: int
    j_surrogate: int
    u_fake: float
    u_reward: float
    u_surrogate: float


@register
class TDMR1(Algorithm):
    """TDM-R1 (module docstring). Roles: θ = the generator G (from the student), fake and surrogate
    (from the teacher), surrogate_old (s's slow copy), p_samp = θ (published), theta_ema (evaluated and
    exported), real (the frozen teacher: real score and reference)."""

    name = "tdmr1"
    config_class = TDMR1Config
    record = "trajectory"
    trajectory_needs = TrajectoryNeeds(step_kinds=("euler",))
    eval_role = "theta_ema"
    stat_aliases: ClassVar[dict[str, str]] = {"loss": "generator_loss"}
    gauges: ClassVar[dict[str, tuple[str, str]]] = {
        "fake_loss": ("diffrl_learner_tdmr1_fake_loss", "TDM-R1: fake-score loss."),
        "surrogate_loss": ("diffrl_learner_tdmr1_surrogate_loss", "TDM-R1: surrogate-reward loss (t_w-weighted)."),
        "surrogate_bt": ("diffrl_learner_tdmr1_surrogate_bt", "TDM-R1: group Bradley-Terry term."),
        "surrogate_reg": ("diffrl_learner_tdmr1_surrogate_reg", "TDM-R1: mean |v_s - v_ref|^2."),
        "gen_kl_loss": ("diffrl_learner_tdmr1_generator_kl_loss", "TDM-R1: generator KL (real vs fake) term."),
        "gen_cfg_loss": ("diffrl_learner_tdmr1_generator_cfg_loss", "TDM-R1: generator CFG-as-reward term."),
        "gen_reward_loss": ("diffrl_learner_tdmr1_generator_reward_loss", "TDM-R1: generator surrogate-reward term."),
        "trust_region_fraction": ("diffrl_learner_tdmr1_trust_region_fraction",
                                  "TDM-R1: fraction of samples the surrogate's trust region detached."),
        "gate_fraction": ("diffrl_learner_tdmr1_gate_fraction",
                          "TDM-R1: fraction of samples the reference gate detached."),
        "rank_agreement": ("diffrl_learner_tdmr1_rank_agreement",
                           ("TDM-R1: Spearman correlation of the surrogate's implicit reward with the true "
                            "rewards on groups it has not trained on yet (mean over groups).")),
    }

    def roles(self):
        c, M = self.config, self.config.train_steps
        return [Trainable("theta", backward_passes=M, lr=c.lr_generator, betas=tuple(c.betas_generator)),
                Trainable("fake", backward_passes=M, lr=c.lr_fake, betas=tuple(c.betas_fake), init="teacher"),
                Trainable("surrogate", backward_passes=M, lr=c.lr_surrogate, betas=tuple(c.betas_surrogate),
                          init="teacher"),
                EMA("surrogate_old", "surrogate", c.old_decay),
                EMA("p_samp", "theta", lambda s: 0.0),
                EMA("theta_ema", "theta", c.generator_ema_decay),
                Frozen("real", weights="teacher")]

    @classmethod
    def check_recipe(cls, config: TDMR1Config, sampler) -> None:
        super().check_recipe(config, sampler)
        s = sampler.sampling
        require(s.guidance_scale == 1.0, "sampler.sampling.guidance_scale",
                "1.0 (TDM-R1's student samples at CFG 1)", s.guidance_scale)
        require(config.train_steps <= s.num_steps, "learner.tdmr1.train_steps",
                f"<= sampler.sampling.num_steps={s.num_steps}", config.train_steps)

    def sample_problem(self, sample, model) -> str | None:
        if abs(sample.trajectory.guidance_scale - 1.0) > 1e-6:
            return f"sampled at CFG {sample.trajectory.guidance_scale}; TDM-R1 trains CFG-1 trajectories"
        return None

    # ------------------------------------------------------------------------------ the step
    def plan(self, S: int, gen: torch.Generator) -> list[Draw]:
        """M distinct step indices, each with j' ∝ j' + 1 and three τ uniforms (from the shared generator)."""
        js = torch.randperm(S, generator=gen)[: self.config.train_steps].tolist()
        probs = torch.arange(1, S + 1, dtype=torch.float64)
        out = []
        for j in js:
            jp = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
            u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
            out.append(Draw(j, jp, *u))
        return out

    def step(self, batch, ctx: StepContext) -> StepResult:
        c, traj = self.config, batch.trajectory
        G, K = batch.mask.shape
        S = traj.states.shape[2] - 1
        std_mode = "global" if c.adv_std == "global" else "batch"
        A, _ = ctx.batch_wide(lambda r, m: advantages(r, m, std_mode, c.adv_clip, c.adv_eps, "add"),
                              batch.rewards, batch.mask)
        A = A.float()  # [G, K]
        cond_groups = ctx.model.encode_prompts(batch.prompts)
        total = int(batch.mask.sum())
        agreement = []
        for draw in self.plan(S, ctx.shared_generator):
            for chunk in ctx.chunks:
                g, k = batch.mask[chunk].nonzero(as_tuple=True)
                g = chunk[g]
                share = len(g) / total
                cond = cond_groups[g]
                a = A[g, k].to(ctx.device)  # [n]
                self.fake_update(batch, ctx, draw, g, k, cond, share)
                scores = self.surrogate_update(batch, ctx, draw, g, k, cond, a, share, S)
                self.generator_update(batch, ctx, draw, g, k, cond, share)
                implicit = torch.full((G, K), float("nan"), dtype=torch.float64)
                implicit[g, k] = scores.double().cpu()
                agreement.append(rank_agreement(implicit[chunk], batch.rewards[chunk], batch.mask[chunk]))
        valid = [x for x in agreement if not math.isnan(x)]
        stats = {"rank_agreement": sum(valid) / len(valid) if valid else float("nan")}
        return StepResult(advantages=A, adv_clip=c.adv_clip, stats=stats)

    def _levels(self, batch, ctx, j: int) -> tuple[Tensor, Tensor]:
        """(σ_j, σ_{j+1}) of the recorded grid, 0-dim float32 on the device."""
        sig = batch.trajectory.sigmas.float().to(ctx.device)
        return sig[j], sig[j + 1]

    def _velocity(self, ctx, role: str, x: Tensor, sigma: Tensor, cond: PromptEmbeds) -> Tensor:
        with ctx.autocast():
            return ctx.model.velocity(x, sigma.expand(x.shape[0]), cond, transformer=ctx.net(role)).float()

    def _cfg_parts(self, ctx, role: str, x: Tensor, sigma: Tensor, cond: PromptEmbeds) -> tuple[Tensor, Tensor]:
        """(v_uncond, v_cond) of one batched forward."""
        n = x.shape[0]
        both = self._velocity(ctx, role, torch.cat([x, x]), sigma, PromptEmbeds.cat([ctx.model.empty_embeds(n), cond]))
        v_uncond, v_cond = both.chunk(2)
        return v_uncond, v_cond

    def fake_update(self, batch, ctx, draw: Draw, g, k, cond, share: float) -> None:
        """(a): f regresses onto G's renoised one-step output."""
        c, j = self.config, draw.j
        s_j, s_n = self._levels(batch, ctx, j)
        x = batch.trajectory.states[g, k, j].to(ctx.device)  # [n, C, H, W]
        with torch.no_grad():
            v = self._velocity(ctx, "theta", x, s_j, cond)
            x0, x_next = x - s_j * v, x - (s_j - s_n) * v
            tau = draw_tau(s_n, torch.tensor(draw.u_fake, device=ctx.device), c.tau_shift, margin=c.tau_margin)
            alpha, beta = renoise_coefficients(tau, s_n)
            x_tau = alpha * x_next + beta * torch.randn(x.shape, generator=ctx.generator).to(ctx.device)
            target = (x_tau - x0) / tau
            v_real = self._velocity(ctx, "real", x_tau, tau, cond)
        v_fake = self._velocity(ctx, "fake", x_tau, tau, cond)
        loss = fake_score_loss(v_fake, target, v_real, c.fake_reg)
        ctx.backward("fake", loss, share)
        ctx.log({"fake_loss": loss.detach()}, share)

    def surrogate_update(self, batch, ctx, draw: Draw, g, k, cond, a: Tensor, share: float, S: int) -> Tensor:
        """(b): s by group Bradley–Terry on the recorded x_next(j') renoised with group-shared noise.
        Returns the surrogate's implicit reward −(dsm − dsm_ref) before this update, ``[n]``."""
        c, jp = self.config, draw.j_surrogate
        _, s_n = self._levels(batch, ctx, jp)
        x_next = batch.trajectory.states[g, k, jp + 1].to(ctx.device)
        tau = draw_tau(s_n, torch.tensor(draw.u_surrogate, device=ctx.device), c.tau_shift, c.t_min_surrogate,
                       c.tau_margin)
        alpha, beta = renoise_coefficients(tau, s_n)
        eps = self._group_noise(ctx, g, x_next.shape[1:])
        x_tau = alpha * x_next + beta * eps
        target = surrogate_target(x_next, eps, tau, s_n, alpha, beta)
        with torch.no_grad():
            v_ref = self._velocity(ctx, "real", x_tau, tau, cond)
            v_old = self._velocity(ctx, "surrogate_old", x_tau, tau, cond)
        v_s = self._velocity(ctx, "surrogate", x_tau, tau, cond)
        group = torch.unique(g, return_inverse=True)[1].to(ctx.device)
        t_w = (jp + 1) / S if c.step_weight else 1.0
        loss, stats = surrogate_loss(v_s, v_old, v_ref, target, a, group, batch.mask.shape[1], c.beta_dpo,
                                     c.surrogate_reg, c.clip_range, c.reg_threshold, t_w)
        ctx.backward("surrogate", loss, share)
        ctx.log({"surrogate_loss": loss.detach(), **stats}, share)
        n = x_tau.shape[0]
        dsm = (target - v_s.detach()).square().reshape(n, -1).mean(dim=1)
        dsm_ref = (target - v_ref).square().reshape(n, -1).mean(dim=1)
        return -(dsm - dsm_ref)

    def _group_noise(self, ctx, g: Tensor, shape) -> Tensor:
        """ε shared by the samples of one prompt group (``generate_shared_noise_for_groups``). ``[n, ...]``."""
        groups, inverse = torch.unique(g, return_inverse=True)
        noise = torch.randn((len(groups), *shape), generator=ctx.generator)
        return noise[inverse].to(ctx.device)

    def generator_update(self, batch, ctx, draw: Draw, g, k, cond, share: float) -> None:
        """(c): G towards the KL, CFG-as-reward and surrogate targets."""
        c, j = self.config, draw.j
        s_j, s_n = self._levels(batch, ctx, j)
        x = batch.trajectory.states[g, k, j].to(ctx.device)
        v = self._velocity(ctx, "theta", x, s_j, cond)  # with grad
        x0 = x - s_j * v
        with torch.no_grad():
            x_next = (x - (s_j - s_n) * v).detach()
            tau = draw_tau(s_n, torch.tensor(draw.u_fake, device=ctx.device), c.tau_shift, margin=c.tau_margin)
            alpha, beta = renoise_coefficients(tau, s_n)
            x_tau = alpha * x_next + beta * torch.randn(x.shape, generator=ctx.generator).to(ctx.device)
            tau_d = draw_tau(s_n, torch.tensor(draw.u_reward, device=ctx.device), c.tau_shift, c.t_min_reward,
                             c.tau_margin, clamp=True)
            alpha_d, beta_d = renoise_coefficients(tau_d, s_n)
            x_tau_d = alpha_d * x_next + beta_d * self._group_noise(ctx, g, x.shape[1:])
            x0_fake = x_tau - tau * self._velocity(ctx, "fake", x_tau, tau, cond)
            v_unc, v_cond = self._cfg_parts(ctx, "real", x_tau, tau, cond)
            x0_cond, x0_unc = x_tau - tau * v_cond, x_tau - tau * v_unc
            x0_real_cfg = x_tau - tau * (v_unc + c.real_guidance * (v_cond - v_unc))
            x0_s = x0_ref = None
            if j < c.trunc_steps:
                s_unc, s_cond = self._cfg_parts(ctx, "surrogate", x_tau_d, tau_d, cond)
                x0_s = x_tau_d - tau_d * (s_unc + c.rl_cfg * (s_cond - s_unc))
                x0_ref = x_tau_d - tau_d * self._velocity(ctx, "real", x_tau_d, tau_d, cond)
        loss, stats = generator_loss(x0, x0_cond, x0_unc, x0_real_cfg, x0_fake, x0_s, x0_ref, c.tdm_weight,
                                     c.cfg_reward_scale)
        ctx.backward("theta", loss, share)
        ctx.log({"generator_loss": loss.detach(), **stats}, share)
