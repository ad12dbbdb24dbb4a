"""DiffusionNFT-style baseline (arXiv 2509.16117) as pure tensor functions. The math: docs/algorithms.md,
"DiffusionNFT". Notation as in ``crd.py`` (x_σ = (1 − σ)x0 + σε, u = ε − x0, per-sample tensors
``[N, ...]`` group-major, per-sample scalars ``[G, K]`` or ``[N]``).

One EMA "old" model is both the sampler and the reference. With r ∈ [0, 1] the optimality weight
of each sample (from its normalized advantage) and b the guidance strength:
    v⁺ = (1 − b)·v_old + b·v_θ          (implicit positive policy)
    v⁻ = (1 + b)·v_old − b·v_θ          (implicit negative policy, the reflection of v⁺ about v_old)
    L  = E_i[ r_i·‖v⁺_i − u_i‖² + (1 − r_i)·‖v⁻_i − u_i‖² ]      (‖·‖² a mean over elements)
Good samples pull v⁺ towards their target, bad ones push v⁻ towards theirs, which moves v_θ away.
CRD without the decoupled sampler and without centering degenerates towards this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
from diffrl.learner.losses import adaptive_weight, kl_anchor, per_sample_mean
from diffrl.learner.noise_levels import noise_levels, noised_chunk
from diffrl.models.sde import _compute_dtype

Tensor = torch.Tensor


def nft_reward_weight(a: Tensor, clip: float = 5.0) -> Tensor:
    """r = clamp(clip(a, ±clip)/(2·clip) + 0.5, 0, 1): the normalized advantage mapped to [0, 1]
    (a = 0 -> 0.5, a ≥ clip -> 1, a ≤ −clip -> 0). Any shape -> same shape."""
    require(clip > 0, "clip", "> 0", clip)
    return (a.clamp(-clip, clip) / (2.0 * clip) + 0.5).clamp(0.0, 1.0)


def nft_optimality(
    rewards: Tensor, mask: Tensor | None = None, std_mode: str = "group", clip: float = 5.0, eps: float = 1e-8
) -> Tensor:
    """r for a ``[G, K]`` batch of rewards: group-centered advantages (``crd.advantages``; DiffusionNFT
    normalizes per prompt, ``std_mode="group"``) mapped to [0, 1]. Returns ``[G, K]``."""
    a, _ = advantages(rewards, mask, std_mode=std_mode, clip=clip, eps=eps)  # [G, K]
    return nft_reward_weight(a, clip)  # [G, K]


def nft_velocities(v_theta: Tensor, v_old: Tensor, b: float) -> tuple[Tensor, Tensor]:
    """(v⁺, v⁻) = ((1 − b)·v_old + b·v_θ, (1 + b)·v_old − b·v_θ), v_old detached. ``[N, ...]`` each."""
    v_old = v_old.detach()
    v_plus = (1.0 - b) * v_old + b * v_theta  # [N, ...]
    v_minus = (1.0 + b) * v_old - b * v_theta  # [N, ...]
    return v_plus, v_minus


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    u: Tensor,
    r: Tensor,
    b: float = 1.0,
    adaptive: bool = False,
    scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = scale·mean_i[ r_i·‖v⁺_i − u_i‖²/w⁺_i + (1 − r_i)·‖v⁻_i − u_i‖²/w⁻_i ].

    With ``adaptive=False`` (default) w = 1: exactly the formula of docs/algorithms.md. ``adaptive=True``
    divides each term by its detached mean|v^± − u| (as ``crd.adaptive_weight``), the reference
    implementation's per-sample normalization (which it applies in x0-space; in velocity space the
    two differ by a per-level factor σ). ``scale`` is a plain multiplier (the reference uses
    adv_clip_max/b).

    Args:
        v_theta: ``[N, ...]`` (with grad).  v_old: ``[N, ...]`` the old/sampling EMA model (no grad).
        u: ``[N, ...]`` target ε − x0.  r: ``[N]`` (or ``[G, K]``) optimality weights in [0, 1].
    Returns:
        ``(loss, stats)`` with detached stats positive_loss, negative_loss (per-sample means), r_mean.
    """
    require(b > 0, "b", "> 0", b)
    r = r.reshape(-1).detach()  # [N]
    require(r.shape[0] == v_theta.shape[0], "r", f"{v_theta.shape[0]} weights", r.shape[0])
    dt = _compute_dtype(v_theta)
    v_plus, v_minus = nft_velocities(v_theta.to(dt), v_old.to(dt), b)  # [N, ...] each
    u = u.to(dt)  # [N, ...]
    pos = per_sample_mean((v_plus - u) ** 2)  # [N] ‖v⁺ − u‖²
    neg = per_sample_mean((v_minus - u) ** 2)  # [N] ‖v⁻ − u‖²
    if adaptive:
        pos = pos / adaptive_weight(v_plus, u).to(dt)  # [N]
        neg = neg / adaptive_weight(v_minus, u).to(dt)  # [N]
    r = r.to(dt)  # [N]
    loss = scale * (r * pos + (1.0 - r) * neg).mean()  # []
    stats = {
        "positive_loss": pos.detach().mean(),
        "negative_loss": neg.detach().mean(),
        "r_mean": r.mean(),
    }
    return loss, stats


