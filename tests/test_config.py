"""Config loading: recipes, dotted overrides, errors that name the field, docstrings on every field."""

import dataclasses
import importlib

import pytest

from diffrl.config import ConfigError, describe, field_docs, load_config, to_yaml
from diffrl.evaluation import EvalConfig
from diffrl.models.config import ModelConfig, SamplingConfig
from diffrl.models.pretrain import PretrainConfig
from diffrl.models.tiny_sd3 import TinySD3Arch, TinyUNetArch


def test_defaults_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_size: 32\nsd3:\n  num_layers: 2\n")
    cfg = load_config(PretrainConfig, recipe, ["lr=1e-4", "sd3.patch_size=2", "batch_size=8"])
    assert isinstance(cfg, PretrainConfig) and isinstance(cfg.sd3, TinySD3Arch)
    assert cfg.batch_size == 8  # override beats recipe
    assert cfg.sd3.num_layers == 2  # recipe beats default
    assert cfg.lr == pytest.approx(1e-4)  # "1e-4" parsed as a float
    assert cfg.sd3.patch_size == 2
    assert cfg.warmup_steps == PretrainConfig().warmup_steps


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["sd3.num_layerz=2"], "sd3.num_layerz"),  # unknown key
        (["batch_size=lots"], "batch_size"),  # wrong type
        (["lr=-1"], "lr"),  # validate() range
        (["sd3.patch_size=5"], "sd3.image_size"),
        (["unet.channels=[16,30]"], "unet.channels"),
        (["denoiser=vit"], "denoiser"),  # cross-field rule
        (["prompt_dropout=1.5"], "prompt_dropout"),
    ],
)
def test_errors_name_the_dotted_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, overrides)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_unknown_key_in_recipe_and_missing_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("unet:\n  wings: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, recipe)
    assert err.value.field == "unet.wings"
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(PretrainConfig, None, ["lr"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(PretrainConfig, None, ["sd3.num_heads=2", "unet.channels=[8,16]", "seed=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(PretrainConfig, path) == cfg


CONFIG_CLASSES = [PretrainConfig, TinySD3Arch, TinyUNetArch, ModelConfig, SamplingConfig, EvalConfig]


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_describe_lists_nested_keys():
    keys = {row[0] for row in describe(PretrainConfig)}
    assert {"lr", "sd3.num_layers", "unet.channels", "unet.text_hidden"} <= keys


def test_shipped_recipes_load():
    from pathlib import Path

    from diffrl import cli
    from diffrl.schema import TrainConfig

    configs = Path(__file__).resolve().parents[1] / "deploy" / "configs"
    loaded = {}
    from diffrl.models.distill import DistillConfig

    schemas = {"pretrain": PretrainConfig, "distill": DistillConfig}
    for path in sorted(configs.glob("*.yaml")):
        loaded[path.name] = load_config(schemas.get(path.name.split("-")[0], TrainConfig), path)
    assert {"pretrain-shapes.yaml", "shapes-cpu.yaml", "shapes-cpu-nft.yaml", "shapes-cpu-grpo.yaml",
            "distill-shapes.yaml", "distill-sd35m.yaml"} <= set(loaded)
    assert loaded["distill-sd35m.yaml"].lora.enabled and loaded["distill-shapes.yaml"].student_steps == [4, 1]
    # the algorithm comparison (docs/results.md): same model, samplers' batch, reward, fine-tune, lr and evaluation
    crd, nft, grpo = (loaded[f"shapes-cpu{s}.yaml"] for s in ("", "-nft", "-grpo"))
    assert (crd.learner.algorithm, nft.learner.algorithm, grpo.learner.algorithm) == ("crd", "nft", "grpo")
    for other in (nft, grpo):
        assert other.model == crd.model and other.rewards == crd.rewards and other.eval == crd.eval
        assert other.learner.lora == crd.learner.lora and other.learner.lr == crd.learner.lr
        assert other.learner.groups_per_step == crd.learner.groups_per_step and other.sampler.k == crd.sampler.k
        assert other.run.max_seconds == crd.run.max_seconds == 1800  # the 30-minute budget
    # the default's model ships (the longer-trained base of docs/shapes_world.md)
    assert (Path(__file__).resolve().parents[1] / crd.model.path / "model_index.json").is_file()
    importlib.import_module("diffrl.cli")
    assert cli.split_recipe(["a.yaml", "x=1"]) == ("a.yaml", ["x=1"])
    assert cli.split_recipe(["x=1"]) == (None, ["x=1"])
