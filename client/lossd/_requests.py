"""Request building and response parsing shared by the sync and asyncio
clients: local checks that are cheap (dtype, shape, names), LossSpec
construction, and splitting large tensors into chunks."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
from google.protobuf import struct_pb2

from lossd import _tensors
from lossd._errors import client_error, status_error
from lossd.v1 import loss_pb2, loss_service_pb2

LossLike = Union[str, Mapping[str, Any]]

REDUCTIONS = {
    "none": loss_pb2.REDUCTION_NONE,
    "sum": loss_pb2.REDUCTION_SUM,
    "sum_over_batch_size": loss_pb2.REDUCTION_SUM_OVER_BATCH_SIZE,
    "mean": loss_pb2.REDUCTION_MEAN,
    "mean_with_sample_weight": loss_pb2.REDUCTION_MEAN_WITH_SAMPLE_WEIGHT,
}
_FLOATS = ("float16", "bfloat16", "float32", "float64")
# Room for the non-tensor fields of a message under the size limit.
_MESSAGE_OVERHEAD = 1 << 16


@dataclasses.dataclass
class EvaluateResult:
    """The result of an evaluation.

    Attributes:
        loss: 0-d array when reduced; per-sample values for ``reduction="none"``.
        gradient: The gradient with respect to ``y_pred`` (shaped like it), or None.
        terms: For composite losses, each term's value by label (before weighting).
        non_finite: True when an input or the result held NaN or Inf.
    """

    loss: np.ndarray
    gradient: Optional[np.ndarray] = None
    terms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    non_finite: bool = False


@dataclasses.dataclass
class LossParameter:
    """A parameter of a loss: Keras name, type, default and doc."""

    name: str
    type: str
    default: Any
    doc: str


@dataclasses.dataclass
class LossInfo:
    """A loss the server can evaluate (see ``Client.losses``)."""

    name: str
    aliases: list[str]
    doc: str
    parameters: list[LossParameter]
    source: str
    inputs: list[str]
    expression: str = ""


def reduction_value(reduction: str) -> int:
    try:
        return REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise client_error(f"Invalid reduction. Expected one of {list(REDUCTIONS)}. "
                           f"Received: {reduction!r}.") from None


def _struct(params: Optional[Mapping[str, Any]]) -> Optional[struct_pb2.Struct]:
    if not params:
        return None
    struct = struct_pb2.Struct()
    try:
        struct.update({k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()})
    except (ValueError, TypeError) as exc:
        raise client_error(f"Loss parameters must be JSON-like (numbers, booleans, strings, lists, "
                           f"null). Received: {params!r} ({exc}).") from None
    return struct


def loss_spec(loss: LossLike, params: Optional[Mapping[str, Any]] = None) -> loss_pb2.LossSpec:
    """Builds a LossSpec from a name, a ``{"name", "params"}`` dict, an
    ``{"expression", "params"}`` dict or a ``{"terms": [...]}`` composite."""
    if isinstance(loss, loss_pb2.LossSpec):
        return loss
    if isinstance(loss, str):
        loss = {"name": loss}
    if not isinstance(loss, Mapping):
        raise client_error(f"loss must be a name or a dict like {{'name': 'huber', 'params': {{...}}}}. "
                           f"Received: {type(loss).__name__}.")
    unknown = set(loss) - {"name", "params", "expression", "terms"}
    if unknown:
        raise client_error(f"Unknown loss keys {sorted(unknown)}. Expected name, params, expression or terms.")
    merged = {**(loss.get("params") or {}), **(params or {})}
    spec = loss_pb2.LossSpec(name=loss.get("name", ""), expression=loss.get("expression", ""))
    struct = _struct(merged)
    if struct is not None:
        spec.params.CopyFrom(struct)
    for term in loss.get("terms") or ():
        t = spec.terms.add(label=term.get("label", ""))
        t.loss.CopyFrom(loss_spec(term["loss"]) if "loss" in term else
                        loss_spec({k: term[k] for k in ("name", "params", "expression") if k in term}))
        if term.get("weight") is not None:
            t.weight = float(term["weight"])
        if term.get("reduction"):
            t.reduction = reduction_value(term["reduction"])
        t.inputs.extend(term.get("inputs") or ())
    return spec


def _array(value, field: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object:
        raise client_error(f"{field}: expected a numeric array. Received: dtype=object.")
    if array.size == 0:
        raise client_error(f"{field}: empty tensor. Expected at least one element. Received: shape={list(array.shape)}.")
    if array.dtype.kind == "f" and array.dtype.name not in _FLOATS:
        array = array.astype(np.float64)  # e.g. float128 has no wire type
    try:
        _tensors.dtype_enum(array.dtype, field=field)
    except _tensors.TensorError as exc:
        raise client_error(str(exc), "UNSUPPORTED_DTYPE") from None
    return array


def prepare(y_true, y_pred, sample_weight=None, tensors: Optional[Mapping[str, Any]] = None
            ) -> dict[str, np.ndarray]:
    """Converts and checks inputs locally; returns the arrays by name."""
    arrays = {"y_true": _array(y_true, "y_true"), "y_pred": _array(y_pred, "y_pred")}
    if arrays["y_pred"].dtype.name not in _FLOATS:
        raise client_error(f"y_pred: expected a floating dtype ({', '.join(_FLOATS)}); the loss is computed "
                           f"in y_pred's dtype. Received: {arrays['y_pred'].dtype.name}.", "UNSUPPORTED_DTYPE")
    if sample_weight is not None:
        arrays["sample_weight"] = _array(sample_weight, "sample_weight")
    for name, value in (tensors or {}).items():
        if name in arrays:
            raise client_error(f"tensors: {name!r} is reserved. Pass it as its own argument.")
        arrays[name] = _array(value, f"tensors[{name}]")
    return arrays


def evaluate_request(spec: loss_pb2.LossSpec, arrays: Mapping[str, np.ndarray], reduction: str,
                     gradient: bool) -> loss_service_pb2.EvaluateRequest:
    request = loss_service_pb2.EvaluateRequest(
        loss=spec, y_true=_tensors.from_numpy(arrays["y_true"], field="y_true"),
        y_pred=_tensors.from_numpy(arrays["y_pred"], field="y_pred"),
        reduction=reduction_value(reduction), gradient=gradient)
    if "sample_weight" in arrays:
        request.sample_weight.CopyFrom(_tensors.from_numpy(arrays["sample_weight"], field="sample_weight"))
    for name, array in arrays.items():
        if name not in ("y_true", "y_pred", "sample_weight"):
            request.tensors[name].CopyFrom(_tensors.from_numpy(array, field=name))
    return request


def parse_response(response: loss_service_pb2.EvaluateResponse) -> EvaluateResult:
    result = EvaluateResult(loss=_tensors.to_numpy(response.loss, field="loss", allow_empty=True),
                            non_finite=response.non_finite)
    if response.HasField("gradient"):
        result.gradient = _tensors.to_numpy(response.gradient, field="gradient", allow_empty=True)
    for term in response.terms:
        result.terms[term.label] = _tensors.to_numpy(term.value, field=term.label, allow_empty=True)
    return result


def parse_stream_item(item: loss_service_pb2.EvaluateStreamResponse) -> EvaluateResult:
    if item.HasField("error"):
        raise status_error(item.error)
    return parse_response(item.response)


def needs_chunks(arrays: Mapping[str, np.ndarray], max_message_bytes: int) -> bool:
    """Whether the request would exceed one message (responses carry at most the gradient)."""
    return sum(a.nbytes for a in arrays.values()) + _MESSAGE_OVERHEAD > max_message_bytes


def chunked_requests(spec: loss_pb2.LossSpec, arrays: Mapping[str, np.ndarray], reduction: str,
                     gradient: bool, chunk_bytes: int) -> Iterator[loss_service_pb2.EvaluateChunkedRequest]:
    """The header, then row slices of every tensor of about ``chunk_bytes`` each."""
    if set(arrays) - {"y_true", "y_pred", "sample_weight"}:
        raise client_error("Tensors too large for one message can be sent with y_true, y_pred and "
                           "sample_weight only, not extra named tensors.")
    rows = arrays["y_pred"].shape[0] if arrays["y_pred"].ndim else 0
    for name, a in arrays.items():
        if a.ndim == 0 or a.shape[0] != rows:
            raise client_error(f"Large tensors are sent in row slices, so every tensor needs the same first "
                               f"axis. Expected {name}.shape[0] == {rows}. Received: {list(a.shape)}.", "SHAPE_MISMATCH")
    header = loss_service_pb2.ChunkedHeader(loss=spec, reduction=reduction_value(reduction), gradient=gradient)
    for name, a in arrays.items():
        getattr(header, name).CopyFrom(_tensors.info(a, field=name))
    yield loss_service_pb2.EvaluateChunkedRequest(header=header)
    row_bytes = sum(a.nbytes // rows for a in arrays.values())
    step = max(1, chunk_bytes // max(row_bytes, 1))
    contiguous = {n: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for n, a in arrays.items()}
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = loss_service_pb2.TensorChunk(start=start, rows=stop - start)
        for name, a in contiguous.items():
            setattr(chunk, name, a[start:stop].tobytes())
        yield loss_service_pb2.EvaluateChunkedRequest(chunk=chunk)


class ChunkAssembler:
    """Puts the chunked answers back together into one EvaluateResult."""

    def __init__(self, y_pred: np.ndarray, gradient: bool):
        self.gradient = np.empty(y_pred.shape, dtype=y_pred.dtype) if gradient else None
        self.values: list[np.ndarray] = []
        self.result: Optional[EvaluateResult] = None

    def add(self, message: loss_service_pb2.EvaluateChunkedResponse) -> None:
        if message.WhichOneof("kind") == "chunk":
            chunk = message.chunk
            if chunk.HasField("loss"):
                self.values.append(_tensors.to_numpy(chunk.loss, field="loss", allow_empty=True))
            if chunk.HasField("gradient") and self.gradient is not None:
                rows = _tensors.to_numpy(chunk.gradient, field="gradient", allow_empty=True)
                self.gradient[chunk.start:chunk.start + rows.shape[0]] = rows
            return
        summary = message.summary
        if self.gradient is not None and summary.gradient_scale != 1.0:
            self.gradient *= self.gradient.dtype.type(summary.gradient_scale)
        loss = (_tensors.to_numpy(summary.loss, field="loss", allow_empty=True) if summary.HasField("loss")
                else np.concatenate(self.values) if self.values else np.empty((0,)))
        self.result = EvaluateResult(loss=loss, gradient=self.gradient, non_finite=summary.non_finite)


def loss_info(description) -> LossInfo:
    """A LossDescription message as a LossInfo."""
    pb = loss_service_pb2
    return LossInfo(
        name=description.name, aliases=list(description.aliases), doc=description.doc,
        parameters=[LossParameter(p.name, p.type, json.loads(p.default_json) if p.default_json else None, p.doc)
                    for p in description.parameters],
        source=pb.LossDescription.Source.Name(description.source).removeprefix("SOURCE_").lower(),
        inputs=list(description.inputs), expression=description.expression)

