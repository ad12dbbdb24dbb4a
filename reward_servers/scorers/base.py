"""The small interface every reward scorer implements.

A scorer turns decoded images (uint8 [H, W, 3] RGB, sizes may differ within a batch), their
prompts and per-item metadata into one float per image plus optional named per-item details.
It is a plain object: no HTTP, no asyncio; the server runs it in a thread pool, tests and the
benchmark call it directly.

Contract:

- ``check_item(prompt, metadata)`` is called for every item before any decoding; it returns a
  message when the item cannot be scored by this scorer (no quoted text for OCR, no ``count`` for
  the detector, a prompt outside the shapes grammar). The server refuses such a request with 422.
- ``score_batch`` returns ``(scores, details)``: ``len(scores) == len(images)``, and every list in
  ``details`` is as long. It may raise for a bad batch; the server then scores the items one by one
  so that only the failing items get ``errors[i]`` (never a 0 in their place). A non-finite score is
  reported as an item error too.
- Options are a dataclass ``Options`` (attribute docstrings, ``validate()``), so the CLI lists and
  type-checks them (``scorer.KEY=VALUE``).
- ``pass_threshold``: a score at or above it counts as a pass (e.g. OCR's exact text); None when
  the reward defines no pass rate. Reported by ``/v1/info``.

A class outside this package is served by its import path, ``diffrl reward serve --scorer
pkg.module:Class`` (docs/custom_rewards.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

Details = dict[str, list[float]]


@dataclass
class NoOptions:
    """This scorer has no options."""


class Scorer(ABC):
    """Base class of reward scorers. Subclasses set the class attributes and implement
    ``score_batch`` (and ``check_item`` when they need the prompt or metadata)."""

    name: str = ""
    """Reward name: /v1/info, metrics labels (the registry key of built-ins; the onnx scorer lets the
    user choose it; ``diffrl reward serve --name`` overrides it)."""
    version: str = "1"
    """Changes whenever scores for the same input could change."""
    min_score: float = 0.0
    max_score: float = 1.0
    higher_is_better: bool = True
    description: str = ""
    pass_threshold: float | None = None
    """A score at or above this counts as a pass; None: the reward defines no pass rate."""
    needs_prompt: bool = False
    """True if the prompt text is required (empty prompts are refused with 422)."""
    prefers_batching: bool = False
    """True if one call on N images is much cheaper than N calls (micro-batching helps)."""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        """Built with its validated ``Options`` instance (None: the defaults), kept as ``self.options``."""
        self.options = options if options is not None else self.Options()

    def check_item(self, prompt: str, metadata: Mapping[str, str]) -> str | None:
        """A message if this item cannot be scored (refused before decoding), else None."""
        if self.needs_prompt and not prompt.strip():
            return "prompt text is required by this reward"
        return None

    @abstractmethod
    def score_batch(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, str]],
    ) -> tuple[list[float], Details]:
        """Scores and per-item details of uint8 [H, W, 3] RGB images."""

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "min_score": float(self.min_score),
            "max_score": float(self.max_score),
            "higher_is_better": bool(self.higher_is_better),
            "description": self.description,
            "pass_threshold": None if self.pass_threshold is None else float(self.pass_threshold),
        }

    def close(self) -> None:
        """Release resources (subprocesses, sessions)."""


def check_lengths(images: Sequence[Any], prompts: Sequence[str], metadata: Sequence[Mapping[str, str]]) -> None:
    if not len(images) == len(prompts) == len(metadata):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata maps: "
                         "expected equal lengths")
