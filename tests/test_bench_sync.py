"""The synchronous baseline of the loop benchmark (``diffrl bench sync``) on the tiny model, with real
parts: a shapes reward server process over HTTP with a simulated latency, an embedded redis-server,
the Sampler and the DeepSpeed Learner in this process, in lockstep."""

import json
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from diffrl.bench import bench_sync

STEPS, G, K, PER_ROUND, LATENCY_MS = 2, 2, 4, 1, 100.0


def test_sync_loop_trains_in_lockstep_with_consistent_counters(tiny_model, tmp_path):
    result = bench_sync("deploy/configs/shapes-cpu.yaml", [
        f"model.path={tiny_model}", f"run.output_dir={tmp_path}", "run.name=bench", f"run.max_steps={STEPS}",
        f"sampler.k={K}", f"sampler.groups_per_round={PER_ROUND}", "sampler.sampling.num_steps=2",
        f"learner.groups_per_step={G}", "learner.checkpoint_every=2", "learner.crd.num_noise_levels=2",
        "learner.crd.num_sampling_steps=2"], reward_latency_ms=LATENCY_MS)

    run_dir = Path(result["run_dir"])
    assert result["mode"] == "sync" and run_dir.name == "bench-sync"
    # counters: samples trained = steps x groups_per_step x k, every published group trained once
    assert result["learner_steps"] == STEPS
    assert result["groups_trained"] == STEPS * G and result["samples_trained"] == STEPS * G * K
    assert result["groups_published"] == result["sampler_rounds"] * PER_ROUND == STEPS * G
    ids = [line.split("\t")[0] for line in (run_dir / "trained_groups.txt").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == STEPS * G
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").exists()
    # lockstep: every group sampled by the newest p_samp, which the sampler loaded before each step
    assert result["staleness_mean"] == 0.0 and result["sampler_version_end"] == STEPS - 1
    # rates and fractions follow from the counters and the wall time
    assert abs(result["samples_trained_per_s"] * result["seconds"] - STEPS * G * K) < 1e-6
    assert 0 < result["learner_idle_fraction"] < 1 and 0 < result["sampler_utilisation"] < 1
    # nothing overlaps: learner stepping + sampler busy (+ polling) fit in the wall time
    assert result["sampler_utilisation"] + (1 - result["learner_idle_fraction"]) <= 1.0 + 1e-6
    # the reward server's simulated latency was waited for once per round
    assert result["sampler_stage_seconds"]["reward"] >= result["sampler_rounds"] * LATENCY_MS / 1000
    # the CPU of this process and its children (reward server, Redis) during the loop was measured
    assert result["cpu_seconds"] > 0 and 0 < result["cpu_cores_busy"] <= (os.cpu_count() or 1) + 0.5
    assert json.loads((run_dir / "bench_sync.json").read_text())["samples_trained"] == STEPS * G * K
