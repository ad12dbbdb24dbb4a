"""The wire contracts: exact tensor codec, Group/WeightUpdate bytes, and freshness of generated code."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_tools import protoc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffrl.proto import experience_pb2, tensor_pb2, weights_pb2
from diffrl.proto.codec import (
    DTYPES,
    MAX_NDIM,
    array_from_proto,
    array_to_proto,
    check_tensor_proto,
    group_from_bytes,
    group_to_bytes,
    named_tensors_from_proto,
    named_tensors_to_proto,
    tensor_from_proto,
    tensor_to_proto,
    weight_update_from_bytes,
    weight_update_from_proto,
    weight_update_to_bytes,
    weight_update_to_proto,
)

REPO = Path(__file__).resolve().parents[1]

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in TORCH_DTYPES.items()}


def raw_bits(t: torch.Tensor) -> bytes:
    """The tensor's element bits in C order, independent of the codec (native = little-endian here)."""
    if t.numel() == 0:
        return b""
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.to(torch.uint8).numpy().tobytes()
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bits(name: str, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    """A tensor holding exactly ``data`` as its element bits."""
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if name == "bool":
        return flat.to(torch.bool).reshape(shape)
    return flat.view(TORCH_DTYPES[name]).reshape(shape).clone()


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert raw_bits(a) == raw_bits(b)


# -------------------------------------------------------------------------------------- tensor codec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_tensors_round_trip_bitwise(data):
    name = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = tuple(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=4), label="shape"))
    n = math.prod(shape)
    if name == "bool":
        bits = bytes(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:  # any bit pattern: NaN payloads, infinities, subnormals, -0.0
        bits = data.draw(st.binary(min_size=n * ITEMSIZE[name], max_size=n * ITEMSIZE[name]))
    t = tensor_from_bits(name, shape, bits)
    msg = tensor_to_proto(t)
    assert msg.dtype == name and tuple(msg.shape) == shape
    assert msg.data == bits  # little-endian C order, exactly the element bits
    back = tensor_from_proto(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert_bitwise_equal(back, t)
    assert back.is_contiguous()
    if name != "bfloat16":
        arr = array_from_proto(msg)
        assert arr.dtype == np.dtype(name) and arr.shape == shape
        assert array_to_proto(arr).SerializeToString() == msg.SerializeToString()


@pytest.mark.parametrize("name", DTYPES)
def test_special_values_every_dtype(name):
    dt = TORCH_DTYPES[name]
    if dt.is_floating_point:
        t = torch.tensor([0.0, -0.0, 1.0, -2.5, math.inf, -math.inf, math.nan]).to(dt)
        # NaNs with non-default payloads and sign, set through the integer view
        nan_bits = {"float16": [0x7E01, -0x0201], "bfloat16": [0x7FC1, -0x003F]}.get(name)
        if name == "float32":
            extra = torch.tensor([0x7FC00001, -0x003FFFFF], dtype=torch.int32).view(torch.float32)
        elif name == "float64":
            extra = torch.tensor([0x7FF8000000000001, -0x0007FFFFFFFFFFFF], dtype=torch.int64).view(
                torch.float64
            )
        else:
            extra = torch.tensor(nan_bits, dtype=torch.int16).view(dt)
        t = torch.cat([t, extra])
        assert torch.isnan(extra).all()
    elif dt == torch.bool:
        t = torch.tensor([True, False, True])
    else:
        info = torch.iinfo(dt)
        t = torch.tensor([info.min, -1 if info.min < 0 else 0, 0, 1, info.max], dtype=dt)
    back = tensor_from_proto(tensor_to_proto(t))
    assert_bitwise_equal(back, t)


def test_wire_layout_is_little_endian_c_order():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert tensor_to_proto(t).data == struct.pack("<6f", 0, 1, 2, 3, 4, 5)
    assert tensor_to_proto(t.T).data == struct.pack("<6f", 0, 3, 1, 4, 2, 5)  # logical C order
    assert tensor_to_proto(torch.tensor([1.0], dtype=torch.bfloat16)).data == b"\x80\x3f"
    assert tensor_to_proto(torch.tensor([1.0], dtype=torch.float16)).data == b"\x00\x3c"
    assert tensor_to_proto(torch.tensor([1, -2], dtype=torch.int64)).data == struct.pack("<2q", 1, -2)
    big = np.arange(3, dtype=">i4")
    assert array_to_proto(big).data == struct.pack("<3i", 0, 1, 2)
    assert array_from_proto(array_to_proto(big)).dtype == np.dtype("=i4")


def test_zero_dim_empty_and_non_contiguous():
    base = torch.randn(4, 6, 5)
    cases = {
        "0-d": torch.tensor(3.25),
        "0-d bf16": torch.tensor(-7.5, dtype=torch.bfloat16),
        "0-d bool": torch.tensor(True),
        "empty": torch.empty(0),
        "empty 2d": torch.empty(3, 0, dtype=torch.int16),
        "transposed": base.transpose(0, 2),
        "strided slice": base[::2, 1::3],
        "expanded (stride 0)": torch.tensor([1.0, 2.0]).expand(3, 2),
        "permuted bf16": base.to(torch.bfloat16).permute(2, 0, 1),
        "requires grad": torch.randn(3, requires_grad=True),
    }
    for what, t in cases.items():
        back = tensor_from_proto(tensor_to_proto(t))
        assert_bitwise_equal(back, t.detach())
        assert back.is_contiguous(), what
    # numpy: negative strides, Fortran order, 0-d, empty
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    for arr in (
        a[:, ::-1, ::2],
        np.asfortranarray(a),
        np.array(5, dtype=np.uint8),
        np.zeros((0, 4), np.float16),
    ):
        back = array_from_proto(array_to_proto(arr))
        assert back.dtype == arr.dtype and back.shape == arr.shape
        assert np.array_equal(back, arr)
        assert back.flags.c_contiguous and back.flags.writeable


def test_decoded_tensor_owns_its_memory():
    msg = tensor_to_proto(torch.zeros(4))
    t = tensor_from_proto(msg)
    t += 1  # writable, and does not alias the message bytes
    assert tensor_from_proto(msg).sum() == 0
    a = array_from_proto(msg)
    a[0] = 9
    assert array_from_proto(msg)[0] == 0


def test_numpy_bfloat16_is_explicit():
    t = torch.tensor([1.5, -2.25, math.inf], dtype=torch.bfloat16)
    msg = tensor_to_proto(t)
    with pytest.raises(ValueError, match="bfloat16"):
        array_from_proto(msg)
    assert array_from_proto(msg, bfloat16="float32").tolist() == [1.5, -2.25, math.inf]
    bits = array_from_proto(msg, bfloat16="bits")
    assert bits.dtype == np.int16
    # numpy producers send bf16 as bit patterns
    again = array_to_proto(bits.astype(np.uint16), dtype="bfloat16")
    assert again.SerializeToString() == msg.SerializeToString()
    with pytest.raises(ValueError):
        array_to_proto(np.zeros(2, np.float32), dtype="bfloat16")


def test_unsupported_dtypes_refused():
    for t in (torch.zeros(2, dtype=torch.complex64), torch.zeros(2, dtype=torch.uint16)):
        with pytest.raises(ValueError, match="unsupported tensor dtype"):
            tensor_to_proto(t)
    for a in (np.zeros(2, np.uint32), np.array(["x"]), np.zeros(2, np.complex128)):
        with pytest.raises(ValueError, match="unsupported array dtype"):
            array_to_proto(a)
    with pytest.raises(TypeError):
        tensor_to_proto(np.zeros(2))


@pytest.mark.parametrize(
    "msg, match",
    [
        (tensor_pb2.Tensor(data=b"\0" * 4, shape=[1], dtype="float8"), "unknown dtype"),
        (tensor_pb2.Tensor(data=b"\0" * 4, shape=[1], dtype=""), "unknown dtype empty"),
        (tensor_pb2.Tensor(data=b"\0" * 4, shape=[1], dtype="torch.float32"), "unknown dtype"),
        (tensor_pb2.Tensor(data=b"\0" * 7, shape=[2], dtype="float32"), "7 data bytes.*needs 8"),
        (tensor_pb2.Tensor(data=b"\0" * 9, shape=[2], dtype="float32"), "9 data bytes.*needs 8"),
        (tensor_pb2.Tensor(data=b"", shape=[2, 3], dtype="int8"), "needs 6"),
        (tensor_pb2.Tensor(data=b"\0" * 2, shape=[], dtype="float32"), "needs 4"),
        (tensor_pb2.Tensor(data=b"\0" * 3, shape=[1], dtype="bfloat16"), "needs 2"),
        (tensor_pb2.Tensor(data=b"", shape=[-2, -3], dtype="float32"), "negative dimension"),
        (tensor_pb2.Tensor(data=b"", shape=[0, 2**62], dtype="float32"), "dimension larger"),
        (tensor_pb2.Tensor(data=b"\0", shape=[1] * (MAX_NDIM + 1), dtype="uint8"), "dimensions"),
        (tensor_pb2.Tensor(data=b"\x00\x02", shape=[2], dtype="bool"), "bool data"),
    ],
)
def test_corrupt_tensors_rejected(msg, match):
    with pytest.raises(ValueError, match=match):
        tensor_from_proto(msg)
    with pytest.raises(ValueError, match=match):
        array_from_proto(msg, bfloat16="bits")


# ----------------------------------------------------------------------------------- whole messages


def make_group(k: int = 4, group_id: str = "g-0001") -> experience_pb2.Group:
    g = experience_pb2.Group(
        group_id=group_id,
        prompt="three blue squares",
        prompt_metadata={"count": "3", "colour": "blue", "shape": "square"},
        policy_version=17,
        sampler_id="sampler-3",
        created_at=1_700_000_000.123456,
        masked=False,
    )
    gen = torch.Generator().manual_seed(zlib.crc32(group_id.encode()))
    for i in range(k):
        latent = torch.randn(4, 8, 8, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32)
        s = g.samples.add(seed=2**63 + i, latent=tensor_to_proto(latent))
        s.rewards["detector"] = float(i) / 3
        s.rewards["compress"] = -1.5 * i
        s.trajectory.CopyFrom(experience_pb2.Trajectory(
            states=tensor_to_proto(torch.randn(4, 4, 8, 8, generator=gen).to(torch.float16)),
            sigmas=tensor_to_proto(torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=torch.float64)),
            log_probs=tensor_to_proto(torch.randn(3, generator=gen)),
            x0_preds=tensor_to_proto(torch.randn(3, 4, 8, 8, generator=gen).to(torch.float16)),
            noise_seed=2**63 + i - i % 2, step_seed=2**40 + i, step_kind=experience_pb2.ETA, noise_level=0.5,
            guidance_scale=4.5, pair_id=i // 2))
    return g


def test_group_round_trips_through_bytes_exactly():
    g = make_group(k=6)
    data = group_to_bytes(g)
    back = group_from_bytes(data)
    assert back == g
    assert group_to_bytes(back) == data  # deterministic serialization (maps sorted)
    assert len(back.samples) == 6 and back.samples[0].seed == 2**63
    for s0, s1 in zip(g.samples, back.samples):
        assert_bitwise_equal(tensor_from_proto(s1.latent), tensor_from_proto(s0.latent))
        assert dict(s1.rewards) == dict(s0.rewards)
        for name in ("states", "sigmas", "log_probs", "x0_preds"):
            assert_bitwise_equal(tensor_from_proto(getattr(s1.trajectory, name)),
                                 tensor_from_proto(getattr(s0.trajectory, name)))
        t0, t1 = s0.trajectory, s1.trajectory
        assert (t1.noise_seed, t1.step_seed, t1.step_kind, t1.noise_level, t1.guidance_scale, t1.pair_id) == (
            t0.noise_seed, t0.step_seed, experience_pb2.ETA, 0.5, 4.5, t0.pair_id)
    assert tensor_from_proto(back.samples[3].trajectory.states).dtype == torch.float16  # fp16 storage kept
    # map insertion order does not change the bytes
    g2 = experience_pb2.Group()
    g2.CopyFrom(g)
    g2.prompt_metadata.clear()
    for key in sorted(g.prompt_metadata, reverse=True):
        g2.prompt_metadata[key] = g.prompt_metadata[key]
    assert group_to_bytes(g2) == data


def test_corrupt_groups_rejected():
    good = group_to_bytes(make_group(k=2))
    bad_tensor = make_group(k=2)
    bad_tensor.samples[1].latent.data = bad_tensor.samples[1].latent.data[:-1]
    bad_extra = make_group(k=1)
    bad_extra.samples[0].trajectory.x0_preds.CopyFrom(tensor_pb2.Tensor(data=b"\0", shape=[1], dtype="complex64"))
    cases = {
        "garbage": b"\xff" * 32,
        "truncated": good[: len(good) // 2],
        "bad latent": bad_tensor.SerializeToString(),
        "bad extra": bad_extra.SerializeToString(),
        "no group id": experience_pb2.Group(prompt="x").SerializeToString(),
        "invalid utf-8 in a string": b"\x0a\x02\xff\xfe",
    }
    for what, data in cases.items():
        try:
            group_from_bytes(data)
        except ValueError:
            continue
        pytest.fail(f"{what}: accepted")
    with pytest.raises(TypeError):
        group_from_bytes("not bytes")


def test_weight_update_round_trip():
    state = {
        "transformer.blocks.0.attn.to_q.weight": torch.randn(8, 8).to(torch.bfloat16),
        "transformer.blocks.0.attn.to_q.bias": torch.randn(8),
        "pos_embed": torch.randn(2, 3, 4, dtype=torch.float16).transpose(0, 2),
        "step": torch.tensor(5, dtype=torch.int64),
    }
    msg = weight_update_to_proto(42, state, kind="lora", created_at=123.5)
    data = weight_update_to_bytes(msg)
    back = weight_update_from_bytes(data)
    assert back == msg and weight_update_to_bytes(back) == data
    version, kind, tensors = weight_update_from_proto(back)
    assert (version, kind) == (42, "lora") and list(tensors) == list(state)
    for name, t in state.items():
        assert_bitwise_equal(tensors[name], t)
    assert named_tensors_from_proto(named_tensors_to_proto(state)).keys() == state.keys()
    with pytest.raises(ValueError, match="kind"):
        weight_update_to_proto(1, state, kind="delta")


def test_corrupt_weight_updates_rejected():
    dup = weights_pb2.WeightUpdate(version=1, tensors=named_tensors_to_proto({"a": torch.zeros(1)}) * 2)
    with pytest.raises(ValueError, match="duplicate"):
        weight_update_from_bytes(dup.SerializeToString())
    with pytest.raises(ValueError, match="duplicate"):
        named_tensors_from_proto(dup.tensors)
    nameless = weights_pb2.WeightUpdate(
        tensors=[tensor_pb2.NamedTensor(tensor=tensor_to_proto(torch.zeros(1)))]
    )
    with pytest.raises(ValueError):
        weight_update_from_bytes(nameless.SerializeToString())
    short = weights_pb2.WeightUpdate(tensors=named_tensors_to_proto({"w": torch.zeros(3)}))
    short.tensors[0].tensor.data = b"\0" * 11
    with pytest.raises(ValueError, match="'w'.*11 data bytes"):
        weight_update_from_bytes(short.SerializeToString())
    with pytest.raises(ValueError):
        named_tensors_to_proto({"": torch.zeros(1)})


def test_check_tensor_proto_does_not_decode():
    msg = tensor_pb2.Tensor(data=b"\0" * 24, shape=[2, 3], dtype="float32")
    assert check_tensor_proto(msg) == ("float32", (2, 3))


# ------------------------------------------------------------------------------ generated code fresh


def test_generated_code_is_fresh(tmp_path, monkeypatch):
    """Fails when proto/*_pb2.py(i) differ from what `make proto` (scripts/gen-proto.sh) generates:
    proto/*.proto compiled as diffrl/proto/*.proto, so the code imports and registers diffrl names."""
    tree = tmp_path / "tree"
    (tree / "diffrl").mkdir(parents=True)
    (tree / "diffrl" / "proto").symlink_to(REPO / "proto")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(tree)
    protos = sorted(f"diffrl/proto/{p.name}" for p in (REPO / "proto").glob("*.proto"))
    assert protos, "no proto/*.proto files"
    rc = protoc.main(["grpc_tools.protoc", "-I", ".", f"--python_out={out}", f"--pyi_out={out}", *protos])
    assert rc == 0, "protoc failed"
    generated = {p.relative_to(out / "diffrl").as_posix() for p in out.rglob("*_pb2.py*")}
    committed = {p.relative_to(REPO).as_posix() for p in (REPO / "proto").glob("*_pb2.py*")}
    assert generated == committed, "generated files and committed files differ: run `make proto`"
    stale = [
        name for name in sorted(generated) if (out / "diffrl" / name).read_bytes() != (REPO / name).read_bytes()
    ]
    assert not stale, f"stale generated code (run `make proto`): {stale}"
