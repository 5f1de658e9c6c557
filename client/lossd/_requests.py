"""Request building and response parsing shared by the sync and asyncio
clients: local checks that are cheap (dtype, shape, names) and response
parsing. Chunking lives in ``_chunks``; the codec in ``lossd.wire``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

import numpy as np
from lossd import wire
from lossd._errors import client_error, status_error
from lossd.v1 import loss_pb2, loss_service_pb2

LossLike = wire.LossLike


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


def _array(value, field: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object:
        raise client_error(f"{field}: expected a numeric array. Received: dtype=object.")
    if array.size == 0:
        raise client_error(f"{field}: empty tensor. Expected at least one element. Received: shape={list(array.shape)}.")
    if array.dtype.kind == "f" and not wire.is_float(array.dtype):
        array = array.astype(np.float64)  # e.g. float128 has no wire type
    try:
        wire.dtype_enum(array.dtype, field=field)
    except wire.WireError as exc:
        raise client_error(str(exc), "UNSUPPORTED_DTYPE") from None
    return array


def prepare(y_true, y_pred, sample_weight=None, tensors: Optional[Mapping[str, Any]] = None
            ) -> dict[str, np.ndarray]:
    """Converts and checks inputs locally; returns the arrays by name."""
    arrays = {"y_true": _array(y_true, "y_true"), "y_pred": _array(y_pred, "y_pred")}
    if not wire.is_float(arrays["y_pred"].dtype):
        raise client_error(f"y_pred: expected a floating dtype ({', '.join(wire.FLOAT_DTYPES)}); the loss is computed "
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
        loss=spec, y_true=wire.from_numpy(arrays["y_true"], field="y_true"),
        y_pred=wire.from_numpy(arrays["y_pred"], field="y_pred"),
        reduction=wire.reduction_enum(reduction), gradient=gradient)
    if "sample_weight" in arrays:
        request.sample_weight.CopyFrom(wire.from_numpy(arrays["sample_weight"], field="sample_weight"))
    for name, array in arrays.items():
        if name not in ("y_true", "y_pred", "sample_weight"):
            request.tensors[name].CopyFrom(wire.from_numpy(array, field=name))
    return request


def parse_response(response: loss_service_pb2.EvaluateResponse) -> EvaluateResult:
    result = EvaluateResult(loss=wire.to_numpy(response.loss, field="loss", allow_empty=True),
                            non_finite=response.non_finite)
    if response.HasField("gradient"):
        result.gradient = wire.to_numpy(response.gradient, field="gradient", allow_empty=True)
    for term in response.terms:
        result.terms[term.label] = wire.to_numpy(term.value, field=term.label, allow_empty=True)
    return result


def parse_stream_item(item: loss_service_pb2.EvaluateStreamResponse) -> EvaluateResult:
    if item.HasField("error"):
        raise status_error(item.error)
    return parse_response(item.response)


def loss_info(description) -> LossInfo:
    """A LossDescription message as a LossInfo."""
    pb = loss_service_pb2
    return LossInfo(
        name=description.name, aliases=list(description.aliases), doc=description.doc,
        parameters=[LossParameter(p.name, p.type, json.loads(p.default_json) if p.default_json else None, p.doc)
                    for p in description.parameters],
        source=pb.LossDescription.Source.Name(description.source).removeprefix("SOURCE_").lower(),
        inputs=list(description.inputs), expression=description.expression)

