"""``diffrl export``: real run folders (the learner in-process on tiny SD3 and UNet pipelines, real
DeepSpeed on CPU, real checkpoints), exported and loaded back with diffusers' own loaders
(``from_pretrained``, ``load_lora_weights``, ``load_lora_adapter``); the loaded pipelines' images for
fixed seeds equal the run's p_samp (and θ) images, and differ from the base model's."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from prometheus_client import CollectorRegistry
from safetensors import safe_open
from safetensors.torch import load_file

from diffrl import cli
from diffrl.config import to_yaml
from diffrl.export import ExportError, export, load_run_model, resolve_checkpoint, write_lora
from diffrl.learner.config import LearnerConfig
from diffrl.learner.ema import EMASchedule
from diffrl.learner.learner import Learner
from diffrl.models.adapter import FlowModel
from diffrl.models.config import ModelConfig
from diffrl.models.flow_pipeline import FlowUNetPipeline
from diffrl.models.tiny_sd3 import TinySD3Arch, TinyUNetArch, build_tiny_sd3, build_tiny_unet
from diffrl.proto import experience_pb2
from diffrl.proto.codec import tensor_to_proto
from diffrl.schema import RewardSpec, TrainConfig

PROMPTS = ["a red circle", "two blue squares"]
SEEDS = [11, 12]
STEPS = 3  # Euler steps of the comparisons
ATOL = 1e-5  # same weights, same ops: the images agree to float rounding
MOVED = 1e-3  # the tuned images differ from the base's by more than this (so the comparisons can fail)
PIXEL_SPACE = {"vae": None, "text_encoder_3": None, "tokenizer_3": None}  # what the tiny SD3 lacks (diffusers
# requires them named; a real SD3.5 folder has them)


def images(model: FlowModel, transformer=None) -> torch.Tensor:
    return model.decode(model.sample(PROMPTS, SEEDS, num_steps=STEPS, transformer=transformer))  # [2, 3, H, W]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def group(seed: int, shape) -> experience_pb2.Group:
    gen = torch.Generator().manual_seed(seed)
    g = experience_pb2.Group(group_id=f"g{seed}-{uuid.uuid4().hex[:6]}", prompt=PROMPTS[seed % 2], policy_version=0,
                             sampler_id="test", created_at=time.time())
    for j in range(4):
        x = (torch.rand(shape, generator=gen) * 2 - 1) * 0.5 + (torch.rand(1, generator=gen) - 0.5)
        g.samples.add(seed=seed * 100 + j, latent=tensor_to_proto(x)).rewards["bright"] = float(x.mean())
    return g


@dataclass
class Run:
    """A run folder with checkpoints of steps 1 and 2, and the learner's own images of them."""

    base: Path
    run_dir: Path
    lora: bool
    base_images: torch.Tensor
    p_samp: dict[int, torch.Tensor]  # step -> images of the learner's p_samp module
    theta: dict[int, torch.Tensor]  # step -> images of the learner's θ module


def make_run(base: Path, run_dir: Path, lora: bool, steps: int = 2) -> Run:
    """What `diffrl train` leaves behind, minus the services: config.yaml as the job writes it, and the
    learner's checkpoints (one per step)."""
    cfg = LearnerConfig(groups_per_step=2, torch_threads=1, checkpoint_every=1, keep_checkpoints=0, lr=1e-2,
                        seed=0, device="cpu", dtype="float32", reward_weights={"bright": 1.0})
    cfg.crd.num_noise_levels = 2
    cfg.crd.sampler_ema = EMASchedule(start_step=0, start_decay=0.5, slope=0.0, max_decay=0.5)  # p_samp != θ
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha = lora, 4, 8.0  # scale alpha/r = 2 must survive export
    train_cfg = TrainConfig(model=ModelConfig(path=str(base), device="cpu"), learner=cfg,
                            rewards=[RewardSpec(name="bright")])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(train_cfg))
    model = FlowModel.from_pretrained(str(base), device="cpu")
    learner = Learner(cfg, model, run_dir=run_dir, registry=CollectorRegistry())
    run = Run(base, run_dir, lora, images(model), {}, {})
    for step in range(1, steps + 1):
        learner.train_on_groups([group(2 * step, model.latent_shape), group(2 * step + 1, model.latent_shape)])
        learner.save_checkpoint()
        run.p_samp[step] = images(model, learner.p_samp)
        run.theta[step] = images(model, learner.engine.module)
    learner.close()
    return run


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_sd3")
    arch = TinySD3Arch(image_size=16, patch_size=4, num_layers=2, num_heads=2, head_dim=16, text_hidden=32,
                       text_projection=16)
    build_tiny_sd3(arch, root / "tok", seed=0).save_pretrained(str(root / "base"))
    return root / "base"


