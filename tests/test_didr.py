"""DIDR (learner/algorithms/didr.py): the flow score and x0 conversions, the distribution-matching target
and its normalizer, the Diffused Reward Proxy's gradient through k Euler steps on an analytic reward,
the fake update, all against hand-computed tensors; then two learner steps on a tiny SD3 (the generator
regenerated from the samplers' seeds equals their samples), the beta -> inf control, and a resume that
restores the generator, the fake score and their optimizers."""

from __future__ import annotations

import math

import pytest
import torch
from dashboards import dashboard_queries, metric_names

from diffrl.learner.algorithms.didr import (
    DIDRConfig,
    denoise_k,
    diffused_reward_proxy,
    dm_direction,
    dm_loss,
    draw_sigma,
    fake_loss,
    flow_score,
    score_to_x0_units,
    x0_from_velocity,
)

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_flow_score_and_x0_conversions():
    x0, eps = rand(2, 1, 2, 2), rand(2, 1, 2, 2, seed=1)
    sigma = torch.tensor([0.3, 0.8], dtype=F64)
    s = sigma.reshape(2, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    v = eps - x0  # the flow's velocity
    assert torch.allclose(x0_from_velocity(x_t, v, sigma), x0)
    # the score of a Gaussian-smoothed point mass at x0 is -eps/sigma
    assert torch.allclose(flow_score(x_t, x0, sigma), -eps / s)
    # a score difference maps back onto the x0 difference
    other = rand(2, 1, 2, 2, seed=2)
    diff = flow_score(x_t, x0, sigma) - flow_score(x_t, other, sigma)
    assert torch.allclose(score_to_x0_units(diff, sigma), x0 - other)
    # sigma draws: uniform then shifted
    u = torch.tensor([0.0, 0.5], dtype=F64)
    assert torch.allclose(draw_sigma(u, 0.02, 0.98, 1.0), torch.tensor([0.02, 0.5], dtype=F64))
    assert float(draw_sigma(u, 0.02, 0.98, 3.0)[1]) == pytest.approx(1.5 / 2.0)


def test_dm_direction_normalizer_and_loss_gradient():
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]], dtype=F64)
    fake = torch.tensor([[[[0.5, 2.5]]], [[[1.0, 1.0]]]], dtype=F64)
    real = torch.tensor([[[[0.0, 1.0]]], [[[0.5, -2.0]]]], dtype=F64)
    rew = torch.tensor([[[[0.1, 0.0]]], [[[0.0, -0.2]]]], dtype=F64)
    grad, norm = dm_direction(x, fake, real)
    # normalizer: mean |x - real| = (1 + 1)/2 = 1 and (0.5 + 1)/2 = 0.75
    assert torch.allclose(norm, torch.tensor([1.0, 0.75], dtype=F64))
    assert torch.allclose(grad[0], torch.tensor([[[0.5, 1.5]]], dtype=F64))
    assert torch.allclose(grad[1], torch.tensor([[[0.5, 3.0]]], dtype=F64) / 0.75)
    grad_r, _ = dm_direction(x, fake, real, rew)  # the reward term under the same normalizer
    assert torch.allclose(grad_r[0], torch.tensor([[[0.4, 1.5]]], dtype=F64))
    assert torch.allclose(grad_r[1], torch.tensor([[[0.5, 3.2]]], dtype=F64) / 0.75)
    plain, ones = dm_direction(x, fake, real, normalize=False)
    assert torch.allclose(plain, fake - real) and torch.equal(ones, torch.ones(2, dtype=F64))
    # NaN (0/0 normalizer) becomes 0, as DMD2's nan_to_num
    same, _ = dm_direction(real, fake, real)
    assert torch.isfinite(same).all()
    # L = 1/2 mean ||x - sg(x - grad)||^2 has gradient grad / numel and value mean(grad^2)/2
    xg = x.clone().requires_grad_(True)
    loss = dm_loss(xg, grad_r)
    loss.backward()
    assert float(loss) == pytest.approx(float(0.5 * grad_r.square().mean()))
    assert torch.allclose(xg.grad.double(), grad_r / grad_r.numel())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_reward_proxy_gradient_through_k_euler_steps(k):
    # v(x, σ) = a·x: each Euler step multiplies by 1 - a·σ/k, so D_k(x) = c·x with c = (1 - a·σ/k)^k;
    # r(d) = w·d + |d|²/2 per sample, so ∇_x r(D_k(x)) = c·(w + c·x)
    a, w = 0.7, rand(2, 1, 2, 2, seed=3)
    x_t, sigma = rand(2, 1, 2, 2, seed=4), torch.tensor([0.9, 0.4], dtype=F64)
    velocity = lambda x, s: a * x
    reward = lambda d: (w * d).sum(dim=(1, 2, 3)) + 0.5 * d.square().sum(dim=(1, 2, 3))
    c = ((1 - a * sigma / k) ** k).reshape(2, 1, 1, 1)
    assert torch.allclose(denoise_k(x_t, sigma, velocity, k), c * x_t)
    grad, r = diffused_reward_proxy(x_t, sigma, velocity, reward, k)
    assert torch.allclose(grad, c * (w + c * x_t))
    assert torch.allclose(r, reward(c * x_t))
    assert not grad.requires_grad and not x_t.requires_grad


