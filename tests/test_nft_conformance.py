"""DiffusionNFT (learner/algorithms/nft.py) against an independent computation of the reference's
formulas, on identical small tensors: losses and gradients.

The reference is NVlabs/DiffusionNFT. What is re-implemented here, from the math and from what that
code documents, in this file's own code (NumPy / plain torch, float64):
  * the loss of ``scripts/train_nft_sd3.py`` (``main``'s training loop): ``positive_prediction``,
    ``implicit_negative_prediction``, ``x0_prediction = xt − t·v``, the float64 ``weight_factor``
    clipped at 1e-5, ``positive_loss``/``negative_loss`` (means over all but the batch dim),
    ``policy_loss = mean((r·pos/beta + (1 − r)·neg/beta)·adv_clip_max)`` and
    ``loss += train.beta·mean(kl_div_loss)`` with ``kl_div_loss = mean((v_θ − v_ref)², dims)``;
  * the advantages of ``flow_grpo/stat_tracking.py`` (``PerPromptStatTracker.update`` with
    ``global_std=True``, as ``config/base.py`` sets it): per-prompt mean, ``np.std`` of all rewards
    + 1e-4; then ``r = clamp((clamp(a, ±adv_clip_max)/adv_clip_max)/2 + 0.5, 0, 1)``;
  * the timesteps: per sample the first ``int(num_steps·timestep_fraction)`` of a random permutation
    of the sampler's levels (``perms_time``), one backward per timestep
    (``effective_grad_accum_steps = gradient_accumulation_steps·num_train_timesteps``).
And the relation of the x0-space loss to the velocity form this repository used before.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrl.learner import noise_levels as nl
from diffrl.learner.algorithms import nft

F64 = torch.float64
DIMS = (1, 2, 3)


# ------------------------------------------------------------------ the reference, written independently


def reference_loss(v_theta, v_old, v_ref, xt, x0, t, adv, *, beta=1.0, adv_clip_max=5.0, kl_beta=1e-4):
    """The loss of one micro-batch at one timestep, step by step as scripts/train_nft_sd3.py computes it.
    v_*, xt, x0: [B, C, H, W]; t: [B] (σ = timestep/1000); adv: [B] the raw advantages."""
    advantages_clip = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    r = torch.clamp((advantages_clip / adv_clip_max) / 2.0 + 0.5, 0, 1)
    t_expanded = t.view(-1, 1, 1, 1)
    positive_prediction = beta * v_theta + (1 - beta) * v_old.detach()
    implicit_negative_prediction = (1.0 + beta) * v_old.detach() - beta * v_theta
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = torch.abs(x0_prediction.double() - x0.double()).mean(dim=DIMS, keepdim=True).clip(min=1e-5)
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=DIMS)
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double()).mean(dim=DIMS, keepdim=True).clip(min=1e-5))
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=DIMS)
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    kl_div_loss = ((v_theta - v_ref) ** 2).mean(dim=DIMS)
    return policy_loss + kl_beta * torch.mean(kl_div_loss)


def reference_advantages(prompts, rewards):
    """PerPromptStatTracker(global_std=True).update: (reward − mean of its prompt's rewards) /
    (np.std(all rewards) + 1e-4), rewards repeated over the trained timesteps as the script does."""
    prompts = np.array(prompts)
    rewards = np.repeat(np.asarray(rewards, dtype=np.float64)[:, None], 3, axis=1)  # [B, num_train_timesteps]
    advantages = np.zeros_like(rewards)
    for prompt in np.unique(prompts):
        mean = np.mean(rewards[prompts == prompt], axis=0, keepdims=True)
        std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (rewards[prompts == prompt] - mean) / std
    assert np.all(advantages == advantages[:, :1])  # the same for every timestep column
    return advantages[:, 0]


def reference_r(adv, adv_clip_max=5.0):
    return np.clip((np.clip(adv, -adv_clip_max, adv_clip_max) / adv_clip_max) / 2.0 + 0.5, 0, 1)


# ----------------------------------------------------------------------------------------- fixtures


def _tensors(seed=0, N=6, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(N, *shape, generator=g, dtype=F64)
    eps = torch.randn(N, *shape, generator=g, dtype=F64)
    grid = nl.sampling_sigmas(10, 3.0)[:10]
    sigma = grid[torch.randint(0, 10, (N,), generator=g)]  # [N] per-sample levels of the grid
    xt = nl.interpolate(x0, eps, sigma)
    u = nl.velocity_target(x0, eps)
    v_old = u + 0.5 * torch.randn(N, *shape, generator=g, dtype=F64)
    v_ref = u + 0.5 * torch.randn(N, *shape, generator=g, dtype=F64)
    v_theta = v_old + 0.2 * torch.randn(N, *shape, generator=g, dtype=F64)
    adv = 2.5 * torch.randn(N, generator=g, dtype=F64)
    adv[:2] = torch.tensor([7.0, -6.0])[:N]  # beyond the clip ±5
    return {"x0": x0, "eps": eps, "sigma": sigma, "xt": xt, "u": u, "v_old": v_old, "v_ref": v_ref,
            "v_theta": v_theta, "adv": adv}


def _project_loss(d, v_theta, config):
    r = nft.nft_reward_weight(d["adv"], config.adv_clip)
    loss, stats = nft.nft_step_loss(v_theta, d["v_old"], d["u"], r, config, v_ref=d["v_ref"], x_t=d["xt"],
                                    x0=d["x0"], sigma=d["sigma"])
    return loss, stats


# ------------------------------------------------------------------------------------ the x0-space loss


@pytest.mark.parametrize("b", [1.0, 0.1, 0.7])
def test_default_loss_and_gradients_equal_the_reference(b):
    d = _tensors(seed=1)
    lin = torch.nn.Linear(18, 18, dtype=F64)  # a tiny "network": gradients into its parameters too
    torch.nn.init.eye_(lin.weight)
    torch.nn.init.zeros_(lin.bias)

    def v_of(x):
        return d["v_theta"] + lin(x.flatten(1)).reshape(x.shape) - x

    c = nft.NFTConfig(b=b)
    ours, _ = _project_loss(d, v_of(d["xt"]), c)
    ours_grads = torch.autograd.grad(ours, [lin.weight, lin.bias])
    ref = reference_loss(v_of(d["xt"]), d["v_old"], d["v_ref"], d["xt"], d["x0"], d["sigma"], d["adv"], beta=b)
    ref_grads = torch.autograd.grad(ref, [lin.weight, lin.bias])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    for g_ours, g_ref in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    # and the gradient with respect to the velocity itself
    v = d["v_theta"].clone().requires_grad_(True)
    (gv,) = torch.autograd.grad(_project_loss(d, v, c)[0], v)
    v2 = d["v_theta"].clone().requires_grad_(True)
    (gv_ref,) = torch.autograd.grad(
        reference_loss(v2, d["v_old"], d["v_ref"], d["xt"], d["x0"], d["sigma"], d["adv"], beta=b), v2)
    torch.testing.assert_close(gv, gv_ref, rtol=1e-10, atol=1e-14)


def test_the_adaptive_weight_clip_at_1e5_matches():
    # a sample whose x̂0⁺ is exactly x0: the reference clips its weight at 1e-5 (the term stays 0)
    d = _tensors(seed=2, N=3)
    s = d["sigma"].view(-1, 1, 1, 1)
    d["v_old"] = d["u"].clone()
    v = d["u"].clone().requires_grad_(True)  # x̂0⁺ = x0 and x̂0⁻ = x0 for every sample
    loss, stats = _project_loss(d, v, nft.NFTConfig())
    ref = reference_loss(v, d["v_old"], d["v_ref"], d["xt"], d["x0"], d["sigma"], d["adv"])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-18)
    assert float(stats["positive_loss"]) < 1e-20 and torch.allclose(d["xt"] - s * v, d["x0"])


def _per_sample(fn, d, v_theta, r):
    """fn's loss of each sample alone ([N]): with N = 1 the mean over the batch is that sample's term."""
    return torch.stack([fn(v_theta[i:i + 1], i, r[i:i + 1]) for i in range(v_theta.shape[0])])


@pytest.mark.parametrize("adaptive", [False, True])
def test_x0_space_is_sigma_squared_or_sigma_times_the_velocity_form(adaptive):
    """x̂0 − x0 = x_σ − σ·v − x0 = −σ·(v − u): per sample the x0-space squared error is σ² × the
    velocity-space one. The adaptive weight is a mean absolute error, σ × its velocity-space value,
    so with it the x0-space term is σ × the velocity term (linear in σ, and in the error's scale)."""
    d = _tensors(seed=3)
    r = nft.nft_reward_weight(d["adv"])
    sig = d["sigma"]

    def x0_term(v, i, ri):
        return nft.nft_x0_loss(v, d["v_old"][i:i + 1], d["xt"][i:i + 1], d["x0"][i:i + 1], sig[i:i + 1], ri,
                               b=1.0, adaptive=adaptive)[0]

    def v_term(v, i, ri):
        return nft.nft_loss(v, d["v_old"][i:i + 1], d["u"][i:i + 1], ri, b=1.0, adaptive=adaptive)[0]

    factor = sig if adaptive else sig**2  # [N]
    x0_terms, v_terms = _per_sample(x0_term, d, d["v_theta"], r), _per_sample(v_term, d, d["v_theta"], r)
    torch.testing.assert_close(x0_terms, factor * v_terms, rtol=1e-10, atol=0)
    # batch losses: the x0 form is the velocity form with each sample weighted by its factor
    vx = d["v_theta"].clone().requires_grad_(True)
    lx, _ = nft.nft_x0_loss(vx, d["v_old"], d["xt"], d["x0"], sig, r, adaptive=adaptive)
    vv = d["v_theta"].clone().requires_grad_(True)
    lv, _ = nft.nft_loss(vv, d["v_old"], d["u"], r, adaptive=adaptive)
    torch.testing.assert_close(lx, (factor * v_terms).mean(), rtol=1e-10, atol=0)
    assert not torch.allclose(lx, lv)  # they differ, by a factor per level
    (gx,) = torch.autograd.grad(lx, vx)
    (gv,) = torch.autograd.grad(lv, vv)
    torch.testing.assert_close(gx, factor.view(-1, 1, 1, 1) * gv, rtol=1e-10, atol=1e-15)
    # one level shared by the batch: the whole loss and gradient scale by σ² (σ with the weight)
    s = 0.4
    xt = nl.interpolate(d["x0"], d["eps"], s)
    ls, _ = nft.nft_x0_loss(d["v_theta"], d["v_old"], xt, d["x0"], s, r, adaptive=adaptive)
    f = s if adaptive else s * s
    torch.testing.assert_close(ls, f * lv.detach(), rtol=1e-10, atol=0)


def test_the_adaptive_weight_makes_each_term_linear_in_the_error_scale():
    # scaling one sample's error by c scales its plain term by c² but its weighted term by c only
    d = _tensors(seed=4, N=1)
    r = torch.ones(1, dtype=F64)
    for c in (0.1, 3.0):
        e = d["u"] + c * (d["v_theta"] - d["u"])  # v_θ − u scaled by c around u (b = 1: v⁺ = v_θ)
        plain = [nft.nft_x0_loss(x, d["v_old"], d["xt"], d["x0"], d["sigma"], r, adaptive=False)[0]
                 for x in (d["v_theta"], e)]
        weighted = [nft.nft_x0_loss(x, d["v_old"], d["xt"], d["x0"], d["sigma"], r, adaptive=True)[0]
                    for x in (d["v_theta"], e)]
        assert float(plain[1] / plain[0]) == pytest.approx(c * c, rel=1e-10)
        assert float(weighted[1] / weighted[0]) == pytest.approx(c, rel=1e-10)


# ------------------------------------------------------------------------------------------ the KL term


def test_kl_is_beta_times_the_velocity_distance_to_the_base_unscaled():
    """ref: ``loss += config.train.beta·mean(((forward_prediction − ref_forward_prediction)²).mean(dims))``,
    β = 1e-4, the base model's velocity (LoRA disabled) at the same x_σ, σ, prompt: not multiplied by
    the policy loss's adv_clip_max/beta."""
    d = _tensors(seed=5)
    N, D = d["v_theta"].shape[0], d["v_theta"][0].numel()
    for c in (nft.NFTConfig(), nft.NFTConfig(b=0.1), nft.NFTConfig(loss_space="velocity", loss_scale=3.0)):
        v1 = d["v_theta"].clone().requires_grad_(True)
        with_kl, stats = _project_loss(d, v1, c)
        v0 = d["v_theta"].clone().requires_grad_(True)
        without, stats0 = _project_loss(d, v0, dataclasses.replace(c, beta_kl=0.0))
        diff = d["v_theta"] - d["v_ref"]
        kl = (diff**2).mean(dim=DIMS)  # [N]
        torch.testing.assert_close(with_kl - without, 1e-4 * kl.mean(), rtol=1e-9, atol=1e-18)
        torch.testing.assert_close(stats["kl_mean"], kl.mean(), rtol=1e-12, atol=0)
        assert "kl_mean" not in stats0
        (g1,) = torch.autograd.grad(with_kl, v1)
        (g0,) = torch.autograd.grad(without, v0)
        torch.testing.assert_close(g1 - g0, 2e-4 * diff / (N * D), rtol=1e-7, atol=1e-16)


# ---------------------------------------------------------------------------------------- advantages


def test_batch_std_advantages_and_r_equal_the_reference_tracker():
    g = torch.Generator().manual_seed(6)
    G, K = 4, 5
    rewards = torch.rand(G, K, generator=g, dtype=F64) * torch.tensor([[1.0], [0.1], [3.0], [0.5]], dtype=F64)
    prompts = [f"prompt {i}" for i in range(G) for _ in range(K)]
    ref_adv = reference_advantages(prompts, rewards.reshape(-1).numpy())
    a, r = nft.nft_advantages(rewards, None, nft.NFTConfig())
    np.testing.assert_allclose(a.reshape(-1).numpy(), np.clip(ref_adv, -5, 5), rtol=1e-12, atol=0)
    np.testing.assert_allclose(r.reshape(-1).numpy(), reference_r(ref_adv), rtol=1e-12, atol=0)
    # the std is of the raw rewards: a constant added to one prompt's rewards changes every advantage
    shifted = rewards.clone()
    shifted[0] += 10.0
    a2, _ = nft.nft_advantages(shifted, None, nft.NFTConfig())
    ref2 = reference_advantages(prompts, shifted.reshape(-1).numpy())
    np.testing.assert_allclose(a2.reshape(-1).numpy(), np.clip(ref2, -5, 5), rtol=1e-12, atol=0)
    assert not torch.allclose(a2, a)
    # a clip that bites: adv_clip_max = 1 (the map uses the same clip)
    a3, r3 = nft.nft_advantages(rewards, None, nft.NFTConfig(adv_clip=1.0))
    assert a3.abs().max() == 1.0
    np.testing.assert_allclose(r3.reshape(-1).numpy(), reference_r(ref_adv, 1.0), rtol=1e-12, atol=0)


def _one_ulp_tie():
    r = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.4, 0.6]], dtype=torch.float32)
    r[0, 1] = torch.nextafter(r[0, 1], torch.tensor(1.0))  # one float32 ulp (6e-8) above the others
    assert r[0, 1] != r[0, 0]
    return r


