"""Small helpers shared across diffrl's packages (the bottom layer, beside ``diffrl.config``): a free
TCP port, the torch device and dtype a config names, per-registry Prometheus metric sets."""

from __future__ import annotations

import os
import socket
import weakref
from typing import ClassVar, Self

import torch
from prometheus_client import REGISTRY, CollectorRegistry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu; 'cuda' -> cuda:LOCAL_RANK."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype: expected auto or one of {sorted(DTYPES)}, got {name!r}") from None


class PerRegistry:
    """Base of a set of metric objects made once per registry: ``for_registry`` returns the set
    already registered there, since registering the same names twice fails."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._by_registry = weakref.WeakKeyDictionary()  # one table per subclass

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> Self:
        registry = REGISTRY if registry is None else registry
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found
