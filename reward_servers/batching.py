"""Scoring execution: a scorer call that never raises for a bad item, and a small async
micro-batcher that merges concurrent requests into one scorer call.

``score_robustly`` runs ``scorer.score_batch``; if it raises, the items are scored one by one so
that only the failing ones get an error message (``errors[i]``), never a made-up score. A
non-finite score is an item error too.

``MicroBatcher``: requests are queued; a batch is dispatched to the thread pool as soon as it holds
``max_items`` images, or ``max_wait_s`` after its first request arrived, and only while fewer than
``slots`` batches are running (so while the pool is busy, more requests join the next batch: the
batch size adapts to load). A request is never split; a request larger than ``max_items`` runs
alone.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from diffrl.reward_servers.scorers.base import Scorer


@dataclass
class Scored:
    scores: list[float]
    errors: list[str]
    details: dict[str, list[float]] = field(default_factory=dict)


def _fail(n: int, message: str) -> Scored:
    return Scored([math.nan] * n, [message] * n, {})


def score_robustly(scorer: Scorer, images: Sequence[np.ndarray], prompts: Sequence[str],
                   metadata: Sequence[Mapping[str, str]], on_call: Callable[[int, float], None] | None = None) -> Scored:
    """Score a batch; per-item error messages instead of exceptions (see module docstring)."""
    n = len(images)
    t0 = time.perf_counter()
    try:
        scores, details = scorer.score_batch(images, prompts, metadata)
        scores = [float(s) for s in scores]
        if len(scores) != n or any(len(v) != n for v in details.values()):
            raise RuntimeError(f"scorer returned {len(scores)} scores / details of other lengths for {n} images")
    except Exception as err:  # noqa: BLE001 - isolate the failing items
        if on_call:
            on_call(n, time.perf_counter() - t0)
        if n == 1:
            return _fail(1, f"scorer failed: {type(err).__name__}: {err}")
        return merge([score_robustly(scorer, [im], [p], [m], on_call) for im, p, m in zip(images, prompts, metadata)])
    if on_call:
        on_call(n, time.perf_counter() - t0)
    errors = ["" if math.isfinite(s) else f"scorer returned a non-finite score ({s})" for s in scores]
    return Scored(scores, errors, {k: [float(x) for x in v] for k, v in details.items()})


def merge(parts: Sequence[Scored]) -> Scored:
    """Concatenate results item-wise; a detail missing from one part is NaN for its items."""
    keys: list[str] = []
    for p in parts:
        keys.extend(k for k in p.details if k not in keys)
    out = Scored([], [], {k: [] for k in keys})
    for p in parts:
        out.scores.extend(p.scores)
        out.errors.extend(p.errors)
        for k in keys:
            out.details[k].extend(p.details.get(k, [math.nan] * len(p.scores)))
    return out


def split(result: Scored, sizes: Sequence[int]) -> list[Scored]:
    out, start = [], 0
    for n in sizes:
        out.append(Scored(result.scores[start:start + n], result.errors[start:start + n],
                          {k: v[start:start + n] for k, v in result.details.items()}))
        start += n
    return out


@dataclass
class _Job:
    images: Sequence[np.ndarray]
    prompts: Sequence[str]
    metadata: Sequence[Mapping[str, str]]
    future: asyncio.Future
    arrived: float


class MicroBatcher:
    """Merge concurrent ``submit`` calls into scorer calls run by ``run_batch`` in ``executor``."""

    def __init__(self, run_batch: Callable[[list, list, list], Scored], executor: Executor, *, max_items: int,
                 max_wait_s: float, slots: int):
        self.run_batch = run_batch
        self.executor = executor
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(max(1, slots))
        self._queue: deque[_Job] = deque()
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Future] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="microbatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("server shutting down"))

    async def submit(self, images, prompts, metadata) -> Scored:
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(images, prompts, metadata, fut, time.monotonic()))
        self._queued_items += len(images)
        self._wakeup.set()
        return await fut

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for the batch to fill, up to max_wait after its first request.
            while self._queued_items < self.max_items:
                remaining = self._queue[0].arrived + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            await self._slots.acquire()
            jobs: list[_Job] = []
            total = 0
            while self._queue and (not jobs or total + len(self._queue[0].images) <= self.max_items):
                job = self._queue.popleft()
                total += len(job.images)
                jobs.append(job)
            self._queued_items -= total
            images = [im for j in jobs for im in j.images]
            prompts = [p for j in jobs for p in j.prompts]
            metadata = [m for j in jobs for m in j.metadata]
            fut = loop.run_in_executor(self.executor, self.run_batch, images, prompts, metadata)
            self._running.add(fut)
            fut.add_done_callback(lambda f, jobs=jobs: self._done(f, jobs))

    def _done(self, fut: asyncio.Future, jobs: list[_Job]) -> None:
        self._running.discard(fut)
        self._slots.release()
        if fut.cancelled():
            err: BaseException | None = RuntimeError("scoring cancelled")
        else:
            err = fut.exception()
        if err is not None:
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        for j, part in zip(jobs, split(fut.result(), [len(j.images) for j in jobs])):
            if not j.future.done():
                j.future.set_result(part)
