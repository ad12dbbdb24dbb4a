"""Prometheus metrics of the weight channels (prefix ``diffrl_weights_``, base units, counters end in
``_total``). Label ``channel`` is ``object_store`` or ``torch_dist``; the learner's series are in
learner rank 0's /metrics, a sampler's in that sampler's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from diffrl.utils import PerRegistry

PUBLISH_SECONDS = "diffrl_weights_publish_seconds"
"""Histogram (learner): time ``publish`` holds the training step (object_store: encode, put, register;
torch_dist: pack the snapshot)."""
UPDATE_SECONDS = "diffrl_weights_update_seconds"
"""Histogram (learner, torch_dist): time of sending one version to one sampler, request to last byte
(in a server thread, not in the training step)."""
SENT_BYTES_TOTAL = "diffrl_weights_sent_bytes_total"
"""Counter (learner): bytes of weight updates sent (object_store: put into the store once per version;
torch_dist: once per sampler and version)."""
RECEIVED_BYTES_TOTAL = "diffrl_weights_received_bytes_total"
"""Counter (sampler): bytes of weight updates received."""
FETCH_SECONDS = "diffrl_weights_fetch_seconds"
"""Histogram (sampler): the sampler's pause in ``fetch_newer`` for an update it got (transfer, decode;
loading into the model is in ``diffrl_sampler_stage_seconds_total{stage="weights"}``)."""
TRANSFER_FAILURES_TOTAL = "diffrl_weights_transfer_failures_total"
"""Counter (labels channel, side: learner|sampler, reason: timeout|error): transfers that failed; the
sampler keeps its weights and tries again at its next poll."""

BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class WeightMetrics(PerRegistry):
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.publish_seconds = Histogram(PUBLISH_SECONDS, "Time publish() holds the training step.", ["channel"],
                                         buckets=BUCKETS, registry=r)
        self.update_seconds = Histogram(UPDATE_SECONDS, "Time of sending one version to one sampler.",
                                        ["channel"], buckets=BUCKETS, registry=r)
        self.sent_bytes = Counter(SENT_BYTES_TOTAL.removesuffix("_total"), "Bytes of weight updates sent.",
                                  ["channel"], registry=r)
        self.received_bytes = Counter(RECEIVED_BYTES_TOTAL.removesuffix("_total"),
                                      "Bytes of weight updates received.", ["channel"], registry=r)
        self.fetch_seconds = Histogram(FETCH_SECONDS, "Sampler pause in fetching one newer version.", ["channel"],
                                       buckets=BUCKETS, registry=r)
        self.failures = Counter(TRANSFER_FAILURES_TOTAL.removesuffix("_total"), "Weight transfers that failed.",
                                ["channel", "side", "reason"], registry=r)