def test_near_tie_advantages_match_the_reference_and_carry_no_signal():
    r = _one_ulp_tie()
    prompts = ["tied"] * 4 + ["spread"] * 4
    ref_adv = reference_advantages(prompts, r.reshape(-1).double().numpy())
    a, w = nft.nft_advantages(r, None, nft.NFTConfig())
    np.testing.assert_allclose(a.reshape(-1).double().numpy(), ref_adv, rtol=1e-6, atol=1e-9)
    assert a[0].abs().max() < 1e-6 and (w[0] - 0.5).abs().max() < 1e-7  # the tied group: r = 0.5
    assert a[1].abs().max() > 0.5  # the other group keeps its signal
    # a whole batch tied up to one ulp: std ≈ 3e-8 ≪ 1e-4, so |a| ≤ ulp/1e-4 (the reference's bound)
    flat = torch.full((2, 4), 0.5, dtype=torch.float32)
    flat[1, 2] = torch.nextafter(flat[1, 2], torch.tensor(1.0))
    ref_flat = reference_advantages(["p"] * 4 + ["q"] * 4, flat.reshape(-1).double().numpy())
    a_flat, w_flat = nft.nft_advantages(flat, None, nft.NFTConfig())
    np.testing.assert_allclose(a_flat.reshape(-1).double().numpy(), ref_flat, rtol=1e-5, atol=1e-12)
    assert a_flat.abs().max() < 6e-8 / 1e-4 and (w_flat - 0.5).abs().max() < 1e-4
    # the former per-group form, with the relative tie guard: exactly 0.5
    _, w_group = nft.nft_advantages(r, None, nft.NFTConfig(std_mode="group", eps_mode="relative", std_eps=1e-6))
    assert torch.equal(w_group[0], torch.full((4,), 0.5))


