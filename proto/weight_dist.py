"""p_samp over torch.distributed: a weight channel for weights too large for the Ray object store.

Same interface as the channels of :mod:`diffrl.proto.weight_sync` (``publish`` on learner rank 0;
``latest_version`` / ``fetch_newer`` on the samplers), outside the learner's DeepSpeed default group:

- Learner rank 0 (:class:`TorchDistPublisher`) hosts a ``TCPStore`` (``weights.port``; 0 = a free
  port) whose address the samplers find through the run's named Ray registry actor (or any resolver).
  ``publish`` packs the tensors into one flat buffer per dtype (a snapshot: training goes on changing
  the weights) plus a typed header, a ``WeightUpdate`` message (proto/weights.proto) whose tensors
  carry name, dtype and shape but no data, and sets the store's ``version`` key. That is all the
  training step waits for; it never talks to a sampler.
- A sampler (:class:`TorchDistSource`) joins by taking a ticket from the store (``joins`` counter)
  and forms a two-rank process group (``ProcessGroupGloo``, or ``ProcessGroupNCCL`` when both sides
  have CUDA) with rank 0 on a ``PrefixStore`` of that ticket. ``fetch_newer`` reads the store's
  version; if it is newer, it posts a request key and receives header length, header and buffers,
  always of the newest snapshot (a sampler that missed versions takes the newest one).
- On rank 0 an acceptor thread notices new tickets and starts one server thread per sampler, which
  serves that sampler's requests from the latest snapshot.

Why pairs instead of one collective broadcast to all samplers: a broadcast needs every member in the
same call at the same time, so the learner (or every sampler) would wait for the slowest sampler,
and one sampler dying mid-broadcast fails the collective for all members, which then have to agree
on a new group. With a pair per sampler, samplers pull when they are between rounds (as with the
object store), a dead or slow sampler only fails its own pair (its server thread counts the failure
and exits; a restarted sampler takes a new ticket and a new pair), and the training step only packs
a snapshot. The price is that rank 0 sends one copy per sampler: its link carries N x the update per
version (pairs run concurrently, one thread each). docs/operations.md ("Weight sync") says when a
tree or broadcast would pay off.

Failures: every group and store operation has ``weights.timeout_s``. A failed or timed-out transfer
is counted (``diffrl_weights_transfer_failures_total{side,reason}``); the sampler side drops its
pair and keeps its current weights (it rejoins at its next poll), the learner side ends that pair's
server thread. Raw buffers travel in the machine's byte order (learner and samplers on the same
architecture).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
from google.protobuf.message import DecodeError

from diffrl.proto import weights_pb2
from diffrl.proto.codec import DTYPES

log = logging.getLogger(__name__)

_KINDS = {"full": weights_pb2.WeightUpdate.FULL, "lora": weights_pb2.WeightUpdate.LORA}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}
_TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
_DTYPE_NAMES = {dt: name for name, dt in _TORCH_DTYPES.items()}

TAG_META, TAG_HEADER, TAG_DATA = 1, 2, 3
"""Tags of the three kinds of message of a transfer."""
POLL_S = 0.02
"""How often the acceptor and the server threads look at the store for joins and requests."""

Address = tuple[str, int]
_ENV_LOCK = threading.Lock()
_NCCL_PAIR_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}


# --------------------------------------------------------------------------------------------- pack


class Snapshot:
    """One published version: header bytes (a data-less ``WeightUpdate``) and one flat buffer per dtype,
    in the order the dtypes first appear in the header."""

    def __init__(self, version: int, header: bytes, buffers: list[torch.Tensor]):
        self.version = version
        self.header = header
        self.buffers = buffers
        self.nbytes = sum(b.numel() * b.element_size() for b in buffers)
        self._cpu: list[torch.Tensor] | None = None
        self._lock = threading.Lock()

    def buffers_on(self, device: torch.device) -> list[torch.Tensor]:
        """The buffers on ``device``'s type (a CPU copy is made once for gloo pairs of a CUDA learner)."""
        if device.type != "cpu" or all(b.device.type == "cpu" for b in self.buffers):
            return self.buffers
        with self._lock:
            if self._cpu is None:
                self._cpu = [b.to("cpu") for b in self.buffers]
            return self._cpu