def _nft_old_ema_default() -> EMASchedule:
    return EMASchedule(start_step=0, start_decay=0.0, slope=0.001, max_decay=0.5)


@dataclass
class NFTConfig:
    """Hyperparameters of the DiffusionNFT-style baseline."""

    b: float = 1.0
    """Guidance strength b in v⁺ = (1 − b)·v_old + b·v_θ and v⁻ = (1 + b)·v_old − b·v_θ."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip before the map r = a/(2·adv_clip) + 0.5."""
    std_mode: str = "group"
    """Advantage normalization: per prompt group ('group', as DiffusionNFT) or over the batch ('global')."""
    std_eps: float = 1e-8
    """Where the advantage std is ≤ std_eps the advantages are 0 (r = 0.5)."""
    adaptive_weighting: bool = False
    """Divide each squared error by its detached mean|v^± − u| (the reference's normalization)."""
    loss_scale: float = 1.0
    """Multiplier of the loss (the reference uses adv_clip/b)."""
    beta_kl: float = 0.0
    """Optional fixed KL-to-reference strength β_KL·mean‖v_θ − v_ref‖² (0 = off)."""
    num_noise_levels: int = 10
    """Training noise levels per learner step (drawn like CRD's, ``crd.noise_levels``)."""
    num_sampling_steps: int = 10
    """Steps of the training sampler whose grid the noise levels are drawn from (0 = continuous)."""
    time_shift: float = 3.0
    """SD3 shift of the sampler's schedule."""
    top_fraction: float = 0.99
    """Noise levels are restricted to σ ∈ [1 − top_fraction, 1]."""
    old_ema: EMASchedule = field(default_factory=_nft_old_ema_default)
    """The single old model (sampler and reference): d(s) = min(0.001·s, 0.5), DiffusionNFT's soft
    update."""

    def validate(self) -> None:
        require(self.b > 0, "b", "> 0", self.b)
        require(self.adv_clip > 0, "adv_clip", "> 0", self.adv_clip)
        require(self.std_mode in STD_MODES, "std_mode", f"one of {STD_MODES}", self.std_mode)
        require(self.std_eps > 0, "std_eps", "> 0", self.std_eps)
        require(self.loss_scale > 0, "loss_scale", "> 0", self.loss_scale)
        require(self.beta_kl >= 0, "beta_kl", ">= 0", self.beta_kl)
        require(self.num_noise_levels >= 1, "num_noise_levels", ">= 1", self.num_noise_levels)
        require(self.num_sampling_steps >= 0, "num_sampling_steps", ">= 0", self.num_sampling_steps)
        require(self.time_shift > 0, "time_shift", "> 0", self.time_shift)
        require(0.0 < self.top_fraction <= 1.0, "top_fraction", "in (0, 1]", self.top_fraction)
        try:
            self.old_ema.validate()
        except ValueError as err:
            raise ValueError(f"old_ema.{err}") from None