# ---------------------------------------------------------------------------------------- timesteps


def test_per_sample_timesteps_follow_the_reference_draw():
    """ref: ``num_train_timesteps = int(num_steps·timestep_fraction)`` (10·0.99 -> 9) and ``perms_time``:
    each sample its own random permutation of the sampler's timesteps, the first 9 trained."""
    c = nft.NFTConfig()
    assert c.levels_per_step() == int(c.num_sampling_steps * 0.99) == 9
    sig = nl.per_sample_noise_levels(500, 9, 10, 3.0, generator=torch.Generator().manual_seed(7))
    grid = nl.sampling_sigmas(10, 3.0)[:10].float()
    for row in sig:
        assert len(set(row.tolist())) == 9 and torch.isin(row, grid).all()
    # the pass index carries no level preference: every level shows up at pass 0 and at pass 8
    for j in (0, 8):
        assert torch.isin(grid, sig[:, j]).all()


def test_a_learner_step_trains_each_sample_at_its_own_distinct_levels(monkeypatch):
    """On the tests' tiny model, through the real learner: T = 9 passes per micro-chunk (θ's
    backward_passes; the learner refuses a step that does not take exactly one optimizer step), each
    sample at 9 distinct levels of the grid, the same σ for θ, the old model and the base."""
    import step_reference as ref
    from prometheus_client import CollectorRegistry

    from diffrl.learner.learner import Learner
    from diffrl.models.adapter import FlowModel

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = ref.build_model_dir(Path(tmp))
        cfg = ref.base_config({"algorithm": "nft", "micro_groups": 1})
        model = FlowModel.from_pretrained(str(model_dir), device="cpu", dtype="float32")
        learner = Learner(cfg, model, registry=CollectorRegistry())
        try:
            assert learner.algorithm.roles()[0].backward_passes == 9
            calls = []
            velocity = model.velocity

            def spy(x_t, sigma, cond, transformer=None, **kw):
                calls.append((id(transformer), sigma.detach().clone()))
                return velocity(x_t, sigma, cond, transformer=transformer, **kw)

            monkeypatch.setattr(model, "velocity", spy)
            sampler_model = FlowModel.from_pretrained(str(model_dir), device="cpu", dtype="float32")
            stats = learner.train_on_groups([ref._group(0, g, sampler_model, cfg) for g in range(ref.G)])
        finally:
            learner.close()
    assert learner.step == 1 and math.isfinite(stats["loss"]) and "kl_mean" in stats  # (0 at θ = base)
    nets = {}
    for net_id, sigma in calls:
        nets.setdefault(net_id, []).append(sigma)
    assert len(nets) == 3  # θ, the old model and the frozen base
    seqs = list(nets.values())
    assert all(len(s) == 9 * 2 for s in seqs)  # 9 passes × 2 micro-chunks (one group each)
    assert all(torch.equal(a, b) for s in seqs[1:] for a, b in zip(seqs[0], s, strict=True))
    per_pass = torch.stack([torch.cat(seqs[0][2 * j:2 * j + 2]) for j in range(9)])  # [9, G·K]
    grid = nl.sampling_sigmas(10, 3.0)[:10].float()
    assert torch.isin(per_pass, grid).all()
    for i in range(per_pass.shape[1]):
        assert len(set(per_pass[:, i].tolist())) == 9  # each sample: 9 distinct levels
    assert len({tuple(per_pass[:, i].tolist()) for i in range(per_pass.shape[1])}) > 1  # not shared
