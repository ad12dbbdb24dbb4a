"""The shapes world: a tiny, exactly-scorable text-to-image world.

Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB (uint8) pictures of 1-4 flat objects (circle,
square, upright triangle) in four saturated colours on a plain near-white background.

Prompt grammar (lower case, single spaces)::

    prompt  := clause | clause " and " clause
    clause  := "a" COLOR SHAPE | ("two" | "three" | "four") COLOR SHAPE "s"

A two-clause prompt names two different (colour, shape) kinds and at most 4 objects in total.
``parse_prompt`` accepts both clause orders; ``all_prompts`` lists each composition once, in the
canonical order (the clause whose kind comes first in ``COLORS`` x ``SHAPES`` order comes first,
e.g. "a red circle and two green squares"), so no composition leaks across the train/eval split
through its mirror image. ``canonical_prompt`` maps either order to the listed one.

Splits (deterministic, independent of numpy's RNG streams: selection ranks prompts by a salted
SHA-256): eval = ``EVAL_TWO_KIND_FRACTION`` of the two-clause prompts plus one single-kind prompt
per count (distinct colours and kinds), so every colour, shape, count, and every (colour, shape)
kind still appears in training; eval tests compositional generalisation. Sizes: ``SPLIT_SIZES``.

Rendering: crisp (no antialiasing) pixel-centre coverage; objects are 7-10 px (integer) in extent; their
pixel bounding boxes are separated by at least ``MIN_GAP_PX`` background pixels, so connected
components always split objects apart (even after a slight blur).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

IMAGE_SIZE: int = 32
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 180, 40),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (245, 245, 240)
NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
MAX_OBJECTS: int = 4

MIN_SIZE_PX: int = 7
"""Smallest object extent (circle diameter, square side, triangle base and height), pixels."""
MAX_SIZE_PX: int = 10
"""Largest object extent, pixels (inclusive)."""
MIN_GAP_PX: int = 2
"""Background pixels guaranteed between the pixel bounding boxes of any two objects."""
BORDER_PX: int = 1
"""Background pixels guaranteed between any object and the image border."""
MAX_PLACEMENT_TRIES: int = 64
"""Position draws per object before the whole scene is redrawn."""
MAX_SCENE_TRIES: int = 64
"""Scene redraws before ``sample_scene`` gives up with a RuntimeError."""

EVAL_TWO_KIND_FRACTION: float = 0.15
_SPLIT_SALT = "diffrl-shapes-split-v1"

_NUMBER_FROM_WORD = {w: n for n, w in NUMBER_WORDS.items()}
_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_CLAUSE_RE = re.compile(r"^(a|two|three|four) ([a-z]+) ([a-z]+)$")


# --------------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    count: int
    color: str
    shape: str

    @property
    def kind(self) -> tuple[str, str]:
        return (self.color, self.shape)


def _kind_key(kind: tuple[str, str]) -> tuple[int, int]:
    return (_COLOR_INDEX[kind[0]], _SHAPE_INDEX[kind[1]])


def _clause_text(c: Clause) -> str:
    noun = c.shape if c.count == 1 else c.shape + "s"
    return f"{NUMBER_WORDS[c.count]} {c.color} {noun}"


def _validate(clauses: Sequence[Clause], where: str) -> None:
    if not 1 <= len(clauses) <= 2:
        raise ValueError(f"{where}: expected 1 or 2 clauses, got {len(clauses)}")
    for c in clauses:
        if c.count not in NUMBER_WORDS:
            raise ValueError(f"{where}: count {c.count!r} not in 1..{MAX_OBJECTS}")
        if c.color not in COLORS:
            raise ValueError(f"{where}: unknown colour {c.color!r} (expected one of {list(COLORS)})")
        if c.shape not in SHAPES:
            raise ValueError(f"{where}: unknown shape {c.shape!r} (expected one of {list(SHAPES)})")
    if len(clauses) == 2 and clauses[0].kind == clauses[1].kind:
        raise ValueError(f"{where}: both clauses name the same kind {clauses[0].color} {clauses[0].shape}")
    total = sum(c.count for c in clauses)
    if total > MAX_OBJECTS:
        raise ValueError(f"{where}: {total} objects in total, at most {MAX_OBJECTS} allowed")


def _parse_clause(text: str, prompt: str) -> Clause:
    m = _CLAUSE_RE.match(text)
    if m is None:
        raise ValueError(
            f"prompt {prompt!r}: clause {text!r} is not '<a|two|three|four> <colour> <shape>[s]'"
        )
    word, color, noun = m.groups()
    count = _NUMBER_FROM_WORD[word]
    if count == 1:
        shape = noun
        if shape not in SHAPES and shape.endswith("s") and shape[:-1] in SHAPES:
            raise ValueError(f"prompt {prompt!r}: 'a' takes a singular noun, got {noun!r}")
    else:
        if not noun.endswith("s") or noun[:-1] not in SHAPES:
            raise ValueError(
                f"prompt {prompt!r}: {word!r} takes a plural shape noun "
                f"({', '.join(s + 's' for s in SHAPES)}), got {noun!r}"
            )
        shape = noun[:-1]
    if color not in COLORS:
        raise ValueError(f"prompt {prompt!r}: unknown colour {color!r} (expected one of {list(COLORS)})")
    if shape not in SHAPES:
        raise ValueError(f"prompt {prompt!r}: unknown shape {noun!r} (expected one of {list(SHAPES)})")
    return Clause(count, color, shape)


def parse_prompt(prompt: str) -> list[Clause]:
    """Parse a prompt of the grammar (either clause order); ValueError on anything else.

    Surrounding whitespace, repeated spaces and upper case are tolerated."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split())
    if not text:
        raise ValueError("empty prompt")
    parts = text.split(" and ")
    if len(parts) > 2:
        raise ValueError(f"prompt {prompt!r}: at most two clauses joined by ' and '")
    clauses = [_parse_clause(p, prompt) for p in parts]
    _validate(clauses, f"prompt {prompt!r}")
    return clauses


