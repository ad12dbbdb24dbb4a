"""Where a run folder lives: the local disk, a shared volume, or an object store (``run.storage``).

Three cases, one rule for everyone who writes into the run folder (job driver, learner ranks,
samplers, reward servers):

- ``run.storage`` empty (the default): the run folder is ``run.output_dir/run.name`` on the driver's
  disk. Fine on one machine; on a multi-node cluster the learner's checkpoints would stay on the
  learner's node, so the job warns.
- a path (``/mnt/runs``, ``file:///mnt/runs``): a volume mounted at the same path on every node. The
  run folder is ``storage/run.name``; every process writes there directly.
- an fsspec URL (``s3://bucket/runs``, ``gs://…``, ``memory://…``): every process keeps a working copy
  of what it writes under ``run.output_dir/run.name`` on its own node and uploads it to
  ``storage/run.name`` (:class:`RunStorage`). Uploads retry with backoff (``run.storage_retry``,
  counted in ``diffrl_storage_retries_total``).

A checkpoint in object storage is committed the way the local one is: every file of
``checkpoints/step_XXXXXX/`` is uploaded first, then ``MANIFEST.json`` (each file's size), then
``checkpoints/latest``; :meth:`RunStorage.latest_checkpoint` takes a checkpoint only when the manifest
is there and every file it lists has its size, so a partial upload is never taken as the latest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffrl.config import require

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
"""Inside an uploaded checkpoint folder: ``{"files": {relative path: size in bytes}}``, written after
the files and before ``latest``."""
RETRIES_TOTAL = "diffrl_storage_retries_total"
"""Counter (label op): storage operations retried after an error."""
FAILURES_TOTAL = "diffrl_storage_failures_total"
"""Counter (label op): storage operations that failed after every retry."""
UPLOADED_BYTES_TOTAL = "diffrl_storage_uploaded_bytes_total"
"""Counter: bytes uploaded to the run's object storage."""


class StorageError(RuntimeError):
    """The run's storage cannot be reached or written (after the configured retries)."""


@dataclass
class StorageRetry:
    """How uploads and downloads ride out an unreachable object store."""

    max_elapsed_s: float = 120.0
    """How long one storage operation keeps retrying before it fails, seconds (0 = no retries)."""
    initial_backoff_s: float = 0.5
    """First wait between retries, seconds (doubles each retry)."""
    max_backoff_s: float = 15.0
    """Longest wait between retries, seconds."""
    max_checkpoint_outage_s: float = 1800.0
    """The run fails when no checkpoint could be saved for this long, seconds (it never trains on
    without checkpoints for longer); failed saves before that are logged and counted, and their
    experience stays unacknowledged (it is trained again after a resume, never lost)."""

    def validate(self) -> None:
        require(self.max_elapsed_s >= 0, "max_elapsed_s", "seconds >= 0", self.max_elapsed_s)
        require(self.initial_backoff_s > 0, "initial_backoff_s", "seconds > 0", self.initial_backoff_s)
        require(self.max_backoff_s >= self.initial_backoff_s, "max_backoff_s", "seconds >= initial_backoff_s",
                self.max_backoff_s)
        require(self.max_checkpoint_outage_s > 0, "max_checkpoint_outage_s", "seconds > 0",
                self.max_checkpoint_outage_s)


def is_url(location: str) -> bool:
    """True for ``scheme://…`` other than ``file://`` (an object store, uploaded to)."""
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> Path:
    """A path or ``file://`` URL as an absolute path."""
    return Path(location.removeprefix("file://")).expanduser().resolve()


def run_location(storage: str, output_dir: str, name: str) -> tuple[Path, str]:
    """(the local run folder this node writes, the run's storage URL or "" when the local folder is
    the run folder) for ``run.storage`` / ``run.output_dir`` / ``run.name``."""
    if not storage:
        return Path(output_dir).expanduser().resolve() / name, ""
    if not is_url(storage):
        return local_path(storage) / name, ""
    return Path(output_dir).expanduser().resolve() / name, storage.rstrip("/") + "/" + name


_COUNTERS: dict[str, Any] = {}
_COUNTER_LOCK = threading.Lock()


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()):
    """A counter of the process's default Prometheus registry (created once per process)."""
    with _COUNTER_LOCK:
        if name not in _COUNTERS:
            from prometheus_client import Counter

            _COUNTERS[name] = Counter(name.removesuffix("_total"), doc, labels)
        return _COUNTERS[name]


