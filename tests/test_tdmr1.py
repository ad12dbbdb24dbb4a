"""TDM-R1 (learner/algorithms/tdmr1.py): its pure functions against hand-computed tensors (the τ draws,
renoising coefficients, the surrogate target, the trust-region and gate masks, the group Bradley–Terry
term with its detached factor, the generator's targets and normalizers, values and gradients), then two
learner steps through Redis on a tiny SD3 with a distinct teacher, and a resume that restores every
network and optimizer (the step after resume equals the uninterrupted run's)."""

from __future__ import annotations

import math

import pytest
import torch
from dashboards import dashboard_queries, metric_names

from diffrl.learner.algorithms.tdmr1 import (
    TDMR1Config,
    draw_tau,
    fake_score_loss,
    generator_loss,
    group_bradley_terry_loss,
    rank_agreement,
    reference_gate_mask,
    renoise_coefficients,
    shift_sigma,
    surrogate_loss,
    surrogate_target,
    trust_region_mask,
    unshift_sigma,
)

F64 = torch.float64


def t(*v):
    return torch.tensor(v, dtype=F64)


def test_shift_and_tau_draws():
    assert float(shift_sigma(t(0.25), 3.0)) == pytest.approx(0.75 / 1.5)
    assert float(unshift_sigma(shift_sigma(t(0.3), 3.0), 3.0)) == pytest.approx(0.3)
    # unshifted: lo = σ_n + margin; u = 0 -> lo, u -> 1 -> 1
    assert float(draw_tau(t(0.5), t(0.0), 1.0)) == pytest.approx(0.52)
    assert float(draw_tau(t(0.5), t(1.0), 1.0)) == pytest.approx(1.0)
    # shift 3: unshift(0.5) = 0.5 / (3 - 2·0.5) = 0.25, lo = 0.27, τ = 3·0.27 / (1 + 2·0.27)
    assert float(draw_tau(t(0.5), t(0.0), 3.0)) == pytest.approx(0.81 / 1.54)
    # a floor above σ_n moves the lower bound; clamp keeps τ >= max(σ_n, floor) even with margin 0
    assert float(draw_tau(t(0.0), t(0.0), 1.0, floor=0.55, margin=0.0, clamp=True)) == pytest.approx(0.55)
    assert float(draw_tau(t(0.25), t(0.5), 1.0, floor=0.55)) == pytest.approx(0.57 + 0.5 * 0.43)


def test_renoising_keeps_the_flow_marginal():
    alpha, beta = renoise_coefficients(t(0.6), t(0.2))
    assert float(alpha) == pytest.approx(0.4 / 0.8) and float(beta) == pytest.approx(math.sqrt(0.36 - 0.01))
    # x_next = 0.8·x0 + 0.2·ε1 -> α·x_next + β·ε2 = 0.4·x0 + noise of variance 0.1² + β² = 0.6²
    assert float(alpha * 0.8) == pytest.approx(1 - 0.6)
    assert float((alpha * 0.2) ** 2 + beta**2) == pytest.approx(0.36)


def test_surrogate_target_by_hand_and_at_the_clean_end():
    alpha, beta = renoise_coefficients(t(0.6), t(0.2))
    v = surrogate_target(t(1.0), t(2.0), t(0.6), t(0.2), alpha, beta)
    assert float(v) == pytest.approx(-1 / 0.8 + 2 / math.sqrt(0.35) * (0.6 + 0.04 * 0.5 / 0.8))
    x0, eps = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    a0, b0 = renoise_coefficients(t(0.7), t(0.0))
    assert torch.allclose(surrogate_target(x0, eps, t(0.7), t(0.0), a0, b0), eps - x0)


def test_trust_region_and_reference_gate_masks():
    adv = t(1.0, 1.0, -1.0, -1.0)
    dsm = t(1.0, 1.0, 1.0, 1.0)
    # ratio = exp(dsm_old - dsm): 1.01 (good image, improved > 1e-3: clip), 1.0005 (inside), 0.99 (bad, worse: clip), 1.0
    dsm_old = dsm + torch.log(t(1.01, 1.0005, 0.99, 1.0))
    assert trust_region_mask(adv, dsm, dsm_old, 1e-3).tolist() == [True, False, True, False]
    dsm_ref = t(1.5, 0.5, 1.5, 0.5)  # s beats the ref on 0 and 2, is worse on 1 and 3
    assert reference_gate_mask(adv, dsm, dsm_ref, t(0.06), 0.05).tolist() == [True, False, False, True]
    assert reference_gate_mask(adv, dsm, dsm_ref, t(0.04), 0.05).tolist() == [False] * 4