def pack(version: int, tensors: dict[str, torch.Tensor], kind: str = "full",
         device: torch.device | str = "cpu") -> Snapshot:
    """Copy ``tensors`` into one flat buffer per dtype on ``device`` plus a data-less header."""
    if kind not in _KINDS:
        raise ValueError(f"weight update kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if int(version) < 0:
        raise ValueError(f"weight update version must be >= 0, got {version}")
    msg = weights_pb2.WeightUpdate(version=int(version), kind=_KINDS[kind], created_at=time.time())
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: unsupported tensor dtype {t.dtype}; supported: {', '.join(DTYPES)}")
        item = msg.tensors.add()
        item.name = name
        item.tensor.dtype = _DTYPE_NAMES[t.dtype]
        item.tensor.shape.extend(t.shape)
        by_dtype.setdefault(t.dtype, []).append(t)
    buffers = []
    for dtype, group in by_dtype.items():
        flat = torch.empty(sum(t.numel() for t in group), dtype=dtype, device=device)
        offset = 0
        for t in group:
            n = t.numel()
            flat[offset:offset + n].view(t.shape).copy_(t.detach())
            offset += n
        buffers.append(flat)
    return Snapshot(int(version), msg.SerializeToString(deterministic=True), buffers)


def parse_header(header: bytes) -> tuple[int, str, list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """(version, kind, [(name, dtype, shape)]) of a header; ValueError if malformed."""
    msg = weights_pb2.WeightUpdate()
    try:
        msg.ParseFromString(header)
    except (DecodeError, RuntimeError, ValueError) as e:  # upb may raise either on garbage
        raise ValueError(f"weight header: not a valid WeightUpdate ({e})") from None
    if msg.kind not in _KIND_NAMES:
        raise ValueError(f"weight header: unknown kind {msg.kind}")
    out, seen = [], set()
    for item in msg.tensors:
        if not item.name or item.name in seen:
            raise ValueError(f"weight header: empty or repeated tensor name {item.name!r}")
        seen.add(item.name)
        if item.tensor.dtype not in _TORCH_DTYPES:
            raise ValueError(f"weight header: {item.name}: unknown dtype {item.tensor.dtype[:40]!r}")
        shape = tuple(int(d) for d in item.tensor.shape)
        if any(d < 0 for d in shape) or item.tensor.data:
            raise ValueError(f"weight header: {item.name}: bad shape {list(shape)} or inline data")
        out.append((item.name, _TORCH_DTYPES[item.tensor.dtype], shape))
    return int(msg.version), _KIND_NAMES[msg.kind], out


def buffer_sizes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[tuple[torch.dtype, int]]:
    """(dtype, elements) of each flat buffer, in the order ``pack`` made them."""
    sizes: dict[torch.dtype, int] = {}
    for _, dtype, shape in entries:
        sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    return list(sizes.items())


def unpack(entries, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of the flat buffers as the named tensors."""
    flat = {b.dtype: b for b in buffers}
    offsets = dict.fromkeys(flat, 0)
    out = {}
    for name, dtype, shape in entries:
        n = math.prod(shape)
        out[name] = flat[dtype][offsets[dtype]:offsets[dtype] + n].view(shape)
        offsets[dtype] += n
    return out


def _wire(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as uint8 (every backend can move those)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(-1).view(torch.uint8)


# --------------------------------------------------------------------------------------------- groups


def failure_reason(err: BaseException) -> str:
    """``timeout`` or ``error``, the label of a counted failure."""
    text = f"{type(err).__name__} {err}".lower()
    return "timeout" if "timeout" in text or "timed out" in text else "error"


def make_pair_group(store, rank: int, backend: str, timeout_s: float):
    """A two-rank process group (rank 0: learner, rank 1: sampler) on ``store``, outside the default group."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if backend == "nccl":
        if not dist.is_nccl_available() or not torch.cuda.is_available():
            raise RuntimeError("weights.backend=nccl needs CUDA and a torch built with NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        # A pair's failure must not take its process down: blocking waits that raise at the timeout, and no
        # watchdog teardown. ProcessGroupNCCL reads both settings when it is built, so they apply to this
        # pair only (DeepSpeed's groups were built before, with theirs).
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in _NCCL_PAIR_ENV}
            os.environ.update(_NCCL_PAIR_ENV)
            try:
                return dist.ProcessGroupNCCL(store, rank, 2, opts)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    raise ValueError(f"unknown process-group backend {backend!r}")


def close_group(pg) -> None:
    """Tear a pair down without waiting for its peer (NCCL communicators are aborted)."""
    abort = getattr(pg, "abort", None)
    if abort is not None:
        try:
            abort()
        except Exception as err:  # noqa: BLE001 - a broken pair may refuse even that; it is dropped anyway
            log.debug("weights: abort of a pair: %s", err)


def _store(host: str, port: int, timeout_s: float, master: bool = False):
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=master, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def pair_backend(setting: str, learner_cuda: bool, sampler_cuda: bool) -> str:
    """The backend of one pair: ``auto`` is nccl when both ends have CUDA (and torch has NCCL), else gloo."""
    if setting != "auto":
        return setting
    import torch.distributed as dist

    return "nccl" if learner_cuda and sampler_cuda and dist.is_nccl_available() else "gloo"


# --------------------------------------------------------------------------------------------- publisher


class TorchDistPublisher:
    """Learner rank 0's end: hosts the store, packs each version, serves samplers from threads.

    ``on_address(host, port)`` is told where samplers find the store (the Ray registry actor).
    """

    def __init__(self, timeout_s: float = 60.0, port: int = 0, backend: str = "auto", host: str = "127.0.0.1",
                 device: torch.device | str = "cpu", on_address: Callable[[str, int], None] | None = None,
                 metrics=None):
        from diffrl.proto.weight_metrics import WeightMetrics

        self.timeout_s, self.backend, self.host = float(timeout_s), backend, host
        self.device = torch.device(device)
        self.metrics = metrics or WeightMetrics.for_registry()
        self._store = _store(host, port, self.timeout_s, master=True)
        self.port = int(self._store.port)
        self._lock = threading.Lock()
        self._latest: Snapshot | None = None
        self._closed = threading.Event()
        self._servers: dict[str, tuple[int, threading.Event, threading.Thread]] = {}
        self.transfers = 0
        self.failures = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="weights-acceptor", daemon=True)
        self._acceptor.start()
        if on_address is not None:
            on_address(self.host, self.port)

    @property
    def address(self) -> Address:
        return self.host, self.port

    def publish(self, version: int, tensors: dict[str, torch.Tensor], kind: str = "full") -> None:
        """Snapshot ``tensors`` as ``version`` (ignored unless newer than the latest) and announce it."""
        start = time.perf_counter()
        with self._lock:
            if self._latest is not None and version <= self._latest.version:
                return
        snap = pack(version, tensors, kind, self.device)
        with self._lock:
            self._latest = snap
        self._store.set("version", str(snap.version))
        self.metrics.publish_seconds.labels("torch_dist").observe(time.perf_counter() - start)

    def latest_version(self) -> int:
        with self._lock:
            return -1 if self._latest is None else self._latest.version

    def close(self) -> None:
        """Stop the threads and the store (samplers' next fetches fail, counted, until a new one is found)."""
        self._closed.set()
        self._acceptor.join(timeout=5)
        for _, stop, thread in list(self._servers.values()):
            stop.set()
            thread.join(timeout=1)
        self._store = None

    # ---- threads
    def _accept_loop(self) -> None:
        store = _store(self.host, self.port, self.timeout_s)
        seen, pending = 0, {}
        while not self._closed.wait(POLL_S):
            try:
                joins = int(store.add("joins", 0))
                for ticket in range(seen + 1, joins + 1):
                    pending[ticket] = time.monotonic()
                seen = max(seen, joins)
                for ticket, since in list(pending.items()):
                    key = f"join/{ticket}"
                    if not store.check([key]):  # the sampler took a ticket and has not said who it is yet
                        if time.monotonic() - since > self.timeout_s:
                            del pending[ticket]
                        continue
                    del pending[ticket]
                    sampler_id, sampler_device = store.get(key).decode().split("\n")
                    backend = pair_backend(self.backend, self.device.type == "cuda", sampler_device == "cuda")
                    store.set(f"pair/{ticket}/backend", backend)
                    self._start_server(ticket, sampler_id, backend)
            except Exception as e:  # noqa: BLE001 - the acceptor must outlive any one join; logged
                if not self._closed.is_set():
                    log.warning("weights: acceptor: %s: %s", type(e).__name__, e)

    def _start_server(self, ticket: int, sampler_id: str, backend: str) -> None:
        old = self._servers.get(sampler_id)
        if old is not None:  # the sampler restarted or dropped its pair: its old pair is over
            old[1].set()
        stop = threading.Event()
        thread = threading.Thread(target=self._serve, args=(ticket, sampler_id, backend, stop),
                                  name=f"weights-{sampler_id}", daemon=True)
        self._servers[sampler_id] = (ticket, stop, thread)
        thread.start()

    def _serve(self, ticket: int, sampler_id: str, backend: str, stop: threading.Event) -> None:
        import torch.distributed as dist

        pg = None
        timeout = timedelta(seconds=self.timeout_s)
        try:
            store = _store(self.host, self.port, self.timeout_s)
            pg = make_pair_group(dist.PrefixStore(f"pair/{ticket}/pg/", store), 0, backend, self.timeout_s)
            device = self.device if backend == "nccl" else torch.device("cpu")
            seq = 0
            while not stop.is_set() and not self._closed.is_set():
                key = f"req/{ticket}/{seq + 1}"
                if not store.check([key]):
                    stop.wait(POLL_S)
                    continue
                seq += 1
                store.delete_key(key)
                with self._lock:
                    snap = self._latest
                start = time.perf_counter()
                if snap is None:
                    meta = torch.tensor([0, 0], dtype=torch.int64, device=device)
                    pg.send([meta], 1, TAG_META).wait(timeout)
                    continue
                buffers = snap.buffers_on(device)
                header = torch.frombuffer(bytearray(snap.header), dtype=torch.uint8).to(device)
                meta = torch.tensor([len(snap.header), snap.nbytes], dtype=torch.int64, device=device)
                pg.send([meta], 1, TAG_META).wait(timeout)
                pg.send([header], 1, TAG_HEADER).wait(timeout)
                for b in buffers:
                    if b.numel():
                        pg.send([_wire(b)], 1, TAG_DATA).wait(timeout)
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                self.transfers += 1
                self.metrics.update_seconds.labels("torch_dist").observe(time.perf_counter() - start)
                self.metrics.sent_bytes.labels("torch_dist").inc(snap.nbytes + len(snap.header))
        except Exception as e:  # noqa: BLE001 - any failure of a pair only ends that pair; counted
            if not self._closed.is_set():
                self.failures += 1
                reason = failure_reason(e)
                self.metrics.failures.labels("torch_dist", "learner", reason).inc()
                log.warning("weights: transfer to %s (ticket %d) failed (%s): %s: %s", sampler_id, ticket, reason,
                            type(e).__name__, e)
        finally:
            if pg is not None:
                close_group(pg)


# --------------------------------------------------------------------------------------------- source


class TorchDistSource:
    """A sampler's end: ``resolve()`` gives the store's (host, port), or None while no learner has one."""

    def __init__(self, sampler_id: str, resolve: Callable[[], Address | None], timeout_s: float = 60.0,
                 device: torch.device | str = "cpu", metrics=None):
        from diffrl.proto.weight_metrics import WeightMetrics

        self.sampler_id, self.resolve, self.timeout_s = sampler_id, resolve, float(timeout_s)
        self.device = torch.device(device)
        self.metrics = metrics or WeightMetrics.for_registry()
        self._store = self._pg = None
        self._ticket = self._seq = 0
        self._backend = "gloo"
        self.failures = 0

    def _connect(self) -> bool:
        if self._store is not None:
            return True
        address = self.resolve()
        if address is None:
            return False
        self._store = _store(address[0], int(address[1]), self.timeout_s)
        return True

    def _join(self) -> None:
        import torch.distributed as dist

        store = self._store
        self._ticket = int(store.add("joins", 1))
        store.set(f"join/{self._ticket}", f"{self.sampler_id}\n{self.device.type}")
        self._backend = store.get(f"pair/{self._ticket}/backend").decode()
        self._pg = make_pair_group(dist.PrefixStore(f"pair/{self._ticket}/pg/", store), 1, self._backend,
                                   self.timeout_s)
        self._seq = 0

    def _reset(self) -> None:
        if self._pg is not None:
            close_group(self._pg)
        self._store = self._pg = None

    def _fail(self, err: BaseException, what: str) -> None:
        reason = failure_reason(err)
        self.failures += 1
        self.metrics.failures.labels("torch_dist", "sampler", reason).inc()
        log.warning("weights: %s %s failed (%s): %s: %s", self.sampler_id, what, reason, type(err).__name__, err)
        self._reset()

    def latest_version(self) -> int:
        try:
            if not self._connect() or not self._store.check(["version"]):
                return -1
            return int(self._store.get("version"))
        except Exception as e:  # noqa: BLE001 - store/network errors of any kind; counted, sampler goes on
            self._fail(e, "version check")
            return -1

    def fetch_newer(self, version: int):
        """(version, kind, tensors) of the newest update if newer than ``version``; None if there is none
        or the transfer failed (counted; the next call rejoins)."""
        if self.latest_version() <= version:
            return None
        start = time.perf_counter()
        try:
            if self._pg is None:
                self._join()
            got = self._receive(version)
        except Exception as e:  # noqa: BLE001 - group/store/header errors of any kind; counted, sampler goes on
            self._fail(e, "fetch")
            return None
        if got is not None:
            self.metrics.fetch_seconds.labels("torch_dist").observe(time.perf_counter() - start)
        return got

    def _receive(self, version: int):
        timeout = timedelta(seconds=self.timeout_s)
        device = self.device if self._backend == "nccl" else torch.device("cpu")
        self._seq += 1
        self._store.set(f"req/{self._ticket}/{self._seq}", str(version))
        meta = torch.zeros(2, dtype=torch.int64, device=device)
        self._pg.recv([meta], 0, TAG_META).wait(timeout)
        header_len, nbytes = (int(x) for x in meta.tolist())
        if header_len == 0:
            return None
        header = torch.empty(header_len, dtype=torch.uint8, device=device)
        self._pg.recv([header], 0, TAG_HEADER).wait(timeout)
        new_version, kind, entries = parse_header(bytes(header.cpu().numpy()))
        sizes = buffer_sizes(entries)
        expected = sum(n * torch.empty(0, dtype=dt).element_size() for dt, n in sizes)
        if expected != nbytes:
            raise ValueError(f"weight header describes {expected} bytes, the sender announced {nbytes}")
        buffers = [torch.empty(n, dtype=dt, device=device) for dt, n in sizes]
        for b in buffers:
            if b.numel():
                self._pg.recv([_wire(b)], 0, TAG_DATA).wait(timeout)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        self.metrics.received_bytes.labels("torch_dist").inc(nbytes + header_len)
        if new_version <= version:
            return None
        return new_version, kind, unpack(entries, buffers)

    def close(self) -> None:
        self._reset()
