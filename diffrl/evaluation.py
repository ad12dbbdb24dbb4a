"""Held-out evaluation: sample fixed (prompt, seed) pairs of the held-out prompt set (``data.eval``)
with p_samp, score them through the run's reward servers (each reward's mean, its standard error,
and its pass rate where the reward defines one), and write an image grid captioned with each
image's prompt and scores. Never optimized: held-out prompts are absent from training, and seeds are
fixed so runs and checkpoints are comparable.

On the shapes world's built-in sets the world's own metrics come on top: the GenEval-like detector's
accuracies, how much the pictures still look like the world (``fidelity`` / ``off_palette``,
``fid_shapes`` against ground-truth renders of the same pairs) and within-prompt ``diversity``
(docs/shapes_world.md, "Held-out image metrics")."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffrl.config import require
from diffrl.data import PromptItem, PromptSet
from diffrl.image_stats import FRECHET_EPS, FRECHET_SCALE, frechet_distance, within_group_disagreement  # noqa: F401
from diffrl.models import shapes_world
from diffrl.models.adapter import FlowModel
from diffrl.reward_servers.client import Group as RewardGroup
from diffrl.reward_servers.client import GroupScores
from diffrl.reward_servers.scorers import shapes as shapes_scorer

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    seeds_per_prompt: int = 4
    """Samples per prompt, each with a fixed seed."""
    seed: int = 20_000
    """Base of the fixed evaluation seeds (sample j of prompt i uses seed + 1000·i + j)."""
    num_steps: int = 20
    """Euler steps (evaluation uses more steps than RL sampling)."""
    guidance_scale: float = 2.0
    """CFG scale used for evaluation (2.0: the shapes base model's best strict accuracy)."""
    shift: float = 1.0
    """Sigma-schedule shift."""
    batch_size: int = 256
    """Images per forward."""
    grid_prompts: int = 12
    """Prompts (rows) shown in the image grid; columns are the seeds."""
    max_prompts: int = 0
    """Evaluate only the first N prompts of the held-out set (0 = all); for quick checks."""

    def validate(self) -> None:
        require(self.seeds_per_prompt >= 1, "seeds_per_prompt", "an int >= 1", self.seeds_per_prompt)
        require(self.num_steps >= 1, "num_steps", "an int >= 1", self.num_steps)
        require(self.guidance_scale >= 0, "guidance_scale", "a float >= 0", self.guidance_scale)
        require(self.batch_size >= 1, "batch_size", "an int >= 1", self.batch_size)
        require(self.grid_prompts >= 0, "grid_prompts", "an int >= 0", self.grid_prompts)
        require(self.max_prompts >= 0, "max_prompts", "an int >= 0", self.max_prompts)


class EvalScorer(Protocol):
    """What evaluation needs of the reward client (``SyncRewardClient`` fits)."""

    def score_groups(self, groups: Sequence[RewardGroup]) -> list[GroupScores]: ...

    def info(self, name: str) -> dict: ...


def eval_pairs(items: Sequence[PromptItem], cfg: EvalConfig) -> tuple[list[PromptItem], list[int]]:
    """The fixed (item, seed) pairs of an evaluation, prompt-major (``seeds_per_prompt`` per prompt)."""
    items = list(items)[: cfg.max_prompts] if cfg.max_prompts else list(items)
    pairs = [(item, cfg.seed + 1000 * i + j) for i, item in enumerate(items) for j in range(cfg.seeds_per_prompt)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def reward_metrics(images: np.ndarray, items: Sequence[PromptItem], per_prompt: int, scorer: EvalScorer,
                   reward_names: Sequence[str]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Score the images through the reward servers, one group per prompt. Returns the metrics
    (``reward_<name>`` mean, ``reward_<name>_sem`` its standard error, ``pass_<name>`` the fraction at or
    above the reward's ``pass_threshold`` where it has one, ``eval_groups_masked``) and each image's
    scores (NaN where its group could not be scored)."""
    groups = [RewardGroup(images=list(images[g:g + per_prompt]), prompt=items[g].prompt,
                          metadata=items[g].metadata) for g in range(0, len(images), per_prompt)]
    outcomes = scorer.score_groups(groups)
    per_image = {name: [math.nan] * len(images) for name in reward_names}
    masked = 0
    for g, outcome in enumerate(outcomes):
        if not outcome.ok:
            masked += 1
            if masked == 1:
                log.warning("evaluation: a held-out group was not scored (%s)", outcome.failure)
            continue
        for name, values in outcome.scores.items():
            per_image.setdefault(name, [math.nan] * len(images))[g * per_prompt:(g + 1) * per_prompt] = values
    metrics: dict[str, float] = {"eval_groups_masked": float(masked)}
    for name, values in per_image.items():
        scored = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
        if not len(scored):
            continue
        metrics[f"reward_{name}"] = float(scored.mean())
        metrics[f"reward_{name}_sem"] = float(scored.std(ddof=1) / math.sqrt(len(scored))) if len(scored) > 1 else 0.0
        threshold = scorer.info(name).get("pass_threshold")
        if threshold is not None:
            metrics[f"pass_{name}"] = float((scored >= float(threshold)).mean())
    return metrics, per_image


def summarize(scores: Sequence[shapes_scorer.ShapesScore], prompts: Sequence[str]) -> dict[str, float]:
    """Mean strict / per-clause accuracy, and strict accuracy by total object count."""
    metrics = {
        "strict": float(np.mean([s.strict for s in scores])),
        "count": float(np.mean([s.count for s in scores])),
        "color": float(np.mean([s.color for s in scores])),
        "shape": float(np.mean([s.shape for s in scores])),
        "partial": float(np.mean([s.partial for s in scores])),
    }
    totals = np.array([sum(c.count for c in shapes_world.parse_prompt(p)) for p in prompts])
    two_kind = np.array([len(shapes_world.parse_prompt(p)) == 2 for p in prompts])
    strict = np.array([s.strict for s in scores])
    for n in sorted(set(totals.tolist())):
        metrics[f"strict_objects_{n}"] = float(strict[totals == n].mean())
    if two_kind.any():
        metrics["strict_two_kind"] = float(strict[two_kind].mean())
    if (~two_kind).any():
        metrics["strict_one_kind"] = float(strict[~two_kind].mean())
    return metrics


_OFF_PALETTE_CLASS = len(shapes_world.COLORS) + 1  # classify_pixels: 0 background, 1..K palette, K+1 other


def fidelity(images: np.ndarray) -> float:
    """How much samples still look like the world: the mean fraction of pixels that are background or
    a palette colour (not off-palette ink: grey, brown, dark or dull smudges, new hues). 1.0 on renders
    of the world; about 0.90 under additive noise sigma 40; 0.55 for uniform noise; 0 for flat grey."""
    return float((shapes_scorer.classify_pixels(images) != _OFF_PALETTE_CLASS).mean())


# ---------------------------------------------------------------------------- shapes features
_WORLD_COLORS = np.array([shapes_world.BACKGROUND, *shapes_world.COLORS.values()], dtype=np.float64)
PURITY_THRESHOLDS: tuple[float, ...] = (16.0, 32.0, 64.0)
"""RGB Euclidean distances (0..255 units) from a pixel to the nearest world colour (background or a
palette colour) above which it counts as impure, one feature each (cumulative, so every one grows
monotonically with noise)."""
LAYOUT_GRID: int = 2
"""The ink layout features are the ink fractions of a LAYOUT_GRID x LAYOUT_GRID grid of blocks."""
FEATURE_NAMES: tuple[str, ...] = (
    *(f"class_{c}" for c in ("background", *shapes_world.COLORS, "off_palette")),
    *(f"ink_block_{r}_{c}" for r in range(LAYOUT_GRID) for c in range(LAYOUT_GRID)),
    *(f"impure_{t:g}" for t in PURITY_THRESHOLDS), "impurity",
    "edge_energy", "objects", "object_area", "object_fill",
)
"""The fixed features of :func:`shapes_features`, in order."""
FEATURE_DIM: int = len(FEATURE_NAMES)
def shapes_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB -> float64 [N, FEATURE_DIM]: a fixed, hand-built feature vector of a
    shapes-world image, every entry in [0, 1] (needs no weights; deterministic):

    - class_* (6): fraction of pixels the detector's pixel classifier
      (``diffrl.reward_servers.scorers.shapes.classify_pixels``) calls background, each palette colour,
      off-palette (colour composition);
    - ink_block_r_c (4): fraction of inked (non-background) pixels in each quadrant (layout; a
      finer grid made the renders-vs-renders floor 20x larger for little gain);
    - impure_16, impure_32, impure_64: fraction of pixels farther than 16, 32, 64 (RGB Euclidean,
      0..255; ``PURITY_THRESHOLDS``) from the nearest world colour (background or a palette colour),
      and impurity: the mean of min(that distance / 64, 1). All 0 on renders (no antialiasing);
      noise, blur, blends and new hues raise them. (A threshold of 8 made the base model's faint
      background speckle, which the detector ignores, 95 % of its distance);
    - edge_energy: mean absolute luma difference between 4-neighbours / 255 (sharpness; blur
      lowers it, noise raises it);
    - objects: number of 8-connected ink components of at least ``MIN_AREA`` pixels / 4;
      object_area: their mean area / 100; object_fill: their mean area / bounding-box area
      (square 1, circle ~0.75, triangle ~0.55; shape statistics).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    classes = shapes_scorer.classify_pixels(images)  # [N, H, W]
    k = len(shapes_world.COLORS) + 2
    class_frac = np.stack([(classes == c).mean(axis=(1, 2)) for c in range(k)], axis=1)
    ink = classes != 0
    g = LAYOUT_GRID
    blocks = ink[:, : h - h % g, : w - w % g].reshape(n, g, h // g, g, w // g).mean(axis=(2, 4)).reshape(n, g * g)
    rgb = images.astype(np.float64)
    dist = np.full((n, h, w), np.inf)
    for color in _WORLD_COLORS:  # distance to the nearest world colour, [N, H, W]
        np.minimum(dist, np.sqrt(((rgb - color) ** 2).sum(-1)), out=dist)
    purity = np.stack([(dist >= t).mean(axis=(1, 2)) for t in PURITY_THRESHOLDS]
                      + [np.minimum(dist / 64.0, 1.0).mean(axis=(1, 2))], axis=1)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    energy = (np.abs(np.diff(luma, axis=1)).mean(axis=(1, 2))
              + np.abs(np.diff(luma, axis=2)).mean(axis=(1, 2))) / (2 * 255)
    objects = np.zeros((n, 3))
    for i in range(n):
        _, _, stats, _ = cv2.connectedComponentsWithStats(ink[i].astype(np.uint8), connectivity=8)
        stats = stats[1:]
        stats = stats[stats[:, cv2.CC_STAT_AREA] >= shapes_scorer.MIN_AREA]
        if len(stats):
            area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
            box = (stats[:, cv2.CC_STAT_WIDTH] * stats[:, cv2.CC_STAT_HEIGHT]).astype(np.float64)
            objects[i] = (len(stats) / shapes_world.MAX_OBJECTS, area.mean() / 100.0, (area / box).mean())
    return np.concatenate([class_frac, blocks, purity, energy[:, None], objects], axis=1)


def fid_shapes(images: np.ndarray, references: np.ndarray) -> float:
    """``FRECHET_SCALE`` x the Fréchet distance between :func:`shapes_features` of ``images`` and of
    ``references`` (ground-truth renders of the same (prompt, seed) pairs): 0 when the samples look
    like the world in colour composition, layout, pixel purity, sharpness and object statistics."""
    return FRECHET_SCALE * frechet_distance(shapes_features(images), shapes_features(references))


def diversity(images: np.ndarray, groups: Sequence[int] | np.ndarray) -> float | None:
    """Within-prompt diversity: for each group (same prompt, different seeds) the mean over pairs of
    images of the fraction of pixels whose detector class (background, palette colour, off-palette)
    differs, averaged over groups with at least 2 images. 0 when every seed of a prompt gives the
    same picture (mode collapse), at most 1. None when no group has 2 images."""
    classes = shapes_scorer.classify_pixels(np.asarray(images)).reshape(len(images), -1)
    return within_group_disagreement(classes, groups)


def held_out_image_metrics(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, float]:
    """The image-level metrics of an evaluation (see docs/shapes_world.md, "Held-out image metrics"):
    ``fidelity`` and ``off_palette`` (= 1 - fidelity); ``fid_shapes`` against ground-truth renders of
    the same (prompt, seed) pairs (needs >= 2 images); ``diversity`` of the samples and
    ``diversity_renders`` of the renders, within prompts (need >= 2 seeds per prompt)."""
    metrics = {"fidelity": fidelity(images)}
    metrics["off_palette"] = 1.0 - metrics["fidelity"]
    if len(images) >= 2:
        renders = shapes_world.render_batch(prompts, seeds)
        metrics["fid_shapes"] = fid_shapes(images, renders)
        groups = np.unique(np.asarray(prompts), return_inverse=True)[1]
        div = diversity(images, groups)
        if div is not None:
            metrics["diversity"] = div
            metrics["diversity_renders"] = diversity(renders, groups)
    return metrics


def shapes_world_metrics(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, float]:
    """The shapes world's own metrics: detector accuracies (:func:`summarize`) and image metrics."""
    metrics = summarize(shapes_scorer.score_batch(images, prompts), prompts)
    metrics.update(held_out_image_metrics(images, prompts, seeds))
    return metrics


def text_world_metrics(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, float]:
    """The text world's own metrics (OCR exact match by two engines, fidelity, fid_text, diversity)."""
    from diffrl import text_eval

    return text_eval.text_world_metrics(images, prompts, seeds)


WORLD_METRICS = {"shapes": shapes_world_metrics, "text": text_world_metrics}


def text_world_readings(images: np.ndarray) -> list[str]:
    """What tesseract reads on each image, in quotes, for the grid's captions ("" = nothing read)."""
    from diffrl import text_eval

    return [f'"{t}"' for t in text_eval.read_text(images)]


WORLD_CAPTIONS = {"text": text_world_readings}
"""Per-image caption prefixes of a built-in world's grid (the text world: each image's OCR reading)."""
"""Extra metrics of a built-in world's prompt sets (``PromptSet.world``)."""


def image_grid(images: np.ndarray, labels: Sequence[str], columns: int, captions: Sequence[str] | None = None,
               scale: int = 0) -> Image.Image:
    """uint8 [N, H, W, 3] -> one PIL image, ``columns`` per row, each row labelled with its prompt on
    the left and each image captioned with ``captions[i]`` (its scores) below it. ``scale``: the
    upscaling of small images (0: to at least 128 px)."""
    n, h, w, _ = images.shape
    scale = scale or max(1, 128 // max(h, w))
    font = ImageFont.load_default()
    rows = (n + columns - 1) // columns
    label_w, pad, caption_h = 230, 2, 14 if captions else 0
    tile_w = max(w * scale, 96 if captions else 0)
    cell_h, cell_w = h * scale + caption_h + pad, tile_w + pad
    grid = Image.new("RGB", (label_w + columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, columns)
        tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
        x, y = label_w + c * cell_w, r * cell_h
        grid.paste(tile, (x, y))
        if captions:
            draw.text((x + 1, y + h * scale + 1), captions[i][: tile_w // 6], fill=(0, 0, 0), font=font)
        if c == 0:
            for k, line in enumerate(_wrap(labels[i], 36, 3)):
                draw.text((4, y + 4 + 12 * k), line, fill=(0, 0, 0), font=font)
    return grid


def _wrap(text: str, width: int, lines: int) -> list[str]:
    out = [text[i:i + width] for i in range(0, len(text), width)][:lines]
    return out or [""]


def _captions(per_image: dict[str, list[float]], n: int) -> list[str]:
    return [" ".join(f"{name} {v[i]:.2f}" if not math.isnan(v[i]) else f"{name} -"
                     for name, v in per_image.items()) for i in range(n)]


def evaluate(model: FlowModel, cfg: EvalConfig, prompt_set: PromptSet, scorer: EvalScorer | None = None,
             reward_names: Sequence[str] = (), transformer=None, grid_path: str | Path | None = None
             ) -> dict[str, float]:
    """Sample the fixed pairs of ``prompt_set`` with ``transformer`` (default: the model's), score them
    through ``scorer`` (the reward servers; None: no rewards), add the world's own metrics, write the
    captioned grid."""
    items, seeds = eval_pairs(prompt_set.items, cfg)
    prompts = [item.prompt for item in items]
    start = time.time()
    images = model.generate(prompts, seeds, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                            shift=cfg.shift, transformer=transformer, batch_size=cfg.batch_size)
    metrics: dict[str, float] = {"images": float(len(images))}
    per_image: dict[str, list[float]] = {}
    if scorer is not None and reward_names:
        reward, per_image = reward_metrics(images, items, cfg.seeds_per_prompt, scorer, reward_names)
        metrics.update(reward)
    world = WORLD_METRICS.get(prompt_set.world)
    if world is not None:
        metrics.update(world(images, prompts, seeds))
    metrics["seconds"] = time.time() - start
    if grid_path is not None and cfg.grid_prompts:
        shown = cfg.grid_prompts * cfg.seeds_per_prompt
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        captions = _captions(per_image, len(images))[:shown] if per_image else None
        readings = WORLD_CAPTIONS.get(prompt_set.world)
        if readings is not None:
            words = readings(images[:shown])
            captions = [f"{w} {c}" for w, c in zip(words, captions)] if captions else words
        image_grid(images[:shown], prompts[:shown], cfg.seeds_per_prompt, captions).save(grid_path)
    return metrics
