"""Held-out image metrics of diffrl/evaluation.py: fid_shapes (Fréchet distance in the fixed shapes
feature space), off_palette, within-prompt diversity. Reference values in docs/shapes_world.md."""

import itertools

import cv2
import numpy as np
import pytest

from diffrl.data import load_prompt_set
from diffrl.evaluation import (
    FEATURE_DIM,
    FEATURE_NAMES,
    EvalConfig,
    diversity,
    eval_pairs,
    evaluate,
    fid_shapes,
    fidelity,
    frechet_distance,
    held_out_image_metrics,
    shapes_features,
)
from diffrl.models import shapes_world


@pytest.fixture(scope="module")
def pairs():
    items, seeds = eval_pairs(load_prompt_set("shapes:eval").items, EvalConfig(seeds_per_prompt=2))
    return [item.prompt for item in items], seeds  # 126 (prompt, seed) pairs


@pytest.fixture(scope="module")
def renders(pairs):
    return shapes_world.render_batch(*pairs)


def _noisy(images, sigma, seed=0):
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def _blur(images, sigma):
    return np.stack([cv2.GaussianBlur(im, (0, 0), sigma) for im in images])


def test_features_of_a_render_are_what_the_scene_holds():
    prompt = "a red circle and two blue squares"
    image = shapes_world.render_prompt(prompt, 7)
    f = dict(zip(FEATURE_NAMES, shapes_features(image[None])[0]))
    assert len(FEATURE_NAMES) == FEATURE_DIM
    classes = [f[f"class_{c}"] for c in ("background", *shapes_world.COLORS, "off_palette")]
    assert sum(classes) == pytest.approx(1.0) and f["class_off_palette"] == 0
    assert f["class_red"] > 0 and f["class_blue"] > 0 and f["class_green"] == f["class_yellow"] == 0
    assert f["objects"] == pytest.approx(3 / shapes_world.MAX_OBJECTS)
    assert f["impure_16"] == f["impure_32"] == f["impure_64"] == f["impurity"] == 0  # no antialiasing
    assert sum(f[k] for k in FEATURE_NAMES if k.startswith("ink_block")) == pytest.approx(4 * (1 - f["class_background"]))
    # blur leaves the composition but softens the edges and adds blends
    fb = dict(zip(FEATURE_NAMES, shapes_features(_blur(image[None], 1.0))[0]))
    assert fb["edge_energy"] < f["edge_energy"] and fb["impure_16"] > 0


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (20_000, 3))
    b = rng.normal(0.0, 1.0, (20_000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([1.0, 0.0, 0.0])
    # diagonal covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 = 1 + 1 + 0.25
    assert frechet_distance(a, b, eps=0.0) == pytest.approx(2.25, abs=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # fewer rows than features: singular covariances, still finite and >= 0 thanks to eps·I
    small = frechet_distance(a[:4, :].repeat(10, axis=1), b[:4, :].repeat(10, axis=1))
    assert np.isfinite(small) and small >= 0
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


def test_fid_shapes_is_near_zero_between_renders_of_other_seeds(pairs, renders):
    prompts, seeds = pairs
    assert fid_shapes(renders, renders) == pytest.approx(0.0, abs=1e-9)
    for offset in (500, 777):  # measured 0.32 and 0.45 (126 images)
        assert fid_shapes(shapes_world.render_batch(prompts, [s + offset for s in seeds]), renders) < 1.0


def test_fid_shapes_grows_with_noise_and_blur(renders):
    noise = [fid_shapes(_noisy(renders, sigma), renders) for sigma in (5, 10, 20, 40)]
    assert all(a < b for a, b in itertools.pairwise(noise)), noise  # measured 1.6, 20, 87, 189
    assert noise[0] > 1.0 and noise[1] > 10  # the floor between renders is ~0.3
    blur = [fid_shapes(_blur(renders, sigma), renders) for sigma in (0.8, 1.5, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(blur)), blur  # measured 14, 42, 70
    assert blur[0] > 5


def test_fid_shapes_sees_scenes_with_the_wrong_number_of_objects(pairs, renders):
    prompts, seeds = pairs
    fewer = [p.split(" and ")[0] for p in prompts]  # the first clause only: fewer objects
    assert fid_shapes(shapes_world.render_batch(fewer, seeds), renders) > 10  # measured 22


def test_diversity_is_zero_for_identical_images_and_one_for_disjoint_ones(renders):
    twice = np.repeat(renders[:6], 2, axis=0)  # every group holds one picture twice
    assert diversity(twice, np.repeat(np.arange(6), 2)) == 0.0
    assert diversity(renders[:6], np.arange(6)) is None  # one image per group: undefined
    red = np.zeros((2, 32, 32, 3), np.uint8)
    red[:] = shapes_world.COLORS["red"]
    red[1] = shapes_world.BACKGROUND
    assert diversity(red, [0, 0]) == 1.0
    groups = np.arange(len(renders)) // 2
    assert 0.2 < diversity(renders, groups) < 0.4  # measured 0.282: the world's own level
    assert diversity(_noisy(renders, 40), groups) > diversity(renders, groups)


def test_held_out_image_metrics_keys(pairs, renders):
    prompts, seeds = pairs
    m = held_out_image_metrics(renders, prompts, seeds)
    assert m["fidelity"] == 1.0 and m["off_palette"] == 0.0
    assert m["fid_shapes"] == pytest.approx(0.0, abs=1e-9)  # the samples are the renders
    assert m["diversity"] == m["diversity_renders"] > 0
    noisy = _noisy(renders, 40)
    m = held_out_image_metrics(noisy, prompts, seeds)
    assert m["off_palette"] == pytest.approx(1 - fidelity(noisy)) and m["off_palette"] > 0.05
    one_seed = held_out_image_metrics(renders[::2], prompts[::2], seeds[::2])
    assert "diversity" not in one_seed and "diversity_renders" not in one_seed and "fid_shapes" in one_seed
    # no new key may look like a strict-accuracy subset (diffrl/monitoring.py exports strict_* as subsets)
    assert not any(k.startswith("strict_") for k in m)


def test_evaluate_reports_the_image_metrics(tmp_path):
    from diffrl.models.adapter import FlowModel

    model = FlowModel.from_pretrained("assets/shapes-base", device="cpu")
    cfg = EvalConfig(max_prompts=3, seeds_per_prompt=2, num_steps=4, grid_prompts=3)
    m = evaluate(model, cfg, load_prompt_set("shapes:eval"), grid_path=tmp_path / "grid.png")
    assert (tmp_path / "grid.png").is_file() and m["images"] == 6
    assert m["off_palette"] == pytest.approx(1 - m["fidelity"])
    assert m["fid_shapes"] >= 0 and 0 <= m["diversity"] <= 1 and 0 < m["diversity_renders"] <= 1
