"""The shipped recipes: every deploy/configs/*.yaml loads and validates; the SD3.5-M recipes share one
shape and their prompt files are what scripts/make_prompt_data.py writes; and the OCR recipe's shape
(its algorithm settings: T, CFG 1 sampling, anchor CFG, LoRA, warmup, clip; its sampler and data)
runs on a tiny SD3 pipeline with a T5 encoder on CPU: one sampler round and one learner step."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

import pytest
import torch
from fakes import ListSink
from prometheus_client import CollectorRegistry

from diffrl.actors.prompts import PromptSource
from diffrl.actors.sampler import Sampler
from diffrl.config import load_config
from diffrl.learner.learner import Learner
from diffrl.learner.ray_learner import load_learner_model
from diffrl.models.adapter import FlowModel
from diffrl.models.pretrain import PretrainConfig
from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3
from diffrl.reward_servers.client import GroupScores
from diffrl.reward_servers.scorers.ocr import target_text
from diffrl.schema import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
SD35M = ("sd35m-ocr.yaml", "sd35m-geneval.yaml")


def load_recipe(path: Path, overrides=()):
    from diffrl.models.distill import DistillConfig

    schema = {"pretrain": PretrainConfig, "distill": DistillConfig}.get(path.name.split("-")[0], TrainConfig)
    return load_config(schema, path, list(overrides))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    cfg = load_recipe(path)
    if isinstance(cfg, TrainConfig):
        train, held_out = cfg.data.load()  # the prompt files exist, parse, and hold nothing out twice
        assert train.items and held_out.items


def test_the_sd35m_recipes_follow_the_public_crd_recipe():
    ocr, geneval = (load_recipe(CONFIGS / name) for name in SD35M)
    for cfg in (ocr, geneval):
        m, s, lrn = cfg.model, cfg.sampler, cfg.learner
        assert (m.path, m.resolution, m.dtype, lrn.dtype) == ("stabilityai/stable-diffusion-3.5-medium", 512,
                                                               "bfloat16", "bfloat16")
        assert m.max_sequence_length > 0  # T5 on: text rendering needs it
        assert lrn.lora.enabled and (lrn.lora.rank, lrn.lora.alpha) == (32, 64.0)
        assert s.k == 24 and s.sampling.num_steps == 10 and s.sampling.guidance_scale == 1.0
        assert lrn.algorithm == "crd" and lrn.crd.num_noise_levels == 20 and lrn.crd.kl_cfg_scale == 4.5
        assert lrn.crd.num_sampling_steps == s.sampling.num_steps and lrn.crd.time_shift == s.sampling.shift
        assert lrn.lr == 3e-4 and lrn.weight_decay == 1e-4 and lrn.grad_clip == 1.0 and lrn.lr_warmup_steps > 0
        # 48 prompts per epoch = 2 optimizer steps of 24 groups, produced by the samplers in whole rounds
        assert lrn.groups_per_step == 24 and lrn.groups_per_step % lrn.world_size == 0
        assert s.num_samplers * s.groups_per_round == lrn.groups_per_step
        assert cfg.placement.num_gpus == 1 and s.num_gpus == 1
    assert [r.name for r in ocr.rewards] == ["ocr"] and [r.name for r in geneval.rewards] == ["detector"]
    # one shape: only the reward, the prompts and the run's name differ
    same = replace(geneval, rewards=ocr.rewards, data=ocr.data, run=ocr.run)
    assert same == ocr


def test_the_prompt_files_are_what_the_generator_writes(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "make_prompt_data.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=True)
    assert "ocr-train.jsonl" in out.stdout
    for name in ("ocr-train", "ocr-eval", "geneval-train", "geneval-eval"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (REPO / "deploy" / "data" / f"{name}.jsonl").read_bytes()
    ocr, geneval = (load_recipe(CONFIGS / name) for name in SD35M)
    train, held_out = ocr.data.load()
    assert len(held_out.items) == 64 and len(train.items) >= 300
    for item in [*train.items, *held_out.items]:  # the quoted text is the metadata's, which the OCR reward reads
        assert target_text(item.prompt, {}) == item.metadata["text"]
    assert not {i.metadata["text"] for i in train.items} & {i.metadata["text"] for i in held_out.items}
    train, held_out = geneval.data.load()
    assert len(held_out.items) == 64
    assert {i.metadata["count"] for i in [*train.items, *held_out.items]} == {"1", "2", "3", "4"}


# ------------------------------------------------------------------------- the OCR recipe on a tiny SD3


class FakeOcr:
    """Stands in for the OCR servers (tested in test_reward_scorers.py): checks that each group carries
    its prompt's target text and scores images by brightness, so the group's rewards differ."""

    def __init__(self):
        self.texts = []

    def score_groups(self, groups):
        out = []
        for g in groups:
            assert g.metadata["text"] == target_text(g.prompt, {})
            self.texts.append(g.metadata["text"])
            out.append(GroupScores(scores={"ocr": [float(im.mean()) / 255 for im in g.images]}))
        return out


@pytest.fixture(scope="module")
def tiny_t5_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_t5")
    arch = TinySD3Arch(num_layers=1, num_heads=2, head_dim=16, text_hidden=32, text_projection=16, t5_layers=1)
    build_tiny_sd3(arch, root / "w").save_pretrained(str(root / "model"))
    return root / "model"


def test_the_ocr_recipe_shape_runs_on_a_tiny_sd3_with_t5(tiny_t5_model):
    cfg = load_recipe(CONFIGS / "sd35m-ocr.yaml", [
        f"model.path={tiny_t5_model}", "model.resolution=16", "model.dtype=float32", "model.device=cpu",
        "learner.dtype=float32", "learner.device=cpu", "learner.world_size=1", "learner.groups_per_step=2",
        "learner.torch_threads=1", "sampler.k=4", "sampler.groups_per_round=2", "sampler.num_samplers=1",
        "sampler.num_gpus=0", "placement.num_gpus=0", "learner.checkpoint_every=0"])
    # what the recipe itself sets is kept: T, the sampler's steps and CFG, the anchor's CFG, LoRA, lr
    assert cfg.learner.crd.num_noise_levels == 20 and cfg.learner.crd.kl_cfg_scale == 4.5
    assert cfg.sampler.sampling.guidance_scale == 1.0 and cfg.learner.lora.enabled

    model = FlowModel.from_config(cfg.model)
    assert model.latent_shape == (3, 16, 16)
    train, _ = cfg.data.load()
    emb = model.encode_prompts([train.items[0].prompt])
    assert emb.hidden.shape[1] == 16 + cfg.model.max_sequence_length  # CLIP tokens, then T5's
    scorer, sink = FakeOcr(), ListSink()
    sampler = Sampler("s0", cfg.sampler, model, scorer, sink, PromptSource(train.items, seed=cfg.sampler.seed),
                      lora=cfg.learner.lora)
    result = sampler.run_round()
    assert result.groups == 2 and result.masked == 0 and len(scorer.texts) == 2
    assert all(tuple(s.latent.shape) == (3, 16, 16) for g in sink.groups for s in g.samples)

    learner = Learner(replace(cfg.learner, reward_weights={"ocr": 1.0}), load_learner_model(cfg.learner, cfg.model),
                      registry=CollectorRegistry())
    assert learner.engine.gradient_clipping() == 1.0 and learner.T == 20
    lora0 = learner.theta_state_dict()
    assert lora0 and all(".lora_" in k for k in lora0)
    stats = learner.train_on_groups(sink.groups)
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["samples"] == 8
    assert stats["lr"] == pytest.approx(3e-4 / cfg.learner.lr_warmup_steps)  # the warmup's first step
    lora = learner.theta_state_dict()
    changed = [k for k in lora if not torch.equal(lora0[k], lora[k])]
    b = [k for k in lora if ".lora_B" in k]  # B starts at 0, so A gets no gradient in the first step
    assert len(changed) >= len(b) - 1 and set(changed) <= set(b)  # (the last block's text query: none)


def test_the_sdpo_recipe_shape_runs_on_a_tiny_sd3_with_t5(tiny_t5_model):
    """deploy/configs/sd35m-sdpo.yaml on a tiny SD3 with T5: paired η-step groups with the anchor rule's
    scored predictions, then one SDPO learner step of the LoRA (one optimizer step per trained slot)."""
    cfg = load_recipe(CONFIGS / "sd35m-sdpo.yaml", [
        f"model.path={tiny_t5_model}", "model.resolution=16", "model.dtype=float32", "model.device=cpu",
        "learner.dtype=float32", "learner.device=cpu", "learner.world_size=1", "learner.groups_per_step=2",
        "learner.torch_threads=1", "sampler.k=4", "sampler.groups_per_round=2", "sampler.num_samplers=1",
        "sampler.num_gpus=0", "placement.num_gpus=0", "learner.checkpoint_every=0"])
    assert cfg.sampler.paired and cfg.sampler.score_steps == "anchor" and cfg.learner.sdpo.step_rewards == "anchor"
    assert cfg.learner.lr == 5e-5 and cfg.learner.betas == [0.9, 0.999] and cfg.learner.weight_decay == 1e-4
    model = FlowModel.from_config(cfg.model)
    train, _ = cfg.data.load()
    scorer, sink = FakeOcr(), ListSink()
    sampler = Sampler("s0", cfg.sampler, model, scorer, sink, PromptSource(train.items, seed=cfg.sampler.seed),
                      lora=cfg.learner.lora)
    assert sampler.run_round().groups == 2
    rec = sink.groups[0].samples[0].trajectory
    assert rec.states.dtype == "float16" and rec.anchor_step >= 0 and "ocr" in rec.step_rewards
    learner = Learner(replace(cfg.learner, reward_weights={"ocr": 1.0}), load_learner_model(cfg.learner, cfg.model),
                      registry=CollectorRegistry())
    assert all(learner.group_problem(g) is None for g in sink.groups)
    lora0 = learner.theta_state_dict()
    stats = learner.train_on_groups(sink.groups)
    assert torch.isfinite(torch.tensor(stats["loss"])) and learner.engine.global_steps == 3
    lora = learner.theta_state_dict()
    assert any(not torch.equal(lora0[k], lora[k]) for k in lora)


@pytest.mark.parametrize("recipe", ["sd35m-tdmr1-ocr.yaml", "sd35m-tdmr1-geneval.yaml"])
def test_the_tdmr1_recipe_shapes_run_on_a_tiny_sd3_with_t5(tiny_t5_model, recipe):
    """The TDM-R1 SD3 recipes follow the official configs (config/tdmr1_clean.py) and run on a tiny SD3 with
    T5: deterministic float16 trajectories, then one learner step of the three LoRAs (G on the student,
    fake score and surrogate on the teacher), each with its own optimizer settings."""
    from diffrl.learner.ray_learner import load_teacher

    cfg = load_recipe(CONFIGS / recipe, [
        f"model.path={tiny_t5_model}", "model.resolution=16", "model.dtype=float32", "model.device=cpu",
        "learner.dtype=float32", "learner.device=cpu", "learner.world_size=1", "learner.groups_per_step=2",
        "learner.torch_threads=1", "sampler.k=4", "sampler.groups_per_round=2", "sampler.num_samplers=1",
        "sampler.num_gpus=0", "placement.num_gpus=0", "learner.checkpoint_every=0",
        f"learner.teacher={tiny_t5_model}"])
    c = cfg.learner.tdmr1
    ocr = "ocr" in recipe
    assert (c.rl_cfg, c.t_min_reward, c.t_min_surrogate, c.beta_dpo) == ((4.5, 0.3, 0.3, 10.0) if ocr else
                                                                         (2.5, 0.25, 0.55, 1.0))
    assert (c.train_steps, c.trunc_steps, c.lr_generator, c.lr_fake, c.lr_surrogate) == (2, 4, 7.5e-5, 3e-4, 3e-4)
    assert cfg.learner.lora.enabled and (cfg.learner.lora.rank, cfg.learner.lora.alpha) == (32, 64)
    model = FlowModel.from_config(cfg.model)
    train, _ = cfg.data.load()
    sink = ListSink()
    scorer = FakeOcr() if ocr else FakeDetector()
    sampler = Sampler("s0", cfg.sampler, model, scorer, sink, PromptSource(train.items, seed=cfg.sampler.seed),
                      lora=cfg.learner.lora)
    assert sampler.run_round().groups == 2
    assert sink.groups[0].samples[0].trajectory.states.dtype == "float16"
    lmodel = load_learner_model(cfg.learner, cfg.model)
    reward = "ocr" if ocr else "detector"
    learner = Learner(replace(cfg.learner, reward_weights={reward: 1.0}), lmodel, registry=CollectorRegistry(),
                      teacher=load_teacher(cfg.learner, cfg.model, lmodel.device, lmodel.dtype))
    assert all(learner.group_problem(g) is None for g in sink.groups)
    before = {r: learner.theta_state_dict(r) for r in ("theta", "fake", "surrogate")}
    stats = learner.train_on_groups(sink.groups)
    assert torch.isfinite(torch.tensor([stats["fake_loss"], stats["surrogate_loss"], stats["loss"]])).all()
    for role, betas in (("theta", (0.0, 0.999)), ("fake", (0.0, 0.999)), ("surrogate", (0.9, 0.999))):
        after = learner.theta_state_dict(role)
        assert after and all(".lora_" in n for n in after)
        assert any(not torch.equal(before[role][n], after[n]) for n in after), role
        assert learner.nets.trained[role].engine.optimizer.param_groups[0]["betas"] == betas


def tiny_latent_sd3(root: Path) -> Path:
    """A tiny SD3 with T5 in a tiny VAE's latent space (16 px images, 4 x 8 x 8 latents)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = build_tiny_sd3(TinySD3Arch(image_size=8, patch_size=2, num_layers=1, num_heads=2, head_dim=8,
                                      text_hidden=16, text_projection=8, t5_layers=1), root / "w")
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, shift_factor=0.1, scaling_factor=1.5)
    parts = {k: getattr(pipe, k) for k in ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                           "text_encoder_3", "tokenizer_3")}
    StableDiffusion3Pipeline(transformer=transformer, vae=vae, **parts).save_pretrained(str(root / "m"))
    return root / "m"


