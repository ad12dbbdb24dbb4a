"""Prometheus plumbing of a run: where metrics endpoints bind, the file_sd targets file the driver
writes, and the held-out evaluation gauges the learner exports.

- Metrics endpoints of the learner and the samplers bind to ``$DIFFRL_METRICS_HOST`` (default
  127.0.0.1; set 0.0.0.0 on clusters so a Prometheus on another node can scrape them). Ports come
  from ``placement.metrics_port`` / ``sampler.metrics_port`` (0: free ports).
- ``diffrl train`` writes the run's targets in Prometheus file_sd format to
  ``RUN_DIR/prometheus_targets.json`` (kept as a record) and to
  ``OUTPUT_DIR/prometheus/RUN_NAME.json`` (removed when the run ends), which
  deploy/prometheus/prometheus.yml watches, so a Prometheus started once picks up every run.
  Targets carry ``job`` = learner | sampler | reward and ``diffrl_run`` = the run folder's name.
- The held-out evaluation (``diffrl_learner_eval_*``) is set on the learner's registry each time
  rank 0 evaluates p_samp, so Grafana shows accuracy and fidelity next to reward and KL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge

from diffrl.utils import PerRegistry

METRICS_HOST_ENV = "DIFFRL_METRICS_HOST"
"""Environment variable: bind address of the learner's and samplers' /metrics (default 127.0.0.1)."""
TARGETS_FILE = "prometheus_targets.json"
"""File_sd targets of a run, in its run folder."""
SD_DIR = "prometheus"
"""Folder under run.output_dir with one file_sd file per running run (what prometheus.yml watches)."""

# --- held-out evaluation gauges (exported by learner rank 0)
EVAL_REWARD = "diffrl_learner_eval_reward"
"""Gauge (label reward): mean reward of p_samp on the held-out prompts (fixed seeds), as the reward
servers score it."""
EVAL_PASS_RATE = "diffrl_learner_eval_pass_rate"
"""Gauge (label reward): fraction of held-out samples at or above the reward's pass threshold (rewards
that define one)."""
EVAL_STRICT_ACCURACY = "diffrl_learner_eval_strict_accuracy"
"""Gauge: GenEval-style strict accuracy of p_samp on the held-out prompts (fixed seeds)."""
EVAL_CLAUSE_ACCURACY = "diffrl_learner_eval_clause_accuracy"
"""Gauge (label clause = count|color|shape|partial): per-clause held-out accuracy."""
EVAL_SUBSET_STRICT_ACCURACY = "diffrl_learner_eval_subset_strict_accuracy"
"""Gauge (label subset, e.g. objects_3, one_kind, two_kind): strict accuracy on a prompt subset."""
EVAL_FIDELITY = "diffrl_learner_eval_fidelity"
"""Gauge: fraction of held-out sample pixels that belong to the world (background or palette colour)."""
EVAL_FID_SHAPES = "diffrl_learner_eval_fid_shapes"
"""Gauge: 100 x Fréchet distance of held-out samples to renders of the same pairs (docs/shapes_world.md)."""
EVAL_DIVERSITY = "diffrl_learner_eval_diversity"
"""Gauge (label images = samples|renders): within-prompt diversity of the held-out samples and of the
renders (the world's natural level)."""
EVAL_STEP = "diffrl_learner_eval_step"
"""Gauge: learner step of the last held-out evaluation."""
EVAL_SECONDS = "diffrl_learner_eval_seconds"
"""Gauge: wall time of the last held-out evaluation."""
EVALUATIONS_TOTAL = "diffrl_learner_evaluations_total"
"""Counter: held-out evaluations run."""

CLAUSES = ("count", "color", "shape", "partial")


def metrics_bind_host() -> str:
    return os.environ.get(METRICS_HOST_ENV) or "127.0.0.1"


def advertised_host() -> str:
    """Host other processes reach this process's metrics at: the bind address, or the node's IP
    when binding all interfaces."""
    host = metrics_bind_host()
    if host in ("0.0.0.0", "::"):
        import ray

        return ray.util.get_node_ip_address()
    return host


class EvalMetrics(PerRegistry):
    """The ``diffrl_learner_eval_*`` metrics, one set per registry."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.reward = Gauge(EVAL_REWARD, "Held-out mean reward of p_samp.", ["reward"], registry=r)
        self.pass_rate = Gauge(EVAL_PASS_RATE, "Held-out pass rate of p_samp.", ["reward"], registry=r)
        self.strict = Gauge(EVAL_STRICT_ACCURACY, "Held-out strict accuracy of p_samp.", registry=r)
        self.clause = Gauge(EVAL_CLAUSE_ACCURACY, "Held-out per-clause accuracy of p_samp.", ["clause"],
                            registry=r)
        self.subset = Gauge(EVAL_SUBSET_STRICT_ACCURACY, "Held-out strict accuracy on a prompt subset.",
                            ["subset"], registry=r)
        self.fidelity = Gauge(EVAL_FIDELITY, "Fraction of held-out sample pixels that belong to the world.",
                              registry=r)
        self.fid_shapes = Gauge(EVAL_FID_SHAPES, "Fréchet distance (x100) of held-out samples to renders.",
                                registry=r)
        self.diversity = Gauge(EVAL_DIVERSITY, "Within-prompt diversity of held-out images.", ["images"],
                               registry=r)
        self.step = Gauge(EVAL_STEP, "Learner step of the last held-out evaluation.", registry=r)
        self.seconds = Gauge(EVAL_SECONDS, "Wall time of the last held-out evaluation.", registry=r)
        self.evaluations = Counter(EVALUATIONS_TOTAL[: -len("_total")], "Held-out evaluations run.",
                                   registry=r)

    def observe(self, metrics: dict[str, float], step: int) -> None:
        """Record what :func:`diffrl.evaluation.evaluate` returned at learner step ``step``."""
        for key, value in metrics.items():
            if key.startswith("reward_") and not key.endswith("_sem"):
                self.reward.labels(reward=key.removeprefix("reward_")).set(value)
            elif key.startswith("pass_"):
                self.pass_rate.labels(reward=key.removeprefix("pass_")).set(value)
        if "strict" in metrics:
            self.strict.set(metrics["strict"])
        for clause in CLAUSES:
            if clause in metrics:
                self.clause.labels(clause=clause).set(metrics[clause])
        for key, value in metrics.items():
            if key.startswith("strict_"):
                self.subset.labels(subset=key.removeprefix("strict_")).set(value)
        if "fidelity" in metrics:
            self.fidelity.set(metrics["fidelity"])
        if "fid_shapes" in metrics:
            self.fid_shapes.set(metrics["fid_shapes"])
        for key, images in (("diversity", "samples"), ("diversity_renders", "renders")):
            if key in metrics:
                self.diversity.labels(images=images).set(metrics[key])
        self.seconds.set(metrics.get("seconds", 0.0))
        self.step.set(step)
        self.evaluations.inc()


# --------------------------------------------------------------------------------- file_sd targets
def _host_port(url: str) -> tuple[str, str, str]:
    """http://host:port/prefix[/metrics] -> (scheme, host:port, metrics path)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith("/metrics"):
        path += "/metrics"
    return parts.scheme or "http", parts.netloc, path


def prometheus_targets(endpoints: dict, run_name: str) -> list[dict]:
    """file_sd target groups for an endpoints.json dict (learner, samplers, reward replicas)."""
    groups: dict[tuple, list[str]] = {}

    def add(job: str, url: str) -> None:
        scheme, netloc, path = _host_port(url)
        groups.setdefault((job, scheme, path), []).append(netloc)

    if endpoints.get("learner_metrics"):
        add("learner", endpoints["learner_metrics"])
    for url in endpoints.get("sampler_metrics", []):
        add("sampler", url)
    for urls in endpoints.get("rewards", {}).values():
        for url in urls:
            add("reward", url)
    out = []
    for (job, scheme, path), targets in groups.items():
        labels = {"job": job, "diffrl_run": run_name}
        if path != "/metrics":
            labels["__metrics_path__"] = path
        if scheme != "http":
            labels["__scheme__"] = scheme
        out.append({"targets": targets, "labels": labels})
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # Prometheus never reads a half-written file


def write_prometheus_targets(run_dir: Path, output_dir: Path, endpoints: dict) -> Path:
    """Write RUN_DIR/prometheus_targets.json and OUTPUT_DIR/prometheus/RUN_NAME.json; returns the
    latter (remove it with :func:`remove_prometheus_sd` when the run ends)."""
    text = json.dumps(prometheus_targets(endpoints, run_dir.name), indent=2)
    _write_atomic(run_dir / TARGETS_FILE, text)
    sd_dir = output_dir / SD_DIR
    sd_dir.mkdir(parents=True, exist_ok=True)
    sd_file = sd_dir / f"{run_dir.name}.json"
    _write_atomic(sd_file, text)
    return sd_file


def remove_prometheus_sd(sd_file: Path) -> None:
    """The run is over: Prometheus stops scraping it (the run folder's copy stays as a record)."""
    sd_file.unlink(missing_ok=True)
