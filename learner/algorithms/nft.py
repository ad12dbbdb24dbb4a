"""DiffusionNFT (arXiv 2509.16117) as its authors ship it, as pure tensor functions. The math:
docs/algorithms.md, "DiffusionNFT". Notation as in ``crd.py`` (x_σ = (1 − σ)x0 + σε, u = ε − x0,
per-sample tensors ``[N, ...]`` group-major, per-sample scalars ``[G, K]`` or ``[N]``).

Reference: NVlabs/DiffusionNFT, ``scripts/train_nft_sd3.py`` (function ``main``, the training loop),
``config/base.py`` and ``config/nft.py`` (``_get_config``, ``sd3_geneval``), ``flow_grpo/stat_tracking.py``
(``PerPromptStatTracker.update``). "ref:" below names the term each piece follows.

One EMA "old" model is both the sampler and the reference (ref: the ``"old"`` LoRA adapter samples and
gives ``old_prediction``). Per learner step:
    a_i = (r_i − mean_g r) / (std_batch(r) + 1e-4), clipped to ±5
          ref: ``PerPromptStatTracker(global_std=True)``, ``train.adv_clip_max = 5``
    ρ_i = clamp(a_i/(2·5) + 0.5, 0, 1)                ref: ``r = torch.clamp(normalized_advantages_clip, 0, 1)``
    v⁺ = (1 − b)·v_old + b·v_θ,  v⁻ = (1 + b)·v_old − b·v_θ
          ref: ``positive_prediction``, ``implicit_negative_prediction``, b = ``config.beta`` = 1
    x̂0^± = x_σ − σ·v^±,  w^± = sg(max(mean|x̂0^± − x0|, 1e-5))
          ref: ``x0_prediction``, ``weight_factor`` (float64)
    L  = (5/b)·mean_i[ ρ_i·‖x̂0⁺_i − x0_i‖²/w⁺_i + (1 − ρ_i)·‖x̂0⁻_i − x0_i‖²/w⁻_i ]
         + β_KL·mean_i ‖v_θ,i − v_base,i‖²,  β_KL = 1e-4
          ref: ``policy_loss``, ``kl_div_loss``, ``config.train.beta``
(‖·‖² a mean over elements; ρ is called r in the code.) σ: for each sample its own 9 of the sampler's
10 levels, in random order, one backward pass each (ref: ``perms_time``, ``num_train_timesteps =
int(num_steps·timestep_fraction)``). Good samples pull v⁺ towards their target, bad ones pull v⁻
towards theirs, which moves v_θ away. Since x̂0 − x0 = −σ·(v − u), the x0-space squared error is σ²
times the velocity-space one (σ with the adaptive weight); the velocity form of earlier versions is kept
as ``loss_space: velocity``. Remaining deviations from the reference: ``NFTConfig`` and docs/algorithms.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffrl.config import require
from diffrl.learner.advantages import EPS_MODES, STD_MODES, advantages
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
from diffrl.learner.noise_levels import (
    noise_levels,
    noised_chunk_per_sample,
    per_sample_noise_levels,
    sampling_sigmas,
)
from diffrl.models.sde import _bcast, _compute_dtype

Tensor = torch.Tensor


def nft_reward_weight(a: Tensor, clip: float = 5.0) -> Tensor:
    """r = clamp(clip(a, ±clip)/(2·clip) + 0.5, 0, 1): the normalized advantage mapped to [0, 1]
    (a = 0 -> 0.5, a ≥ clip -> 1, a ≤ −clip -> 0). Any shape -> same shape.

    ref: ``scripts/train_nft_sd3.py``, ``main``: ``advantages_clip = clamp(a, ±adv_clip_max)``,
    ``r = clamp((advantages_clip/adv_clip_max)/2 + 0.5, 0, 1)`` (``adv_mode="all"``, config/nft.py)."""
    require(clip > 0, "clip", "> 0", clip)
    return (a.clamp(-clip, clip) / (2.0 * clip) + 0.5).clamp(0.0, 1.0)


def nft_optimality(
    rewards: Tensor,
    mask: Tensor | None = None,
    std_mode: str = "batch",
    clip: float = 5.0,
    eps: float = 1e-4,
    eps_mode: str = "add",
) -> Tensor:
    """r for a ``[G, K]`` batch of rewards: advantages (``learner/advantages.py``) mapped to [0, 1] by
    ``nft_reward_weight``. Returns ``[G, K]``.

    The defaults are the reference's: ``a = (r − mean_g r)/(std(all raw rewards of the batch) + 1e-4)``,
    ref: ``flow_grpo/stat_tracking.py``, ``PerPromptStatTracker.update`` with ``global_std=True``
    (``config/base.py``: ``sample.global_std = True``; a population std, ``np.std``). The batch is every
    rank's groups when the step computes it (``ctx.batch_wide``; ref: ``gather_tensor_to_all``).
    ``std_mode="group", eps=1e-6, eps_mode="relative"`` is this repository's former per-group form."""
    a, _ = advantages(rewards, mask, std_mode=std_mode, clip=clip, eps=eps, eps_mode=eps_mode)  # [G, K]
    return nft_reward_weight(a, clip)  # [G, K]


