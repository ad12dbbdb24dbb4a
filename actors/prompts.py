"""Sharded, seeded prompt sources: every sampler walks its own shard of the prompt list, reshuffled
each epoch with a seed, so the prompt order is reproducible and samplers do not collide. Items are
:class:`diffrl.data.PromptItem` (a prompt and its reward metadata); plain strings become items."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffrl.data import PromptItem


@dataclass
class PromptSourceState:
    epoch: int = 0
    position: int = 0


class PromptSource:
    """Infinite iterator over ``prompts[shard_index::num_shards]`` of a per-epoch permutation."""

    def __init__(self, prompts: Sequence[str | PromptItem], shard_index: int = 0, num_shards: int = 1, seed: int = 0,
                 state: PromptSourceState | None = None):
        if not prompts:
            raise ValueError("PromptSource: no prompts")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"PromptSource: shard_index {shard_index} not in [0, {num_shards})")
        self.prompts = [p if isinstance(p, PromptItem) else PromptItem(p) for p in prompts]
        self.shard_index, self.num_shards, self.seed = shard_index, num_shards, seed
        self.state = state or PromptSourceState()
        self._order = self._epoch_order(self.state.epoch)

    def _epoch_order(self, epoch: int) -> list[PromptItem]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
        shard = [self.prompts[i] for i in perm[self.shard_index :: self.num_shards]]
        return shard or [self.prompts[perm[self.shard_index % len(perm)]]]

    def __iter__(self):
        return self

    def __next__(self) -> PromptItem:
        if self.state.position >= len(self._order):
            self.state = PromptSourceState(self.state.epoch + 1, 0)
            self._order = self._epoch_order(self.state.epoch)
        prompt = self._order[self.state.position]
        self.state.position += 1
        return prompt

    def take(self, n: int) -> list[PromptItem]:
        return [next(self) for _ in range(n)]
