"""The ``diffrl`` command line.

Every command that takes a config reads an optional YAML recipe and ``key.sub=value`` overrides::

    diffrl pretrain deploy/configs/pretrain-shapes.yaml time_budget_s=300
    diffrl eval --model assets/shapes-base --prompts shapes:eval eval.guidance_scale=4
    diffrl eval --model runs/my-run --prompts my_prompts.jsonl
    diffrl bench sampler sampling.num_steps=20
    diffrl report runs/shapes-crd runs/shapes-grpo --out report

``diffrl COMMAND --help`` lists every key with its type, default and meaning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from diffrl import run_folder
from diffrl.config import format_help, load_config, run_command

# Library defaults that matter for a CPU service; users can still override them. The hub is used
# unless the user sets HF_HUB_OFFLINE=1 (model.path may be a hub id; docs/training.md).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def split_recipe(items: list[str]) -> tuple[str | None, list[str]]:
    """[RECIPE] [key=value ...] -> (recipe or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def add_config_args(parser: argparse.ArgumentParser, schema: type) -> None:
    parser.add_argument("config", nargs="*", metavar="[RECIPE] [key=value ...]",
                        help="optional YAML recipe, then dotted overrides")
    parser.epilog = "config keys:\n" + format_help(schema)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def load_from_args(schema: type, args: argparse.Namespace, extra: list[str] = ()):
    recipe, overrides = split_recipe(list(args.config))
    return load_config(schema, recipe, [*overrides, *extra])


# --------------------------------------------------------------------------------- pretrain
def cmd_pretrain(args: argparse.Namespace) -> int:
    from diffrl.models.pretrain import PretrainConfig, pretrain

    cfg = load_from_args(PretrainConfig, args)
    stats = pretrain(cfg)
    print(json.dumps(stats, indent=2))
    print(f"saved the base model to {cfg.output}")
    return 0


# --------------------------------------------------------------------------------- distill
def cmd_distill(args: argparse.Namespace) -> int:
    from diffrl.data import load_field
    from diffrl.models.distill import DistillConfig, distill

    cfg = load_from_args(DistillConfig, args)
    prompts = load_field(cfg.prompts, "prompts").prompts
    command = "diffrl distill " + " ".join(args.config)
    report = distill(cfg, list(prompts), command=command.strip())
    print(json.dumps(report, indent=2))
    for info in report["students"].values():
        print(f"saved the {info['num_steps']}-step student to {info['path']}")
    return 0


# --------------------------------------------------------------------------------- tiny-model
def cmd_tiny_model(args: argparse.Namespace) -> int:
    from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3

    recipe, overrides = split_recipe(list(args.config))
    arch = load_config(TinySD3Arch, recipe, ["max_tokens=77", *overrides])  # CLIP's length: whole prompts
    out = Path(args.out)
    if (out / "model_index.json").exists():
        print(f"diffrl: {out} already holds a pipeline; give another --out", file=sys.stderr)
        return 2
    pipe = build_tiny_sd3(arch, out / "_tokenizer_work", seed=args.seed)
    pipe.save_pretrained(str(out))
    import shutil

    shutil.rmtree(out / "_tokenizer_work", ignore_errors=True)
    print(f"saved a tiny random StableDiffusion3Pipeline ({arch.image_size} px) to {out}")
    return 0


# --------------------------------------------------------------------------------- train
def _interrupt_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, a deleted pod) tears the run down like Ctrl-C: reward servers and the
    embedded Redis are stopped, not orphaned."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_train(args: argparse.Namespace) -> int:
    from diffrl.job import NoProgressError, train
    from diffrl.learner.checkpoint import CheckpointOutageError
    from diffrl.schema import TrainConfig
    from diffrl.storage import StorageError, is_url

    extra = [f"run.resume={args.resume}"] if args.resume else []
    recipe, overrides = split_recipe(list(args.config))
    try:
        if args.resume and recipe is None and is_url(args.resume):
            recipe = _recipe_from_storage(args.resume)
        elif args.resume and recipe is None and (Path(args.resume) / run_folder.CONFIG).is_file():
            recipe = str(Path(args.resume) / run_folder.CONFIG)  # a resumed run keeps its recipe
        cfg = load_config(TrainConfig, recipe, [*overrides, *extra])
        _interrupt_on_sigterm()
        run_dir = train(cfg)
    except NoProgressError as err:
        print(f"diffrl: the job stopped: {err}", file=sys.stderr)
        return 1
    except (StorageError, CheckpointOutageError) as err:
        print(f"diffrl: the job stopped: {err}", file=sys.stderr)
        return 1
    summary = json.loads((run_dir / run_folder.SUMMARY).read_text())
    print(f"run folder: {run_dir}")
    for key in ("eval_start", "eval_end"):
        if key in summary:
            print_metrics(f"{key.replace('_', ' ')} (p_samp, held-out prompts)", summary[key])
    return 0