class RunStorage:
    """One run folder in object storage (``root`` = ``storage/run.name``), reached through fsspec.

    Every operation retries on errors with exponential backoff for ``retry.max_elapsed_s`` and then
    raises :class:`StorageError`. ``storage_options`` go to the fsspec filesystem (e.g. an S3
    ``endpoint_url``; credentials come from the usual environment variables)."""

    def __init__(self, root: str, retry: StorageRetry | None = None, **storage_options: Any):
        import fsspec

        self.root = root.rstrip("/")
        self.retry = retry or StorageRetry()
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **storage_options)

    def __repr__(self) -> str:
        return f"RunStorage({self.root!r})"

    def _key(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def _call(self, op: str, fn, *args, **kwargs):
        """``fn(*args)`` with retries; :class:`StorageError` naming the operation when it keeps failing."""
        deadline = time.monotonic() + self.retry.max_elapsed_s
        wait = self.retry.initial_backoff_s
        while True:
            try:
                return fn(*args, **kwargs)
            except FileNotFoundError:
                raise
            except Exception as err:
                if time.monotonic() + wait > deadline:
                    _counter(FAILURES_TOTAL, "Storage operations that failed after every retry.", ("op",)) \
                        .labels(op=op).inc()
                    raise StorageError(f"run.storage {self.root}: {op} failed: {type(err).__name__}: {err}") from err
                _counter(RETRIES_TOTAL, "Storage operations retried after an error.", ("op",)).labels(op=op).inc()
                log.warning("storage %s failed (%s: %s); retrying in %.1f s", op, type(err).__name__, err, wait)
                time.sleep(wait)
                wait = min(wait * 2, self.retry.max_backoff_s)

    # ---------------------------------------------------------------------------------- files

    def check(self) -> None:
        """Write, read back and delete a probe object: fails fast (no retries) with the URL and the
        cause when the storage cannot be reached or written."""
        key = self._key(f".diffrl-probe-{uuid.uuid4().hex[:12]}")
        try:
            self.fs.pipe_file(key, b"ok")
            if self.fs.cat_file(key) != b"ok":
                raise OSError("read back something else than was written")
            self.fs.rm_file(key)
        except Exception as err:
            raise StorageError(f"run.storage {self.root}: cannot write there: {type(err).__name__}: {err}") from err

    def put_file(self, local: str | Path, rel: str) -> int:
        """Upload one file (a single PUT: the object is either the whole file or absent); its size."""
        size = Path(local).stat().st_size
        self._call(f"put {rel}", self.fs.put_file, str(local), self._key(rel))
        _counter(UPLOADED_BYTES_TOTAL, "Bytes uploaded to the run's object storage.").inc(size)
        return size

    def put_text(self, rel: str, text: str) -> None:
        self._call(f"put {rel}", self.fs.pipe_file, self._key(rel), text.encode("utf-8"))

    def get_file(self, rel: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._call(f"get {rel}", self.fs.get_file, self._key(rel), str(local))

    def read_text(self, rel: str) -> str | None:
        """The object's text, or None when it does not exist."""
        try:
            return self._call(f"read {rel}", self.fs.cat_file, self._key(rel)).decode("utf-8")
        except FileNotFoundError:
            return None

    def list_files(self, rel: str = "") -> dict[str, int]:
        """Every object under ``rel``: {path relative to ``rel``: size}."""
        base = self._key(rel).rstrip("/")
        try:
            found = self._call(f"list {rel}", self.fs.find, base, detail=True)
        except FileNotFoundError:
            return {}
        return {k[len(base) + 1:]: int(v.get("size") or 0) for k, v in found.items() if v.get("type") != "directory"}

    def put_tree(self, local_dir: str | Path, rel: str) -> dict[str, int]:
        """Upload every file under ``local_dir`` to ``rel/``; {relative path: size}."""
        local_dir = Path(local_dir)
        sizes = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            sub = path.relative_to(local_dir).as_posix()
            sizes[sub] = self.put_file(path, f"{rel}/{sub}" if rel else sub)
        return sizes

    def get_tree(self, rel: str, local_dir: str | Path, skip: tuple[str, ...] = ()) -> list[str]:
        """Download every object under ``rel`` into ``local_dir`` except those whose path starts with
        one of ``skip``; the relative paths downloaded."""
        got = []
        for sub in sorted(self.list_files(rel)):
            if sub.startswith(skip):
                continue
            self.get_file(f"{rel}/{sub}" if rel else sub, Path(local_dir) / sub)
            got.append(sub)
        return got

    def remove_tree(self, rel: str) -> None:
        try:
            self._call(f"remove {rel}", self.fs.rm, self._key(rel), recursive=True)
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------------------------------- checkpoints

    def commit_checkpoint(self, name: str, checkpoints: str = "checkpoints") -> dict[str, int]:
        """Write ``name``'s manifest from what is uploaded, then point ``latest`` at it."""
        files = {k: v for k, v in self.list_files(f"{checkpoints}/{name}").items() if k != MANIFEST}
        if not files:
            raise StorageError(f"run.storage {self.root}: {checkpoints}/{name} has no files to commit")
        self.put_text(f"{checkpoints}/{name}/{MANIFEST}", json.dumps({"files": files}, sort_keys=True))
        self.put_text(f"{checkpoints}/latest", name + "\n")
        return files

    def latest_checkpoint(self, checkpoints: str = "checkpoints") -> str | None:
        """The name of the newest complete checkpoint: the one ``latest`` names when its manifest is
        there and every file it lists has its size (None: no complete checkpoint)."""
        pointer = self.read_text(f"{checkpoints}/latest")
        if pointer is None:
            return None
        name = pointer.strip()
        manifest = self.read_text(f"{checkpoints}/{name}/{MANIFEST}")
        if manifest is None:
            raise StorageError(f"run.storage {self.root}: {checkpoints}/latest names {name!r}, which has no {MANIFEST}")
        listed = json.loads(manifest)["files"]
        present = self.list_files(f"{checkpoints}/{name}")
        bad = sorted(k for k, size in listed.items() if present.get(k) != size)
        if bad:
            raise StorageError(f"run.storage {self.root}: checkpoint {name} is incomplete ({len(bad)} of "
                               f"{len(listed)} files missing or of another size, e.g. {bad[0]})")
        return name

    def prune_checkpoints(self, keep: int, latest: str, checkpoints: str = "checkpoints") -> list[str]:
        """Delete all but the newest ``keep`` checkpoint folders up to ``latest`` (never newer ones)."""
        if keep <= 0:
            return []
        names = sorted({k.split("/", 1)[0] for k in self.list_files(checkpoints) if k.startswith("step_")})
        older = [n for n in names if n <= latest]
        doomed = older[:-keep] if len(older) > keep else []
        for n in doomed:
            self.remove_tree(f"{checkpoints}/{n}")
        return doomed


def open_storage(url: str, retry: StorageRetry | None = None) -> RunStorage | None:
    """A :class:`RunStorage` for a run's storage URL, or None when the run folder is local."""
    if not url:
        return None
    import os

    options = {}
    endpoint = os.environ.get("DIFFRL_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if url.startswith(("s3://", "s3a://")) and endpoint:
        options["endpoint_url"] = endpoint
    return RunStorage(url, retry, **options)


def fetch_run(url: str, dest_root: str | Path, step: int | None = None, retry: StorageRetry | None = None) -> Path:
    """A local copy of what reading a run in object storage needs (``diffrl export``, ``diffrl eval
    --model``): its recipes and one complete checkpoint (the latest, or ``step``'s) without the
    DeepSpeed engine folders, under ``dest_root/<run name>``; that folder."""
    from diffrl import run_folder

    storage = open_storage(url.rstrip("/"), retry)
    if step is None:
        name = storage.latest_checkpoint()
        if name is None:
            raise StorageError(f"{url}: no complete checkpoint there")
    else:
        name = f"step_{step:06d}"
        if storage.read_text(f"{run_folder.CHECKPOINTS}/{name}/{MANIFEST}") is None:
            raise StorageError(f"{url}: no complete checkpoint of step {step}")
    local = Path(dest_root) / storage.root.rsplit("/", 1)[-1]
    for rel in (run_folder.CONFIG, run_folder.CONFIG_RESUMED):
        text = storage.read_text(rel)
        if text is not None:
            local.mkdir(parents=True, exist_ok=True)
            (local / rel).write_text(text)
    folder = local / run_folder.CHECKPOINTS / name
    storage.get_tree(f"{run_folder.CHECKPOINTS}/{name}", folder, skip=("engine_", MANIFEST))
    (local / run_folder.CHECKPOINTS / "latest").write_text(name + "\n")
    return local
