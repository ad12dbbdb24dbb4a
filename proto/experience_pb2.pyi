from diffrl.proto import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_KIND_UNSPECIFIED: _ClassVar[StepKind]
    EULER: _ClassVar[StepKind]
    FLOW_SDE: _ClassVar[StepKind]
    ETA: _ClassVar[StepKind]
STEP_KIND_UNSPECIFIED: StepKind
EULER: StepKind
FLOW_SDE: StepKind
ETA: StepKind

class Trajectory(_message.Message):
    __slots__ = ("states", "sigmas", "log_probs", "x0_preds", "noise_seed", "step_seed", "step_kind", "noise_level", "guidance_scale", "pair_id", "step_rewards", "anchor_step")
    class StepRewardsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    STATES_FIELD_NUMBER: _ClassVar[int]
    SIGMAS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    X0_PREDS_FIELD_NUMBER: _ClassVar[int]
    NOISE_SEED_FIELD_NUMBER: _ClassVar[int]
    STEP_SEED_FIELD_NUMBER: _ClassVar[int]
    STEP_KIND_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_STEP_FIELD_NUMBER: _ClassVar[int]
    states: _tensor_pb2.Tensor
    sigmas: _tensor_pb2.Tensor
    log_probs: _tensor_pb2.Tensor
    x0_preds: _tensor_pb2.Tensor
    noise_seed: int
    step_seed: int
    step_kind: StepKind
    noise_level: float
    guidance_scale: float
    pair_id: int
    step_rewards: _containers.MessageMap[str, _tensor_pb2.Tensor]
    anchor_step: int
    def __init__(self, states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sigmas: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., log_probs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., x0_preds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., noise_seed: _Optional[int] = ..., step_seed: _Optional[int] = ..., step_kind: _Optional[_Union[StepKind, str]] = ..., noise_level: _Optional[float] = ..., guidance_scale: _Optional[float] = ..., pair_id: _Optional[int] = ..., step_rewards: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., anchor_step: _Optional[int] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("seed", "latent", "rewards", "trajectory")
    class RewardsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SEED_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    seed: int
    latent: _tensor_pb2.Tensor
    rewards: _containers.ScalarMap[str, float]
    trajectory: Trajectory
    def __init__(self, seed: _Optional[int] = ..., latent: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., rewards: _Optional[_Mapping[str, float]] = ..., trajectory: _Optional[_Union[Trajectory, _Mapping]] = ...) -> None: ...

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
