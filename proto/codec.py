"""Tensor <-> bytes codec for the wire messages in ``proto/*.proto`` (no pickle anywhere).

A ``diffrl.v1.Tensor`` holds raw little-endian bytes in C order plus the exact ``shape`` and the
torch dtype name without its prefix (``float32``, ``bfloat16``, ...). Everything decoded here came
from another process, so it is checked before it is used: an unknown dtype, a negative or absurd
shape, a byte length that differs from ``prod(shape) * itemsize``, or a bool byte other than 0/1 is
a :class:`ValueError` that says what was wrong, never a crash or a silently reinterpreted buffer.

Besides the tensor codec, this module (de)serializes the two messages that travel as bytes:
``Group`` (the experience bus, ``proto/bus.py``) and ``WeightUpdate`` (versioned sampler weights).
Serialization is deterministic (map fields sorted), so equal messages give equal bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from google.protobuf.message import DecodeError

from diffrl.proto import experience_pb2, tensor_pb2, weights_pb2

__all__ = [
    "DTYPES",
    "MAX_DIM",
    "MAX_NDIM",
    "array_from_proto",
    "array_to_proto",
    "check_group",
    "check_tensor_proto",
    "group_from_bytes",
    "group_to_bytes",
    "named_tensors_from_proto",
    "named_tensors_to_proto",
    "tensor_from_proto",
    "tensor_to_proto",
    "weight_update_from_bytes",
    "weight_update_from_proto",
    "weight_update_to_bytes",
    "weight_update_to_proto",
]

# Wire dtype name -> (torch dtype, little-endian numpy dtype used for the raw bytes).
# bfloat16 has no numpy dtype: its bytes are carried as little-endian int16 bit patterns.
_TABLE: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float64": (torch.float64, np.dtype("<f8")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "int8": (torch.int8, np.dtype("i1")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int64": (torch.int64, np.dtype("<i8")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "bool": (torch.bool, np.dtype("u1")),
}
DTYPES: tuple[str, ...] = tuple(_TABLE)
"""The dtype names this codec accepts on the wire."""

_TORCH_TO_NAME = {tdt: name for name, (tdt, _) in _TABLE.items()}
# numpy dtype (native-order kind+size) -> wire name; bfloat16 has no numpy counterpart.
_NUMPY_TO_NAME = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.float16): "float16",
    np.dtype(np.int8): "int8",
    np.dtype(np.int16): "int16",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.bool_): "bool",
}

MAX_NDIM = 32
"""Tensors with more dimensions than this are refused (torch and numpy have limits of their own)."""
MAX_DIM = 2**40
"""Larger single dimensions are refused (matters only for empty tensors, whose data is empty)."""


# --------------------------------------------------------------------------------------------- encode


def _le_bytes(arr: np.ndarray, wire: np.dtype) -> bytes:
    """C-order little-endian bytes of ``arr`` reinterpreted/converted to ``wire`` (same kind and size)."""
    if arr.dtype != wire:  # only a byte-order difference is possible here
        arr = arr.astype(wire)
    return np.ascontiguousarray(arr).tobytes(order="C")


def tensor_to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a torch tensor (any device, any strides, 0-d and empty included) exactly."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor_to_proto expects a torch.Tensor, got {type(t).__name__}")
    name = _TORCH_TO_NAME.get(t.dtype)
    if name is None:
        raise ValueError(f"unsupported tensor dtype {t.dtype}; supported: {', '.join(DTYPES)}")
    _, wire = _TABLE[name]
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.layout != torch.strided:
        raise ValueError(f"only dense (strided) tensors can be encoded, got layout {t.layout}")
    shape = list(t.shape)
    if t.numel() == 0:  # (views of empty tensors may have zero strides, which .view(dtype) refuses)
        return tensor_pb2.Tensor(data=b"", shape=shape, dtype=name)
    flat = t.contiguous().reshape(-1)
    if name == "bfloat16":
        arr = flat.view(torch.int16).numpy()
    elif name == "bool":
        arr = flat.to(torch.uint8).numpy()
    else:
        arr = flat.numpy()
    return tensor_pb2.Tensor(data=_le_bytes(arr, wire), shape=shape, dtype=name)


def array_to_proto(a: np.ndarray, dtype: str | None = None) -> tensor_pb2.Tensor:
    """Encode a numpy array exactly (any strides and byte order).

    numpy has no bfloat16: pass ``dtype="bfloat16"`` with an int16/uint16 array of bf16 bit patterns
    to send one.
    """
    a = np.asarray(a)
    if dtype == "bfloat16":
        if a.dtype.kind not in "iu" or a.dtype.itemsize != 2:
            raise ValueError(f"bfloat16 from numpy needs int16/uint16 bit patterns, got {a.dtype}")
        bits = a.astype(a.dtype.newbyteorder("<")).view("<i2")  # reinterpret, never convert values
        return tensor_pb2.Tensor(data=_le_bytes(bits, np.dtype("<i2")), shape=list(a.shape), dtype="bfloat16")
    name = _NUMPY_TO_NAME.get(a.dtype.newbyteorder("="))
    if name is None:
        raise ValueError(f"unsupported array dtype {a.dtype}; supported: {', '.join(DTYPES)}")
    if dtype is not None and dtype != name:
        raise ValueError(f"array dtype {a.dtype} does not match requested wire dtype {dtype!r}")
    _, wire = _TABLE[name]
    arr = a.astype(np.uint8) if name == "bool" else a
    return tensor_pb2.Tensor(data=_le_bytes(arr, wire), shape=list(a.shape), dtype=name)


# --------------------------------------------------------------------------------------------- decode


def check_tensor_proto(msg: tensor_pb2.Tensor, what: str = "tensor") -> tuple[str, tuple[int, ...]]:
    """Validate a wire tensor without building it; returns ``(dtype name, shape)``.

    Raises ValueError naming ``what`` if the dtype is unknown, the shape is invalid, or the byte
    length does not equal ``prod(shape) * itemsize``.
    """
    if not isinstance(msg, tensor_pb2.Tensor):
        raise TypeError(f"{what}: expected a diffrl.v1.Tensor message, got {type(msg).__name__}")
    name = msg.dtype
    if name not in _TABLE:
        shown = repr(name[:40]) if name else "empty"
        raise ValueError(f"{what}: unknown dtype {shown}; supported: {', '.join(DTYPES)}")
    shape = tuple(int(d) for d in msg.shape)
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{what}: {len(shape)} dimensions, more than the {MAX_NDIM} allowed")
    if any(d < 0 for d in shape):
        raise ValueError(f"{what}: negative dimension in shape {list(shape)}")
    itemsize = _TABLE[name][1].itemsize
    expected = math.prod(shape) * itemsize  # exact Python int, no overflow
    if any(d > MAX_DIM for d in shape):
        raise ValueError(f"{what}: dimension larger than {MAX_DIM} in shape {list(shape)}")
    if len(msg.data) != expected:
        raise ValueError(
            f"{what}: {len(msg.data)} data bytes, but shape {list(shape)} of {name} needs {expected}"
        )
    return name, shape


def _decode_array(msg: tensor_pb2.Tensor, what: str) -> tuple[str, tuple[int, ...], np.ndarray]:
    """Validated, writable, native-order numpy array of the wire representation (bf16 as int16)."""
    name, shape = check_tensor_proto(msg, what)
    wire = _TABLE[name][1]
    arr = np.frombuffer(msg.data, dtype=wire)
    if name == "bool" and arr.size and int(arr.max()) > 1:
        raise ValueError(f"{what}: bool data holds bytes other than 0 and 1")
    arr = arr.astype(wire.newbyteorder("="), copy=True)  # own, writable, native order
    return name, shape, arr.reshape(shape)


def tensor_from_proto(msg: tensor_pb2.Tensor, what: str = "tensor") -> torch.Tensor:
    """Decode a wire tensor into a new, contiguous CPU torch tensor with the exact dtype and shape."""
    name, shape, arr = _decode_array(msg, what)
    t = torch.from_numpy(arr)
    if name == "bfloat16":
        t = t.view(torch.bfloat16)
    elif name == "bool":
        t = t.view(torch.bool)
    return t.reshape(shape)


def array_from_proto(msg: tensor_pb2.Tensor, what: str = "tensor", bfloat16: str = "error") -> np.ndarray:
    """Decode a wire tensor into a new numpy array with the exact dtype and shape.

    numpy has no bfloat16: ``bfloat16="error"`` (default) refuses one, ``"float32"`` upcasts it
    (exact), ``"bits"`` returns its int16 bit patterns.
    """
    name, shape, arr = _decode_array(msg, what)
    if name == "bool":
        return arr.view(np.bool_)
    if name == "bfloat16":
        if bfloat16 == "bits":
            return arr
        if bfloat16 == "float32":
            return (arr.astype(np.int32) << 16).view(np.float32).reshape(shape)
        raise ValueError(f"{what}: numpy has no bfloat16; use tensor_from_proto or bfloat16='float32'")
    return arr


# ---------------------------------------------------------------------------------------- collections


def named_tensors_to_proto(tensors: Mapping[str, torch.Tensor]) -> list[tensor_pb2.NamedTensor]:
    """Encode ``{name: tensor}`` (e.g. a state dict) in its iteration order."""
    out = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        out.append(tensor_pb2.NamedTensor(name=name, tensor=tensor_to_proto(t)))
    return out


def named_tensors_from_proto(items: Iterable[tensor_pb2.NamedTensor]) -> dict[str, torch.Tensor]:
    """Decode named tensors into an ordered dict; empty or duplicate names are refused."""
    out: dict[str, torch.Tensor] = {}
    for item in items:
        if not item.name:
            raise ValueError("named tensor with an empty name")
        if item.name in out:
            raise ValueError(f"duplicate tensor name {item.name!r}")
        if not item.HasField("tensor"):
            raise ValueError(f"named tensor {item.name!r} has no tensor")
        out[item.name] = tensor_from_proto(item.tensor, what=f"tensor {item.name!r}")
    return out


_KINDS = {"full": weights_pb2.WeightUpdate.FULL, "lora": weights_pb2.WeightUpdate.LORA}


def weight_update_to_proto(
    version: int, tensors: Mapping[str, torch.Tensor], kind: str = "full", created_at: float | None = None
) -> weights_pb2.WeightUpdate:
    """Build a ``WeightUpdate``; ``kind`` is ``"full"`` or ``"lora"``."""
    if kind not in _KINDS:
        raise ValueError(f"weight update kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if int(version) < 0:
        raise ValueError(f"weight update version must be >= 0, got {version}")
    return weights_pb2.WeightUpdate(
        version=int(version),
        kind=_KINDS[kind],
        tensors=named_tensors_to_proto(tensors),
        created_at=time.time() if created_at is None else float(created_at),
    )


def weight_update_from_proto(msg: weights_pb2.WeightUpdate) -> tuple[int, str, dict[str, torch.Tensor]]:
    """``(version, kind, {name: tensor})`` of a validated ``WeightUpdate``."""
    kinds = {v: k for k, v in _KINDS.items()}
    if msg.kind not in kinds:
        raise ValueError(f"unknown weight update kind {msg.kind}")
    return int(msg.version), kinds[msg.kind], named_tensors_from_proto(msg.tensors)


# --------------------------------------------------------------------------------------------- bytes


def _parse(cls, data: bytes, what: str):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(data).__name__}")
    msg = cls()
    try:
        msg.ParseFromString(bytes(data))
    except (DecodeError, RuntimeError, ValueError) as e:  # upb may raise either on garbage
        raise ValueError(f"{what}: not a valid {cls.DESCRIPTOR.full_name} message ({e})") from None
    return msg


def check_group(group: experience_pb2.Group) -> experience_pb2.Group:
    """Validate a decoded ``Group``: a group id and decodable tensors in every sample."""
    if not group.group_id:
        raise ValueError("group has no group_id")
    for i, s in enumerate(group.samples):
        if s.HasField("latent"):
            check_tensor_proto(s.latent, what=f"group {group.group_id!r} sample {i} latent")
        if s.HasField("trajectory"):
            for name in ("states", "sigmas", "log_probs", "x0_preds"):
                t = getattr(s.trajectory, name)
                if t.ByteSize():
                    check_tensor_proto(t, what=f"group {group.group_id!r} sample {i} trajectory.{name}")
    return group


def group_to_bytes(group: experience_pb2.Group) -> bytes:
    """Deterministic wire bytes of a ``Group``."""
    return group.SerializeToString(deterministic=True)


def group_from_bytes(data: bytes) -> experience_pb2.Group:
    """Parse and validate a ``Group`` (ValueError on anything malformed)."""
    return check_group(_parse(experience_pb2.Group, data, "experience group"))


def weight_update_to_bytes(update: weights_pb2.WeightUpdate) -> bytes:
    """Deterministic wire bytes of a ``WeightUpdate``."""
    return update.SerializeToString(deterministic=True)


def weight_update_from_bytes(data: bytes) -> weights_pb2.WeightUpdate:
    """Parse and validate a ``WeightUpdate`` (every tensor checked; ValueError if malformed)."""
    msg = _parse(weights_pb2.WeightUpdate, data, "weight update")
    seen = set()
    for item in msg.tensors:
        if not item.name or item.name in seen:
            raise ValueError(f"weight update: empty or duplicate tensor name {item.name!r}")
        seen.add(item.name)
        check_tensor_proto(item.tensor, what=f"weight update tensor {item.name!r}")
    return msg