def nft_velocities(v_theta: Tensor, v_old: Tensor, b: float) -> tuple[Tensor, Tensor]:
    """(v⁺, v⁻) = ((1 − b)·v_old + b·v_θ, (1 + b)·v_old − b·v_θ), v_old detached. ``[N, ...]`` each.

    ref: ``scripts/train_nft_sd3.py``, ``main``: ``positive_prediction = beta·forward_prediction +
    (1 − beta)·old_prediction``, ``implicit_negative_prediction = (1 + beta)·old_prediction −
    beta·forward_prediction`` with ``beta = config.beta`` (b; 1.0 in ``config/nft.py``)."""
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
    """Velocity-space form (``loss_space: velocity``, this repository's former default):
    L = scale·mean_i[ r_i·‖v⁺_i − u_i‖²/w⁺_i + (1 − r_i)·‖v⁻_i − u_i‖²/w⁻_i ].

    With ``adaptive=False`` w = 1. ``adaptive=True`` divides each term by its detached mean|v^± − u|
    (``losses.adaptive_weight``). The reference's loss is ``nft_x0_loss``: since x̂0 − x0 = −σ·(v − u),
    its squared error is σ² times this one, and with the adaptive weight (w scales by σ too) σ times
    this one, per sample. ``scale`` is a plain multiplier.

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
    return _policy_loss(v_plus, v_minus, u.to(dt), r, adaptive, scale)  # targets u: ‖v^± − u‖²


def nft_x0_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor | float,
    r: Tensor,
    b: float = 1.0,
    adaptive: bool = True,
    scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The reference's loss, in x0 space (``loss_space: x0``, default):
    L = scale·mean_i[ r_i·‖x̂0⁺_i − x0_i‖²/w⁺_i + (1 − r_i)·‖x̂0⁻_i − x0_i‖²/w⁻_i ],
    x̂0^± = x_σ − σ·v^±,  w^± = sg(max(mean|x̂0^± − x0|, 1e-5)) per sample (float64; 1 with
    ``adaptive=False``).

    ref: ``scripts/train_nft_sd3.py``, ``main``: ``x0_prediction = xt − t_expanded·positive_prediction``,
    ``weight_factor = abs(x0_prediction.double() − x0.double()).mean(dims).clip(min=1e-5)``,
    ``positive_loss = ((x0_prediction − x0)²/weight_factor).mean(dims)`` (and the same for the negative),
    ``policy_loss = mean((r·positive_loss/beta + (1 − r)·negative_loss/beta)·adv_clip_max)``: so the
    reference's ``scale`` is adv_clip_max/b (``NFTConfig.loss_scale`` None).

    Args:
        v_theta: ``[N, ...]`` (with grad).  v_old: ``[N, ...]`` the old/sampling EMA model (no grad).
        x_t: ``[N, ...]`` x_σ = (1 − σ)·x0 + σ·ε.  x0: ``[N, ...]`` the clean samples.
        sigma: ``[N]`` each sample's σ (or one float).  r: ``[N]`` (or ``[G, K]``) weights in [0, 1].
    Returns:
        ``(loss, stats)`` with detached stats positive_loss, negative_loss (per-sample means of the
        weighted x0 errors), r_mean.
    """
    require(b > 0, "b", "> 0", b)
    r = r.reshape(-1).detach()  # [N]
    require(r.shape[0] == v_theta.shape[0], "r", f"{v_theta.shape[0]} weights", r.shape[0])
    dt = _compute_dtype(v_theta)
    v_plus, v_minus = nft_velocities(v_theta.to(dt), v_old.to(dt), b)  # [N, ...] each
    x_t, x0 = x_t.detach().to(dt), x0.detach().to(dt)  # [N, ...]
    s = _bcast(sigma.detach() if isinstance(sigma, Tensor) else sigma, x_t)  # [N, 1, ...] or []
    x0_plus = x_t - s * v_plus  # [N, ...] x̂0⁺
    x0_minus = x_t - s * v_minus  # [N, ...] x̂0⁻
    return _policy_loss(x0_plus, x0_minus, x0, r, adaptive, scale)  # ‖x̂0^± − x0‖²


