"""The SD3-family path: model.resolution (latent and image shapes through sampling and the learner's
checks), T5 tokens whenever the pipeline has a T5 encoder (and none otherwise, bit-identical to
before), and hub ids that cannot be had failing at start-up with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from fakes import ListSink

from diffrl.actors.config import SamplerConfig
from diffrl.actors.prompts import PromptSource
from diffrl.actors.sampler import Sampler
from diffrl.config import ConfigError
from diffrl.learner import batch as experience
from diffrl.models.adapter import FlowModel, check_model_source
from diffrl.models.config import ModelConfig, SamplingConfig
from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3
from diffrl.reward_servers.client import GroupScores

ARCH = TinySD3Arch(num_layers=1, num_heads=2, head_dim=16, text_hidden=32, text_projection=16)  # 32 px
T5_ARCH = TinySD3Arch(num_layers=1, num_heads=2, head_dim=16, text_hidden=32, text_projection=16, t5_layers=1)
LONG = "a red circle and two blue squares and three green triangles and a yellow square with a red circle"


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    build_tiny_sd3(ARCH, root / "w").save_pretrained(str(root / "model"))
    return root / "model"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    build_tiny_sd3(T5_ARCH, root / "w").save_pretrained(str(root / "model"))
    return root / "model"


class FakeScorer:
    """Scores each image by its mean brightness (the reward path is tested elsewhere)."""

    def score_groups(self, groups):
        return [GroupScores(scores={"bright": [float(im.mean()) / 255 for im in g.images]}) for g in groups]


# ----------------------------------------------------------------------------------------- resolution


def test_resolution_sets_latents_images_samplers_and_the_learners_check(plain_dir):
    default = FlowModel.from_config(ModelConfig(path=str(plain_dir), device="cpu"))
    assert default.image_size == 32 and default.latent_shape == (3, 32, 32)  # sample_size x VAE scale 1
    model = FlowModel.from_config(ModelConfig(path=str(plain_dir), device="cpu", resolution=16))
    assert model.image_size == 16 and model.latent_shape == (3, 16, 16)
    images = model.generate(["a red circle", "two blue squares"], [1, 2], num_steps=2)
    assert images.shape == (2, 16, 16, 3) and images.dtype.name == "uint8"
    # the same seed at another resolution is another noise shape, drawn the same way
    assert model.initial_noise([5]).shape == (1, 3, 16, 16)

    cfg = SamplerConfig(k=2, groups_per_round=2, sampling=SamplingConfig(num_steps=2))
    sink = ListSink()
    sampler = Sampler("s0", cfg, model, FakeScorer(), sink, PromptSource(["a red circle", "two blue squares"]))
    result = sampler.run_round()
    assert result.groups == 2 and result.masked == 0
    latent = sink.groups[0].samples[0].latent
    assert tuple(latent.shape) == (3, 16, 16)
    # the learner checks groups against its model's latent_shape: same resolution decodes, another is refused
    batch = experience.decode(sink.groups, model.latent_shape, {}, "final", 0)
    assert tuple(batch.x0.shape) == (2, 2, 3, 16, 16)
    assert experience.group_problem(sink.groups[0], default.latent_shape, {}, "final")


@pytest.mark.parametrize("resolution, expected", [(30, "a multiple of 4"), (64, "at most 32")])
def test_a_resolution_the_model_cannot_take_is_a_config_error(plain_dir, resolution, expected):
    with pytest.raises(ConfigError) as err:
        FlowModel.from_config(ModelConfig(path=str(plain_dir), device="cpu", resolution=resolution))
    assert err.value.field == "model.resolution" and expected in str(err.value)
    with pytest.raises(ConfigError, match="resolution"):
        ModelConfig(resolution=-1).validate()


# ------------------------------------------------------------------------------------------------ T5


def test_no_t5_pipelines_get_no_t5_tokens_as_before(plain_dir):
    """The default max_sequence_length (256) adds nothing to pipelines without a T5 encoder: the shapes
    world's UNet pipeline and the tiny SD3 encode exactly as with 0 (CLIP tokens only)."""
    assert ModelConfig().max_sequence_length == 256 and ModelConfig().resolution == 0
    for path in (str(plain_dir), "assets/shapes-base"):
        new = FlowModel.from_config(ModelConfig(path=path, device="cpu"))
        old = FlowModel.from_config(ModelConfig(path=path, device="cpu", max_sequence_length=0))
        assert new.max_sequence_length == 0
        a, b = new.encode_prompts(["a red circle", ""]), old.encode_prompts(["a red circle", ""])
        assert a.hidden.shape[1] == 16 and torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)
        assert new.latent_shape == old.latent_shape == (3, 32, 32)
        assert torch.equal(new.sample(["a red circle"], [3], num_steps=2), old.sample(["a red circle"], [3], num_steps=2))


