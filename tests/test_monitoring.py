"""The Prometheus pieces of a run without running one: file_sd targets from endpoints.json, the held-out
evaluation gauges, and `diffrl status` on run folders that are not running. (A live run is checked in
tests/test_operations.py.)"""

import json
import os
import time

from prometheus_client import CollectorRegistry, generate_latest

from diffrl.cli import main
from diffrl.learner.metrics import LearnerMetrics
from diffrl.monitoring import (
    EvalMetrics,
    prometheus_targets,
    remove_prometheus_sd,
    write_prometheus_targets,
)
from diffrl.status import (
    FINISHED,
    NOT_RUNNING,
    NOT_STARTED,
    collect_status,
    format_status,
)
from diffrl.utils import free_port

ENDPOINTS = {
    "learner_metrics": "http://10.0.0.1:9101/metrics",
    "sampler_metrics": ["http://10.0.0.2:9102/metrics", "http://10.0.0.3:9102/metrics"],
    "rewards": {"shapes": ["http://127.0.0.1:8101", "http://127.0.0.1:8102/"],
                "ocr": ["https://serve.example:8000/ocr"]},
    "redis": "redis://127.0.0.1:6379",
}


def test_targets_group_by_job_and_keep_reward_route_prefixes():
    groups = prometheus_targets(ENDPOINTS, "run-7")
    by = {(g["labels"]["job"], g["labels"].get("__metrics_path__", "/metrics"), g["labels"].get("__scheme__", "http")):
          g["targets"] for g in groups}
    assert by == {
        ("learner", "/metrics", "http"): ["10.0.0.1:9101"],
        ("sampler", "/metrics", "http"): ["10.0.0.2:9102", "10.0.0.3:9102"],
        ("reward", "/metrics", "http"): ["127.0.0.1:8101", "127.0.0.1:8102"],
        ("reward", "/ocr/metrics", "https"): ["serve.example:8000"],  # a Ray Serve route behind its proxy
    }
    assert all(g["labels"]["diffrl_run"] == "run-7" for g in groups)
    # never a `reward` target label: it would clash with the reward servers' own `reward` label
    assert all(set(g["labels"]) <= {"job", "diffrl_run", "__metrics_path__", "__scheme__"} for g in groups)


def test_targets_files_are_written_then_the_live_one_removed(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    sd = write_prometheus_targets(run_dir, tmp_path / "runs", ENDPOINTS)
    assert sd == tmp_path / "runs" / "prometheus" / "r1.json"
    assert json.loads(sd.read_text()) == json.loads((run_dir / "prometheus_targets.json").read_text())
    assert not list(sd.parent.glob(".*"))  # no temporary file left for Prometheus to read
    remove_prometheus_sd(sd)
    assert not sd.exists() and (run_dir / "prometheus_targets.json").exists()


def test_eval_gauges_follow_the_last_evaluation():
    registry = CollectorRegistry()
    m = EvalMetrics.for_registry(registry)
    assert EvalMetrics.for_registry(registry) is m
    # each metric set keeps its own table: the learner's set on the same registry is another object
    learner_set = LearnerMetrics.for_registry(registry)
    assert isinstance(learner_set, LearnerMetrics) and LearnerMetrics.for_registry(registry) is learner_set
    assert EvalMetrics.for_registry(CollectorRegistry()) is not m
    m.observe({"strict": 0.25, "count": 0.5, "color": 1.0, "shape": 0.75, "partial": 0.6, "images": 8.0,
               "strict_objects_3": 0.5, "strict_two_kind": 0.0, "fidelity": 0.97, "seconds": 1.5}, step=10)
    m.observe({"strict": 0.5, "count": 0.75, "color": 1.0, "shape": 0.75, "partial": 0.7, "images": 8.0,
               "strict_objects_3": 1.0, "strict_two_kind": 0.5, "fidelity": 0.96, "seconds": 1.2,
               "fid_shapes": 14.5, "diversity": 0.27, "diversity_renders": 0.28,
               "reward_shapes": 0.7, "reward_shapes_sem": 0.05, "pass_shapes": 0.5}, step=20)
    get = registry.get_sample_value
    assert get("diffrl_learner_eval_strict_accuracy") == 0.5
    assert get("diffrl_learner_eval_clause_accuracy", {"clause": "count"}) == 0.75
    assert get("diffrl_learner_eval_subset_strict_accuracy", {"subset": "objects_3"}) == 1.0
    assert get("diffrl_learner_eval_fidelity") == 0.96
    assert get("diffrl_learner_eval_fid_shapes") == 14.5
    assert get("diffrl_learner_eval_diversity", {"images": "samples"}) == 0.27
    assert get("diffrl_learner_eval_diversity", {"images": "renders"}) == 0.28
    assert get("diffrl_learner_eval_step") == 20 and get("diffrl_learner_evaluations_total") == 2
    assert get("diffrl_learner_eval_reward", {"reward": "shapes"}) == 0.7
    assert get("diffrl_learner_eval_pass_rate", {"reward": "shapes"}) == 0.5
    assert get("diffrl_learner_eval_reward", {"reward": "shapes_sem"}) is None  # the error is not a reward
    assert b'subset="images"' not in generate_latest(registry)
    # a task without the shapes world: its rewards only
    other = EvalMetrics.for_registry(CollectorRegistry())
    other.observe({"reward_ocr": 0.4, "reward_ocr_sem": 0.1, "pass_ocr": 0.25, "images": 8.0, "seconds": 1.0}, step=5)
    assert other.reward.labels(reward="ocr")._value.get() == 0.4 and other.step._value.get() == 5


def test_status_of_runs_that_are_not_running(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    st = collect_status(run_dir)
    assert st["state"] == NOT_STARTED and "endpoints.json" in st["message"]

    port = free_port()  # nothing listens there
    (run_dir / "endpoints.json").write_text(json.dumps({**ENDPOINTS, "learner_metrics": f"http://127.0.0.1:{port}/metrics"}))
    st = collect_status(run_dir, timeout_s=1.0)
    assert st["state"] == NOT_RUNNING and "unreachable" in st["message"]

    time.sleep(0.01)
    (run_dir / "summary.json").write_text(json.dumps({"end_step": 30, "seconds": 95.0}))
    os.utime(run_dir / "summary.json")
    st = collect_status(run_dir, timeout_s=1.0)
    assert st["state"] == FINISHED and "step 30" in st["message"]
    assert format_status(st).splitlines()[0] == f"run {run_dir}: FINISHED"

    assert main(["status", str(run_dir)]) == 1 and "not running" in capsys.readouterr().out
    assert main(["status", "--output-dir", str(tmp_path / "none")]) == 2
    assert "no run folder" in capsys.readouterr().out
