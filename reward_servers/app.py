"""The reward server: one FastAPI app per reward, built by :func:`create_app`.

Endpoints (proto/reward.proto is the contract):

- ``POST /v1/score``: a ``ScoreRequest`` as ``application/x-protobuf`` or as protobuf's JSON
  mapping (``application/json``); the ``ScoreResponse`` comes back in the same encoding (or the one
  named by ``Accept``). ``scores[i]``/``errors[i]`` belong to ``items[i]``; ``errors[i] == ""``
  means the score is valid.
- ``GET /v1/info``: ``RewardInfo`` (JSON, or protobuf with ``Accept: application/x-protobuf``).
- ``GET /healthz``: 200 while the process serves. ``GET /metrics``: Prometheus text.

Bad input is refused as a whole request with a JSON body ``{"error": message, "kind": kind}``:
401 (token), 415 (content type), 413 (body bytes, image count, image or request pixels, prompt
length), 400 (undecodable body, empty batch, an item that is not a PNG/JPEG or is truncated), 422
(an item this reward cannot score: missing prompt text or metadata), 503 (too many images pending;
retry elsewhere). Item errors name the item (``items[3]: ...``). A whole-request refusal is the
rule for malformed input because a request carries one group and the group is the unit that
fails. Only a failure *of the scorer* on some items of a good request is reported per item in
``errors[i]`` (the other items keep their scores).

The event loop only reads bodies and writes responses: parsing, decoding and scoring run in a
thread pool, and concurrent requests are micro-batched when the scorer gains from it (see
``diffrl.reward_servers.batching``).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import cv2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST

from diffrl.proto import reward_pb2
from diffrl.reward_servers.batching import MicroBatcher, Scored, score_robustly
from diffrl.reward_servers.config import ExecutionConfig, ServerLimits
from diffrl.reward_servers.images import ImageError, decode_image, image_header
from diffrl.reward_servers.metrics import ServerMetrics
from diffrl.reward_servers.scorers.base import Scorer

PROTO_TYPES = ("application/x-protobuf", "application/protobuf", "application/vnd.google.protobuf")
JSON_TYPES = ("application/json",)
PROTO_MEDIA_TYPE = "application/x-protobuf"


class RequestError(Exception):
    """A refused request: HTTP ``status``, a metrics ``kind`` and a message for the caller."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or {}


@dataclass
class _Prepared:
    images: list
    prompts: list[str]
    metadata: list[dict[str, str]]


def _encoding_of(content_type: str | None) -> str | None:
    media = (content_type or "").split(";")[0].strip().lower()
    if media in PROTO_TYPES:
        return "protobuf"
    if media in JSON_TYPES:
        return "json"
    return None


def _wanted_encoding(accept: str | None, default: str) -> str:
    accept = (accept or "").lower()
    proto = any(t in accept for t in PROTO_TYPES)
    js = "application/json" in accept
    if proto and not js:
        return "protobuf"
    if js and not proto:
        return "json"
    return default


def encode_message(msg, encoding: str) -> Response:
    if encoding == "protobuf":
        return Response(msg.SerializeToString(), media_type=PROTO_MEDIA_TYPE)
    return Response(json_format.MessageToJson(msg, always_print_fields_with_no_presence=True, indent=None),
                    media_type="application/json")


