from diffrl.proto import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sample(_message.Message):
    __slots__ = ("seed", "latent", "rewards", "extras")
    class RewardsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ExtrasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    SEED_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    seed: int
    latent: _tensor_pb2.Tensor
    rewards: _containers.ScalarMap[str, float]
    extras: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, seed: _Optional[int] = ..., latent: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., rewards: _Optional[_Mapping[str, float]] = ..., extras: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("group_id", "prompt", "prompt_metadata", "policy_version", "sampler_id", "created_at", "samples", "masked", "mask_reason")
    class PromptMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_METADATA_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    MASK_REASON_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    prompt: str
    prompt_metadata: _containers.ScalarMap[str, str]
    policy_version: int
    sampler_id: str
    created_at: float
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    masked: bool
    mask_reason: str
    def __init__(self, group_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_metadata: _Optional[_Mapping[str, str]] = ..., policy_version: _Optional[int] = ..., sampler_id: _Optional[str] = ..., created_at: _Optional[float] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., masked: _Optional[bool] = ..., mask_reason: _Optional[str] = ...) -> None: ...
