"""The reward client the samplers use: several rewards, several replicas each, one group at a time.

``RewardClient`` (async, one ``httpx.AsyncClient`` with pooled keep-alive connections) scores a
group (K images of one prompt) with every configured reward concurrently and returns each reward's
per-image scores, their weighted combination and the details. ``SyncRewardClient`` wraps it for
in-process use (its own event loop in a background thread).

Per reward:

- **Load balancing** over its replica URLs: least outstanding requests (ties rotate), or plain
  round robin.
- **Retries** with exponential backoff and jitter (tenacity) on timeouts, connection errors, 408,
  429, 5xx and malformed answers (a 200 whose body is not a ScoreResponse, the wrong number of
  scores, a non-finite score without an error: ``bad_response``), each retry on another replica when
  there is one. Other 4xx (bad input) are not retried.
- **Ejection**: a replica that fails ``eject_after_failures`` times in a row (timeout, connection
  error, 5xx other than 503, malformed answer) leaves the rotation; a background probe (``GET /healthz`` every
  ``health_check_interval_s``) puts it back when it answers 200. With every replica ejected, the
  client still tries them (the earliest ejected first) rather than failing without trying.
- **Failure is per group, never a 0**: a reward that still fails after its retries, answers with
  per-item ``errors``, or answers malformed data fails the whole group: ``score_group`` raises
  :class:`RewardError` (reward, kind, message), ``score_groups`` returns a :class:`GroupScores`
  whose ``failure`` is set; the sampler masks that group (counted in
  ``diffrl_reward_client_group_failures_total``).

Configuration follows the project conventions (dataclasses with attribute docstrings); the token
comes from ``token_file`` or ``$DIFFRL_REWARD_TOKEN``, never from the recipe itself.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from diffrl.config import ConfigError, require
from diffrl.proto import reward_pb2
from diffrl.reward_servers.config import TOKEN_ENV
from diffrl.reward_servers.images import encode_png
from diffrl.reward_servers.metrics import client_metrics

PROTO_MEDIA_TYPE = "application/x-protobuf"


# ----------------------------------------------------------------------------- config
@dataclass
class RewardEndpointConfig:
    """One reward and the replicas serving it."""

    name: str = ""
    """Reward name: the key of this reward's scores in results (usually the server's reward name)."""
    urls: list[str] = field(default_factory=list)
    """Base URLs of the replicas, e.g. [http://10.0.0.5:8101, http://10.0.0.6:8101] or a Ray Serve
    route http://head:8000/shapes; the client appends /v1/score and /healthz."""
    weight: float = 1.0
    """Weight in the combined reward (combined = sum of weight * score; a negative weight turns a
    lower-is-better reward around)."""
    timeout_s: float = 30.0
    """Timeout of one scoring attempt (connect + send + wait + read), seconds."""
    connect_timeout_s: float = 2.0
    """Connection timeout of one attempt, seconds."""
    retries: int = 3
    """Retries after the first attempt (timeouts, connection errors, 408, 429, 5xx)."""
    backoff_initial_s: float = 0.05
    """First retry delay, seconds (doubles each retry, with jitter)."""
    backoff_max_s: float = 2.0
    """Longest retry delay, seconds."""
    eject_after_failures: int = 1
    """Consecutive failed attempts (timeout, connection error, 5xx) that take a replica out of rotation."""
    health_check_interval_s: float = 1.0
    """How often an ejected replica's /healthz is probed, seconds."""
    encoding: str = "protobuf"
    """Wire encoding: protobuf (compact, fast) or json."""
    max_items_per_request: int = 256
    """Larger groups are split into several requests (all must succeed)."""

    def validate(self) -> None:
        require(bool(self.name), "name", "a non-empty reward name", self.name)
        for u in self.urls:  # may be empty in a recipe: the embedded stack fills in local servers
            require(u.startswith(("http://", "https://")), "urls", "http(s):// URLs", u)
        require(math.isfinite(self.weight), "weight", "a finite float", self.weight)
        require(self.timeout_s > 0, "timeout_s", "a float > 0", self.timeout_s)
        require(self.connect_timeout_s > 0, "connect_timeout_s", "a float > 0", self.connect_timeout_s)
        require(self.retries >= 0, "retries", "an int >= 0", self.retries)
        require(self.backoff_initial_s >= 0, "backoff_initial_s", "a float >= 0", self.backoff_initial_s)
        require(self.backoff_max_s >= self.backoff_initial_s, "backoff_max_s", "a float >= backoff_initial_s",
                self.backoff_max_s)
        require(self.eject_after_failures >= 1, "eject_after_failures", "an int >= 1", self.eject_after_failures)
        require(self.health_check_interval_s > 0, "health_check_interval_s", "a float > 0",
                self.health_check_interval_s)
        require(self.encoding in ("protobuf", "json"), "encoding", "protobuf or json", self.encoding)
        require(self.max_items_per_request >= 1, "max_items_per_request", "an int >= 1", self.max_items_per_request)


@dataclass
class RewardClientConfig:
    """The rewards a sampler scores its groups with."""

    rewards: list[RewardEndpointConfig] = field(default_factory=list)
    """One entry per reward."""
    balance: str = "least_outstanding"
    """Replica choice: least_outstanding (fewest requests in flight, ties rotate) or round_robin."""
    max_connections: int = 64
    """Most open connections of the client (all rewards and replicas)."""
    token_file: str = ""
    """File holding the bearer token to send (empty: $DIFFRL_REWARD_TOKEN if set, else none)."""

    def validate(self) -> None:
        names = [r.name for r in self.rewards]  # may be empty in a recipe (filled in by the launcher)
        require(len(set(names)) == len(names), "rewards", "distinct reward names", names)
        require(self.balance in ("least_outstanding", "round_robin"), "balance",
                "least_outstanding or round_robin", self.balance)
        require(self.max_connections >= 1, "max_connections", "an int >= 1", self.max_connections)


def _validated(cfg: RewardClientConfig) -> RewardClientConfig:
    """Validate a config built in code, and require what a working client needs."""
    for i, r in enumerate(cfg.rewards):
        try:
            r.validate()
        except ConfigError as err:
            raise err.under(f"rewards.{i}") from None
        require(len(r.urls) > 0, f"rewards.{i}.urls", f"at least one replica URL for reward {r.name!r}")
    cfg.validate()
    require(len(cfg.rewards) > 0, "rewards", "at least one reward")
    return cfg


# ----------------------------------------------------------------------------- results and errors
class RewardError(Exception):
    """A reward could not score a group. ``kind``: timeout, connection, http_<status>, item_error,
    bad_response, rejected (4xx), no_replicas."""

    def __init__(self, reward: str, kind: str, message: str, status: int | None = None):
        super().__init__(f"reward {reward!r} failed ({kind}): {message}")
        self.reward = reward
        self.kind = kind
        self.message = message
        self.status = status


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


@dataclass
class GroupScores:
    """The rewards of one group. ``scores[name][i]`` is reward ``name`` of image i; ``combined[i]``
    the weighted sum; ``details[name][key][i]`` the reward's sub-scores. When ``failure`` is set the
    group must be dropped (masked) and the other fields are empty."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    combined: list[float] = field(default_factory=list)
    details: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    failure: RewardError | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass
class Group:
    """Input of ``score_groups``: images (PNG bytes or uint8 [H, W, 3] RGB arrays) of one prompt."""

    images: Sequence[Any]
    prompt: str | Sequence[str]
    metadata: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None


# ----------------------------------------------------------------------------- replicas
class _Replica:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.outstanding = 0
        self.healthy = True
        self.failures = 0
        self.ejected_at = 0.0
        self.probe: asyncio.Task | None = None


class _Endpoint:
    def __init__(self, cfg: RewardEndpointConfig, balance: str):
        self.cfg = cfg
        self.name = cfg.name
        self.balance = balance
        self.replicas = [_Replica(u) for u in cfg.urls]
        self._rr = itertools.count()
        self.metrics = client_metrics()

    def pick(self, avoid: _Replica | None) -> _Replica:
        reps = [r for r in self.replicas if r.healthy] or sorted(self.replicas, key=lambda r: r.ejected_at)
        if avoid is not None and len(reps) > 1:
            reps = [r for r in reps if r is not avoid] or reps
        start = next(self._rr)
        rotated = [reps[(start + k) % len(reps)] for k in range(len(reps))]
        if self.balance == "round_robin":
            return rotated[0]
        return min(rotated, key=lambda r: r.outstanding)

    def failed(self, replica: _Replica, client: httpx.AsyncClient) -> None:
        replica.failures += 1
        if replica.healthy and replica.failures >= self.cfg.eject_after_failures:
            replica.healthy = False
            replica.ejected_at = time.monotonic()
            self.metrics.ejections.labels(self.name).inc()
            if replica.probe is None or replica.probe.done():
                replica.probe = asyncio.get_running_loop().create_task(self._probe(replica, client))

    def succeeded(self, replica: _Replica) -> None:
        replica.failures = 0
        if not replica.healthy:
            self._readmit(replica)

    def _readmit(self, replica: _Replica) -> None:
        replica.healthy = True
        replica.failures = 0
        self.metrics.readmissions.labels(self.name).inc()

    async def _probe(self, replica: _Replica, client: httpx.AsyncClient) -> None:
        while not replica.healthy:
            await asyncio.sleep(self.cfg.health_check_interval_s)
            if replica.healthy:  # a fallback request succeeded meanwhile
                return
            try:
                r = await client.get(f"{replica.url}/healthz", timeout=min(self.cfg.timeout_s, 5.0))
                if r.status_code == 200:
                    self._readmit(replica)
                    return
            except httpx.HTTPError:
                pass

    def stop(self) -> None:
        for r in self.replicas:
            if r.probe is not None and not r.probe.done():
                r.probe.cancel()


# ----------------------------------------------------------------------------- the client
def _as_list(value, n: int, what: str) -> list:
    if isinstance(value, (str, bytes, Mapping)) or value is None:
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{len(value)} {what} for {n} images")
    return value


def _to_png(image: Any) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return encode_png(np.asarray(image))


def read_token(token_file: str = "") -> str | None:
    if token_file:
        return Path(token_file).read_text().strip() or None
    return os.environ.get(TOKEN_ENV, "").strip() or None


class RewardClient:
    """Async multi-reward, multi-replica client (see the module docstring). Use as
    ``async with RewardClient(cfg) as client: result = await client.score_group(images, prompt)``."""

    def __init__(self, config: RewardClientConfig, token: str | None = None):
        self.config = _validated(config)
        self.token = token if token is not None else read_token(config.token_file)
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=config.max_connections),
        )
        self.endpoints = {r.name: _Endpoint(r, config.balance) for r in config.rewards}
        self.metrics = client_metrics()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for ep in self.endpoints.values():
            ep.stop()
        await self.http.aclose()

    # -------------------------------------------------------------- one request to one reward
    def _encode(self, ep: _Endpoint, req: reward_pb2.ScoreRequest) -> tuple[bytes, str]:
        if ep.cfg.encoding == "protobuf":
            return req.SerializeToString(), PROTO_MEDIA_TYPE
        return json_format.MessageToJson(req, indent=None).encode(), "application/json"

    async def _attempt(self, ep: _Endpoint, replica: _Replica, body: bytes, ctype: str, n: int):
        cfg = ep.cfg
        replica.outstanding += 1
        t0 = time.perf_counter()
        try:
            r = await self.http.post(
                f"{replica.url}/v1/score", content=body,
                headers={"content-type": ctype, "accept": ctype},
                timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s))
        except httpx.PoolTimeout:  # our own connection pool is saturated: not the replica's fault
            self.metrics.requests.labels(ep.name, "pool_timeout").inc()
            raise _Retryable("timeout", f"{replica.url}: no free connection within {cfg.timeout_s} s "
                             "(raise max_connections)") from None
        except httpx.TimeoutException as err:
            ep.failed(replica, self.http)
            self.metrics.requests.labels(ep.name, "timeout").inc()
            raise _Retryable("timeout", f"{replica.url}: timed out ({type(err).__name__})") from None
        except httpx.TransportError as err:
            ep.failed(replica, self.http)
            self.metrics.requests.labels(ep.name, "connection").inc()
            raise _Retryable("connection", f"{replica.url}: {type(err).__name__}: {err}") from None
        finally:
            replica.outstanding -= 1
            self.metrics.duration.labels(ep.name).observe(time.perf_counter() - t0)
        code = r.status_code
        if code != 200:
            self.metrics.requests.labels(ep.name, f"http_{code // 100}xx").inc()
            reason = _error_text(r)
            if code in (408, 429) or code >= 500:
                if code >= 500 and code != 503:  # 503/429 = busy, not broken
                    ep.failed(replica, self.http)
                raise _Retryable(f"http_{code}", f"{replica.url}: HTTP {code}: {reason}", code)
            raise RewardError(ep.name, "rejected", f"{replica.url} refused the request: HTTP {code}: {reason}", code)
        resp = reward_pb2.ScoreResponse()
        problem = None
        try:
            if r.headers.get("content-type", "").startswith("application/json"):
                json_format.Parse(r.content, resp)
            else:
                resp.ParseFromString(r.content)
        except (DecodeError, json_format.ParseError, ValueError, UnicodeDecodeError) as err:
            problem = f"undecodable response: {type(err).__name__}: {str(err)[:200]}"
        else:
            errors = list(resp.errors) or [""] * len(resp.scores)
            if len(resp.scores) != n or len(errors) != n:
                problem = f"{len(resp.scores)} scores and {len(resp.errors)} errors for {n} images"
            elif any(not e and not math.isfinite(s) for s, e in zip(resp.scores, errors)):
                problem = "a non-finite score without an error"
        if problem is not None:  # a broken replica (not bad input): eject it and retry elsewhere
            ep.failed(replica, self.http)
            self.metrics.requests.labels(ep.name, "bad_response").inc()
            raise _Retryable("bad_response", f"{replica.url}: {problem}")
        ep.succeeded(replica)
        self.metrics.requests.labels(ep.name, "ok").inc()
        return resp

    async def _request(self, ep: _Endpoint, req: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
        body, ctype = self._encode(ep, req)
        n = len(req.items)
        last: list[_Replica | None] = [None]
        cfg = ep.cfg

        def count_retry(state) -> None:
            self.metrics.retries.labels(ep.name).inc()

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(cfg.retries + 1),
                wait=wait_exponential_jitter(initial=cfg.backoff_initial_s, max=cfg.backoff_max_s,
                                             jitter=cfg.backoff_initial_s),
                retry=retry_if_exception_type(_Retryable),
                before_sleep=count_retry,
                reraise=True,
            ):
                with attempt:
                    replica = ep.pick(last[0])
                    last[0] = replica
                    return await self._attempt(ep, replica, body, ctype, n)
        except _Retryable as err:
            raise RewardError(ep.name, err.kind, f"gave up after {cfg.retries + 1} attempts; last: {err.message}",
                              err.status) from None
        raise AssertionError("unreachable")

    async def _score_reward(self, ep: _Endpoint, pngs: list[bytes], prompts: list[str],
                            metadata: list[Mapping[str, str]]) -> tuple[list[float], dict[str, list[float]]]:
        k = ep.cfg.max_items_per_request
        chunks = [range(i, min(i + k, len(pngs))) for i in range(0, len(pngs), k)]
        reqs = [reward_pb2.ScoreRequest(items=[
            reward_pb2.Item(png=pngs[i], prompt=prompts[i] or "", metadata=dict(metadata[i] or {})) for i in c])
            for c in chunks]
        resps = await asyncio.gather(*(self._request(ep, r) for r in reqs))
        scores: list[float] = []
        details: dict[str, list[float]] = {}
        for c, resp in zip(chunks, resps):
            bad = [(c[j], e) for j, e in enumerate(resp.errors) if e]
            if bad:
                raise RewardError(ep.name, "item_error", f"{len(bad)} of {len(pngs)} images could not be scored; "
                                  f"first: image {bad[0][0]}: {bad[0][1]}")
            scores.extend(resp.scores)
            for key, fl in resp.details.items():
                details.setdefault(key, []).extend(fl.values)
        return scores, details

    # -------------------------------------------------------------- public API
    async def score_group(self, images: Sequence[Any], prompt: str | Sequence[str],
                          metadata: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None) -> GroupScores:
        """Score one group with every reward. ``images``: PNG bytes or uint8 [H, W, 3] RGB arrays;
        ``prompt``/``metadata``: one for the group or one per image. Raises :class:`RewardError`
        if any reward fails the group (counted)."""
        n = len(images)
        if n == 0:
            raise ValueError("score_group: the group has no images")
        prompts = _as_list(prompt, n, "prompts")
        metas = _as_list(metadata, n, "metadata maps")
        if all(isinstance(im, (bytes, bytearray, memoryview)) for im in images):
            pngs = [bytes(im) for im in images]
        else:
            pngs = await asyncio.to_thread(lambda: [_to_png(im) for im in images])
        names = list(self.endpoints)
        results = await asyncio.gather(*(self._score_reward(self.endpoints[name], pngs, prompts, metas)
                                         for name in names), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            if isinstance(failure, RewardError):
                self.metrics.failures.labels(failure.reward, failure.kind).inc()
                raise failure
            raise failure
        out = GroupScores()
        combined = [0.0] * n
        for name, (scores, details) in zip(names, results):
            w = self.endpoints[name].cfg.weight
            out.scores[name] = list(scores)
            out.details[name] = details
            for i, s in enumerate(scores):
                combined[i] += w * s
        out.combined = combined
        return out

    async def score_groups(self, groups: Sequence[Group]) -> list[GroupScores]:
        """Score many groups concurrently; a failed group comes back with ``failure`` set."""
        async def one(g: Group) -> GroupScores:
            try:
                return await self.score_group(g.images, g.prompt, g.metadata)
            except RewardError as err:
                return GroupScores(failure=err)

        return list(await asyncio.gather(*(one(g) for g in groups)))

    async def info(self, name: str) -> dict[str, Any]:
        """``GET /v1/info`` of reward ``name`` (first replica that answers): every ``RewardInfo`` field by
        its proto name (uint64 limits as strings, protobuf's JSON mapping); ``pass_threshold`` is None
        when the reward defines no pass rate, else the float32 value the scores travel in."""
        ep = self.endpoints[name]
        last: Exception | None = None
        for replica in ep.replicas:
            try:
                r = await self.http.get(f"{replica.url}/v1/info", headers={"accept": "application/json"},
                                        timeout=ep.cfg.timeout_s)
                r.raise_for_status()
                msg = json_format.Parse(r.content, reward_pb2.RewardInfo(), ignore_unknown_fields=True)
                info = json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                                 always_print_fields_with_no_presence=True)
                info["pass_threshold"] = msg.pass_threshold if msg.HasField("pass_threshold") else None
                return info
            except (httpx.HTTPError, json_format.ParseError) as err:
                last = err
        raise RewardError(name, "no_replicas", f"no replica answered /v1/info: {last}")

    def replica_health(self) -> dict[str, dict[str, bool]]:
        """{reward: {url: in rotation}}."""
        return {n: {r.url: r.healthy for r in ep.replicas} for n, ep in self.endpoints.items()}


def _error_text(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error", r.text))[:500]
    except Exception:  # noqa: BLE001 - any non-JSON error body
        return r.text[:500]


class SyncRewardClient:
    """Blocking facade over :class:`RewardClient` for in-process use: runs its own event loop in a
    daemon thread, so it works from any thread (also one that has a loop of its own)."""

    def __init__(self, config: RewardClientConfig, token: str | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-client", daemon=True)
        self._thread.start()
        self._client: RewardClient = self._run(self._make(config, token))

    async def _make(self, config, token) -> RewardClient:
        return RewardClient(config, token)

    def _run(self, coro, timeout: float | None = None):
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def score_group(self, images, prompt, metadata=None) -> GroupScores:
        return self._run(self._client.score_group(images, prompt, metadata))

    def score_groups(self, groups: Sequence[Group]) -> list[GroupScores]:
        return self._run(self._client.score_groups(groups))

    def info(self, name: str) -> dict[str, Any]:
        return self._run(self._client.info(name))

    def replica_health(self) -> dict[str, dict[str, bool]]:
        return self._client.replica_health()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
