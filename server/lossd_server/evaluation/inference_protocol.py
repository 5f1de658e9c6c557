"""The Open Inference Protocol's (KServe v2) view of lossd, for its front ends.

Every loss is a model: the built-in ones, registered ones and plugins, under
the loss's name (or an alias). A model's inputs are ``y_true``, ``y_pred``,
an optional ``sample_weight`` and the loss's extra tensors; its outputs are
``loss``, ``gradient`` and the loss's named outputs (a stateful loss's
state). A composite or an inline expression is the model ``lossd`` with its
``LossSpec`` as JSON in the request parameter ``loss_spec``.

Request parameters carry the loss's own parameters (``delta``), the
``reduction`` (a ``lossd.wire.REDUCTIONS`` name) and ``gradient`` (a bool;
asking for the ``gradient`` output also turns it on). They are validated by
the planner, exactly as lossd.v1's ``params`` are.

A tensor's parameters ``shared_memory_region``, ``shared_memory_byte_size``
and ``shared_memory_offset`` (Triton's system shared-memory extension) name
a range of a region its caller registered: an input is read from there and
an output written there, through ``lossd_server.shared_memory``, as
lossd.v1's shared-memory tensors are.

This module turns the protocol's pieces (names, datatypes, parameters,
requested outputs) into an ``EvaluationRequest`` and a ``Result`` back into
named outputs. It imports neither gRPC nor HTTP: the gRPC servicer
(``grpc/oip_servicer.py``) and the REST front end decode and encode around it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from lossd import wire
from lossd.v1 import tensor_pb2
from lossd_server.errors import InvalidArgument, NotFound
from lossd_server.evaluation.evaluator import Result
from lossd_server.evaluation.service import EvaluationRequest, Incoming
from lossd_server.losses.registry import SHAPES_CTC, SHAPES_LABELS, SHAPES_SPARSE, LossEntry, LossRegistry

SPEC_MODEL = "lossd"
"""The model that evaluates the LossSpec (JSON) in the ``loss_spec`` parameter."""
SPEC_PARAMETER = "loss_spec"
REDUCTION_PARAMETER = "reduction"
GRADIENT_PARAMETER = "gradient"
VERSIONS = ("1",)
"""A loss has one version; a request may name it or leave the version empty."""
PLATFORM = "lossd"

OUTPUT_LOSS = "loss"
OUTPUT_GRADIENT = "gradient"
OWN_INPUTS = ("y_true", "y_pred", "sample_weight")

# Parameters the protocol's clients add of their own accord (tritonclient's
# sequence, priority and timeout fields; the REST binary data extension):
# they are the protocol's, not a loss's, and lossd takes no action on them.
PROTOCOL_PARAMETERS = frozenset({
    "sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output",
    "triton_enable_empty_final_response", "headers",
})


@dataclasses.dataclass(frozen=True)
class TensorMetadata:
    """A model input or output: ``shape`` has -1 for an axis of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    name: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    versions: tuple[str, ...] = VERSIONS
    platform: str = PLATFORM


def _check_version(name: str, version: str) -> None:
    if version and version not in VERSIONS:
        raise NotFound(f"Unknown version of model {name!r}. Expected one of {', '.join(VERSIONS)} or none. "
                       f"Received: {version[:64]!r}.", reason="UNKNOWN_MODEL_VERSION",
                       metadata={"model": name[:80], "version": version[:64]})


def find_model(registry: LossRegistry, name: str, version: str = "") -> Optional[LossEntry]:
    """The loss a model name serves (None for ``SPEC_MODEL``); raises
    NotFound (``UNKNOWN_MODEL``) for a name that is no loss, naming the
    closest losses, or for a version other than ``VERSIONS``."""
    if name == SPEC_MODEL:
        _check_version(name, version)
        return None
    if registry.canonical(name) is None:
        unknown = None
        try:
            registry.get(name)
        except InvalidArgument as error:  # the registry's message, with its suggestions
            unknown = error
        raise NotFound(f"Unknown model. Every loss is a model (see ModelMetadata, ListLosses); a composite or an "
                       f"expression is the model {SPEC_MODEL!r} with parameter {SPEC_PARAMETER!r}. "
                       f"{unknown.message if unknown else ''}".strip(), reason="UNKNOWN_MODEL",
                       metadata={"model": name[:80]})
    _check_version(name, version)
    return registry.get(name)


