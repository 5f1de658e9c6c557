from google.protobuf import struct_pb2 as _struct_pb2
from google.rpc import status_pb2 as _status_pb2
from lossd.v1 import loss_pb2 as _loss_pb2
from lossd.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListLossesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses",)
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossDescription]
    def __init__(self, losses: _Optional[_Iterable[_Union[LossDescription, _Mapping]]] = ...) -> None: ...

class LossDescription(_message.Message):
    __slots__ = ("name", "aliases", "doc", "parameters", "source", "inputs", "expression")
    class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SOURCE_UNSPECIFIED: _ClassVar[LossDescription.Source]
        SOURCE_KERAS: _ClassVar[LossDescription.Source]
        SOURCE_BUILTIN: _ClassVar[LossDescription.Source]
        SOURCE_PLUGIN: _ClassVar[LossDescription.Source]
        SOURCE_EXPRESSION: _ClassVar[LossDescription.Source]
    SOURCE_UNSPECIFIED: LossDescription.Source
    SOURCE_KERAS: LossDescription.Source
    SOURCE_BUILTIN: LossDescription.Source
    SOURCE_PLUGIN: LossDescription.Source
    SOURCE_EXPRESSION: LossDescription.Source
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    doc: str
    parameters: _containers.RepeatedCompositeFieldContainer[LossParameter]
    source: LossDescription.Source
    inputs: _containers.RepeatedScalarFieldContainer[str]
    expression: str
    def __init__(self, name: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., doc: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[LossParameter, _Mapping]]] = ..., source: _Optional[_Union[LossDescription.Source, str]] = ..., inputs: _Optional[_Iterable[str]] = ..., expression: _Optional[str] = ...) -> None: ...

class LossParameter(_message.Message):
    __slots__ = ("name", "type", "default_json", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_json: str
    doc: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_json: _Optional[str] = ..., doc: _Optional[str] = ...) -> None: ...

class RegisterLossRequest(_message.Message):
    __slots__ = ("name", "expression", "params", "inputs", "doc", "replace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    expression: str
    params: _struct_pb2.Struct
    inputs: _containers.RepeatedScalarFieldContainer[str]
    doc: str
    replace: bool
    def __init__(self, name: _Optional[str] = ..., expression: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., inputs: _Optional[_Iterable[str]] = ..., doc: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class DeleteLossRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteLossResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("loss", "y_true", "y_pred", "sample_weight", "reduction", "gradient", "tensors", "gradient_output")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    Y_TRUE_FIELD_NUMBER: _ClassVar[int]
    Y_PRED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    loss: _loss_pb2.LossSpec
    y_true: _tensor_pb2.Tensor
    y_pred: _tensor_pb2.Tensor
    sample_weight: _tensor_pb2.Tensor
    reduction: _loss_pb2.Reduction
    gradient: bool
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    gradient_output: _tensor_pb2.SharedMemoryRef
    def __init__(self, loss: _Optional[_Union[_loss_pb2.LossSpec, _Mapping]] = ..., y_true: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., y_pred: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sample_weight: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., reduction: _Optional[_Union[_loss_pb2.Reduction, str]] = ..., gradient: _Optional[bool] = ..., tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., gradient_output: _Optional[_Union[_tensor_pb2.SharedMemoryRef, _Mapping]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("loss", "gradient", "terms", "non_finite", "outputs")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    loss: _tensor_pb2.Tensor
    gradient: _tensor_pb2.Tensor
    terms: _containers.RepeatedCompositeFieldContainer[TermValue]
    non_finite: bool
    outputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, loss: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., gradient: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., terms: _Optional[_Iterable[_Union[TermValue, _Mapping]]] = ..., non_finite: _Optional[bool] = ..., outputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class TermValue(_message.Message):
    __slots__ = ("label", "value", "weight")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    label: str
    value: _tensor_pb2.Tensor
    weight: float
    def __init__(self, label: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weight: _Optional[float] = ...) -> None: ...

class EvaluateStreamRequest(_message.Message):
    __slots__ = ("request", "request_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request: EvaluateRequest
    request_id: str
    def __init__(self, request: _Optional[_Union[EvaluateRequest, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class EvaluateStreamResponse(_message.Message):
    __slots__ = ("response", "request_id", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: EvaluateResponse
    request_id: str
    error: _status_pb2.Status
    def __init__(self, response: _Optional[_Union[EvaluateResponse, _Mapping]] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class EvaluateChunkedRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ChunkedHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[ChunkedHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class ChunkedHeader(_message.Message):
    __slots__ = ("loss", "y_true", "y_pred", "sample_weight", "reduction", "gradient")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    Y_TRUE_FIELD_NUMBER: _ClassVar[int]
    Y_PRED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    loss: _loss_pb2.LossSpec
    y_true: _tensor_pb2.TensorInfo
    y_pred: _tensor_pb2.TensorInfo
    sample_weight: _tensor_pb2.TensorInfo
    reduction: _loss_pb2.Reduction
    gradient: bool
    def __init__(self, loss: _Optional[_Union[_loss_pb2.LossSpec, _Mapping]] = ..., y_true: _Optional[_Union[_tensor_pb2.TensorInfo, _Mapping]] = ..., y_pred: _Optional[_Union[_tensor_pb2.TensorInfo, _Mapping]] = ..., sample_weight: _Optional[_Union[_tensor_pb2.TensorInfo, _Mapping]] = ..., reduction: _Optional[_Union[_loss_pb2.Reduction, str]] = ..., gradient: _Optional[bool] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("start", "rows", "y_true", "y_pred", "sample_weight")
    START_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    Y_TRUE_FIELD_NUMBER: _ClassVar[int]
    Y_PRED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    start: int
    rows: int
    y_true: bytes
    y_pred: bytes
    sample_weight: bytes
    def __init__(self, start: _Optional[int] = ..., rows: _Optional[int] = ..., y_true: _Optional[bytes] = ..., y_pred: _Optional[bytes] = ..., sample_weight: _Optional[bytes] = ...) -> None: ...

class EvaluateChunkedResponse(_message.Message):
    __slots__ = ("chunk", "summary")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    chunk: ChunkResult
    summary: ChunkedSummary
    def __init__(self, chunk: _Optional[_Union[ChunkResult, _Mapping]] = ..., summary: _Optional[_Union[ChunkedSummary, _Mapping]] = ...) -> None: ...

class ChunkResult(_message.Message):
    __slots__ = ("start", "loss", "gradient")
    START_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    start: int
    loss: _tensor_pb2.Tensor
    gradient: _tensor_pb2.Tensor
    def __init__(self, start: _Optional[int] = ..., loss: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., gradient: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ChunkedSummary(_message.Message):
    __slots__ = ("loss", "gradient_scale", "non_finite", "y_true_gradient_coefficient", "y_pred_gradient_coefficient")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_SCALE_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    Y_TRUE_GRADIENT_COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    Y_PRED_GRADIENT_COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    loss: _tensor_pb2.Tensor
    gradient_scale: float
    non_finite: bool
    y_true_gradient_coefficient: float
    y_pred_gradient_coefficient: float
    def __init__(self, loss: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., gradient_scale: _Optional[float] = ..., non_finite: _Optional[bool] = ..., y_true_gradient_coefficient: _Optional[float] = ..., y_pred_gradient_coefficient: _Optional[float] = ...) -> None: ...