class RewardService:
    """State of one reward app: scorer, limits, pool, batcher, metrics, admission counter."""

    def __init__(self, scorer: Scorer, limits: ServerLimits, execution: ExecutionConfig, token: str | None):
        self.scorer = scorer
        self.limits = limits
        self.execution = execution
        self.token = token.strip() if token else None
        self.metrics = ServerMetrics(scorer.name)
        threads = execution.threads or len(os.sched_getaffinity(0))
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"reward-{scorer.name}")
        mode = execution.microbatch
        self.microbatch = mode == "always" or (mode == "auto" and scorer.prefers_batching)
        self.batcher: MicroBatcher | None = None
        self._pending = 0
        self._lock = threading.Lock()
        self._latency_rng = random.Random()
        self.started = time.time()

    # ------------------------------------------------------------------ admission
    def _admit(self, n: int) -> None:
        with self._lock:
            if self._pending + n > self.limits.max_pending_items:
                raise RequestError(503, "overloaded", f"{self._pending} images pending, {n} more would exceed "
                                   f"max_pending_items={self.limits.max_pending_items}; retry later or elsewhere",
                                   headers={"Retry-After": "1"})
            self._pending += n
        self.metrics.pending.labels(self.scorer.name).inc(n)

    def _release(self, n: int) -> None:
        with self._lock:
            self._pending -= n
        self.metrics.pending.labels(self.scorer.name).dec(n)

    # ------------------------------------------------------------------ request handling (pool threads)
    def parse(self, body: bytes, encoding: str) -> reward_pb2.ScoreRequest:
        req = reward_pb2.ScoreRequest()
        try:
            if encoding == "protobuf":
                req.ParseFromString(body)
            else:
                json_format.Parse(body, req)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError) as err:
            raise RequestError(400, "bad_request", f"the body is not a valid {encoding} ScoreRequest: {err}") from None
        return req

    def check(self, req: reward_pb2.ScoreRequest) -> None:
        lim = self.limits
        n = len(req.items)
        if n == 0:
            raise RequestError(400, "empty_batch", "the request has no items; send at least one image")
        if n > lim.max_items:
            raise RequestError(413, "too_many_items", f"{n} items exceed max_items={lim.max_items}; split the batch")
        for i, item in enumerate(req.items):
            if len(item.prompt) > lim.max_prompt_chars:
                raise RequestError(413, "prompt_too_long", f"items[{i}].prompt has {len(item.prompt)} characters, "
                                   f"more than max_prompt_chars={lim.max_prompt_chars}")
            problem = self.scorer.check_item(item.prompt, item.metadata)
            if problem:
                kind = "missing_prompt" if "prompt" in problem and not item.prompt.strip() else "invalid_item"
                raise RequestError(422, kind, f"items[{i}]: {problem}")

    def decode(self, req: reward_pb2.ScoreRequest) -> list:
        lim = self.limits
        total = 0
        for i, item in enumerate(req.items):
            try:
                _, w, h = image_header(item.png)
            except ImageError as err:
                raise RequestError(400, err.kind, f"items[{i}].png: {err}") from None
            if w * h > lim.max_image_pixels:
                raise RequestError(413, "image_too_large", f"items[{i}].png: {w}x{h} = {w * h} pixels exceed "
                                   f"max_image_pixels={lim.max_image_pixels}")
            total += w * h
        if total > lim.max_request_pixels:
            raise RequestError(413, "image_too_large", f"the request's images hold {total} pixels, more than "
                               f"max_request_pixels={lim.max_request_pixels}; split the batch")
        images = []
        for i, item in enumerate(req.items):
            try:
                images.append(decode_image(item.png, lim.max_image_pixels))
            except ImageError as err:
                raise RequestError(413 if err.kind == "image_too_large" else 400, err.kind,
                                   f"items[{i}].png: {err}") from None
        return images

    def prepare(self, body: bytes, encoding: str) -> _Prepared:
        """Parse, check, admit and decode (admitted images must be released by the caller)."""
        req = self.parse(body, encoding)
        self.check(req)
        n = len(req.items)
        self.metrics.batch_size.labels(self.scorer.name, "request").observe(n)
        self._admit(n)
        try:
            images = self.decode(req)
        except BaseException:
            self._release(n)
            raise
        return _Prepared(images, [it.prompt for it in req.items], [dict(it.metadata) for it in req.items])

    def _on_scorer_call(self, n: int, seconds: float) -> None:
        self.metrics.batch_size.labels(self.scorer.name, "scorer").observe(n)
        self.metrics.scorer_duration.labels(self.scorer.name).observe(seconds)

    def run_batch(self, images, prompts, metadata) -> Scored:
        return score_robustly(self.scorer, images, prompts, metadata, self._on_scorer_call)

    def prepare_and_score(self, body: bytes, encoding: str) -> Scored:
        p = self.prepare(body, encoding)
        try:
            return self.run_batch(p.images, p.prompts, p.metadata)
        finally:
            self._release(len(p.images))

    def response(self, result: Scored) -> reward_pb2.ScoreResponse:
        resp = reward_pb2.ScoreResponse(scores=result.scores, errors=result.errors)
        for k, v in result.details.items():
            resp.details[k].values.extend(v)
        n_bad = sum(1 for e in result.errors if e)
        if n_bad:
            self.metrics.error("item_error", n_bad)
        self.metrics.images.labels(self.scorer.name).inc(len(result.errors) - n_bad)
        return resp

    def info(self) -> reward_pb2.RewardInfo:
        i = self.scorer.info()
        return reward_pb2.RewardInfo(
            name=i["name"], version=i["version"], min_score=i["min_score"], max_score=i["max_score"],
            higher_is_better=i["higher_is_better"], description=i["description"],
            max_items_per_request=self.limits.max_items, max_request_bytes=self.limits.max_request_bytes,
            max_image_pixels=self.limits.max_image_pixels, pass_threshold=i.get("pass_threshold"))

    # ------------------------------------------------------------------ async parts
    def check_token(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise RequestError(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer ...)",
                               headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(400, "bad_request", f"invalid Content-Length {declared!r}") from None
            if size > limit:
                raise RequestError(413, "request_too_large", f"the body has {size} bytes, more than "
                                   f"max_request_bytes={limit}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise RequestError(413, "request_too_large", f"the body exceeds max_request_bytes={limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def score(self, request: Request) -> Response:
        self.check_token(request)
        encoding = _encoding_of(request.headers.get("content-type"))
        if encoding is None:
            raise RequestError(415, "unsupported_media_type",
                               f"Content-Type {request.headers.get('content-type')!r} is not supported: send "
                               f"{PROTO_MEDIA_TYPE} (reward.proto ScoreRequest) or application/json (its JSON mapping)")
        request.state.encoding = encoding
        body = await self.read_body(request)
        loop = asyncio.get_running_loop()
        if self.batcher is None:
            result = await loop.run_in_executor(self.pool, self.prepare_and_score, body, encoding)
        else:
            p = await loop.run_in_executor(self.pool, self.prepare, body, encoding)
            try:
                result = await self.batcher.submit(p.images, p.prompts, p.metadata)
            finally:
                self._release(len(p.images))
        await self.injected_latency()
        return encode_message(self.response(result), _wanted_encoding(request.headers.get("accept"), encoding))

    def latency_s(self) -> float:
        """One draw of the simulated latency (``execution.latency_ms`` +- ``latency_jitter_ms``), seconds."""
        ex = self.execution
        jitter = self._latency_rng.uniform(-ex.latency_jitter_ms, ex.latency_jitter_ms) if ex.latency_jitter_ms else 0.0
        return max(0.0, ex.latency_ms + jitter) / 1000.0

    async def injected_latency(self) -> None:
        """Wait the simulated latency (an asyncio sleep: other requests are served meanwhile)."""
        if self.execution.latency_ms <= 0:
            return
        delay = self.latency_s()
        await asyncio.sleep(delay)
        self.metrics.injected_latency.labels(self.scorer.name).inc(delay)

    async def startup(self) -> None:
        if self.microbatch:
            self.batcher = MicroBatcher(self.run_batch, self.pool, max_items=self.execution.max_batch_items,
                                        max_wait_s=self.execution.max_wait_ms / 1000.0, slots=self.threads)
            self.batcher.start()

    async def shutdown(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.scorer.close()


def create_app(scorer: Scorer, limits: ServerLimits | None = None, token: str | None = None,
               execution: ExecutionConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``scorer`` (see the module docstring for the protocol)."""
    limits = limits or ServerLimits()
    execution = execution or ExecutionConfig()
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # any Pillow decode in a scorer is bounded too
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # errors only: truncated images are reported to the caller, not logged
    svc = RewardService(scorer, limits, execution, token)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.startup()
        try:
            yield
        finally:
            await svc.shutdown()

    app = FastAPI(title=f"diffrl reward: {scorer.name}", version=scorer.version, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    def status_class(code: int) -> str:
        return f"{code // 100}xx"

    @app.exception_handler(RequestError)
    async def _refused(request: Request, err: RequestError) -> JSONResponse:
        svc.metrics.error(err.kind)
        return JSONResponse({"error": err.message, "kind": err.kind}, status_code=err.status, headers=err.headers)

    async def score(request: Request) -> Response:
        t0 = time.perf_counter()
        code = 500
        try:
            resp = await svc.score(request)
            code = resp.status_code
            return resp
        except RequestError as err:
            code = err.status
            raise
        finally:
            enc = getattr(request.state, "encoding", None) or "none"
            svc.metrics.request_duration.labels(scorer.name, enc, status_class(code)).observe(time.perf_counter() - t0)
            svc.metrics.requests.labels(scorer.name, status_class(code)).inc()
            if code >= 500 and code != 503:
                svc.metrics.error("internal")

    # A plain Starlette route (no FastAPI parameter handling on the hot path); same exception handlers.
    app.router.add_route("/v1/score", score, methods=["POST"], name="score")

    @app.get("/v1/info")
    async def info(request: Request) -> Response:
        svc.check_token(request)
        return encode_message(svc.info(), _wanted_encoding(request.headers.get("accept"), "json"))

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "reward": scorer.name, "version": scorer.version,
                             "pending_images": svc._pending, "uptime_s": round(time.time() - svc.started, 3)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