def test_group_bradley_terry_value_and_gradient():
    dsm = t(1.0, 2.0, 3.0, 4.0).requires_grad_()
    ref, adv, group = t(1.5, 1.5, 2.0, 5.0), t(1.0, -1.0, 0.5, -0.5), torch.tensor([0, 0, 1, 1])
    loss, weight = group_bradley_terry_loss(dsm, ref, adv, group, beta_dpo=1.0, K=2)
    # z_0 = (1·(−0.5) + (−1)·0.5)/2 = −0.5, z_1 = (0.5·1 + (−0.5)·(−1))/2 = 0.5
    w = torch.sigmoid(t(-0.5, -0.5, 0.5, 0.5))
    want = (w * adv * dsm.detach()).mean()
    assert float(loss) == pytest.approx(float(want)) and float(weight) == pytest.approx(float(w.mean()))
    loss.backward()
    assert torch.allclose(dsm.grad, w * adv / 4)  # σ(z) is a detached factor


def test_surrogate_loss_detaches_what_the_masks_say():
    torch.manual_seed(0)
    n, K = 4, 2
    target = torch.randn(n, 1, 2, 2, dtype=F64)
    v_ref = target + 0.5  # dsm_ref = 0.25 each
    v_old = target + torch.tensor([0.3, 0.3, 0.3, 0.3], dtype=F64).view(n, 1, 1, 1)
    offsets = torch.tensor([0.1, 0.3, 0.3, 0.6], dtype=F64).view(n, 1, 1, 1)
    v_s = (target + offsets).requires_grad_()
    adv, group = t(1.0, 1.0, -1.0, -1.0), torch.tensor([0, 0, 1, 1])
    loss, stats = surrogate_loss(v_s, v_old, v_ref, target, adv, group, K, beta_dpo=1.0, reg=0.0, clip_range=1e-3,
                                 reg_threshold=1.0, t_weight=0.5)
    loss.backward()
    grads = v_s.grad.reshape(n, -1).abs().sum(dim=1)
    # sample 0: good and its dsm fell from 0.09 to 0.01 against s_old -> trust region detaches it; sample 3:
    # bad and its dsm rose 0.09 -> 0.36 -> detached; 1 and 2 equal s_old -> trained
    assert grads[0] == 0 and grads[3] == 0 and grads[1] > 0 and grads[2] > 0
    assert float(stats["trust_region_fraction"]) == 0.5 and float(stats["gate_fraction"]) == 0.0
    # by hand: dsm = offset², z_g = Σ A·(dsm − 0.25)/2, L = 0.5·mean σ(z)·A·dsm
    d = offsets.flatten() ** 2
    z = torch.stack([(d[0] - 0.25 + d[1] - 0.25) / 2, (-(d[2] - 0.25) - (d[3] - 0.25)) / 2])
    w = torch.sigmoid(z)[group]
    assert float(loss) == pytest.approx(float(0.5 * (w * adv * d).mean()))


def test_generator_loss_values_and_gradient():
    torch.manual_seed(1)
    shape = (2, 1, 2, 2)
    x0 = torch.randn(shape, dtype=F64).requires_grad_()
    cond, unc, cfg, fake, s_cfg, ref = (torch.randn(shape, dtype=F64) for _ in range(6))
    loss, stats = generator_loss(x0, cond, unc, cfg, fake, s_cfg, ref, tdm_weight=0.3, cfg_reward_scale=3.5)
    loss.backward()
    x = x0.detach()
    w = (x - cfg).abs().mean(dim=(1, 2, 3), keepdim=True)
    w_d = (x - s_cfg).abs().mean(dim=(1, 2, 3), keepdim=True)
    d_kl, d_cfg, d_rew = cond - fake, 3.5 * (cond - unc), s_cfg - ref
    N = x.numel()
    want = 0.3 * (d_cfg**2 / w).mean() + 0.7 * (d_rew**2 / w_d).mean() + (d_kl**2 / w).mean()
    assert float(loss) == pytest.approx(float(want))
    assert float(stats["gen_kl_loss"]) == pytest.approx(float((d_kl**2 / w).mean()))
    assert float(stats["gen_reward_loss"]) == pytest.approx(float((d_rew**2 / w_d).mean()))
    grad = -2 * (0.3 * d_cfg / w + 0.7 * d_rew / w_d + d_kl / w) / N  # each target detached: moves x̂0 along Δ
    assert torch.allclose(x0.grad, grad)
    # past trunc_steps: only the distillation terms, times tdm_weight
    x1 = x.clone().requires_grad_()
    loss1, _ = generator_loss(x1, cond, unc, cfg, fake, None, None, tdm_weight=0.3)
    assert float(loss1) == pytest.approx(float(0.3 * ((d_cfg**2 + d_kl**2) / w).mean()))


