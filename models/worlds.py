"""The built-in worlds by name: each is a module with ``split_prompts(split)`` ('train', 'eval',
'all'), ``render_batch(prompts, seeds)`` (uint8 [B, H, W, 3] ground truth) and ``IMAGE_SIZE``."""

from __future__ import annotations

import importlib
from types import ModuleType

WORLDS: dict[str, str] = {
    "shapes": "diffrl.models.shapes_world",
    "text": "diffrl.models.text_world",
}
"""World name -> module (docs/shapes_world.md, docs/text_world.md)."""
DEFAULT_REWARDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "shapes": ("shapes", ()),
    "text": ("ocr", ("scorer.metric=normalized",)),
}
"""World name -> (reward name, server args) that scores its prompts by default (``diffrl eval``):
the detector on shapes, the OCR reward with normalised edit distance (as ocr-cpu.yaml trains) on text."""


def get_world(name: str) -> ModuleType:
    """The module of world ``name``; ValueError naming the known worlds otherwise."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r} (built-in: {', '.join(WORLDS)})")
    return importlib.import_module(WORLDS[name])
