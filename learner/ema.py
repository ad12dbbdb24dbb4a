"""Snapshot EMAs: the blend schedule d(s) = min(a + max(0, s − s0)·k, d_max) and the in-place blend
snap ← d·snap + (1 − d)·θ (p_old, p_samp and any other EMA role an algorithm declares)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from diffrl.config import require

Tensor = torch.Tensor


def ema_decay(step: int, s0: float, a: float, k: float, d_max: float) -> float:
    """d(s) = min(a + max(0, s − s0)·k, d_max), s = optimizer steps taken so far."""
    return min(a + max(0.0, float(step) - float(s0)) * k, d_max)


def ema_update_(snapshot_params: Iterable[Tensor], theta_params: Iterable[Tensor], decay: float) -> None:
    """In place, without autograd: snap ← d·snap + (1 − d)·θ for each pair of tensors.

    d = 0 copies θ exactly; d = 1 leaves the snapshot untouched. θ is cast to each snapshot
    tensor's device and dtype.
    """
    require(0.0 <= decay <= 1.0, "decay", "in [0, 1]", decay)
    snaps = list(snapshot_params)
    thetas = list(theta_params)
    require(len(snaps) == len(thetas), "snapshot_params", f"{len(thetas)} tensors like theta", len(snaps))
    with torch.no_grad():
        for snap, theta in zip(snaps, thetas):
            require(
                snap.shape == theta.shape, "snapshot_params", f"shape {tuple(theta.shape)}", tuple(snap.shape)
            )
            src = theta.detach().to(device=snap.device, dtype=snap.dtype)
            if decay == 0.0:
                snap.copy_(src)
            elif decay < 1.0:
                snap.mul_(decay).add_(src, alpha=1.0 - decay)


@dataclass
class EMASchedule:
    """Blend schedule of a parameter snapshot: d(s) = min(a + max(0, s − s0)·k, d_max), then
    snap ← d·snap + (1 − d)·θ after every optimizer step s."""

    start_step: int = 0
    """s0: optimizer step at which the decay starts to rise above ``start_decay``."""
    start_decay: float = 0.0
    """a: decay before and at ``start_step`` (0 = exact copy of θ)."""
    slope: float = 0.0
    """k: increase of the decay per optimizer step after ``start_step``."""
    max_decay: float = 0.999
    """d_max: the decay never exceeds this (1 would freeze the snapshot)."""

    def decay(self, step: int) -> float:
        """d(step)."""
        return ema_decay(step, self.start_step, self.start_decay, self.slope, self.max_decay)

    def validate(self) -> None:
        require(self.start_step >= 0, "start_step", ">= 0", self.start_step)
        require(0.0 <= self.start_decay <= 1.0, "start_decay", "in [0, 1]", self.start_decay)
        require(self.slope >= 0.0, "slope", ">= 0", self.slope)
        require(0.0 <= self.max_decay <= 1.0, "max_decay", "in [0, 1]", self.max_decay)
