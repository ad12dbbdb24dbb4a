"""Prometheus metrics of reward servers (``diffrl_reward_*``) and of their client
(``diffrl_reward_client_*``). Base units, counters end in ``_total``; the only labels are the
reward name, an encoding, a stage, an HTTP status class or an error kind; never prompt text.

Server metrics live in a registry per app (several apps may share a process in tests or under Ray
Serve). With several uvicorn workers, ``PROMETHEUS_MULTIPROC_DIR`` is set by ``diffrl reward
serve`` and ``/metrics`` aggregates all workers. Client metrics are process-wide (the default
registry, which the sampler's own ``/metrics`` exposes).
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# --- server
REQUEST_DURATION = "diffrl_reward_request_duration_seconds"
IMAGES_SCORED = "diffrl_reward_images_scored_total"
REQUESTS = "diffrl_reward_requests_total"
BATCH_SIZE = "diffrl_reward_batch_size_images"
SCORER_DURATION = "diffrl_reward_scorer_duration_seconds"
ERRORS = "diffrl_reward_errors_total"
PENDING = "diffrl_reward_pending_images"
INJECTED_LATENCY = "diffrl_reward_injected_latency_seconds_total"
# --- client
CLIENT_REQUESTS = "diffrl_reward_client_requests_total"
CLIENT_RETRIES = "diffrl_reward_client_retries_total"
CLIENT_FAILURES = "diffrl_reward_client_group_failures_total"
CLIENT_EJECTIONS = "diffrl_reward_client_ejections_total"
CLIENT_READMISSIONS = "diffrl_reward_client_readmissions_total"
CLIENT_DURATION = "diffrl_reward_client_request_duration_seconds"

INITIAL_ERROR_KINDS = ("internal", "item_error", "overloaded")
"""Error kinds a server exports at 0 before any occurs (scorer crashes, per-item failures, refusals
under load); other kinds (bad requests) appear when they first happen."""

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServerMetrics:
    """The metrics of one reward server app (labels already bound to its reward name)."""

    def __init__(self, reward: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reward = reward
        self.request_duration = Histogram(
            REQUEST_DURATION, "Time from request received to response ready, by encoding and status class.",
            ["reward", "encoding", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter(REQUESTS[:-len("_total")], "Scoring requests answered, by status class.",
                                ["reward", "status"], registry=r)
        self.images = Counter(IMAGES_SCORED[:-len("_total")], "Images scored (valid scores returned).",
                              ["reward"], registry=r)
        self.batch_size = Histogram(
            BATCH_SIZE, "Images per request (stage=request) and per scorer call (stage=scorer, after "
            "micro-batching).", ["reward", "stage"], buckets=_BATCH_BUCKETS, registry=r)
        self.scorer_duration = Histogram(
            SCORER_DURATION, "Time of one scorer call (decoded images in, scores out).", ["reward"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.errors = Counter(ERRORS[:-len("_total")], "Refused requests and failed items, by kind.",
                              ["reward", "kind"], registry=r)
        for kind in INITIAL_ERROR_KINDS:  # exported as 0 from the start, so error rates are 0, not absent
            self.errors.labels(reward, kind)
        self.pending = Gauge(PENDING, "Images admitted and not yet scored.", ["reward"], registry=r,
                             multiprocess_mode="livesum")
        self.injected_latency = Counter(
            INJECTED_LATENCY[:-len("_total")], "Simulated latency added to answers (execution.latency_ms; "
            "benchmarks only).", ["reward"], registry=r)

    def error(self, kind: str, n: int = 1) -> None:
        self.errors.labels(self.reward, kind).inc(n)

    def exposition(self) -> bytes:
        mp = multiprocess_dir()
        if mp:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=mp)
            return generate_latest(registry)
        return generate_latest(self.registry)


class _ClientMetrics:
    def __init__(self) -> None:
        self.requests = Counter(CLIENT_REQUESTS[:-len("_total")], "HTTP attempts to reward replicas, by outcome.",
                                ["reward", "outcome"], registry=REGISTRY)
        self.retries = Counter(CLIENT_RETRIES[:-len("_total")], "Scoring attempts that were retried.",
                               ["reward"], registry=REGISTRY)
        self.failures = Counter(CLIENT_FAILURES[:-len("_total")], "Groups that a reward failed to score "
                                "(after retries), by kind.", ["reward", "kind"], registry=REGISTRY)
        self.ejections = Counter(CLIENT_EJECTIONS[:-len("_total")], "Replicas taken out of rotation.",
                                 ["reward"], registry=REGISTRY)
        self.readmissions = Counter(CLIENT_READMISSIONS[:-len("_total")], "Ejected replicas put back after "
                                    "a successful health check.", ["reward"], registry=REGISTRY)
        self.duration = Histogram(CLIENT_DURATION, "Duration of one HTTP scoring attempt.", ["reward"],
                                  buckets=_LATENCY_BUCKETS, registry=REGISTRY)


_client_metrics: _ClientMetrics | None = None


def client_metrics() -> _ClientMetrics:
    """Process-wide client metrics (created on first use, in the default registry)."""
    global _client_metrics
    if _client_metrics is None:
        _client_metrics = _ClientMetrics()
    return _client_metrics
