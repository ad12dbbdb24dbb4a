"""Which predicted clean states x̂0_j a sampler scores besides the final sample (``sampler.score_steps``),
for algorithms with dense per-step rewards (SDPO, arXiv 2411.11727: the first step, an anchor and the
last; the public code's rule is in sdpo_pytorch/diffusers_patch/pipeline_with_logprob_sdpo.py).
The learner interpolates the unscored steps (learner/algorithms/sdpo.py)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

SCORE_STEPS = ("final", "anchor", "all")
"""``final``: the sample only; ``anchor``: also x̂0 at step 0 and at the anchor (the last step's x̂0 is
the sample for the η-step into σ = 0); ``all``: every step's x̂0."""


def cosine_to(x0_preds: Tensor, ref: Tensor, center: bool = False) -> Tensor:
    """Cosine similarity of every x̂0_j to a reference prediction, over flattened latents.

    ``x0_preds [N, S, ...]``, ``ref [N, ...]`` -> ``[N, S]``. ``center``: subtract each image's mean
    first (ours, an option: on near-white 32×32 images the raw cosine is dominated by the background,
    so every pair of predictions looks alike; the public code uses raw latents)."""
    x = x0_preds.flatten(2).double()  # [N, S, D]
    r = ref.flatten(1).double().unsqueeze(1)  # [N, 1, D]
    if center:
        x = x - x.mean(dim=2, keepdim=True)
        r = r - r.mean(dim=2, keepdim=True)
    return torch.nn.functional.cosine_similarity(x, r.expand_as(x), dim=2)  # [N, S]


def anchor_steps(x0_preds: Tensor, center: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The public code's anchor rule: a = argmin_j [cos(x̂0_j, x̂0_0) + cos(x̂0_j, x̂0_{S−1})].

    ``x0_preds [N, S, ...]`` -> ``(anchor [N] int64, sim_first [N, S], sim_anchor [N, S], sim_last [N, S])``
    (pipeline_with_logprob_sdpo.py: ``sim_first``, ``sim_last``, ``anchor_steps``, ``sim_anchor``)."""
    sim_first = cosine_to(x0_preds, x0_preds[:, 0], center)  # [N, S]
    sim_last = cosine_to(x0_preds, x0_preds[:, -1], center)  # [N, S]
    anchor = (sim_first + sim_last).argmin(dim=1)  # [N]
    rows = torch.arange(len(anchor))
    sim_anchor = cosine_to(x0_preds, x0_preds[rows, anchor], center)  # [N, S]
    return anchor, sim_first, sim_anchor, sim_last


def steps_to_score(mode: str, anchor: Tensor, num_steps: int) -> list[list[int]]:
    """Per sample, the steps j < S − 1 whose x̂0_j the sampler decodes and scores (the last step is the
    sample, scored anyway). ``anchor [N]`` -> N lists."""
    if mode == "final":
        return [[] for _ in range(len(anchor))]
    if mode == "all":
        return [list(range(num_steps - 1)) for _ in range(len(anchor))]
    return [sorted({0, int(a)} - {num_steps - 1}) for a in anchor]
