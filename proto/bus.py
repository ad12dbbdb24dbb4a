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

**The ledger.** Every stream entry has exactly one fate, kept in Redis next to the stream (hash
``{<stream>}:ledger``, same cluster slot): ``produced`` is incremented in the same MULTI/EXEC as the
XADD; every acknowledgement names a fate (``trained``, ``dropped_stale``, ``masked``, ``duplicate``,
``invalid``, ``malformed``, ``lost``) and a Lua script increments that fate by the number of entries
XACK actually acknowledged (an ack repeated after a lost reply counts nothing). So at any instant,
and across restarts of any process, ``produced == sum(fates) + pending`` where pending = entries not
yet delivered to the consumer group + entries delivered and not acknowledged (the learner's buffer,
trained groups waiting for their checkpoint). :func:`ledger_snapshot` reads all of it atomically.
Entries trimmed by ``MAXLEN`` before delivery would escape it (backpressure keeps the stream far
below ``maxlen``).

**Reconnects.** Every Redis call of the bus is retried on connection errors, timeouts and LOADING
(a restarting server) with exponential backoff for up to ``RetryPolicy.max_elapsed_s``; each retry
is counted (``retries_total`` and ``diffrl_bus_retries_total{op}``). A retried XADD whose first
attempt did land appends the group twice: the learner skips the copy as ``duplicate``. After a
retried read the consumer re-reads its own pending entries (a lost reply leaves them delivered but
unseen); entries it already holds come back and must be skipped by entry id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import redis as _redis

from diffrl.proto import experience_pb2
from diffrl.proto.codec import check_group, group_from_bytes, group_to_bytes

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONSUMER_GROUP",
    "DEFAULT_STREAM",
    "FATES",
    "FIELD_GROUP",
    "FIELD_GROUP_ID",
    "FIELD_POLICY_VERSION",
    "ExperienceConsumer",
    "ExperienceProducer",
    "RetryPolicy",
    "ledger_key",
    "ledger_snapshot",
    "stream_backlog",
    "stream_undelivered",
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


FATES = ("trained", "dropped_stale", "masked", "duplicate", "invalid", "malformed", "lost")
"""Fates of an acknowledged entry (fields of the ledger hash besides ``produced``)."""

