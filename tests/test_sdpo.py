"""SDPO's pure functions (learner/algorithms/sdpo.py) against hand-computed tensors: the anchor rule,
dense rewards and their overwrite, discounted returns, per-(prompt, step) advantages, the pairwise loss
with its clamp (values and gradients), and one step permutation per pair applied alike."""

from __future__ import annotations

import math

import pytest
import torch
from dashboards import dashboard_queries, metric_names

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


def sdpo_setup(tiny_model, mode="anchor"):
    from fakes import InProcessScorer

    from diffrl.actors.config import SamplerConfig
    from diffrl.actors.prompts import PromptSource
    from diffrl.actors.sampler import Sampler
    from diffrl.learner.algorithms.sdpo import SDPOConfig
    from diffrl.learner.config import LearnerConfig
    from diffrl.models.adapter import FlowModel
    from diffrl.models.config import SamplingConfig
    from diffrl.models.shapes_world import train_prompts

    sampler_cfg = SamplerConfig(k=4, groups_per_round=2, record_trajectory=True, paired=True, score_steps=mode,
                                sampling=SamplingConfig(num_steps=4, step_kind="eta", eta=1.0))
    lcfg = LearnerConfig(algorithm="sdpo", groups_per_step=2, torch_threads=1, checkpoint_every=0, lr=1e-3,
                         device="cpu", dtype="float32", seed=0)
    lcfg.sdpo = SDPOConfig(num_sampling_steps=4, step_rewards=mode)
    model = FlowModel.from_pretrained(str(tiny_model), device="cpu")
    make = lambda sink: Sampler("s0", sampler_cfg, model, InProcessScorer(), sink,
                                PromptSource(train_prompts(), 0, 1))
    return sampler_cfg, lcfg, make


@pytest.mark.parametrize("mode", ["anchor", "all"])
def test_two_sdpo_learner_steps_through_redis_with_paired_groups(tiny_model, mode):
    from prometheus_client import CollectorRegistry

    from diffrl.embedded_redis import EmbeddedRedis
    from diffrl.learner.algorithms.sdpo import SDPO
    from diffrl.learner.learner import Learner
    from diffrl.models.adapter import FlowModel
    from diffrl.proto.bus import ExperienceConsumer, ExperienceProducer

    sampler_cfg, lcfg, make = sdpo_setup(tiny_model, mode)
    SDPO.check_recipe(lcfg.sdpo, sampler_cfg)
    registry = CollectorRegistry()
    learner = Learner(lcfg, FlowModel.from_pretrained(str(tiny_model), device="cpu"), registry=registry)
    assert learner.algorithm.J == [0, 1, 2]  # the η-step into σ = 0 has no noise: not trained
    with EmbeddedRedis() as redis:
        sampler = make(ExperienceProducer(redis.client(), stream="exp"))
        consumer = ExperienceConsumer(redis.client(), stream="exp")
        theta0 = learner.theta_state_dict()
        for step in (1, 2):
            sampler.run_round()
            groups = [g for _, g in consumer.read(max_groups=2, block_ms=200)]
            assert len(groups) == 2 and all(learner.group_problem(g) is None for g in groups)
            if step == 1:  # sampled with the weights being trained: the recorded log-probs are θ's
                ratios = learner.algorithm.log_ratios(learner.decode(groups), learner.step_context())
                assert ratios.shape == (2, 4, 3) and float(ratios.abs().max()) < 1e-5
            stats = learner.train_on_groups(groups)
            assert learner.step == step and learner.engine.global_steps == 3 * step  # one step per time slot
            assert math.isfinite(stats["loss"]) and 0.0 <= stats["clamp_fraction"] <= 1.0
            for j in range(4):
                assert math.isfinite(stats[f"reward_step{j}"])
            assert registry.get_sample_value("diffrl_learner_sdpo_clamp_fraction") == stats["clamp_fraction"]
    exported = {s.name for metric in registry.collect() for s in metric.samples}
    panels = dashboard_queries("sdpo")  # the Grafana SDPO row: every series it reads is exported
    assert panels and {n for expr in panels for n in metric_names(expr)} <= exported
    theta = learner.theta_state_dict()
    assert any(not torch.equal(theta0[k], theta[k]) for k in theta)
    samp = learner.snapshot_state_dict("p_samp")
    assert all(torch.equal(samp[k], theta[k]) for k in theta)  # p_samp = θ


def test_sdpo_recipe_checks_name_the_sampler_field(tiny_model):
    from diffrl.config import ConfigError, load_config
    from diffrl.schema import TrainConfig

    base = ["learner.algorithm=sdpo", "sampler.record_trajectory=true", "sampler.paired=true",
            "sampler.sampling.step_kind=eta", "sampler.sampling.num_steps=4", "sampler.score_steps=anchor"]
    load_config(TrainConfig, overrides=base)
    for extra, field in [(["sampler.paired=false"], "sampler.paired"),
                         (["sampler.score_steps=all"], "sampler.score_steps"),
                         (["sampler.sampling.num_steps=5"], "sampler.sampling.num_steps"),
                         (["sampler.sampling.eta=0.5"], "sampler.sampling.eta"),
                         (["sampler.sampling.step_kind=flow_sde", "sampler.sampling.sde_noise_level=0.7"],
                          "sampler.sampling.step_kind")]:
        with pytest.raises(ConfigError) as err:
            load_config(TrainConfig, overrides=[*base, *extra])
        assert err.value.field == field, (extra, str(err.value))
