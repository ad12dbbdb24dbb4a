"""The learner's optimizer defaults and schedule on a tiny SD3 model with real DeepSpeed on CPU: gradient
clipping is 1.0 by default for every algorithm, and learner.lr_warmup_steps ramps the learning rate
linearly (a torch LR scheduler inside the engine) and resumes at the same place from a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

import pytest
import torch
from prometheus_client import CollectorRegistry

from diffrl.learner.config import LearnerConfig
from diffrl.learner.learner import Learner
from diffrl.learner.networks import LinearWarmup
from diffrl.models.adapter import FlowModel
from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3
from diffrl.proto import experience_pb2
from diffrl.proto.codec import tensor_to_proto

SHAPE = (3, 16, 16)
LR = 1e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tiny_sd3")
    arch = TinySD3Arch(image_size=16, patch_size=4, num_layers=1, num_heads=2, head_dim=16, text_hidden=32,
                       text_projection=16)
    build_tiny_sd3(arch, work / "tok", seed=0).save_pretrained(str(work / "model"))
    return work / "model"


def make_learner(model_dir, cfg: LearnerConfig, run_dir=None) -> Learner:
    model = FlowModel.from_pretrained(str(model_dir), device="cpu", dtype="float32")
    return Learner(cfg, model, run_dir=run_dir, registry=CollectorRegistry())


def config(**kw) -> LearnerConfig:
    cfg = LearnerConfig(**{"groups_per_step": 2, "torch_threads": 1, "checkpoint_every": 0, "lr": LR, "seed": 0,
                           "device": "cpu", "dtype": "float32", **kw})
    cfg.crd.num_noise_levels = 2
    return cfg


def group(seed: int) -> experience_pb2.Group:
    gen = torch.Generator().manual_seed(seed)
    g = experience_pb2.Group(group_id=f"g{seed}", prompt="a red circle", policy_version=0, sampler_id="t")
    for j in range(3):
        x = torch.rand(SHAPE, generator=gen) * 2 - 1
        s = g.samples.add(seed=seed * 10 + j, latent=tensor_to_proto(x))
        s.rewards["r"] = float(x.mean())
    return g


@pytest.mark.parametrize("algorithm", ["crd", "nft", "grpo"])
def test_gradient_clipping_is_1_by_default_for_every_algorithm(model_dir, algorithm):
    cfg = config(algorithm=algorithm)
    assert cfg.grad_clip is None  # -> the algorithm's default
    learner = make_learner(model_dir, cfg)
    for net in learner.nets.trained.values():
        assert learner.deepspeed_config(net.spec)["gradient_clipping"] == 1.0
        assert net.engine.gradient_clipping() == 1.0  # what the engine applies
    # an explicit learner.grad_clip wins, 0 turns clipping off
    assert make_learner(model_dir, config(algorithm=algorithm, grad_clip=0.0)).engine.gradient_clipping() == 0.0


def test_linear_warmup_ramps_the_lr_then_holds_it_and_resumes_in_place(model_dir, tmp_path):
    assert LearnerConfig().lr_warmup_steps == 0 and LinearWarmup(0)(0) == 1.0
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        config(lr_warmup_steps=-1).validate()
    run_dir = tmp_path / "run"
    learner = make_learner(model_dir, config(lr_warmup_steps=4), run_dir=run_dir)
    assert learner.engine.lr_scheduler is not None
    lrs = []
    for step in range(6):
        stats = learner.train_on_groups([group(2 * step), group(2 * step + 1)])
        lrs.append(stats["lr"])
        assert learner.engine.optimizer.param_groups[0]["lr"] == pytest.approx(LR * min(1.0, (step + 2) / 4),
                                                                              rel=1e-12)  # the next step's
        if learner.step == 2:
            learner.save_checkpoint()
    assert lrs == pytest.approx([LR * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)], rel=1e-12)
    # without warmup the first step already has the full lr
    assert make_learner(model_dir, config()).train_on_groups([group(0), group(1)])["lr"] == LR

    # resume from step 2: the schedule continues at step 3 (0.75 lr), then the same as the first run
    again = make_learner(model_dir, config(lr_warmup_steps=4), run_dir=run_dir)
    assert again.resume() == 2
    resumed = [again.train_on_groups([group(2 * s), group(2 * s + 1)])["lr"] for s in range(2, 5)]
    assert resumed == pytest.approx(lrs[2:5], rel=1e-12)


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_blend_every_sets_the_snapshot_cadence(model_dir):
    """learner.blend_every=2 (the public CRD/NFT code's once per epoch): the snapshots move only after
    every second optimizer step, then with the decay of that step; blend_every=1 moves them every step."""
    every_step = make_learner(model_dir, config())
    assert every_step.config.blend_every == 1
    per_epoch = make_learner(model_dir, config(blend_every=2))
    for learner in (every_step, per_epoch):
        before = {name: _flat(learner.nets.module(name)) for name in ("p_old", "p_samp")}
        learner.train_on_groups([group(1), group(2)])  # optimizer step 1
        moved_1 = {name: not torch.equal(_flat(learner.nets.module(name)), before[name]) for name in before}
        after_1 = {name: _flat(learner.nets.module(name)) for name in before}
        learner.train_on_groups([group(3), group(4)])  # optimizer step 2
        moved_2 = {name: not torch.equal(_flat(learner.nets.module(name)), after_1[name]) for name in before}
        if learner is every_step:
            assert all(moved_1.values()) and all(moved_2.values())
        else:
            assert not any(moved_1.values()) and all(moved_2.values())
    # at step 2 p_samp (decay 0 before step 75) is an exact copy of θ in both cadences
    for learner in (every_step, per_epoch):
        torch.testing.assert_close(_flat(learner.nets.module("p_samp")), _flat(learner.nets.module("theta").module),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="blend_every"):
        config(blend_every=0).validate()
