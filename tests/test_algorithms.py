"""Algorithm files (learner/algorithms/{crd,nft,grpo}.py) against hand-computed examples, plus the
properties CRD exists for: invariance to a per-prompt reward constant, the stop-gradient placement,
zero-variance groups."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import textwrap

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diffrl.learner import noise_levels as nl
from diffrl.learner.advantages import advantages
from diffrl.learner.algorithms import grpo, nft
from diffrl.learner.algorithms.crd import (
    CRDConfig,
    center_in_group,
    cfg,
    crd_anchor_loss,
    crd_matching_loss,
    crd_step_loss,
    implicit_reward,
    reward_adaptive_kl_loss,
)
from diffrl.learner.ema import EMASchedule, ema_decay, ema_update_
from diffrl.learner.losses import adaptive_weight, kl_anchor
from diffrl.learner.noise_levels import anchor_noise_levels, interpolate, noise_levels, velocity_target
from diffrl.models.sde import sde_step_with_noise

F64 = torch.float64


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def close(a, b, tol=1e-12) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------


def test_advantages_global_std_hand_computed():
    # centered [[-1, 0, 1], [-1, -1, 2]]; global std = sqrt((1+0+1+1+1+4)/6) = sqrt(4/3) = 2/sqrt(3)
    a, at = advantages(t64([[1, 2, 3], [10, 10, 13]]))
    h = math.sqrt(3) / 2
    assert close(a, [[-h, 0, h], [-h, -h, 2 * h]])
    assert close(at, [[0.5 - h / 10, 0.5, 0.5 + h / 10], [0.5 - h / 10, 0.5 - h / 10, 0.5 + 2 * h / 10]])


def test_advantages_group_std_hand_computed():
    # group 1: std sqrt(2/3) -> ±sqrt(3/2); group 2: centered [-1,-1,2], std sqrt(2)
    a, at = advantages(t64([[1, 2, 3], [10, 10, 13]]), std_mode="group")
    s, r2 = math.sqrt(1.5), math.sqrt(2)
    assert close(a, [[-s, 0, s], [-1 / r2, -1 / r2, 2 / r2]])
    assert close(at, a / 10 + 0.5)


def test_advantages_clip_and_normalized_range():
    # one-hot group of K=50: a_hot = sqrt(K-1) = 7 -> clipped to 5 (ã = 1); others -1/7
    r = torch.zeros(1, 50, dtype=F64)
    r[0, 0] = 1.0
    a, at = advantages(r)
    assert close(a[0, 0], 5.0) and close(at[0, 0], 1.0)
    assert close(a[0, 1:], torch.full((49,), -1 / 7, dtype=F64)) and close(
        at[0, 1:], torch.full((49,), 0.5 - 1 / 70, dtype=F64)
    )
    # other clip values keep ã in [0, 1]: ã = a/(2·clip) + 0.5
    a2, at2 = advantages(r, clip=2.0)
    assert close(a2[0, 0], 2.0) and close(at2[0, 0], 1.0) and close(at2[0, 1], 0.5 - (1 / 7) / 4)


def test_zero_variance_gives_zero_advantages_without_nan():
    a, at = advantages(t64([[2, 2, 2], [1, 1, 1]]))
    assert torch.equal(a, torch.zeros(2, 3, dtype=F64)) and torch.equal(
        at, torch.full((2, 3), 0.5, dtype=F64)
    )
    # group mode: the flat group is 0, the other is normal
    a, at = advantages(t64([[2, 2, 2], [0, 1, 2]]), std_mode="group")
    assert torch.equal(a[0], torch.zeros(3, dtype=F64)) and close(a[1], [-math.sqrt(1.5), 0, math.sqrt(1.5)])
    # and the CRD loss stays finite, with target ãc = 0
    g = torch.Generator().manual_seed(0)
    v_theta = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    v_old, u = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)
    at0 = torch.full((2, 3), 0.5, dtype=F64)
    loss, _stats = crd_step_loss(v_theta, v_old, u, at0, CRDConfig(use_kl_anchor=False))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(v_theta.grad).all()
    r_c = center_in_group(implicit_reward(v_theta, v_old, u).view(2, 3), True)
    assert close(loss, 5.0 * (r_c**2).mean())


def test_masked_samples_are_left_out():
    r = t64([[1, 2, 3, 99], [4, 4, 6, -50]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    a_m, at_m = advantages(r, mask=mask)
    a_ref, at_ref = advantages(r[:, :3])
    assert close(a_m[:, :3], a_ref) and torch.equal(a_m[:, 3], torch.zeros(2, dtype=F64))
    # the loss over the masked batch equals the loss over the batch without those samples
    g = torch.Generator().manual_seed(1)
    v_theta, v_old, u, v_anc = (torch.randn(8, 5, generator=g, dtype=F64) for _ in range(4))
    keep = mask.reshape(-1)
    conf = CRDConfig()
    loss_m, _ = crd_step_loss(v_theta, v_old, u, at_m, conf, v_anchor=v_anc, mask=mask)
    loss_r, _ = crd_step_loss(v_theta[keep], v_old[keep], u[keep], at_ref, conf, v_anchor=v_anc[keep])
    assert close(loss_m, loss_r)


# ------------------------------------------------------------------------------------------------
# Implicit reward, centering, matching loss
# ------------------------------------------------------------------------------------------------

V_THETA = [[1.0, 2.0], [0.0, -1.0]]
V_OLD = [[0.0, 1.0], [1.0, 1.0]]
U = [[0.0, 0.0], [1.0, -1.0]]


def test_adaptive_weight_hand_computed():
    # |v_θ − u| = [[1, 2], [1, 0]] -> means [1.5, 0.5]; |v_old − u| = [[0, 1], [0, 2]] -> [0.5, 1.0]
    w = adaptive_weight(t64(V_THETA), t64(U), True)
    assert w.dtype == F64 and not w.requires_grad and close(w, [1.5, 0.5])
    assert close(adaptive_weight(t64(V_OLD), t64(U), True), [0.5, 1.0])
    assert close(adaptive_weight(t64(V_THETA), t64(U), False), [1.0, 1.0])
    # perfect prediction: clipped at 1e-5, and float32 inputs still give float64 weights
    w0 = adaptive_weight(torch.ones(1, 3), torch.ones(1, 3), True)
    assert w0.dtype == F64 and close(w0, [1e-5])


def test_implicit_reward_hand_computed():
    # sample 0: ‖v_θ−u‖² = (1+4)/2 = 2.5, ‖v_old−u‖² = (0+1)/2 = 0.5
    # sample 1: ‖v_θ−u‖² = (1+0)/2 = 0.5, ‖v_old−u‖² = (0+4)/2 = 2.0
    v_theta, v_old, u = t64(V_THETA), t64(V_OLD), t64(U)
    assert close(implicit_reward(v_theta, v_old, u, adaptive=False), [-(2.5 - 0.5), -(0.5 - 2.0)])
    # adaptive: -(2.5/1.5 − 0.5/0.5) = -2/3 ; -(0.5/0.5 − 2.0/1.0) = 1
    assert close(implicit_reward(v_theta, v_old, u, adaptive=True), [-2 / 3, 1.0])
    # identical models: R̂ = 0
    assert close(implicit_reward(v_theta, v_theta, u, adaptive=True), [0.0, 0.0])


def test_center_in_group():
    x = t64([[1, 2, 6], [0, 0, 3]])
    assert close(center_in_group(x, True), [[-2, -1, 3], [-1, -1, 2]])


def test_matching_loss_mse_hand_computed():
    # R̂c = [-2, -1, 3], ãc = [-0.2, -0.1, 0.3], β = 0.5: β·R̂c − ãc = [-0.8, -0.4, 1.2]
    # mean sq = (0.64 + 0.16 + 1.44)/3 = 0.74666..., × s/β = 10 -> 7.4666...
    r_hat, at = t64([[1, 2, 6]]), t64([[0.4, 0.5, 0.9]])
    loss = crd_matching_loss(r_hat, at, beta=0.5, grad_scale=5.0, form="mse")
    assert close(loss, 10 * 2.24 / 3)
    # a per-prompt constant in R̂ (the prompt's log Z) cancels
    shifted = r_hat + 123.0
    assert close(crd_matching_loss(shifted, at, beta=0.5, grad_scale=5.0), loss, 1e-10)


def test_matching_loss_logistic_hand_computed():
    xs = [-1.0, -0.5, 1.5]  # β·R̂c
    ys = [1 / (1 + math.exp(0.2)), 1 / (1 + math.exp(0.1)), 1 / (1 + math.exp(-0.3))]  # sigmoid(ãc)
    bce = [math.log1p(math.exp(x)) - x * y for x, y in zip(xs, ys)]
    loss = crd_matching_loss(
        t64([[1, 2, 6]]), t64([[0.4, 0.5, 0.9]]), beta=0.5, grad_scale=5.0, form="logistic"
    )
    assert close(loss, 10 * sum(bce) / 3)


def test_stop_gradient_on_group_mean_of_r_hat():
    beta, s = 0.5, 5.0
    r_hat = t64([[1.0, 2.0, 6.0], [0.5, -1.0, 0.0]]).requires_grad_(True)
    at = t64([[0.4, 0.5, 0.9], [0.7, 0.2, 0.6]])
    N = 6
    r_c = r_hat.detach() - r_hat.detach().mean(1, keepdim=True)
    a_c = at - at.mean(1, keepdim=True)
    # logistic: dL/dR̂_i = (s/β)(1/N)·β·(σ(β R̂c_i) − σ(ãc_i)), NOT re-centered (sg on the mean)
    loss = crd_matching_loss(r_hat, at, beta, s, form="logistic")
    (grad,) = torch.autograd.grad(loss, r_hat)
    manual = (s / N) * (torch.sigmoid(beta * r_c) - torch.sigmoid(a_c))
    assert close(grad, manual)
    without_sg = manual - manual.mean(1, keepdim=True)  # what a differentiable mean would give
    assert not torch.allclose(grad, without_sg, atol=1e-6)
    # mse: dL/dR̂_i = (s/β)(2/N)·β·(β R̂c_i − ãc_i) (the residual has zero group mean)
    loss = crd_matching_loss(r_hat, at, beta, s, form="mse")
    (grad,) = torch.autograd.grad(loss, r_hat)
    assert close(grad, (2 * s / N) * (beta * r_c - a_c))


def test_gradient_into_velocity_uses_detached_weights():
    # dL/dv_θ,i = dL/dR̂_i · (−2 (v_θ,i − u_i) / (D · w_θ,i)), w_θ a constant
    g = torch.Generator().manual_seed(2)
    G, K, D = 2, 3, 4
    v_theta = torch.randn(G * K, D, generator=g, dtype=F64, requires_grad=True)
    v_old, u = torch.randn(G * K, D, generator=g, dtype=F64), torch.randn(G * K, D, generator=g, dtype=F64)
    at = torch.rand(G, K, generator=g, dtype=F64)
    conf = CRDConfig(use_kl_anchor=False, beta=0.7, grad_scale=3.0)
    loss, _ = crd_step_loss(v_theta, v_old, u, at, conf)
    (grad,) = torch.autograd.grad(loss, v_theta)
    r_hat = implicit_reward(v_theta.detach(), v_old, u).view(G, K)
    r_c = r_hat - r_hat.mean(1, keepdim=True)
    a_c = at - at.mean(1, keepdim=True)
    d_r = (2 * conf.grad_scale / (G * K)) * (conf.beta * r_c - a_c)  # [G, K]
    w = (v_theta.detach() - u).abs().mean(1)  # [N]
    manual = d_r.reshape(-1, 1) * (-2 * (v_theta.detach() - u) / (D * w.reshape(-1, 1)))
    assert close(grad, manual)


# ------------------------------------------------------------------------------------------------
# KL anchor
# ------------------------------------------------------------------------------------------------


def test_cfg_and_kl_anchor_hand_computed():
    assert close(cfg(t64([1.0]), t64([3.0]), 4.5), [10.0])  # 1 + 4.5·(3 − 1)
    assert close(kl_anchor(t64([[1.0, 2.0], [0.0, 0.0]]), t64([[0.0, 0.0], [1.0, 3.0]])), [2.5, 5.0])


def test_reward_adaptive_kl_hand_computed():
    kl = t64([[1, 2], [3, 4]])
    at = t64([[0.0, 1.0], [0.5, 0.25]])
    # c0 = 1e-4/0.1 = 1e-3; coef = [[0.001, 1], [0.5005, 0.25075]]; weighted sum 4.5055; /4 ×0.1
    assert close(reward_adaptive_kl_loss(kl, at, 0.1, 1e-4, adaptive=True), 0.1126375)
    assert close(reward_adaptive_kl_loss(kl, at, 0.1, 1e-4, adaptive=False), 0.25)
    assert close(reward_adaptive_kl_loss(kl, at, 0.0, 1e-4), 0.0)


# ------------------------------------------------------------------------------------------------
# EMA snapshots
# ------------------------------------------------------------------------------------------------


def test_ema_decay_schedules():
    old = (0, 0.25, 0.005, 0.999)
    assert [ema_decay(s, *old) for s in (0, 10, 100, 149)] == pytest.approx(
        [0.25, 0.30, 0.75, 0.995], abs=1e-12
    )
    assert ema_decay(150, *old) == 0.999 and ema_decay(10_000, *old) == 0.999
    samp = (75, 0.0, 0.0075, 0.999)
    assert [ema_decay(s, *samp) for s in (0, 50, 75)] == [0.0, 0.0, 0.0]
    assert [ema_decay(s, *samp) for s in (76, 100, 208)] == pytest.approx([0.0075, 0.1875, 0.9975], abs=1e-12)
    assert ema_decay(209, *samp) == 0.999
    conf = CRDConfig()
    assert conf.old_ema.decay(100) == pytest.approx(0.75) and conf.sampler_ema.decay(100) == pytest.approx(
        0.1875
    )


def test_ema_update_in_place():
    snap = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    theta = [torch.tensor([3.0, 6.0], requires_grad=True), torch.tensor([[4.0]], requires_grad=True)]
    ids = [id(t) for t in snap]
    ema_update_(snap, theta, 0.25)  # 0.25·snap + 0.75·θ
    assert [id(t) for t in snap] == ids
    assert torch.equal(snap[0], torch.tensor([2.5, 5.0])) and torch.equal(snap[1], torch.tensor([[3.0]]))
    assert not snap[0].requires_grad
    ema_update_(snap, theta, 1.0)
    assert torch.equal(snap[0], torch.tensor([2.5, 5.0]))
    snap[0][0] = float("inf")  # d = 0 is an exact copy, even over non-finite values
    ema_update_(snap, theta, 0.0)
    assert torch.equal(snap[0], torch.tensor([3.0, 6.0])) and torch.equal(snap[1], torch.tensor([[4.0]]))
    with pytest.raises(ValueError, match="snapshot_params"):
        ema_update_(snap[:1], theta, 0.5)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(snap, theta, 1.5)


# ------------------------------------------------------------------------------------------------
# Noise levels and the forward process
# ------------------------------------------------------------------------------------------------


def test_shift_hand_computed():
    assert close(nl.shift_sigma(0.5, 3.0), 0.75) and close(nl.shift_sigma(0.1, 3.0), 0.25)
    assert close(nl.unshift_sigma(0.75, 3.0), 0.5)
    assert close(nl.sampling_sigmas(4, 1.0), [1.0, 0.75, 0.5, 0.25, 0.0])


def test_noise_levels_cover_the_sampler_grid():
    g = torch.Generator().manual_seed(0)
    # no shift, full range, T = S: each sampler level exactly once, noisiest first
    s = noise_levels(10, 10, 1.0, 1.0, g)
    assert torch.allclose(s, torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]))
    # shift 3, T = 2S: each shifted level exactly twice (0.75 = shift(0.5), 0.25 = shift(0.1))
    s = noise_levels(20, 10, 3.0, 1.0, g)
    grid = nl.sampling_sigmas(10, 3.0)[:10].float()
    assert all(int((s == lvl).sum()) == 2 for lvl in grid)
    assert int((s == 0.75).sum()) == 2 and int(torch.isclose(s, torch.tensor(0.25)).sum()) == 2
    # top fraction 0.5, no shift: levels 1.0 .. 0.5 only (6 of them), each twice for T = 12
    s = noise_levels(12, 10, 1.0, 0.5, g)
    assert s.min() >= 0.5 - 1e-6 and len(torch.unique(s)) == 6 and torch.all(s[:-1] >= s[1:])
    # shift 3, top fraction 0.5: σ ≥ 0.5 <=> τ ≥ 0.25 -> τ ∈ {1, .9, ..., .3}; smallest shift(0.3) = 0.5625
    s = noise_levels(8, 10, 3.0, 0.5, g)
    assert len(torch.unique(s)) == 8 and math.isclose(float(s.min()), 0.5625, rel_tol=1e-6)


def test_noise_levels_continuous_are_stratified():
    T, shift, f = 5, 3.0, 0.9
    s = noise_levels(T, 0, shift, f, torch.Generator().manual_seed(3))
    tau = nl.unshift_sigma(s.double(), shift)
    tau_lo = 0.1 / (3.0 - 2.0 * 0.1)  # unshift(1 − f)
    for j in range(T):  # draw j falls in stratum j of [τ_lo, 1], noisiest first
        hi, lo = 1 - (1 - tau_lo) * j / T, 1 - (1 - tau_lo) * (j + 1) / T
        assert lo - 1e-6 <= float(tau[j]) <= hi + 1e-6
    assert s.min() >= 0.1 - 1e-6 and s.max() <= 1.0
    again = noise_levels(T, 0, shift, f, torch.Generator().manual_seed(3))
    assert torch.equal(s, again)


def test_anchor_noise_levels_lie_below_the_matching_range():
    g = torch.Generator().manual_seed(0)
    # top fraction 0.3, no shift: matching on 1.0 .. 0.7, anchor-only on the other six, each once for T_a = 6
    s = anchor_noise_levels(6, 10, 1.0, 0.3, g)
    assert torch.allclose(s, torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2, 0.1]))
    # T_a = 3 over those six: one draw in each pair (0.6, 0.5), (0.4, 0.3), (0.2, 0.1)
    for _ in range(5):
        s = anchor_noise_levels(3, 10, 1.0, 0.3, g)
        for j, pair in enumerate(((0.6, 0.5), (0.4, 0.3), (0.2, 0.1))):
            assert any(math.isclose(float(s[j]), p, abs_tol=1e-6) for p in pair), s
    # the two ranges partition the sampler's grid
    grid = set(nl.sampling_sigmas(10, 3.0)[:10].float().tolist())
    top = set(noise_levels(40, 10, 3.0, 0.5, g).tolist())
    low = set(anchor_noise_levels(40, 10, 3.0, 0.5, g).tolist())
    assert top | low == grid and not top & low and max(low) < 0.5 <= min(top)
    # continuous: draw j in stratum j of (0, τ_lo], τ_lo = unshift(1 − f)
    T, shift, f = 4, 3.0, 0.6
    s = anchor_noise_levels(T, 0, shift, f, torch.Generator().manual_seed(1))
    tau, tau_lo = nl.unshift_sigma(s.double(), shift), float(nl.unshift_sigma(0.4, shift))
    for j in range(T):
        assert tau_lo * (1 - (j + 1) / T) - 1e-6 <= float(tau[j]) <= tau_lo * (1 - j / T) + 1e-6
    # nothing below the range: a full range, or 1 − f at or under the smallest level (0.1)
    with pytest.raises(ValueError, match=r"^top_fraction: expected in \(0, 1\)"):
        anchor_noise_levels(2, 10, 1.0, 1.0, g)
    with pytest.raises(ValueError, match=r"^top_fraction: expected < 0.9 "):
        anchor_noise_levels(2, 10, 1.0, 0.95, g)


def test_crd_anchor_loss_hand_computed():
    # G = 1, K = 2, one element each: kl = [(1 − 0)², (3 − 1)²] = [1, 4]
    v_theta, v_anc = t64([[1.0], [3.0]]).requires_grad_(), t64([[0.0], [1.0]])
    at = t64([[0.0, 1.0]])  # ã: worst and best
    conf = CRDConfig(beta_kl=2.0, beta_min=0.5)
    loss, stats = crd_anchor_loss(v_theta, v_anc, at, conf)
    # β_KL·mean[(c0 + ã(1 − c0))·kl], c0 = 0.25: 2·(0.25·1 + 1·4)/2 = 4.25
    assert close(loss, 4.25) and close(stats["loss"], 4.25) and close(stats["anchor_kl_mean"], 2.5)
    loss.backward()  # d/dv_θ: 2·coef·2(v_θ − v_anc)/2 = [0.25·2·1, 1·2·2]·(2/2)
    assert close(v_theta.grad, [[0.5], [4.0]])
    # masked: only the best sample counts
    loss_m, _ = crd_anchor_loss(v_theta, v_anc, at, conf, mask=torch.tensor([[False, True]]))
    assert close(loss_m, 8.0)


def test_interpolate_and_target_hand_computed():
    assert close(interpolate(t64([[2.0]]), t64([[-1.0]]), 0.25), [[1.25]])  # 0.75·2 + 0.25·(−1)
    x0 = t64([[2.0, 2.0], [4.0, 4.0]])
    assert close(interpolate(x0, torch.zeros_like(x0), t64([0.5, 0.25])), [[1.0, 1.0], [3.0, 3.0]])
    assert close(velocity_target(t64([[2.0]]), t64([[-1.0]])), [[-3.0]])


# ------------------------------------------------------------------------------------------------
# Invariance to a per-prompt reward constant (CRD's point), with a tiny linear velocity model
# ------------------------------------------------------------------------------------------------

REWARDS = [[0.25, 1.5, -0.75, 2.0], [3.0, 3.0, 0.5, -1.25]]  # dyadic: group means exact with K = 4
PER_PROMPT = [[1000.0], [-7.5]]


def _linear_model_loss(a_tilde: torch.Tensor, conf: CRDConfig):
    g = torch.Generator().manual_seed(7)
    N, D = 8, 3
    x0 = torch.randn(N, D, generator=g, dtype=F64)
    eps = torch.randn(N, D, generator=g, dtype=F64)
    x = interpolate(x0, eps, 0.6)
    u = velocity_target(x0, eps)
    W = torch.randn(D, D, generator=g, dtype=F64).requires_grad_(True)  # θ: v = x W
    W_old = W.detach() + 0.1 * torch.randn(D, D, generator=g, dtype=F64)
    W_anchor = W.detach() + 0.2 * torch.randn(D, D, generator=g, dtype=F64)
    loss, _ = crd_step_loss(x @ W, x @ W_old, u, a_tilde, conf, v_anchor=x @ W_anchor)
    (grad,) = torch.autograd.grad(loss, W)
    return loss.detach(), grad


@pytest.mark.parametrize("std_mode", ["global", "group"])
@pytest.mark.parametrize("form", ["mse", "logistic"])
def test_invariance_to_per_prompt_constant(std_mode, form):
    r = t64(REWARDS)
    r_shift = r + t64(PER_PROMPT)
    a1, at1 = advantages(r, std_mode=std_mode)
    a2, at2 = advantages(r_shift, std_mode=std_mode)
    assert torch.equal(a1, a2) and torch.equal(at1, at2)
    conf = CRDConfig(std_mode=std_mode, loss_form=form)
    loss1, grad1 = _linear_model_loss(at1, conf)
    loss2, grad2 = _linear_model_loss(at2, conf)
    assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)
    assert torch.allclose(grad1, grad2, rtol=0, atol=1e-14) and grad1.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(
    rewards=st.lists(st.floats(-100, 100), min_size=12, max_size=12),
    offsets=st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
    scale=st.floats(0.01, 100.0),
    std_mode=st.sampled_from(["global", "group"]),
)
def test_advantages_property_invariant_to_offsets_and_scale(rewards, offsets, scale, std_mode):
    r = t64(rewards).reshape(3, 4)
    c = r - r.mean(1, keepdim=True)
    if std_mode == "global":
        assume(float(c.pow(2).mean().sqrt()) > 1e-2)
    else:
        assume(bool((c.pow(2).mean(1).sqrt() > 1e-2).all()))
    a1, at1 = advantages(r, std_mode=std_mode)
    a2, at2 = advantages(scale * r + t64(offsets).reshape(3, 1), std_mode=std_mode)
    assert torch.allclose(a1, a2, rtol=0, atol=1e-7) and torch.allclose(at1, at2, rtol=0, atol=1e-8)
    assert bool((at1 >= 0).all() and (at1 <= 1).all())
    assert torch.allclose(at1.mean(1), torch.full((3,), 0.5, dtype=F64), atol=1e-12) or bool(
        (a1.abs() == 5.0).any()
    )


def test_global_std_of_raw_rewards_is_not_invariant():
    """The contrast: scaling by the std of the raw rewards lets between-prompt offsets leak in."""

    def raw_global_std_variant(rewards):
        a = (rewards - rewards.mean(1, keepdim=True)) / rewards.std(unbiased=False)
        a = a.clamp(-5, 5)
        return a, a / 10 + 0.5

    r = t64(REWARDS)
    r_shift = r + t64(PER_PROMPT)
    a1, at1 = raw_global_std_variant(r)
    a2, at2 = raw_global_std_variant(r_shift)
    assert not torch.allclose(a1, a2, atol=1e-3)
    loss1, grad1 = _linear_model_loss(at1, CRDConfig())
    loss2, grad2 = _linear_model_loss(at2, CRDConfig())
    assert not torch.allclose(loss1, loss2, atol=1e-6) and not torch.allclose(grad1, grad2, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The per-noise-level loss and the config
# ------------------------------------------------------------------------------------------------


def test_crd_step_loss_composes_the_parts():
    g = torch.Generator().manual_seed(4)
    G, K, D = 2, 3, 5
    v_theta = torch.randn(G * K, D, generator=g, dtype=F64, requires_grad=True)
    v_old, u, v_anc = (torch.randn(G * K, D, generator=g, dtype=F64) for _ in range(3))
    _, at = advantages(torch.randn(G, K, generator=g, dtype=F64))
    conf = CRDConfig()
    loss, stats = crd_step_loss(v_theta, v_old, u, at, conf, v_anchor=v_anc)
    r_hat = implicit_reward(v_theta, v_old, u, True).view(G, K)
    expected_crd = crd_matching_loss(r_hat, at, 1.0, 5.0, "mse")
    expected_kl = reward_adaptive_kl_loss(kl_anchor(v_theta, v_anc).view(G, K), at, 0.1, 1e-4, True)
    assert close(loss, expected_crd + expected_kl)
    assert close(stats["matching_loss"], expected_crd) and close(stats["kl_loss"], expected_kl)
    assert close(stats["r_hat_mean"], r_hat.mean()) and -1 <= float(stats["reward_corr"]) <= 1
    assert all(not v.requires_grad and v.ndim == 0 for v in stats.values())
    loss.backward()
    assert v_theta.grad is not None and torch.isfinite(v_theta.grad).all()
    # ablations: no anchor needs no v_anchor; fixed-strength KL
    loss_nokl, st = crd_step_loss(v_theta, v_old, u, at, CRDConfig(use_kl_anchor=False))
    assert close(loss_nokl, expected_crd) and float(st["kl_loss"]) == 0.0
    loss_fixed, _ = crd_step_loss(v_theta, v_old, u, at, CRDConfig(reward_adaptive_kl=False), v_anchor=v_anc)
    assert close(loss_fixed, expected_crd + 0.1 * kl_anchor(v_theta, v_anc).mean())
    with pytest.raises(ValueError, match="v_anchor"):
        crd_step_loss(v_theta, v_old, u, at, conf)


def test_crd_step_loss_low_precision_inputs():
    g = torch.Generator().manual_seed(5)
    v_theta = torch.randn(4, 8, generator=g).to(torch.bfloat16).requires_grad_(True)
    v_old, u, v_anc = (torch.randn(4, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    at = torch.tensor([[0.2, 0.8], [0.5, 0.4]])
    loss, _ = crd_step_loss(v_theta, v_old, u, at, CRDConfig(), v_anchor=v_anc)
    loss.backward()
    assert torch.isfinite(loss) and v_theta.grad.dtype == torch.bfloat16


def test_crd_config_defaults_and_validation():
    c = CRDConfig()
    c.validate()
    assert (c.beta, c.grad_scale, c.beta_kl, c.beta_min, c.kl_cfg_scale) == (1.0, 5.0, 0.1, 1e-4, 4.5)
    assert (c.num_noise_levels, c.adaptive_weighting, c.std_mode, c.adv_clip, c.loss_form) == (
        20,
        True,
        "global",
        5.0,
        "mse",
    )
    assert dataclasses.astuple(c.old_ema) == (0, 0.25, 0.005, 0.999)
    assert dataclasses.astuple(c.sampler_ema) == (75, 0.0, 0.0075, 0.999)
    assert c.decoupled_sampler and c.use_kl_anchor and c.reward_adaptive_kl
    assert c.noise_levels(torch.Generator().manual_seed(0)).shape == (20,)
    bad = {
        "beta": {"beta": 0.0},
        "grad_scale": {"grad_scale": -1.0},
        "loss_form": {"loss_form": "huber"},
        "std_mode": {"std_mode": "raw"},
        "adv_clip": {"adv_clip": 0.0},
        "top_fraction": {"top_fraction": 0.0},
        "beta_min": {"beta_min": 0.5},
        "beta_kl": {"beta_kl": -0.1},
        "num_noise_levels": {"num_noise_levels": 0},
        "num_anchor_levels": {"num_anchor_levels": 2, "top_fraction": 0.3, "use_kl_anchor": False},
        "old_ema.max_decay": {"old_ema": EMASchedule(0, 0.25, 0.005, 1.5)},
        "sampler_ema.start_decay": {"sampler_ema": EMASchedule(75, -0.1, 0.0075, 0.999)},
    }
    for name, kwargs in bad.items():
        with pytest.raises(ValueError, match=rf"^{name}:"):
            CRDConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=r"^top_fraction: expected < 0.75 with anchor-only levels"):
        CRDConfig(num_anchor_levels=2, top_fraction=0.8).validate()  # the smallest level is shift_3(0.1) = 0.25
    with pytest.raises(ValueError, match=r"^num_anchor_levels:"):
        CRDConfig(num_anchor_levels=-1).validate()
    c = CRDConfig(num_noise_levels=4, num_anchor_levels=2, top_fraction=0.3)
    c.validate()
    assert c.levels_per_step == 6 and c.anchor_noise_levels(torch.Generator().manual_seed(0)).max() < 0.7


def _undocumented_fields(cls) -> list[str]:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    documented = {
        node.target.id
        for node, after in itertools.pairwise(body)
        if isinstance(node, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
    }
    return [f.name for f in dataclasses.fields(cls) if f.name not in documented]


@pytest.mark.parametrize("cls", [CRDConfig, EMASchedule, nft.NFTConfig, grpo.GRPOConfig])
def test_every_config_field_has_a_docstring_and_loads_structured(cls):
    assert _undocumented_fields(cls) == []
    omegaconf = pytest.importorskip("omegaconf")
    obj = omegaconf.OmegaConf.to_object(omegaconf.OmegaConf.structured(cls))
    assert obj == cls()
    obj.validate()


# ------------------------------------------------------------------------------------------------
# DiffusionNFT-style baseline
# ------------------------------------------------------------------------------------------------


def test_nft_reward_weight():
    r = nft.nft_reward_weight(t64([5.0, -5.0, 0.0, 2.5, 10.0]), clip=5.0)
    assert close(r, [1.0, 0.0, 0.5, 0.75, 1.0])
    # default (DiffusionNFT): (r − group mean)/(std of all raw rewards + 1e-4); here std = sqrt(2/3)
    s = 1.0 / (math.sqrt(2 / 3) + 1e-4)
    assert close(nft.nft_optimality(t64([[1, 2, 3]])), [[0.5 - s / 10, 0.5, 0.5 + s / 10]])
    # two groups: the batch std of the raw rewards mixes them (std of [1, 2, 3, 11, 12, 13])
    rb = t64([[1, 2, 3], [11, 12, 13]])
    sb = 1.0 / (float(rb.std(unbiased=False)) + 1e-4)
    assert close(nft.nft_optimality(rb), [[0.5 - sb / 10, 0.5, 0.5 + sb / 10]] * 2)
    # the former per-group form
    s = math.sqrt(1.5)
    assert close(nft.nft_optimality(rb, std_mode="group", eps=1e-6, eps_mode="relative"),
                 [[0.5 - s / 10, 0.5, 0.5 + s / 10]] * 2)


def test_nft_loss_hand_computed():
    # b = 0.5, v_old = 0: v⁺ = 0.5·v_θ, v⁻ = −0.5·v_θ
    v_theta = t64([[1.0, 1.0], [2.0, 0.0]])
    v_old = torch.zeros(2, 2, dtype=F64)
    u = t64([[1.0, 0.0], [0.0, 0.0]])
    r = t64([1.0, 0.25])
    # sample 0: ‖v⁺−u‖² = (0.25+0.25)/2 = 0.25, ‖v⁻−u‖² = (2.25+0.25)/2 = 1.25 -> 1·0.25
    # sample 1: ‖v⁺−u‖² = (1+0)/2 = 0.5,      ‖v⁻−u‖² = (1+0)/2 = 0.5      -> 0.5
    loss, stats = nft.nft_loss(v_theta, v_old, u, r, b=0.5)
    assert close(loss, (0.25 + 0.5) / 2)
    assert close(stats["positive_loss"], (0.25 + 0.5) / 2) and close(stats["negative_loss"], (1.25 + 0.5) / 2)
    # adaptive: w⁺ = [0.5, 0.5], w⁻ = [1.0, 0.5] -> sample 0: 0.25/0.5 = 0.5; sample 1: 0.25·1 + 0.75·1
    loss_ad, _ = nft.nft_loss(v_theta, v_old, u, r, b=0.5, adaptive=True)
    assert close(loss_ad, (0.5 + 1.0) / 2)
    v_plus, v_minus = nft.nft_velocities(v_theta, v_old, 0.5)
    assert close(v_plus, 0.5 * v_theta) and close(v_minus, -0.5 * v_theta)


def test_nft_gradient_at_the_old_model():
    # at v_θ = v_old: ∂L/∂v_θ = 2b(2r − 1)(v_old − u)/(N·D): zero for r = 0.5, towards u for r > 0.5
    g = torch.Generator().manual_seed(6)
    N, D, b = 3, 4, 0.7
    v_old, u = torch.randn(N, D, generator=g, dtype=F64), torch.randn(N, D, generator=g, dtype=F64)
    r = t64([0.5, 1.0, 0.1])
    v_theta = v_old.clone().requires_grad_(True)
    loss, _ = nft.nft_loss(v_theta, v_old, u, r, b=b)
    (grad,) = torch.autograd.grad(loss, v_theta)
    assert close(grad, 2 * b * (2 * r - 1).reshape(-1, 1) * (v_old - u) / (N * D))
    assert close(grad[0], torch.zeros(D))


def test_nft_x0_loss_hand_computed():
    # b = 1: v⁺ = v_θ, v⁻ = 2·v_old − v_θ; x_σ = 0 and σ = [0.5, 2] (any values: the loss only sees
    # x̂0 = x_σ − σ·v), x0 = [[1, 0], [0, 0]], v_old = 0, v_θ = [[−2, 0], [1, 1]]
    v_theta, v_old = t64([[-2.0, 0.0], [1.0, 1.0]]), torch.zeros(2, 2, dtype=F64)
    x_t, x0 = torch.zeros(2, 2, dtype=F64), t64([[1.0, 0.0], [0.0, 0.0]])
    sigma, r = t64([0.5, 2.0]), t64([1.0, 0.25])
    # sample 0: x̂0⁺ = [1, 0] (exact, error 0 -> w clipped to 1e-5, term 0), x̂0⁻ = [−1, 0]: ‖·‖² = 2, w⁻ = 1
    # sample 1: x̂0⁺ = [−2, −2]: ‖·‖² = 4, w⁺ = 2 -> 2;  x̂0⁻ = [2, 2]: 4/2 = 2 -> 0.25·2 + 0.75·2 = 2
    loss, stats = nft.nft_x0_loss(v_theta, v_old, x_t, x0, sigma, r, b=1.0)
    assert close(loss, (1.0 * 0.0 + 0.0 * 2.0 + 2.0) / 2)
    assert close(stats["positive_loss"], (0.0 + 2.0) / 2) and close(stats["negative_loss"], (2.0 + 2.0) / 2)
    plain, _ = nft.nft_x0_loss(v_theta, v_old, x_t, x0, sigma, r, b=1.0, adaptive=False, scale=5.0)
    assert close(plain, 5.0 * (0.0 + (0.25 * 4 + 0.75 * 4)) / 2)


def test_nft_config_and_step_loss():
    c = nft.NFTConfig()
    c.validate()
    assert c.old_ema.decay(100) == pytest.approx(0.1) and c.old_ema.decay(10_000) == 0.5
    # the reference's defaults: 9 of the 10 levels per sample, scale adv_clip/b = 5, β_KL = 1e-4
    assert (c.grid_levels(), c.levels_per_step(), c.policy_scale(), c.beta_kl) == (10, 9, 5.0, 1e-4)
    assert (c.loss_space, c.adaptive_weighting, c.std_mode, c.eps_mode, c.std_eps, c.timestep_sampling) == (
        "x0", True, "batch", "add", 1e-4, "per_sample")
    assert nft.NFT(c, None).roles()[0].backward_passes == 9
    assert nft.NFTConfig(num_noise_levels=4).levels_per_step() == 4
    assert nft.NFTConfig(b=0.1).policy_scale() == pytest.approx(50.0)
    assert nft.NFTConfig(num_sampling_steps=25).levels_per_step() == 24  # int(25·0.99)
    assert nft.NFTConfig(top_fraction=0.5, time_shift=1.0).levels_per_step() == 5  # M = 6 levels 1, .9, …, .5
    bad_configs = [
        ({"b": 0.0}, "b"), ({"std_mode": "raw"}, "std_mode"), ({"loss_space": "eps"}, "loss_space"),
        ({"num_noise_levels": 11}, "num_noise_levels"), ({"num_sampling_steps": 0}, "num_sampling_steps"),
        ({"timestep_sampling": "x"}, "timestep_sampling"), ({"eps_mode": "relative", "std_eps": 2.0}, "std_eps"),
        ({"loss_scale": 0.0}, "loss_scale"), ({"std_eps": 0.0}, "std_eps"),
    ]
    for bad, field in bad_configs:
        with pytest.raises(ValueError, match=f"^{field}:"):
            nft.NFTConfig(**bad).validate()
    nft.NFTConfig(timestep_sampling="stratified", num_sampling_steps=0, num_noise_levels=3).validate()
    with pytest.raises(ValueError, match="^num_noise_levels:"):
        nft.NFTConfig(timestep_sampling="stratified", num_sampling_steps=0).validate()
    # velocity space (the former default), with the KL
    v_theta = t64([[1.0, 1.0], [2.0, 0.0]])
    v_ref = torch.zeros(2, 2, dtype=F64)
    base, _ = nft.nft_loss(v_theta, v_ref, v_ref, t64([0.5, 0.5]), b=1.0)
    old = nft.NFTConfig(beta_kl=0.1, loss_space="velocity", adaptive_weighting=False, loss_scale=1.0)
    loss, stats = nft.nft_step_loss(v_theta, v_ref, v_ref, t64([0.5, 0.5]), old, v_ref=v_ref)
    assert close(loss, base + 0.1 * (1.0 + 2.0) / 2) and close(stats["kl_mean"], 1.5)
    # x0 space (default): the x0 loss times adv_clip/b, the KL added unscaled
    x_t, x0, sigma = t64([[0.3, -0.2], [0.1, 0.4]]), t64([[1.0, 0.0], [0.5, 0.5]]), t64([0.3, 0.8])
    x0_loss, _ = nft.nft_x0_loss(v_theta, v_ref, x_t, x0, sigma, t64([0.5, 0.5]), b=1.0)
    loss, stats = nft.nft_step_loss(v_theta, v_ref, v_ref, t64([0.5, 0.5]), nft.NFTConfig(), v_ref=v_ref,
                                    x_t=x_t, x0=x0, sigma=sigma)
    assert close(loss, 5.0 * x0_loss + 1e-4 * 1.5) and close(stats["kl_mean"], 1.5)
    with pytest.raises(ValueError, match="^x_t:"):
        nft.nft_step_loss(v_theta, v_ref, v_ref, t64([0.5, 0.5]), nft.NFTConfig(), v_ref=v_ref)


def test_nft_per_sample_levels_are_distinct_grid_levels():
    g = torch.Generator().manual_seed(3)
    sig = nl.per_sample_noise_levels(64, 9, 10, 3.0, generator=g)  # [N, T]
    grid = nl.sampling_sigmas(10, 3.0)[:10].float()
    assert sig.shape == (64, 9) and sig.dtype == torch.float32
    assert torch.isin(sig, grid).all()
    assert all(len(set(row.tolist())) == 9 for row in sig)  # 9 distinct levels per sample
    assert len({tuple(row.tolist()) for row in sig}) > 1  # drawn per sample, not shared
    # every level is left out about equally often (a uniform random subset), and pass 0 sees every level
    many = nl.per_sample_noise_levels(2000, 9, 10, 3.0, generator=g)  # [2000, 9]
    left_out = [grid[~torch.isin(grid, row)].item() for row in many]
    counts = torch.tensor([left_out.count(v.item()) for v in grid], dtype=F64)
    assert counts.min() > 150 and counts.max() < 250
    again = nl.per_sample_noise_levels(64, 9, 10, 3.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, sig)
    # top_fraction keeps the levels σ ≥ 1 − f
    low = nl.per_sample_noise_levels(8, 3, 10, 1.0, top_fraction=0.35)
    assert (low >= 0.65 - 1e-6).all()
    with pytest.raises(ValueError, match="^T:"):
        nl.per_sample_noise_levels(8, 5, 10, 1.0, top_fraction=0.35)


# ------------------------------------------------------------------------------------------------
# Flow-GRPO-style baseline
# ------------------------------------------------------------------------------------------------


def test_grpo_sde_step_hand_computed():
    # x = 1, v = 2, σ = 0.5 -> 0.25, a = 0.7: g = 0.7·sqrt(0.5/0.5) = 0.7, Δ = −0.25
    # μ = 1 + [2 + 0.49/(2·0.5)·(1 + 0.5·2)]·(−0.25) = 1 − 2.98·0.25 = 0.255; s = 0.7·sqrt(0.25) = 0.35
    mean, std = grpo.sde_step_mean_std(t64([[1.0]]), t64([[2.0]]), 0.5, 0.25, 0.7)
    assert close(mean, [[0.255]]) and close(std, 0.35)
    # a = 0: the Euler ODE step x + v·Δ
    mean0, std0 = grpo.sde_step_mean_std(t64([[1.0]]), t64([[2.0]]), 0.5, 0.25, 0.0)
    assert close(mean0, [[0.5]]) and close(std0, 0.0)
    # σ = 1 uses sigma_max in the denominator: g = 0.7·sqrt(1/(1 − 0.9))
    assert close(grpo.sde_std(t64([1.0, 0.5]), 0.7, sigma_max=0.9), [0.7 * math.sqrt(10), 0.7])


def test_grpo_sde_preserves_the_marginal_to_first_order():
    # x0 = 0 (point mass): x_σ = σ·ε ~ N(0, σ²), exact velocity v = x/σ. One small step must give
    # Var[x_{σ'}] = σ'² up to O(Δ²); a wrong sign of the score term would be off at O(Δ).
    sigma, delta, a = 0.5, -1e-3, 0.7
    coef, std = grpo.sde_step_mean_std(t64([[1.0]]), t64([[1.0 / sigma]]), sigma, sigma + delta, a)
    var_next = float(coef) ** 2 * sigma**2 + float(std) ** 2
    assert abs(var_next - (sigma + delta) ** 2) < 1e-5
    g2 = a**2 * sigma / (1 - sigma)
    assert abs(g2 * abs(delta)) > 1e-4  # the diffusion term itself is much larger than the tolerance


def test_grpo_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(8)
    x_t = torch.randn(3, 2, 2, generator=g, dtype=F64)
    v = torch.randn(3, 2, 2, generator=g, dtype=F64)
    x_next = torch.randn(3, 2, 2, generator=g, dtype=F64)
    sig, sig_next, a = t64([0.9, 0.5, 0.3]), t64([0.8, 0.4, 0.1]), 0.7
    lp, mean, _std = grpo.sde_step_log_prob(x_t, v, x_next, sig, sig_next, a)
    s, sn = sig.reshape(-1, 1, 1), sig_next.reshape(-1, 1, 1)
    gg = a * torch.sqrt(s / (1 - s))
    mu = x_t + (v + gg**2 / (2 * s) * (x_t + (1 - s) * v)) * (sn - s)
    sd = gg * torch.sqrt(s - sn)
    ref = torch.distributions.Normal(mu, sd.expand_as(mu)).log_prob(x_next)
    assert close(mean, mu) and close(lp, ref.mean(dim=(1, 2)))
    lp_sum, _, _ = grpo.sde_step_log_prob(x_t, v, x_next, sig, sig_next, a, reduce="sum")
    assert close(lp_sum, ref.sum(dim=(1, 2)), 1e-10)
    # sampling: x_next = μ + s·z with the generator's z, and its log-prob is consistent
    z = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    xs, lps = sde_step_with_noise(x_t, v, z, sig, sig_next, a)
    assert close(xs, mu + sd * z) and close(lps, grpo.sde_step_log_prob(x_t, v, xs, sig, sig_next, a)[0])


def test_grpo_group_advantages_hand_computed():
    adv = grpo.group_advantages(t64([[1, 2, 3], [5, 5, 5]]), eps=1e-4)
    d = math.sqrt(2 / 3) + 1e-4
    assert close(adv, [[-1 / d, 0, 1 / d], [0, 0, 0]])


def test_ppo_clip_inside_and_outside_the_range():
    ratio = t64([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = t64([1.0, 1.0, -1.0, -1.0, 1.0])
    log_prob = ratio.log().requires_grad_(True)
    loss, stats = grpo.ppo_clip_loss(log_prob, torch.zeros(5, dtype=F64), adv, clip_range=0.2)
    # per sample: A>0,ρ>1+ε: −1.2 (clipped); A>0,ρ<1−ε: −0.5; A<0,ρ>1+ε: 1.5; A<0,ρ<1−ε: 0.8 (clipped);
    # inside the range: −1.1
    assert close(loss, (-1.2 - 0.5 + 1.5 + 0.8 - 1.1) / 5)
    (grad,) = torch.autograd.grad(loss, log_prob)
    # d/dlogp of −A·ρ is −A·ρ where unclipped, 0 where the clipped branch is active
    assert close(grad, [0.0, -0.5 / 5, 1.5 / 5, 0.0, -1.1 / 5])
    assert close(stats["clipfrac"], 0.8)
    assert close(stats["approx_kl"], 0.5 * (ratio.log() ** 2).mean())
    # advantages are clipped to ±adv_clip first
    loss_c, _ = grpo.ppo_clip_loss(
        torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), t64([10.0]), 0.2, 5.0
    )
    assert close(loss_c, -5.0)


def test_grpo_kl_same_std_and_step_loss():
    mu_t, mu_r = t64([[1.0, 2.0]]), t64([[0.0, 0.0]])
    kl = grpo.gaussian_kl_same_std(mu_t, mu_r, 0.5)
    assert close(kl, [(1 + 4) / 2 / (2 * 0.25)])  # 5.0
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu_t, torch.full_like(mu_t, 0.5)),
        torch.distributions.Normal(mu_r, torch.full_like(mu_r, 0.5)),
    ).mean(dim=1)
    assert close(kl, ref)
    c = grpo.GRPOConfig()
    c.validate()
    tau1 = 1 - (1 - 0.003 / 1.002) / 9  # scheduler grid: τ = linspace(1, shift(1/1000), 10), σ = shift(τ)
    assert c.num_train_steps() == 9 and math.isclose(c.sigma_max(), 3 * tau1 / (1 + 2 * tau1))
    assert math.isclose(grpo.GRPOConfig(sigma_grid="uniform").sigma_max(), 2.7 / 2.8)
    log_prob = torch.zeros(1, dtype=F64, requires_grad=True)
    loss, stats = grpo.grpo_step_loss(log_prob, torch.zeros(1, dtype=F64), t64([1.0]), c, mu_t, mu_r, 0.5)
    assert close(loss, -1.0 + 0.04 * 5.0) and close(stats["kl"], 5.0)
    # 'sde' KL std (the default, Flow-GRPO's): g_σ instead of the step's g_σ·sqrt(−Δ) ('step')
    std_step = t64(0.35)
    assert close(grpo.kl_std_for(std_step, 0.5, c), 0.7)
    assert close(grpo.kl_std_for(std_step, 0.5, grpo.GRPOConfig(kl_std="step")), 0.35)
    with pytest.raises(ValueError, match="^kl_std:"):
        grpo.GRPOConfig(kl_std="x").validate()
