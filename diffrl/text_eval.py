"""The text world's own held-out metrics (docs/text_world.md, "Held-out metrics"), added by
``diffrl.evaluation`` to every evaluation of a ``text:*`` prompt set. None of them is optimized:

- ``ocr_exact`` / ``ocr_score``: tesseract's reading equals the word / 1 - normalised edit distance
  (the reward's engine, in-process); ``ocr_exact_sem`` the standard error of ``ocr_exact``;
- ``rapid_exact`` / ``rapid_score``: the same with RapidOCR (an ONNX-runtime engine, models inside its
  package), a second judge the training never saw (absent when it is not installed);
- ``fidelity`` / ``off_palette``: the fraction of pixels a render could have (the background, an ink
  colour, or an antialiased blend of the two) / its complement;
- ``background_clean``: the fraction of pixels of the top and bottom ``MARGIN_ROWS`` rows (never
  inked by a render) that are background;
- ``fid_text``: 100 x the Fréchet distance between hand-built features of the samples and of
  ground-truth renders of the same (prompt, seed) pairs;
- ``diversity`` / ``diversity_renders``: within a prompt, the mean fraction of pixels whose
  ink/background class differs between two seeds, of the samples / of the renders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import cv2
import numpy as np

from diffrl.image_stats import FRECHET_SCALE, frechet_distance, within_group_disagreement
from diffrl.models import text_world
from diffrl.reward_servers.scorers.ocr import OcrOptions, TesseractEngine, normalize, ocr_score

CLEAN_DISTANCE: float = 24.0
"""RGB distance (0..255 units) within which a pixel counts as background or ink-on-background."""
INK_DISTANCE: float = 48.0
"""RGB distance from the background beyond which a pixel counts as ink (diversity, features)."""
_BG = np.array(text_world.BACKGROUND, np.float64)
_INKS = np.array(list(text_world.INK_COLORS.values()), np.float64)


def segment_distance(images: np.ndarray) -> np.ndarray:
    """float [N, H, W]: each pixel's RGB distance to the nearest segment background -> ink colour
    (0 on every render: antialiased text is a blend of the two)."""
    rgb = np.asarray(images, np.float64)
    best = np.full(rgb.shape[:-1], np.inf)
    for ink in _INKS:
        d = ink - _BG
        t = np.clip(((rgb - _BG) @ d) / (d @ d), 0.0, 1.0)[..., None]
        np.minimum(best, np.linalg.norm(rgb - (_BG + t * d), axis=-1), out=best)
    return best


def ink_mask(images: np.ndarray) -> np.ndarray:
    """bool [N, H, W]: pixels farther than INK_DISTANCE from the background colour."""
    return np.linalg.norm(np.asarray(images, np.float64) - _BG, axis=-1) > INK_DISTANCE


def fidelity(images: np.ndarray) -> float:
    """Mean fraction of pixels within CLEAN_DISTANCE of a background-ink blend (1.0 on renders)."""
    return float((segment_distance(images) <= CLEAN_DISTANCE).mean())


def background_clean(images: np.ndarray) -> float:
    """Mean fraction of the margin rows' pixels within CLEAN_DISTANCE of the background (1.0 on renders)."""
    m = text_world.MARGIN_ROWS
    margins = np.concatenate([images[:, :m], images[:, -m:]], axis=1).astype(np.float64)
    return float((np.linalg.norm(margins - _BG, axis=-1) <= CLEAN_DISTANCE).mean())


def text_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float64 [N, 20]: ink fraction; ink per vertical band (8) and per
    horizontal band (4) of the image; fractions of pixels farther than 16/32/64 from any
    background-ink blend; edge energy; the mean colour of the ink (3); ink components / 8."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    ink = ink_mask(images)
    cols = ink.reshape(n, h, 8, w // 8).mean(axis=(1, 3))
    rows = ink.reshape(n, 4, h // 4, w).mean(axis=(2, 3))
    dist = segment_distance(images)
    purity = np.stack([(dist > t).mean(axis=(1, 2)) for t in (16.0, 32.0, 64.0)], axis=1)
    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    energy = (np.abs(np.diff(luma, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(luma, axis=2)).mean(axis=(1, 2))) / 510
    colour = np.zeros((n, 3))
    parts = np.zeros(n)
    for i in range(n):
        if ink[i].any():
            colour[i] = images[i][ink[i]].mean(axis=0) / 255.0
        parts[i] = (cv2.connectedComponents(ink[i].astype(np.uint8), connectivity=8)[0] - 1) / 8.0
    return np.concatenate([ink.mean(axis=(1, 2))[:, None], cols, rows, purity, energy[:, None], colour,
                           parts[:, None]], axis=1)


def diversity(images: np.ndarray, groups: np.ndarray) -> float | None:
    """Within-group mean fraction of pixels whose ink/background class differs (None: no pairs)."""
    return within_group_disagreement(ink_mask(images).reshape(len(images), -1), groups)


@cache
def _tesseract() -> TesseractEngine:
    return TesseractEngine(OcrOptions())


def read_text(images: Sequence[np.ndarray]) -> list[str]:
    """Tesseract's reading of each image (the reward's engine and settings)."""
    return _tesseract().read(list(images))


@cache
def _rapidocr():
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        return None
    return RapidOCR()


def rapid_read(images: Sequence[np.ndarray]) -> list[str] | None:
    """RapidOCR's reading of each image (recognition only, enlarged like tesseract's input); None
    when rapidocr_onnxruntime is not installed."""
    engine = _rapidocr()
    if engine is None:
        return None
    texts = []
    for im in images:
        side = 4 * im.shape[0]
        big = cv2.resize(np.ascontiguousarray(im), (side, side), interpolation=cv2.INTER_CUBIC)
        result, _ = engine(big, use_det=False, use_cls=False, use_rec=True)
        texts.append(result[0][0] if result else "")
    return texts


def _reading_metrics(prefix: str, reads: Sequence[str], words: Sequence[str]) -> dict[str, float]:
    exact = np.array([normalize(r) == w for r, w in zip(reads, words)], np.float64)
    score = np.array([ocr_score(r, w, "normalized")[0] for r, w in zip(reads, words)])
    sem = math.sqrt(exact.mean() * (1 - exact.mean()) / len(exact)) if len(exact) > 1 else 0.0
    return {f"{prefix}_exact": float(exact.mean()), f"{prefix}_exact_sem": sem, f"{prefix}_score": float(score.mean())}


def text_world_metrics(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int],
                       judge: bool = True) -> dict[str, float]:
    """All the text world's held-out metrics (module docstring) of ``images`` sampled for the fixed
    (prompt, seed) pairs; ``judge``: also read them with RapidOCR."""
    images = np.asarray(images)
    words = [text_world.parse_prompt(p) for p in prompts]
    metrics = _reading_metrics("ocr", _tesseract().read(list(images)), words)
    reads = rapid_read(list(images)) if judge else None
    if reads is not None:
        metrics.update(_reading_metrics("rapid", reads, words))
    metrics["fidelity"] = fidelity(images)
    metrics["off_palette"] = 1.0 - metrics["fidelity"]
    metrics["background_clean"] = background_clean(images)
    if len(images) >= 2:
        renders = text_world.render_batch(prompts, seeds)
        metrics["fid_text"] = FRECHET_SCALE * frechet_distance(text_features(images), text_features(renders))
        groups = np.unique(np.asarray(prompts), return_inverse=True)[1]
        div = diversity(images, groups)
        if div is not None:
            metrics["diversity"] = div
            metrics["diversity_renders"] = diversity(renders, groups)
    return metrics
