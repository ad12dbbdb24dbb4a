"""A test-only algorithm on the learner's seam: reward-weighted regression (RWR) with a second,
independently trained network. Nothing outside this file and tests/test_algorithm_seam.py knows it.

θ regresses the flow-matching target of each sample weighted by w_i = K·softmax_g(r_i/τ) (within its
prompt group, so the weights average 1); ``fake`` (a second trainable role, like a fake-score network)
regresses the same targets unweighted; the samplers get an EMA of θ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffrl.learner.algorithms.base import EMA, Algorithm, Frozen, StepResult, Trainable, register
from diffrl.learner.noise_levels import interpolate, velocity_target


@dataclass
class RWRConfig:
    """Reward-weighted regression (a test algorithm)."""

    temperature: float = 1.0
    """τ in w = K·softmax(r/τ) within each prompt group."""
    num_noise_levels: int = 2
    """Noise levels per step, uniform in (0, 1)."""
    ema_decay: float = 0.5
    """Decay of the published EMA of θ."""

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature!r}")


def rwr_weights(rewards: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = K·softmax(r/τ) over each group's real samples. ``[G, K] -> [G, K]``."""
    logits = (rewards / temperature).masked_fill(~mask, float("-inf"))  # [G, K]
    return torch.softmax(logits, dim=1) * mask.sum(dim=1, keepdim=True)  # [G, K]


@register
class RWR(Algorithm):
    name = "rwr"
    config_class = RWRConfig

    def roles(self):
        c = self.config
        return [Trainable("theta", backward_passes=c.num_noise_levels),
                Trainable("fake", backward_passes=c.num_noise_levels, lr=1e-2),
                EMA("p_samp", "theta", lambda s: self.config.ema_decay), Frozen("base")]

    def step(self, batch, ctx) -> StepResult:
        c, dev, model = self.config, ctx.device, ctx.model
        w = rwr_weights(batch.rewards, batch.mask, c.temperature).float()  # [G, K]
        cond_groups = model.encode_prompts(batch.prompts)
        K = batch.mask.shape[1]
        for _ in range(c.num_noise_levels):
            sigma = torch.rand((), generator=ctx.generator).item()
            for idx in ctx.chunks:
                x0 = batch.x0[idx].flatten(0, 1).to(dev)  # [n, C, H, W]
                eps = torch.randn(x0.shape, generator=ctx.generator).to(dev)  # [n, C, H, W]
                sig = torch.full((x0.shape[0],), sigma, device=dev)  # [n]
                x_t, u = interpolate(x0, eps, sig), velocity_target(x0, eps)
                cond = cond_groups[idx.tolist()].repeat_interleave(K)
                m = batch.mask[idx].reshape(-1).to(dev).float()  # [n]
                share = float(m.sum()) / batch.n_valid
                err = (model.velocity(x_t, sig, cond, transformer=ctx.net("theta")) - u).pow(2).flatten(1).mean(1)
                loss = (w[idx].reshape(-1).to(dev) * err * m).sum() / m.sum()  # []
                ctx.backward("theta", loss, share)
                fake_err = (model.velocity(x_t, sig, cond, transformer=ctx.net("fake")) - u).pow(2).flatten(1).mean(1)
                fake_loss = (fake_err * m).sum() / m.sum()  # []
                ctx.backward("fake", fake_loss, share)
                ctx.log({"loss": loss.detach(), "fake_loss": fake_loss.detach()}, share)
        return StepResult(advantages=w - 1.0)
