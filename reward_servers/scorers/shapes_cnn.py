"""``shapes_cnn``: the differentiable shapes-world reward network (``models/reward_cnn.py``) as a scorer.

The same file that a reward-gradient algorithm (DIDR) follows inside the learner can back a reward
server, so a run can monitor the reward it optimises next to the exact detector (``shapes``) that it
approximates. score = the model's ``reward()``: P(strict), the network's probability that every
(colour, shape) count and the off-palette count equal the prompt's (``score=log_prob``: log P). The
model is the folder ``path`` (default the shipped ``assets/shapes-reward-cnn``; any folder that
``load_reward_model`` loads).

Details per item: ``prob`` (P(strict)), ``log_prob``, ``predicted_strict`` (1 iff every slot's most
likely count is the prompt's) and ``count_<kind>`` for the 13 slots (``count_red_circle``, ...,
``count_other``; 5 means "5 or more"). Pass threshold 0.5 for P (P > 0.5 implies predicted_strict);
none for log_prob. The version is the first 12 hex digits of model.safetensors' SHA-256. The prompt
must be in the shapes-world grammar (else 422).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffrl.config import require
from diffrl.models.reward_cnn import (
    CONFIG_FILE,
    KINDS,
    SCORES,
    WEIGHTS_FILE,
    load_reward_model,
    resolve_reward_path,
)
from diffrl.reward_servers.scorers.base import Details, Scorer, check_lengths
from diffrl.reward_servers.scorers.shapes_reward import _prompt_problem

DEFAULT_PATH = "assets/shapes-reward-cnn"
_COUNT_FIELDS = tuple("count_" + k.replace(" ", "_") for k in KINDS)


@dataclass
class ShapesCnnOptions:
    path: str = DEFAULT_PATH
    """Reward model folder (config.json + model.safetensors); a relative one is also looked up in the
    repository."""
    score: str = ""
    """prob (P(strict), in [0, 1]) or log_prob (log P); empty: the model's own score mode."""
    threads: int = 1
    """torch CPU threads for the network (the server runs several batches in parallel)."""

    def validate(self) -> None:
        folder = resolve_reward_path(self.path)
        require(bool(self.path) and (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file(),
                "path", f"a reward model folder with {CONFIG_FILE} and {WEIGHTS_FILE}", self.path)
        require(self.score in ("", *SCORES), "score", f"empty or one of {', '.join(SCORES)}", self.score)
        require(self.threads >= 1, "threads", "an int >= 1", self.threads)


class ShapesCnnScorer(Scorer):
    name = "shapes_cnn"
    needs_prompt = True
    prefers_batching = True
    Options = ShapesCnnOptions

    def __init__(self, options: ShapesCnnOptions | None = None):
        self.options = o = options or ShapesCnnOptions()
        folder = resolve_reward_path(o.path)
        self.model = load_reward_model(folder, device="cpu")
        torch.set_num_threads(o.threads)  # process-wide: the scorer owns its server process
        self.score_mode = o.score or self.model.score
        self.version = "sha256:" + hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
        if self.score_mode == "prob":
            self.min_score, self.max_score, self.pass_threshold = 0.0, 1.0, 0.5
        else:
            self.min_score, self.max_score, self.pass_threshold = -math.inf, 0.0, None
        self.description = (f"shapes-world reward CNN {folder.name}: {self.score_mode} of the strict pass; "
                            "details: prob, log_prob, predicted_strict, count_<kind>")

    def check_item(self, prompt: str, metadata: Mapping[str, str]) -> str | None:
        return super().check_item(prompt, metadata) or _prompt_problem(prompt)

    def score_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str],
                    metadata: Sequence[Mapping[str, str]]) -> tuple[list[float], Details]:
        check_lengths(images, prompts, metadata)
        log_p = np.zeros(len(images))
        strict = np.zeros(len(images))
        counts = np.zeros((len(images), len(KINDS)))
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(np.shape(im), []).append(i)
        with torch.inference_mode():
            for idx in by_size.values():  # one forward per image size
                batch = np.stack([_rgb(images[i]) for i in idx])  # [b, H, W, 3]
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
                p = [prompts[i] for i in idx]
                log_p[idx] = self.model.log_reward(x, p).double().numpy()
                strict[idx] = self.model.predicted_strict(x, p).double().numpy()
                counts[idx] = self.model.predict_counts(x).double().numpy()
        prob = np.exp(log_p)
        scores = prob if self.score_mode == "prob" else log_p
        details = {"prob": prob.tolist(), "log_prob": log_p.tolist(), "predicted_strict": strict.tolist()}
        details.update({f: counts[:, k].tolist() for k, f in enumerate(_COUNT_FIELDS)})
        return [float(s) for s in scores], details


def _rgb(image: np.ndarray) -> np.ndarray:
    im = np.asarray(image)
    if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {im.dtype} {im.shape}")
    return im