def model_metadata(registry: LossRegistry, name: str, version: str = "") -> ModelMetadata:
    """The inputs and outputs of the model ``name``.

    Float tensors are listed as ``FP32`` and labels as ``INT64``; every
    float datatype (``FP16``, ``BF16``, ``FP64``) and integer label datatype
    lossd takes is accepted too. Ranks are those of the common case
    (a batch of rows); the loss itself decides what else it accepts."""
    entry = find_model(registry, name, version)
    if entry is None:  # the spec model: whatever its LossSpec reads
        inputs = (TensorMetadata("y_true", "FP32", (-1, -1)), TensorMetadata("y_pred", "FP32", (-1, -1)),
                  TensorMetadata("sample_weight", "FP32", (-1,)))
        return ModelMetadata(SPEC_MODEL, inputs, (TensorMetadata(OUTPUT_LOSS, "FP32", (-1,)),
                                                  TensorMetadata(OUTPUT_GRADIENT, "FP32", (-1, -1))))
    y_pred = {SHAPES_CTC: (-1, -1, -1)}.get(entry.shapes, (-1, -1))
    y_true = {SHAPES_SPARSE: ("INT64", (-1,)), SHAPES_LABELS: ("INT64", (-1,)),
              SHAPES_CTC: ("INT64", (-1, -1))}.get(entry.shapes, ("FP32", y_pred))
    inputs = []
    for own in entry.inputs:
        if own == "y_true":
            inputs.append(TensorMetadata("y_true", *y_true))
        elif own == "y_pred":
            inputs.append(TensorMetadata("y_pred", "FP32", y_pred))
        else:
            inputs.append(TensorMetadata(own, "FP32", (-1,) * len(y_pred)))
    inputs.append(TensorMetadata("sample_weight", "FP32", (-1,)))
    outputs = [TensorMetadata(OUTPUT_LOSS, "FP32", (-1,)), TensorMetadata(OUTPUT_GRADIENT, "FP32", y_pred)]
    outputs += [TensorMetadata(output, "FP32", (-1,)) for output in entry.outputs]
    return ModelMetadata(entry.name, tuple(inputs), tuple(outputs))


SHM_REGION = "shared_memory_region"
SHM_BYTE_SIZE = "shared_memory_byte_size"
SHM_OFFSET = "shared_memory_offset"
SHM_PARAMETERS = (SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET)
SHM_EXTENSION = "system_shared_memory"
"""The extension's name in ServerMetadata, where the server offers it."""


def region_of(parameters: Mapping[str, Any], field: str) -> Optional[tensor_pb2.SharedMemoryRef]:
    """The shared-memory range a tensor's parameters name, or None when they
    name none (Triton's parameters, as lossd.v1's ``SharedMemoryRef``)."""
    region = parameters.get(SHM_REGION)
    if region is None:
        stray = [name for name in SHM_PARAMETERS if name in parameters]
        if stray:
            raise InvalidArgument(f"{field}: {stray[0]} without {SHM_REGION}. Expected a region name with it.",
                                  reason="SHM_BAD_PARAMETERS")
        return None
    byte_size, offset = parameters.get(SHM_BYTE_SIZE), parameters.get(SHM_OFFSET, 0)
    if not isinstance(region, str) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                          for v in (byte_size, offset)):
        raise InvalidArgument(f"{field}: a shared-memory range is {SHM_REGION} (a string), {SHM_BYTE_SIZE} and "
                              f"{SHM_OFFSET} (integers >= 0). Received: {region!r}, {byte_size!r}, {offset!r}.",
                              reason="SHM_BAD_PARAMETERS")
    return tensor_pb2.SharedMemoryRef(region=region, offset=offset, byte_size=byte_size)


@dataclasses.dataclass(frozen=True)
class Input:
    """One input tensor as a front end received it: its protocol datatype
    name and shape, and its data: ``raw`` bytes (row-major little-endian,
    the protocol's raw contents or binary extension) or ``values`` (a flat
    sequence of numbers: typed contents, JSON data). It is decoded only
    after admission."""

    name: str
    datatype: str
    shape: Sequence[int]
    raw: Optional[bytes] = None
    values: Optional[Sequence] = None
    region: Optional[tensor_pb2.SharedMemoryRef] = None  # its bytes are in a registered region


@dataclasses.dataclass
class Inference:
    """An OIP inference as the evaluation service's request, and which
    outputs to answer with (None: every one the result has)."""

    request: EvaluationRequest
    outputs: Optional[tuple[str, ...]]
    output_regions: Mapping[str, tensor_pb2.SharedMemoryRef] = dataclasses.field(default_factory=dict)


def _parameter_value(name: str, value: Any) -> Any:
    if isinstance(value, str) and len(value) > 1 << 20:
        raise InvalidArgument(f"Parameter `{name}` is too long. Expected at most 1 MiB. "
                              f"Received: {len(value):,} characters.", reason="BAD_PARAMETER",
                              metadata={"parameter": name[:80]})
    return value


