"""GenEval-like detector and scorer for the shapes world (``models.shapes_world``).

Detection (pure OpenCV/numpy, no learning):

1. Pixel classes. For each pixel, chroma = max(R,G,B) - min(R,G,B) and hue (OpenCV HSV).
   The hue class is the palette colour whose hue is nearest, if within ``HUE_TOL`` (hue is unchanged
   by blending with the near-white background, so blurred edges keep their colour), else
   off-palette. A pixel takes its hue class if its chroma reaches that class's threshold (palette
   colours: halfway from the background's chroma to the colour's, ``CHROMA_FRACTION``; off-palette:
   ``CHROMA_MIN``). Other pixels are background, except dark unsaturated ones (value <
   ``VALUE_MIN_BG`` and chroma < ``CHROMA_MIN``: black / grey ink), which are off-palette.
2. Objects. 8-connected components of each class separately; components smaller than
   ``MIN_AREA`` pixels (stray pixels, noise) are ignored. An off-palette component is an object of
   colour ``OFF_PALETTE`` ("other"), which never matches a prompt (so it is an extra object).
3. Shape from the component's pixels: skew = skewness of the pixel rows (an upright triangle is
   bottom-heavy, skew about -0.5; circles and squares are symmetric, 0) and corner fill = the
   mean ink strength over the four 2x2 corner windows of its bounding box, trimmed of sparse edge
   rows/columns (``TRIM_FRACTION``: stray pixels glued to an edge) (square 1, circle
   <= 0.25), where ink strength is a pixel's chroma scaled from the background's (0) to its
   palette colour's (1), soft so that blur and noise at the corners average out. Triangle if skew <= ``TRIANGLE_SKEW``, else square if corner fill >=
   ``SQUARE_CORNER_FILL``, else circle.

Scoring a prompt with clauses (n_i, c_i, s_i) against the detected multiset D of (colour, shape)
(including off-palette objects), GenEval style, per clause i:

- count_i = 1 iff the number of detected objects of shape s_i equals the number the prompt asks for
  with shape s_i (n_i, plus the other clause's count if it has the same shape). Colour ignored.
- color_i = 1 iff at least one detected object is (c_i, s_i), and every detected object of shape s_i
  has a colour the prompt gives to shape s_i. Count ignored.
- shape_i = 1 iff at least one detected object is (c_i, s_i), and every detected object of colour
  c_i has a shape the prompt gives to colour c_i. Count ignored.

``count``, ``color`` and ``shape`` are the means over clauses. ``strict`` = 1 iff D equals the
prompt's multiset exactly (every clause right, nothing missing, no extra object of any kind,
off-palette included); strict implies count = color = shape = 1. ``jaccard`` = |D ∩ P| / |D ∪ P|
(multisets; 0 when both are empty). ``partial`` = (count + color + shape + jaccard) / 4, a dense
reward in [0, 1] that is 1 exactly when strict is 1 (the Jaccard term penalises extra and missing
objects). ``extra`` = |D - P|, ``missing`` = |P - D|.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

import cv2
import numpy as np

from models.shapes_world import BACKGROUND, COLORS, parse_prompt

OFF_PALETTE = "other"
"""Colour name of detected objects whose pixels match no palette colour."""
CHROMA_MIN = 64
"""Minimum max-min channel spread (0..255) for an off-palette-hue pixel to count as ink."""
CHROMA_FRACTION = 0.5
"""A pixel of a palette hue is that colour if its chroma is at least this fraction of the way from
the background's chroma to the palette colour's (the half-maximum contour, which a symmetric blur
leaves in place); otherwise it is background."""
VALUE_MIN_BG = 160
"""Minimum brightness (max channel) for an unsaturated pixel to count as background."""
HUE_TOL = 14
"""Maximum hue distance (OpenCV units, 0..180 circular; 14 = 28 degrees) to a palette hue."""
MIN_AREA = 12
"""Components smaller than this many pixels are ignored (the smallest rendered object has 31)."""
SQUARE_CORNER_FILL = 0.5
"""A non-triangle is a square if the mean ink strength of the 16 pixels in the four 2x2 corner
windows of its bounding box reaches this (square: 1, rendered circle: <= 0.25)."""
TRIM_FRACTION = 0.3
"""Before the corner test, bounding-box edge rows/columns holding fewer than this fraction of the
fullest row's/column's pixels are trimmed (rendered circles' edge rows hold >= 0.4)."""
TRIANGLE_SKEW = -0.2
"""A component whose vertical pixel distribution has skewness <= this is a triangle (upright
triangle: about -0.57; circle and square: 0)."""

_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_NUM_CLASSES = len(_COLOR_NAMES) + 2  # 0 background, 1..K palette, K+1 off-palette
_OFF = len(_COLOR_NAMES) + 1
_CLASS_NAMES = ("background",) + _COLOR_NAMES + (OFF_PALETTE,)


def _palette_hues() -> np.ndarray:
    rgb = np.array([[COLORS[c] for c in _COLOR_NAMES]], dtype=np.uint8)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[0, :, 0].astype(np.int32)


def _hue_lut() -> np.ndarray:
    """hue (0..255, OpenCV uses 0..179) -> class index (palette 1..K or off-palette)."""
    hues = _palette_hues()
    h = np.arange(256, dtype=np.int32)[:, None]
    d = np.abs(h - hues[None, :])
    d = np.minimum(d, 180 - d)
    best = d.argmin(axis=1)
    lut = np.where(d[np.arange(256), best] <= HUE_TOL, best + 1, _OFF).astype(np.uint8)
    return lut


def _chroma_thresholds() -> np.ndarray:
    """class index -> minimum chroma (index 0 unused, off-palette uses CHROMA_MIN)."""
    bg = max(BACKGROUND) - min(BACKGROUND)
    thr = [0] + [
        int(round(bg + CHROMA_FRACTION * (max(COLORS[c]) - min(COLORS[c]) - bg))) for c in _COLOR_NAMES
    ] + [CHROMA_MIN]
    return np.array(thr, dtype=np.uint8)


_HUE_LUT = _hue_lut()
_CHROMA_THR = _chroma_thresholds()
_BG_CHROMA = float(max(BACKGROUND) - min(BACKGROUND))
# class index -> 1 / (palette chroma - background chroma); 0 for background / off-palette.
_INV_SPAN = np.array(
    [0.0] + [1.0 / (max(COLORS[c]) - min(COLORS[c]) - _BG_CHROMA) for c in _COLOR_NAMES] + [0.0],
    dtype=np.float32,
)


def _classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [..., H, W, 3] RGB -> (classes, hue classes, ink strength), each [..., H, W].

    classes: 0 background, 1..K palette colours in ``COLORS`` order, K+1 off-palette.
    hue classes: the nearest palette hue class (or K+1) regardless of chroma.
    ink strength: float32 in [0, 1], how far a pixel's chroma is from the background's towards its
    hue class's palette colour (0 for off-palette hues)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [..., H, W, 3] RGB, got {images.dtype} {images.shape}")
    lead, (h, w) = images.shape[:-3], images.shape[-3:-1]
    flat = np.ascontiguousarray(images.reshape(-1, w, 3))  # stack images vertically: one cvtColor
    hsv = cv2.cvtColor(flat, cv2.COLOR_RGB2HSV)
    value = hsv[..., 2]
    chroma = flat.min(axis=-1)
    np.subtract(value, chroma, out=chroma)  # max - min
    hue_class = _HUE_LUT[hsv[..., 0]]
    inked = chroma >= _CHROMA_THR[hue_class]
    classes = np.where(
        inked,
        hue_class,
        np.where((value >= VALUE_MIN_BG) | (chroma >= CHROMA_MIN), np.uint8(0), np.uint8(_OFF)),
    ).astype(np.uint8)
    strength = np.clip((chroma.astype(np.float32) - _BG_CHROMA) * _INV_SPAN[hue_class], 0.0, 1.0)
    shape = (*lead, h, w)
    return classes.reshape(shape), hue_class.reshape(shape), strength.reshape(shape)


def classify_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] RGB -> uint8 [..., H, W] class map (0 background, 1..K palette colours
    in ``COLORS`` order, K+1 off-palette)."""
    return _classify(images)[0]


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    color: str
    cx: float
    cy: float
    area: int


def _corner_fill(component: np.ndarray) -> float:
    """Mean of the four 2x2 corner windows of a component's bounding-box crop (ink strength in
    [0, 1], or a bool mask): 1 for a square, <= 0.25 for a rendered circle."""
    if component.shape[0] < 4 or component.shape[1] < 4:
        return float(component.mean())
    c = component
    return (c[:2, :2].sum() + c[:2, -2:].sum() + c[-2:, :2].sum() + c[-2:, -2:].sum()) / 16.0


def _trim(counts: np.ndarray) -> slice:
    """Slice dropping leading/trailing rows (or columns) whose pixel count is below
    ``TRIM_FRACTION`` of the largest (stray pixels glued to an object's edge)."""
    keep = np.flatnonzero(counts >= TRIM_FRACTION * counts.max())
    return slice(int(keep[0]), int(keep[-1]) + 1)


def _core_crop(labels, hue_class, strength, k, j, x, y, w, h) -> np.ndarray:
    """Ink strength (bool mask for off-palette objects) over component j's trimmed bounding box."""
    comp = labels[y:y + h, x:x + w] == j
    rs, cs = _trim(comp.sum(axis=1)), _trim(comp.sum(axis=0))
    if k == _OFF:
        return comp[rs, cs]
    return np.where(hue_class[y:y + h, x:x + w][rs, cs] == k, strength[y:y + h, x:x + w][rs, cs], 0.0)


_ROWS: dict[tuple[int, int], np.ndarray] = {}


def _row_index(h: int, w: int) -> np.ndarray:
    r = _ROWS.get((h, w))
    if r is None:
        r = _ROWS[(h, w)] = np.repeat(np.arange(h, dtype=np.float64), w)
    return r


def _detect_classes(classes: np.ndarray, hue_class: np.ndarray, strength: np.ndarray) -> list[DetectedObject]:
    out: list[DetectedObject] = []
    present = np.bincount(classes.ravel(), minlength=_NUM_CLASSES)
    rows = _row_index(*classes.shape)
    for k in range(1, _NUM_CLASSES):
        if present[k] < MIN_AREA:
            continue
        mask = (classes == k).view(np.uint8)
        n, labels, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
        areas = stats[:, cv2.CC_STAT_AREA]
        keep = [j for j in range(1, n) if areas[j] >= MIN_AREA]
        if not keep:
            continue
        # Vertical skewness of each component's pixel rows (third standardised central moment).
        lab = labels.ravel()
        dy = rows - cents[lab, 1]
        dy2 = dy * dy
        m2 = np.bincount(lab, weights=dy2, minlength=n)
        m3 = np.bincount(lab, weights=dy2 * dy, minlength=n)
        for j in keep:
            x, y, w, h, area = (int(v) for v in stats[j])
            var = m2[j] / area
            skew = (m3[j] / area) / (var ** 1.5) if var > 0 else 0.0
            if skew <= TRIANGLE_SKEW:
                shape = "triangle"
            elif _corner_fill(_core_crop(labels, hue_class, strength, k, j, x, y, w, h)) >= SQUARE_CORNER_FILL:
                shape = "square"
            else:
                shape = "circle"
            out.append(DetectedObject(shape, _CLASS_NAMES[k], float(cents[j, 0]), float(cents[j, 1]), area))
    return out


def detect(image: np.ndarray) -> list[DetectedObject]:
    """Objects in one uint8 [H, W, 3] RGB image (any size; the shapes world uses 32x32)."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected one uint8 [H, W, 3] RGB image, got shape {image.shape}")
    return _detect_classes(*_classify(image))


@dataclass(frozen=True)
class ShapesScore:
    strict: float
    """1.0 iff the detected (colour, shape) multiset equals the prompt's (GenEval strict)."""
    count: float
    """Fraction of clauses whose object count (of the clause's shape) is right."""
    color: float
    """Fraction of clauses whose colour is right."""
    shape: float
    """Fraction of clauses whose shape is right."""
    partial: float
    """(count + color + shape + jaccard) / 4 in [0, 1]; 1 iff strict."""
    num_objects: int
    """Number of detected objects (off-palette included)."""
    jaccard: float = 0.0
    """Multiset intersection-over-union of detected vs prompted (colour, shape)."""
    extra: int = 0
    """Detected objects not asked for (multiset difference detected - prompt)."""
    missing: int = 0
    """Asked-for objects not detected (multiset difference prompt - detected)."""

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def score_objects(objects: Sequence[DetectedObject], prompt: str) -> ShapesScore:
    """Score already-detected objects against ``prompt`` (definitions in the module docstring)."""
    clauses = parse_prompt(prompt)
    want = Counter({(c.color, c.shape): c.count for c in clauses})
    got = Counter((o.color, o.shape) for o in objects)
    n_by_shape = Counter(o.shape for o in objects)
    colors_for_shape: dict[str, set[str]] = {}
    shapes_for_color: dict[str, set[str]] = {}
    want_by_shape: Counter = Counter()
    for c in clauses:
        colors_for_shape.setdefault(c.shape, set()).add(c.color)
        shapes_for_color.setdefault(c.color, set()).add(c.shape)
        want_by_shape[c.shape] += c.count
    count_ok = color_ok = shape_ok = 0
    for c in clauses:
        present = got[(c.color, c.shape)] > 0
        count_ok += n_by_shape[c.shape] == want_by_shape[c.shape]
        color_ok += present and all(
            col in colors_for_shape[c.shape] for (col, sh) in got if sh == c.shape
        )
        shape_ok += present and all(
            sh in shapes_for_color[c.color] for (col, sh) in got if col == c.color
        )
    k = float(len(clauses))
    inter = sum((got & want).values())
    union = sum((got | want).values())
    jaccard = inter / union if union else 0.0
    strict = float(got == want)
    count, color, shape = count_ok / k, color_ok / k, shape_ok / k
    return ShapesScore(
        strict=strict,
        count=count,
        color=color,
        shape=shape,
        partial=(count + color + shape + jaccard) / 4.0,
        num_objects=len(objects),
        jaccard=jaccard,
        extra=sum((got - want).values()),
        missing=sum((want - got).values()),
    )


def score(image: np.ndarray, prompt: str) -> ShapesScore:
    """Detect objects in ``image`` (uint8 [H, W, 3] RGB) and score them against ``prompt``.
    Raises ValueError if the prompt is outside the shapes-world grammar."""
    return score_objects(detect(image), prompt)


def score_batch(images: np.ndarray, prompts: Sequence[str]) -> list[ShapesScore]:
    """Score uint8 [B, H, W, 3] RGB images against their prompts (one colour pass for the batch)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected uint8 [B, H, W, 3] RGB images, got shape {images.shape}")
    if len(images) != len(prompts):
        raise ValueError(f"score_batch: {len(images)} images but {len(prompts)} prompts")
    classes, hue_class, strength = _classify(images)
    return [
        score_objects(_detect_classes(classes[i], hue_class[i], strength[i]), p) for i, p in enumerate(prompts)
    ]
