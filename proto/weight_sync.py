"""Versioned p_samp weights from the learner to the samplers.

The learner publishes a :class:`WeightUpdate` (proto/weights.proto) after every optimizer step;
samplers poll between groups and load only newer versions. Payloads are the serialized protobuf
bytes (no pickle). These channels implement the same interface:

- :class:`LocalWeightChannel`: in-process (tests, single-process runs).
- :class:`RayWeightChannel`: a small named Ray actor holds the latest version and an ObjectRef to
  its bytes in the Ray object store; samplers fetch the bytes straight from the store.
- :class:`diffrl.proto.weight_dist.TorchDistPublisher` / ``TorchDistSource``: over torch.distributed
  (gloo, or NCCL between CUDA processes) in process groups of their own, for weights too large for the
  object store (a full fine-tune); the store's address goes through the same registry actor.

:class:`WeightsConfig` (the recipe's ``weights`` section) picks one; ``open_publisher`` (learner rank 0)
and ``open_source`` (samplers) build it. See docs/operations.md, "Weight sync".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from diffrl.config import require
from diffrl.proto.codec import (
    weight_update_from_bytes,
    weight_update_from_proto,
    weight_update_to_bytes,
    weight_update_to_proto,
)


class WeightPublisher(Protocol):
    def publish(self, version: int, tensors: dict[str, torch.Tensor], kind: str = "full") -> None: ...


class WeightSource(Protocol):
    def latest_version(self) -> int: ...

    def fetch_newer(self, version: int) -> tuple[int, str, dict[str, torch.Tensor]] | None:
        """(version, kind, tensors) of the latest update if it is newer than ``version``, else None."""
        ...


WEIGHT_CHANNELS = ("auto", "object_store", "torch_dist")
WEIGHT_BACKENDS = ("auto", "gloo", "nccl")
MB = 2**20


@dataclass
class WeightsConfig:
    """How p_samp travels from learner rank 0 to the samplers (docs/operations.md, "Weight sync")."""

    channel: str = "auto"
    """object_store: a serialized WeightUpdate in the Ray object store, fetched by each sampler;
    torch_dist: flat per-dtype buffers over torch.distributed pairs (learner rank 0 to each sampler);
    auto: decided at the first publish, torch_dist when p_samp's tensors exceed auto_threshold_mb."""
    auto_threshold_mb: float = 100.0
    """Size of p_samp (MiB) above which channel=auto takes torch_dist. torch_dist is faster at every
    size measured, but below ~100 MiB (LoRA adapters, small models) the object store costs well under
    a second per version and needs no extra ports, threads or snapshot memory; above it the gap grows
    to seconds per version (about 10 ms/MiB against 2.6 ms/MiB on 2 CPU cores; docs/benchmarks.md,
    "Weight sync"), and a WeightUpdate message cannot exceed 2 GiB at all."""
    backend: str = "auto"
    """torch_dist's process-group backend: gloo, nccl, or auto (per sampler: nccl when the learner and
    that sampler both run on CUDA, else gloo)."""
    timeout_s: float = 60.0
    """torch_dist: limit of every store and process-group operation (join, one buffer's send or receive);
    a transfer past it is counted as failed (diffrl_weights_transfer_failures_total) and the sampler keeps
    its weights until its next poll."""
    port: int = 0
    """torch_dist: TCP port of the store learner rank 0 hosts (0 = a free port); gloo/NCCL pick their own
    ports for the pairs' connections."""

    def validate(self) -> None:
        require(self.channel in WEIGHT_CHANNELS, "channel", f"one of {WEIGHT_CHANNELS}", self.channel)
        require(self.auto_threshold_mb >= 0, "auto_threshold_mb", "MiB >= 0", self.auto_threshold_mb)
        require(self.backend in WEIGHT_BACKENDS, "backend", f"one of {WEIGHT_BACKENDS}", self.backend)
        require(self.timeout_s > 0, "timeout_s", "seconds > 0", self.timeout_s)
        require(0 <= self.port <= 65535, "port", "a TCP port 0..65535 (0 = a free port)", self.port)

    def choose(self, nbytes: int) -> str:
        """The channel for an update of ``nbytes`` bytes."""
        if self.channel != "auto":
            return self.channel
        return "torch_dist" if nbytes > self.auto_threshold_mb * MB else "object_store"


def update_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def encode_update(version: int, tensors: dict[str, torch.Tensor], kind: str = "full") -> bytes:
    cpu = {name: t.detach().to("cpu") for name, t in tensors.items()}
    return weight_update_to_bytes(weight_update_to_proto(version, cpu, kind=kind))


def decode_update(payload: bytes) -> tuple[int, str, dict[str, torch.Tensor]]:
    """Parse and validate an update (ValueError if malformed) -> (version, kind, tensors)."""
    return weight_update_from_proto(weight_update_from_bytes(payload))