def test_fake_score_loss():
    v = torch.zeros(1, 1, 2, 2, dtype=F64, requires_grad=True)
    target, real = torch.ones_like(v), 2 * torch.ones_like(v)
    loss = fake_score_loss(v, target, real, reg=0.02)
    assert float(loss) == pytest.approx(1 + 0.02 * 4)


def test_rank_agreement_and_decays():
    rewards = t(1, 2, 3, 4, 5).reshape(1, 5).repeat(3, 1)
    scores = torch.stack([t(1, 2, 3, 4, 5), t(5, 4, 3, 2, 1), t(1, 2, 3, 4, 5)])
    mask = torch.ones(3, 5, dtype=torch.bool)
    rewards[2] = 1.0  # tied rewards: skipped
    assert rank_agreement(scores, rewards, mask) == pytest.approx(0.0)  # (+1 − 1) / 2
    assert rank_agreement(scores[:1], rewards[:1], mask[:1]) == pytest.approx(1.0)
    c = TDMR1Config()
    assert c.old_decay(1) == pytest.approx(0.001) and c.old_decay(101) == pytest.approx(0.101)
    assert c.old_decay(1000) == 0.3
    assert c.generator_ema_decay(1) == pytest.approx(0.1) and c.generator_ema_decay(1000) == 0.9


def test_plan_draws_distinct_steps_and_weights_late_surrogate_steps():
    from diffrl.learner.algorithms.tdmr1 import TDMR1
    from diffrl.learner.config import LearnerConfig

    alg = TDMR1(TDMR1Config(train_steps=2), LearnerConfig(algorithm="tdmr1"))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(2000):
        plan = alg.plan(4, gen)
        assert len({d.j for d in plan}) == 2
        for d in plan:
            counts[d.j_surrogate] += 1
    freq = counts / counts.sum()  # ∝ j' + 1: 0.1, 0.2, 0.3, 0.4
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.02)


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    from conftest import TINY_ARCH

    from diffrl.models.tiny_sd3 import build_tiny_sd3

    root = tmp_path_factory.mktemp("teacher")
    build_tiny_sd3(TINY_ARCH, root / "work", seed=7).save_pretrained(str(root / "model"))
    return root / "model"


def tdmr1_setup(tiny_model, teacher_model, run_dir=None):
    from fakes import InProcessScorer
    from prometheus_client import CollectorRegistry

    from diffrl.actors.config import SamplerConfig
    from diffrl.actors.prompts import PromptSource
    from diffrl.actors.sampler import Sampler
    from diffrl.learner.config import LearnerConfig
    from diffrl.learner.learner import Learner
    from diffrl.learner.ray_learner import load_teacher
    from diffrl.models.adapter import FlowModel
    from diffrl.models.config import ModelConfig, SamplingConfig
    from diffrl.models.shapes_world import train_prompts

    sampler_cfg = SamplerConfig(k=4, groups_per_round=2, record_trajectory=True,
                                sampling=SamplingConfig(num_steps=4, step_kind="euler"))
    lcfg = LearnerConfig(algorithm="tdmr1", groups_per_step=2, torch_threads=1, checkpoint_every=0, device="cpu",
                         dtype="float32", seed=0, teacher=str(teacher_model))
    lcfg.tdmr1 = TDMR1Config(tau_shift=1.0)
    model = FlowModel.from_pretrained(str(tiny_model), device="cpu")
    teacher = load_teacher(lcfg, ModelConfig(path=str(tiny_model)), model.device, model.dtype)
    registry = CollectorRegistry()
    learner = Learner(lcfg, model, run_dir=run_dir, registry=registry, teacher=teacher)
    make = lambda sink: Sampler("s0", sampler_cfg, FlowModel.from_pretrained(str(tiny_model), device="cpu"),
                                InProcessScorer(), sink, PromptSource(train_prompts(), 0, 1))
    return sampler_cfg, learner, make, registry


