"""Advantages of a batch of prompt groups: within-group centering, scaling by a batch-wide or per-group
standard deviation, clipping, and the normalized form ã ∈ [0, 1] (CRD, DiffusionNFT)."""

from __future__ import annotations

import torch

from diffrl.config import require
from diffrl.learner.losses import group_mean

Tensor = torch.Tensor

STD_MODES = ("global", "group")


def advantages(
    rewards: Tensor,
    mask: Tensor | None = None,
    std_mode: str = "global",
    clip: float = 5.0,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Centered, scaled, clipped advantages a and their normalized form ã ∈ [0, 1].

    a_i = (r_i − mean_{j∈g} r_j) / std,  clipped to ±``clip``;  ã_i = a_i/(2·clip) + 0.5
    (= a_i/10 + 0.5 at the default clip 5, as in docs/algorithms.md).

    ``std`` is the population standard deviation (ddof 0) of the *within-group-centered* rewards:
    over the whole batch (``std_mode="global"``, default) or over each group (``"group"``). Since
    centered rewards have mean 0, std = sqrt(mean c²). Adding any constant to one prompt's rewards
    leaves the centered rewards, hence ``std``, a and ã, unchanged. Where ``std <= eps`` (all rewards
    equal: the whole batch in global mode, the group in group mode) a = 0 and ã = 0.5, never NaN.

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
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    r = rewards.to(torch.float64)  # [G, K]
    m = torch.ones_like(r) if mask is None else mask.to(torch.float64)  # [G, K]
    c = (r - group_mean(r, mask)) * m  # [G, K] within-group centered, 0 where masked
    if std_mode == "global":
        std = ((c**2).sum() / m.sum().clamp_min(1.0)).sqrt().reshape(1, 1)  # [1, 1]
    else:
        std = ((c**2).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)).sqrt()  # [G, 1]
    a = torch.where(std > eps, c / std.clamp_min(eps), torch.zeros_like(c))  # [G, K]
    a = a.clamp(-clip, clip)  # [G, K]
    a_tilde = a / (2.0 * clip) + 0.5  # [G, K] in [0, 1]
    return a.to(out_dtype), a_tilde.to(out_dtype)