def test_fake_loss_eps_and_v_forms():
    x, eps = rand(2, 1, 2, 2), rand(2, 1, 2, 2, seed=1)
    sigma = torch.tensor([0.25, 0.5], dtype=F64)
    v_fake = rand(2, 1, 2, 2, seed=2).requires_grad_(True)
    v_err = (eps - x - v_fake).square()  # [2, 1, 2, 2]
    assert float(fake_loss(v_fake, x, eps, sigma, "v")) == pytest.approx(float(v_err.mean()))
    weights = torch.tensor([0.75**2, 0.5**2], dtype=F64).reshape(2, 1, 1, 1)
    loss = fake_loss(v_fake, x, eps, sigma, "eps")
    assert float(loss) == pytest.approx(float((weights * v_err).mean()))
    # ε̂ = x_σ + (1 - σ)·v_f, so the ε loss is the v loss weighted by (1 - σ)²
    s = sigma.reshape(2, 1, 1, 1)
    x_s = (1 - s) * x + s * eps
    assert float(loss) == pytest.approx(float((x_s + (1 - s) * v_fake - eps).square().mean()))
    loss.backward()
    assert torch.allclose(v_fake.grad, -2 * weights * (eps - x - v_fake.detach()) / v_fake.numel())


def test_config_validation_names_the_field():
    from diffrl.config import ConfigError

    DIDRConfig().validate()
    DIDRConfig(beta=math.inf, reward_model="").validate()  # the control needs no reward model
    for bad, field in (({"beta": 0.0}, "beta"), ({"proxy_steps": 0}, "proxy_steps"),
                       ({"fake_target": "x"}, "fake_target"), ({"t_min": 0.5, "t_max": 0.4}, "t_max"),
                       ({"reward_model": ""}, "reward_model")):
        with pytest.raises(ConfigError, match=field):
            DIDRConfig(**bad).validate()


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    from conftest import TINY_ARCH

    from diffrl.models.tiny_sd3 import build_tiny_sd3

    root = tmp_path_factory.mktemp("teacher")
    build_tiny_sd3(TINY_ARCH, root / "work", seed=7).save_pretrained(str(root / "model"))
    return root / "model"


@pytest.fixture(scope="module")
def script_reward(tmp_path_factory):
    """A tiny differentiable reward given by path (TorchScript): red minus blue, scaled by prompt length."""

    class RedReward(torch.nn.Module):
        def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            scale = torch.tensor([float(len(p)) / 20.0 for p in prompts], dtype=images.dtype)
            return (images[:, 0] - images[:, 2]).mean(dim=(1, 2)) * scale

    path = tmp_path_factory.mktemp("reward") / "red.pt"
    torch.jit.save(torch.jit.script(RedReward()), str(path))
    return path