def inference(registry: LossRegistry, model: str, version: str, parameters: Mapping[str, Any],
              inputs: Sequence[Input], requested: Sequence[str], *, max_elements: int,
              output_regions: Optional[Mapping[str, tensor_pb2.SharedMemoryRef]] = None,
              regions=None) -> Inference:
    """The evaluation an OIP inference asks for.

    Args:
        registry: Where model names resolve.
        model: The model name: a loss, or ``SPEC_MODEL``.
        version: The model version ("" or one of ``VERSIONS``).
        parameters: The request's parameters, as Python values (bool, int,
            float, str).
        inputs: The input tensors, in the request's order.
        requested: The output names the request asks for (empty: all).
        max_elements: Most elements one tensor may declare.
        output_regions: Where requested outputs go instead of the answer,
            by output name.
        regions: The caller's named shared-memory registrations
            (``SharedMemoryRegions.access(caller, named=True)``); None where
            the server has no shared memory.

    Raises:
        NotFound: an unknown model or version.
        InvalidArgument: a bad parameter, input name, datatype or output name.
    """
    entry = find_model(registry, model, version)
    params, reduction, gradient, spec = {}, wire.DEFAULT_REDUCTION, False, None
    for name, value in parameters.items():
        value = _parameter_value(name, value)
        if name in PROTOCOL_PARAMETERS:
            continue
        if name == REDUCTION_PARAMETER:
            if not isinstance(value, str):
                raise InvalidArgument(f"Parameter `reduction` is a string. Expected one of {list(wire.REDUCTIONS)}. "
                                      f"Received: {value!r}.", reason="BAD_REDUCTION")
            reduction = value  # the service checks the name
        elif name == GRADIENT_PARAMETER:
            if not isinstance(value, bool):
                raise InvalidArgument(f"Parameter `gradient` is a bool. Expected true or false. Received: {value!r}.",
                                      reason="BAD_PARAMETER", metadata={"parameter": "gradient"})
            gradient = value
        elif name == SPEC_PARAMETER:
            spec = _spec(value, model)
        else:
            params[name] = value
    if entry is None:
        if spec is None:
            raise InvalidArgument(f"The model {SPEC_MODEL!r} evaluates the LossSpec in parameter "
                                  f"{SPEC_PARAMETER!r}. Expected it as a JSON string. Received: no such parameter.",
                                  reason="BAD_LOSS_SPEC")
        if params:
            raise InvalidArgument(f"The model {SPEC_MODEL!r} takes its loss's parameters inside {SPEC_PARAMETER!r}. "
                                  f"Expected no other loss parameter. Received: {', '.join(sorted(params))}.",
                                  reason="UNKNOWN_PARAMETER")
        loss = spec
    else:
        if spec is not None:
            raise InvalidArgument(f"Parameter {SPEC_PARAMETER!r} is for the model {SPEC_MODEL!r}. Expected the "
                                  f"parameters of {model!r} alone. Received: a loss spec as well.",
                                  reason="BAD_LOSS_SPEC")
        loss = {"name": entry.name, "params": params}
    outputs = tuple(requested) or None
    if outputs is not None:
        known = {OUTPUT_LOSS, OUTPUT_GRADIENT, *(entry.outputs if entry is not None else ())}
        unknown = [name for name in outputs if name not in known and entry is not None]
        if unknown:
            raise InvalidArgument(f"Unknown output of model {model!r}. Expected some of {sorted(known)}. "
                                  f"Received: {', '.join(repr(n[:64]) for n in unknown)}.", reason="UNKNOWN_OUTPUT")
        gradient = gradient or OUTPUT_GRADIENT in outputs
    tensors, sample_weight = {}, None
    for tensor in inputs:
        if tensor.name in tensors or tensor.name == "sample_weight" and sample_weight is not None:
            raise InvalidArgument(f"Input {tensor.name[:64]!r} appears twice. Expected each input once.",
                                  reason="DUPLICATE_TENSOR", metadata={"tensor": tensor.name[:64]})
        incoming = _incoming(tensor, max_elements, regions)
        if tensor.name == "sample_weight":
            sample_weight = incoming
        else:
            tensors[tensor.name] = incoming  # the service checks the names against the plan
    output_regions = dict(output_regions or {})
    for name, ref in output_regions.items():  # each range exists before anything is spent
        wire.region_range(ref, regions, field=f"outputs[{name[:64]}]")
    return Inference(EvaluationRequest(loss=loss, tensors=tensors, sample_weight=sample_weight, reduction=reduction,
                                       gradient=gradient), outputs, output_regions)