def test_t5_tokens_are_on_when_the_pipeline_has_a_t5_encoder(t5_dir):
    model = FlowModel.from_config(ModelConfig(path=str(t5_dir), device="cpu", max_sequence_length=24))
    assert model.pipe.text_encoder_3 is not None and model.max_sequence_length == 24
    emb = model.encode_prompts([LONG, LONG + " and a blue circle", ""])
    assert emb.hidden.shape == (3, 16 + 24, 64)  # CLIP's 16 tokens, then T5's 24
    clip, t5 = emb.hidden[:, :16], emb.hidden[:, 16:]
    assert torch.equal(clip[0], clip[1])  # CLIP truncates both prompts to the same 16 tokens
    assert not torch.allclose(t5[0], t5[1])  # T5 still reads where they differ
    assert t5.abs().sum() > 0
    images = model.generate(['a sign that says "hello"', "two red circles"], [0, 1], num_steps=2, guidance_scale=2.0)
    assert images.shape == (2, 32, 32, 3)
    assert FlowModel.from_config(ModelConfig(path=str(t5_dir), device="cpu")).encode_prompts(["a"]).hidden.shape[1] \
        == 16 + 256  # the default: diffusers' SD3 length
    dropped = FlowModel.from_config(ModelConfig(path=str(t5_dir), device="cpu", max_sequence_length=0))
    assert dropped.pipe.text_encoder_3 is None and dropped.encode_prompts(["a"]).hidden.shape[1] == 16


def test_tiny_sd3_without_t5_is_unchanged_by_the_t5_option(tmp_path):
    a = build_tiny_sd3(ARCH, tmp_path / "a")
    b = build_tiny_sd3(T5_ARCH, tmp_path / "b")
    assert a.text_encoder_3 is None and a.tokenizer_3 is None
    assert b.text_encoder_3.config.d_model == a.transformer.config.joint_attention_dim
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # T5 is built after the rest: same weights
    ids = b.tokenizer_3(['a sign that says "red"'], padding="max_length", max_length=40).input_ids[0]
    assert ids[-1] == 0 and 1 in ids and 2 not in ids  # padded, </s>, no <unk>


# ---------------------------------------------------------------------------------------------- hub


def test_an_unknown_hub_id_offline_fails_quickly_in_one_line():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the tests run offline (conftest.py)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_model_source("org/name")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert err.value.field == "model.path" and "\n" not in msg
    assert "HF_HUB_OFFLINE" in msg and "hf download org/name --local-dir DIR" in msg and "model.path=DIR" in msg
    with pytest.raises(ConfigError, match="no such folder"):
        check_model_source("./no/such/model")
    assert check_model_source("assets/shapes-base").endswith("assets/shapes-base")  # local folders pass


def _check_in_subprocess(tmp_path, endpoint: str, timeout_s: float = 1.0) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))  # online, an empty hub cache
    code = ("import time\nfrom diffrl.models.adapter import check_model_source\nt = time.monotonic()\n"
            f"try:\n    check_model_source('org/name', timeout_s={timeout_s})\n"
            "except Exception as e:\n    print(type(e).__name__, time.monotonic() - t)\n    print(e)\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    head, _, msg = out.stdout.partition("\n")
    kind, seconds = head.split()
    assert kind == "ConfigError", out.stdout + out.stderr[-2000:]
    return msg.strip(), float(seconds)


def test_an_unreachable_hub_fails_quickly_in_one_line(tmp_path):
    """No network: a refused connection, and a hub that accepts but never answers (bounded by the timeout)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once closed
    msg, seconds = _check_in_subprocess(tmp_path, f"http://127.0.0.1:{port}")
    assert seconds < 5 and "unreachable" in msg and "hf download org/name" in msg and len(msg.splitlines()) == 1
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections queue in the backlog; nothing ever answers
        msg, seconds = _check_in_subprocess(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert seconds < 5 and "unreachable" in msg and "model.path=DIR" in msg and len(msg.splitlines()) == 1


def test_train_with_an_unreachable_hub_id_prints_one_line_and_exits(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "diffrl.cli", "train", "model.path=org/name",
                          f"run.output_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("diffrl:")]
    assert len(lines) == 1 and lines[0].startswith("diffrl: bad config: model.path: cannot load 'org/name'")
    assert "hf download org/name --local-dir DIR" in lines[0]
    assert not (tmp_path / "runs").exists()  # failed before the run folder, Redis or Ray
