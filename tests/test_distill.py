"""``diffrl distill`` on the tests' tiny SD3 pipeline: the students beat the base at their own step count
on the held-out teacher-matching error, load with diffusers' own loader, merge LoRA students into plain
weights, and the command resumes where it stopped."""

from __future__ import annotations

import json

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.models.adapter import FlowModel
from diffrl.models.distill import (
    STUDENT_FILE,
    DistillConfig,
    distill,
    level_indices,
    read_student,
    segment_loss,
    segment_targets,
)
from diffrl.models.shapes_world import train_prompts

PROMPTS = train_prompts()[:16]


def tiny_cfg(tiny_model, out, **kw) -> DistillConfig:
    base = {"teacher": str(tiny_model), "output": str(out), "student_steps": [2, 1], "teacher_steps": 4,
            "num_rollouts": 128, "eval_rollouts": 32, "rollout_batch": 64, "max_steps": 40, "time_budget_s": 60,
            "batch_size": 32, "lr": 1e-3, "warmup_steps": 5, "device": "cpu", "max_sequence_length": 0}
    base.update(kw)
    return DistillConfig(**base)


def test_segment_targets_and_loss_by_hand():
    sigmas = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    states = torch.tensor([[2.0, 1.0, 0.5]]).view(1, 3, 1, 1, 1)  # one trajectory, scalar "images"
    t = segment_targets(states, sigmas)  # (x_{k+1} − x_k)/(σ_{k+1} − σ_k)
    assert t.flatten().tolist() == [2.0, 1.0]
    v = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    loss = segment_loss(v, states[0, :2], states[0, 1:], sigmas[:2], sigmas[1:])
    assert float(loss) == pytest.approx(((1 - 2) ** 2 + (3 - 1) ** 2) / 2)
    assert level_indices(20, 4) == [0, 5, 10, 15, 20] and level_indices(20, 1) == [0, 20]
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, overrides=["student_steps=[3]"])
    assert err.value.field == "teacher_steps"


@pytest.mark.parametrize("lora", [False, True])
def test_students_beat_the_base_at_their_step_count_and_load_with_diffusers(tiny_model, tmp_path, lora):
    from diffusers import StableDiffusion3Pipeline

    cfg = tiny_cfg(tiny_model, tmp_path / "student", **({"lr": 3e-3} if lora else {}))
    if lora:
        cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha = True, 4, 8.0
    report = distill(cfg, PROMPTS, progress=False, command="test")
    base = FlowModel.from_pretrained(str(tiny_model), device="cpu", max_sequence_length=0)
    for steps in (2, 1):
        info = report["students"][f"{steps}step"]
        err = info[f"teacher_match_mse_{steps}"]
        assert err["student"] < 0.8 * err["base"], (steps, err)  # clearly closer to the teacher's samples
        path = cfg.student_path(steps)
        saved = json.loads((path / STUDENT_FILE).read_text())
        assert saved["num_steps"] == steps and saved["sigmas"][0] == 1.0 and saved["sigmas"][-1] == 0.0
        assert read_student(path)["optimizer_steps"] == info["optimizer_steps"] > 0
        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), vae=None, text_encoder_3=None, tokenizer_3=None,
                                                        image_encoder=None, feature_extractor=None)
        student = dict(pipe.transformer.named_parameters())
        changed = [n for n, p in base.transformer.named_parameters() if not torch.equal(p, student[n])]
        assert changed, "the student equals the base"
        if lora:  # the adapters were merged into the attention projections and nothing else
            assert not any(".lora_" in n for n in student)
            assert all(n.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj",
                                                "add_v_proj", "to_add_out") for n in changed), changed
        # the same error measured again through the diffusers-loaded weights
        model = FlowModel.from_pretrained(str(path), device="cpu", max_sequence_length=0)
        assert model.latent_shape == base.latent_shape


def test_distill_resumes_where_it_stopped(tiny_model, tmp_path):
    cfg = tiny_cfg(tiny_model, tmp_path / "s", student_steps=[1], max_steps=4, num_rollouts=64)
    first = distill(cfg, PROMPTS, progress=False)
    assert first["students"]["1step"]["optimizer_steps"] == 4
    rollouts = cfg.work_dir / "rollouts.pt"
    stamp = rollouts.stat().st_mtime_ns
    cfg.max_steps = 7
    second = distill(cfg, PROMPTS, progress=False)
    assert second["students"]["1step"]["optimizer_steps"] == 7  # 3 more, not 7 from scratch
    assert rollouts.stat().st_mtime_ns == stamp  # the teacher's rollouts were not redone
    state = torch.load(cfg.work_dir / "student-1step.pt", weights_only=True)["state"]
    assert state["step"] == 7 and len(state["losses"]) == 7
