"""Prometheus metrics of the sampler actors (``diffrl_sampler_*``); no prompt text in labels."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

GROUPS_PUBLISHED = "diffrl_sampler_groups_published_total"
GROUPS_MASKED = "diffrl_sampler_groups_masked_total"
IMAGES = "diffrl_sampler_images_total"
ROUND_SECONDS = "diffrl_sampler_round_seconds"
STAGE_SECONDS = "diffrl_sampler_stage_seconds_total"
BACKPRESSURE_SECONDS = "diffrl_sampler_backpressure_seconds_total"
POLICY_VERSION = "diffrl_sampler_policy_version"
WEIGHT_UPDATES = "diffrl_sampler_weight_updates_total"
REWARD_MEAN = "diffrl_sampler_reward_mean"
MASKED_BACKOFFS = "diffrl_sampler_masked_backoffs_total"
MASKED_BACKOFF_SECONDS = "diffrl_sampler_masked_backoff_seconds_total"


def _base(name: str) -> str:
    return name.removesuffix("_total")


class _Families:
    """The metric families, created once per registry (several samplers may share a process)."""

    def __init__(self, r: CollectorRegistry):
        labels = ["sampler"]
        self.groups = Counter(_base(GROUPS_PUBLISHED), "Groups published to the experience stream.", labels,
                              registry=r)
        self.masked = Counter(_base(GROUPS_MASKED), "Groups published masked because a reward failed.",
                              labels + ["reason"], registry=r)
        self.images = Counter(_base(IMAGES), "Images generated.", labels, registry=r)
        self.round_seconds = Histogram(ROUND_SECONDS, "Time of one sampling round (sample, decode, score, "
                                       "publish).", labels, registry=r,
                                       buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.stage_seconds = Counter(_base(STAGE_SECONDS), "Time spent per stage (weights, sample, decode, "
                                     "reward, publish).", labels + ["stage"], registry=r)
        self.backpressure = Counter(_base(BACKPRESSURE_SECONDS), "Time paused because the stream backlog "
                                    "exceeded max_pending_groups.", labels, registry=r)
        self.version = Gauge(POLICY_VERSION, "Version of p_samp the sampler uses.", labels, registry=r)
        self.weight_updates = Counter(_base(WEIGHT_UPDATES), "Newer p_samp versions loaded.", labels, registry=r)
        self.reward_mean = Gauge(REWARD_MEAN, "Mean of each reward over the last round's unmasked groups.",
                                 labels + ["reward"], registry=r)
        self.masked_backoffs = Counter(_base(MASKED_BACKOFFS), "Pauses after a round whose groups were all "
                                       "masked.", labels, registry=r)
        self.masked_backoff_seconds = Counter(_base(MASKED_BACKOFF_SECONDS), "Time paused after rounds whose "
                                              "groups were all masked.", labels, registry=r)


_FAMILIES: dict[int, _Families] = {}
_LOCK = threading.Lock()


class SamplerMetrics:
    """One sampler's metrics (families shared per registry, children labelled by sampler id)."""

    def __init__(self, sampler_id: str, registry: CollectorRegistry | None = None):
        r = registry or REGISTRY
        with _LOCK:
            f = _FAMILIES.get(id(r)) or _FAMILIES.setdefault(id(r), _Families(r))
        self.sampler_id = sampler_id
        self.groups = f.groups.labels(sampler_id)
        self.masked = f.masked
        self.images = f.images.labels(sampler_id)
        self.round_seconds = f.round_seconds.labels(sampler_id)
        self.stage_seconds = f.stage_seconds
        self.backpressure = f.backpressure.labels(sampler_id)
        self.version = f.version.labels(sampler_id)
        self.weight_updates = f.weight_updates.labels(sampler_id)
        self.reward_mean = f.reward_mean
        self.masked_backoffs = f.masked_backoffs.labels(sampler_id)
        self.masked_backoff_seconds = f.masked_backoff_seconds.labels(sampler_id)
