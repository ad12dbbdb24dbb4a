"""docs/your_model.md end to end, with the commands it shows: a tiny SD3 pipeline (not the shapes world),
a .jsonl prompt file with OCR targets in the metadata, the OCR reward server, 3 learner steps, held-out
evaluation through the reward, export, and diffusers' own loader reproducing the run's p_samp images."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from diffrl.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "deploy" / "configs" / "tiny-sd3-ocr.yaml"


def test_tiny_sd3_ocr_from_prompts_to_an_exported_model(tmp_path, monkeypatch):
    import torch
    from diffusers import StableDiffusion3Pipeline

    from diffrl.export import load_run_model
    from diffrl.models.adapter import FlowModel

    monkeypatch.chdir(tmp_path)  # the guide's relative paths: models/, runs/, export/
    assert main(["tiny-model", "--out", "models/tiny-sd3"]) == 0
    assert main(["train", str(RECIPE), "run.progress=false", "ray.temp_dir=/tmp/diffrl-ray-test"]) == 0
    run_dir = tmp_path / "runs" / "tiny-sd3-ocr"

    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "train"] == [1, 2, 3]
    assert summary["learner_counters"]["groups_trained"] == 3 * 2
    # the OCR server scored the groups: every trained sample carried an ocr reward in [0, 1]
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in steps if r["kind"] == "train")

    # held-out evaluation through the reward server, before and after; no shapes-world metrics here
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3]
    for e in evals:
        assert 0.0 <= e["reward_ocr"] <= 1.0 and 0.0 <= e["pass_ocr"] <= 1.0 and e["reward_ocr_sem"] >= 0
        assert e["images"] == 4 * 2 and e["eval_groups_masked"] == 0 and "strict" not in e
    assert (run_dir / "grids" / "step_000003.png").is_file()

    # export: the LoRA in diffusers' format, loaded with diffusers' own loader
    assert main(["export", str(run_dir), "--out", "export"]) == 0
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").is_file()
    # (the tiny pipeline works in pixel space without T5: diffusers wants the absent parts named)
    pipe = StableDiffusion3Pipeline.from_pretrained("models/tiny-sd3", vae=None, text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.load_lora_weights("export")
    exported = FlowModel(pipe)
    p_samp = load_run_model(str(run_dir))
    base = FlowModel.from_pretrained("models/tiny-sd3")
    prompts = ['a sign that says "hello"'] * 2 + ['a poster with the word "diffrl"'] * 2
    seeds = [1, 2, 3, 4]
    x_export = exported.sample(prompts, seeds, num_steps=4)
    x_run = p_samp.sample(prompts, seeds, num_steps=4)
    torch.testing.assert_close(x_export, x_run, rtol=1e-5, atol=1e-5)
    assert (x_run - base.sample(prompts, seeds, num_steps=4)).abs().max() > 1e-4  # the tuning is in there

    # `diffrl eval --model RUN_DIR`: the run's own held-out prompts and reward, from its checkpoint
    assert main(["eval", "--model", str(run_dir), "output_dir=eval-out"]) == 0
    again = json.loads((tmp_path / "eval-out" / "metrics.json").read_text())
    assert again["images"] == evals[-1]["images"] and math.isclose(again["reward_ocr"], evals[-1]["reward_ocr"],
                                                                  abs_tol=0.1)
    assert (tmp_path / "eval-out" / "grid.png").is_file()
    assert np.isfinite(again["pass_ocr"])
    # a checkpoint folder names its run the same way; the user's overrides win over the run's recipe
    from diffrl.cli import build_parser, load_eval_config

    args = build_parser().parse_args(["eval", "--model", str(run_dir / "checkpoints" / "step_000003"),
                                      "--prompts", "shapes:eval", "output_dir=eval-ckpt", "eval.num_steps=7"])
    cfg, run_path = load_eval_config(args)
    assert run_path == str(run_dir / "checkpoints" / "step_000003")
    assert cfg.prompts == "shapes:eval" and cfg.eval.num_steps == 7 and cfg.eval.max_prompts == 4
    assert [r.name for r in cfg.rewards] == ["ocr"] and cfg.model.path == str(tmp_path / "models" / "tiny-sd3")


def test_a_prompt_every_reward_rejects_fails_the_job_with_the_reason(tmp_path, tiny_model, capsys):
    """Prompts the OCR reward refuses (no quoted text, no metadata) are masked and counted; after
    sampler.max_masked_rounds such rounds the job stops with the reason instead of waiting forever."""
    prompts = tmp_path / "no_text.txt"
    prompts.write_text("a red circle\na quiet lake at dawn\n")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text('a sign that says "ok"\n')
    code = main(["train", str(RECIPE), f"model.path={tiny_model}", f"data.train={prompts}", f"data.eval={held_out}",
                 f"run.output_dir={tmp_path / 'runs'}", "run.eval_every=0", "run.progress=false",
                 "sampler.max_masked_rounds=2", "sampler.masked_backoff_s=0", "ray.temp_dir=/tmp/diffrl-ray-test"])
    assert code == 1
    err = capsys.readouterr().err
    assert "the job stopped: no sampler can produce trainable groups" in err
    assert "every group of the last 2 rounds was masked" in err and "rejected" in err
    summary = json.loads((tmp_path / "runs" / "tiny-sd3-ocr" / "summary.json").read_text())
    assert "rejected" in summary["error"]
