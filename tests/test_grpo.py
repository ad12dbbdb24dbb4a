"""Flow-GRPO end to end on the tiny SD3 model: the SDE sampler records trajectories and per-step
log-probs, they travel through a real Redis stream (codec included), the DeepSpeed learner recomputes
them under θ (ratio 1 on-policy), trains a step, and a recipe that cannot give GRPO its records is
refused when it loads."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from fakes import InProcessScorer
from prometheus_client import CollectorRegistry

from diffrl.actors.config import SamplerConfig
from diffrl.actors.prompts import PromptSource
from diffrl.actors.sampler import Sampler
from diffrl.config import ConfigError, load_config
from diffrl.embedded_redis import EmbeddedRedis
from diffrl.learner.algorithms.grpo import GRPO, GRPOConfig
from diffrl.learner.config import LearnerConfig
from diffrl.learner.learner import Learner
from diffrl.models.adapter import FlowModel
from diffrl.models.config import SamplingConfig
from diffrl.models.sde import scheduler_sigmas
from diffrl.models.shapes_world import train_prompts
from diffrl.proto import experience_pb2
from diffrl.proto.bus import ExperienceConsumer, ExperienceProducer
from diffrl.proto.codec import tensor_from_proto
from diffrl.schema import TrainConfig

REPO = Path(__file__).resolve().parents[1]
K, G, STEPS, SHIFT, NOISE, CFG = 4, 2, 4, 3.0, 0.7, 2.0


def grpo_learner_config() -> LearnerConfig:
    cfg = LearnerConfig(algorithm="grpo", groups_per_step=G, torch_threads=1, checkpoint_every=0, lr=1e-3,
                        device="cpu", dtype="float32", seed=0)
    cfg.grpo = GRPOConfig(noise_level=NOISE, num_sampling_steps=STEPS, time_shift=SHIFT, guidance_scale=CFG,
                          train_fraction=0.75)
    return cfg


def test_sde_sampler_records_match_the_learner_and_a_grpo_step_trains(tiny_model):
    model = FlowModel.from_pretrained(str(tiny_model), device="cpu")
    sampling = SamplingConfig(num_steps=STEPS, shift=SHIFT, guidance_scale=CFG, sde_noise_level=NOISE)
    with EmbeddedRedis() as redis:
        sampler = Sampler("s0", SamplerConfig(k=K, groups_per_round=G, sampling=sampling, record_trajectory=True),
                          model, InProcessScorer(), ExperienceProducer(redis.client(), stream="experience"),
                          PromptSource(train_prompts(), 0, 1))
        assert sampler.run_round().groups == G
        groups = [g for _, g in ExperienceConsumer(redis.client(), stream="experience").read(max_groups=10,
                                                                                             block_ms=100)]
    assert len(groups) == G
    s0 = groups[0].samples[0]
    t0 = s0.trajectory
    latents = tensor_from_proto(t0.states)
    assert latents.shape == (STEPS + 1, *model.latent_shape)
    assert tensor_from_proto(t0.log_probs).shape == (STEPS,)
    assert (t0.step_kind, t0.noise_level, t0.guidance_scale, t0.pair_id) == (experience_pb2.FLOW_SDE, NOISE, CFG, -1)
    assert torch.equal(latents[-1], tensor_from_proto(s0.latent))  # the trajectory ends at the sample
    assert torch.equal(latents[0], model.initial_noise([s0.seed])[0])  # and starts at the seed's ε
    assert t0.noise_seed == s0.seed
    sigmas = tensor_from_proto(t0.sigmas)
    assert torch.equal(sigmas, GRPOConfig(num_sampling_steps=STEPS, time_shift=SHIFT).sigmas())
    # the SDE trajectory is a function of (prompt, seeds) alone: another batch gives the same one
    again = model.sample_trajectory([groups[0].prompt], [t0.noise_seed], [t0.step_seed], sigmas, "flow_sde", NOISE,
                                    CFG)
    assert torch.allclose(again.states[0], latents, atol=1e-5)

    registry = CollectorRegistry()
    learner = Learner(grpo_learner_config(), FlowModel.from_pretrained(str(tiny_model), device="cpu"),
                      registry=registry)
    assert learner.T == 3 and learner.p_samp is learner.p_old
    # same weights as the sampler: log p_θ recomputed at the recorded (x_j, x_{j+1}) is the record
    log_ratio = learner.algorithm.log_ratios(learner.decode(groups), learner.step_context())  # [G, K, T]
    assert log_ratio.shape == (G, K, 3) and float(log_ratio.abs().max()) < 1e-5

    theta0 = learner.theta_state_dict()
    stats = learner.train_on_groups(groups)
    for key in ("loss", "policy_loss", "kl", "clip_fraction", "ratio_mean", "approx_kl", "grad_norm"):
        assert math.isfinite(stats[key]), (key, stats[key])
    assert stats["trained_fraction"] == 1.0  # no tied rewards among the compressibility scores
    assert registry.get_sample_value(GRPO.gauges["trained_fraction"][0]) == 1.0
    assert stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["grad_norm"] > 0 and stats["samples"] == G * K and learner.step == 1
    theta = learner.theta_state_dict()
    assert any(not torch.equal(theta0[k], theta[k]) for k in theta)
    samp = learner.snapshot_state_dict("p_samp")
    assert all(torch.equal(samp[k], theta[k]) for k in theta)  # the samplers get θ itself
    assert registry.get_sample_value(GRPO.gauges["ratio_mean"][0]) == pytest.approx(stats["ratio_mean"])
    assert registry.get_sample_value(GRPO.gauges["clip_fraction"][0]) == 0.0
    # θ moved: the same records are now off-policy, which is what the ratio measures
    assert float(learner.algorithm.log_ratios(learner.decode(groups), learner.step_context()).abs().max()) > 1e-6

    # a group without records (an ODE sampler's) cannot be trained by GRPO
    bare = experience_pb2.Group()
    bare.CopyFrom(groups[0])
    for s in bare.samples:
        s.ClearField("trajectory")
    assert "record_trajectory" in learner.group_problem(bare)


def test_grpo_recipe_needs_a_recording_sde_sampler():
    cfg = load_config(TrainConfig, REPO / "deploy" / "configs" / "shapes-cpu-grpo.yaml")
    assert cfg.learner.algorithm == "grpo" and cfg.sampler.record_trajectory
    # the faithful Flow-GRPO defaults: nothing in the recipe re-creates the earlier behaviour
    g = cfg.learner.grpo
    assert (g.kl_std, g.adv_std, g.skip_zero_adv, g.cfg_uncond_grad, g.sigma_grid) == ("sde", "batch", True, False,
                                                                                       "scheduler")
    assert (g.noise_level, g.num_sampling_steps, g.train_fraction, g.clip_range, g.adv_clip, g.kl_beta) == (
        0.7, 10, 0.99, 1e-4, 5.0, 0.04)
    # the learner's levels are the ones the samplers' SDE draws on: diffusers' scheduler grid
    assert torch.equal(scheduler_sigmas(cfg.sampler.sampling.num_steps, cfg.sampler.sampling.shift), g.sigmas())
    for overrides, field in [
        (["learner.grpo.sigma_grid=uniform"], "learner.grpo.sigma_grid"),  # the samplers cannot sample on it
        (["sampler.sampling.guidance_scale=4.5"], "sampler.sampling.guidance_scale"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(TrainConfig, REPO / "deploy" / "configs" / "shapes-cpu-grpo.yaml", overrides=overrides)
        assert err.value.field == field, (overrides, str(err.value))
    for overrides, field in [
        (["learner.algorithm=grpo"], "sampler.record_trajectory"),
        (["learner.algorithm=grpo", "sampler.record_trajectory=true"], "sampler.sampling.step_kind"),
        (["learner.algorithm=grpo", "sampler.record_trajectory=true", "sampler.sampling.step_kind=eta"],
         "sampler.sampling.step_kind"),
        (["learner.algorithm=grpo", "sampler.record_trajectory=true", "sampler.sampling.sde_noise_level=0.7",
          "sampler.sampling.num_steps=4"], "sampler.sampling.num_steps"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(TrainConfig, overrides=overrides)
        assert err.value.field == field, (overrides, str(err.value))
