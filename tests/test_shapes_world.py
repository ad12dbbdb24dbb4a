"""The shapes world: grammar, splits, scene sampling and rendering."""

from __future__ import annotations

import hashlib
from collections import Counter

import cv2
import numpy as np
import pytest

from diffrl.models import shapes_world as sw
from diffrl.models.shapes_world import Clause, SceneObject

EVAL_DIGEST = "d0cb05a039e9517fd717b3679cf89fbfc4dfb7674221225602161e453ae91abd"
"""sha256 of the eval prompts joined by newlines."""

BAD_PROMPTS = [
    "",
    "   ",
    "red circle",
    "a red circles",
    "two red circle",
    "one red circle",
    "an red circle",
    "five red circles",
    "a purple circle",
    "a red hexagon",
    "two red hexagons",
    "a red circle and a red circle",
    "two blue squares and a blue square",
    "three red circles and two blue squares",
    "four red circles and a blue square",
    "a red circle and a blue square and a green triangle",
    "a red circle and",
    "and a red circle",
    "a red circle, a blue square",
    "a red circle.",
    "a big red circle",
]


def test_all_prompts_size_and_uniqueness():
    prompts = sw.all_prompts()
    assert len(prompts) == len(set(prompts)) == 444
    single = [p for p in prompts if " and " not in p]
    double = [p for p in prompts if " and " in p]
    # 4 colours x 3 shapes x 4 counts; C(12, 2) kind pairs x 6 count pairs with n1 + n2 <= 4.
    assert len(single) == 48
    assert len(double) == 66 * 6
    assert prompts == sw.all_prompts()  # fixed order
    assert "a red circle and two green squares" in prompts
    assert "two green squares and a red circle" not in prompts  # one spelling per composition


@pytest.mark.parametrize("prompt", sw.all_prompts())
def test_round_trip_every_prompt(prompt):
    clauses = sw.parse_prompt(prompt)
    assert sw.format_prompt(clauses) == prompt
    assert sw.parse_prompt(sw.format_prompt(clauses)) == clauses
    assert 1 <= sum(c.count for c in clauses) <= 4
    if len(clauses) == 2:
        swapped = sw.format_prompt(clauses[::-1])
        assert sw.parse_prompt(swapped) == clauses[::-1]
        assert sw.canonical_prompt(swapped) == prompt
        assert clauses[0].kind != clauses[1].kind


def test_parse_examples_and_normalisation():
    assert sw.parse_prompt("a red circle") == [Clause(1, "red", "circle")]
    assert sw.parse_prompt("three blue squares") == [Clause(3, "blue", "square")]
    assert sw.parse_prompt("a red circle and two green squares") == [
        Clause(1, "red", "circle"), Clause(2, "green", "square")]
    assert sw.parse_prompt("  Four   YELLOW triangles ") == [Clause(4, "yellow", "triangle")]
    assert sw.format_prompt([Clause(4, "yellow", "triangle")]) == "four yellow triangles"


@pytest.mark.parametrize("prompt", BAD_PROMPTS)
def test_parse_rejects_outside_grammar(prompt):
    with pytest.raises(ValueError, match=r"prompt|clause"):
        sw.parse_prompt(prompt)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError):
        sw.parse_prompt(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "clauses",
    [
        [],
        [Clause(0, "red", "circle")],
        [Clause(5, "red", "circle")],
        [Clause(1, "pink", "circle")],
        [Clause(1, "red", "star")],
        [Clause(1, "red", "circle"), Clause(2, "red", "circle")],
        [Clause(3, "red", "circle"), Clause(2, "blue", "square")],
        [Clause(1, "red", "circle"), Clause(1, "blue", "square"), Clause(1, "green", "triangle")],
    ],
)
def test_format_rejects_invalid_clauses(clauses):
    with pytest.raises(ValueError):
        sw.format_prompt(clauses)


def test_splits_disjoint_cover_and_are_compositional():
    train, evals, everything = sw.train_prompts(), sw.eval_prompts(), sw.all_prompts()
    assert not set(train) & set(evals)
    assert sorted(train + evals) == sorted(everything)
    assert sw.SPLIT_SIZES == sw.split_sizes() == {
        "all": 444, "train": 381, "eval": 63, "eval_two_kind": 59, "eval_single_kind": 4}
    assert len(train) == sw.SPLIT_SIZES["train"] and len(evals) == sw.SPLIT_SIZES["eval"]
    # ~15% of the two-kind prompts, plus one single-kind prompt per count.
    assert sum(" and " in p for p in evals) == round(0.15 * 396)
    held_single = [sw.parse_prompt(p)[0] for p in evals if " and " not in p]
    assert sorted(c.count for c in held_single) == [1, 2, 3, 4]
    # Every colour, shape, count and (colour, shape) kind is still seen in training.
    seen = [c for p in train for c in sw.parse_prompt(p)]
    assert {c.color for c in seen} == set(sw.COLORS)
    assert {c.shape for c in seen} == set(sw.SHAPES)
    assert {c.count for c in seen} == set(sw.NUMBER_WORDS)
    assert {c.kind for c in seen} == {(c, s) for c in sw.COLORS for s in sw.SHAPES}
    single_train = {sw.parse_prompt(p)[0].kind for p in train if " and " not in p}
    assert single_train == {(c, s) for c in sw.COLORS for s in sw.SHAPES}
    # No held-out composition is seen in training in the other clause order either.
    assert not {sw.canonical_prompt(p) for p in train} & set(evals)