def test_two_tdmr1_learner_steps_through_redis(tiny_model, teacher_model):
    from diffrl.embedded_redis import EmbeddedRedis
    from diffrl.learner.algorithms.tdmr1 import TDMR1
    from diffrl.models.adapter import FlowModel
    from diffrl.proto.bus import ExperienceConsumer, ExperienceProducer

    sampler_cfg, learner, make, registry = tdmr1_setup(tiny_model, teacher_model)
    TDMR1.check_recipe(learner.config.tdmr1, sampler_cfg)
    teacher_sd = FlowModel.from_pretrained(str(teacher_model), device="cpu").transformer.state_dict()
    for role in ("fake", "surrogate"):  # f and s start from the teacher, θ from the student
        mine = learner.theta_state_dict(role)
        assert all(torch.equal(mine[n], teacher_sd[n]) for n in mine)
    assert not torch.equal(learner.theta_state_dict()["proj_out.weight"], teacher_sd["proj_out.weight"])
    before = {r: learner.theta_state_dict(r) for r in ("theta", "fake", "surrogate")}
    with EmbeddedRedis() as redis:
        sampler = make(ExperienceProducer(redis.client(), stream="exp"))
        consumer = ExperienceConsumer(redis.client(), stream="exp")
        for step in (1, 2):
            sampler.run_round()
            groups = [g for _, g in consumer.read(max_groups=2, block_ms=200)]
            assert len(groups) == 2 and all(learner.group_problem(g) is None for g in groups)
            stats = learner.train_on_groups(groups)
            assert learner.step == step
            for key in ("fake_loss", "surrogate_loss", "generator_loss", "gen_kl_loss", "gen_cfg_loss"):
                assert math.isfinite(stats[key]), key
            assert 0.0 <= stats["trust_region_fraction"] <= 1.0 and 0.0 <= stats["gate_fraction"] <= 1.0
            assert -1.0 <= stats["rank_agreement"] <= 1.0 or math.isnan(stats["rank_agreement"])
    for r in ("theta", "fake", "surrogate"):  # every network took its step
        after = learner.theta_state_dict(r)
        assert any(not torch.equal(before[r][n], after[n]) for n in after), r
    theta = learner.theta_state_dict()
    samp, ema = learner.snapshot_state_dict("p_samp"), learner.snapshot_state_dict("theta_ema")
    assert all(torch.equal(samp[n], theta[n]) for n in theta)  # the samplers get G itself
    assert any(not torch.equal(ema[n], theta[n]) for n in theta)  # the evaluated EMA lags
    assert learner.p_eval is learner.nets.snapshots["theta_ema"].module
    exported = {s.name for metric in registry.collect() for s in metric.samples}
    panels = dashboard_queries("tdmr1")
    assert panels and {n for expr in panels for n in metric_names(expr)} <= exported


def test_tdmr1_resume_restores_every_network_and_optimizer(tiny_model, teacher_model, tmp_path):
    from fakes import ListSink

    sink = ListSink()
    _, learner, make, _ = tdmr1_setup(tiny_model, teacher_model, run_dir=tmp_path / "a")
    sampler = make(sink)
    for _ in range(3):
        sampler.run_round()
    batches = [sink.groups[2 * i:2 * i + 2] for i in range(3)]
    learner.train_on_groups(batches[0])
    learner.train_on_groups(batches[1])
    learner.save_checkpoint()
    uninterrupted = learner.train_on_groups(batches[2])
    _, again, _, _ = tdmr1_setup(tiny_model, teacher_model, run_dir=tmp_path / "a")
    assert again.resume() == 2
    resumed = again.train_on_groups(batches[2])
    for key in ("fake_loss", "surrogate_loss", "generator_loss", "loss"):
        if key in uninterrupted:
            assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-7), key
    for role in ("theta", "fake", "surrogate"):
        mine, theirs = learner.theta_state_dict(role), again.theta_state_dict(role)
        assert all(torch.allclose(mine[n], theirs[n], atol=1e-6) for n in mine), role
    for snap in ("surrogate_old", "theta_ema", "p_samp"):
        mine, theirs = learner.snapshot_state_dict(snap), again.snapshot_state_dict(snap)
        assert all(torch.allclose(mine[n], theirs[n], atol=1e-6) for n in mine), snap
