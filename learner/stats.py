"""Per-step statistics of the learner: the algorithm's logged means, reward and advantage moments,
per-reward means and staleness, reduced over the ranks (sample-weighted; maxima as maxima)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from diffrl.proto import experience_pb2

Tensor = torch.Tensor
Group = experience_pb2.Group


def reward_names(groups: Sequence[Group], reward_weights: Mapping[str, float]) -> list[str]:
    """The reward names reported per step: the weighted ones, or every name the samples carry."""
    if reward_weights:
        return sorted(reward_weights)
    return sorted({k for g in groups for s in g.samples for k in s.rewards})


class StatsAccumulator:
    """Share-weighted means of the scalar stats an algorithm logs per pass: per key, the mean over the
    passes that logged it (the shares of one level's chunks sum to 1)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, stats: Mapping[str, Any], share: float) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * share
            self.weights[k] = self.weights.get(k, 0.0) + share

    def means(self) -> dict[str, float]:
        return {k: v / self.weights[k] for k, v in self.sums.items()}


def step_stats(groups: Sequence[Group], acc: dict[str, float], rewards: Tensor, mask: Tensor, a: Tensor,
               staleness: Sequence[int], adv_clip: float | None, reward_weights: Mapping[str, float],
               world_size: int, device: torch.device) -> dict[str, Any]:
    """Per-step statistics, reduced over ranks (sample-weighted): the algorithm's logged means
    ``acc``, reward and advantage moments, per-reward means, staleness. ``[G, K]`` rewards, mask, a."""
    n_valid = float(mask.sum())
    names = reward_names(groups, reward_weights)
    m = mask.to(torch.float64)
    sums: list[float] = [n_valid]
    keys = sorted(acc)
    sums += [acc[k] * n_valid for k in keys]
    r = rewards * m
    sums += [float(r.sum()), float((r**2).sum())]
    af = a.to(torch.float64) * m
    sums += [float(af.sum()), float((af**2).sum()), float(af.abs().max()) if n_valid else 0.0,
             float(((a.abs() >= adv_clip - 1e-6) & mask).sum()) if adv_clip is not None else 0.0]
    per_reward = []
    for name in names:
        vals = torch.tensor([s.rewards[name] for g in groups for s in g.samples if name in s.rewards],
                            dtype=torch.float64)
        per_reward += [float(vals.sum()), float((vals**2).sum()), float(vals.numel())]
    shared_names = bool(reward_weights) or world_size == 1
    vec = torch.tensor(sums + (per_reward if shared_names else []), dtype=torch.float64, device=device)
    staleness_vec = torch.tensor([float(sum(staleness)), float(max(staleness)), float(len(staleness))],
                                 dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(vec)
        # the abs-max of the advantages is a max, not a sum: redo it
        amax = torch.tensor([sums[len(keys) + 5]], dtype=torch.float64, device=device)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        smax = staleness_vec[1:2].clone()
        dist.all_reduce(smax, op=dist.ReduceOp.MAX)
        dist.all_reduce(staleness_vec)
        staleness_vec[1] = smax[0]
    v = vec.cpu().tolist()
    total = max(v[0], 1.0)
    out: dict[str, Any] = {}
    for i, k in enumerate(keys):
        out[k] = v[1 + i] / total
    j = 1 + len(keys)
    r_mean = v[j] / total
    out["reward_mean"] = r_mean
    out["reward_std"] = math.sqrt(max(v[j + 1] / total - r_mean**2, 0.0))
    a_mean = v[j + 2] / total
    out["advantage_mean"] = a_mean
    out["advantage_std"] = math.sqrt(max(v[j + 3] / total - a_mean**2, 0.0))
    out["advantage_abs_max"] = float(amax[0]) if world_size > 1 else v[j + 4]
    out["advantage_clip_fraction"] = v[j + 5] / total
    out["_samples"] = v[0]
    by_mean, by_std = {}, {}
    if shared_names:
        base = j + 6
        for i, name in enumerate(names):
            s1, s2, cnt = v[base + 3 * i: base + 3 * i + 3]
            mu = s1 / max(cnt, 1.0)
            by_mean[name] = mu
            by_std[name] = math.sqrt(max(s2 / max(cnt, 1.0) - mu**2, 0.0))
    else:  # per-reward stats of this rank's groups (reward names may differ between ranks)
        for i, name in enumerate(names):
            s1, s2, cnt = per_reward[3 * i: 3 * i + 3]
            mu = s1 / max(cnt, 1.0)
            by_mean[name] = mu
            by_std[name] = math.sqrt(max(s2 / max(cnt, 1.0) - mu**2, 0.0))
    out["reward_mean_by"] = by_mean
    out["reward_std_by"] = by_std
    out["staleness_mean"] = float(staleness_vec[0]) / max(float(staleness_vec[2]), 1.0)
    out["staleness_max"] = float(staleness_vec[1])
    if "kl" not in out and "kl_mean" in out:
        out["kl"] = out["kl_mean"]
    return out
