"""The learner's side of the experience stream: reading groups into a buffer, sorting out the ones it
cannot train (stale, masked, duplicate, invalid: counted and acknowledged with their fate at once),
stepping when every rank has its share, and acknowledging trained entries only once a checkpoint
covers them.

The ledger: every acknowledgement names the entry's fate (trained, dropped_stale, masked, duplicate,
invalid; see ``diffrl.proto.bus``), counted in Redis atomically with the XACK. Once a checkpoint is
complete each rank appends the group ids it covers to ``RUN_DIR/trained_groups.txt`` (one
``group_id<TAB>step`` line each); a checkpoint also lists them (``interval``), so a restart that
finds the acks or the lines of its last checkpoint missing (a crash right after ``latest``) adds
them, and each trained group appears there exactly once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffrl import run_folder
from diffrl.proto import experience_pb2

log = logging.getLogger("diffrl.learner.learner")

Group = experience_pb2.Group



class StreamLoop:
    """Mixin of :class:`~diffrl.learner.learner.Learner`: the stream loop (``poll_and_step``/``run``),
    the buffer and the ledger. Uses the learner's config, consumer, counters, metrics, rank, step,
    run_dir, ``dist`` (collectives), ``group_problem``, ``train_on_groups`` and ``save_checkpoint``."""

    def connect_bus(self, redis, stream: str | None = None, consumer_group: str | None = None, retry=None):
        """Create this rank's consumer ``<consumer_name_prefix>-<rank>`` on ``redis`` and use it
        (``retry``: a ``diffrl.proto.bus.RetryPolicy`` for an unreachable Redis)."""
        from diffrl.proto.bus import DEFAULT_CONSUMER_GROUP, DEFAULT_STREAM, ExperienceConsumer

        self.consumer = ExperienceConsumer(redis, stream or DEFAULT_STREAM, consumer_group or DEFAULT_CONSUMER_GROUP,
                                           f"{self.config.consumer_name_prefix}-{self.rank}", retry=retry)
        return self.consumer

    @property
    def pending_entry_ids(self) -> list[str]:
        """Entries trained on but not acknowledged yet (waiting for a checkpoint)."""
        return list(self._pending_ack)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _is_stale(self, group: Group) -> bool:
        return self.step - int(group.policy_version) > self.config.max_staleness

    def _admit(self, entries: list[tuple[str, Group]]) -> None:
        """Sort freshly read entries into the buffer or discard (count + ack with their fate) them."""
        discard: dict[str, list[str]] = {}
        buffered_ids = {g.group_id for _, g in self._buffer}
        held = {e for e, _ in self._buffer} | set(self._pending_ack)
        for entry_id, group in entries:
            if entry_id in held:  # the same entry again (re-read after a reconnect): already ours
                continue
            held.add(entry_id)
            if group.group_id in self._trained_ids or group.group_id in buffered_ids:
                self.counters["duplicate"] += 1
                self.metrics.groups_duplicate.inc()
                discard.setdefault("duplicate", []).append(entry_id)
            elif group.masked:
                self.counters["masked"] += 1
                self.metrics.groups_masked.inc()
                discard.setdefault("masked", []).append(entry_id)
            elif self._is_stale(group):
                self.counters["dropped_stale"] += 1
                self.metrics.groups_dropped_stale.inc()
                discard.setdefault("dropped_stale", []).append(entry_id)
            else:
                problem = self.group_problem(group)
                if problem is not None:
                    log.warning("experience entry %s (group %s) dropped: %s", entry_id, group.group_id, problem)
                    self.counters["invalid"] += 1
                    self.metrics.groups_invalid.inc()
                    discard.setdefault("invalid", []).append(entry_id)
                else:
                    self._buffer.append((entry_id, group))
                    buffered_ids.add(group.group_id)
        for fate, ids in discard.items():
            self.consumer.ack(ids, fate=fate)

    def _drop_stale_buffered(self) -> None:
        keep, discard = [], []
        for entry_id, group in self._buffer:
            (discard if self._is_stale(group) else keep).append((entry_id, group))
        if discard:
            self._buffer = keep
            self.counters["dropped_stale"] += len(discard)
            self.metrics.groups_dropped_stale.inc(len(discard))
            self.consumer.ack([e for e, _ in discard], fate="dropped_stale")

    def _sync_malformed(self) -> None:
        total = int(getattr(self.consumer, "malformed_total", 0))
        if total > self._malformed_seen:
            self.metrics.entries_malformed.inc(total - self._malformed_seen)
            self._malformed_seen = total

    def update_backlog(self) -> None:
        """Rank 0: the backlog gauge and the ledger gauges from one atomic ledger snapshot."""
        if self.consumer is not None and self.rank == 0:
            try:
                ledger = self.consumer.ledger() if hasattr(self.consumer, "ledger") else None
                if ledger is None:
                    self.metrics.backlog.set(self.consumer.backlog())
                    return
                self.metrics.backlog.set(ledger["pending"])
                for key, value in ledger.items():
                    if key != "balanced":
                        self.metrics.ledger.labels(key).set(value)
            except Exception as err:  # noqa: BLE001 - a metric must not stop training
                log.warning("backlog query failed: %s", err)

    def poll_and_step(self, block_ms: int | None = None, stop: bool = False) -> dict[str, Any] | None:
        """Read groups (up to this rank's share), and when every rank has its share, train one step,
        checkpoint when due, and acknowledge what the checkpoint covers. Returns the step's stats, or
        None when no step was taken (not enough groups yet, or ``stop``)."""
        if self.consumer is None:
            raise RuntimeError("no consumer: pass one to Learner(...) or call connect_bus()")
        if self._resume_commit:
            self._commit_resumed()
        self._drop_stale_buffered()
        need = self.groups_per_rank - len(self._buffer)
        if need > 0 and not stop:
            block = self.config.read_block_ms if block_ms is None else block_ms
            self._admit(self.consumer.read(max_groups=need, block_ms=block))
            self._sync_malformed()
        ready, stop_all = self.dist.agree(len(self._buffer) >= self.groups_per_rank, stop)
        self._stop_agreed = stop_all
        if stop_all or not ready:
            self.update_backlog()
            return None
        batch, self._buffer = self._buffer[: self.groups_per_rank], self._buffer[self.groups_per_rank:]
        stats = self.train_on_groups([g for _, g in batch])
        for entry_id, group in batch:
            self._remember_trained(group.group_id)
            self._pending_ack.append(entry_id)
            self._pending_groups.append(group.group_id)
        if self.run_dir is None or self.config.checkpoint_every == 0:
            self._ack_pending()  # nothing to commit to: the step itself is the commit
        elif self.step % self.config.checkpoint_every == 0:
            self.save_checkpoint()
        self.update_backlog()
        return stats

    @property
    def stop_agreed(self) -> bool:
        """Whether the last :meth:`poll_and_step` ended because some rank asked to stop."""
        return self._stop_agreed

    def run(self, max_steps: int | None = None, stop: Callable[[], bool] | None = None) -> int:
        """Poll and train until ``max_steps`` optimizer steps (default ``config.max_steps``; 0 = no
        limit) or until ``stop()`` returns True on any rank; then :meth:`finish`. Returns the step
        reached."""
        limit = self.config.max_steps if max_steps is None else max_steps
        while not (limit and self.step >= limit):
            self.poll_and_step(stop=bool(stop is not None and stop()))
            if self._stop_agreed:
                break
        self.finish()
        return self.step

    def finish(self) -> None:
        """Checkpoint what was trained since the last checkpoint (which acknowledges its entries);
        without checkpoints, acknowledge. Groups read but not trained stay pending (re-read later)."""
        if self.run_dir is not None and self.config.checkpoint_every:
            if self.step > 0 and self._last_checkpoint_step != self.step:
                self.save_checkpoint()
        else:
            self._ack_pending()

    def _remember_trained(self, group_id: str) -> None:
        self._trained_ids[group_id] = None
        self._trained_ids.move_to_end(group_id)
        while len(self._trained_ids) > self.config.dedup_window:
            self._trained_ids.popitem(last=False)

    def _ack_pending(self) -> None:
        """The trained entries are committed: record their group ids, then acknowledge them."""
        if self._pending_ack and self.run_dir is not None and (self.config.checkpoint_every == 0
                                                                or self._last_checkpoint_step == self.step):
            self._append_trained(self._pending_groups, self.step)
        if self._pending_ack and self.consumer is not None:
            self.consumer.ack(self._pending_ack, fate="trained")
            if self.config.trim_acknowledged and self.rank == 0 and hasattr(self.consumer, "trim_acknowledged"):
                try:  # keep Redis at the backlog's size (acknowledged entries are done with)
                    self.consumer.trim_acknowledged()
                except Exception as err:  # noqa: BLE001 - housekeeping must not stop training
                    log.warning("trimming acknowledged stream entries failed: %s", err)
        self._pending_ack, self._pending_groups = [], []

    @property
    def trained_groups_file(self) -> Path | None:
        """``RUN_DIR/trained_groups.txt``: ``group_id<TAB>step`` per committed trained group."""
        return None if self.run_dir is None else self.run_dir / run_folder.TRAINED_GROUPS

    def _append_trained(self, group_ids: Sequence[str], step: int) -> None:
        if not group_ids or self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = "".join(f"{gid}\t{step}\n" for gid in group_ids).encode()
        fd = os.open(self.trained_groups_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # one write per call: lines of concurrent ranks do not interleave
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _commit_resumed(self) -> None:
        """After a resume: the restored checkpoint's trained entries are committed. Acknowledge them
        (a no-op for those acknowledged before the crash) and add missing trained_groups.txt lines."""
        interval, self._resume_commit = self._resume_commit, []
        path = self.trained_groups_file
        if path is not None:
            have = set()
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    have = {line.split("\t", 1)[0] for line in f if line.strip()}
            self._append_trained([g for _, g in interval if g not in have], self.step)
        self.consumer.ack([e for e, _ in interval], fate="trained")