def _recipe_from_storage(url: str) -> str:
    """The recipe of a run in object storage (its latest config), in a local temporary file."""
    import tempfile

    from diffrl.storage import StorageError, open_storage

    storage = open_storage(url.rstrip("/"))
    text = storage.read_text(run_folder.CONFIG_RESUMED) or storage.read_text(run_folder.CONFIG)
    if text is None:
        raise StorageError(f"--resume {url}: no {run_folder.CONFIG} there (is it a run folder?)")
    path = Path(tempfile.mkdtemp(prefix="diffrl-resume-")) / run_folder.CONFIG
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------------- eval
def _eval_schema():
    from diffrl.schema import EvalCommandConfig

    return EvalCommandConfig


def is_run_path(path: str) -> bool:
    """A run folder (with checkpoints/) or one of its checkpoint folders, rather than a model folder."""
    p = Path(path)
    return (p / run_folder.CHECKPOINTS).is_dir() or (p.name.startswith("step_") and p.parent.name == run_folder.CHECKPOINTS)


def _run_eval_recipe(path: str, out: Path) -> Path:
    """An eval recipe from a run's config.yaml: its model, held-out prompts, rewards and eval settings."""
    from diffrl.config import load_config, to_yaml
    from diffrl.export import resolve_checkpoint
    from diffrl.schema import EvalCommandConfig, TrainConfig

    run_dir, _ = resolve_checkpoint(path)
    resumed = run_dir / run_folder.CONFIG_RESUMED  # the latest recipe of a resumed run
    run = load_config(TrainConfig, resumed if resumed.is_file() else run_dir / run_folder.CONFIG)
    recipe = out / "eval_recipe.yaml"
    out.mkdir(parents=True, exist_ok=True)
    recipe.write_text(to_yaml(EvalCommandConfig(model=run.model, prompts=run.data.eval, rewards=run.rewards,
                                                eval=run.eval, output_dir=str(out))))
    return recipe


def load_eval_config(args: argparse.Namespace):
    """The eval config: a run folder given as --model supplies its own recipe unless one is given."""
    recipe, overrides = split_recipe(list(args.config))
    extra = []
    if args.split:
        extra.append(f"prompts=shapes:{args.split}")
    if args.prompts:
        extra.append(f"prompts={args.prompts}")
    run_path = args.model if args.model and is_run_path(args.model) else None
    if args.model and not run_path:
        extra.append(f"model.path={args.model}")
    if run_path and recipe is None:
        probe = load_config(_eval_schema(), None, overrides)  # where the user wants the output
        recipe = str(_run_eval_recipe(run_path, Path(probe.output_dir)))
    cfg = load_config(_eval_schema(), recipe, [*overrides, *extra])
    if recipe is None and not any(o.startswith("rewards") for o in overrides):
        cfg.rewards = world_rewards(cfg.prompts, cfg.rewards)
    return cfg, run_path


