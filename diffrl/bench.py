"""Benchmarks (not tests): ``diffrl bench sampler``. Figures go to docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import torch

from diffrl.config import require
from models.config import ModelConfig, SamplingConfig


@dataclass
class SamplerBenchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to sample from."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampler settings (steps, CFG, batch size)."""
    num_prompts: int = 8
    """Prompts per measured round."""
    k: int = 8
    """Samples per prompt (images per round = num_prompts * k)."""
    rounds: int = 3
    """Measured rounds (after one warm-up round)."""

    def validate(self) -> None:
        require(self.num_prompts >= 1, "num_prompts", "an int >= 1")
        require(self.k >= 1, "k", "an int >= 1")
        require(self.rounds >= 1, "rounds", "an int >= 1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_sampler(cfg: SamplerBenchConfig) -> dict:
    """Images/s of the full sampler (prompt encoding, Euler ODE with CFG, decoding to uint8) against
    the bound set by the denoiser alone: num_steps forwards of the same batch (x2 with CFG)."""
    from models import shapes_world
    from models.adapter import FlowModel

    model = FlowModel.from_config(cfg.model)
    s = cfg.sampling
    base = shapes_world.train_prompts()
    n = cfg.num_prompts * cfg.k

    def one_round(r: int) -> float:
        prompts = [base[(r * cfg.num_prompts + i) % len(base)] for i in range(cfg.num_prompts) for _ in range(cfg.k)]
        seeds = list(range(r * n, (r + 1) * n))
        _sync(model.device)
        start = time.perf_counter()
        model.generate(prompts, seeds, num_steps=s.num_steps, guidance_scale=s.guidance_scale, shift=s.shift,
                       batch_size=s.batch_size)
        _sync(model.device)
        return time.perf_counter() - start

    one_round(0)
    sampler_s = min(one_round(r) for r in range(1, cfg.rounds + 1))

    # The bound: the bare transformer forward on a batch of the same size, num_steps times.
    cfg_factor = 1 if s.guidance_scale == 1.0 else 2
    batch = min(n, s.batch_size) * cfg_factor
    x = torch.randn(batch, *model.latent_shape, device=model.device, dtype=model.dtype)
    cond = model.encode_prompts(base[:1]).repeat_interleave(batch)
    sigma = torch.full((batch,), 0.5, device=model.device)
    with torch.no_grad():
        model.velocity(x, sigma, cond)
        times = []
        for _ in range(max(3, cfg.rounds)):
            _sync(model.device)
            t0 = time.perf_counter()
            model.velocity(x, sigma, cond)
            _sync(model.device)
            times.append(time.perf_counter() - t0)
    forward_s = min(times)
    chunks = -(-n // s.batch_size)
    bound_s = forward_s * s.num_steps * chunks
    return {
        "device": str(model.device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "images": n,
        "num_steps": s.num_steps,
        "guidance_scale": s.guidance_scale,
        "batch_size": s.batch_size,
        "sampler_images_per_s": n / sampler_s,
        "bound_images_per_s": n / bound_s,
        "efficiency": bound_s / sampler_s,
        "forward_ms": forward_s * 1000,
    }


def bench_loop(recipe: str | None, overrides: list[str]) -> dict:
    """End-to-end throughput of the actor-learner loop on the embedded stack: trains ``run.max_steps``
    steps without evaluations and reports samples/s, learner step time and idle fraction, and
    sampler utilisation (busy, paused by backpressure)."""
    import json

    from diffrl.config import load_config
    from diffrl.job import train
    from diffrl.schema import TrainConfig

    cfg = load_config(TrainConfig, recipe, [*overrides, "run.eval_every=0"])
    run_dir = train(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("kind") == "train"]
    wall = summary["train_seconds"]
    step_seconds = [s["step_seconds"] for s in steps]
    k = cfg.sampler.k
    trained = summary["learner_counters"]["groups_trained"]
    busy, paused = summary["sampler_busy_seconds"], summary["sampler_paused_seconds"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "run_dir": str(run_dir),
        "learner_steps": len(steps),
        "seconds": wall,
        "samples_trained_per_s": trained * k / wall,
        "samples_produced_per_s": summary["groups_published"] * k / wall,
        "learner_step_seconds_mean": sum(step_seconds) / max(len(step_seconds), 1),
        "learner_idle_fraction": max(0.0, 1 - sum(step_seconds) / wall),
        "sampler_utilisation": sum(busy) / (len(busy) * wall),
        "sampler_paused_fraction": sum(paused) / (len(paused) * wall),
        "staleness_mean": sum(s.get("staleness_mean", 0.0) for s in steps) / max(len(steps), 1),
    }
    (run_dir / "bench_loop.json").write_text(json.dumps(result, indent=2))
    return result
