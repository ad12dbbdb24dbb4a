"""Centered Reward Distillation (CRD, arXiv 2603.14128): the learner's primary algorithm, as pure
functions of tensors (no model code, no globals). Spec: ALGORITHMS.md, section "CRD".

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
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# One copy of the tensor helpers and of the Euler schedule, shared with the sampler (models/ cannot
# import learner/).
from models.sde import _bcast, _compute_dtype
from models.sde import sde_sigmas as sampling_sigmas

Tensor = torch.Tensor

STD_MODES = ("global", "group")
LOSS_FORMS = ("mse", "logistic")


def _require(condition: bool, name: str, expected: str, got: object = None) -> None:
    """Raise ``ValueError("name: expected ..., got ...")`` unless ``condition`` holds.

    (A plain ValueError on purpose: ``learner`` does not import ``diffrl``; the config loader turns
    ValueErrors raised by ``validate()`` into ConfigErrors with the dotted path prefixed.)"""
    if not condition:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


def _per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dim but the first: ``[N, ...] -> [N]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)  # [N]


def _group_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean within each prompt group (row) over the valid entries: ``[G, K] -> [G, 1]``."""
    if mask is None:
        return x.mean(dim=1, keepdim=True)  # [G, 1]
    m = mask.to(x.dtype)  # [G, K]
    return (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # [G, 1]


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over all valid entries of a ``[G, K]`` tensor -> scalar."""
    if mask is None:
        return x.mean()  # []
    m = mask.to(x.dtype)  # [G, K]
    return (x * m).sum() / m.sum().clamp_min(1.0)  # []


# --------------------------------------------------------------------------------------------------
# 1. Advantages
# --------------------------------------------------------------------------------------------------


def advantages(
    rewards: Tensor,
    mask: Tensor | None = None,
    std_mode: str = "global",
    clip: float = 5.0,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Centered, scaled, clipped advantages a and their normalized form ã ∈ [0, 1].

    a_i = (r_i − mean_{j∈g} r_j) / std,  clipped to ±``clip``;  ã_i = a_i/(2·clip) + 0.5
    (= a_i/10 + 0.5 at the default clip 5, as in ALGORITHMS.md).

    ``std`` is the population standard deviation (ddof 0) of the *within-group-centered* rewards:
    over the whole batch (``std_mode="global"``, default) or over each group (``"group"``). Since
    centered rewards have mean 0, std = sqrt(mean c²). Adding any constant to one prompt's rewards
    leaves the centered rewards, hence ``std``, a and ã, unchanged. Where ``std <= eps`` (all rewards
    equal: the whole batch in global mode, the group in group mode) a = 0 and ã = 0.5, never NaN.

    Args:
        rewards: ``[G, K]`` rewards, G prompt groups of K samples.
        mask: optional ``[G, K]`` bool, False for samples without a valid reward; they are left out of
            every mean and std and get a = 0, ã = 0.5.
    Returns:
        ``(a, a_tilde)``, both ``[G, K]`` in the rewards' dtype (computed in float64).
    """
    _require(rewards.ndim == 2, "rewards", "a [G, K] tensor", tuple(rewards.shape))
    _require(std_mode in STD_MODES, "std_mode", f"one of {STD_MODES}", std_mode)
    _require(clip > 0, "clip", "> 0", clip)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    r = rewards.to(torch.float64)  # [G, K]
    m = torch.ones_like(r) if mask is None else mask.to(torch.float64)  # [G, K]
    c = (r - _group_mean(r, mask)) * m  # [G, K] within-group centered, 0 where masked
    if std_mode == "global":
        std = ((c**2).sum() / m.sum().clamp_min(1.0)).sqrt().reshape(1, 1)  # [1, 1]
    else:
        std = ((c**2).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)).sqrt()  # [G, 1]
    a = torch.where(std > eps, c / std.clamp_min(eps), torch.zeros_like(c))  # [G, K]
    a = a.clamp(-clip, clip)  # [G, K]
    a_tilde = a / (2.0 * clip) + 0.5  # [G, K] in [0, 1]
    return a.to(out_dtype), a_tilde.to(out_dtype)