def format_prompt(clauses: Sequence[Clause]) -> str:
    """Canonical text of ``clauses`` in the given order; ``parse_prompt(format_prompt(c)) == c``."""
    clauses = list(clauses)
    _validate(clauses, "format_prompt")
    return " and ".join(_clause_text(c) for c in clauses)


def canonical_clauses(clauses: Sequence[Clause]) -> list[Clause]:
    """Clauses in canonical order (by kind in COLORS x SHAPES order)."""
    return sorted(clauses, key=lambda c: _kind_key(c.kind))


def canonical_prompt(prompt: str) -> str:
    """The ``all_prompts`` spelling of ``prompt`` (clause order normalised)."""
    return format_prompt(canonical_clauses(parse_prompt(prompt)))


def prompt_objects(prompt_or_clauses: str | Sequence[Clause]) -> Counter:
    """Multiset of (colour, shape) the prompt asks for."""
    clauses = parse_prompt(prompt_or_clauses) if isinstance(prompt_or_clauses, str) else prompt_or_clauses
    return Counter({c.kind: c.count for c in clauses})


@lru_cache(maxsize=1)
def _all_prompts() -> tuple[str, ...]:
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    single = [format_prompt([Clause(n, c, s)]) for (c, s) in kinds for n in NUMBER_WORDS]
    count_pairs = [(a, b) for a in NUMBER_WORDS for b in NUMBER_WORDS if a + b <= MAX_OBJECTS]
    double = []
    for i, ka in enumerate(kinds):
        for kb in kinds[i + 1:]:
            for a, b in count_pairs:
                double.append(format_prompt([Clause(a, *ka), Clause(b, *kb)]))
    return tuple(single + double)


def _rank(prompt: str) -> str:
    return hashlib.sha256(f"{_SPLIT_SALT}:{prompt}".encode()).hexdigest()


