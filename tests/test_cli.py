"""The command line: help, config errors that name the field, and eval end to end on a tiny model."""

import json
import os
import subprocess
import sys

import pytest

from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3

DIFFRL = [sys.executable, "-m", "diffrl.cli"]


def run(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([*DIFFRL, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def test_help_lists_commands_and_config_keys():
    out = run("--help")
    assert out.returncode == 0
    for command in ("pretrain", "eval", "bench", "demo", "report"):
        assert command in out.stdout
    out = run("pretrain", "--help")
    assert out.returncode == 0
    assert "unet.channels" in out.stdout and "transformer blocks" in out.stdout


@pytest.mark.parametrize(
    "args, field",
    [
        (["eval", "eval.splitt=eval"], "eval.splitt"),
        (["eval", "eval.seeds_per_prompt=0"], "eval.seeds_per_prompt"),
        (["pretrain", "sd3.num_heads=two"], "sd3.num_heads"),
        # the user's overrides come after the demo's own run.max_steps=30, so they win
        (["demo", "run.max_steps=0"], "run.max_steps"),
    ],
)
def test_bad_config_fails_fast_with_the_field_name(args, field):
    out = run(*args, timeout=120)
    assert out.returncode == 2
    assert f"bad config: {field}:" in out.stderr


def test_eval_end_to_end_on_a_tiny_model(tmp_path):
    pipe = build_tiny_sd3(TinySD3Arch(num_layers=1, num_heads=2, head_dim=16, text_hidden=32, text_projection=16),
                          tmp_path / "work")
    pipe.save_pretrained(str(tmp_path / "model"))
    out_dir = tmp_path / "eval"
    out = run("eval", "--model", str(tmp_path / "model"), "--split", "eval", f"output_dir={out_dir}",
              "eval.max_prompts=3", "eval.seeds_per_prompt=2", "eval.num_steps=2", "eval.grid_prompts=2")
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["images"] == 6
    for key in ("strict", "count", "color", "shape"):
        assert 0.0 <= metrics[key] <= 1.0
    # the shapes reward, served over HTTP: its mean and pass rate (strict match) agree with the detector
    assert metrics["reward_shapes"] == pytest.approx(metrics["strict"]) and metrics["pass_shapes"] == metrics["strict"]
    assert (out_dir / "grid.png").stat().st_size > 0
    assert "strict" in out.stdout and "reward shapes" in out.stdout
