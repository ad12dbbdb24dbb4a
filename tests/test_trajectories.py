"""Trajectory records: the η-step, paired stochastic sampling reproducible from recorded seeds, recorded
log-probs equal recomputed ones, the proto round trip through Redis, and the invalid path of groups
that lack what an algorithm declared it needs."""

from __future__ import annotations

import math

import pytest
import torch
from fakes import InProcessScorer

from diffrl.actors.config import SamplerConfig
from diffrl.actors.prompts import PromptSource
from diffrl.actors.sampler import Sampler
from diffrl.config import ConfigError, load_config
from diffrl.embedded_redis import EmbeddedRedis
from diffrl.learner.batch import TrajectoryNeeds, decode, group_problem
from diffrl.models.adapter import FlowModel
from diffrl.models.config import SamplingConfig
from diffrl.models.sde import eta_step_mean_std, eta_step_std, gaussian_log_prob, step_mean_std
from diffrl.models.shapes_world import train_prompts
from diffrl.proto import experience_pb2
from diffrl.proto.bus import ExperienceConsumer, ExperienceProducer
from diffrl.proto.codec import group_to_bytes, tensor_from_proto
from diffrl.schema import TrainConfig

F64 = torch.float64
K, G, STEPS = 4, 2, 4


# ------------------------------------------------------------------------------------ the η-step


def test_eta_step_is_ddim_in_flow_form():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    v = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    sigma, sigma_next = 0.6, 0.35
    # DDIM (Song et al. eq. 12/16) in VP variables: x_vp = x / sqrt(a² + b²), ᾱ = a²/(a² + b²)
    a, b, a2, b2 = 1 - sigma, sigma, 1 - sigma_next, sigma_next
    abar, abar2 = a * a / (a * a + b * b), a2 * a2 / (a2 * a2 + b2 * b2)
    eta = 0.8
    s_vp = eta * math.sqrt((1 - abar2) / (1 - abar)) * math.sqrt(1 - abar / abar2)
    x0_hat, eps_hat = x - sigma * v, x + (1 - sigma) * v
    mean_vp = math.sqrt(abar2) * x0_hat + math.sqrt(1 - abar2 - s_vp**2) * eps_hat
    scale2 = math.sqrt(a2 * a2 + b2 * b2)  # back to the flow's scaling at σ'
    mean, std = eta_step_mean_std(x, v, sigma, sigma_next, eta)
    assert float(std) == pytest.approx(s_vp * scale2, rel=1e-12)
    assert torch.allclose(mean, mean_vp * scale2, rtol=0, atol=1e-12)
    # η = 0 is the Euler step; the step into σ = 0 and the kind "euler" have no noise
    m0, s0 = eta_step_mean_std(x, v, sigma, sigma_next, 0.0)
    assert float(s0) == 0.0 and torch.allclose(m0, x + (sigma_next - sigma) * v, atol=1e-12)
    assert float(eta_step_std(0.25, 0.0, 1.0)) == 0.0 and float(eta_step_std(1.0, 0.75, 1.0)) == 0.75
    me, se = step_mean_std("euler", x, v, sigma, sigma_next, 0.0)
    assert float(se) == 0.0 and torch.allclose(me, m0, atol=1e-12)


# ------------------------------------------------------------------------------------ sampling


def paired_sampler_groups(tiny_model, kind: str, dtype: str = "float32"):
    model = FlowModel.from_pretrained(str(tiny_model), device="cpu")
    sampling = SamplingConfig(num_steps=STEPS, step_kind=kind, eta=1.0, sde_noise_level=0.7 if kind == "flow_sde"
                              else 0.0)
    cfg = SamplerConfig(k=K, groups_per_round=G, sampling=sampling, record_trajectory=True, paired=True,
                        trajectory_dtype=dtype)
    cfg.validate()
    with EmbeddedRedis() as redis:
        sampler = Sampler("s0", cfg, model, InProcessScorer(), ExperienceProducer(redis.client(), stream="exp"),
                          PromptSource(train_prompts(), 0, 1))
        assert sampler.run_round().groups == G
        groups = [g for _, g in ExperienceConsumer(redis.client(), stream="exp").read(max_groups=10, block_ms=100)]
    return model, sampling, groups


