"""GenEval-like detector and scorer for the shapes world (``diffrl.models.shapes_world``).

Detection (pure OpenCV/numpy, no learning):

1. Pixel classes. For each pixel, chroma = max(R,G,B) - min(R,G,B) and hue (OpenCV HSV).
   The hue class is the palette colour whose hue is nearest, if within ``HUE_TOL`` (hue is unchanged
   by blending with the near-white background, so blurred edges keep their colour), else
   off-palette. A pixel takes its hue class if its chroma reaches that class's threshold (palette
   colours: halfway from the background's chroma to the colour's, ``CHROMA_FRACTION``; off-palette:
   ``CHROMA_MIN``). Other pixels are background if bright (value = max channel >= ``VALUE_MIN_BG``;
   blends of any palette colour with the background are), else off-palette (black, grey, brown,
   dark or dull versions of palette colours).
2. Objects. 8-connected components of each class separately; components smaller than
   ``MIN_AREA`` pixels (stray pixels, noise) are ignored. An off-palette component is an object of
   colour ``OFF_PALETTE`` ("other"), which never matches a prompt (so it is an extra object).
   (Implementation: one OpenCV labelling of all inked pixels of a whole batch, stacked with zero
   gutters; images where a component mixes colour classes are relabelled one class at a time.)
3. Shape from the component's moments. skew = skewness of its pixel rows: an upright triangle is
   bottom-heavy (-0.50 to -0.55), circles and squares are symmetric (0); triangle if skew <=
   ``TRIANGLE_SKEW``. Otherwise cross = E[dx^2 dy^2] / (E[dx^2] E[dy^2]) about the centroid, 1 for
   an axis-aligned square (x and y independent) and 2/3 for a disc; it is averaged over two
   weightings, the component's binary mask, and the "ink strength" (chroma scaled from the
   background's, 0, to its palette colour's, 1) of its pixels plus the unlabelled pixels
   8-adjacent to it that have its hue; they fail in opposite ways (stray pixels vs. blurred
   corners). Square if that mean >= ``SQUARE_CROSS``, else circle.

Measured on renders of random prompts (tests/test_shapes_detector.py): strict accuracy 1.0 on
clean renders and under Gaussian blur sigma <= 1.0 px or additive noise sigma <= 20 (0..255);
about 0.99 under blur 1.0 + noise 10; errors start with 7-px triangles under heavy blur.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import cv2
import numpy as np

from diffrl.models.shapes_world import BACKGROUND, COLORS, Clause, parse_prompt

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
SQUARE_CROSS = 0.84
"""A non-triangle is a square if its normalised cross moment reaches this (square: 1, disc: 0.67;
rendered circles 0.55-0.70)."""
TRIANGLE_SKEW = -0.2
"""A component whose vertical pixel distribution has skewness <= this is a triangle (upright
triangles: -0.50 to -0.55; circles and squares: 0)."""

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
    d = np.abs((h - hues[None, :] + 90) % 180 - 90)  # circular distance, period 180
    best = d.argmin(axis=1)
    lut = np.where(d[np.arange(256), best] <= HUE_TOL, best + 1, _OFF).astype(np.uint8)
    return lut


def _chroma_thresholds() -> np.ndarray:
    """class index -> minimum chroma (index 0 unused, off-palette uses CHROMA_MIN)."""
    bg = max(BACKGROUND) - min(BACKGROUND)
    thr = [0] + [
        round(bg + CHROMA_FRACTION * (max(COLORS[c]) - min(COLORS[c]) - bg)) for c in _COLOR_NAMES
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
        np.where(value >= VALUE_MIN_BG, np.uint8(0), np.uint8(_OFF)),
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


_SHAPE_NAMES = ("circle", "square", "triangle")
_DILATE_KERNEL = np.ones((3, 3), np.uint8)
_CHUNK = 256
"""Images per connected-components call in ``detect_batch`` (bounds temporary memory)."""


def _tile(maps: np.ndarray, ncols: int, dtype) -> np.ndarray:
    """[B, H, W] per-image maps -> [B*(H+1), ncols*(W+1)] with every image repeated in each tile
    column and a zero gutter row/column after each tile (so 8-connected components never cross)."""
    b, h, w = maps.shape
    out = np.zeros((b, h + 1, ncols, w + 1), dtype=dtype)
    out[:, :h, :, :w] = maps[:, :, None, :]
    return out.reshape(b * (h + 1), ncols * (w + 1))


def _analyse(
    labels: np.ndarray, stats: np.ndarray, cents: np.ndarray, keep: np.ndarray, comp_class: np.ndarray,
    hue_big: np.ndarray, strength_big: np.ndarray, th: int, tw: int,
) -> list[tuple[int, DetectedObject]]:
    """Shapes of the kept components of a tiled label image -> [(tile row, object)]."""
    n = len(stats)
    ncols = labels.shape[1]
    areas = stats[:, cv2.CC_STAT_AREA]
    # Central moments of every component at once, over labelled pixels only.
    flat = labels.ravel()
    fg = np.flatnonzero(flat)
    lab = flat[fg]
    dy = (fg // ncols).astype(np.float64) - cents[lab, 1]
    dx = (fg % ncols).astype(np.float64) - cents[lab, 0]
    dy2, dx2 = dy * dy, dx * dx
    area = areas[keep].astype(np.float64)
    var_y = np.bincount(lab, weights=dy2, minlength=n)[keep] / area
    var_x = np.bincount(lab, weights=dx2, minlength=n)[keep] / area
    m3 = np.bincount(lab, weights=dy2 * dy, minlength=n)[keep] / area
    m22 = np.bincount(lab, weights=dx2 * dy2, minlength=n)[keep] / area
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(var_y > 0, m3 / np.maximum(var_y, 1e-12) ** 1.5, 0.0)
        hard = np.where((var_x > 0) & (var_y > 0), m22 / np.maximum(var_x * var_y, 1e-12), 1.0)
    # Ink-strength-weighted cross moment: a component owns its own pixels plus the unlabelled
    # pixels 8-adjacent to it (where a blurred square keeps its corners), each weighted by its ink
    # strength if its hue is the component's colour.
    near = cv2.dilate(labels.astype(np.float32), _DILATE_KERNEL)
    owner = np.where(labels > 0, labels, near.astype(np.int32)).ravel()
    sel = np.flatnonzero(owner)
    own = owner[sel]
    sw = np.where(hue_big.ravel()[sel] == comp_class[own], strength_big.ravel()[sel], 0.0).astype(np.float64)
    ry = (sel // ncols).astype(np.float64) - cents[own, 1]  # local coordinates, small numbers
    rx = (sel % ncols).astype(np.float64) - cents[own, 0]
    s0 = np.bincount(own, weights=sw, minlength=n)
    safe0 = np.where(s0 > 0, s0, 1.0)
    ry -= (np.bincount(own, weights=sw * ry, minlength=n) / safe0)[own]
    rx -= (np.bincount(own, weights=sw * rx, minlength=n) / safe0)[own]
    ry *= ry
    rx *= rx
    s_y2 = np.bincount(own, weights=sw * ry, minlength=n)[keep]
    s_x2 = np.bincount(own, weights=sw * rx, minlength=n)[keep]
    s_22 = np.bincount(own, weights=sw * rx * ry, minlength=n)[keep]
    s0 = s0[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        soft = np.where((s_y2 > 0) & (s_x2 > 0), s_22 * s0 / np.maximum(s_y2 * s_x2, 1e-12), 1.0)
    cls = comp_class[keep]
    cross = np.where(cls == _OFF, hard, (hard + soft) / 2.0)
    shape_of = np.where(skew <= TRIANGLE_SKEW, 2, np.where(cross >= SQUARE_CROSS, 1, 0))
    tile_row = stats[keep, cv2.CC_STAT_TOP] // th
    # Centroids in image coordinates from exact integer sums, so they do not depend on the batch.
    cx = np.bincount(lab, weights=(fg % ncols) % tw, minlength=n)[keep] / area
    cy = np.bincount(lab, weights=(fg // ncols) % th, minlength=n)[keep] / area
    return [
        (int(tile_row[i]), DetectedObject(
            _SHAPE_NAMES[shape_of[i]], _CLASS_NAMES[cls[i]], float(cx[i]), float(cy[i]), int(areas[j])))
        for i, j in enumerate(keep.tolist())
    ]


def _detect_chunk(images: np.ndarray, exact: bool = False) -> list[list[DetectedObject]]:
    """Detect objects in uint8 [B, H, W, 3] images with (usually) one connected-components call.

    Fast path: the inked pixels of all images, stacked with a zero gutter, are labelled at once;
    a kept component whose pixels span several colour classes (objects of different colours
    touching) sends its image to the exact path, which labels each class separately (one tile
    column per class). ``exact=True`` sends every image there (for tests)."""
    classes, hue_class, strength = _classify(images)
    b, height, width = classes.shape
    th, tw = height + 1, width + 1
    out: list[list[DetectedObject]] = [[] for _ in range(b)]

    if exact:
        redo = np.arange(b)
    else:
        redo = _fast_path(classes, hue_class, strength, out)
    if redo.size:  # exact path: one tile column per class 1..K+1
        nk = _NUM_CLASSES - 1
        sub = classes[redo]
        cls_big = _tile(sub, nk, np.uint8)
        col_class = np.repeat(np.arange(1, nk + 1, dtype=np.uint8), tw)[None, :]
        mask = (cls_big == col_class) & (cls_big > 0)
        n, labels, stats, cents = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= MIN_AREA)
        keep = keep[keep > 0]
        if keep.size:
            comp_class = np.zeros(n, dtype=np.uint8)
            comp_class[1:] = stats[1:, cv2.CC_STAT_LEFT] // tw + 1
            for row, obj in _analyse(labels, stats, cents, keep, comp_class, _tile(hue_class[redo], nk, np.uint8),
                                     _tile(strength[redo], nk, np.float32), th, tw):
                out[int(redo[row])].append(obj)
    for objs in out:  # deterministic order, independent of the batch and the labelling
        objs.sort(key=lambda o: (o.cy, o.cx, o.color, o.shape, o.area))
    return out


def _fast_path(
    classes: np.ndarray, hue_class: np.ndarray, strength: np.ndarray, out: list[list[DetectedObject]]
) -> np.ndarray:
    """Label all inked pixels at once; append objects of images whose kept components are each of
    one colour class to ``out``; return the indices of the other images."""
    th, tw = classes.shape[1] + 1, classes.shape[2] + 1
    cls_big = _tile(classes, 1, np.uint8)
    n, labels, stats, cents = cv2.connectedComponentsWithStats((cls_big > 0).view(np.uint8), connectivity=8)
    hist = np.bincount(labels.ravel() * _NUM_CLASSES + cls_big.ravel(), minlength=n * _NUM_CLASSES)
    hist = hist.reshape(n, _NUM_CLASSES)
    keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= MIN_AREA)
    keep = keep[keep > 0]
    impure = (hist[keep] > 0).sum(axis=1) > 1
    redo = np.unique(stats[keep[impure], cv2.CC_STAT_TOP] // th)
    if redo.size:
        keep = keep[~np.isin(stats[keep, cv2.CC_STAT_TOP] // th, redo)]
    if keep.size:
        comp_class = hist.argmax(axis=1).astype(np.uint8)
        for img, obj in _analyse(labels, stats, cents, keep, comp_class, _tile(hue_class, 1, np.uint8),
                                 _tile(strength, 1, np.float32), th, tw):
            out[img].append(obj)
    return redo


def detect_batch(images: np.ndarray) -> list[list[DetectedObject]]:
    """Objects in each of uint8 [B, H, W, 3] RGB images (each list as ``detect`` returns it)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected uint8 [B, H, W, 3] RGB images, got shape {images.shape}")
    out: list[list[DetectedObject]] = []
    for start in range(0, len(images), _CHUNK):
        out.extend(_detect_chunk(images[start:start + _CHUNK]))
    return out