def test_the_didr_recipe_shape_runs_on_a_tiny_sd3_with_a_tiny_differentiable_reward(tmp_path):
    """The DIDR SD3 recipe (DMD2's SDXL values, LoRAs) runs one learner step on a tiny latent SD3 with T5
    and a tiny TorchScript reward given by path: the proxy's gradient passes through the VAE decode (the
    reward term is non-zero) and both LoRAs (generator, fake score) move."""
    from diffrl.learner.ray_learner import load_teacher

    class Warm(torch.nn.Module):  # differentiable in the image, reads the prompts
        def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return (images[:, 0] - images[:, 2]).mean(dim=(1, 2)) + 0.01 * float(len(prompts))

    reward = tmp_path / "warm.pt"
    torch.jit.save(torch.jit.script(Warm()), str(reward))
    tiny = tiny_latent_sd3(tmp_path)
    cfg = load_recipe(CONFIGS / "sd35m-didr.yaml", [
        f"model.path={tiny}", "model.resolution=16", "model.dtype=float32", "model.device=cpu",
        "learner.dtype=float32", "learner.device=cpu", "learner.world_size=1", "learner.groups_per_step=2",
        "learner.torch_threads=1", "sampler.k=4", "sampler.groups_per_round=2", "sampler.num_samplers=1",
        "sampler.num_gpus=0", "placement.num_gpus=0", "learner.checkpoint_every=0",
        f"learner.teacher={tiny}", f"learner.didr.reward_model={reward}", "learner.didr.fake_updates=2",
        "learner.didr.lr_generator=1e-3", "learner.didr.lr_fake=1e-3"])
    c = cfg.learner.didr
    assert (c.real_guidance, c.shift, c.t_min, c.t_max, c.fake_target) == (4.5, 3.0, 0.02, 0.98, "eps")
    assert cfg.learner.lora.enabled and cfg.learner.weight_decay == 1e-2 and cfg.learner.grad_clip == 10.0
    model = FlowModel.from_config(cfg.model)
    assert model.vae is not None and model.latent_shape == (4, 8, 8)
    train, _ = cfg.data.load()
    sink = ListSink()
    sampler = Sampler("s0", cfg.sampler, model, FakeDetector(), sink, PromptSource(train.items, seed=cfg.sampler.seed),
                      lora=cfg.learner.lora)
    assert sampler.run_round().groups == 2
    lmodel = load_learner_model(cfg.learner, cfg.model)
    learner = Learner(replace(cfg.learner, reward_weights={"detector": 1.0}), lmodel, registry=CollectorRegistry(),
                      teacher=load_teacher(cfg.learner, cfg.model, lmodel.device, lmodel.dtype))
    assert all(learner.group_problem(g) is None for g in sink.groups)
    before = {r: learner.theta_state_dict(r) for r in ("theta", "fake")}
    stats = learner.train_on_groups(sink.groups)
    assert stats["reward_norm"] > 0 and torch.isfinite(torch.tensor([stats["fake_loss"], stats["loss"]])).all()
    assert stats["regeneration_gap"] < 1e-3  # the learner's g(z) from the seeds is the samplers' sample
    for role in ("theta", "fake"):
        after = learner.theta_state_dict(role)
        assert after and all(".lora_" in n for n in after)
        assert any(not torch.equal(before[role][n], after[n]) for n in after), role


class FakeDetector:
    """Stands in for the detector servers: scores images by brightness, so the group's rewards differ."""

    def score_groups(self, groups):
        return [GroupScores(scores={"detector": [float(im.mean()) / 255 for im in g.images]}) for g in groups]
