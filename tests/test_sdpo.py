"""SDPO's pure functions (learner/algorithms/sdpo.py) against hand-computed tensors: the anchor rule,
dense rewards and their overwrite, discounted returns, per-(prompt, step) advantages, the pairwise loss
with its clamp (values and gradients), and one step permutation per pair applied alike."""

from __future__ import annotations

import pytest
import torch

from diffrl.learner.algorithms.sdpo import (
    anchor_steps,
    cosine_to,
    dense_rewards,
    discounted_returns,
    permute_steps,
    sdpo_loss,
    step_advantages,
    step_permutations,
    temporal_weights,
)

F64 = torch.float64


def test_anchor_is_the_prediction_least_like_the_first_and_the_last():
    x0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # [N=1, S=3, D=2]
    anchor, first, anc, last = anchor_steps(x0)
    r = 2**-0.5
    assert anchor.tolist() == [1]
    assert torch.allclose(first, torch.tensor([[1.0, 0.0, r]], dtype=F64))
    assert torch.allclose(last, torch.tensor([[r, r, 1.0]], dtype=F64))
    assert torch.allclose(anc, torch.tensor([[0.0, 1.0, r]], dtype=F64))
    # a near-white background makes raw cosines ~1; centring each image first separates them
    a, b = torch.tensor([[11.0, 10.0, 10.0]]), torch.tensor([[10.0, 11.0, 10.0]])
    assert float(cosine_to(a.unsqueeze(1), b)) > 0.99
    assert float(cosine_to(a.unsqueeze(1), b, center=True)) == pytest.approx(-0.5)


def test_dense_rewards_interpolate_then_overwrite_the_scored_steps():
    scored = torch.tensor([[1.0, 0.5, 0.0]])  # R_first, R_anchor, R_last
    s_first = torch.tensor([[1.0, 0.8, 0.5, 0.2]], dtype=F64)
    s_anchor = torch.tensor([[0.5, 0.6, 1.0, 0.7]], dtype=F64)
    s_last = torch.tensor([[0.2, 0.4, 0.7, 1.0]], dtype=F64)
    r = dense_rewards(scored, torch.tensor([2]), s_first, s_anchor, s_last)
    assert torch.allclose(r, torch.tensor([[1.0, 1.1 / 1.8, 0.5, 0.0]], dtype=F64))
    G = discounted_returns(r, gamma=0.5)  # before normalization
    assert torch.allclose(G, torch.tensor([[1.0 + 0.5 * (1.1 / 1.8 + 0.25), 1.1 / 1.8 + 0.25, 0.5, 0.0]], dtype=F64))
    assert torch.equal(discounted_returns(r, 0.0), r)


def test_step_advantages_are_per_prompt_and_step():
    G = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [9.0, 9.0]]], dtype=F64)  # [G=1, K=3, S=2]
    mask = torch.tensor([[True, True, False]])  # the third sample is padding
    A = step_advantages(G, mask, eps=1e-12)
    assert torch.allclose(A[0, :, 0], torch.tensor([1.0, -1.0, 0.0], dtype=F64))  # mean 2, std 1 (population)
    assert torch.equal(A[0, :, 1], torch.zeros(3, dtype=F64))  # tied returns at a step: no signal, no NaN


def test_sdpo_loss_and_its_clamp_by_hand():
    logp1 = torch.tensor([0.3, 0.0], requires_grad=True)
    logp2 = torch.tensor([0.0, 0.2], requires_grad=True)
    old1, old2 = torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.0])
    adv1, adv2 = torch.tensor([6.0, 1.0]), torch.tensor([0.0, 0.0])  # A1 = 6 is clipped to 5
    loss, frac = sdpo_loss(logp1, old1, logp2, old2, adv1, adv2, torch.tensor(1.0), adv_clip=5.0, clip_range=0.1)
    # pair 0: ΔA = 5, Δ = 0.2 -> 23.04; clamped Δ = 0.1 -> 24.01 (max). pair 1: ΔA = 1, Δ = -0.2 -> 1.44; clamped 1.21
    assert float(loss.detach()) == pytest.approx((24.01 + 1.44) / 2)
    assert float(frac) == 0.5
    loss.backward()
    # pair 0 takes the clamped term: log π_θ(τ1) sits past old + 0.1 (no gradient), τ2's is inside (Δ^clip − ΔA = -4.9)
    # pair 1 takes the unclipped term: Δ − ΔA = -1.2; each pair's term is halved by the mean
    assert logp1.grad.tolist() == pytest.approx([0.0, -1.2])
    assert logp2.grad.tolist() == pytest.approx([4.9, 1.2])


def test_one_permutation_per_pair_moves_every_per_step_tensor_alike():
    x = torch.tensor([[10, 11, 12], [20, 21, 22]])
    perms = torch.tensor([[2, 0, 1], [1, 2, 0]])
    assert permute_steps(x, perms).tolist() == [[12, 10, 11], [21, 22, 20]]
    states = torch.arange(2 * 3 * 4).reshape(2, 3, 4)  # [P, S, D]
    w = temporal_weights(3).expand(2, 3)
    assert temporal_weights(3).tolist() == pytest.approx([1.0, 0.99, 0.9801])
    gen = torch.Generator().manual_seed(0)
    p = step_permutations(2, 3, gen)
    assert sorted(p[0].tolist()) == [0, 1, 2] and sorted(p[1].tolist()) == [0, 1, 2]
    moved_states, moved_w = permute_steps(states, p), permute_steps(w, p)
    for i in range(2):
        for k in range(3):  # slot k of pair i holds step p[i, k] of every tensor
            assert torch.equal(moved_states[i, k], states[i, p[i, k]]) and moved_w[i, k] == w[i, p[i, k]]