# --------------------------------------------------------------------------------------------------
# 2. Implicit reward, centering, matching loss
# --------------------------------------------------------------------------------------------------


def adaptive_weight(v: Tensor, u: Tensor, enabled: bool = True, min_weight: float = 1e-5) -> Tensor:
    """Per-sample adaptive weight w_i = mean|v_i − u_i| (detached, float64, clipped ≥ ``min_weight``);
    all ones when disabled.

    Args:
        v: ``[N, ...]`` a velocity prediction.  u: ``[N, ...]`` the target velocity ε − x0.
    Returns:
        ``[N]`` float64, no grad.
    """
    if not enabled:
        return torch.ones(v.shape[0], dtype=torch.float64, device=v.device)  # [N]
    with torch.no_grad():
        diff = v.detach().to(torch.float64) - u.detach().to(torch.float64)  # [N, ...]
        return _per_sample_mean(diff.abs()).clamp_min(min_weight)  # [N]


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
    err_theta = _per_sample_mean((v_theta.to(dt) - u.to(dt)) ** 2)  # [N] ‖v_θ − u‖²
    err_old = _per_sample_mean((v_old.detach().to(dt) - u.to(dt)) ** 2)  # [N] ‖v_old − u‖²
    w_theta = adaptive_weight(v_theta, u, adaptive)  # [N] float64
    w_old = adaptive_weight(v_old, u, adaptive)  # [N] float64
    r_hat = -(err_theta.to(torch.float64) / w_theta - err_old.to(torch.float64) / w_old)  # [N]
    return r_hat, w_theta, w_old


def center_in_group(x: Tensor, detach_mean: bool, mask: Tensor | None = None) -> Tensor:
    """x_i − mean_{j∈g} x_j for a ``[G, K]`` tensor; with ``detach_mean`` the group mean is a
    constant for autograd (sg(·), used for R̂). Masked entries come out as 0."""
    mean = _group_mean(x, mask)  # [G, 1]
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
    _require(beta > 0, "beta", "> 0", beta)
    _require(form in LOSS_FORMS, "form", f"one of {LOSS_FORMS}", form)
    _require(r_hat.shape == a_tilde.shape, "a_tilde", f"shape {tuple(r_hat.shape)}", tuple(a_tilde.shape))
    r_c = center_in_group(r_hat, detach_mean=True, mask=mask)  # [G, K] R̂c
    a_c = center_in_group(a_tilde.detach().to(r_hat.dtype), detach_mean=False, mask=mask)  # [G, K] ãc
    logits = beta * r_c  # [G, K]
    if form == "mse":
        per_sample = (logits - a_c) ** 2  # [G, K]
    else:
        per_sample = F.binary_cross_entropy_with_logits(
            logits, torch.sigmoid(a_c), reduction="none"
        )  # [G, K]
    return (grad_scale / beta) * _masked_mean(per_sample, mask)  # []


# --------------------------------------------------------------------------------------------------
# 3. KL anchor with reward-adaptive strength
# --------------------------------------------------------------------------------------------------


