"""DIDR: Diff-Instruct with Diffused Reward, reinforcement of a one-step generator (arXiv 2605.24001).

**No public training code exists: this file is a reconstruction**, from the paper's summary and from the
two methods it builds on, Diff-Instruct / DMD (the integral-KL generator gradient) and DMD2
(tianweiy/DMD2, main/sd_guidance.py: the x0-space distribution-matching loss, the fake-score update,
the timestep range and the update ratio). docs/algorithms.md, "DIDR", lists which choice is whose.

The target is p*_0 ∝ p_ref·exp(r/β), diffused to every noise level; the generator minimizes
∫ w(t)·KL(p_θ,t ‖ p*_t) dt. The score of the diffused target splits as ∇log p*_t = s_ref + s_r, with
the Diffused Reward Score s_r = ∇_{x_t} log E_{p_ref(x0|x_t)}[exp(r/β)], which the Diffused Reward
Proxy estimates as s_r ≈ ∇_{x_t} r(D_k(x_t))/β, D_k being k differentiable Euler steps of the frozen
reference from x_t to σ = 0. The generator's gradient is E[w(t)·(s_ψ − s_ref − s_r)ᵀ ∂x_t/∂θ].

For a flow x_t = (1 − σ)·x + σ·ε the score is s = −(x_t − (1 − σ)·x̂0)/σ², so a score difference is
an x̂0 difference times (1 − σ)/σ². In x0 units (DMD2's form) the generator's direction is

    Δ = (x̂0_ψ − x̂0_ref) − σ²/(1 − σ)·s_r,       grad = Δ / mean|x − x̂0_ref|,
    L_G = ½·mean ‖x − sg(x − grad)‖²

one normalizer (DMD2's w(t)) over both terms; for k = 1, σ²/(1 − σ)·∇_{x_t} r(D_1(x_t)) is
Cov[x0|x_t]·∇r by Tweedie's formula, bounded as σ → 1. β = ∞ drops the reward term: plain distribution matching (the control).

One learner step, on this rank's groups (the samplers' groups are (prompt, seed) tickets; their
black-box rewards are monitoring):
1. **generator**: x = g_θ(z) = z − v_θ(z, 1) regenerated from each sample's seed, with grad; per
   sample σ = shift(t_min + u·(t_max − t_min)), x_t from x (detached), x̂0 of the fake score and of the
   reference (with CFG), the proxy gradient through D_k and the frozen differentiable reward (the VAE
   decode inside the graph), then L_G; one optimizer step;
2. **fake score** s_ψ: ``fake_updates`` optimizer steps, each over the batch's detached samples at fresh
   σ ~ U[0, 1) (shifted) and ε, ε- or v-prediction MSE (DMD2's ``compute_loss_fake``).

Deviations from DMD2 (each on purpose, docs/algorithms.md): the fake updates of one learner step share
the step's generated samples (DMD2 generates a fresh batch for each); samples come from the samplers'
seeds, so a group may be up to ``learner.max_staleness`` versions old as a ticket while x itself is
always the current generator's (on-policy by construction). ``reward_sigma_max`` < 1 (ours, an option;
the default 1.0 is the paper's form) gives the reward term only to draws at or below that σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
from diffrl.learner.algorithms.tdmr1 import fake_score_loss, renoise_coefficients, shift_sigma
from diffrl.models.adapter import PromptEmbeds

Tensor = torch.Tensor
VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""(x [n, C, H, W], σ [n]) -> v [n, C, H, W]."""


# ------------------------------------------------------------------------------- flow conversions