class LocalWeightChannel:
    """Publisher and source in one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._payload: bytes | None = None

    def publish(self, version: int, tensors: dict[str, torch.Tensor], kind: str = "full") -> None:
        payload = encode_update(version, tensors, kind)
        with self._lock:
            if version > self._version:
                self._version, self._payload = version, payload

    def latest_version(self) -> int:
        return self._version

    def fetch_newer(self, version: int):
        with self._lock:
            payload = self._payload if self._version > version else None
        return decode_update(payload) if payload is not None else None


class _Registry:
    """Body of the Ray actor: the latest version and a reference to its bytes."""

    def __init__(self) -> None:
        self.version = -1
        self.ref = None
        self.address = None  # (host, port) of the torch_dist channel's store, once learner rank 0 opened it

    def set_address(self, host: str, port: int) -> None:
        self.address = (str(host), int(port))

    def get_address(self):
        return self.address

    def route(self) -> str:
        """The channel learner rank 0 publishes on ('' before its first publish)."""
        return "torch_dist" if self.address is not None else ("object_store" if self.ref is not None else "")

    def put(self, version: int, refs: list) -> bool:
        if version <= self.version:
            return False
        self.version, self.ref = version, refs[0]
        return True

    def latest_version(self) -> int:
        return self.version

    def get_newer(self, version: int):
        # The ref is wrapped in a list so Ray hands the reference over instead of resolving it.
        return (self.version, [self.ref]) if self.version > version else None


class RayWeightChannel:
    """Publisher and source over the Ray object store; every process uses the same ``name``."""

    def __init__(self, name: str = "diffrl-weights", namespace: str | None = None) -> None:
        import ray

        self._ray = ray
        actor_cls = ray.remote(num_cpus=0, max_restarts=-1)(_Registry)
        self._actor = actor_cls.options(name=name, namespace=namespace, get_if_exists=True,
                                        lifetime=None).remote()

    def publish(self, version: int, tensors: dict[str, torch.Tensor], kind: str = "full") -> None:
        from diffrl.proto.weight_metrics import WeightMetrics

        start = time.perf_counter()
        payload = encode_update(version, tensors, kind)
        ref = self._ray.put(payload)
        self._ray.get(self._actor.put.remote(version, [ref]))
        metrics = WeightMetrics.for_registry()
        metrics.publish_seconds.labels("object_store").observe(time.perf_counter() - start)
        metrics.sent_bytes.labels("object_store").inc(len(payload))

    def latest_version(self) -> int:
        return int(self._ray.get(self._actor.latest_version.remote()))

    def fetch_newer(self, version: int):
        from diffrl.proto.weight_metrics import WeightMetrics

        start = time.perf_counter()
        found = self._ray.get(self._actor.get_newer.remote(version))
        if found is None:
            return None
        _, refs = found
        payload = self._ray.get(refs[0])
        update = decode_update(payload)
        metrics = WeightMetrics.for_registry()
        metrics.fetch_seconds.labels("object_store").observe(time.perf_counter() - start)
        metrics.received_bytes.labels("object_store").inc(len(payload))
        return update

    # ---- the registry's other duties (torch_dist's rendezvous, auto's route)
    def set_address(self, host: str, port: int) -> None:
        self._ray.get(self._actor.set_address.remote(host, port))

    def address(self):
        found = self._ray.get(self._actor.get_address.remote())
        return None if found is None else (str(found[0]), int(found[1]))

    def route(self) -> str:
        return str(self._ray.get(self._actor.route.remote()))


class AutoPublisher:
    """Learner rank 0's publisher for ``weights.channel=auto`` (or a fixed channel): opens the channel
    at the first publish, by the size of that update (p_samp's size does not change during a run)."""

    def __init__(self, cfg: WeightsConfig, name: str, host: str = "127.0.0.1", device="cpu",
                 namespace: str | None = None):
        self.cfg, self.name, self.host, self.device, self.namespace = cfg, name, host, device, namespace
        self.registry = RayWeightChannel(name, namespace)
        self.chosen: WeightPublisher | None = None
        self.channel = ""

    def publish(self, version: int, tensors: dict[str, torch.Tensor], kind: str = "full") -> None:
        if self.chosen is None:
            self.channel = self.cfg.choose(update_nbytes(tensors))
            if self.channel == "torch_dist":
                from diffrl.proto.weight_dist import TorchDistPublisher

                self.chosen = TorchDistPublisher(self.cfg.timeout_s, self.cfg.port, self.cfg.backend, self.host,
                                                 self.device, on_address=self.registry.set_address)
            else:
                self.chosen = self.registry
        self.chosen.publish(version, tensors, kind)

    def close(self) -> None:
        close = getattr(self.chosen, "close", None)
        if close is not None and self.chosen is not self.registry:
            close()


class RegistrySource:
    """A sampler's source: follows the channel learner rank 0 chose (the registry's route), or the
    configured one; a torch_dist store's address comes from the registry."""

    def __init__(self, cfg: WeightsConfig, name: str, sampler_id: str, device="cpu", namespace: str | None = None):
        self.cfg, self.sampler_id, self.device = cfg, sampler_id, device
        self.registry = RayWeightChannel(name, namespace)
        self.channel = "" if cfg.channel == "auto" else cfg.channel
        self._dist = None

    def _source(self) -> WeightSource | None:
        if not self.channel:
            self.channel = self.registry.route()  # '' until learner rank 0's first publish
        if self.channel == "object_store":
            return self.registry
        if self.channel == "torch_dist":
            if self._dist is None:
                from diffrl.proto.weight_dist import TorchDistSource

                self._dist = TorchDistSource(self.sampler_id, self.registry.address, self.cfg.timeout_s,
                                             self.device)
            return self._dist
        return None

    def latest_version(self) -> int:
        source = self._source()
        return -1 if source is None else source.latest_version()

    def fetch_newer(self, version: int):
        source = self._source()
        return None if source is None else source.fetch_newer(version)


def open_publisher(cfg: WeightsConfig, name: str, host: str = "127.0.0.1", device="cpu",
                   namespace: str | None = None) -> AutoPublisher:
    """Learner rank 0's publisher over the registry actor ``name`` (Ray must be initialised)."""
    return AutoPublisher(cfg, name, host, device, namespace)


def open_source(cfg: WeightsConfig, name: str, sampler_id: str, device="cpu",
                namespace: str | None = None) -> RegistrySource:
    """A sampler's source over the registry actor ``name`` (Ray must be initialised)."""
    return RegistrySource(cfg, name, sampler_id, device, namespace)
