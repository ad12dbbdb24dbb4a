"""Prometheus metrics of the learner (prefix ``diffrl_learner_``, base units, counters end in
``_total``, no prompt text in labels; the only label is the reward function's name). An algorithm's
own gauges are declared in its file (``Algorithm.gauges``) and made here (``LearnerMetrics.gauge``).

Metrics live in a registry passed in (default: prometheus_client's global one), so tests can read
values with ``registry.get_sample_value(NAME, labels)``. One :class:`LearnerMetrics` per registry
(``LearnerMetrics.for_registry``), so several learners in one process share the series instead of
failing on duplicate registration.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from diffrl.utils import PerRegistry

PREFIX = "diffrl_learner_"

STEP_SECONDS = "diffrl_learner_step_seconds"
"""Histogram: wall time of one optimizer step (all noise levels, EMA, publish)."""
CHECKPOINT_SECONDS = "diffrl_learner_checkpoint_seconds"
"""Histogram: wall time of writing one checkpoint."""
CHECKPOINT_FAILURES_TOTAL = "diffrl_learner_checkpoint_failures_total"
"""Counter: checkpoints that could not be saved to the run's storage (their entries stay unacknowledged)."""
LAST_CHECKPOINT_TIMESTAMP = "diffrl_learner_last_checkpoint_timestamp_seconds"
"""Gauge: Unix time of the last checkpoint saved (and, with object storage, committed there)."""
OPTIMIZER_STEPS_TOTAL = "diffrl_learner_optimizer_steps_total"
"""Counter: optimizer steps taken."""
GROUPS_CONSUMED_TOTAL = "diffrl_learner_groups_consumed_total"
"""Counter: groups trained on."""
GROUPS_DROPPED_STALE_TOTAL = "diffrl_learner_groups_dropped_stale_total"
"""Counter: groups dropped because their policy_version was more than max_staleness behind."""
GROUPS_MASKED_TOTAL = "diffrl_learner_groups_masked_total"
"""Counter: groups skipped because a reward failed (Group.masked)."""
GROUPS_DUPLICATE_TOTAL = "diffrl_learner_groups_duplicate_total"
"""Counter: re-delivered or re-published groups skipped because their group_id was already trained."""
GROUPS_INVALID_TOTAL = "diffrl_learner_groups_invalid_total"
"""Counter: well-formed entries whose group cannot be trained (latent shape, missing reward, < 2 samples)."""
ENTRIES_MALFORMED_TOTAL = "diffrl_learner_entries_malformed_total"
"""Counter: stream entries that were not valid groups (counted by the consumer, acknowledged)."""
SAMPLES_TOTAL = "diffrl_learner_samples_total"
"""Counter: samples trained on."""
SAMPLES_PER_SECOND = "diffrl_learner_samples_per_second"
"""Gauge: samples of the last step divided by its wall time."""
REWARD_MEAN = "diffrl_learner_reward_mean"
"""Gauge (label reward): mean reward of the last step's samples; reward="total" is the trained one."""
REWARD_STD = "diffrl_learner_reward_std"
"""Gauge (label reward): standard deviation of the last step's rewards."""
LOSS = "diffrl_learner_loss"
"""Gauge: the algorithm's total loss of the last step (mean over noise levels)."""
KL = "diffrl_learner_kl"
"""Gauge: KL to the reference of the last step, as the algorithm measures it (CRD/NFT: mean
‖v_θ − v_φ^w‖² to the (CFG) anchor; GRPO: the per-dimension KL of θ's SDE step to the base model's)."""
KL_LOSS = "diffrl_learner_kl_loss"
"""Gauge: the reward-adaptive KL loss term of the last step."""
GRAD_NORM = "diffrl_learner_grad_norm"
"""Gauge: gradient norm before clipping of the last step."""
STALENESS_VERSIONS = "diffrl_learner_staleness_versions"
"""Histogram: current version minus the group's policy_version, per trained group."""
POLICY_VERSION = "diffrl_learner_policy_version"
"""Gauge: version of the latest published p_samp (= optimizer steps)."""
BACKLOG_GROUPS = "diffrl_learner_backlog_groups"
"""Gauge: groups in the stream not yet acknowledged by the learner (undelivered + pending)."""
LEDGER_GROUPS = "diffrl_ledger_groups"
"""Gauge (label entry): the experience stream's ledger read atomically from Redis by rank 0 (see
diffrl.proto.bus): produced, produced_masked, each fate (trained, dropped_stale, masked, duplicate, invalid,
malformed, lost), pending_undelivered, pending_delivered, pending, accounted. produced == accounted."""

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class LearnerMetrics(PerRegistry):
    """The learner's metric objects, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.registry = registry
        self._extra: dict[str, Gauge] = {}
        self.step_seconds = Histogram(STEP_SECONDS, "Wall time of one optimizer step.", buckets=STEP_BUCKETS,
                                      registry=r)
        self.checkpoint_seconds = Histogram(CHECKPOINT_SECONDS, "Wall time of writing one checkpoint.",
                                            buckets=STEP_BUCKETS, registry=r)
        self.checkpoint_failures = Counter(CHECKPOINT_FAILURES_TOTAL, "Checkpoints that could not be saved.",
                                           registry=r)
        self.last_checkpoint = Gauge(LAST_CHECKPOINT_TIMESTAMP, "Unix time of the last checkpoint saved.", registry=r)
        self.optimizer_steps = Counter(OPTIMIZER_STEPS_TOTAL, "Optimizer steps taken.", registry=r)
        self.groups_consumed = Counter(GROUPS_CONSUMED_TOTAL, "Groups trained on.", registry=r)
        self.groups_dropped_stale = Counter(GROUPS_DROPPED_STALE_TOTAL,
                                            "Groups dropped as more than max_staleness versions old.", registry=r)
        self.groups_masked = Counter(GROUPS_MASKED_TOTAL, "Masked groups (a reward failed), skipped.", registry=r)
        self.groups_duplicate = Counter(GROUPS_DUPLICATE_TOTAL, "Already-trained groups skipped.", registry=r)
        self.groups_invalid = Counter(GROUPS_INVALID_TOTAL, "Groups that cannot be trained, dropped.", registry=r)
        self.entries_malformed = Counter(ENTRIES_MALFORMED_TOTAL, "Stream entries that were not valid groups.",
                                         registry=r)
        self.samples = Counter(SAMPLES_TOTAL, "Samples trained on.", registry=r)
        self.samples_per_second = Gauge(SAMPLES_PER_SECOND, "Samples per second of the last step.", registry=r)
        self.reward_mean = Gauge(REWARD_MEAN, "Mean reward of the last step.", ["reward"], registry=r)
        self.reward_std = Gauge(REWARD_STD, "Reward standard deviation of the last step.", ["reward"], registry=r)
        self.loss = Gauge(LOSS, "Total loss of the last step.", registry=r)
        self.kl = Gauge(KL, "KL to the reference (CRD/NFT: mean squared velocity distance to the anchor).",
                        registry=r)
        self.kl_loss = Gauge(KL_LOSS, "Reward-adaptive KL loss term.", registry=r)
        self.grad_norm = Gauge(GRAD_NORM, "Gradient norm before clipping.", registry=r)
        self.staleness = Histogram(STALENESS_VERSIONS, "Policy versions between sampling and training.",
                                   buckets=STALENESS_BUCKETS, registry=r)
        self.policy_version = Gauge(POLICY_VERSION, "Version of the latest published p_samp.", registry=r)
        self.backlog = Gauge(BACKLOG_GROUPS, "Unacknowledged groups in the experience stream.", registry=r)
        self.ledger = Gauge(LEDGER_GROUPS, "Ledger of the experience stream: groups produced, by fate, and "
                            "pending.", ["entry"], registry=r)

    def gauge(self, name: str, documentation: str) -> Gauge:
        """A gauge of an algorithm's own (``Algorithm.gauges``), made once per registry and name."""
        found = self._extra.get(name)
        if found is None:
            found = self._extra[name] = Gauge(name, documentation, registry=self.registry)
        return found

    def observe_step(self, stats: dict) -> None:
        """Record the stats returned by ``Learner.train_on_groups``."""
        self.step_seconds.observe(stats["step_seconds"])
        self.optimizer_steps.inc()
        self.groups_consumed.inc(stats["groups"])
        self.samples.inc(stats["samples"])
        if stats["step_seconds"] > 0:
            self.samples_per_second.set(stats["samples"] / stats["step_seconds"])
        for name, value in stats.get("reward_mean_by", {}).items():
            self.reward_mean.labels(reward=name).set(value)
        for name, value in stats.get("reward_std_by", {}).items():
            self.reward_std.labels(reward=name).set(value)
        self.reward_mean.labels(reward="total").set(stats["reward_mean"])
        self.reward_std.labels(reward="total").set(stats["reward_std"])
        self.loss.set(stats["loss"])
        self.kl.set(stats.get("kl", 0.0))
        self.kl_loss.set(stats.get("kl_loss", 0.0))
        if stats.get("grad_norm") is not None:
            self.grad_norm.set(stats["grad_norm"])
        for s in stats.get("staleness", []):
            self.staleness.observe(s)
        self.policy_version.set(stats["version"])