def detect(image: np.ndarray) -> list[DetectedObject]:
    """Objects in one uint8 [H, W, 3] RGB image (any size; the shapes world uses 32x32), sorted by
    centroid (row-major). (cx, cy) is the mean pixel index (column, row) of the component."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected one uint8 [H, W, 3] RGB image, got shape {image.shape}")
    return _detect_chunk(image[None])[0]


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


@dataclass(frozen=True)
class _PromptSpec:
    clauses: tuple[Clause, ...]
    want: Counter
    colors_for_shape: dict[str, frozenset[str]]
    shapes_for_color: dict[str, frozenset[str]]
    want_by_shape: Counter


@lru_cache(maxsize=4096)
def _spec(prompt: str) -> _PromptSpec:
    clauses = tuple(parse_prompt(prompt))
    colors_for_shape: dict[str, set[str]] = {}
    shapes_for_color: dict[str, set[str]] = {}
    want_by_shape: Counter = Counter()
    for c in clauses:
        colors_for_shape.setdefault(c.shape, set()).add(c.color)
        shapes_for_color.setdefault(c.color, set()).add(c.shape)
        want_by_shape[c.shape] += c.count
    return _PromptSpec(
        clauses,
        Counter({(c.color, c.shape): c.count for c in clauses}),
        {k: frozenset(v) for k, v in colors_for_shape.items()},
        {k: frozenset(v) for k, v in shapes_for_color.items()},
        want_by_shape,
    )


def score_objects(objects: Sequence[DetectedObject], prompt: str) -> ShapesScore:
    """Score already-detected objects against ``prompt`` (definitions in the module docstring).
    Raises ValueError if the prompt is outside the shapes-world grammar."""
    spec = _spec(prompt)
    want = spec.want
    got = Counter((o.color, o.shape) for o in objects)
    n_by_shape = Counter(o.shape for o in objects)
    count_ok = color_ok = shape_ok = 0
    for c in spec.clauses:
        present = got[(c.color, c.shape)] > 0
        count_ok += n_by_shape[c.shape] == spec.want_by_shape[c.shape]
        color_ok += present and all(col in spec.colors_for_shape[c.shape] for (col, sh) in got if sh == c.shape)
        shape_ok += present and all(sh in spec.shapes_for_color[c.color] for (col, sh) in got if col == c.color)
    k = float(len(spec.clauses))
    inter = sum((got & want).values())
    union = sum((got | want).values())
    jaccard = inter / union if union else 0.0
    count, color, shape = count_ok / k, color_ok / k, shape_ok / k
    return ShapesScore(
        strict=float(got == want),
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
    return [score_objects(objs, p) for objs, p in zip(detect_batch(images), prompts)]
