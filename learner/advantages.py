"""Advantages of a batch of prompt groups: within-group centering, scaling by a batch-wide or per-group
standard deviation, clipping, and the normalized form ã ∈ [0, 1] (CRD, DiffusionNFT)."""

from __future__ import annotations

import torch

from diffrl.config import require
from diffrl.learner.losses import group_mean

Tensor = torch.Tensor

STD_MODES = ("global", "group", "batch")
EPS_MODES = ("relative", "add")
RELATIVE_EPS = 1e-6
"""Default guard of ``eps_mode="relative"``: a std at or below 1e-6 x the batch's largest |reward| is a
tie (float32 rounding is ~6e-8 relative), never an advantage."""


def advantages(
    rewards: Tensor,
    mask: Tensor | None = None,
    std_mode: str = "global",
    clip: float = 5.0,
    eps: float = RELATIVE_EPS,
    eps_mode: str = "relative",
) -> tuple[Tensor, Tensor]:
    """Centered, scaled, clipped advantages a and their normalized form ã ∈ [0, 1].

    a_i = (r_i − mean_{j∈g} r_j) / std,  clipped to ±``clip``;  ã_i = a_i/(2·clip) + 0.5
    (= a_i/10 + 0.5 at the default clip 5, as in docs/algorithms.md).

    ``std`` is a population standard deviation (ddof 0): of the *within-group-centered* rewards over the
    whole batch (``std_mode="global"``, default, CRD; since centered rewards have mean 0, std = sqrt(mean
    c²), and adding a constant to one prompt's rewards changes nothing), of each group's rewards
    (``"group"``), or of the *raw* rewards over the whole batch (``"batch"``: Flow-GRPO's
    ``global_std=True``, flow_grpo/stat_tracking.py, and DiffusionNFT's global std).

    The guard (``eps_mode``): ``"relative"`` (default) treats a std at or below ``eps`` x the batch's
    largest |reward| as a tie: a = 0 and ã = 0.5 there (the whole batch in global/batch mode, the group
    in group mode), never NaN, and float rounding in a group of equal rewards never becomes a
    full-strength advantage (an absolute 1e-8 threshold did). ``"add"`` divides by ``std + eps``
    (Flow-GRPO and DiffusionNFT: ``std + 1e-4``), which is already bounded.

    Args:
        rewards: ``[G, K]`` rewards, G prompt groups of K samples.
        mask: optional ``[G, K]`` bool, False for samples without a valid reward; they are left out of
            every mean and std and get a = 0, ã = 0.5.
    Returns:
        ``(a, a_tilde)``, both ``[G, K]`` in the rewards' dtype (computed in float64).
    """
    require(rewards.ndim == 2, "rewards", "a [G, K] tensor", tuple(rewards.shape))
    require(std_mode in STD_MODES, "std_mode", f"one of {STD_MODES}", std_mode)
    require(clip > 0, "clip", "> 0", clip)
    require(eps_mode in EPS_MODES, "eps_mode", f"one of {EPS_MODES}", eps_mode)
    require(eps >= 0, "eps", ">= 0", eps)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    r = rewards.to(torch.float64)  # [G, K]
    m = torch.ones_like(r) if mask is None else mask.to(torch.float64)  # [G, K]
    c = (r - group_mean(r, mask)) * m  # [G, K] within-group centered, 0 where masked
    n = m.sum().clamp_min(1.0)
    if std_mode == "global":
        std = ((c**2).sum() / n).sqrt().reshape(1, 1)  # [1, 1]
    elif std_mode == "batch":
        raw_mean = (r * m).sum() / n
        std = ((((r - raw_mean) * m) ** 2).sum() / n).sqrt().reshape(1, 1)  # [1, 1] over raw rewards
    else:
        std = ((c**2).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)).sqrt()  # [G, 1]
    if eps_mode == "add":
        a = c / (std + eps)  # [G, K]
    else:
        floor = eps * (r.abs() * m).max().clamp_min(1e-30)  # scales with the rewards
        a = torch.where(std > floor, c / std.clamp_min(1e-300), torch.zeros_like(c))  # [G, K]
    a = a.clamp(-clip, clip)  # [G, K]
    a_tilde = a / (2.0 * clip) + 0.5  # [G, K] in [0, 1]
    return a.to(out_dtype), a_tilde.to(out_dtype)
