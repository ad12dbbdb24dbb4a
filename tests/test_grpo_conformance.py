"""Flow-GRPO conformance: the GRPO learner step against an independent computation of what the
reference trains (yifan123/flow_grpo), on identical small tensors, losses and gradients.

The reference is written here from its math and documented behaviour, in this file's own code:
    * flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, ``sde_step_with_logprob``: the step mean in its
      algebraic form x·(1 + g²/(2σ)·Δ) + v·(1 + g²(1 − σ)/(2σ))·Δ, std_dev_t = g_σ (σ = 1 -> sigma_max),
      the per-dimension mean log-density of N(μ, g²·|Δ|);
    * scripts/train_sd3.py, ``compute_log_prob`` (CFG with ``noise_pred_uncond.detach()``), the PPO
      clipped ratio, ``kl_loss = mean_dims (μ − μ_ref)²/(2·std_dev_t²)``, β = 0.04, the zero-advantage
      filter ``advantages.abs().sum(dim=1) != 0`` before training, gradient accumulation over the
      trained timesteps (a mean over j);
    * flow_grpo/stat_tracking.py, ``PerPromptStatTracker(global_std=True).update``: (r − mean_prompt)/
      (np.std(all rewards) + 1e-4);
    * diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps: the σ grid (the installed diffusers).
The project's side is ``GRPO.step`` with its real forward path (``FlowModel.guided_velocity``) on a
tiny linear denoiser, through a minimal step context that backpropagates as the learner does (each
pass's loss x its share / the passes), and the learner end to end on the tiny SD3 model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from torch import nn

from diffrl.learner.algorithms import grpo
from diffrl.learner.algorithms.grpo import GRPO, GRPOConfig
from diffrl.learner.batch import ExperienceBatch, Trajectory
from diffrl.models.adapter import FlowModel, PromptEmbeds
from diffrl.models.sde import scheduler_sigmas, sde_sigmas

F64 = torch.float64
C, H, W, E = 2, 2, 2, 3  # latent [C, H, W], pooled text embedding size


# ----------------------------------------------------------------------------- the reference, written out


def ref_advantages(prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    """flow_grpo/stat_tracking.py, PerPromptStatTracker(global_std=True).update(prompts, rewards), type
    'grpo', on a freshly cleared tracker: per prompt (r − its mean) / (np.std(every reward) + 1e-4)."""
    prompts_arr = np.array(prompts)
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    std = np.std(rewards, axis=0, keepdims=True) + 1e-4
    for p in np.unique(prompts_arr):
        sel = prompts_arr == p
        out[sel] = (rewards[sel] - np.mean(rewards[sel], axis=0, keepdims=True)) / std
    return out


def ref_sde_step(v, x, x_next, sigma: float, sigma_next: float, sigma_max: float, noise_level: float):
    """sd3_sde_with_logprob.py, sde_step_with_logprob with ``prev_sample`` given: (prev_sample_mean,
    log_prob [N] (mean over all but the batch dim), std_dev_t)."""
    s = torch.tensor(sigma, dtype=F64)
    dt = torch.tensor(sigma_next, dtype=F64) - s
    std_dev_t = torch.sqrt(s / (1 - torch.where(s == 1, torch.tensor(sigma_max, dtype=F64), s))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    log_prob = (-((x_next.detach() - mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return mean, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), std_dev_t


def ref_cfg_velocity(net, x, sigma: float, cond, neg, w: float):
    """train_sd3.py, compute_log_prob with train.cfg: one forward on [neg; cond], the unconditional half
    detached, noise_pred = uncond + w·(text − uncond)."""
    t = torch.full((2 * x.shape[0],), sigma, dtype=torch.float32)  # the scheduler's float32 timesteps
    out = net(torch.cat([x, x]), t, torch.cat([neg, cond]))
    uncond, text = out.chunk(2)
    uncond = uncond.detach()
    return uncond + w * (text - uncond)


def ref_train_loss(theta, anchor, data: dict, c: GRPOConfig, sigmas: torch.Tensor) -> torch.Tensor:
    """The loss whose gradient one optimizer step of train_sd3.py applies to the epoch's samples (one
    inner epoch, the trained timesteps accumulated): mean_j [ policy_loss_j + β·kl_loss_j ], each a mean
    over the samples left after the zero-advantage filter."""
    adv = torch.as_tensor(ref_advantages(data["prompts"], data["rewards"].numpy()))  # [N]
    keep = adv.abs() != 0  # train_sd3.py: samples = {k: v[mask]}
    lat, logp = data["latents"][keep], data["log_probs"][keep]  # [n, S + 1, ...], [n, S]
    cond, neg = data["cond"][keep], data["neg"][keep]
    a = adv[keep].clamp(-c.adv_clip, c.adv_clip)
    T = int(c.num_sampling_steps * c.train_fraction)
    sigma_max = float(sigmas[1])
    total = torch.zeros((), dtype=F64)
    for j in range(T):
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        x, x_next = lat[:, j], lat[:, j + 1]
        v = ref_cfg_velocity(theta, x, s, cond, neg, c.guidance_scale)
        mean, log_prob, std_dev_t = ref_sde_step(v, x, x_next, s, s_next, sigma_max, c.noise_level)
        with torch.no_grad():
            v_ref = ref_cfg_velocity(anchor, x, s, cond, neg, c.guidance_scale)
            mean_ref, _, _ = ref_sde_step(v_ref, x, x_next, s, s_next, sigma_max, c.noise_level)
        ratio = torch.exp(log_prob - logp[:, j])
        policy = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - c.clip_range, 1 + c.clip_range)))
        kl = torch.mean(((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2))
        total = total + (policy + c.kl_beta * kl) / T  # accelerate divides by the accumulation steps
    return total


# ----------------------------------------------------------------------------- a tiny linear denoiser


class LinearDenoiser(nn.Module):
    """v(x, σ, e) = M·x (channel mix) + U·e + b·σ; records the outputs that carry gradient."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.M = nn.Parameter(0.5 * torch.randn(C, C, generator=g, dtype=F64))
        self.U = nn.Parameter(0.5 * torch.randn(C, E, generator=g, dtype=F64))
        self.b = nn.Parameter(0.5 * torch.randn(C, generator=g, dtype=F64))
        self.outputs: list[torch.Tensor] = []

    def forward(self, x, sigma, emb):
        out = (torch.einsum("cd,ndhw->nchw", self.M, x.to(F64)) + (emb.to(F64) @ self.U.T)[:, :, None, None]
               + self.b[None, :, None, None] * sigma.to(F64)[:, None, None, None])
        if out.requires_grad:
            out.retain_grad()
            self.outputs.append(out)
        return out


