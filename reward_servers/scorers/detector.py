"""``detector``: count objects with an OpenCV Haar cascade and compare with the count asked for.

The cascade is one shipped with opencv-python (``cv2.data.haarcascades``; default the frontal
face detector) or a cascade XML given by path. Each item needs ``metadata["count"]`` (key
configurable): the number of objects the image should contain (a non-negative integer; missing or
malformed -> 422).

Score with n detected and c asked for: 1 if n == c, else 1 - |n - c| / max(n, c), in [0, 1]
(e.g. c=2: n=1 -> 0.5, n=3 -> 0.667, n=0 -> 0; c=0: any n>0 -> 0). Details: ``detected``, ``expected``.
Pass threshold 1.0: exactly the count asked for.

Detection runs on the greyscale image (optionally histogram-equalised) with ``detectMultiScale``;
each thread has its own classifier (CascadeClassifier objects are not safe to share).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from diffrl.config import require
from diffrl.reward_servers.scorers.base import Details, Scorer, check_lengths


@dataclass
class DetectorOptions:
    cascade: str = "haarcascade_frontalface_default.xml"
    """A cascade file name in cv2.data.haarcascades (e.g. haarcascade_fullbody.xml) or a path."""
    count_key: str = "count"
    """Metadata key holding the expected number of objects."""
    scale_factor: float = 1.1
    """detectMultiScale: scale step between pyramid levels (> 1)."""
    min_neighbors: int = 5
    """detectMultiScale: overlapping detections needed to keep one (higher = fewer false positives)."""
    min_size: int = 24
    """Smallest object side in pixels."""
    equalize: bool = False
    """Equalise the grey histogram before detection."""
    max_count: int = 1000
    """Largest accepted metadata count."""

    def validate(self) -> None:
        require(self.scale_factor > 1.0, "scale_factor", "a float > 1", self.scale_factor)
        require(self.min_neighbors >= 0, "min_neighbors", "an int >= 0", self.min_neighbors)
        require(self.min_size >= 1, "min_size", "an int >= 1", self.min_size)
        require(bool(self.count_key), "count_key", "a non-empty metadata key", self.count_key)
        require(cascade_path(self.cascade).is_file(), "cascade",
                "a cascade in cv2.data.haarcascades or an existing XML path", self.cascade)


def cascade_path(name: str) -> Path:
    p = Path(name)
    if p.is_absolute() or os.sep in name:
        return p
    return Path(cv2.data.haarcascades) / name


def count_score(detected: int, expected: int) -> float:
    """1 if equal, else 1 - |detected - expected| / max(detected, expected)."""
    if detected == expected:
        return 1.0
    return 1.0 - abs(detected - expected) / max(detected, expected)


class DetectorScorer(Scorer):
    name = "detector"
    min_score = 0.0
    max_score = 1.0
    higher_is_better = True
    pass_threshold = 1.0  # exactly the count asked for
    Options = DetectorOptions

    def __init__(self, options: DetectorOptions | None = None):
        self.options = options or DetectorOptions()
        self.path = cascade_path(self.options.cascade)
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        self.version = f"1 ({self.path.name} {digest})"
        self._local = threading.local()
        self._classifier()  # fail at start-up on a bad cascade
        self.description = (f"objects found by the {self.path.name} Haar cascade vs metadata["
                            f"{self.options.count_key!r}]: 1 if equal else 1 - |n - c| / max(n, c); "
                            "details: detected, expected")

    def _classifier(self) -> cv2.CascadeClassifier:
        clf = getattr(self._local, "clf", None)
        if clf is None:
            clf = cv2.CascadeClassifier(str(self.path))
            if clf.empty():
                raise RuntimeError(f"could not load the cascade {self.path}")
            self._local.clf = clf
        return clf

    def _expected(self, metadata: Mapping[str, str]) -> int | str:
        key = self.options.count_key
        if key not in metadata:
            return f"metadata[{key!r}] (the expected number of objects) is required by this reward"
        raw = metadata[key].strip()
        if not raw.isdigit() or int(raw) > self.options.max_count:
            return f"metadata[{key!r}] must be an integer in [0, {self.options.max_count}], got {metadata[key]!r}"
        return int(raw)

    def check_item(self, prompt: str, metadata: Mapping[str, str]) -> str | None:
        c = self._expected(metadata)
        return c if isinstance(c, str) else None

    def detect(self, image: np.ndarray) -> np.ndarray:
        """[N, 4] boxes (x, y, w, h) found in a uint8 [H, W, 3] RGB image."""
        grey = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
        if self.options.equalize:
            grey = cv2.equalizeHist(grey)
        s = self.options.min_size
        if grey.shape[0] < s or grey.shape[1] < s:
            return np.zeros((0, 4), dtype=np.int32)
        boxes = self._classifier().detectMultiScale(
            grey, scaleFactor=self.options.scale_factor, minNeighbors=self.options.min_neighbors, minSize=(s, s))
        return np.asarray(boxes, dtype=np.int32).reshape(-1, 4)

    def score_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str],
                    metadata: Sequence[Mapping[str, str]]) -> tuple[list[float], Details]:
        check_lengths(images, prompts, metadata)
        expected = [self._expected(m) for m in metadata]
        problems = [c for c in expected if isinstance(c, str)]
        if problems:
            raise ValueError(problems[0])
        detected = [len(self.detect(im)) for im in images]
        scores = [count_score(n, c) for n, c in zip(detected, expected)]
        return scores, {"detected": [float(n) for n in detected], "expected": [float(c) for c in expected]}