def _spec(value: Any, model: str) -> dict:
    if not isinstance(value, str):
        raise InvalidArgument(f"Parameter {SPEC_PARAMETER!r} is a LossSpec as JSON. Expected a string. "
                              f"Received: {type(value).__name__}.", reason="BAD_LOSS_SPEC")
    try:
        spec = json.loads(value)
    except ValueError as error:
        raise InvalidArgument(f"Parameter {SPEC_PARAMETER!r} is not JSON. Expected a LossSpec such as "
                              f'{{"expression": "mean(square(y_true - y_pred), axis=-1)"}}. Received: {error}.',
                              reason="BAD_LOSS_SPEC") from None
    if not isinstance(spec, dict):
        raise InvalidArgument(f"Parameter {SPEC_PARAMETER!r} is a LossSpec. Expected a JSON object. "
                              f"Received: {type(spec).__name__}.", reason="BAD_LOSS_SPEC")
    return spec


def _incoming(tensor: Input, max_elements: int, regions=None) -> Incoming:
    field = f"inputs[{tensor.name[:64]}]"
    enum = wire.oip_dtype_enum(tensor.datatype, field=field)
    shape = tuple(int(d) for d in tensor.shape)
    count = wire.check_shape(shape, field=field, max_elements=max_elements)
    if tensor.region is not None:
        if tensor.raw is not None or tensor.values:
            raise wire.WireError(f"{field}: both data and a shared-memory region are given. Expected one of them.")
        wire.region_range(tensor.region, regions, field=field)  # the range exists before admission
        # lossd.v1's shared-memory tensor: the same range check and read.
        reference = tensor_pb2.Tensor(dtype=enum, shape=shape, shared_memory=tensor.region)

        def decode() -> np.ndarray:
            return regions.read(reference, field=field, max_elements=max_elements)
    elif tensor.raw is not None:
        def decode() -> np.ndarray:
            return wire.from_bytes(tensor.raw, enum, shape, field=field, max_elements=max_elements)
    else:
        def decode() -> np.ndarray:
            return _from_values(tensor.values if tensor.values is not None else (), enum, shape, count, field)
    return Incoming(enum, shape, decode)


def _from_values(values: Sequence, enum: int, shape: tuple, count: int, field: str) -> np.ndarray:
    """A typed list's array, checked against the declared shape and the
    datatype's range (numpy would wrap an out-of-range integer)."""
    if len(values) != count:
        raise wire.WireError(f"{field}: the data does not match the shape. Expected {count:,} values (shape "
                             f"{list(shape)}). Received: {len(values):,}.")
    if count == 0:
        raise wire.WireError(f"{field}: empty tensor. Expected at least one element. Received: shape={list(shape)}.",
                             reason="EMPTY_TENSOR")
    dtype = wire.numpy_dtype(enum, field=field)
    try:
        if dtype.kind in "iu":
            wide = np.asarray(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
            info = np.iinfo(dtype)
            if wide.min() < info.min or wide.max() > info.max:
                raise wire.WireError(f"{field}: a value is out of range. Expected {dtype.name} values in "
                                     f"[{info.min}, {info.max}]. Received: [{wide.min()}, {wide.max()}].")
            return wide.astype(dtype).reshape(shape)
        if dtype.kind == "b":
            array = np.asarray(values)
            if array.dtype != np.bool_:
                raise wire.WireError(f"{field}: BOOL data holds non-booleans. Expected true or false. "
                                     f"Received: {array.dtype.name} values.")
            return array.reshape(shape)
        array = np.asarray(values, dtype=np.float64 if dtype.itemsize > 4 else np.float32)
        return array.astype(dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as error:
        if isinstance(error, wire.WireError):
            raise
        raise wire.WireError(f"{field}: the data are not {dtype.name} values. Expected a flat list of numbers. "
                             f"Received: {str(error)[:200]}.") from None


def write_output(regions, name: str, array: np.ndarray, ref: tensor_pb2.SharedMemoryRef) -> int:
    """Writes an output into its shared-memory range; returns the bytes written."""
    return regions.write(array, ref, field=f"outputs[{name[:64]}]").shared_memory.byte_size


def outputs_of(result: Result, wanted: Optional[tuple[str, ...]]) -> list[tuple[str, np.ndarray]]:
    """The named outputs of a result, in the order asked (or loss, gradient,
    then the loss's outputs)."""
    available = {OUTPUT_LOSS: np.asarray(result.loss)}
    if result.gradient is not None:
        available[OUTPUT_GRADIENT] = result.gradient
    available.update(result.outputs)
    if wanted is None:
        return list(available.items())
    missing = [name for name in wanted if name not in available]
    if missing:
        raise InvalidArgument(f"Unknown output. Expected some of {sorted(available)}. "
                              f"Received: {', '.join(repr(n[:64]) for n in missing)}.", reason="UNKNOWN_OUTPUT")
    return [(name, available[name]) for name in wanted]
