"""End to end on CPU with real parts: a local Ray with 2 sampler actors and 1 learner actor (DeepSpeed,
CRD), 1 shapes reward server process over HTTP, an embedded redis-server; then a resumed run."""

import json
import math
import re

import pytest

from diffrl.config import load_config
from diffrl.job import train
from diffrl.schema import TrainConfig

pytestmark = pytest.mark.slow


def scrape_value(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in the scrape"
    return float(match.group(1))


def config(tiny_model, tmp_path, *extra):
    return load_config(TrainConfig, "deploy/configs/shapes-cpu.yaml", [
        f"model.path={tiny_model}", f"run.output_dir={tmp_path}", "run.name=e2e", "run.max_steps=3",
        "run.eval_every=3", "run.progress=false", "eval.max_prompts=2", "eval.num_steps=2",
        "sampler.num_samplers=2", "sampler.k=4", "sampler.groups_per_round=1", "sampler.max_pending_groups=2",
        "sampler.sampling.num_steps=2", "learner.groups_per_step=2", "learner.checkpoint_every=2",
        "learner.crd.num_noise_levels=2", "learner.crd.num_sampling_steps=2", "ray.temp_dir=/tmp/diffrl-ray-test",
        *extra])


def test_train_end_to_end_then_resume(tiny_model, tmp_path):
    run_dir = train(config(tiny_model, tmp_path))
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in lines if rec["kind"] == "train"]

    # >= 3 learner steps with finite losses; groups flowed through Redis from both samplers
    assert summary["end_step"] == 3 and [rec["step"] for rec in steps] == [1, 2, 3]
    assert all(math.isfinite(rec["loss"]) for rec in steps)
    counters = summary["learner_counters"]
    assert counters["groups_trained"] == 3 * 2
    assert summary["groups_published"] >= counters["groups_trained"]
    # samplers started on the base model and ended on a newer p_samp
    assert summary["sampler_versions_start"] == [0, 0]
    assert all(v >= 1 for v in summary["sampler_versions_end"]), summary["sampler_versions_end"]
    # the learner's metrics endpoint reported the steps (scraped over HTTP at the end of the run)
    scrape = (run_dir / "metrics_final.prom").read_text()
    assert scrape_value(scrape, "diffrl_learner_optimizer_steps_total") == 3
    # run folder: config, evaluation lines and grids before/after, a checkpoint
    assert (run_dir / "config.yaml").is_file()
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and all(0 <= e["strict"] <= 1 for e in evals)
    assert (run_dir / "grids" / "step_000000.png").is_file() and (run_dir / "grids" / "step_000003.png").is_file()
    assert (run_dir / "checkpoints" / "latest").exists()

    # resume: continues from the checkpoint's step (3) to 5
    resumed = train(config(tiny_model, tmp_path, f"run.resume={run_dir}", "run.max_steps=5"))
    assert resumed == run_dir
    summary2 = json.loads((run_dir / "summary.json").read_text())
    assert summary2["resumed"] and summary2["start_step"] == 3 and summary2["end_step"] == 5
    steps2 = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in steps2 if rec["kind"] == "train"][-2:] == [4, 5]

    # the ledger (docs/reliability.md): every group produced has one fate or is pending, across both
    # runs; each committed trained group is listed once
    ledger = json.loads((run_dir / "ledger.json").read_text())
    fates = ("trained", "dropped_stale", "masked", "duplicate", "invalid", "malformed", "lost")
    assert ledger["balanced"] and ledger["produced"] == sum(ledger[f] for f in fates) + ledger["pending"], ledger
    ids = [line.split("\t")[0] for line in (run_dir / "trained_groups.txt").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == ledger["trained"] == 5 * 2

    # the default tracker (tracking.backends=[tensorboard]): both legs' steps in RUN_DIR/tensorboard, with
    # metrics.jsonl's values (float32 there), each held-out evaluation and its grid
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = {rec["step"]: rec["loss"] for rec in steps2 if rec["kind"] == "train"}
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([losses[s] for s in range(1, 6)], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/strict")] == [e.step for e in events.Images("eval/grid")] == [0, 3, 5]