def cfg(v_uncond: Tensor, v_cond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance v^w = v(·, ∅) + w·(v(·, c) − v(·, ∅)). Shapes ``[N, ...]``."""
    return v_uncond + w * (v_cond - v_uncond)  # [N, ...]


def kl_anchor(v_theta: Tensor, v_anchor_cfg: Tensor) -> Tensor:
    """kl_i = mean over elements of (v_θ − v_φ^w)², the anchor detached.

    Args:
        v_theta: ``[N, ...]`` (with grad).  v_anchor_cfg: ``[N, ...]`` the frozen model's CFG velocity.
    Returns:
        ``[N]``.
    """
    dt = _compute_dtype(v_theta)
    return _per_sample_mean((v_theta.to(dt) - v_anchor_cfg.detach().to(dt)) ** 2)  # [N]


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
    _require(beta_kl >= 0, "beta_kl", ">= 0", beta_kl)
    if beta_kl == 0:
        return kl.new_zeros(())  # []
    if adaptive:
        _require(0 <= beta_min <= beta_kl, "beta_min", f"in [0, beta_kl={beta_kl}]", beta_min)
        c0 = beta_min / beta_kl
        coef = c0 + a_tilde.detach().to(kl.dtype) * (1.0 - c0)  # [G, K]
    else:
        coef = torch.ones_like(kl)  # [G, K]
    return beta_kl * _masked_mean(coef * kl, mask)  # []


# --------------------------------------------------------------------------------------------------
# 4. Snapshot (p_old, p_samp) EMA schedules
# --------------------------------------------------------------------------------------------------


def ema_decay(step: int, s0: float, a: float, k: float, d_max: float) -> float:
    """d(s) = min(a + max(0, s − s0)·k, d_max), s = optimizer steps taken so far."""
    return min(a + max(0.0, float(step) - float(s0)) * k, d_max)


def ema_update_(snapshot_params: Iterable[Tensor], theta_params: Iterable[Tensor], decay: float) -> None:
    """In place, without autograd: snap ← d·snap + (1 − d)·θ for each pair of tensors.

    d = 0 copies θ exactly; d = 1 leaves the snapshot untouched. θ is cast to each snapshot
    tensor's device and dtype.
    """
    _require(0.0 <= decay <= 1.0, "decay", "in [0, 1]", decay)
    snaps = list(snapshot_params)
    thetas = list(theta_params)
    _require(len(snaps) == len(thetas), "snapshot_params", f"{len(thetas)} tensors like theta", len(snaps))
    with torch.no_grad():
        for snap, theta in zip(snaps, thetas):
            _require(
                snap.shape == theta.shape, "snapshot_params", f"shape {tuple(theta.shape)}", tuple(snap.shape)
            )
            src = theta.detach().to(device=snap.device, dtype=snap.dtype)
            if decay == 0.0:
                snap.copy_(src)
            elif decay < 1.0:
                snap.mul_(decay).add_(src, alpha=1.0 - decay)


# --------------------------------------------------------------------------------------------------
# 5. Noise levels and the forward process
# --------------------------------------------------------------------------------------------------


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """SD3 time shift σ' = shift·σ/(1 + (shift − 1)·σ) (monotone, fixes 0 and 1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def unshift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """Inverse of ``shift_sigma``: σ = σ'/(shift − (shift − 1)·σ')."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma / (shift - (shift - 1.0) * sigma)


def _strata(T: int, generator: torch.Generator | None) -> Tensor:
    """(j + U_j)/T for j = 0..T−1, U_j ~ U[0, 1): one draw in each of T equal strata of [0, 1). ``[T]`` float64."""
    u = torch.rand(T, generator=generator, dtype=torch.float64)  # [T] U_j
    return (torch.arange(T, dtype=torch.float64) + u) / T  # [T] in [j/T, (j+1)/T)


def _pick_stratified(run: Tensor, strata: Tensor) -> Tensor:
    """Level ⌊M·s_j⌋ of a run of M levels for each stratum draw s_j (non-decreasing index). ``[T]``."""
    idx = (strata * len(run)).floor().long().clamp(max=len(run) - 1)  # [T]
    return run[idx]  # [T]


def noise_levels(
    T: int,
    num_sampling_steps: int,
    shift: float,
    top_fraction: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """T training noise levels σ_1..σ_T (shared by the batch; fresh ε per sample and level).

    What exactly is chosen:
      * The range is the top ``top_fraction`` f of the noise-level axis: σ ∈ [1 − f, 1] (shifted σ,
        the value used in x_σ), i.e. the near-clean tail σ < 1 − f is skipped (f = 0.99 skips the
        last 1%).
      * ``num_sampling_steps = S ≥ 1`` (default use): σ is restricted to the sampler's own levels
        ``sampling_sigmas(S, shift)[:S]`` (1 − k/S, shifted), keeping those ≥ 1 − f: a contiguous
        run of M levels from σ = 1. Stratified over those M levels: draw j takes level index
        ⌊M·(j + U_j)/T⌋, U_j ~ U[0, 1), so each of the T strata covers an equal share of the run
        and every level is used ⌊T/M⌋ or ⌈T/M⌉ times (exactly T/M when M divides T).
      * ``num_sampling_steps = 0``: continuous version. With τ the sampler's unshifted time and
        τ_lo = unshift(1 − f): τ_j = 1 − (1 − τ_lo)·(j + U_j)/T (one draw per equal stratum of
        [τ_lo, 1]), σ_j = shift(τ_j); so σ_j ∈ [1 − f, 1] with the sampler's step density.
    Returned noisiest first (descending). ``generator`` makes the U_j reproducible.

    Returns:
        ``[T]`` float32 on the CPU.
    """
    _require(T >= 1, "T", ">= 1", T)
    _require(num_sampling_steps >= 0, "num_sampling_steps", ">= 0", num_sampling_steps)
    _require(shift > 0, "shift", "> 0", shift)
    _require(0.0 < top_fraction <= 1.0, "top_fraction", "in (0, 1]", top_fraction)
    strata = _strata(T, generator)  # [T]
    sigma_lo = 1.0 - top_fraction
    if num_sampling_steps >= 1:
        grid = sampling_sigmas(num_sampling_steps, shift)[:num_sampling_steps]  # [S] descending, > 0
        sigmas = _pick_stratified(grid[grid >= sigma_lo - 1e-12], strata)  # [T] from the prefix; grid[0] = 1 kept
    else:
        tau_lo = float(unshift_sigma(sigma_lo, shift))
        tau = 1.0 - (1.0 - tau_lo) * strata  # [T] in (τ_lo, 1]
        sigmas = shift_sigma(tau, shift)  # [T]
    return sigmas.to(torch.float32)  # [T]


def anchor_noise_levels(
    T_anchor: int,
    num_sampling_steps: int,
    shift: float,
    top_fraction: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """T_a anchor-only noise levels: the complement of ``noise_levels``' range, σ < 1 − f.

    At these levels only the KL anchor is applied (``crd_anchor_loss``), so the reward matching can be
    confined to the noisy end (``top_fraction`` < 1) while the near-clean levels stay held to the
    frozen model. Drawn the same stratified way as ``noise_levels``:
      * ``num_sampling_steps = S ≥ 1``: the sampler's levels below 1 − f (a contiguous run of M ≥ 1
        levels ending at the smallest, 1/S shifted); draw j takes level ⌊M·(j + U_j)/T_a⌋ of the run.
      * ``num_sampling_steps = 0``: τ_j = τ_lo·(1 − (j + U_j)/T_a) ∈ (0, τ_lo], σ_j = shift(τ_j), with
        τ_lo = unshift(1 − f).
    Returned noisiest first (descending).

    Returns:
        ``[T_a]`` float32 on the CPU.
    """
    _require(T_anchor >= 1, "T_anchor", ">= 1", T_anchor)
    _require(num_sampling_steps >= 0, "num_sampling_steps", ">= 0", num_sampling_steps)
    _require(shift > 0, "shift", "> 0", shift)
    _require(0.0 < top_fraction < 1.0, "top_fraction", "in (0, 1) with anchor-only levels (they lie below 1 − f)",
             top_fraction)
    strata = _strata(T_anchor, generator)  # [T_a]
    sigma_lo = 1.0 - top_fraction
    if num_sampling_steps >= 1:
        grid = sampling_sigmas(num_sampling_steps, shift)[:num_sampling_steps]  # [S] descending, > 0
        below = grid[grid < sigma_lo - 1e-12]  # [M] the contiguous tail of the grid
        _require(len(below) >= 1, "top_fraction",
                 f"< {1.0 - float(grid[-1]):.4g} with anchor-only levels (none of the sampler's levels lies "
                 "below 1 − top_fraction)", top_fraction)
        sigmas = _pick_stratified(below, strata)  # [T_a]
    else:
        tau_lo = float(unshift_sigma(sigma_lo, shift))
        tau = tau_lo * (1.0 - strata)  # [T_a] in (0, τ_lo]
        sigmas = shift_sigma(tau, shift)  # [T_a]
    return sigmas.to(torch.float32)  # [T_a]


def interpolate(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """Forward process x_σ = (1 − σ)·x0 + σ·ε; ``sigma`` a scalar or per-sample ``[N]``.
    Shapes: x0, eps ``[N, ...]`` -> ``[N, ...]``."""
    s = _bcast(sigma, x0)  # [N, 1, ...] or []
    return (1.0 - s) * x0 + s * eps  # [N, ...]


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Flow-matching target u = ε − x0 (d x_σ / dσ). Shapes ``[N, ...]``."""
    return eps - x0  # [N, ...]


# --------------------------------------------------------------------------------------------------
# 6. Configuration and the per-noise-level loss
# --------------------------------------------------------------------------------------------------


@dataclass
class EMASchedule:
    """Blend schedule of a parameter snapshot: d(s) = min(a + max(0, s − s0)·k, d_max), then
    snap ← d·snap + (1 − d)·θ after every optimizer step s."""

    start_step: int = 0
    """s0: optimizer step at which the decay starts to rise above ``start_decay``."""
    start_decay: float = 0.0
    """a: decay before and at ``start_step`` (0 = exact copy of θ)."""
    slope: float = 0.0
    """k: increase of the decay per optimizer step after ``start_step``."""
    max_decay: float = 0.999
    """d_max: the decay never exceeds this (1 would freeze the snapshot)."""

    def decay(self, step: int) -> float:
        """d(step)."""
        return ema_decay(step, self.start_step, self.start_decay, self.slope, self.max_decay)

    def validate(self) -> None:
        _require(self.start_step >= 0, "start_step", ">= 0", self.start_step)
        _require(0.0 <= self.start_decay <= 1.0, "start_decay", "in [0, 1]", self.start_decay)
        _require(self.slope >= 0.0, "slope", ">= 0", self.slope)
        _require(0.0 <= self.max_decay <= 1.0, "max_decay", "in [0, 1]", self.max_decay)


def _old_ema_default() -> EMASchedule:
    return EMASchedule(start_step=0, start_decay=0.25, slope=0.005, max_decay=0.999)


def _sampler_ema_default() -> EMASchedule:
    return EMASchedule(start_step=75, start_decay=0.0, slope=0.0075, max_decay=0.999)


@dataclass
class CRDConfig:
    """Hyperparameters of Centered Reward Distillation (defaults: ALGORITHMS.md, SD3.5-M reference)."""

    beta: float = 1.0
    """β (crd_beta): scale of the implicit reward in the matching loss (β·R̂c vs ãc)."""
    grad_scale: float = 5.0
    """s: the matching loss is multiplied by s/β (the reference's adv_clip_max/β)."""
    loss_form: str = "mse"
    """Matching loss: 'mse' (β·R̂c − ãc)² or 'logistic' BCEWithLogits(β·R̂c, sigmoid(ãc)); both ×s/β."""
    adaptive_weighting: bool = True
    """Divide each squared velocity error in R̂ by its detached per-sample mean|v − u| (float64, ≥1e-5)."""
    std_mode: str = "global"
    """Advantage scale: std of within-group-centered rewards over the whole batch ('global') or per
    group ('group')."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip; ã = a/(2·adv_clip) + 0.5 ∈ [0, 1]."""
    std_eps: float = 1e-8
    """Where the advantage std is ≤ std_eps (all rewards equal) the advantages are 0."""
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
        _require(self.beta > 0, "beta", "> 0", self.beta)
        _require(self.grad_scale > 0, "grad_scale", "> 0", self.grad_scale)
        _require(self.loss_form in LOSS_FORMS, "loss_form", f"one of {LOSS_FORMS}", self.loss_form)
        _require(self.std_mode in STD_MODES, "std_mode", f"one of {STD_MODES}", self.std_mode)
        _require(self.adv_clip > 0, "adv_clip", "> 0", self.adv_clip)
        _require(self.std_eps > 0, "std_eps", "> 0", self.std_eps)
        _require(self.num_noise_levels >= 1, "num_noise_levels", ">= 1", self.num_noise_levels)
        _require(self.num_sampling_steps >= 0, "num_sampling_steps", ">= 0", self.num_sampling_steps)
        _require(self.time_shift > 0, "time_shift", "> 0", self.time_shift)
        _require(0.0 < self.top_fraction <= 1.0, "top_fraction", "in (0, 1]", self.top_fraction)
        _require(self.beta_kl >= 0, "beta_kl", ">= 0", self.beta_kl)
        _require(
            0.0 <= self.beta_min <= self.beta_kl or not (self.use_kl_anchor and self.reward_adaptive_kl),
            "beta_min",
            f"in [0, beta_kl={self.beta_kl}]",
            self.beta_min,
        )
        _require(
            math.isfinite(self.kl_cfg_scale) and self.kl_cfg_scale >= 0,
            "kl_cfg_scale",
            ">= 0",
            self.kl_cfg_scale,
        )
        _require(self.max_grad_norm > 0, "max_grad_norm", "> 0", self.max_grad_norm)
        _require(self.num_anchor_levels >= 0, "num_anchor_levels", ">= 0", self.num_anchor_levels)
        if self.num_anchor_levels:
            _require(self.use_kl_anchor and self.beta_kl > 0, "num_anchor_levels",
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


def _pearson(x: Tensor, y: Tensor) -> Tensor:
    """Correlation of two flat tensors, 0 when either is constant."""
    xc, yc = x - x.mean(), y - y.mean()  # [M]
    den = (xc.pow(2).sum() * yc.pow(2).sum()).sqrt()  # []
    return torch.where(den > 0, (xc * yc).sum() / den.clamp_min(1e-300), torch.zeros_like(den))  # []


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
    _require(v_theta.shape[0] == G * K, "v_theta", f"first dim G*K={G * K}", tuple(v_theta.shape))
    r_hat, w_theta, w_old = _implicit_reward_and_weights(
        v_theta, v_old, u, config.adaptive_weighting
    )  # [N] x3
    r_hat = r_hat.view(G, K)  # [G, K]
    l_crd = crd_matching_loss(r_hat, a_tilde, config.beta, config.grad_scale, config.loss_form, mask)  # []
    use_kl = config.use_kl_anchor and config.beta_kl > 0
    if use_kl:
        _require(v_anchor is not None, "v_anchor", "a tensor when the KL anchor is on", None)
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
            "kl_mean": _masked_mean(kl.detach(), mask) if kl is not None else l_crd.new_zeros(()),
            "r_hat_mean": r_valid.mean(),
            "r_hat_std": r_valid.std(unbiased=False),
            "r_hat_centered_std": r_c.pow(2).mean().sqrt(),
            "reward_corr": _pearson(r_c, a_c),
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
    _require(v_theta.shape[0] == G * K, "v_theta", f"first dim G*K={G * K}", tuple(v_theta.shape))
    kl = kl_anchor(v_theta, v_anchor).view(G, K)  # [G, K]
    loss = reward_adaptive_kl_loss(kl, a_tilde, config.beta_kl, config.beta_min, config.reward_adaptive_kl, mask)  # []
    stats = {"loss": loss.detach(), "anchor_kl_loss": loss.detach(), "anchor_kl_mean": _masked_mean(kl.detach(), mask)}
    return loss, stats