# XACK the ids ARGV[3..] of consumer group ARGV[1]; add the number actually acknowledged to the fate
# ARGV[2] of the ledger hash KEYS[2] (atomic: a repeated ack counts nothing).
_ACK_LUA = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
if n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[2], n) end
return n
"""

# One atomic snapshot: the ledger hash, then [pending, undelivered, group_exists] of group ARGV[1].
_SNAPSHOT_LUA = """
local ledger = redis.call('HGETALL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return {ledger, 0, 0, 0} end
local pending, last, found = 0, '0-0', 0
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  if f['name'] == ARGV[1] then pending, last, found = f['pending'], f['last-delivered-id'], 1 end
end
if found == 0 then return {ledger, 0, redis.call('XLEN', KEYS[1]), 0} end
local n = 0
local start = '(' .. last
while true do
  local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 256)
  if #batch == 0 then break end
  n = n + #batch
  start = '(' .. batch[#batch][1]
end
return {ledger, pending, n, 1}
"""

# Delete the entries of KEYS[1] that every consumer group has acknowledged: below the smallest of
# each group's oldest pending id (or, with nothing pending, the entry after its last delivered one).
_TRIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local best_ms, best_seq = nil, nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local ms, seq
  if tonumber(f['pending']) > 0 then
    ms, seq = parse(redis.call('XPENDING', KEYS[1], f['name'])[2])
  else
    ms, seq = parse(f['last-delivered-id'])
    seq = seq + 1
  end
  if best_ms == nil or ms < best_ms or (ms == best_ms and seq < best_seq) then best_ms, best_seq = ms, seq end
end
if best_ms == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f-%.0f', best_ms, best_seq))
"""

_ACK_CHUNK = 1000  # ids per XACK call (Lua's unpack has a stack limit)

T = TypeVar("T")


def ledger_key(stream: str) -> str:
    """The ledger hash of ``stream`` (hash-tagged: same Redis Cluster slot as the stream)."""
    return "{" + stream + "}:ledger"


@dataclass
class RetryPolicy:
    """How the bus rides out an unreachable Redis (restart, failover, network blip)."""

    max_elapsed_s: float = 300.0
    """How long one bus call keeps retrying on connection errors, timeouts and LOADING before the
    error propagates, seconds (0 = no retries)."""
    initial_backoff_s: float = 0.05
    """First wait between retries, seconds (doubles each retry)."""
    max_backoff_s: float = 2.0
    """Longest wait between retries, seconds."""

    def validate(self) -> None:
        if not self.max_elapsed_s >= 0:
            raise ValueError(f"max_elapsed_s: expected seconds >= 0, got {self.max_elapsed_s!r}")
        if not self.initial_backoff_s > 0:
            raise ValueError(f"initial_backoff_s: expected seconds > 0, got {self.initial_backoff_s!r}")
        if not self.max_backoff_s >= self.initial_backoff_s:
            raise ValueError(f"max_backoff_s: expected seconds >= initial_backoff_s, got {self.max_backoff_s!r}")


_RETRY_COUNTER = None
_RETRY_LOCK = threading.Lock()


def _retry_counter():
    """``diffrl_bus_retries_total{op}`` in the process's default Prometheus registry (created once)."""
    global _RETRY_COUNTER
    with _RETRY_LOCK:
        if _RETRY_COUNTER is None:
            from prometheus_client import Counter

            _RETRY_COUNTER = Counter("diffrl_bus_retries_total", "Redis calls of the experience bus retried "
                                     "after a connection error, timeout or LOADING, by operation.", ["op"])
        return _RETRY_COUNTER


def _transient(err: BaseException) -> bool:
    # AuthenticationError/AuthorizationError derive from ConnectionError but retrying cannot fix them
    return isinstance(err, (_redis.ConnectionError, _redis.TimeoutError)) and not isinstance(
        err, (_redis.exceptions.AuthenticationError, _redis.exceptions.AuthorizationError))


class _Retrying:
    """Mixin: ``self._call(op, fn)`` runs ``fn`` with the retry policy, counting retries."""

    retry: RetryPolicy
    retries_total: int

    def _call(self, op: str, fn: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
        policy = self.retry
        deadline = None
        delay = policy.initial_backoff_s
        while True:
            try:
                return fn()
            except (_redis.ConnectionError, _redis.TimeoutError) as err:
                if not _transient(err):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + policy.max_elapsed_s
                if now >= deadline:
                    raise
                self.retries_total += 1
                _retry_counter().labels(op).inc()
                log.warning("redis %s failed (%s: %s); retrying in %.2f s", op, type(err).__name__, err, delay)
                time.sleep(min(delay, max(deadline - now, 0.0)))
                delay = min(delay * 2, policy.max_backoff_s)
                if on_retry is not None:
                    on_retry()


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


def stream_undelivered(
    r: _redis.Redis, stream: str = DEFAULT_STREAM, consumer_group: str = DEFAULT_CONSUMER_GROUP
) -> int:
    """Entries of ``stream`` not yet delivered to ``consumer_group`` (all of them without the group)."""
    snap = r.eval(_SNAPSHOT_LUA, 2, stream, ledger_key(stream), consumer_group)
    return int(snap[2])


def ledger_snapshot(
    r: _redis.Redis, stream: str = DEFAULT_STREAM, consumer_group: str = DEFAULT_CONSUMER_GROUP
) -> dict[str, int | bool]:
    """The ledger of ``stream`` read atomically (one Lua call): ``produced``, ``produced_masked``,
    every fate of :data:`FATES`, ``pending_undelivered`` (not delivered to ``consumer_group`` yet),
    ``pending_delivered`` (delivered, not acknowledged), ``pending`` (their sum), ``accounted``
    (fates + pending) and ``balanced`` (``produced == accounted``)."""
    raw, delivered, undelivered, _ = r.eval(_SNAPSHOT_LUA, 2, stream, ledger_key(stream), consumer_group)
    fields = {_s(raw[i]): int(raw[i + 1]) for i in range(0, len(raw), 2)}
    out: dict[str, int | bool] = {"produced": fields.pop("produced", 0),
                                  "produced_masked": fields.pop("produced_masked", 0)}
    for fate in FATES:
        out[fate] = fields.pop(fate, 0)
    out.update({f"other_{k}": v for k, v in fields.items()})  # fates written by someone else
    out["pending_undelivered"] = int(undelivered)
    out["pending_delivered"] = int(delivered)
    out["pending"] = int(undelivered) + int(delivered)
    out["accounted"] = sum(v for k, v in out.items() if k in FATES or k.startswith("other_")) + out["pending"]
    out["balanced"] = out["produced"] == out["accounted"]
    return out


class ExperienceProducer(_Retrying):
    """Publishes groups to the stream (one XADD per group, counted in the ledger atomically).

    Args:
        redis: a client with ``decode_responses=False`` (see ``diffrl.embedded_redis.connect``).
        stream: stream key.
        maxlen: safety cap on the stream length (approximate ``MAXLEN ~``); entries beyond it are
            trimmed oldest first, even if unconsumed. ``None``: never trim. Backpressure
            (``max_pending_groups``) should keep the backlog far below it.
        consumer_group: the group whose backlog :meth:`backlog` reports.
        retry: reconnect policy (see the module docstring).
    """

    def __init__(
        self,
        redis: _redis.Redis,
        stream: str = DEFAULT_STREAM,
        maxlen: int | None = 100_000,
        consumer_group: str = DEFAULT_CONSUMER_GROUP,
        retry: RetryPolicy | None = None,
    ):
        _require_bytes_client(redis)
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be None or >= 1, got {maxlen}")
        self.redis = redis
        self.stream = stream
        self.maxlen = maxlen
        self.consumer_group = consumer_group
        self.retry = retry or RetryPolicy()
        self.retries_total = 0
        """Redis calls retried after a connection error (see the module docstring)."""

    def publish(self, group: experience_pb2.Group) -> str:
        """Append one group; returns its stream entry id. The group must have a ``group_id``."""
        if not group.group_id:
            raise ValueError("cannot publish a group without a group_id")
        payload = group_to_bytes(group)
        check_group(group)  # refuse to send what the learner would reject as malformed
        fields = {
            FIELD_GROUP_ID: group.group_id.encode(),
            FIELD_POLICY_VERSION: str(group.policy_version).encode(),
            FIELD_GROUP: payload,
        }
        key = ledger_key(self.stream)

        def xadd() -> str:
            pipe = self.redis.pipeline(transaction=True)  # MULTI/EXEC: the entry and its count together
            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
            pipe.hincrby(key, "produced", 1)
            if group.masked:
                pipe.hincrby(key, "produced_masked", 1)
            return _s(pipe.execute()[0])

        return self._call("publish", xadd)

    def backlog(self) -> int:
        """Groups waiting for the learner: entries not yet delivered to its consumer group (what
        backpressure compares with ``max_pending_groups``). Entries the learner holds (its buffer,
        trained groups waiting for their checkpoint) do not count: counting them would stall a
        learner that needs more groups to reach the checkpoint that acknowledges them."""
        return self._call("backlog", lambda: stream_undelivered(self.redis, self.stream, self.consumer_group))

    pending_count = backlog

    def ledger(self) -> dict[str, int | bool]:
        """:func:`ledger_snapshot` of this stream."""
        return self._call("ledger", lambda: ledger_snapshot(self.redis, self.stream, self.consumer_group))


class ExperienceConsumer(_Retrying):
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
        retry: reconnect policy (see the module docstring).
    """

    def __init__(
        self,
        redis: _redis.Redis,
        stream: str = DEFAULT_STREAM,
        consumer_group: str = DEFAULT_CONSUMER_GROUP,
        consumer_name: str = "learner-0",
        start_id: str = "0",
        retry: RetryPolicy | None = None,
    ):
        _require_bytes_client(redis)
        if not consumer_name:
            raise ValueError("consumer_name must be a non-empty, stable name")
        self.redis = redis
        self.stream = stream
        self.consumer_group = consumer_group
        self.consumer_name = consumer_name
        self.start_id = start_id
        self.retry = retry or RetryPolicy()
        self.malformed_total = 0
        """Entries that were not valid groups (acknowledged and skipped)."""
        self.lost_total = 0
        """Pending entries whose data was trimmed from the stream before they were read again."""
        self.retries_total = 0
        """Redis calls retried after a connection error (see the module docstring)."""
        self._history_cursor: str | None = "0"  # own pending entries still to re-deliver
        self._ack_script = redis.register_script(_ACK_LUA)
        self._call("create_group", self._create_group)

    def _create_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.consumer_group, id=self.start_id, mkstream=True)
        except _redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _reread_own_pending(self) -> None:
        self._history_cursor = "0"

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
        def xreadgroup():
            try:
                return self.redis.xreadgroup(
                    self.consumer_group, self.consumer_name, {self.stream: cursor}, count=count, block=block_ms
                )
            except _redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # the server lost the stream or the group (a restart without persistence): recreate it
                log.warning("consumer group %r of %r is gone; recreating it", self.consumer_group, self.stream)
                self._create_group()
                return None

        # a retried read may have delivered entries whose reply was lost: re-read our pending ones
        resp = self._call("read", xreadgroup, on_retry=self._reread_own_pending)
        if not resp:
            return []
        # RESP2: [[stream, entries]]; RESP3: {stream: [entries]}
        if isinstance(resp, dict):
            return next(iter(resp.values()))[0] if resp else []
        return resp[0][1]

    def _decode(self, entries: Iterable) -> list[tuple[str, experience_pb2.Group]]:
        out, bad, malformed = [], [], []
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
                malformed.append(entry_id)
                continue
            out.append((entry_id, group))
        if bad:
            self.ack(bad, fate="lost")
        if malformed:
            self.ack(malformed, fate="malformed")
        return out

    def claim_stale(self, min_idle_ms: int, max_groups: int = 16) -> list[tuple[str, experience_pb2.Group]]:
        """Take over entries other consumers were given but have not acked for ``min_idle_ms``.

        Like XAUTOCLAIM, but this consumer's own pending entries are left alone (the learner may
        legitimately hold them until a checkpoint commits): XPENDING ... IDLE finds candidates,
        XCLAIM (with the same idle bound, so a racing claimer wins cleanly) takes them.
        """
        candidates = self._call("claim", lambda: self.redis.xpending_range(
            self.stream, self.consumer_group, min="-", max="+", count=max_groups * 4, idle=min_idle_ms
        ))
        ids = [c["message_id"] for c in candidates if _s(c["consumer"]) != self.consumer_name][:max_groups]
        if not ids:
            return []
        claimed = self._call("claim", lambda: self.redis.xclaim(
            self.stream, self.consumer_group, self.consumer_name, min_idle_ms, ids))
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
            self.ack(gone, fate="lost")
        return self._decode([e for e in claimed if e[0] is not None])

    # ----------------------------------------------------------------------------------- bookkeeping

    def ack(self, entry_ids: Iterable[str | bytes], fate: str = "trained") -> int:
        """Acknowledge entries (after the step that used them is committed, or when discarding them)
        and count them under ``fate`` in the ledger (one of :data:`FATES`), atomically. Returns the
        number acknowledged now (entries acknowledged before count nothing, also in the ledger)."""
        if fate not in FATES:
            raise ValueError(f"fate must be one of {FATES}, got {fate!r}")
        ids = [_s(i) for i in entry_ids]
        done = 0
        for i in range(0, len(ids), _ACK_CHUNK):
            chunk = ids[i:i + _ACK_CHUNK]
            done += int(self._call("ack", lambda chunk=chunk: self._ack_script(
                keys=[self.stream, ledger_key(self.stream)], args=[self.consumer_group, fate, *chunk])))
        return done

    def trim_acknowledged(self) -> int:
        """Delete the entries every consumer group of the stream has acknowledged (atomic, one Lua
        call); pending and undelivered entries stay. Returns the number deleted. The ledger is
        unaffected (its counts are kept apart from the entries)."""
        return int(self._call("trim", lambda: self.redis.eval(_TRIM_LUA, 1, self.stream)))

    def pending_count(self) -> int:
        """Entries delivered to any consumer of the group and not acknowledged yet."""
        summary = self._call("pending", lambda: self.redis.xpending(self.stream, self.consumer_group))
        return int(summary["pending"])

    def backlog(self) -> int:
        """Entries not yet delivered to the consumer group plus those pending (see module doc)."""
        return self._call("backlog", lambda: stream_backlog(self.redis, self.stream, self.consumer_group))

    def ledger(self) -> dict[str, int | bool]:
        """:func:`ledger_snapshot` of this stream and consumer group."""
        return self._call("ledger", lambda: ledger_snapshot(self.redis, self.stream, self.consumer_group))