def didr_setup(tiny_model, teacher_model, reward_path, run_dir=None, **didr):
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

    sampler_cfg = SamplerConfig(k=4, groups_per_round=2, sampling=SamplingConfig(num_steps=1, guidance_scale=1.0))
    lcfg = LearnerConfig(algorithm="didr", groups_per_step=2, torch_threads=1, checkpoint_every=0, device="cpu",
                         dtype="float32", seed=0, teacher=str(teacher_model))
    lcfg.didr = DIDRConfig(reward_model=str(reward_path), real_guidance=2.0, fake_updates=2, proxy_steps=2,
                           lr_generator=1e-3, lr_fake=1e-3, **didr)
    model = FlowModel.from_pretrained(str(tiny_model), device="cpu")
    teacher = load_teacher(lcfg, ModelConfig(path=str(tiny_model)), model.device, model.dtype)
    registry = CollectorRegistry()
    learner = Learner(lcfg, model, run_dir=run_dir, registry=registry, teacher=teacher)
    make = lambda sink: Sampler("s0", sampler_cfg, FlowModel.from_pretrained(str(tiny_model), device="cpu"),
                                InProcessScorer(), sink, PromptSource(train_prompts(), 0, 1))
    return sampler_cfg, learner, make, registry


def test_two_didr_learner_steps_regenerate_the_samplers_samples(tiny_model, teacher_model, script_reward):
    from fakes import ListSink

    from diffrl.learner.algorithms.didr import DIDR
    from diffrl.models.adapter import FlowModel

    sampler_cfg, learner, make, registry = didr_setup(tiny_model, teacher_model, script_reward)
    DIDR.check_recipe(learner.config.didr, sampler_cfg)
    teacher_sd = FlowModel.from_pretrained(str(teacher_model), device="cpu").transformer.state_dict()
    fake0 = learner.theta_state_dict("fake")
    assert all(torch.equal(fake0[n], teacher_sd[n]) for n in fake0)  # the fake score starts from the teacher
    before = {r: learner.theta_state_dict(r) for r in ("theta", "fake")}
    sink = ListSink()
    sampler = make(sink)
    for step in (1, 2):
        sampler.run_round()
        groups = sink.groups[-2:]
        assert all(learner.group_problem(g) is None for g in groups)
        stats = learner.train_on_groups(groups)
        assert learner.step == step
        for key in ("generator_loss", "fake_loss", "dm_norm", "reward_norm", "proxy_reward", "model_reward"):
            assert math.isfinite(stats[key]), key
        if step == 1:  # the samplers ran the same weights: g_θ(z) from the seeds is their sample
            assert stats["regeneration_gap"] < 1e-4
        assert stats["reward_norm"] > 0
    for r in ("theta", "fake"):
        after = learner.theta_state_dict(r)
        assert any(not torch.equal(before[r][n], after[n]) for n in after), r
    # step 2's samplers still ran the step-0 weights: regenerated samples moved
    assert stats["regeneration_gap"] > 0
    exported = {s.name for metric in registry.collect() for s in metric.samples}
    panels = dashboard_queries("didr")
    assert panels and {n for expr in panels for n in metric_names(expr)} <= exported


def test_reward_term_moves_the_generator_and_the_control_has_none(tiny_model, teacher_model, script_reward):
    """Same groups, same seeds: with β = ∞ the reward stats are absent and the step differs from DIDR's."""
    from fakes import ListSink

    sink = ListSink()
    _, learner, make, _ = didr_setup(tiny_model, teacher_model, script_reward)
    make(sink).run_round()
    with_reward = learner.train_on_groups(sink.groups[:2])
    _, control, _, _ = didr_setup(tiny_model, teacher_model, script_reward, beta=math.inf)
    plain = control.train_on_groups(sink.groups[:2])
    assert "reward_norm" not in plain and "proxy_reward" not in plain
    assert math.isfinite(plain["model_reward"])  # still monitored
    assert plain["dm_norm"] == pytest.approx(with_reward["dm_norm"], rel=1e-6)  # same draws
    assert plain["generator_loss"] != pytest.approx(with_reward["generator_loss"], rel=1e-6)
    a, b = learner.theta_state_dict(), control.theta_state_dict()
    assert any(not torch.allclose(a[n], b[n]) for n in a)