@pytest.fixture(scope="module")
def lora_run(sd3_base, tmp_path_factory) -> Run:
    return make_run(sd3_base, tmp_path_factory.mktemp("lora") / "run", lora=True)


@pytest.fixture(scope="module")
def full_run(sd3_base, tmp_path_factory) -> Run:
    return make_run(sd3_base, tmp_path_factory.mktemp("full") / "run", lora=False)


# ---------------------------------------------------------------------------------------- LoRA (SD3)


def test_lora_export_loads_with_diffusers_load_lora_weights_and_matches_p_samp(lora_run, tmp_path):
    run = lora_run
    assert max_diff(run.p_samp[2], run.base_images) > MOVED  # training moved the model
    assert max_diff(run.p_samp[2], run.theta[2]) > MOVED  # p_samp is an EMA of θ here
    # load_run_model: the base from config.yaml, the adapters from p_samp.safetensors
    assert max_diff(images(load_run_model(run.run_dir)), run.p_samp[2]) < ATOL
    assert max_diff(images(load_run_model(run.run_dir, weights="theta")), run.theta[2]) < ATOL

    out = tmp_path / "out"
    info = export(run.run_dir, out)
    assert info["kind"] == "lora" and info["step"] == 2 and info["role"] == "p_samp"
    assert set(info["files"]) == {"pytorch_lora_weights.safetensors", "README.md", "export.json"}
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 8.0
    saved = json.loads((out / "export.json").read_text())
    assert saved["base_model"] == str(run.base.resolve()) and saved["step"] == 2 and saved["weights"] == "p_samp"
    readme = (out / "README.md").read_text()
    assert "load_lora_weights" in readme and str(run.base.resolve()) in readme

    # diffusers' own loaders, then the adapter around the loaded pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.base), **PIXEL_SPACE)
    pipe.load_lora_weights(str(out))
    assert max_diff(images(FlowModel(pipe)), run.p_samp[2]) < ATOL
    # the metadata is what carries alpha/r: the same tensors loaded without it (scale 1) are off
    plain = StableDiffusion3Pipeline.from_pretrained(str(run.base), **PIXEL_SPACE)
    plain.load_lora_weights(load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert max_diff(images(FlowModel(plain)), run.p_samp[2]) > MOVED / 4

    # for loaders without the metadata: alpha/r folded into lora_B
    folded = tmp_path / "folded"
    folded.mkdir()
    write_lora(folded, load_run_model(run.run_dir), run_lora_config(run), fold=True)
    with safe_open(str(folded / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.base), **PIXEL_SPACE)
    pipe.load_lora_weights(str(folded))
    assert max_diff(images(FlowModel(pipe)), run.p_samp[2]) < ATOL


def run_lora_config(run: Run):
    from diffrl.export import load_run_config

    return load_run_config(run.run_dir).learner.lora


# ---------------------------------------------------------------------------------------- full (SD3)


def test_full_export_is_a_pipeline_folder_diffusers_loads_p_samp_and_theta(full_run, tmp_path):
    run = full_run
    assert max_diff(run.p_samp[2], run.base_images) > MOVED and max_diff(run.p_samp[2], run.theta[2]) > MOVED
    out = tmp_path / "p_samp"
    info = export(run.run_dir, out)
    assert info["kind"] == "full" and (out / "model_index.json").is_file() and (out / "export.json").is_file()
    assert "StableDiffusion3Pipeline.from_pretrained" in "\n".join(info["load"])
    assert not list(out.rglob("*.bin")) and list((out / "transformer").glob("*.safetensors"))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), **PIXEL_SPACE)
    assert max_diff(images(FlowModel(pipe)), run.p_samp[2]) < ATOL

    out = tmp_path / "theta"
    assert export(run.run_dir, out, weights="theta")["role"] == "theta"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), **PIXEL_SPACE)
    assert max_diff(images(FlowModel(pipe)), run.theta[2]) < ATOL

    out = tmp_path / "bf16"
    export(run.run_dir, out, dtype="bfloat16")
    weights = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------- choosing


