"""``shapes``: the GenEval-like shapes-world reward, a Scorer over the detector in ``shapes.py``.

score = ``strict`` (1 iff the detected (colour, shape) multiset equals the prompt's) by default;
``scorer.score=partial`` gives the dense (count + color + shape + jaccard) / 4 instead (any of the
sub-scores can be chosen). Details per item: strict, partial, count, color, shape, jaccard,
num_objects. The prompt must be in the shapes-world grammar (else 422).

Pass threshold 1.0 whichever sub-score is the reward, because each is 1 exactly when its aspect is
fully right: for strict, partial and jaccard that is the GenEval strict pass (partial = 1 and
jaccard = 1 iff strict = 1), so their pass rate is strict accuracy; for count, color and shape it is
"every clause right on that aspect".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from diffrl.config import require
from diffrl.models.shapes_world import parse_prompt
from diffrl.reward_servers.scorers import shapes
from diffrl.reward_servers.scorers.base import Details, Scorer, check_lengths

_FIELDS = ("strict", "partial", "count", "color", "shape", "jaccard", "num_objects")
_SCORES = ("strict", "partial", "count", "color", "shape", "jaccard")


@dataclass
class ShapesOptions:
    score: str = "strict"
    """Which sub-score is the reward: strict (GenEval), partial (dense), count, color, shape or jaccard."""

    def validate(self) -> None:
        require(self.score in _SCORES, "score", f"one of {', '.join(_SCORES)}", self.score)


@lru_cache(maxsize=8192)
def _prompt_problem(prompt: str) -> str | None:
    try:
        parse_prompt(prompt)
    except ValueError as err:
        return f"not a shapes-world prompt: {err}"
    return None


class ShapesScorer(Scorer):
    name = "shapes"
    version = "1"
    min_score = 0.0
    max_score = 1.0
    higher_is_better = True
    needs_prompt = True
    pass_threshold = 1.0  # see the module docstring: 1 = fully right, for every sub-score
    Options = ShapesOptions

    def __init__(self, options: ShapesOptions | None = None):
        self.options = options or ShapesOptions()
        self.description = (f"shapes-world GenEval-like detector; score = {self.options.score}; "
                            f"details: {', '.join(_FIELDS)}")

    def check_item(self, prompt: str, metadata: Mapping[str, str]) -> str | None:
        return super().check_item(prompt, metadata) or _prompt_problem(prompt)

    def score_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str],
                    metadata: Sequence[Mapping[str, str]]) -> tuple[list[float], Details]:
        check_lengths(images, prompts, metadata)
        results: list[shapes.ShapesScore | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(np.shape(im), []).append(i)
        for idx in by_size.values():  # one colour pass per image size
            batch = np.stack([images[i] for i in idx]) if len(idx) > 1 else np.asarray(images[idx[0]])[None]
            for i, r in zip(idx, shapes.score_batch(batch, [prompts[i] for i in idx])):
                results[i] = r
        key = self.options.score
        scores = [float(getattr(r, key)) for r in results]
        details = {f: [float(getattr(r, f)) for r in results] for f in _FIELDS}
        return scores, details
