"""Tensor helpers shared by the algorithms' losses: per-sample and per-group means, the adaptive
per-sample weight, the squared velocity distance to a reference, correlation. Pure functions of
tensors; per-sample tensors are ``[N, ...]`` group-major (N = G·K), per-sample scalars ``[G, K]``."""

from __future__ import annotations

import torch

from diffrl.models.sde import _compute_dtype

Tensor = torch.Tensor


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dim but the first: ``[N, ...] -> [N]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)  # [N]


def group_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean within each prompt group (row) over the valid entries: ``[G, K] -> [G, 1]``."""
    if mask is None:
        return x.mean(dim=1, keepdim=True)  # [G, 1]
    m = mask.to(x.dtype)  # [G, K]
    return (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # [G, 1]


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over all valid entries of a ``[G, K]`` tensor -> scalar."""
    if mask is None:
        return x.mean()  # []
    m = mask.to(x.dtype)  # [G, K]
    return (x * m).sum() / m.sum().clamp_min(1.0)  # []


def adaptive_weight(v: Tensor, u: Tensor, enabled: bool = True, min_weight: float = 1e-5) -> Tensor:
    """Per-sample adaptive weight w_i = mean|v_i − u_i| (detached, float64, clipped ≥ ``min_weight``);
    all ones when disabled.

    Args:
        v: ``[N, ...]`` a velocity prediction.  u: ``[N, ...]`` the target velocity ε − x0.
    Returns:
        ``[N]`` float64, no grad.
    """
    if not enabled:
        return torch.ones(v.shape[0], dtype=torch.float64, device=v.device)  # [N]
    with torch.no_grad():
        diff = v.detach().to(torch.float64) - u.detach().to(torch.float64)  # [N, ...]
        return per_sample_mean(diff.abs()).clamp_min(min_weight)  # [N]


def kl_anchor(v_theta: Tensor, v_anchor_cfg: Tensor) -> Tensor:
    """kl_i = mean over elements of (v_θ − v_φ^w)², the anchor detached.

    Args:
        v_theta: ``[N, ...]`` (with grad).  v_anchor_cfg: ``[N, ...]`` the frozen model's CFG velocity.
    Returns:
        ``[N]``.
    """
    dt = _compute_dtype(v_theta)
    return per_sample_mean((v_theta.to(dt) - v_anchor_cfg.detach().to(dt)) ** 2)  # [N]


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Correlation of two flat tensors, 0 when either is constant."""
    xc, yc = x - x.mean(), y - y.mean()  # [M]
    den = (xc.pow(2).sum() * yc.pow(2).sum()).sqrt()  # []
    return torch.where(den > 0, (xc * yc).sum() / den.clamp_min(1e-300), torch.zeros_like(den))  # []
