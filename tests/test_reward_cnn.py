"""The differentiable shapes-world reward (models/reward_cnn.py), its scorer and `diffrl reward-model`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffrl.cli import main
from diffrl.models.reward_cnn import (
    KINDS,
    MAX_COUNT,
    RewardNetConfig,
    ShapesRewardNet,
    load_reward_model,
    want_counts,
)
from diffrl.models.shapes_world import COLORS, SHAPES, all_prompts, eval_prompts, render_batch
from diffrl.reward_model import adversarial_images, near_miss, slot_loss
from diffrl.reward_servers.scorers import get_scorer
from diffrl.reward_servers.scorers import shapes as detector

SHIPPED = "assets/shapes-reward-cnn"
TINY = RewardNetConfig(channels=[4, 8], strides=[1, 2], hidden=8)
# Held-out agreement of the shipped model with the detector's strict, a little below what was measured
# on these images (1.000 and 1.000; training.json's held-out sets, other seeds: the same)
MIN_AGREEMENT_CLEAN = 0.97
MIN_AGREEMENT_WRONG = 0.97


def slot(color: str, shape: str) -> int:
    return KINDS.index(f"{color} {shape}")


def test_kinds_follow_the_world_and_end_with_other():
    assert KINDS[:12] == tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
    assert KINDS[12] == "other" == detector.OFF_PALETTE
    assert MAX_COUNT == 5


def test_want_counts_of_hand_written_prompts():
    got = want_counts(["two red circles and a blue square", "a yellow triangle",
                       "a blue square and two red circles", "four green squares"])
    assert got.dtype == torch.long and got.shape == (4, 13)
    first = torch.zeros(13, dtype=torch.long)
    first[slot("red", "circle")] = 2
    first[slot("blue", "square")] = 1
    assert torch.equal(got[0], first)
    assert torch.equal(got[2], first)  # clause order does not matter
    assert got[1].sum() == 1 and got[1, slot("yellow", "triangle")] == 1
    assert got[3].sum() == 4 and got[3, slot("green", "square")] == 4
    assert (got[:, 12] == 0).all()  # "other" is never asked for
    with pytest.raises(ValueError, match="unknown colour"):
        want_counts(["a purple circle"])
    with pytest.raises(TypeError):
        want_counts("a red circle")


def constant_net(head: str, score: str = "prob") -> tuple[ShapesRewardNet, list[list[float]]]:
    """A net whose logits do not depend on the image (every convolution weight 0), and those logits
    computed by hand from the parameters that are set."""
    net = ShapesRewardNet(RewardNetConfig(channels=[4, 8], strides=[1, 2], hidden=8, head=head, score=score))
    net.eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        if head == "mlp":
            bias = torch.randn(13 * 6, generator=gen)
            net.head[-1].bias.copy_(bias)
            return net, bias.view(13, 6).tolist()
        target = torch.rand(13, generator=gen, dtype=torch.float64) * 5.5  # counts between 0 and 5.5
        density_bias = torch.log(torch.expm1(target / 256)).float()  # softplus^-1 of the per-position share
        sharp = torch.randn(13, generator=gen) * 0.3
        class_bias = torch.randn(13, 6, generator=gen)
        net.density.bias.copy_(density_bias)
        net.sharpness.bias.copy_(sharp)
        net.class_bias.copy_(class_bias)
    logits = []
    for k in range(13):  # count = softplus(bias) per position x 256 positions ((32 px / stride 2)^2)
        count = math.log1p(math.exp(density_bias[k].item())) * 256
        w = math.exp(sharp[k].item())
        logits.append([-w * (count - n) ** 2 + class_bias[k, n].item() for n in range(6)])
    return net, logits


@pytest.mark.parametrize("head", ["density", "mlp"])
def test_reward_is_the_product_of_the_wanted_count_probabilities(head):
    net, logits = constant_net(head)
    prompts = ["two red circles and a blue square", "a yellow triangle"]
    images = torch.rand(2, 3, 32, 32)
    expected = []
    for row in want_counts(prompts).tolist():
        prob = 1.0
        for k, want in enumerate(row):  # softmax by hand
            z = [math.exp(v) for v in logits[k]]
            prob *= z[want] / sum(z)
        expected.append(prob)
    got = net.reward(images, prompts)
    assert got.shape == (2,)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)
    expected_log = torch.log(torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(net.log_reward(images, prompts).double(), expected_log, atol=1e-5)
    log_net, _ = constant_net(head, "log_prob")
    assert torch.allclose(log_net.reward(images, prompts), net.log_reward(images, prompts))
    assert net.predict_counts(images)[0].tolist() == [max(range(6), key=row.__getitem__) for row in logits]
    assert net(torch.rand(1, 3, 48, 40)).shape == (1, 13, 6)  # any size (average pooling)


def test_bad_inputs_are_refused():
    net = ShapesRewardNet(TINY)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        net.reward(torch.rand(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        net(torch.rand(2, 32, 32, 3))
    with pytest.raises(ValueError, match="float"):
        net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="score"):
        ShapesRewardNet(RewardNetConfig(score="logit"))


def saved_tiny(tmp_path) -> tuple[ShapesRewardNet, object]:
    torch.manual_seed(0)
    net = ShapesRewardNet(TINY)
    net.train()
    net(torch.rand(8, 3, 32, 32))  # move the BatchNorm running statistics off their defaults
    net.eval()
    return net, net.save_pretrained(tmp_path / "rm")


def test_gradient_reaches_the_input_and_no_parameter(tmp_path):
    _, folder = saved_tiny(tmp_path)
    model = load_reward_model(folder)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    prompts = ["a red circle", "two blue squares", "a green triangle and a red square"]
    model.reward(images, prompts).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_save_and_load_round_trip_exactly(tmp_path):
    net, folder = saved_tiny(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["class"] == "shapes_reward_cnn" and meta["score"] == "prob" and meta["kinds"] == list(KINDS)
    loaded = load_reward_model(str(folder))
    assert loaded.config == net.config
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(4, 3, 32, 32)
    prompts = ["a red circle", "two blue squares", "a yellow triangle", "four green circles"]
    assert torch.equal(net.reward(x, prompts), loaded.reward(x, prompts))


def test_loader_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such reward model folder"):
        load_reward_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json: no such file"):
        load_reward_model(tmp_path / "empty")
    _, folder = saved_tiny(tmp_path)
    config, weights = folder / "config.json", folder / "model.safetensors"
    good_config = config.read_text()

    config.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_reward_model(folder)
    config.write_text(json.dumps({**json.loads(good_config), "class": "vit_reward"}))
    with pytest.raises(ValueError, match="unknown reward model class 'vit_reward'.*shapes_reward_cnn"):
        load_reward_model(folder)
    config.write_text(json.dumps({**json.loads(good_config), "kinds": ["red circle"]}))
    with pytest.raises(ValueError, match="config.json: its slots"):
        load_reward_model(folder)
    config.write_text(json.dumps({**json.loads(good_config), "config": {"channels": [4, 8], "depth": 3}}))
    with pytest.raises(ValueError, match="config.json: bad network config"):
        load_reward_model(folder)

    config.write_text(good_config)
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "class_bias"}, str(weights))
    with pytest.raises(ValueError, match=r"model.safetensors: tensors do not match config.json's network"):
        load_reward_model(folder)
    save_file({**tensors, "features.0.weight": torch.zeros(5, 3, 3, 3)}, str(weights))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor shapes do not match.*features.0.weight"):
        load_reward_model(folder)
    weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_reward_model(folder)
    weights.unlink()
    with pytest.raises(ValueError, match="model.safetensors: no such file"):
        load_reward_model(folder)


def held_out_pairs(offset: int) -> tuple[list[str], list[int]]:
    """Eval prompts x 4 with seeds that neither the training nor training.json's figures used."""
    prompts = [p for p in eval_prompts() for _ in range(4)]
    return prompts, [5_000_000_000 + offset + i for i in range(len(prompts))]


