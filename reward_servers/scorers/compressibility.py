"""``compressibility``: JPEG size of the image, the classic DDPO reward.

Each image is saved by Pillow as JPEG at ``scorer.quality`` (95, as DDPO) and its size measured in
kB (1 kB = 1000 bytes, as DDPO). ``direction=compress`` (default): score = -kB (smaller files score
higher); ``direction=incompress``: score = +kB. Higher is better in both directions.

Range: unbounded in principle (the size grows with the pixel count); at quality 95 a JPEG takes
between about 0.5 kB (a flat image of any size: headers) and about 3 bytes/pixel (noise), so for
W x H images the score lies roughly in [-(3*W*H/1000), 0] (compress) or [0, 3*W*H/1000]
(incompress). ``/v1/info`` reports the bound of the one open side as infinite. Details: ``kb``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffrl.config import require
from diffrl.reward_servers.scorers.base import Details, Scorer, check_lengths


@dataclass
class CompressibilityOptions:
    direction: str = "compress"
    """compress: score = -kB (reward small JPEGs); incompress: score = +kB (reward detail)."""
    quality: int = 95
    """JPEG quality used to measure the size (DDPO: 95)."""

    def validate(self) -> None:
        require(self.direction in ("compress", "incompress"), "direction", "compress or incompress",
                self.direction)
        require(1 <= self.quality <= 100, "quality", "an int in [1, 100]", self.quality)


def jpeg_kb(image: np.ndarray, quality: int = 95) -> float:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class CompressibilityScorer(Scorer):
    name = "compressibility"
    version = "1"
    higher_is_better = True
    Options = CompressibilityOptions

    def __init__(self, options: CompressibilityOptions | None = None):
        self.options = options or CompressibilityOptions()
        self.sign = -1.0 if self.options.direction == "compress" else 1.0
        self.min_score, self.max_score = (-math.inf, 0.0) if self.sign < 0 else (0.0, math.inf)
        self.description = (f"JPEG (quality {self.options.quality}) size in kB, "
                            f"{'negated: smaller is better' if self.sign < 0 else 'larger is better'}; "
                            "details: kb")

    def score_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str],
                    metadata: Sequence[Mapping[str, str]]) -> tuple[list[float], Details]:
        check_lengths(images, prompts, metadata)
        kb = [jpeg_kb(im, self.options.quality) for im in images]
        return [self.sign * k for k in kb], {"kb": kb}
