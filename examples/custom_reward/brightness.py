"""brightness: how close an image's mean brightness is to a target (a custom reward for diffrl).

Serve it with its folder on PYTHONPATH (docs/custom_rewards.md):
    PYTHONPATH=examples/custom_reward diffrl reward serve --scorer brightness:BrightnessScorer --port 8106
"""

from dataclasses import dataclass

import numpy as np

from diffrl.config import require
from diffrl.reward_servers.scorers.base import Scorer


@dataclass
class BrightnessOptions:
    target: float = 0.5
    """Wanted mean brightness in [0, 1] (0 black, 1 white); an item's metadata["brightness"] overrides it."""

    def validate(self) -> None:
        require(0.0 <= self.target <= 1.0, "target", "a float in [0, 1]", self.target)


def _target(value: str) -> float | None:
    try:
        t = float(value)
    except ValueError:
        return None
    return t if 0.0 <= t <= 1.0 else None


class BrightnessScorer(Scorer):
    name = "brightness"
    version = "1"
    description = "1 - |mean brightness - target| in [0, 1]; details: brightness"
    pass_threshold = 0.9  # within 0.1 of the target
    Options = BrightnessOptions  # built as BrightnessScorer(options): self.options

    def check_item(self, prompt, metadata):  # refused with 422 before any image is decoded
        if "brightness" in metadata and _target(metadata["brightness"]) is None:
            return f"metadata brightness must be a number in [0, 1], got {metadata['brightness']!r}"
        return None

    def score_batch(self, images, prompts, metadata):
        bright = [float(np.asarray(im, np.float32).mean()) / 255.0 for im in images]
        targets = [_target(m["brightness"]) if "brightness" in m else self.options.target for m in metadata]
        return [1.0 - abs(b - t) for b, t in zip(bright, targets)], {"brightness": bright}
