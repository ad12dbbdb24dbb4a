"""The experience bus: prompt groups over a Redis Stream with one consumer group (the learner).

One stream entry is one ``diffrl.v1.Group``: field ``group`` holds its protobuf bytes, ``group_id``
and ``policy_version`` repeat two of its fields for inspection with ``redis-cli``. Samplers publish
with :class:`ExperienceProducer`; the learner reads with :class:`ExperienceConsumer` and
acknowledges an entry only after the optimizer step that used it is committed (or after discarding
it), so a learner restart re-reads what it had not acknowledged. Group ids make re-delivery
idempotent for the learner.

``backlog`` = entries the consumer group has not been given yet + entries given but not
acknowledged: the number the samplers compare with ``max_pending_groups`` for backpressure. On
Redis >= 7 it comes from ``XINFO GROUPS`` (``lag`` + ``pending``); Redis 6.2 (the embedded server)
has no ``lag``, so the undelivered entries are counted server-side by a small Lua script (cost grows
with the backlog, which backpressure keeps small).

Anything read from the stream is untrusted: an entry that is not a valid ``Group`` (bad protobuf,
bad tensor, missing or mismatching group id) is counted in ``malformed_total``, acknowledged, logged
and skipped; an entry trimmed away while pending is counted in ``lost_total`` and acknowledged.
Nothing about weights lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis as _redis

from proto import experience_pb2
from proto.codec import check_group, group_from_bytes, group_to_bytes

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONSUMER_GROUP",
    "DEFAULT_STREAM",
    "FIELD_GROUP",
    "FIELD_GROUP_ID",
    "FIELD_POLICY_VERSION",
    "ExperienceConsumer",
    "ExperienceProducer",
    "stream_backlog",
]

DEFAULT_STREAM = "experience"
DEFAULT_CONSUMER_GROUP = "learner"
FIELD_GROUP = b"group"
"""Stream entry field holding the serialized ``diffrl.v1.Group``."""
FIELD_GROUP_ID = b"group_id"
"""Stream entry field repeating ``Group.group_id`` (utf-8)."""
FIELD_POLICY_VERSION = b"policy_version"
"""Stream entry field repeating ``Group.policy_version`` (decimal)."""

# Count the entries after ARGV[1] (exclusive), COUNT ARGV[2] at a time; Redis 6.2 has no XINFO lag.
_COUNT_AFTER_LUA = """
local n = 0
local start = '(' .. ARGV[1]
while true do
  local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', tonumber(ARGV[2]))
  if #batch == 0 then return n end
  n = n + #batch
  start = '(' .. batch[#batch][1]
end
"""


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _require_bytes_client(r: _redis.Redis) -> None:
    if r.get_connection_kwargs().get("decode_responses"):
        raise ValueError(
            "the experience bus needs a Redis client with decode_responses=False (binary payloads)"
        )


def stream_backlog(
    r: _redis.Redis, stream: str = DEFAULT_STREAM, consumer_group: str = DEFAULT_CONSUMER_GROUP
) -> int:
    """Entries of ``stream`` not yet delivered to ``consumer_group`` plus those delivered but not acked.

    With no consumer group yet (the learner has not started), every entry in the stream counts.
    """
    try:
        groups = r.xinfo_groups(stream)
    except _redis.ResponseError as e:  # no such key: nothing published yet
        if "no such key" in str(e).lower():
            return 0
        raise
    for g in groups:
        if _s(g["name"]) == consumer_group:
            break
    else:
        return int(r.xlen(stream))
    pending = int(g["pending"])
    lag = g.get("lag")
    if lag is None:  # Redis 6.2, or a lag Redis >= 7 cannot compute after deletions
        lag = r.eval(_COUNT_AFTER_LUA, 1, stream, _s(g["last-delivered-id"]), 64)
    return pending + int(lag)


class ExperienceProducer:
    """Publishes groups to the stream (one XADD per group).

    Args:
        redis: a client with ``decode_responses=False`` (see ``diffrl.embedded_redis.connect``).
        stream: stream key.
        maxlen: safety cap on the stream length (approximate ``MAXLEN ~``); entries beyond it are
            trimmed oldest first, even if unconsumed. ``None``: never trim. Backpressure
            (``max_pending_groups``) should keep the backlog far below it.
        consumer_group: the group whose backlog :meth:`backlog` reports.
    """

    def __init__(
        self,
        redis: _redis.Redis,
        stream: str = DEFAULT_STREAM,
        maxlen: int | None = 100_000,
        consumer_group: str = DEFAULT_CONSUMER_GROUP,
    ):
        _require_bytes_client(redis)
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be None or >= 1, got {maxlen}")
        self.redis = redis
        self.stream = stream
        self.maxlen = maxlen
        self.consumer_group = consumer_group

    def publish(self, group: experience_pb2.Group) -> str:
        """Append one group; returns its stream entry id. The group must have a ``group_id``."""
        if not group.group_id:
            raise ValueError("cannot publish a group without a group_id")
        payload = group_to_bytes(group)
        check_group(group)  # refuse to send what the learner would reject as malformed
        entry_id = self.redis.xadd(
            self.stream,
            {
                FIELD_GROUP_ID: group.group_id.encode(),
                FIELD_POLICY_VERSION: str(group.policy_version).encode(),
                FIELD_GROUP: payload,
            },
            maxlen=self.maxlen,
            approximate=True,
        )
        return _s(entry_id)

    def backlog(self) -> int:
        """Groups the learner's consumer group has not acknowledged (undelivered + pending)."""
        return stream_backlog(self.redis, self.stream, self.consumer_group)

    pending_count = backlog


class ExperienceConsumer:
    """Reads groups for one consumer of the learner's consumer group (created if missing).

    :meth:`read` first re-delivers this consumer's own unacknowledged entries (those it was given
    before a restart -- use a stable ``consumer_name`` such as ``learner-<rank>``), then new ones.
    Entries left pending by a consumer that is gone can be taken over with :meth:`claim_stale`.

    Args:
        redis: a client with ``decode_responses=False``.
        stream: stream key.
        consumer_group: consumer group name (created at ``start_id`` with MKSTREAM if missing).
        consumer_name: this consumer's stable name.
        start_id: where a newly created consumer group starts: ``"0"`` (everything in the stream,
            default) or ``"$"`` (only entries added from now on).
    """

    def __init__(
        self,
        redis: _redis.Redis,
        stream: str = DEFAULT_STREAM,
        consumer_group: str = DEFAULT_CONSUMER_GROUP,
        consumer_name: str = "learner-0",
        start_id: str = "0",
    ):
        _require_bytes_client(redis)
        if not consumer_name:
            raise ValueError("consumer_name must be a non-empty, stable name")
        self.redis = redis
        self.stream = stream
        self.consumer_group = consumer_group
        self.consumer_name = consumer_name
        self.malformed_total = 0
        """Entries that were not valid groups (acknowledged and skipped)."""
        self.lost_total = 0
        """Pending entries whose data was trimmed from the stream before they were read again."""
        self._history_cursor: str | None = "0"  # own pending entries still to re-deliver
        try:
            redis.xgroup_create(stream, consumer_group, id=start_id, mkstream=True)
        except _redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -------------------------------------------------------------------------------------- reading

    def read(
        self, max_groups: int = 1, block_ms: int | None = None
    ) -> list[tuple[str, experience_pb2.Group]]:
        """Up to ``max_groups`` ``(entry_id, group)`` pairs, oldest first.

        Own pending entries (after a restart) come first; then new entries, waiting up to
        ``block_ms`` milliseconds for some to arrive (``None`` or 0: do not wait). Malformed entries
        are acknowledged and skipped, so fewer than ``max_groups`` (or none) may come back.
        """
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        out: list[tuple[str, experience_pb2.Group]] = []
        while self._history_cursor is not None and not out:
            entries = self._xreadgroup(self._history_cursor, max_groups, None)
            if not entries:
                self._history_cursor = None
                break
            self._history_cursor = _s(entries[-1][0])
            out.extend(self._decode(entries))
        if out:
            return out
        deadline = None if not block_ms else time.monotonic() + block_ms / 1000.0
        while True:
            remaining = None if deadline is None else int((deadline - time.monotonic()) * 1000)
            if remaining is not None and remaining <= 0:
                remaining = None  # one last non-blocking look
                deadline = time.monotonic()
            entries = self._xreadgroup(">", max_groups, remaining)
            if not entries:
                return out
            out.extend(self._decode(entries))
            if out or deadline is None or time.monotonic() >= deadline:
                return out

    def _xreadgroup(self, cursor: str, count: int, block_ms: int | None) -> list:
        resp = self.redis.xreadgroup(
            self.consumer_group, self.consumer_name, {self.stream: cursor}, count=count, block=block_ms
        )
        if not resp:
            return []
        # RESP2: [[stream, entries]]; RESP3: {stream: [entries]}
        if isinstance(resp, dict):
            return next(iter(resp.values()))[0] if resp else []
        return resp[0][1]

    def _decode(self, entries: Iterable) -> list[tuple[str, experience_pb2.Group]]:
        out, bad = [], []
        for entry_id, fields in entries:
            entry_id = _s(entry_id)
            if not fields:  # the entry was trimmed away while it was pending
                self.lost_total += 1
                log.warning(
                    "experience entry %s: data gone from stream %r (trimmed); acknowledged",
                    entry_id,
                    self.stream,
                )
                bad.append(entry_id)
                continue
            try:
                payload = fields.get(FIELD_GROUP)
                if payload is None:
                    raise ValueError(f"no {FIELD_GROUP.decode()!r} field")
                group = group_from_bytes(payload)
                gid = fields.get(FIELD_GROUP_ID)
                if gid is not None and gid.decode("utf-8", "replace") != group.group_id:
                    raise ValueError(
                        f"entry group_id {gid[:80]!r} differs from the payload's {group.group_id!r}"
                    )
            except (ValueError, TypeError) as e:
                self.malformed_total += 1
                log.warning("experience entry %s in %r is malformed, skipped: %s", entry_id, self.stream, e)
                bad.append(entry_id)
                continue
            out.append((entry_id, group))
        if bad:
            self.ack(bad)
        return out

    def claim_stale(self, min_idle_ms: int, max_groups: int = 16) -> list[tuple[str, experience_pb2.Group]]:
        """Take over entries other consumers were given but have not acked for ``min_idle_ms``.

        Like XAUTOCLAIM, but this consumer's own pending entries are left alone (the learner may
        legitimately hold them until a checkpoint commits): XPENDING ... IDLE finds candidates,
        XCLAIM (with the same idle bound, so a racing claimer wins cleanly) takes them.
        """
        candidates = self.redis.xpending_range(
            self.stream, self.consumer_group, min="-", max="+", count=max_groups * 4, idle=min_idle_ms
        )
        ids = [c["message_id"] for c in candidates if _s(c["consumer"]) != self.consumer_name][:max_groups]
        if not ids:
            return []
        claimed = self.redis.xclaim(self.stream, self.consumer_group, self.consumer_name, min_idle_ms, ids)
        got = {_s(e[0]) for e in claimed if e[0] is not None}
        # Redis 6.2 claims entries whose data was trimmed away but replies nil for them: ack those
        # that are now ours (ids neither returned nor ours were won by a racing claimer)
        gone = []
        for entry_id in (_s(i) for i in ids if _s(i) not in got):
            mine = self.redis.xpending_range(
                self.stream, self.consumer_group, entry_id, entry_id, 1, consumername=self.consumer_name
            )
            if mine:
                gone.append(entry_id)
        if gone:
            self.lost_total += len(gone)
            log.warning(
                "claimed experience entries %s: data gone from %r (trimmed); acknowledged", gone, self.stream
            )
            self.ack(gone)
        return self._decode([e for e in claimed if e[0] is not None])

    # ----------------------------------------------------------------------------------- bookkeeping

    def ack(self, entry_ids: Iterable[str | bytes]) -> int:
        """Acknowledge entries (after the step that used them is committed, or when discarding them)."""
        ids = list(entry_ids)
        if not ids:
            return 0
        return int(self.redis.xack(self.stream, self.consumer_group, *ids))

    def pending_count(self) -> int:
        """Entries delivered to any consumer of the group and not acknowledged yet."""
        summary = self.redis.xpending(self.stream, self.consumer_group)
        return int(summary["pending"])

    def backlog(self) -> int:
        """Entries not yet delivered to the consumer group plus those pending (see module doc)."""
        return stream_backlog(self.redis, self.stream, self.consumer_group)