def _col(sigma: Tensor, like: Tensor) -> Tensor:
    """σ ``[n]`` as ``[n, 1, 1, 1]`` (broadcast over a sample's dims)."""
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def x0_from_velocity(x_t: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """x̂0 = x_t − σ·v. ``[n, ...]``, σ ``[n]``."""
    return x_t - _col(sigma, x_t) * v


def flow_score(x_t: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """s = ∇log p_t(x_t) = −(x_t − (1 − σ)·x̂0)/σ² for x_t = (1 − σ)·x0 + σ·ε. ``[n, ...]``."""
    s = _col(sigma, x_t)
    return -(x_t - (1 - s) * x0) / s**2


def score_to_x0_units(score: Tensor, sigma: Tensor) -> Tensor:
    """σ²/(1 − σ)·s: the x̂0 difference a score difference s stands for (flow_score's inverse map)."""
    s = _col(sigma, score)
    return s**2 / (1 - s) * score


def draw_sigma(u: Tensor, t_min: float, t_max: float, shift: float) -> Tensor:
    """σ = shift(t_min + u·(t_max − t_min)) for u ∈ [0, 1) (DMD2's uniform timesteps in
    [min_step, max_step], on the flow's shifted σ scale)."""
    return shift_sigma(t_min + u * (t_max - t_min), shift)


# --------------------------------------------------------------------------- the reward proxy


def denoise_k(x_t: Tensor, sigma: Tensor, velocity: VelocityFn, k: int) -> Tensor:
    """D_k: k Euler steps of ``velocity`` from σ to 0 on the grid σ·(1 − i/k), differentiable in x_t."""
    x = x_t
    for i in range(k):
        s_now, s_next = sigma * (1 - i / k), sigma * (1 - (i + 1) / k)
        x = x + _col(s_next - s_now, x) * velocity(x, s_now)
    return x


def diffused_reward_proxy(x_t: Tensor, sigma: Tensor, velocity: VelocityFn, reward: Callable[[Tensor], Tensor],
                          k: int) -> tuple[Tensor, Tensor]:
    """The Diffused Reward Proxy's gradient ∇_{x_t} r(D_k(x_t)) (not yet divided by β) and r(D_k(x_t)).
    ``reward`` maps D_k's output ``[n, ...]`` to ``[n]``; only x_t is differentiated (the networks are
    frozen). Returns ``(grad [n, ...], r [n])``, both detached."""
    x = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        r = reward(denoise_k(x, sigma, velocity, k))  # [n]
        (grad,) = torch.autograd.grad(r.sum(), x)
    return grad.detach(), r.detach()


# ------------------------------------------------------------------------------- generator loss


def dm_direction(x: Tensor, x0_fake: Tensor, x0_real: Tensor, reward_x0: Tensor | None = None,
                 normalize: bool = True) -> tuple[Tensor, Tensor]:
    """DMD2's ``grad``, with DIDR's reward term under the same normalizer:

        grad = (x̂0_fake − x̂0_real − reward_x0) / mean|x − x̂0_real|   (per sample; 1 when not ``normalize``)

    ``reward_x0`` = σ²/(1 − σ)·s_r (x0 units), None: no reward (β = ∞). NaNs become 0 (DMD2's
    ``nan_to_num``). ``[n, ...]`` each, no grad. Returns ``(grad, normalizer [n])``."""
    direction = x0_fake - x0_real
    if reward_x0 is not None:
        direction = direction - reward_x0
    dims = list(range(1, x.ndim))
    norm = (x - x0_real).abs().mean(dim=dims) if normalize else torch.ones(x.shape[0], dtype=x.dtype)
    grad = torch.nan_to_num(direction / norm.reshape(-1, *([1] * (x.ndim - 1))))
    return grad, norm


def dm_loss(x: Tensor, grad: Tensor) -> Tensor:
    """L_G = ½·mean ‖x − sg(x − grad)‖² (DMD2 ``loss_dm``): its gradient in x is grad / numel."""
    return 0.5 * (x.float() - (x - grad).detach().float()).square().mean()


def fake_loss(v_fake: Tensor, x: Tensor, eps: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The fake score's denoising loss at x_σ = (1 − σ)·x + σ·ε: ``v`` — mean (ε − x − v_f)²
    (tdmr1.fake_score_loss, no regularizer); ``eps`` — mean (ε̂ − ε)² with ε̂ = x_σ + (1 − σ)·v_f,
    DMD2's ε-prediction loss, which is the v loss weighted by (1 − σ)² per sample."""
    v_target = eps - x
    if target == "v":
        return fake_score_loss(v_fake, v_target, v_fake, reg=0.0)
    return ((1 - _col(sigma, x)) ** 2 * (v_target.detach() - v_fake).square()).mean()


# ----------------------------------------------------------------------------------------- config

FAKE_TARGETS = ("eps", "v")
WEIGHTINGS = ("dmd2", "none")


@dataclass
class DIDRConfig:
    """``learner.didr``. DIDR's code is not public: distribution-matching values are DMD2's SDXL runs
    (tianweiy/DMD2 experiments/sdxl, main/train_sd.py); the reward values (β, k, the reward model) are
    ours, marked so (docs/algorithms.md, "DIDR")."""

    beta: float = 0.05
    """β of the target p_ref·exp(r/β) (ours; the paper's value is not public). ``.inf`` (or ``inf``)
    drops the reward term: plain distribution matching, the control."""
    proxy_steps: int = 1
    """k: differentiable Euler steps of the reference in the Diffused Reward Proxy D_k (ours; the paper:
    "short-step")."""
    proxy_guidance: float = 1.0
    """CFG of the reference inside D_k (ours)."""
    reward_model: str = "assets/shapes-reward-cnn"
    """The frozen differentiable reward r(image, prompt): a folder with a ``config.json`` (the shapes
    world's CNN) or a TorchScript file (models/differentiable_reward.py). Empty: none (β must be ∞)."""
    real_guidance: float = 8.0
    """CFG of the reference's x̂0 in the distribution-matching term (DMD2 SDXL ``real_guidance_scale``)."""
    fake_updates: int = 5
    """Fake-score optimizer steps per generator step (DMD2 ``dfake_gen_update_ratio`` 5; TDM/SiD use 1)."""
    fake_target: str = "eps"
    """The fake score's loss: ``eps`` (DMD2's ε-MSE) or ``v`` (velocity MSE)."""
    t_min: float = 0.02
    """Lowest generator noise level, before the shift (DMD2 ``min_step_percent``)."""
    t_max: float = 0.98
    """Highest generator noise level, before the shift (DMD2 ``max_step_percent``)."""
    shift: float = 1.0
    """Shift of every σ draw, σ = s·t/(1 + (s − 1)·t) (1: uniform; SD3.5's 3 in the SD3 recipe)."""
    reward_sigma_max: float = 1.0
    """Highest σ (after the shift) whose draws get the reward term; above it only the
    distribution-matching term (ours, not the paper's: 1.0 applies it everywhere, the paper's form). On
    the shapes world the proxy's direction decorrelates from ∇r above σ ≈ 0.2 while its size grows by
    four orders (docs/results.md, "DIDR"), so the high-noise draws drown the aligned ones."""
    weighting: str = "dmd2"
    """w(t): ``dmd2`` divides by mean|x − x̂0_real| per sample (DMD2's normalizer); ``none``: w = 1."""
    lr_generator: float = 5.0e-7
    """g_θ's learning rate (DMD2 SDXL ``generator_lr``)."""
    lr_fake: float = 5.0e-7
    """s_ψ's learning rate (DMD2 SDXL ``guidance_lr``)."""

    def validate(self) -> None:
        require(self.beta > 0, "beta", "> 0 (.inf for no reward)", self.beta)
        require(self.proxy_steps >= 1, "proxy_steps", "an int >= 1", self.proxy_steps)
        require(self.fake_updates >= 1, "fake_updates", "an int >= 1", self.fake_updates)
        require(self.fake_target in FAKE_TARGETS, "fake_target", f"one of {FAKE_TARGETS}", self.fake_target)
        require(self.weighting in WEIGHTINGS, "weighting", f"one of {WEIGHTINGS}", self.weighting)
        require(0 <= self.t_min < self.t_max < 1, "t_max", "0 <= t_min < t_max < 1", (self.t_min, self.t_max))
        require(self.shift > 0, "shift", "> 0", self.shift)
        require(0 < self.reward_sigma_max <= 1, "reward_sigma_max", "in (0, 1]", self.reward_sigma_max)
        for name in ("lr_generator", "lr_fake"):
            require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        require(bool(self.reward_model) or math.isinf(self.beta), "reward_model",
                "a differentiable reward model's path (or beta=.inf)", self.reward_model)

    @property
    def uses_reward(self) -> bool:
        return not math.isinf(self.beta)


# -------------------------------------------------------------------------------------- algorithm


def batch_seeds(batch) -> Tensor:
    """``[G, K]`` int64: each sample's initial-noise seed (-1 where ``mask`` is False)."""
    G, K = batch.mask.shape
    out = torch.full((G, K), -1, dtype=torch.int64)
    for g, group in enumerate(batch.groups):
        for k, sample in enumerate(group.samples):
            out[g, k] = int(sample.seed)
    return out


@register
class DIDR(Algorithm):
    """DIDR (module docstring). Roles: θ = the one-step generator (from the loaded student), fake (the
    fake score, from the teacher), p_samp = θ (published and evaluated), real (the frozen teacher)."""

    name = "didr"
    config_class = DIDRConfig
    default_grad_clip = 10.0  # DMD2 max_grad_norm
    stat_aliases: ClassVar[dict[str, str]] = {"loss": "generator_loss"}
    gauges: ClassVar[dict[str, tuple[str, str]]] = {
        "fake_loss": ("diffrl_learner_didr_fake_loss", "DIDR: fake-score denoising loss."),
        "dm_norm": ("diffrl_learner_didr_dm_norm",
                    "DIDR: mean |x0_fake - x0_real| / normalizer, the distribution-matching term."),
        "reward_norm": ("diffrl_learner_didr_reward_norm",
                        "DIDR: mean |sigma^2/(1 - sigma) s_r| / normalizer, the diffused-reward term."),
        "proxy_reward": ("diffrl_learner_didr_proxy_reward",
                         "DIDR: the differentiable reward of D_k(x_t), the proxy's denoised estimate."),
        "model_reward": ("diffrl_learner_didr_model_reward",
                         "DIDR: the differentiable reward of the generator's samples (what it optimizes)."),
        "reward_gap": ("diffrl_learner_didr_reward_gap",
                       "DIDR: model_reward minus the samplers' black-box reward of the same tickets."),
        "regeneration_gap": ("diffrl_learner_didr_regeneration_gap",
                             "DIDR: mean |x - sampled latent| of the regenerated samples (grows with staleness)."),
    }

    def __init__(self, config: DIDRConfig, learner_config):
        super().__init__(config, learner_config)
        self._reward = None

    def roles(self):
        c = self.config
        return [Trainable("theta", backward_passes=1, lr=c.lr_generator),
                Trainable("fake", backward_passes=1, lr=c.lr_fake, steps_per_batch=c.fake_updates, init="teacher"),
                EMA("p_samp", "theta", lambda s: 0.0),
                Frozen("real", weights="teacher")]

    @classmethod
    def check_recipe(cls, config: DIDRConfig, sampler) -> None:
        s = sampler.sampling
        require(s.num_steps == 1, "sampler.sampling.num_steps", "1 (DIDR trains a one-step generator)", s.num_steps)
        require(s.guidance_scale == 1.0, "sampler.sampling.guidance_scale",
                "1.0 (the one-step generator samples at CFG 1)", s.guidance_scale)
        require(not sampler.paired, "sampler.paired", "false when learner.algorithm=didr", sampler.paired)

    def reward_fn(self, ctx: StepContext):
        """The frozen differentiable reward, loaded once on the learner's device."""
        if self._reward is None and self.config.reward_model:
            from diffrl.models.differentiable_reward import load_differentiable_reward

            self._reward = load_differentiable_reward(self.config.reward_model, ctx.device)
        return self._reward

    # ------------------------------------------------------------------------------ the step
    def step(self, batch, ctx: StepContext) -> StepResult:
        c = self.config
        seeds = batch_seeds(batch)
        cond_groups = ctx.model.encode_prompts(batch.prompts)
        total = int(batch.mask.sum())
        kept = []
        for chunk in ctx.chunks:
            g, k = batch.mask[chunk].nonzero(as_tuple=True)
            g = chunk[g]
            share = len(g) / total
            cond, prompts = cond_groups[g], [batch.prompts[i] for i in g.tolist()]
            x = self.generator_update(batch, ctx, seeds[g, k], g, k, cond, prompts, share)
            kept.append((x, cond, share))
        for _ in range(c.fake_updates):
            for x, cond, share in kept:
                self.fake_update(ctx, x, cond, share)
        return StepResult(advantages=torch.zeros(batch.mask.shape, dtype=torch.float64))

    def _velocity(self, ctx, role: str, x: Tensor, sigma: Tensor, cond: PromptEmbeds, guidance: float = 1.0
                  ) -> Tensor:
        with ctx.autocast():
            return ctx.model.guided_velocity(x, sigma, cond, guidance, transformer=ctx.net(role)).float()

    def generate(self, ctx, seeds: Tensor, cond: PromptEmbeds) -> Tensor:
        """x = g_θ(z) = z − v_θ(z, 1) from each seed's initial noise (the samplers' one Euler step). ``[n, ...]``."""
        z = ctx.model.initial_noise(seeds.tolist()).to(ctx.device)
        return z - self._velocity(ctx, "theta", z, torch.ones(len(z), device=ctx.device), cond)

    def generator_update(self, batch, ctx, seeds, g, k, cond, prompts, share: float) -> Tensor:
        """Step 1 (module docstring); returns the detached samples for the fake updates."""
        c = self.config
        x = self.generate(ctx, seeds, cond)  # with grad
        n = x.shape[0]
        sigma = draw_sigma(torch.rand(n, generator=ctx.generator), c.t_min, c.t_max, c.shift).to(ctx.device)
        eps = torch.randn(x.shape, generator=ctx.generator).to(ctx.device)
        x_t = (1 - _col(sigma, x)) * x.detach() + _col(sigma, x) * eps
        with torch.no_grad():
            x0_fake = x0_from_velocity(x_t, self._velocity(ctx, "fake", x_t, sigma, cond), sigma)
            x0_real = x0_from_velocity(x_t, self._velocity(ctx, "real", x_t, sigma, cond, c.real_guidance), sigma)
        reward = self.reward_fn(ctx)
        stats: dict[str, Tensor | float] = {}
        reward_x0 = None
        if c.uses_reward:
            reward_x0, r_proxy = self.reward_term(ctx, x_t, sigma, cond, prompts)
            if r_proxy is not None:
                stats["proxy_reward"] = r_proxy.mean()
        weighted, norm = dm_direction(x.detach(), x0_fake, x0_real, reward_x0, c.weighting == "dmd2")
        loss = dm_loss(x, weighted)
        ctx.backward("theta", loss, share)
        col = norm.reshape(-1, *([1] * (x.ndim - 1)))
        stats.update(generator_loss=loss.detach(), dm_norm=((x0_fake - x0_real).abs() / col).mean(),
                     regeneration_gap=(x.detach().cpu() - batch.x0[g, k]).abs().mean())
        if reward_x0 is not None:
            stats["reward_norm"] = (reward_x0.abs() / col).mean()
        if reward is not None:
            with torch.no_grad():
                r_model = reward(ctx.model.decode(x.detach()), prompts).float().cpu()
            stats["model_reward"] = r_model.mean()
            stats["reward_gap"] = (r_model.double() - batch.rewards[g, k]).mean()
        ctx.log(stats, share)
        return x.detach()

    def reward_term(self, ctx, x_t: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: list[str]
                    ) -> tuple[Tensor, Tensor | None]:
        """σ²/(1 − σ)·s_r in x0 units ``[n, ...]`` (0 for draws above ``reward_sigma_max``, whose proxy is
        not computed) and r(D_k(x_t)) of the draws that got it (None when none did)."""
        c = self.config
        out = torch.zeros_like(x_t)
        idx = (sigma <= c.reward_sigma_max).nonzero().flatten()
        if len(idx) == 0:
            return out, None
        reward, sub_cond = self.reward_fn(ctx), cond[idx]
        sub_prompts = [prompts[i] for i in idx.tolist()]
        image_reward = lambda x0: reward(ctx.model.decode_differentiable(x0), sub_prompts)
        v_ref = lambda xx, ss: self._velocity(ctx, "real", xx, ss, sub_cond, c.proxy_guidance)
        grad_r, r_proxy = diffused_reward_proxy(x_t[idx], sigma[idx], v_ref, image_reward, c.proxy_steps)
        out[idx] = score_to_x0_units(grad_r / c.beta, sigma[idx])
        return out, r_proxy

    def fake_update(self, ctx, x: Tensor, cond: PromptEmbeds, share: float) -> None:
        """Step 2: one pass of the fake score's denoising loss on detached samples at fresh (σ, ε)."""
        c = self.config
        n = x.shape[0]
        sigma = draw_sigma(torch.rand(n, generator=ctx.generator), 0.0, 1.0, c.shift).to(ctx.device)
        eps = torch.randn(x.shape, generator=ctx.generator).to(ctx.device)
        alpha, beta = renoise_coefficients(_col(sigma, x), torch.zeros((), device=ctx.device))
        x_sigma = alpha * x + beta * eps  # = (1 − σ)·x + σ·ε
        v_fake = self._velocity(ctx, "fake", x_sigma, sigma, cond)
        loss = fake_loss(v_fake, x, eps, sigma, c.fake_target)
        ctx.backward("fake", loss, share)
        ctx.log({"fake_loss": loss.detach()}, share)