@lru_cache(maxsize=1)
def _splits() -> tuple[tuple[str, ...], tuple[str, ...]]:
    prompts = _all_prompts()
    single = [p for p in prompts if " and " not in p]
    double = [p for p in prompts if " and " in p]
    n_eval_double = round(EVAL_TWO_KIND_FRACTION * len(double))
    eval_set = set(sorted(double, key=_rank)[:n_eval_double])
    # One single-kind prompt per count, with distinct colours and distinct kinds.
    used_counts: set[int] = set()
    used_colors: set[str] = set()
    for p in sorted(single, key=_rank):
        (c,) = parse_prompt(p)
        if c.count in used_counts or c.color in used_colors:
            continue
        eval_set.add(p)
        used_counts.add(c.count)
        used_colors.add(c.color)
        if len(used_counts) == len(NUMBER_WORDS):
            break
    train = tuple(p for p in prompts if p not in eval_set)
    evals = tuple(p for p in prompts if p in eval_set)
    # Every colour, shape, count and kind must still be seen in training.
    seen = [c for p in train for c in parse_prompt(p)]
    assert {c.color for c in seen} == set(COLORS)
    assert {c.shape for c in seen} == set(SHAPES)
    assert {c.count for c in seen} == set(NUMBER_WORDS)
    assert {c.kind for c in seen if True} == {(c, s) for c in COLORS for s in SHAPES}
    return train, evals


def all_prompts() -> list[str]:
    """Every prompt of the grammar once (canonical clause order), in a fixed order:
    single-kind prompts first (kind-major, count-minor), then two-kind prompts."""
    return list(_all_prompts())


def train_prompts() -> list[str]:
    return list(_splits()[0])


def eval_prompts() -> list[str]:
    """Held-out prompts (fixed, deterministic, disjoint from ``train_prompts``)."""
    return list(_splits()[1])


def split_sizes() -> dict[str, int]:
    tr, ev = _splits()
    return {"all": len(_all_prompts()), "train": len(tr), "eval": len(ev),
            "eval_two_kind": sum(" and " in p for p in ev), "eval_single_kind": sum(" and " not in p for p in ev)}


SPLIT_SIZES: dict[str, int] = split_sizes()
"""{'all': 444, 'train': 381, 'eval': 63, 'eval_two_kind': 59, 'eval_single_kind': 4}"""


# --------------------------------------------------------------------------------------------
# Scenes and rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One object: ``size`` is the extent in pixels (circle diameter, square side, triangle base
    and height); (cx, cy) the centre of its bounding box, in pixel units with (0, 0) the top-left
    corner of the image (pixel (row i, column j) covers [j, j+1) x [i, i+1)). ``sample_scene``
    draws integer sizes and integer box corners, so shapes are pixel-exact and symmetric; ``render``
    rounds other values to that grid."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def pixel_bbox(self) -> tuple[int, int, int, int]:
        """Inclusive pixel bounds (x0, y0, x1, y1) of the object's box, as ``render`` draws it."""
        size = round(self.size)
        x0 = round(self.cx - size / 2.0)
        y0 = round(self.cy - size / 2.0)
        return (x0, y0, x0 + size - 1, y0 + size - 1)