@pytest.mark.parametrize("kind", ["eta", "flow_sde"])
def test_paired_groups_share_the_initial_noise_and_reproduce_from_their_seeds(tiny_model, kind):
    model, sampling, groups = paired_sampler_groups(tiny_model, kind)
    assert len(groups) == G
    sigmas = sampling.grid(model.num_train_timesteps)
    for g in groups:
        recs = [s.trajectory for s in g.samples]
        assert [t.pair_id for t in recs] == [0, 0, 1, 1]
        states = [tensor_from_proto(t.states) for t in recs]  # [S + 1, C, H, W] each
        for p in range(K // 2):
            a, b = states[2 * p], states[2 * p + 1]
            assert recs[2 * p].noise_seed == recs[2 * p + 1].noise_seed == g.samples[2 * p].seed
            assert recs[2 * p].step_seed != recs[2 * p + 1].step_seed
            assert torch.equal(a[0], b[0])  # the same x_S (initial noise) ...
            assert all(not torch.equal(a[j], b[j]) for j in range(1, STEPS + 1))  # ... different afterwards
        assert not torch.equal(states[0][0], states[2][0])  # two pairs, two initial noises
        # every state, prediction and log-prob again, bit for bit, from the recorded seeds
        again = model.sample_trajectory([g.prompt] * K, [t.noise_seed for t in recs], [t.step_seed for t in recs],
                                        tensor_from_proto(recs[0].sigmas), kind, recs[0].noise_level,
                                        recs[0].guidance_scale)
        for i, t in enumerate(recs):
            assert torch.equal(again.states[i], states[i])
            assert torch.equal(again.x0_preds[i], tensor_from_proto(t.x0_preds))
            assert torch.equal(again.log_probs[i], tensor_from_proto(t.log_probs))
            assert torch.equal(tensor_from_proto(g.samples[i].latent), states[i][-1])
        assert torch.equal(tensor_from_proto(recs[0].sigmas), sigmas)
        # the recorded log-probs are the density of each recorded step, recomputed from (x_j, x_{j+1})
        x = torch.stack(states)  # [K, S + 1, C, H, W]
        cond = model.encode_prompts([g.prompt] * K)
        for j in range(STEPS):
            v = model.velocity(x[:, j], torch.full((K,), float(sigmas[j])), cond).float()
            mean, std = step_mean_std(kind, x[:, j], v, float(sigmas[j]), float(sigmas[j + 1]), recs[0].noise_level,
                                      float(sigmas[1]))
            recorded = torch.stack([tensor_from_proto(t.log_probs)[j] for t in recs])  # [K]
            if float(std.max()) == 0:  # the η-step into σ = 0 is deterministic: recorded as 0
                assert kind == "eta" and j == STEPS - 1 and torch.equal(recorded, torch.zeros(K))
                assert torch.allclose(mean, x[:, j + 1], atol=1e-5)
                continue
            assert torch.allclose(gaussian_log_prob(x[:, j + 1], mean, std), recorded, rtol=0, atol=1e-5)
            assert torch.allclose(x[:, j] - float(sigmas[j]) * v, x_pred := torch.stack(
                [tensor_from_proto(t.x0_preds)[j] for t in recs]), atol=1e-5), x_pred


def test_fp16_records_halve_the_bytes_and_decode(tiny_model):
    model, _, g32 = paired_sampler_groups(tiny_model, "eta")
    _, _, g16 = paired_sampler_groups(tiny_model, "eta", dtype="float16")
    n32, n16 = len(group_to_bytes(g32[0])), len(group_to_bytes(g16[0]))
    assert 0.5 < n16 / n32 < 0.62  # states and x̂0 are most of a group
    batch = decode(g16, model.latent_shape, {}, "trajectory", version=0, needs=TrajectoryNeeds(paired=True))
    t = batch.trajectory
    assert t.states.shape == (G, K, STEPS + 1, *model.latent_shape) and t.states.dtype == torch.float32
    assert t.x0_preds.shape == (G, K, STEPS, *model.latent_shape)
    assert t.pair_ids.tolist() == [[0, 0, 1, 1]] * G
    rec = g16[0].samples[1].trajectory
    again = model.sample_trajectory([g16[0].prompt], [rec.noise_seed], [rec.step_seed], tensor_from_proto(rec.sigmas),
                                    "eta", rec.noise_level)
    assert torch.allclose(t.states[0, 1], again.states[0], rtol=1e-3, atol=1e-3)  # the same states, in half precision
    assert not torch.equal(t.states[0, 1], again.states[0])


# ------------------------------------------------------------------------------------ invalid groups


def test_groups_without_what_the_algorithm_needs_are_invalid(tiny_model):
    model, _, groups = paired_sampler_groups(tiny_model, "eta")
    shape = model.latent_shape
    g = groups[0]
    assert group_problem(g, shape, {}, "trajectory", needs=TrajectoryNeeds(paired=True)) is None
    assert group_problem(g, shape, {}, "final") is None  # a final-latent algorithm ignores the record
    wrong_kind = group_problem(g, shape, {}, "trajectory", needs=TrajectoryNeeds(step_kinds=("flow_sde",)))
    assert "sampled with eta steps" in wrong_kind
    bare = experience_pb2.Group()
    bare.CopyFrom(g)
    bare.samples[2].ClearField("trajectory")
    assert "sample 2: no trajectory record" in group_problem(bare, shape, {}, "trajectory")
    unpaired = experience_pb2.Group()
    unpaired.CopyFrom(g)
    unpaired.samples[3].trajectory.pair_id = 0
    assert "pair 0 has 3 samples" in group_problem(unpaired, shape, {}, "trajectory", needs=TrajectoryNeeds(paired=True))
    split = experience_pb2.Group()
    split.CopyFrom(g)
    split.samples[1].trajectory.noise_seed += 1
    assert "share the noise seed" in group_problem(split, shape, {}, "trajectory", needs=TrajectoryNeeds(paired=True))
    short = experience_pb2.Group()
    short.CopyFrom(g)
    short.samples[0].trajectory.x0_preds.shape[:] = [STEPS - 1, *shape]
    assert "trajectory.x0_preds shape" in group_problem(short, shape, {}, "trajectory")
    with pytest.raises(ValueError, match="cannot be trained"):
        decode([g, bare], shape, {}, "trajectory", version=0)


def test_sampler_trajectory_options_are_validated():
    for overrides, field in [
        (["sampler.paired=true", "sampler.k=5", "sampler.sampling.step_kind=eta"], "sampler.k"),
        (["sampler.paired=true"], "sampler.sampling.step_kind"),  # Euler pairs would be identical
        (["sampler.sampling.step_kind=flow_sde"], "sampler.sampling.sde_noise_level"),
        (["sampler.sampling.step_kind=heun"], "sampler.sampling.step_kind"),
        (["sampler.sampling.num_steps=2", "sampler.sampling.sigmas=[1.0, 0.2]"], "sampler.sampling.sigmas"),
        (["sampler.sampling.num_steps=2", "sampler.sampling.sigmas=[1.0, 0.7, 0.8]"], "sampler.sampling.sigmas"),
        (["sampler.trajectory_dtype=bfloat16"], "sampler.trajectory_dtype"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(TrainConfig, overrides=overrides)
        assert err.value.field == field, (overrides, str(err.value))
    cfg = load_config(TrainConfig, overrides=["sampler.sampling.num_steps=2", "sampler.sampling.sigmas=[1.0, 0.4, 0.0]"])
    assert cfg.sampler.sampling.grid().tolist() == [1.0, 0.4, 0.0]
    assert cfg.sampler.sampling.kind() == "euler"


@pytest.mark.parametrize("mode", ["anchor", "all"])
def test_samplers_score_the_planned_predictions_into_step_rewards(tiny_model, mode):
    from diffrl.models.step_rewards import anchor_steps

    model = FlowModel.from_pretrained(str(tiny_model), device="cpu")
    cfg = SamplerConfig(k=K, groups_per_round=G, record_trajectory=True, paired=True, score_steps=mode,
                        sampling=SamplingConfig(num_steps=STEPS, step_kind="eta"))
    cfg.validate()
    scorer = InProcessScorer()
    with EmbeddedRedis() as redis:
        sampler = Sampler("s0", cfg, model, scorer, ExperienceProducer(redis.client(), stream="exp"),
                          PromptSource(train_prompts(), 0, 1))
        sampler.run_round()
        groups = [g for _, g in ExperienceConsumer(redis.client(), stream="exp").read(max_groups=10, block_ms=100)]
    for g in groups:
        preds = torch.stack([tensor_from_proto(s.trajectory.x0_preds) for s in g.samples])  # [K, S, C, H, W]
        anchors = anchor_steps(preds)[0]
        for i, s in enumerate(g.samples):
            r = tensor_from_proto(s.trajectory.step_rewards["compressibility"])  # [S]
            want = [0, int(anchors[i])] if mode == "anchor" else list(range(STEPS - 1))
            scored = sorted(set(want) - {STEPS - 1})
            assert s.trajectory.anchor_step == (int(anchors[i]) if mode == "anchor" else -1)
            assert [j for j in range(STEPS) if not torch.isnan(r[j])] == sorted({*scored, STEPS - 1})
            assert float(r[-1]) == pytest.approx(s.rewards["compressibility"])  # the last step is the sample
            images = model.to_uint8(model.decode(preds[i, scored]))
            direct, _ = scorer.scorer.score_batch(list(images), [g.prompt] * len(scored), [{}] * len(scored))
            assert r[scored].tolist() == pytest.approx(list(direct), rel=1e-6)
    batch = decode(groups, model.latent_shape, {"compressibility": 2.0}, "trajectory", version=0)
    t = batch.trajectory
    assert t.step_rewards.shape == (G, K, STEPS) and t.anchors.shape == (G, K)
    r0 = tensor_from_proto(groups[0].samples[1].trajectory.step_rewards["compressibility"]).double()
    assert torch.allclose(t.step_rewards[0, 1], 2.0 * r0, equal_nan=True)  # the trained weights apply
    assert t.anchors[0, 1] == groups[0].samples[1].trajectory.anchor_step
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, overrides=["sampler.score_steps=anchor"])
    assert err.value.field == "sampler.record_trajectory"