def nft_step_loss(
    v_theta: Tensor,
    v_old: Tensor,
    u: Tensor,
    r: Tensor,
    config: NFTConfig,
    v_ref: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """NFT loss (+ optional fixed KL to ``v_ref``) for one noise level; shapes as ``nft_loss``."""
    loss, stats = nft_loss(v_theta, v_old, u, r, config.b, config.adaptive_weighting, config.loss_scale)
    if config.beta_kl > 0:
        require(v_ref is not None, "v_ref", "a tensor when beta_kl > 0", None)
        kl = kl_anchor(v_theta, v_ref)  # [N]
        loss = loss + config.beta_kl * kl.mean()  # []
        stats["kl_mean"] = kl.detach().mean()
    stats["loss"] = loss.detach()
    return loss, stats


@register
class NFT(Algorithm):
    """The DiffusionNFT-style baseline on the learner's seam: θ (trainable), one old EMA of θ that is
    both the reference inside the loss and the published sampler, and the frozen base model (only
    used with ``beta_kl > 0``). Per step: group advantages mapped to r ∈ [0, 1], T noise levels drawn
    like CRD's, a fresh ε per sample and level, one backward per level and micro-chunk."""

    name = "nft"
    config_class = NFTConfig
    record = "final"
    sampler_role = "p_old"

    def roles(self):
        c = self.config
        return [Trainable("theta", backward_passes=c.num_noise_levels), EMA("p_old", "theta", c.old_ema.decay),
                Frozen("anchor")]

    def step(self, batch, ctx: StepContext) -> StepResult:
        c, model, dev = self.config, ctx.model, ctx.device
        a, _ = ctx.batch_wide(
            lambda r, m: advantages(r, m, c.std_mode, c.adv_clip, c.std_eps), batch.rewards, batch.mask)  # [G, K]
        a = a.to(torch.float32)
        weight_r = nft_reward_weight(a, c.adv_clip)  # [G, K]
        sigmas = noise_levels(c.num_noise_levels, c.num_sampling_steps, c.time_shift, c.top_fraction,
                              ctx.generator)  # [T]
        cond_groups = model.encode_prompts(batch.prompts)  # [G] embeds
        x0, mask = batch.x0, batch.mask  # [G, K, C, H, W], [G, K]
        G, K = mask.shape
        for t in range(c.num_noise_levels):
            sigma = float(sigmas[t])
            eps_all = torch.randn(G, K, *x0.shape[2:], generator=ctx.generator)  # [G, K, C, H, W]
            for idx in ctx.chunks:
                m_c = mask[idx]  # [g, K]
                ch = noised_chunk(x0, eps_all, idx, sigma, cond_groups, dev)  # x_t, u [n, C, H, W]
                with torch.no_grad(), ctx.autocast():
                    v_old = model.velocity(ch.x_t, ch.sigma, ch.cond, transformer=ctx.net("p_old")).float()
                    v_ref = None if c.beta_kl <= 0 else model.velocity(
                        ch.x_t, ch.sigma, ch.cond, transformer=ctx.net("anchor")).float()
                v_theta = model.velocity(ch.x_t, ch.sigma, ch.cond, transformer=ctx.net("theta"))  # [n, ...] grad
                flat = m_c.reshape(-1).nonzero().squeeze(1).to(dev) if batch.padded else slice(None)
                loss, st = nft_step_loss(v_theta[flat], v_old[flat], ch.u[flat],
                                         weight_r[idx].reshape(-1).to(dev)[flat], c,
                                         None if v_ref is None else v_ref[flat])
                share = float(m_c.sum()) / batch.n_valid
                ctx.backward("theta", loss, share)
                ctx.log(st, share)
        return StepResult(advantages=a, adv_clip=c.adv_clip)
