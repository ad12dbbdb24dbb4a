"""``diffrl bench learner``: one learner step of a recipe's algorithm against the bound of its own
denoiser passes. Groups come from the recipe's sampler (in-process, the reward's scorer called
directly); the step is timed whole (decode, the algorithm's step with every forward and backward, the
optimizer steps, snapshot blending), then every denoiser call the step made is replayed bare with the
same inputs (forward, plus backward of the output's sum where the step took gradients). The ratio of
the two is what the algorithm's own work (advantages, losses, bookkeeping) costs on top."""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import torch


class _Recorder:
    """Forward pre-hook on one denoiser: the inputs and grad mode of every call."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls: list[tuple[tuple, dict, bool]] = []

    def __call__(self, module, args, kwargs):
        detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v
        self.calls.append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()},
                           torch.is_grad_enabled()))


def _replay(recorders: list[_Recorder]) -> float:
    """Seconds of the recorded calls, bare: forward, and backward of the output's sum for grad calls."""
    start = time.perf_counter()
    for rec in recorders:
        for args, kwargs, grad in rec.calls:
            with torch.set_grad_enabled(grad):
                out = rec.module(*args, **kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
                if grad:
                    out.float().sum().backward()
    return time.perf_counter() - start


def _role_modules(learner) -> list[torch.nn.Module]:
    """Every distinct denoiser the algorithm's roles run (trained, snapshots, frozen)."""
    nets, seen, out = learner.nets, set(), []
    for module in [*(t.engine.module for t in nets.trained.values()), *(s.module for s in nets.snapshots.values()),
                   *nets.frozen.values()]:
        if id(module) not in seen:
            seen.add(id(module))
            out.append(module)
    return out


def bench_learner(recipe: str, overrides: list[str], steps: int = 3) -> dict:
    from prometheus_client import CollectorRegistry

    from diffrl.actors.prompts import PromptSource
    from diffrl.actors.sampler import ListSink, Sampler
    from diffrl.config import load_config
    from diffrl.learner.learner import Learner
    from diffrl.learner.ray_learner import load_learner_model, load_teacher
    from diffrl.models.adapter import FlowModel
    from diffrl.reward_servers.client import GroupScores
    from diffrl.reward_servers.scorers import get_scorer
    from diffrl.schema import TrainConfig

    cfg = load_config(TrainConfig, recipe, [*overrides, "learner.checkpoint_every=0"])
    reward = cfg.rewards[0]
    options = dict(a.removeprefix("scorer.").split("=", 1) for a in reward.serve_args if a.startswith("scorer."))
    scorer = get_scorer(reward.scorer or reward.name, **options)

    class InProcess:
        def score_groups(self, groups):
            out = []
            for g in groups:
                scores, _ = scorer.score_batch(list(g.images), [g.prompt] * len(g.images), [g.metadata] * len(g.images))
                out.append(GroupScores(scores={reward.name: list(scores)}, combined=list(scores)))
            return out

    train, _ = cfg.data.load()
    sink = ListSink()
    sampler = Sampler("bench", cfg.sampler, FlowModel.from_config(cfg.model), InProcess(), sink,
                      PromptSource(train.items, seed=0))
    G = cfg.learner.groups_per_step
    while len(sink.groups) < G * (steps + 1):
        sampler.run_round()
    model = load_learner_model(cfg.learner, cfg.model)
    learner = Learner(replace(cfg.learner, reward_weights={reward.name: 1.0}), model, registry=CollectorRegistry(),
                      teacher=load_teacher(cfg.learner, cfg.model, model.device, model.dtype))
    learner.train_on_groups(sink.groups[:G])  # warm-up
    times = []
    recorders = [_Recorder(m) for m in _role_modules(learner)]
    for s in range(1, steps + 1):
        groups = sink.groups[s * G:(s + 1) * G]
        for g in groups:
            g.policy_version = learner.step
        handles = [r.module.register_forward_pre_hook(r, with_kwargs=True) for r in recorders] if s == steps else []
        t0 = time.perf_counter()
        learner.train_on_groups(groups)
        times.append(time.perf_counter() - t0)
        for h in handles:
            h.remove()
    bound = _replay(recorders)
    calls = [c for r in recorders for c in r.calls]
    grad_calls = sum(1 for *_, grad in calls if grad)
    return {"recipe": recipe, "algorithm": cfg.learner.algorithm, "machine": f"{platform.machine()}, "
            f"{torch.get_num_threads()} torch threads", "groups_per_step": G, "k": cfg.sampler.k,
            "step_seconds": [round(t, 3) for t in times], "step_seconds_last": round(times[-1], 3),
            "denoiser_calls": len(calls), "calls_with_grad": grad_calls,
            "bound_seconds": round(bound, 3), "bound_over_step": round(bound / times[-1], 3)}


def cmd_bench_learner(args: argparse.Namespace) -> int:
    from diffrl.cli import split_recipe

    recipe, overrides = split_recipe(list(args.config))
    print(json.dumps(bench_learner(recipe or "deploy/configs/shapes-cpu.yaml", overrides, args.steps), indent=2))
    return 0


def register(bench_subparsers) -> None:
    """Add ``diffrl bench learner``."""
    p = bench_subparsers.add_parser(
        "learner", help="one learner step of a recipe's algorithm vs the bound of its own denoiser passes",
        description="Sample groups with the recipe's sampler in-process, time learner steps of its algorithm, and "
                    "replay the step's denoiser calls bare (forward, and backward where the step took gradients) "
                    "as the bound; prints both and their ratio.")
    p.add_argument("config", nargs="*", metavar="[RECIPE] [key=value ...]", help="recipe, then dotted overrides")
    p.add_argument("--steps", type=int, default=3, help="timed learner steps (after one warm-up)")
    p.set_defaults(func=cmd_bench_learner)
