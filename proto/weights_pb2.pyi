from diffrl.proto import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WeightUpdate(_message.Message):
    __slots__ = ("version", "kind", "tensors", "created_at")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FULL: _ClassVar[WeightUpdate.Kind]
        LORA: _ClassVar[WeightUpdate.Kind]
    FULL: WeightUpdate.Kind
    LORA: WeightUpdate.Kind
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: WeightUpdate.Kind
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    created_at: float
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[_Union[WeightUpdate.Kind, str]] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., created_at: _Optional[float] = ...) -> None: ...