def test_step_selection_checkpoint_folders_and_clear_errors(lora_run, tmp_path):
    run = lora_run
    ckpts = run.run_dir / "checkpoints"
    assert resolve_checkpoint(run.run_dir) == (run.run_dir, ckpts / "step_000002")
    assert resolve_checkpoint(run.run_dir, step=1) == (run.run_dir, ckpts / "step_000001")
    assert resolve_checkpoint(ckpts / "step_000001") == (run.run_dir, ckpts / "step_000001")
    assert max_diff(images(load_run_model(run.run_dir, step=1)), run.p_samp[1]) < ATOL
    assert max_diff(images(load_run_model(ckpts / "step_000001")), run.p_samp[1]) < ATOL
    assert max_diff(run.p_samp[1], run.p_samp[2]) > MOVED  # the step matters

    with pytest.raises(ExportError, match=r"no checkpoint of step 7; available steps: 1, 2"):
        resolve_checkpoint(run.run_dir, step=7)
    with pytest.raises(ExportError, match="is the checkpoint of step 1, but step 2 was asked for"):
        resolve_checkpoint(ckpts / "step_000001", step=2)
    with pytest.raises(ExportError, match="no such folder"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(ExportError, match="not a run folder"):
        resolve_checkpoint(tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.yaml").write_text((run.run_dir / "config.yaml").read_text())
    with pytest.raises(ExportError, match="no checkpoint yet"):
        resolve_checkpoint(fresh)
    with pytest.raises(ExportError, match="no role 'anchor2'"):
        load_run_model(run.run_dir, weights="anchor2")
    with pytest.raises(ExportError, match="not an empty folder"):
        export(run.run_dir, run.run_dir)

    # a checkpoint without theta.safetensors (written before the learner saved it) is not unpickled
    old = tmp_path / "old"
    shutil.copytree(run.run_dir, old)
    (old / "checkpoints" / "step_000002" / "theta.safetensors").unlink()
    with pytest.raises(ExportError, match="DeepSpeed pickle"):
        load_run_model(old, weights="theta")
    # a moved base model: a clear error, and --base points at it
    cfg = (old / "config.yaml").read_text().replace(str(run.base), str(tmp_path / "moved"))
    (old / "config.yaml").write_text(cfg)
    with pytest.raises(ExportError, match="--base"):
        load_run_model(old)
    assert max_diff(images(load_run_model(old, base=str(run.base))), run.p_samp[2]) < ATOL


def test_cli_end_to_end(lora_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["export", str(lora_run.run_dir), "--step", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "pytorch_lora_weights.safetensors") in printed
    assert "from diffusers import StableDiffusion3Pipeline" in printed and "load_lora_weights" in printed
    assert json.loads((out / "export.json").read_text())["step"] == 1
    snippet = json.loads((out / "export.json").read_text())["load"]
    assert all(line in printed for line in snippet)
    scope: dict = {}
    exec("\n".join(snippet), scope)  # noqa: S102 - the printed snippet, verbatim
    assert max_diff(images(FlowModel(scope["pipe"])), lora_run.p_samp[1]) < ATOL

    assert cli.main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "diffrl export:" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert "--weights {p_samp,theta}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- shapes world (UNet)


def test_shapes_world_unet_exports_full_and_lora(tmp_path_factory):
    """The shapes-world base is a FlowUNetPipeline: full exports load with its from_pretrained, LoRA
    exports with diffusers' UNet loader (``pipe.unet.load_lora_adapter(OUT, prefix="unet")``)."""
    root = tmp_path_factory.mktemp("export_unet")
    arch = TinyUNetArch(image_size=16, channels=[8, 16], attention_head_dim=8, text_hidden=32, text_projection=16)
    build_tiny_unet(arch, root / "tok", seed=0).save_pretrained(str(root / "base"))
    for lora in (True, False):
        run = make_run(root / "base", root / f"run-{lora}", lora=lora, steps=1)
        assert max_diff(run.p_samp[1], run.base_images) > MOVED
        out = root / f"out-{lora}"
        info = export(run.run_dir, out)
        if lora:
            with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
                keys = list(f.keys())
            assert keys and all(k.startswith("unet.") for k in keys)
            pipe = FlowUNetPipeline.from_pretrained(str(run.base))
            pipe.unet.load_lora_adapter(str(out), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
            assert 'pipe.unet.load_lora_adapter(' in "\n".join(info["load"])
        else:
            pipe = FlowUNetPipeline.from_pretrained(str(out))
            assert "FlowUNetPipeline.from_pretrained" in "\n".join(info["load"])
        assert max_diff(images(FlowModel(pipe)), run.p_samp[1]) < ATOL
