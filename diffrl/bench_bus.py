"""``diffrl bench bus``: what trajectory records cost on the experience bus. Bytes per group with and
without trajectories (float32 and float16 storage), Redis memory per group, and groups/s through a
real (embedded) Redis stream: publish, then read, decode, validate and acknowledge in batches, the way
samplers and the learner do."""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field

import torch

from diffrl.config import require

VARIANTS = ("final", "trajectory-float32", "trajectory-float16")


@dataclass
class BusBenchConfig:
    latent: list[int] = field(default_factory=lambda: [3, 32, 32])
    """Latent shape [C, H, W] of a sample (shapes world: 3x32x32 pixels; SD3.5 at 512 px: 16x64x64)."""
    k: int = 8
    """Samples per group."""
    steps: int = 4
    """Recorded steps S per trajectory (S + 1 states, S predictions)."""
    groups: int = 200
    """Groups published and consumed per variant."""
    read_batch: int = 8
    """Groups per read (a learner step's worth)."""

    def validate(self) -> None:
        require(len(self.latent) == 3 and all(d >= 1 for d in self.latent), "latent", "[C, H, W]", self.latent)
        require(self.k >= 2, "k", "an int >= 2", self.k)
        require(self.steps >= 1, "steps", "an int >= 1", self.steps)
        require(self.groups >= 1, "groups", "an int >= 1", self.groups)
        require(self.read_batch >= 1, "read_batch", "an int >= 1", self.read_batch)


def make_group(cfg: BusBenchConfig, index: int, variant: str):
    """A group of random latents (and trajectories, per ``variant``) as a sampler publishes it."""
    from diffrl.actors.sampler import trajectory_proto
    from diffrl.models.adapter import SampledTrajectory
    from diffrl.proto import experience_pb2
    from diffrl.proto.codec import tensor_to_proto

    gen = torch.Generator().manual_seed(index)
    C, H, W = cfg.latent
    S, K = cfg.steps, cfg.k
    group = experience_pb2.Group(group_id=f"bench:{variant}:{index}", prompt="a red circle", policy_version=1,
                                 sampler_id="bench", created_at=time.time())
    traj = None
    if variant != "final":
        states = torch.randn(K, S + 1, C, H, W, generator=gen)
        traj = SampledTrajectory(x0=states[:, -1], states=states, log_probs=torch.randn(K, S, generator=gen),
                                 x0_preds=torch.randn(K, S, C, H, W, generator=gen),
                                 sigmas=torch.linspace(1, 0, S + 1, dtype=torch.float64))
    for i in range(K):
        latent = traj.x0[i] if traj is not None else torch.randn(C, H, W, generator=gen)
        sample = group.samples.add(seed=index * K + i, latent=tensor_to_proto(latent))
        sample.rewards["r"] = float(i)
        if traj is not None:
            sample.trajectory.CopyFrom(trajectory_proto(traj, i, index * K + i - i % 2, index * K + i, "eta", 1.0, 1.0,
                                                        i // 2, variant.split("-")[1]))
    return group


def bench_variant(cfg: BusBenchConfig, variant: str, client) -> dict:
    from diffrl.proto.bus import ExperienceConsumer, ExperienceProducer
    from diffrl.proto.codec import group_to_bytes

    stream = f"bench-{variant}"
    groups = [make_group(cfg, i, variant) for i in range(cfg.groups)]
    group_bytes = sum(len(group_to_bytes(g)) for g in groups) / len(groups)
    producer = ExperienceProducer(client, stream=stream)
    consumer = ExperienceConsumer(client, stream=stream)
    mem0 = int(client.info("memory")["used_memory"])
    t0 = time.perf_counter()
    for g in groups:
        producer.publish(g)
    t1 = time.perf_counter()
    mem1 = int(client.info("memory")["used_memory"])
    got = 0
    while got < cfg.groups:
        entries = consumer.read(max_groups=cfg.read_batch, block_ms=100)
        got += len(entries)
        consumer.ack([entry_id for entry_id, _ in entries])
    t2 = time.perf_counter()
    consumer.trim_acknowledged()
    client.delete(stream)
    return {"variant": variant, "bytes_per_group": round(group_bytes), "redis_bytes_per_group":
            round((mem1 - mem0) / cfg.groups), "publish_groups_per_s": round(cfg.groups / (t1 - t0), 1),
            "consume_groups_per_s": round(cfg.groups / (t2 - t1), 1),
            "end_to_end_groups_per_s": round(cfg.groups / (t2 - t0), 1),
            "mb_per_s": round(cfg.groups * group_bytes / (t2 - t0) / 1e6, 1)}


def bench_bus(cfg: BusBenchConfig) -> dict:
    from diffrl.embedded_redis import EmbeddedRedis

    cfg.validate()
    with EmbeddedRedis() as redis:
        client = redis.client()
        rows = [bench_variant(cfg, v, client) for v in VARIANTS]
    return {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "latent": cfg.latent, "k": cfg.k,
            "steps": cfg.steps, "groups": cfg.groups, "variants": rows}


def cmd_bench_bus(args: argparse.Namespace) -> int:
    from diffrl.cli import load_from_args

    print(json.dumps(bench_bus(load_from_args(BusBenchConfig, args)), indent=2))
    return 0


def register(bench_subparsers) -> None:
    """Add ``diffrl bench bus``."""
    from diffrl.cli import add_config_args

    p = bench_subparsers.add_parser(
        "bus", help="trajectory records on the experience bus: bytes per group, Redis memory, groups/s",
        description="Publish and consume groups through an embedded Redis stream without trajectories and with "
                    "float32 and float16 trajectory records; print bytes per group, Redis memory per group and "
                    "groups/s (publish, read + decode + ack).")
    add_config_args(p, BusBenchConfig)
    p.set_defaults(func=cmd_bench_bus)
