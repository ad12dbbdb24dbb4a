"""The shipped shapes-world base model: it loads from the repository, draws the world, and leaves
headroom (figures in docs/shapes_world.md)."""

import numpy as np
import pytest

from diffrl.evaluation import fidelity, summarize
from diffrl.models.adapter import FlowModel
from diffrl.models.shapes_world import parse_prompt, train_prompts
from diffrl.reward_servers.scorers import shapes as shapes_scorer


@pytest.mark.parametrize("path", ["assets/shapes-base", "assets/shapes-base-3k"])
def test_shipped_base_model_draws_the_shapes_world(path):
    model = FlowModel.from_pretrained(path, device="cpu")
    single = [p for p in train_prompts() if len(parse_prompt(p)) == 1][:16]
    prompts = [p for p in single for _ in range(2)]
    seeds = list(range(len(prompts)))
    images = model.generate(prompts, seeds, num_steps=10, guidance_scale=2.0)
    assert images.shape == (32, 32, 32, 3) and images.dtype == np.uint8
    metrics = summarize(shapes_scorer.score_batch(images, prompts), prompts)
    # measured 0.73 strict on single-kind training prompts (20 steps); a random model scores 0
    assert metrics["strict"] >= 0.35, metrics
    assert metrics["color"] >= 0.6, metrics
    assert fidelity(images) >= 0.97