def perturbed(net: LinearDenoiser, scale: float, seed: int) -> LinearDenoiser:
    out = LinearDenoiser(0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, q in zip(out.parameters(), net.parameters(), strict=True):
            p.copy_(q + scale * torch.randn(q.shape, generator=g, dtype=F64))
    return out


class LinearFlowModel(FlowModel):
    """FlowModel's own CFG (``guided_velocity``) over a linear denoiser and fixed prompt vectors."""

    num_train_timesteps = 1000

    def __init__(self, embeds: dict[str, torch.Tensor]):  # no pipeline
        self.device = torch.device("cpu")
        self.dtype = F64
        self.embeds = embeds

    def encode_prompts(self, prompts):
        pooled = torch.stack([self.embeds[p] for p in prompts])  # [B, E]
        return PromptEmbeds(torch.zeros(len(prompts), 1, 1, dtype=F64), pooled)

    def velocity(self, x, sigma, cond, transformer=None):
        return transformer(x, sigma, cond.pooled)


class Ctx:
    """The step context as the learner implements it (learner/learner.py, StepRun): each pass's loss
    x share x chunks, divided by DeepSpeed's accumulation steps (backward_passes x chunks), so the
    optimizer step sees Σ_passes share·loss / backward_passes."""

    def __init__(self, model, nets: dict, chunks: list[torch.Tensor], passes: int):
        self.model, self.nets, self.chunks, self.passes = model, nets, chunks, passes
        self.device = torch.device("cpu")
        self.generator = torch.Generator().manual_seed(0)
        self.world_size = 1
        self.calls = 0
        self.total = torch.zeros((), dtype=F64)
        self.stats: dict[str, list[tuple[float, float]]] = {}

    def net(self, role):
        return self.nets[role]

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, role, loss, share):
        assert role == "theta"
        scaled = loss * (share * len(self.chunks)) / (self.passes * len(self.chunks))
        scaled.backward()
        self.total = self.total + scaled.detach()
        self.calls += 1

    def log(self, stats, share):
        for k, v in stats.items():
            self.stats.setdefault(k, []).append((float(v), share))

    def batch_wide(self, fn, rewards, mask):
        return fn(rewards, None if bool(mask.all()) else mask)


