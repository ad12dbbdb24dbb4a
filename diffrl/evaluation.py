"""Held-out evaluation on the shapes world: sample fixed (prompt, seed) pairs, score them with the
GenEval-like detector, measure how much the pictures still look like the world (``fidelity`` /
``off_palette``, ``fid_shapes`` against ground-truth renders of the same pairs, within-prompt
``diversity``), and write an image grid. Never optimized: the prompts of the ``eval`` split are
absent from training, and seeds are fixed so runs and checkpoints are comparable. The metrics are
documented in docs/shapes_world.md ("Held-out image metrics")."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffrl.config import require
from diffrl.models import shapes_world
from diffrl.models.adapter import FlowModel
from diffrl.models.config import ModelConfig
from diffrl.models.shapes_world import split_prompts
from diffrl.reward_servers.scorers import shapes as shapes_scorer

SPLITS = ("eval", "train", "all")


@dataclass
class EvalConfig:
    split: str = "eval"
    """Prompt split: eval (held out from training), train, or all."""
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
    """Evaluate only the first N prompts of the split (0 = all); for quick checks."""

    def validate(self) -> None:
        require(self.split in SPLITS, "split", "|".join(SPLITS), self.split)
        require(self.seeds_per_prompt >= 1, "seeds_per_prompt", "an int >= 1", self.seeds_per_prompt)
        require(self.num_steps >= 1, "num_steps", "an int >= 1", self.num_steps)
        require(self.guidance_scale >= 0, "guidance_scale", "a float >= 0", self.guidance_scale)
        require(self.batch_size >= 1, "batch_size", "an int >= 1", self.batch_size)
        require(self.grid_prompts >= 0, "grid_prompts", "an int >= 0", self.grid_prompts)
        require(self.max_prompts >= 0, "max_prompts", "an int >= 0", self.max_prompts)


@dataclass
class EvalCommandConfig:
    """What ``diffrl eval`` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to evaluate."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """What to evaluate and how to sample."""
    output_dir: str = "runs/eval"
    """Where the image grid and metrics.json are written."""


def eval_pairs(cfg: EvalConfig) -> tuple[list[str], list[int]]:
    """The fixed (prompt, seed) pairs of an evaluation, prompt-major."""
    prompts = split_prompts(cfg.split)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    pairs = [(p, cfg.seed + 1000 * i + j) for i, p in enumerate(prompts) for j in range(cfg.seeds_per_prompt)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def summarize(scores: Sequence[shapes_scorer.ShapesScore], prompts: Sequence[str]) -> dict[str, float]:
    """Mean strict / per-clause accuracy, and strict accuracy by total object count."""
    metrics = {
        "strict": float(np.mean([s.strict for s in scores])),
        "count": float(np.mean([s.count for s in scores])),
        "color": float(np.mean([s.color for s in scores])),
        "shape": float(np.mean([s.shape for s in scores])),
        "partial": float(np.mean([s.partial for s in scores])),
        "images": float(len(scores)),
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
FRECHET_EPS: float = 1e-6
"""Added to the diagonal of both covariances before the matrix square root (feature units squared):
keeps sqrt well defined when N <= FEATURE_DIM or a feature is constant (off-palette ink is 0 on
every render), and cancels exactly when the two sets have the same covariance."""
FRECHET_SCALE: float = 100.0
"""``fid_shapes`` is the Fréchet distance times this, so that typical values read as 0.1..100."""


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


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = FRECHET_EPS) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` [N, D] and ``b`` [M, D]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), with eps·I added to both
    covariances (``FRECHET_EPS``). Needs N, M >= 2. Computed with symmetric eigendecompositions
    (tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2)), so no scipy."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs at least 2 rows in each set, got {len(a)} and {len(b)}")
    reg = eps * np.eye(a.shape[1])
    sa, sb = np.cov(a, rowvar=False) + reg, np.cov(b, rowvar=False) + reg
    ra = _psd_sqrt(sa)
    cross = np.trace(_psd_sqrt(ra @ sb @ ra))
    d = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)
    return max(d, 0.0)


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
    groups = np.asarray(groups)
    per_group = []
    for g in dict.fromkeys(groups.tolist()):
        c = classes[groups == g]
        if len(c) < 2:
            continue
        i, j = np.triu_indices(len(c), k=1)
        per_group.append((c[i] != c[j]).mean())
    return float(np.mean(per_group)) if per_group else None


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


def image_grid(images: np.ndarray, labels: Sequence[str], columns: int, scale: int = 4) -> Image.Image:
    """uint8 [N, H, W, 3] -> one PIL image, ``columns`` per row, each row labelled on the left."""
    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    label_w, pad = 230, 2
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = Image.new("RGB", (label_w + columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, columns)
        tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (label_w + c * cell_w, r * cell_h))
        if c == 0:
            draw.text((4, r * cell_h + cell_h // 2 - 6), labels[i][:38], fill=(0, 0, 0), font=font)
    return grid


def evaluate(model: FlowModel, cfg: EvalConfig, transformer=None, grid_path: str | Path | None = None
             ) -> dict[str, float]:
    """Sample the fixed pairs with ``transformer`` (default: the model's), score, write the grid."""
    prompts, seeds = eval_pairs(cfg)
    start = time.time()
    images = model.generate(prompts, seeds, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                            shift=cfg.shift, transformer=transformer, batch_size=cfg.batch_size)
    scores = shapes_scorer.score_batch(images, prompts)
    metrics = summarize(scores, prompts)
    metrics.update(held_out_image_metrics(images, prompts, seeds))
    metrics["seconds"] = time.time() - start
    if grid_path is not None and cfg.grid_prompts:
        shown = cfg.grid_prompts * cfg.seeds_per_prompt
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        image_grid(images[:shown], prompts[:shown], cfg.seeds_per_prompt).save(grid_path)
    return metrics