def world_rewards(prompts: str, default: list):
    """The default reward of ``diffrl eval`` is the prompt set's world's own
    (``diffrl.models.worlds.DEFAULT_REWARDS``); ``default`` for prompt files."""
    from diffrl.models.worlds import DEFAULT_REWARDS
    from diffrl.schema import RewardSpec

    world = prompts.split(":", 1)[0] if ":" in prompts else ""
    if world not in DEFAULT_REWARDS:
        return default
    name, serve_args = DEFAULT_REWARDS[world]
    return [RewardSpec(name=name, serve_args=list(serve_args))]


def cmd_eval(args: argparse.Namespace) -> int:
    import contextlib

    from diffrl.data import load_field
    from diffrl.evaluation import evaluate
    from diffrl.job import _start_rewards
    from diffrl.models.adapter import FlowModel
    from diffrl.reward_servers.client import SyncRewardClient

    cfg, run_path = load_eval_config(args)
    prompt_set = load_field(cfg.prompts, "prompts")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if run_path:
        from diffrl.export import load_run_model

        model = load_run_model(run_path, step=args.step, weights="p_samp", device=cfg.model.device,
                               dtype=cfg.model.dtype)
    else:
        model = FlowModel.from_config(cfg.model)
    grid = out / "grid.png"
    with contextlib.ExitStack() as stack:
        scorer = None
        if cfg.rewards:
            client_cfg = _start_rewards(cfg, out, stack)
            scorer = stack.enter_context(contextlib.closing(SyncRewardClient(client_cfg)))
        metrics = evaluate(model, cfg.eval, prompt_set, scorer, [r.name for r in cfg.rewards], grid_path=grid)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    what = run_path or cfg.model.path
    print_metrics(f"{what} on {cfg.prompts} (cfg {cfg.eval.guidance_scale}, {cfg.eval.num_steps} steps)", metrics)
    print(f"image grid: {grid}")
    return 0


def print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(title)
    for key, value in metrics.items():
        if key.startswith("reward_") and not key.endswith("_sem"):
            name = key.removeprefix("reward_")
            sem = metrics.get(f"{key}_sem", 0.0)
            rate = f"  pass rate {metrics[f'pass_{name}']:.3f}" if f"pass_{name}" in metrics else ""
            print(f"  reward {name:<14} {value:.3f} ± {sem:.3f} (standard error){rate}")
    if metrics.get("eval_groups_masked"):
        print(f"  {int(metrics['eval_groups_masked'])} prompt groups could not be scored (see the warnings)")
    if "strict" in metrics:
        print("  shapes-world detector:")
        for key in ("strict", "count", "color", "shape", "partial"):
            print(f"    {key:<8} {metrics[key]:.3f}")
        by_n = {k: v for k, v in metrics.items() if k.startswith("strict_")}
        print("    " + "  ".join(f"{k.removeprefix('strict_')}={v:.2f}" for k, v in by_n.items()))
    if "ocr_exact" in metrics:
        print("  text-world OCR (exact match of the word / 1 - normalised edit distance):")
        for engine in ("ocr", "rapid"):
            if f"{engine}_exact" in metrics:
                name = "tesseract" if engine == "ocr" else "rapidocr (held-out judge)"
                print(f"    {name:<26} exact {metrics[f'{engine}_exact']:.3f} ± {metrics[f'{engine}_exact_sem']:.3f}"
                      f"  score {metrics[f'{engine}_score']:.3f}")
        print(f"  fidelity {metrics['fidelity']:.3f} (pixels that are background, ink or a blend of the two); "
              f"background_clean {metrics['background_clean']:.3f} (margin rows free of ink)")
    elif "fidelity" in metrics:
        print(f"  fidelity {metrics['fidelity']:.3f} (pixels that are background or a palette colour)")
    if "fid_shapes" in metrics:
        print(f"  fid_shapes {metrics['fid_shapes']:.2f} (Fréchet distance to renders of the same pairs, "
              "0 = like the world; two sets of renders ~0.3)")
    if "fid_text" in metrics:
        print(f"  fid_text {metrics['fid_text']:.2f} (Fréchet distance to renders of the same pairs, "
              "0 = like the world; two sets of renders ~0.05)")
    if "diversity" in metrics:
        print(f"  diversity {metrics['diversity']:.3f} within prompts "
              f"(renders of the same pairs {metrics['diversity_renders']:.3f})")
    print(f"  ({int(metrics['images'])} images, {metrics['seconds']:.1f} s)")


