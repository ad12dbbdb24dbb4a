"""``diffrl bench weights``: p_samp from the learner to the samplers through both weight channels.

For each channel (object_store, torch_dist) and size, the driver plays learner rank 0 (the channel's
publisher, as ``open_publisher`` builds it) and ``samplers`` Ray actors play samplers (``open_source``,
as ``build_sampler`` builds it). Each version: publish, then every sampler fetches it at once. Reported
per version: seconds per update (publish start until every sampler has the version), how long publish
held the caller (the training step), and each sampler's pause in ``fetch_newer``. Weights are bfloat16
matrices of 4 MiB, like a transformer's."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

from diffrl.config import require
from diffrl.proto.weight_sync import WEIGHT_CHANNELS, WeightsConfig

TENSOR_SHAPE = (1024, 2048)
"""One bfloat16 matrix of 4 MiB."""


@dataclass
class WeightsBenchConfig:
    sizes_mb: list[float] = field(default_factory=lambda: [50.0, 500.0])
    """Sizes of p_samp to measure, MiB (bfloat16 matrices of 4 MiB)."""
    channels: list[str] = field(default_factory=lambda: ["object_store", "torch_dist"])
    """Channels to measure (object_store, torch_dist)."""
    samplers: int = 2
    """Sampler processes (Ray actors)."""
    versions: int = 4
    """Versions published per channel and size; the first is a warm-up, not reported."""
    timeout_s: float = 120.0
    """weights.timeout_s of the torch_dist channel."""
    backend: str = "gloo"
    """weights.backend of the torch_dist channel (gloo on CPU)."""
    num_cpus: int = 0
    """CPUs of the local Ray (0 = all cores)."""

    def validate(self) -> None:
        require(bool(self.sizes_mb) and all(s > 0 for s in self.sizes_mb), "sizes_mb", "sizes > 0", self.sizes_mb)
        unknown = [c for c in self.channels if c not in WEIGHT_CHANNELS or c == "auto"]
        require(bool(self.channels) and not unknown, "channels", "object_store and/or torch_dist", self.channels)
        require(self.samplers >= 1, "samplers", "an int >= 1", self.samplers)
        require(self.versions >= 2, "versions", "an int >= 2 (one warm-up)", self.versions)
        require(self.timeout_s > 0, "timeout_s", "seconds > 0", self.timeout_s)
        require(self.backend in ("gloo", "nccl", "auto"), "backend", "gloo, nccl or auto", self.backend)


class BenchSampler:
    """Body of a sampler actor: a weight source and nothing else."""

    def __init__(self, cfg_yaml: str, channel_name: str, sampler_id: str):
        import torch

        from diffrl.config import load_config_text
        from diffrl.proto.weight_sync import open_source

        torch.set_num_threads(1)
        self.source = open_source(load_config_text(WeightsConfig, cfg_yaml), channel_name, sampler_id)
        self.version = -1

    def fetch(self, version: int) -> tuple[int, float]:
        """(version held afterwards, seconds paused in fetch_newer)."""
        start = time.perf_counter()
        got = self.source.fetch_newer(self.version)
        paused = time.perf_counter() - start
        if got is not None:
            self.version = got[0]
        return self.version, paused


def make_weights(size_mb: float, version: int):
    import torch

    n = max(1, round(size_mb * 2**20 / (TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2)))
    return {f"blocks.{i}.weight": torch.full(TENSOR_SHAPE, float(version + i % 7), dtype=torch.bfloat16)
            for i in range(n)}


def bench_one(cfg: WeightsBenchConfig, channel: str, size_mb: float, tag: str) -> dict:
    import ray

    from diffrl.config import to_yaml
    from diffrl.proto.weight_sync import open_publisher

    wcfg = WeightsConfig(channel=channel, timeout_s=cfg.timeout_s, backend=cfg.backend)
    name = f"diffrl-bench-weights-{tag}"
    publisher = open_publisher(wcfg, name)
    actor = ray.remote(num_cpus=0)(BenchSampler)
    samplers = [actor.remote(to_yaml(wcfg), name, f"bench-{tag}-{i}") for i in range(cfg.samplers)]
    rows = []
    try:
        for v in range(1, cfg.versions + 1):
            tensors = make_weights(size_mb, v)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            t0 = time.perf_counter()
            publisher.publish(v, tensors, "full")
            t1 = time.perf_counter()
            got = ray.get([s.fetch.remote(v - 1) for s in samplers])
            t2 = time.perf_counter()
            assert all(g[0] == v for g in got), f"{channel}: samplers hold {got}, expected version {v}"
            rows.append({"update_s": t2 - t0, "publish_s": t1 - t0, "pause_s": [g[1] for g in got]})
            del tensors
    finally:
        for s in samplers:
            ray.kill(s)
        publisher.close()
    measured = rows[1:]
    pauses = [p for r in measured for p in r["pause_s"]]
    update = statistics.median(r["update_s"] for r in measured)
    return {"channel": channel, "size_mb": size_mb, "bytes": nbytes, "samplers": cfg.samplers,
            "versions": len(measured),
            "update_seconds_median": round(update, 3),
            "update_seconds_max": round(max(r["update_s"] for r in measured), 3),
            "publish_seconds_median": round(statistics.median(r["publish_s"] for r in measured), 3),
            "sampler_pause_seconds_median": round(statistics.median(pauses), 3),
            "sampler_pause_seconds_max": round(max(pauses), 3),
            "delivered_mb_per_s": round(nbytes * cfg.samplers / update / 2**20, 1)}


def bench_weights(cfg: WeightsBenchConfig) -> dict:
    import ray

    cfg.validate()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False, log_to_driver=False,
                 _temp_dir="/tmp/diffrl-ray-bench")
    try:
        rows = [bench_one(cfg, channel, size, f"{channel}-{i}")
                for i, size in enumerate(cfg.sizes_mb) for channel in cfg.channels]
    finally:
        if started:
            ray.shutdown()
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "backend": cfg.backend, "results": rows}


def cmd_bench_weights(args: argparse.Namespace) -> int:
    from diffrl.cli import load_from_args

    print(json.dumps(bench_weights(load_from_args(WeightsBenchConfig, args)), indent=2))
    return 0


def register(bench_subparsers) -> None:
    """Add ``diffrl bench weights``."""
    from diffrl.cli import add_config_args

    p = bench_subparsers.add_parser(
        "weights", help="weight sync: seconds per update and sampler pause, object store vs torch.distributed",
        description="Publish p_samp versions of each size through each weight channel to sampler actors; print "
                    "seconds per update (publish until every sampler has it), publish time and sampler pause.")
    add_config_args(p, WeightsBenchConfig)
    p.set_defaults(func=cmd_bench_weights)