def test_reward_sigma_max_drops_the_reward_term_above_the_ceiling(tiny_model, teacher_model, script_reward):
    """A ceiling below every draw (σ ≥ t_min = 0.02) leaves exactly the control's step; one above every
    draw leaves DIDR's (the paper's form, the default)."""
    from fakes import ListSink

    sink = ListSink()
    _, ref, make, _ = didr_setup(tiny_model, teacher_model, script_reward)
    make(sink).run_round()
    groups = sink.groups[:2]
    full = ref.train_on_groups(groups)
    _, capped, _, _ = didr_setup(tiny_model, teacher_model, script_reward, reward_sigma_max=0.01)
    none = capped.train_on_groups(groups)
    _, control, _, _ = didr_setup(tiny_model, teacher_model, script_reward, beta=math.inf)
    plain = control.train_on_groups(groups)
    assert "proxy_reward" not in none and none["reward_norm"] == 0.0
    assert none["generator_loss"] == pytest.approx(plain["generator_loss"], rel=1e-6)
    assert none["generator_loss"] != pytest.approx(full["generator_loss"], rel=1e-6)
    a, b = capped.theta_state_dict(), control.theta_state_dict()
    assert all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)
    with pytest.raises(ValueError, match="reward_sigma_max"):
        DIDRConfig(reward_sigma_max=0.0).validate()


def test_didr_resume_restores_generator_fake_and_optimizers(tiny_model, teacher_model, script_reward, tmp_path):
    from fakes import ListSink

    sink = ListSink()
    _, learner, make, _ = didr_setup(tiny_model, teacher_model, script_reward, run_dir=tmp_path / "a")
    sampler = make(sink)
    for _ in range(3):
        sampler.run_round()
    batches = [sink.groups[2 * i:2 * i + 2] for i in range(3)]
    learner.train_on_groups(batches[0])
    learner.train_on_groups(batches[1])
    learner.save_checkpoint()
    uninterrupted = learner.train_on_groups(batches[2])
    _, again, _, _ = didr_setup(tiny_model, teacher_model, script_reward, run_dir=tmp_path / "a")
    assert again.resume() == 2
    resumed = again.train_on_groups(batches[2])
    for key in ("generator_loss", "fake_loss", "dm_norm", "reward_norm"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-7), key
    for role in ("theta", "fake"):
        mine, theirs = learner.theta_state_dict(role), again.theta_state_dict(role)
        assert all(torch.allclose(mine[n], theirs[n], atol=1e-6) for n in mine), role


def test_differentiable_rewards_by_path(tmp_path, script_reward):
    """TorchScript (with prompts) and torch.export (.pt2, images only) rewards load frozen and give
    gradients with respect to the images; a wrong path or file is a clear error."""
    from diffrl.models.differentiable_reward import load_differentiable_reward

    class Bright(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))

        def forward(self, images):
            return (images.mean(dim=(2, 3)) * self.w).sum(dim=1)

    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    pt2 = tmp_path / "bright.pt2"
    torch.export.save(torch.export.export(Bright(), (images.detach(),)), str(pt2))
    bright = load_differentiable_reward(str(pt2))
    r = bright(images, ["a", "b"])
    assert torch.allclose(r, (images.detach().mean(dim=(2, 3)) * torch.tensor([1.0, 2.0, 3.0])).sum(dim=1))
    (grad,) = torch.autograd.grad(r.sum(), images)
    assert torch.allclose(grad[0, 2], torch.full((4, 4), 3.0 / 16))
    red = load_differentiable_reward(str(script_reward))
    r = red(images, ["a red circle", "a red circle and a blue square"])
    (grad,) = torch.autograd.grad(r.sum(), images)
    assert torch.allclose(grad[1, 0], torch.full((4, 4), len("a red circle and a blue square") / 20 / 16))
    assert all(not p.requires_grad for p in red.module.parameters())
    with pytest.raises(ValueError, match="no differentiable reward model"):
        load_differentiable_reward(str(tmp_path / "missing"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript reward"):
        load_differentiable_reward(str(tmp_path / "junk.pt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_differentiable_reward(str(tmp_path / "folder"))