# --------------------------------------------------------------------------------- bench
def cmd_bench_sampler(args: argparse.Namespace) -> int:
    from diffrl.bench import SamplerBenchConfig, bench_sampler

    cfg = load_from_args(SamplerBenchConfig, args)
    print(json.dumps(bench_sampler(cfg), indent=2))
    return 0


def cmd_bench_loop(args: argparse.Namespace) -> int:
    from diffrl.bench import DEFAULT_LOOP_RECIPE, bench_loop

    recipe, overrides = split_recipe(list(args.config))
    print(json.dumps(bench_loop(recipe or DEFAULT_LOOP_RECIPE, overrides), indent=2))
    return 0


# --------------------------------------------------------------------------------- demo
DEMO_OVERRIDES = ("run.max_steps=30", "run.max_seconds=0", "run.eval_every=10")
"""The demo is the default recipe's first 30 steps (a few minutes); the recipe's full 30 minutes is what
moves held-out accuracy (docs/results.md)."""


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default end to end: a short CRD training of the shipped shapes-world base model."""
    from diffrl.models.adapter import REPO_ROOT

    recipe = str(REPO_ROOT / "deploy" / "configs" / "shapes-cpu.yaml")
    return main(["train", recipe, *DEMO_OVERRIDES, *args.config])


# --------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from diffrl.bench import SamplerBenchConfig
    from diffrl.models.pretrain import PretrainConfig
    from diffrl.schema import TrainConfig

    parser = argparse.ArgumentParser(
        prog="diffrl",
        description="RL post-training of text-to-image flow models (Centered Reward Distillation) as a "
                    "distributed actor-learner service.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="train a built-in world's base model from scratch (CPU, 13-25 min)",
                       description="Train the base model of a built-in world (world=shapes, the default, or "
                                   "world=text with deploy/configs/pretrain-text.yaml) from its renders: "
                                   "rectified flow, prompt dropout for CFG; saved in diffusers format.")
    add_config_args(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    from diffrl.models.distill import DistillConfig

    p = sub.add_parser("distill", help="make few-step and one-step students of a base model (resumable)",
                       description="Distil a base model into students that sample in few Euler steps: teacher ODE "
                                   "rollouts, then each student regresses its segments onto the teacher's secants "
                                   "(models/distill.py). Each student is saved in diffusers format with "
                                   "student.json (its σ grid and figures). Run the same command again to resume.")
    add_config_args(p, DistillConfig)
    p.set_defaults(func=cmd_distill)

    from diffrl.models.tiny_sd3 import TinySD3Arch

    p = sub.add_parser("tiny-model", help="write a tiny random SD3 pipeline (to try the whole job on a laptop)",
                       description="Build a StableDiffusion3Pipeline with tiny random weights from a config "
                                   "(no downloads) and save it in diffusers format: the same code path as "
                                   "SD3/SD3.5, sized for a CPU. It generates noise until trained.")
    p.add_argument("--out", required=True, help="folder to write the pipeline to")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    add_config_args(p, TinySD3Arch)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("train", help="RL post-training: Ray samplers -> reward servers -> Redis -> DeepSpeed learner",
                       description="Train with CRD (or another learner.algorithm). With no services "
                                   "configured this starts the embedded stack: local Ray, embedded Redis and "
                                   "the recipe's reward servers, torn down at the end or on Ctrl-C.")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    add_config_args(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out rewards of a model (or a run's weights), and a captioned grid",
                       description="Sample fixed (prompt, seed) pairs of a prompt set, score them through the "
                                   "rewards' servers (started locally unless they have urls), print each reward's "
                                   "mean, standard error and pass rate (plus the world's own metrics on the "
                                   "shapes and text worlds: detector or OCR accuracy, fidelity; their default "
                                   "reward is the world's own: shapes or ocr), and write a grid captioned with prompts and scores. "
                                   "--model RUN_DIR (or RUN_DIR/checkpoints/step_N) evaluates a run's p_samp "
                                   "with the run's own held-out prompts and rewards.")
    p.add_argument("--model", help="a diffusers model folder or hub id (model.path=...), a run folder or a "
                                   "checkpoint folder")
    p.add_argument("--step", type=int, help="with a run folder: the checkpoint step (default: the latest)")
    p.add_argument("--prompts", help="prompt set: shapes:eval|train|all, text:eval|train|all or a .txt/.jsonl file")
    p.add_argument("--split", choices=("eval", "train", "all"), help="shorthand for --prompts shapes:SPLIT")
    add_config_args(p, _eval_schema())
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="benchmarks (figures go to docs/benchmarks.md)")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bench.add_parser("sampler", help="sampler images/s vs the bare forward bound",
                         description="Images/s of the ODE sampler (encode, denoise, decode) against "
                                     "the bound of num_steps bare transformer forwards.")
    add_config_args(b, SamplerBenchConfig)
    b.set_defaults(func=cmd_bench_sampler)
    b = bench.add_parser("loop", help="the asynchronous service: end-to-end samples/s, learner idle fraction, "
                                      "sampler utilisation",
                         description="Run a short training on the embedded stack (default recipe "
                                     "deploy/configs/shapes-cpu.yaml, no evaluations) and report its throughput. "
                                     "`bench sync` is its synchronous baseline, `bench sync-vs-async` runs both.")
    add_config_args(b, TrainConfig)
    b.set_defaults(func=cmd_bench_loop)
    from diffrl.bench import register as register_bench

    register_bench(bench)  # bench sync, bench sync-vs-async
    from diffrl.bench_bus import register as register_bench_bus

    register_bench_bus(bench)  # bench bus
    from diffrl.bench_learner import register as register_bench_learner

    register_bench_learner(bench)  # bench learner
    from diffrl.bench_weights import register as register_bench_weights

    register_bench_weights(bench)  # bench weights

    p = sub.add_parser("demo", help="a short CRD training on the embedded default (what `make demo` runs)",
                       description=f"Same as `diffrl train deploy/configs/shapes-cpu.yaml {' '.join(DEMO_OVERRIDES)} "
                                   "[overrides]`: the default recipe's first 30 steps (a few minutes on 2 cores). "
                                   "Without these overrides the recipe trains for 30 minutes, which is what raises "
                                   "held-out accuracy (docs/results.md).")
    p.add_argument("config", nargs="*", help="overrides")
    p.set_defaults(func=cmd_demo)

    from diffrl.export import register as register_export
    from diffrl.report import register as register_report
    from diffrl.status import register as register_status

    register_status(sub)
    register_report(sub)
    register_export(sub)
    from diffrl.reward_model import register as register_reward_model

    register_reward_model(sub)
    for register in _plugins():
        register(sub, bench)
    return parser


def _plugins() -> list[Callable]:
    """Commands contributed by other packages: register(subparsers, bench_subparsers)."""
    plugins = []
    try:
        from diffrl.reward_servers.cli import register as register_rewards

        plugins.append(register_rewards)
    except ImportError as err:  # only while that package is absent
        if "diffrl.reward_servers.cli" not in str(err):
            raise
    return plugins


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