def test_eval_split_is_pinned():
    # The held-out set must never drift silently (held-out metrics across runs depend on it).
    digest = hashlib.sha256("\n".join(sw.eval_prompts()).encode()).hexdigest()
    assert digest == EVAL_DIGEST, "eval split changed; update EVAL_DIGEST only on purpose"
    assert sw.eval_prompts()[:4] == [
        "four red triangles", "three green squares", "a blue circle", "two yellow squares"]



def test_palette_is_well_separated():
    cols = np.array(list(sw.COLORS.values()) + [sw.BACKGROUND], dtype=float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert d[np.triu_indices(len(cols), 1)].min() > 150


@pytest.mark.parametrize("shape", sw.SHAPES)
@pytest.mark.parametrize("size", range(sw.MIN_SIZE_PX, sw.MAX_SIZE_PX + 1))
def test_templates_fill_their_box_symmetrically(shape, size):
    t = sw.shape_template(shape, size)
    assert t.shape == (size, size)
    assert (t == t[:, ::-1]).all()  # left-right symmetric
    assert t[-1].all() if shape != "circle" else t[size // 2].all()
    assert t.any(axis=0).all() and t.any(axis=1).all()  # touches all four sides of its box
    assert cv2.connectedComponents(t.view(np.uint8), connectivity=4)[0] == 2  # one 4-connected piece


def test_render_is_deterministic_by_seed_and_varies_across_seeds():
    p = "a red circle and two green squares"
    a = sw.render_prompt(p, 7)
    b = sw.render_prompt(p, 7)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert a.tobytes() == b.tobytes()
    others = {sw.render_prompt(p, s).tobytes() for s in range(20)}
    assert len(others) == 20
    batch = sw.render_batch([p, "four blue triangles", p], [7, 3, 8])
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.uint8
    assert batch[0].tobytes() == a.tobytes()
    assert batch[1].tobytes() == sw.render_prompt("four blue triangles", 3).tobytes()
    assert batch[2].tobytes() == sw.render_prompt(p, 8).tobytes()
    with pytest.raises(ValueError):
        sw.render_batch([p], [1, 2])


def _check_scene(prompt: str, scene: list[SceneObject], img: np.ndarray) -> None:
    want = Counter((c.color, c.shape) for c in sw.parse_prompt(prompt) for _ in range(c.count))
    assert Counter((o.color, o.shape) for o in scene) == want
    boxes = [o.pixel_bbox() for o in scene]
    for o, (x0, y0, x1, y1) in zip(scene, boxes):
        assert sw.MIN_SIZE_PX <= o.size <= sw.MAX_SIZE_PX
        assert x0 >= sw.BORDER_PX and y0 >= sw.BORDER_PX
        assert x1 <= sw.IMAGE_SIZE - 1 - sw.BORDER_PX and y1 <= sw.IMAGE_SIZE - 1 - sw.BORDER_PX
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) - 1
            assert gap >= sw.MIN_GAP_PX, (prompt, scene)
    # Only palette and background colours; objects never touch (8-connected components split them).
    flat = img.reshape(-1, 3)
    allowed = {tuple(v) for v in sw.COLORS.values()} | {sw.BACKGROUND}
    assert {tuple(v) for v in np.unique(flat, axis=0)} <= allowed
    ink = (img != np.array(sw.BACKGROUND, np.uint8)).any(-1).view(np.uint8)
    n, _labels = cv2.connectedComponents(ink, connectivity=8)
    assert n - 1 == len(scene)
    for o, (x0, y0, x1, y1) in zip(scene, boxes):
        t = sw.shape_template(o.shape, int(o.size))
        crop = img[y0:y1 + 1, x0:x1 + 1]
        assert (crop[t] == np.array(sw.COLORS[o.color], np.uint8)).all()
        assert (crop[~t] == np.array(sw.BACKGROUND, np.uint8)).all()


def test_scenes_respect_prompt_bounds_and_gaps():
    prompts = sw.all_prompts()
    rng = np.random.default_rng(0)
    for i in range(600):
        p = prompts[i % len(prompts)] if i < len(prompts) else prompts[rng.integers(len(prompts))]
        scene = sw.sample_scene(p, np.random.default_rng(i))
        _check_scene(p, scene, sw.render(scene))


def test_render_prompt_matches_sample_scene():
    p = "three yellow circles"
    scene = sw.sample_scene(p, np.random.default_rng(11))
    assert sw.render(scene).tobytes() == sw.render_prompt(p, 11).tobytes()
    assert sw.sample_scene(sw.parse_prompt(p), np.random.default_rng(11)) == scene


def test_sample_scene_gives_up_with_clear_error(monkeypatch):
    monkeypatch.setattr(sw, "MIN_SIZE_PX", 29)
    monkeypatch.setattr(sw, "MAX_SIZE_PX", 29)
    monkeypatch.setattr(sw, "MAX_SCENE_TRIES", 4)
    sw.sample_scene("a red circle", np.random.default_rng(0))  # one fits
    with pytest.raises(RuntimeError, match="could not place 2 objects"):
        sw.sample_scene("two red circles", np.random.default_rng(0))


def test_sample_scene_rejects_invalid_clauses():
    with pytest.raises(ValueError):
        sw.sample_scene([Clause(3, "red", "circle"), Clause(2, "blue", "square")], np.random.default_rng(0))


def test_render_clips_objects_outside_the_canvas():
    img = sw.render([SceneObject("square", "red", -2.0, 31.0, 8.0)])
    red = (img == np.array(sw.COLORS["red"], np.uint8)).all(-1)
    assert red.sum() == 2 * 5  # columns 0..1, rows 27..31
    assert sw.render([SceneObject("circle", "blue", -40.0, -40.0, 8.0)]).tobytes() == sw.render([]).tobytes()