def _policy_loss(plus: Tensor, minus: Tensor, target: Tensor, r: Tensor, adaptive: bool, scale: float
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """scale·mean_i[ r_i·‖plus_i − target_i‖²/w⁺_i + (1 − r_i)·‖minus_i − target_i‖²/w⁻_i ] with the
    detached per-sample adaptive weights w (1 when not ``adaptive``); the shared tail of both loss spaces."""
    dt = plus.dtype
    pos = per_sample_mean((plus - target) ** 2)  # [N]
    neg = per_sample_mean((minus - target) ** 2)  # [N]
    if adaptive:
        pos = pos / adaptive_weight(plus, target).to(dt)  # [N] / w⁺
        neg = neg / adaptive_weight(minus, target).to(dt)  # [N] / w⁻
    r = r.to(dt)  # [N]
    loss = scale * (r * pos + (1.0 - r) * neg).mean()  # []
    stats = {"positive_loss": pos.detach().mean(), "negative_loss": neg.detach().mean(), "r_mean": r.mean()}
    return loss, stats


def _nft_old_ema_default() -> EMASchedule:
    return EMASchedule(start_step=0, start_decay=0.0, slope=0.001, max_decay=0.5)


LOSS_SPACES = ("x0", "velocity")
TIMESTEP_SAMPLING = ("per_sample", "stratified")
REFERENCE_TIMESTEP_FRACTION = 0.99
"""ref: ``config/base.py``, ``train.timestep_fraction = 0.99``: ``num_train_timesteps =
int(num_steps·timestep_fraction)`` of the sampler's levels are trained per sample (9 of 10)."""


@dataclass
class NFTConfig:
    """Hyperparameters of DiffusionNFT. The defaults are the reference's SD3.5-M recipe
    (NVlabs/DiffusionNFT ``config/nft.py``, ``_get_config`` as used by ``sd3_geneval``/``sd3_pickscore``,
    on ``config/base.py``; ``scripts/train_nft_sd3.py``); the former behaviour of this repository is
    ``loss_space=velocity, adaptive_weighting=false, loss_scale=1, std_mode=group, eps_mode=relative,
    std_eps=1e-6, beta_kl=0, timestep_sampling=stratified, num_noise_levels=10, top_fraction=0.99``.

    Remaining deviations from the reference (docs/algorithms.md, "DiffusionNFT", lists them too):
      * σ grid: the levels of this repository's samplers (``models/sde.sde_sigmas``: τ_k = 1 − k/S,
        shifted); the reference trains on its own sampler's levels, diffusers'
        FlowMatchEulerDiscreteScheduler grid (τ linear from 1 to shift(1/1000), shifted). Both are "the
        levels the sampler visits"; set ``num_sampling_steps``/``time_shift`` to ``sampler.sampling``'s.
      * Sampler and evaluation (not this section): the reference samples with a deterministic
        2nd-order DPM solver at CFG 1 and evaluates an EMA of θ (``EMAModuleWrapper``, decay
        min((1 + s)/(10 + s), 0.9)); here the samplers' ODE solver at ``sampler.sampling.guidance_scale``
        and evaluations measure the sampler (p_old).
      * Cadence and lag: the reference blends the old model once per epoch, which is one optimizer
        step in ``sd3_geneval``/``sd3_pickscore``/``sd3_hpsv2`` (``learner.blend_every: 1``; ``sd3_ocr``:
        2) and trains on the epoch's own samples; here samples may come from an old model up to
        ``learner.max_staleness`` versions behind (the asynchronous design).
      * Scale: 48 prompts × 24 images per optimizer step, LoRA rank 32 (α 64), fp16 in the reference;
        the learner's lr, weight decay, Adam betas/eps and gradient clip defaults equal the
        reference's (3e-4, 1e-4, (0.9, 0.999), 1e-8, 1.0); recipes set their own scale.
      * The group mean is per group (the reference's tracker pools one prompt's samples of an epoch:
        equal unless a prompt is drawn twice in one step); the 0.99 fraction applies to the grid's
        levels in range (= the reference's S at ``top_fraction`` 1); the loss is evaluated in the
        model's compute dtype with the float64 weight (the reference promotes to float64).
    """

    b: float = 1.0
    """Guidance strength b in v⁺ = (1 − b)·v_old + b·v_θ and v⁻ = (1 + b)·v_old − b·v_θ (ref:
    ``config.beta`` = 1.0 in config/nft.py ``_get_config``; ``sd3_ocr`` and ``sd3_multi_reward`` use 0.1)."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip before the map r = a/(2·adv_clip) + 0.5 (ref:
    ``train.adv_clip_max = 5``, config/base.py)."""
    std_mode: str = "batch"
    """Advantage scale: population std of the raw rewards over the whole batch ('batch', the reference:
    ``PerPromptStatTracker(global_std=True)``), of the within-group-centered rewards over the batch
    ('global', CRD's) or per group ('group', this repository's former default). The mean is always
    per group."""
    eps_mode: str = "add"
    """How ``std_eps`` guards the division: 'add' divides by std + std_eps (the reference: std + 1e-4);
    'relative' treats std ≤ std_eps × max|reward| as a tie (a = 0), learner/advantages.py."""
    std_eps: float = 1e-4
    """The advantage std guard (see ``eps_mode``): 1e-4 added, as the reference."""
    loss_space: str = "x0"
    """'x0': the reference's loss on x̂0 = x_σ − σ·v (``nft_x0_loss``); 'velocity': on v − u
    (``nft_loss``, the former default; per sample σ² times smaller, σ with the adaptive weight)."""
    adaptive_weighting: bool = True
    """Divide each squared error by its detached per-sample mean absolute error (ref: ``weight_factor``,
    float64, ≥ 1e-5), in the space of ``loss_space``."""
    loss_scale: float | None = None
    """Multiplier of the policy loss; None: adv_clip/b, the reference's (``policy_loss =
    mean(ori_policy_loss·adv_clip_max)``, ``ori_policy_loss = (r·pos + (1 − r)·neg)/beta``)."""
    beta_kl: float = 1e-4
    """β_KL of β_KL·mean_i ‖v_θ,i − v_base,i‖², the velocity distance to the frozen base model (no CFG,
    same x_σ, σ and prompt), added unscaled to the loss (ref: ``config.train.beta = 0.0001``,
    ``kl_div_loss``, the LoRA adapter disabled for ``ref_forward_prediction``). 0 = off (no base forward)."""
    timestep_sampling: str = "per_sample"
    """'per_sample': each sample its own ``num_noise_levels`` distinct levels of the sampler's grid, in
    random order (ref: ``perms_time``, one ``randperm`` of the sampler's timesteps per sample); 'stratified':
    T levels shared by the batch, drawn like CRD's (``noise_levels``), the former default."""
    num_noise_levels: int = 0
    """T: backward passes (levels) per sample and learner step; 0 = the reference's
    int(0.99·M), M the grid's levels in range (9 of 10; ``REFERENCE_TIMESTEP_FRACTION``)."""
    num_sampling_steps: int = 10
    """S, the samplers' steps: levels are drawn from their grid (ref: ``sample.num_steps = 10``); 0 =
    continuous (only with ``timestep_sampling: stratified`` and num_noise_levels ≥ 1)."""
    time_shift: float = 3.0
    """SD3 shift of the samplers' grid (ref: SD3.5-M's scheduler shift 3.0); set it to
    ``sampler.sampling.shift``."""
    top_fraction: float = 1.0
    """Levels are restricted to σ ∈ [1 − top_fraction, 1]; 1 = every level of the grid (the reference)."""
    old_ema: EMASchedule = field(default_factory=_nft_old_ema_default)
    """The single old model (sampler and reference): d(s) = min(0.001·s, 0.5) (ref: ``return_decay``
    with ``decay_type = 1``, config/nft.py ``_get_config``; ``sd3_ocr`` uses decay_type 2 =
    (75, 0, 0.0075, 0.999))."""

    def grid_levels(self) -> int:
        """M: the samplers' levels σ ≥ 1 − top_fraction (0 when ``num_sampling_steps`` is 0)."""
        S = self.num_sampling_steps
        if S < 1:
            return 0
        grid = sampling_sigmas(S, self.time_shift)[:S]  # [S]
        return int((grid >= 1.0 - self.top_fraction - 1e-12).sum())

    def levels_per_step(self) -> int:
        """T: ``num_noise_levels``, or int(0.99·M) (at least 1) when it is 0."""
        if self.num_noise_levels > 0:
            return self.num_noise_levels
        return max(1, int(self.grid_levels() * REFERENCE_TIMESTEP_FRACTION))

    def policy_scale(self) -> float:
        """The policy loss's multiplier: ``loss_scale``, or adv_clip/b."""
        return self.adv_clip / self.b if self.loss_scale is None else self.loss_scale

    def validate(self) -> None:
        require(self.b > 0, "b", "> 0", self.b)
        require(self.adv_clip > 0, "adv_clip", "> 0", self.adv_clip)
        require(self.std_mode in STD_MODES, "std_mode", f"one of {STD_MODES}", self.std_mode)
        require(self.eps_mode in EPS_MODES, "eps_mode", f"one of {EPS_MODES}", self.eps_mode)
        if self.eps_mode == "add":
            require(self.std_eps > 0, "std_eps", "> 0 (added to the std)", self.std_eps)
        else:
            require(0 < self.std_eps < 1, "std_eps", "a relative tolerance in (0, 1)", self.std_eps)
        require(self.loss_space in LOSS_SPACES, "loss_space", f"one of {LOSS_SPACES}", self.loss_space)
        require(self.loss_scale is None or self.loss_scale > 0, "loss_scale", "None or > 0", self.loss_scale)
        require(self.beta_kl >= 0, "beta_kl", ">= 0", self.beta_kl)
        require(self.timestep_sampling in TIMESTEP_SAMPLING, "timestep_sampling",
                f"one of {TIMESTEP_SAMPLING}", self.timestep_sampling)
        require(self.num_noise_levels >= 0, "num_noise_levels", ">= 0 (0 = int(0.99·grid levels))",
                self.num_noise_levels)
        require(self.num_sampling_steps >= 0, "num_sampling_steps", ">= 0", self.num_sampling_steps)
        require(self.time_shift > 0, "time_shift", "> 0", self.time_shift)
        require(0.0 < self.top_fraction <= 1.0, "top_fraction", "in (0, 1]", self.top_fraction)
        if self.timestep_sampling == "per_sample":
            require(self.num_sampling_steps >= 1, "num_sampling_steps",
                    ">= 1 with timestep_sampling=per_sample (levels come from the samplers' grid)",
                    self.num_sampling_steps)
            M = self.grid_levels()
            require(self.levels_per_step() <= M, "num_noise_levels",
                    f"<= {M}, the grid's levels in range (distinct levels per sample)", self.num_noise_levels)
        elif self.num_sampling_steps == 0:
            require(self.num_noise_levels >= 1, "num_noise_levels",
                    ">= 1 with continuous levels (num_sampling_steps=0)", self.num_noise_levels)
        try:
            self.old_ema.validate()
        except ValueError as err:
            raise ValueError(f"old_ema.{err}") from None


def nft_advantages(rewards: Tensor, mask: Tensor | None, config: NFTConfig) -> tuple[Tensor, Tensor]:
    """The step's advantages and optimality weights ``(a, r)``, both ``[G, K]``, per ``config``
    (``nft_optimality``; defaults: the reference's batch std + 1e-4)."""
    a, _ = advantages(rewards, mask, config.std_mode, config.adv_clip, config.std_eps, config.eps_mode)  # [G, K]
    return a, nft_reward_weight(a, config.adv_clip)  # [G, K] each


def nft_step_loss(
    v_theta: Tensor,
    v_old: Tensor,
    u: Tensor,
    r: Tensor,
    config: NFTConfig,
    v_ref: Tensor | None = None,
    x_t: Tensor | None = None,
    x0: Tensor | None = None,
    sigma: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One backward pass's loss: the policy loss in ``config.loss_space`` (x0: ``nft_x0_loss`` on
    ``x_t``, ``x0``, ``sigma``; velocity: ``nft_loss`` on ``u``) times ``config.policy_scale()``, plus
    β_KL·mean_i ‖v_θ,i − v_ref,i‖² (``losses.kl_anchor``) when ``beta_kl > 0`` (ref: ``loss =
    policy_loss + config.train.beta·mean(kl_div_loss)``: the KL is not scaled). Shapes as ``nft_x0_loss``.
    """
    c = config
    if c.loss_space == "x0":
        require(x_t is not None and x0 is not None and sigma is not None, "x_t",
                "x_t, x0 and sigma with loss_space=x0", None)
        loss, stats = nft_x0_loss(v_theta, v_old, x_t, x0, sigma, r, c.b, c.adaptive_weighting, c.policy_scale())
    else:
        loss, stats = nft_loss(v_theta, v_old, u, r, c.b, c.adaptive_weighting, c.policy_scale())
    if c.beta_kl > 0:
        require(v_ref is not None, "v_ref", "a tensor when beta_kl > 0", None)
        kl = kl_anchor(v_theta, v_ref)  # [N]
        loss = loss + c.beta_kl * kl.mean()  # []
        stats["kl_mean"] = kl.detach().mean()
    stats["loss"] = loss.detach()
    return loss, stats


@register
class NFT(Algorithm):
    """DiffusionNFT on the learner's seam: θ (trainable), one old EMA of θ that is both the reference
    inside the loss and the published sampler, and the frozen base model (the KL reference, only run
    with ``beta_kl > 0``).

    Per step: advantages over the whole batch (every rank's groups) mapped to r ∈ [0, 1]; the levels
    σ[i, j] (``per_sample``: sample i's j-th of T distinct grid levels; ``stratified``: level j shared
    by the batch); for each pass j = 1..T a fresh ε per sample (ref: ``noise = torch.randn_like(x0)``
    per timestep), then per micro-chunk the old, base and θ velocities at x_σ and one backward. So θ's
    ``backward_passes`` is T (one per pass and chunk; ref: ``effective_grad_accum_steps =
    gradient_accumulation_steps·num_train_timesteps``: the optimizer step sees the mean over the
    T passes and the batch)."""

    name = "nft"
    config_class = NFTConfig
    record = "final"
    sampler_role = "p_old"

    def roles(self):
        c = self.config
        return [Trainable("theta", backward_passes=c.levels_per_step()), EMA("p_old", "theta", c.old_ema.decay),
                Frozen("anchor")]

    def step(self, batch, ctx: StepContext) -> StepResult:
        c, model, dev = self.config, ctx.model, ctx.device
        a, _ = ctx.batch_wide(lambda r, m: nft_advantages(r, m, c), batch.rewards, batch.mask)  # [G, K]
        a = a.to(torch.float32)
        weight_r = nft_reward_weight(a, c.adv_clip)  # [G, K]
        x0, mask = batch.x0, batch.mask  # [G, K, C, H, W], [G, K]
        G, K = mask.shape
        T = c.levels_per_step()
        if c.timestep_sampling == "per_sample":
            sig = per_sample_noise_levels(G * K, T, c.num_sampling_steps, c.time_shift, c.top_fraction,
                                          ctx.generator)  # [G·K, T]
            sig = sig.T.reshape(T, G, K)  # [T, G, K] level of each sample in pass j
        else:
            sig = noise_levels(T, c.num_sampling_steps, c.time_shift, c.top_fraction, ctx.generator)  # [T]
            sig = sig.reshape(T, 1, 1).expand(T, G, K)  # [T, G, K] shared by the batch
        cond_groups = model.encode_prompts(batch.prompts)  # [G] embeds
        for t in range(T):
            eps_all = torch.randn(G, K, *x0.shape[2:], generator=ctx.generator)  # [G, K, C, H, W]
            for idx in ctx.chunks:
                m_c = mask[idx]  # [g, K]
                ch = noised_chunk_per_sample(x0, eps_all, idx, sig[t], cond_groups, dev)  # x_t, u [n, C, H, W]
                with torch.no_grad(), ctx.autocast():
                    v_old = model.velocity(ch.x_t, ch.sigma, ch.cond, transformer=ctx.net("p_old")).float()
                    v_ref = None if c.beta_kl <= 0 else model.velocity(
                        ch.x_t, ch.sigma, ch.cond, transformer=ctx.net("anchor")).float()
                v_theta = model.velocity(ch.x_t, ch.sigma, ch.cond, transformer=ctx.net("theta"))  # [n, ...] grad
                flat = m_c.reshape(-1).nonzero().squeeze(1).to(dev) if batch.padded else slice(None)
                x0_c = x0[idx].flatten(0, 1).to(dev)  # [n, C, H, W]
                loss, st = nft_step_loss(v_theta[flat], v_old[flat], ch.u[flat],
                                         weight_r[idx].reshape(-1).to(dev)[flat], c,
                                         None if v_ref is None else v_ref[flat],
                                         x_t=ch.x_t[flat], x0=x0_c[flat], sigma=ch.sigma[flat])
                share = float(m_c.sum()) / batch.n_valid
                ctx.backward("theta", loss, share)
                ctx.log(st, share)
        return StepResult(advantages=a, adv_clip=c.adv_clip)