def agreement(model, images: np.ndarray, prompts: list[str]) -> float:
    strict = np.array([s.strict > 0.5 for s in detector.score_batch(images, prompts)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return float((model.predicted_strict(x, prompts).numpy() == strict).mean())


def test_shipped_model_agrees_with_the_detector_on_held_out_prompts():
    model = load_reward_model(SHIPPED)
    prompts, seeds = held_out_pairs(0)
    clean = agreement(model, render_batch(prompts, seeds), prompts)
    rng = np.random.default_rng(7)
    wrong = [near_miss(p, rng, eval_prompts() if i % 2 else all_prompts()) for i, p in enumerate(prompts)]
    wrong_agreement = agreement(model, render_batch(wrong, [s + 10**6 for s in seeds]), prompts)
    assert clean >= MIN_AGREEMENT_CLEAN, clean
    assert wrong_agreement >= MIN_AGREEMENT_WRONG, wrong_agreement


def test_shapes_cnn_scorer_prefers_the_right_render(tmp_path):
    scorer = get_scorer("shapes_cnn")
    assert scorer.info()["pass_threshold"] == 0.5 and scorer.version.startswith("sha256:")
    prompt = "two red circles and a blue square"
    right = render_batch([prompt], [11])[0]
    wrong = render_batch(["a red circle and two blue squares"], [11])[0]
    scores, details = scorer.score_batch([right, wrong], [prompt, prompt], [{}, {}])
    assert scores[0] > scores[1] and 0 <= scores[1] <= scores[0] <= 1
    assert details["count_red_circle"][0] == 2 and details["count_blue_square"][0] == 1
    assert details["predicted_strict"] == [1.0, 0.0]
    assert set(details) >= {"prob", "log_prob", "count_other"}
    assert scorer.check_item("a purple circle", {}) is not None
    from diffrl.config import ConfigError
    from diffrl.reward_servers.scorers import make_options

    with pytest.raises(ConfigError, match="scorer.path"):
        make_options("shapes_cnn", path=str(tmp_path))


def test_reward_model_command_on_tiny_sizes(tiny_model, tmp_path, capsys):
    out = tmp_path / "rm"
    rc = main(["reward-model", "--out", str(out), "--base", str(tiny_model), "--student", str(tiny_model),
               "--images", "200", "--epochs", "1", "--base-steps", "2", "--eval-seeds", "1", "--threads", "1",
               "--batch-size", "32", "--onnx"])
    assert rc == 0
    report = json.loads((out / "training.json").read_text())
    assert report["command"].startswith(f"diffrl reward-model --out {out} ")
    assert sum(report["dataset"]["sizes"].values()) == 200
    assert set(report["held_out"]["sets"]) == {"clean", "wrong", "base", "student", "denoised"}
    assert set(report["held_out"]["slot_accuracy"]) == set(KINDS)
    assert report["held_out"]["sets"]["clean"]["images"] == len(eval_prompts())
    if report["onnx"]["written"]:
        assert (out / "model.onnx").is_file() and report["onnx"]["max_prob_diff_vs_torch"] < 1e-4
    model = load_reward_model(out)
    assert model.reward(torch.rand(2, 3, 32, 32), ["a red circle", "a blue square"]).shape == (2,)
    assert "held-out agreement" in capsys.readouterr().out


def test_reward_model_command_renders_only(tmp_path):
    out = tmp_path / "rm"
    assert main(["reward-model", "--out", str(out), "--no-model-samples", "--base", "absent",
                 "--images", "100", "--epochs", "1", "--eval-seeds", "1", "--threads", "1",
                 "--batch-size", "32"]) == 0
    report = json.loads((out / "training.json").read_text())
    assert set(report["dataset"]["sizes"]) == {"clean", "wrong", "colour", "blur", "noise", "shift"}
    assert set(report["held_out"]["sets"]) == {"clean", "wrong"} and "--no-model-samples" in report["command"]


def test_adversarial_images_stay_in_the_ball_and_raise_the_loss():
    torch.manual_seed(0)
    net = ShapesRewardNet(TINY).eval()
    prompts = ["a red circle", "two blue squares", "a green triangle and a yellow circle", "three red squares"]
    x = torch.from_numpy(render_batch(prompts, [0, 1, 2, 3])).permute(0, 3, 1, 2).float() / 255.0
    labels = want_counts(prompts).clamp(max=MAX_COUNT)
    net.train()  # it must come back in the mode it was given
    adv = adversarial_images(net, x, labels, eps=0.5, steps=3)
    assert net.training and all(p.grad is None for p in net.parameters())
    norms = (adv - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= 0.5 + 1e-5 and float(norms.min()) > 0.25  # moved, and no further than eps
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    net.eval()
    with torch.no_grad():
        assert float(slot_loss(net(adv), labels)) > float(slot_loss(net(x), labels))


def test_reward_model_command_with_adversarial_training(tmp_path, capsys):
    out = tmp_path / "rm"
    assert main(["reward-model", "--out", str(out), "--no-model-samples", "--images", "64", "--epochs", "1",
                 "--eval-seeds", "1", "--threads", "1", "--batch-size", "32", "--adv-eps", "0.5",
                 "--adv-steps", "2"]) == 0
    report = json.loads((out / "training.json").read_text())
    assert report["config"]["adv_eps"] == 0.5 and "--adv-eps 0.5 --adv-steps 2" in report["command"]
    capsys.readouterr()
    assert main(["reward-model", "--out", str(out), "--no-model-samples", "--adv-eps", "-1"]) != 0
    assert "adv_eps" in capsys.readouterr().err