PROMPTS = ["a red circle", "two blue squares", "three green triangles"]


def make_case(rewards: list[list[float]], c: GRPOConfig, seed: int = 0):
    """Trajectories sampled with the reference's SDE step by a sampling policy near θ (so the PPO ratios
    differ from 1), their recorded log-probs, and the same data as the learner's ExperienceBatch."""
    G, K = len(rewards), len(rewards[0])
    g = torch.Generator().manual_seed(seed)
    embeds = {p: torch.randn(E, generator=g, dtype=F64) for p in [*PROMPTS, ""]}
    anchor = LinearDenoiser(1)
    theta = perturbed(anchor, 0.2, 2)  # θ has moved away from the base (the KL is not 0)
    sampler = perturbed(theta, 2e-4, 3)  # the (stale) policy that sampled: about half the ratios clipped
    sigmas = c.sigmas(1000)
    S = c.num_sampling_steps
    N = G * K
    cond = torch.stack([embeds[PROMPTS[i // K]] for i in range(N)])
    neg = embeds[""].expand(N, E)
    x = torch.randn(N, C, H, W, generator=g, dtype=F64)
    lats, lps = [x], []
    for j in range(S):
        with torch.no_grad():
            v = ref_cfg_velocity(sampler, x, float(sigmas[j]), cond, neg, c.guidance_scale)
            mean, _, std_dev_t = ref_sde_step(v, x, x, float(sigmas[j]), float(sigmas[j + 1]), float(sigmas[1]),
                                              c.noise_level)
            x = mean + std_dev_t * math.sqrt(float(sigmas[j]) - float(sigmas[j + 1])) * torch.randn(
                N, C, H, W, generator=g, dtype=F64)
            _, lp, _ = ref_sde_step(v, lats[-1], x, float(sigmas[j]), float(sigmas[j + 1]), float(sigmas[1]),
                                    c.noise_level)
        lats.append(x)
        lps.append(lp)
    latents = torch.stack(lats, dim=1)  # [N, S + 1, C, H, W]
    log_probs = torch.stack(lps, dim=1)  # [N, S]
    r = torch.tensor(rewards, dtype=F64)
    data = {"prompts": [PROMPTS[i // K] for i in range(N)], "rewards": r.reshape(-1), "latents": latents,
            "log_probs": log_probs, "cond": cond, "neg": neg}
    batch = ExperienceBatch(groups=[], prompts=PROMPTS[:G], x0=latents[:, -1].reshape(G, K, C, H, W).float(),
                            rewards=r, mask=torch.ones(G, K, dtype=torch.bool), staleness=[0] * G,
                            trajectory=Trajectory(states=latents.reshape(G, K, S + 1, C, H, W),
                                                  log_probs=log_probs.reshape(G, K, S), sigmas=sigmas))
    return LinearFlowModel(embeds), theta, anchor, batch, data, sigmas


def project_step(c: GRPOConfig, model, theta, anchor, batch, chunks=None):
    """GRPO.step on copies of θ: (ctx, θ copy, the step's advantages)."""
    alg = GRPO(c, None)
    th = perturbed(theta, 0.0, 0)
    G = batch.mask.shape[0]
    chunks = chunks if chunks is not None else [torch.arange(G)]
    ctx = Ctx(model, {"theta": th, "anchor": anchor}, chunks, passes=alg.T)
    result = alg.step(batch, ctx)
    assert ctx.calls == alg.T * len(chunks)  # the learner steps exactly once per step
    return ctx, th, result.advantages


def grads(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=F64)
                      for p in net.parameters()])


# a normal group, an exactly tied group (skipped), a group with a sample exactly at its mean (skipped)
REWARDS = [[0.1, 0.7, 0.3, 0.9], [0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 1.0, 0.25]]


@pytest.mark.parametrize("chunks", [None, [torch.tensor([0]), torch.tensor([1, 2])]])
def test_grpo_step_matches_the_reference_loss_and_gradients(chunks):
    c = GRPOConfig(num_sampling_steps=4)
    c.validate()
    model, theta, anchor, batch, data, sigmas = make_case(REWARDS, c)
    ctx, th, a = project_step(c, model, theta, anchor, batch, chunks)

    ref_theta = perturbed(theta, 0.0, 0)
    ref = ref_train_loss(ref_theta, anchor, data, c, sigmas)
    ref.backward()
    assert float(ctx.total) == pytest.approx(float(ref.detach()), rel=1e-6, abs=1e-12)
    g_mine, g_ref = grads(th), grads(ref_theta)
    assert float(g_ref.norm()) > 1e-3
    assert torch.allclose(g_mine, g_ref, rtol=1e-5, atol=1e-10), (g_mine, g_ref)
    # the advantages the step used, and which samples it trained on: 4 + 0 + 3 of 12
    want = torch.as_tensor(ref_advantages(data["prompts"], data["rewards"].numpy())).reshape(3, 4)
    assert torch.allclose(a.double(), want.clamp(-5, 5), atol=1e-6)
    assert (a[1] == 0).all() and a[2, 1] == 0 and (a[0] != 0).all()
    frac = ctx.stats["trained_fraction"]
    assert frac == [(7 / 12, 1.0)]
    # the PPO clip was active on some ratios and not on others (the sampling policy is not θ)
    clip = ctx.stats["clip_fraction"]
    assert 0.2 < sum(v * s for v, s in clip) / sum(s for _, s in clip) < 0.8


def test_cfg_gradient_flows_only_through_the_conditional_branch():
    c = GRPOConfig(num_sampling_steps=4)
    model, theta, anchor, batch, _, _ = make_case(REWARDS, c)
    _, th, _ = project_step(c, model, theta, anchor, batch)
    assert th.outputs  # θ's batched CFG forwards: rows [uncond; cond]
    for out in th.outputs:
        n = out.shape[0] // 2
        assert torch.count_nonzero(out.grad[:n]) == 0  # ∂L/∂v(·, ∅) = 0: detached
        assert float(out.grad[n:].abs().max()) > 0
    # the earlier behaviour (cfg_uncond_grad): ∂L/∂v(·, ∅) = (1 − w)·∂L/∂v^w = (1 − w)/w · ∂L/∂v(·, c)
    c_both = GRPOConfig(num_sampling_steps=4, cfg_uncond_grad=True)
    _, th_both, _ = project_step(c_both, model, theta, anchor, batch)
    w = c.guidance_scale
    for out in th_both.outputs:
        n = out.shape[0] // 2
        assert torch.allclose(out.grad[:n], (1 - w) / w * out.grad[n:], rtol=1e-9, atol=1e-15)
    assert not torch.allclose(grads(th_both), grads(th))


def test_kl_is_the_references_scale_and_step_is_it_over_delta():
    g = torch.Generator().manual_seed(5)
    mu_t = torch.randn(3, C, H, W, generator=g, dtype=F64, requires_grad=True)
    mu_r = torch.randn(3, C, H, W, generator=g, dtype=F64)
    sigmas = scheduler_sigmas(10, 3.0)
    c = GRPOConfig()
    assert c.kl_std == "sde" and c.kl_beta == 0.04
    zero = torch.zeros(3, dtype=F64, requires_grad=True)
    for j in (0, 4, 8):  # σ = 1 (sigma_max in g's denominator), the middle, the last trained step
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        _, std_step = grpo.sde_step_mean_std(mu_r, mu_r, s, s_next, c.noise_level, float(sigmas[1]))
        loss, st = grpo.grpo_step_loss(zero, zero.detach(), torch.zeros(3, dtype=F64), c, mu_t, mu_r,
                                       grpo.kl_std_for(std_step, s, c, float(sigmas[1])))
        _, _, std_dev_t = ref_sde_step(mu_r, mu_r, mu_r, s, s_next, float(sigmas[1]), c.noise_level)
        ref = torch.mean(((mu_t - mu_r) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2))
        assert float(st["kl"]) == pytest.approx(float(ref.detach()), rel=1e-12)
        (g_mine,) = torch.autograd.grad(loss, mu_t)
        (g_ref,) = torch.autograd.grad(c.kl_beta * ref, mu_t)
        assert torch.allclose(g_mine, g_ref, rtol=1e-12, atol=0)
        # the exact KL of the two step Gaussians ('step') is the reference's divided by |Δ|
        c_step = GRPOConfig(kl_std="step")
        _, st_step = grpo.grpo_step_loss(zero, zero.detach(), torch.zeros(3, dtype=F64), c_step, mu_t, mu_r,
                                         grpo.kl_std_for(std_step, s, c_step, float(sigmas[1])))
        assert float(st_step["kl"]) == pytest.approx(float(ref.detach()) / (s - s_next), rel=1e-12)


@pytest.mark.parametrize(("steps", "shift"), [(10, 3.0), (10, 1.0), (4, 3.0), (1, 3.0), (28, 3.0)])
def test_sigma_grid_is_the_diffusers_sd3_scheduler_grid(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    mine = GRPOConfig(num_sampling_steps=steps, time_shift=shift).sigmas(1000)
    assert mine.shape == sched.sigmas.shape
    assert torch.allclose(mine, sched.sigmas.double(), rtol=0, atol=1e-7)
    assert GRPOConfig(num_sampling_steps=steps, time_shift=shift).sigma_max() == pytest.approx(
        float(sched.sigmas[1]) if steps > 1 else 0.0, abs=1e-7)
    # the earlier grid, an option, differs from it
    if steps > 1:
        assert not torch.allclose(GRPOConfig(num_sampling_steps=steps, time_shift=shift, sigma_grid="uniform").sigmas(),
                                  sched.sigmas.double(), atol=1e-3)
        assert torch.equal(GRPOConfig(num_sampling_steps=steps, time_shift=shift, sigma_grid="uniform").sigmas(),
                           sde_sigmas(steps, shift))


def test_sde_step_is_the_references_step():
    g = torch.Generator().manual_seed(9)
    x, v, x_next = (torch.randn(4, C, H, W, generator=g, dtype=F64) for _ in range(3))
    sigmas = scheduler_sigmas(10, 3.0)
    for j in (0, 3, 9):
        s, s_next, smax = float(sigmas[j]), float(sigmas[j + 1]), float(sigmas[1])
        lp, mean, _ = grpo.sde_step_log_prob(x, v, x_next, s, s_next, 0.7, smax)
        mean_ref, lp_ref, _ = ref_sde_step(v, x, x_next, s, s_next, smax, 0.7)
        assert torch.allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
        # the reference's log sqrt(2π) uses a float32 π (torch.as_tensor(math.pi)): a constant 1.6e-8 offset,
        # which cancels in the ratio
        diff = lp - lp_ref
        assert float(diff.abs().max()) < 1e-7 and float(diff.max() - diff.min()) < 1e-10


def test_global_std_advantages_and_zero_advantage_skipping():
    rewards = np.array([[0.1, 0.7, 0.3, 0.9], [0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 1.0, 0.25], [3.0, 1.0, 2.0, 2.5]])
    prompts = [f"p{g}" for g in range(4) for _ in range(4)]
    want = ref_advantages(prompts, rewards.reshape(-1)).reshape(4, 4)
    a = grpo.grpo_advantages(torch.tensor(rewards), clip=5.0)
    assert torch.allclose(a, torch.tensor(want), rtol=1e-12, atol=1e-15)
    # the std is the whole batch's (raw rewards), not the group's: the last group's scale differs from
    # what its own std would give
    own = (rewards[3] - rewards[3].mean()) / (rewards[3].std() + 1e-4)
    assert not np.allclose(a[3].numpy(), own)
    keep = grpo.train_mask(a, torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(keep, torch.tensor(np.abs(want) != 0))
    assert keep.sum() == 4 + 0 + 3 + 4
    assert torch.equal(grpo.train_mask(a, torch.ones(4, 4, dtype=torch.bool), skip_zero_adv=False),
                       torch.ones(4, 4, dtype=torch.bool))
    # per-group std ('group', global_std=False) is the option
    a_g = grpo.grpo_advantages(torch.tensor(rewards), std_mode="group", clip=5.0)
    assert torch.allclose(a_g[3], torch.tensor(own), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("std_mode", ["batch", "group"])
def test_a_one_ulp_jitter_in_a_tied_group_gives_zero_advantages(dtype, std_mode):
    r = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.4, 0.6]], dtype=dtype)
    r[0, 1] = torch.nextafter(r[0, 1], torch.tensor(1.0, dtype=dtype))  # one ulp
    a = grpo.grpo_advantages(r, std_mode=std_mode)
    assert torch.count_nonzero(a[0]) == 0
    assert torch.count_nonzero(a[1]) == 4
    assert not bool(grpo.train_mask(a, torch.ones(2, 4, dtype=torch.bool))[0].any())  # skipped like a tie
    # without the guard (the reference's arithmetic) the rounding would be a nonzero, kept advantage
    raw = ref_advantages(["a"] * 4 + ["b"] * 4, r.double().reshape(-1).numpy())[:4]
    assert 0 < np.abs(raw).max() < 1e-5


def test_a_step_without_any_nonzero_advantage_is_a_zero_gradient_step():
    c = GRPOConfig(num_sampling_steps=4)
    model, theta, anchor, batch, _, _ = make_case([[0.5] * 4, [0.25] * 4], c)
    ctx, th, a = project_step(c, model, theta, anchor, batch, [torch.tensor([0]), torch.tensor([1])])
    assert torch.count_nonzero(a) == 0 and float(ctx.total) == 0.0
    assert float(grads(th).abs().max()) == 0.0
    assert ctx.stats["trained_fraction"] == [(0.0, 1.0)]
    # the old behaviour trains on every sample: the KL pulls θ toward the base
    c_all = GRPOConfig(num_sampling_steps=4, skip_zero_adv=False)
    _, th_all, _ = project_step(c_all, model, theta, anchor, batch)
    assert float(grads(th_all).abs().max()) > 0


def test_the_learner_step_on_the_tiny_sd3_model_is_the_reference_gradient(tiny_model):
    """End to end through the real learner (DeepSpeed, the SD3 transformer, FlowModel's CFG): its
    pre-clip gradient norm is the reference loss's gradient norm on the same records."""
    from prometheus_client import CollectorRegistry

    from diffrl.actors.sampler import trajectory_proto
    from diffrl.learner.config import LearnerConfig
    from diffrl.learner.learner import Learner
    from diffrl.proto import experience_pb2
    from diffrl.proto.codec import tensor_to_proto

    torch.manual_seed(0)
    S, K, w = 3, 4, 2.0
    c = GRPOConfig(num_sampling_steps=S, time_shift=3.0, guidance_scale=w)
    cfg = LearnerConfig(algorithm="grpo", groups_per_step=2, torch_threads=1, checkpoint_every=0, lr=1e-3,
                        device="cpu", dtype="float32", seed=0, grad_clip=0.0)
    cfg.grpo = c
    sampler_model = FlowModel.from_pretrained(str(tiny_model), device="cpu")
    learner = Learner(cfg, FlowModel.from_pretrained(str(tiny_model), device="cpu"), registry=CollectorRegistry())
    theta_net = learner.nets.trained["theta"].engine.module
    with torch.no_grad():  # θ away from the base (the KL acts), the samples from the base (ratios ≠ 1)
        for p in theta_net.parameters():
            p.add_(0.002 * torch.randn_like(p))
    rewards = [[0.2, 0.6, 0.4, 0.8], [0.5, 0.5, 0.5, 0.5]]  # the tied group is skipped
    groups, trajs, prompts = [], [], ["a red circle", "two blue squares"]
    for gi, prompt in enumerate(prompts):
        traj = sampler_model.sample_sde([prompt] * K, [10 * gi + k for k in range(K)], num_steps=S,
                                        guidance_scale=w, shift=3.0, noise_level=c.noise_level)
        trajs.append(traj)
        grp = experience_pb2.Group(group_id=f"g{gi}", prompt=prompt, policy_version=0, sampler_id="t")
        for k in range(K):
            s = grp.samples.add(seed=10 * gi + k, latent=tensor_to_proto(traj.latents[k, -1].float()))
            s.rewards["r"] = rewards[gi][k]
            s.trajectory.CopyFrom(trajectory_proto(traj, k, 10 * gi + k, 0, "flow_sde", c.noise_level, w))
        groups.append(grp)
    assert torch.allclose(trajs[0].sigmas, scheduler_sigmas(S, 3.0))  # the sampler draws on the scheduler grid

    # the reference on a copy of θ, the base as the KL reference, the same records
    theta = copy.deepcopy(theta_net)
    base = sampler_model.transformer
    model = learner.model
    lat = torch.cat([t.latents.float() for t in trajs])  # [N, S + 1, C, H, W]
    logp = torch.cat([t.log_probs.float() for t in trajs])  # [N, S]
    cond = model.encode_prompts([p for p in prompts for _ in range(K)])
    neg = model.empty_embeds(len(prompts) * K)
    adv = torch.as_tensor(ref_advantages([p for p in prompts for _ in range(K)],
                                         np.array(rewards, dtype=np.float64).reshape(-1)))
    keep = adv != 0
    assert int(keep.sum()) == K
    sigmas = c.sigmas(model.num_train_timesteps)
    T = c.num_train_steps()

    def cfg_v(net, x, s, idx):
        both = model.velocity(torch.cat([x, x]), torch.full((2 * len(x),), s),
                              PromptEmbeds.cat([neg[idx], cond[idx]]), net)
        uncond, text = both.chunk(2)
        uncond = uncond.detach()
        return uncond + w * (text - uncond)

    idx = keep.nonzero().squeeze(1).tolist()
    a = adv[keep].float().clamp(-5, 5)
    total, kl_mean = torch.zeros(()), 0.0
    for j in range(T):
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        x, x_next = lat[keep, j], lat[keep, j + 1]
        mean, lp, std_dev_t = ref_sde_step(cfg_v(theta, x, s, idx).double(), x.double(), x_next.double(), s, s_next,
                                           float(sigmas[1]), c.noise_level)
        with torch.no_grad():
            mean_ref, _, _ = ref_sde_step(cfg_v(base, x, s, idx).double(), x.double(), x_next.double(), s, s_next,
                                          float(sigmas[1]), c.noise_level)
        ratio = torch.exp(lp - logp[keep, j].double())
        policy = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - c.clip_range, 1 + c.clip_range)))
        kl = torch.mean(((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2))
        total = total + (policy + c.kl_beta * kl) / T
        kl_mean += float(kl.detach()) / T
    total.backward()
    ref_norm = float(torch.cat([p.grad.reshape(-1) for p in theta.parameters() if p.grad is not None]).norm())

    stats = learner.train_on_groups(groups)
    assert stats["trained_fraction"] == pytest.approx(0.5)
    assert 0.1 < stats["clip_fraction"] < 0.9  # some ratios outside 1 ± 1e-4, some inside
    assert stats["grad_norm"] == pytest.approx(ref_norm, rel=2e-5)  # through the conditional branch only
    assert stats["kl"] == pytest.approx(kl_mean, rel=2e-3)  # the reference's KL scale (float32 step means)
    assert stats["loss"] == pytest.approx(float(total.detach()), rel=1e-3)
    learner.close()
