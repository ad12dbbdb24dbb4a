"""Versioned p_samp weights from the learner to the samplers.

The learner publishes a :class:`WeightUpdate` (proto/weights.proto) after every optimizer step;
samplers poll between groups and load only newer versions. Payloads are the serialized protobuf
bytes (no pickle). Two channels implement the same interface:

- :class:`LocalWeightChannel`: in-process (tests, single-process runs).
- :class:`RayWeightChannel`: a small named Ray actor holds the latest version and an ObjectRef to
  its bytes in the Ray object store; samplers fetch the bytes straight from the store.

At 64 GPUs a channel that broadcasts over NCCL from learner rank 0 to the samplers replaces this
(same ``publish``/``fetch_newer`` interface); see docs/operations.md.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

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
        ref = self._ray.put(encode_update(version, tensors, kind))
        self._ray.get(self._actor.put.remote(version, [ref]))

    def latest_version(self) -> int:
        return int(self._ray.get(self._actor.latest_version.remote()))

    def fetch_newer(self, version: int):
        found = self._ray.get(self._actor.get_newer.remote(version))
        if found is None:
            return None
        _, refs = found
        return decode_update(self._ray.get(refs[0]))
