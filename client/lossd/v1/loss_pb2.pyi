from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    REDUCTION_NONE: _ClassVar[Reduction]
    REDUCTION_SUM: _ClassVar[Reduction]
    REDUCTION_SUM_OVER_BATCH_SIZE: _ClassVar[Reduction]
    REDUCTION_MEAN: _ClassVar[Reduction]
    REDUCTION_MEAN_WITH_SAMPLE_WEIGHT: _ClassVar[Reduction]
REDUCTION_UNSPECIFIED: Reduction
REDUCTION_NONE: Reduction
REDUCTION_SUM: Reduction
REDUCTION_SUM_OVER_BATCH_SIZE: Reduction
REDUCTION_MEAN: Reduction
REDUCTION_MEAN_WITH_SAMPLE_WEIGHT: Reduction

class LossSpec(_message.Message):
    __slots__ = ("name", "params", "expression", "terms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _struct_pb2.Struct
    expression: str
    terms: _containers.RepeatedCompositeFieldContainer[LossTerm]
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., expression: _Optional[str] = ..., terms: _Optional[_Iterable[_Union[LossTerm, _Mapping]]] = ...) -> None: ...

class LossTerm(_message.Message):
    __slots__ = ("label", "loss", "weight", "reduction", "inputs")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    label: str
    loss: LossSpec
    weight: float
    reduction: Reduction
    inputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, label: _Optional[str] = ..., loss: _Optional[_Union[LossSpec, _Mapping]] = ..., weight: _Optional[float] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., inputs: _Optional[_Iterable[str]] = ...) -> None: ...