def _boxes_clear(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    gap_x = max(b[0] - a[2], a[0] - b[2]) - 1
    gap_y = max(b[1] - a[3], a[1] - b[3]) - 1
    return max(gap_x, gap_y) >= MIN_GAP_PX


def sample_scene(
    prompt_or_clauses: str | Sequence[Clause], rng: np.random.Generator
) -> list[SceneObject]:
    """Random non-overlapping placement of the prompt's objects (objects listed clause by clause).

    Sizes are uniform integers in [MIN_SIZE_PX, MAX_SIZE_PX]; box corners are integers,
    rejection-sampled so pixel bounding boxes keep ``MIN_GAP_PX`` background pixels between objects
    and ``BORDER_PX`` from the border. Raises RuntimeError if no placement is found within
    MAX_SCENE_TRIES x MAX_PLACEMENT_TRIES draws (never observed for <= 4 objects)."""
    if isinstance(prompt_or_clauses, str):
        clauses = parse_prompt(prompt_or_clauses)
    else:
        clauses = list(prompt_or_clauses)
        _validate(clauses, "sample_scene")
    wanted = [(c.shape, c.color) for c in clauses for _ in range(c.count)]
    for _ in range(MAX_SCENE_TRIES):
        sizes = rng.integers(MIN_SIZE_PX, MAX_SIZE_PX + 1, size=len(wanted))
        placed: list[SceneObject] = []
        boxes: list[tuple[int, int, int, int]] = []
        for (shape, color), size in zip(wanted, sizes):
            size = int(size)
            ok = False
            for _ in range(MAX_PLACEMENT_TRIES):
                x0, y0 = rng.integers(BORDER_PX, IMAGE_SIZE - BORDER_PX - size + 1, size=2)
                box = (int(x0), int(y0), int(x0) + size - 1, int(y0) + size - 1)
                if all(_boxes_clear(box, b) for b in boxes):
                    ok = True
                    break
            if not ok:
                break
            placed.append(SceneObject(shape, color, box[0] + size / 2.0, box[1] + size / 2.0, float(size)))
            boxes.append(box)
        if len(placed) == len(wanted):
            return placed
    raise RuntimeError(
        f"sample_scene: could not place {len(wanted)} objects without overlap in "
        f"{MAX_SCENE_TRIES} scene draws of {MAX_PLACEMENT_TRIES} tries per object"
    )


_COLOR_ARRAYS = {k: np.array(v, dtype=np.uint8) for k, v in COLORS.items()}
_BACKGROUND_ARRAY = np.array(BACKGROUND, dtype=np.uint8)


@cache
def shape_template(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] coverage of ``shape`` drawn in a size x size box (pixel centres).

    circle: centre distance <= size/2; square: the full box; triangle: upright isosceles, apex
    row centred, row k (from the top) spans |x - centre| <= (k + 1) / 2, so the base row fills the
    box width and every row is left-right symmetric."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    off = np.arange(size, dtype=np.float64) + 0.5 - size / 2.0  # pixel-centre offsets from centre
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        mask = off[None, :] ** 2 + off[:, None] ** 2 <= (size / 2.0) ** 2
    elif shape == "triangle":
        rows = np.arange(size, dtype=np.float64)[:, None]
        mask = np.abs(off[None, :]) <= (rows + 1.0) / 2.0
    else:
        raise ValueError(f"unknown shape {shape!r} (expected one of {list(SHAPES)})")
    mask.setflags(write=False)
    return mask


def render(scene: Sequence[SceneObject], out: np.ndarray | None = None) -> np.ndarray:
    """Rasterise a scene: uint8 [IMAGE_SIZE, IMAGE_SIZE, 3] RGB, no antialiasing."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) if out is None else out
    img[...] = _BACKGROUND_ARRAY
    for obj in scene:
        if obj.color not in _COLOR_ARRAYS:
            raise ValueError(f"unknown colour {obj.color!r}")
        x0, y0, _, _ = obj.pixel_bbox()
        size = round(obj.size)
        mask = shape_template(obj.shape, size)
        ya, yb = min(max(y0, 0), IMAGE_SIZE), min(max(y0 + size, 0), IMAGE_SIZE)  # clip to canvas
        xa, xb = min(max(x0, 0), IMAGE_SIZE), min(max(x0 + size, 0), IMAGE_SIZE)
        if ya < yb and xa < xb:
            img[ya:yb, xa:xb][mask[ya - y0:yb - y0, xa - x0:xb - x0]] = _COLOR_ARRAYS[obj.color]
    return img


def render_prompt(prompt: str, seed: int) -> np.ndarray:
    """Render a random scene for ``prompt``; identical bytes for the same (prompt, seed)."""
    return render(sample_scene(prompt, np.random.default_rng(seed)))


def render_batch(prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """uint8 [B, IMAGE_SIZE, IMAGE_SIZE, 3]; image i is ``render_prompt(prompts[i], seeds[i])``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"render_batch: {len(prompts)} prompts but {len(seeds)} seeds")
    out = np.empty((len(prompts), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    cache: dict[str, list[Clause]] = {}
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        clauses = cache.get(p)
        if clauses is None:
            clauses = cache[p] = parse_prompt(p)
        render(sample_scene(clauses, np.random.default_rng(int(s))), out=out[i])
    return out


def split_prompts(split: str) -> list[str]:
    """The prompts of a split: 'train', 'eval' (held out) or 'all'."""
    return {"eval": eval_prompts, "train": train_prompts, "all": all_prompts}[split]()
