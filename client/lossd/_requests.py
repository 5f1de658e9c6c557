"""Request building and response parsing shared by the sync and asyncio
clients: local checks that are cheap (dtype, shape, names), response
parsing, and the bookkeeping of an ``evaluate_many`` stream. Chunking lives
in ``_chunks``; the codec in ``lossd.wire``; the training requests in
``_training``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import grpc
import numpy as np

from lossd import wire
from lossd._errors import LossdError, as_lossd_error, client_error, status_error
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
        outputs: Named tensors the loss returns besides its value: a stateful
            loss's updated state, such as ``outputs["matrix"]`` of
            ``matrix_crossentropy`` (pass it back as ``tensors={"matrix": ...}``).
    """

    loss: np.ndarray
    gradient: Optional[np.ndarray] = None
    terms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    non_finite: bool = False
    outputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


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
        if name not in OWN_FIELDS:
            request.tensors[name].CopyFrom(wire.from_numpy(array, field=name))
    return request


OWN_FIELDS = ("y_true", "y_pred", "sample_weight")


def evaluate_request_bytes(spec: loss_pb2.LossSpec, arrays: Mapping[str, np.ndarray], reduction: str,
                           gradient: bool, min_bytes: int = wire.LIFT_MIN_BYTES) -> bytes:
    """``evaluate_request(...)`` serialized, each tensor's bytes copied once
    (``wire.serialize_with_tensors``): what ``Client.evaluate`` sends. Below
    ``min_bytes`` of tensors, protobuf serializes it (faster when small)."""
    if sum(array.nbytes for array in arrays.values()) < min_bytes:
        return evaluate_request(spec, arrays, reduction, gradient).SerializeToString()
    head = loss_service_pb2.EvaluateRequest(loss=spec, reduction=wire.reduction_enum(reduction), gradient=gradient)
    extra = {name: array for name, array in arrays.items() if name not in OWN_FIELDS}
    return wire.serialize_with_tensors(head, {name: arrays[name] for name in OWN_FIELDS if name in arrays},
                                       {"tensors": extra} if extra else {})


def parse_response(response: loss_service_pb2.EvaluateResponse, regions: Optional[wire.Regions] = None,
                   contents: Optional[Mapping[str, Any]] = None) -> EvaluateResult:
    """The result of an EvaluateResponse; a gradient the server wrote into
    one of ``regions`` is copied out of it (the region serves the next call).
    ``contents``: the tensors' bytes ``parse_response_bytes`` lifted out."""
    contents = contents or {}
    result = EvaluateResult(loss=wire.to_numpy(response.loss, field="loss", allow_empty=True,
                                               content=contents.get("loss")),
                            non_finite=response.non_finite)
    if response.HasField("gradient"):
        result.gradient = wire.to_numpy(response.gradient, field="gradient", allow_empty=True, regions=regions,
                                        content=contents.get("gradient"))
        if response.gradient.HasField("shared_memory"):
            result.gradient = result.gradient.copy()
    for term in response.terms:
        result.terms[term.label] = wire.to_numpy(term.value, field=term.label, allow_empty=True)
    for name, tensor in response.outputs.items():
        result.outputs[name] = wire.to_numpy(tensor, field=f"outputs[{name}]", allow_empty=True)
    return result


def parse_response_bytes(raw: bytes) -> EvaluateResult:
    """The result of a serialized EvaluateResponse, its loss and gradient
    read in place from ``raw`` (``wire.parse_lifted``), not copied out of a
    parsed message."""
    try:
        response, contents = wire.parse_lifted(raw, loss_service_pb2.EvaluateResponse, ("loss", "gradient"))
    except wire.WireError as exc:
        raise LossdError(grpc.StatusCode.INTERNAL, f"The server's answer could not be read: {exc}") from None
    return parse_response(response, contents=contents)


def parse_stream_item(item: loss_service_pb2.EvaluateStreamResponse) -> EvaluateResult:
    if item.HasField("error"):
        raise status_error(item.error)
    return parse_response(item.response)


#: How many ``evaluate_many`` requests may be sent and not yet answered. A few
#: keep the server busy across a round trip; the bound keeps what the client
#: holds flat however long the caller's iterable is.
STREAM_WINDOW = 64

# The arguments of ``evaluate`` an ``evaluate_many`` request may name, with
# their defaults (None: required).
_STREAM_ARGUMENTS: dict[str, Any] = {
    "loss": None, "y_true": None, "y_pred": None, "params": None, "sample_weight": None,
    "reduction": wire.DEFAULT_REDUCTION, "gradient": False, "tensors": None}


def stream_arguments(item: Any) -> dict[str, Any]:
    """An ``evaluate_many`` request (a dict of ``evaluate``'s arguments) with
    the defaults filled in; refuses unknown and missing arguments."""
    if not isinstance(item, Mapping):
        raise client_error(f"Each evaluate_many request is a dict of evaluate's arguments. "
                           f"Received: {type(item).__name__}.")
    unknown = sorted(map(str, set(item) - set(_STREAM_ARGUMENTS)))
    missing = [name for name in ("loss", "y_true", "y_pred") if item.get(name) is None]
    if unknown or missing:
        raise client_error(f"An evaluate_many request takes evaluate's arguments ({', '.join(_STREAM_ARGUMENTS)}), "
                           f"with loss, y_true and y_pred required. Received: "
                           + "; ".join(filter(None, [unknown and f"unknown {unknown}",
                                                     missing and f"missing {missing}"])) + ".")
    return {**_STREAM_ARGUMENTS, **item}


class EvaluationStream:
    """The bookkeeping of one ``evaluate_many`` call, shared by both clients;
    they add the waiting for a free place in the window and the I/O.

    ``messages()`` builds each request from the caller's iterable only when the
    stream asks for the next one. A request refused locally is kept as its
    LossdError, in its place. ``answer()`` takes one answer from the server
    and returns the results now due, in request order; ``finish()``, at the
    end of the stream, yields the rest.

    gRPC reads ``messages()`` on a thread or task of its own, where an
    exception would only cancel the call: one raised by the caller's iterable
    (or by building a request, beyond a refusal) ends the requests instead,
    and ``finish()`` raises it after the results before it.
    """

    def __init__(self, requests: Iterable[Any], build: Callable[[Any], loss_service_pb2.EvaluateRequest]):
        self._requests = requests
        self._build = build
        self._due: dict[int, EvaluateResult | LossdError] = {}  # done, not yet handed out
        self._next = 0  # the index of the next result to hand out
        self._failure: Optional[Exception] = None

    def messages(self) -> Iterator[loss_service_pb2.EvaluateStreamRequest]:
        try:
            for index, item in enumerate(self._requests):
                try:
                    request = self._build(item)
                except (LossdError, wire.WireError) as error:
                    self._due[index] = as_lossd_error(error)
                    continue
                yield loss_service_pb2.EvaluateStreamRequest(request=request, request_id=str(index))
        except Exception as error:  # noqa: BLE001 - raised to the caller by finish()
            self._failure = error

    def answer(self, item: loss_service_pb2.EvaluateStreamResponse) -> list[EvaluateResult | LossdError]:
        try:
            result: EvaluateResult | LossdError = parse_stream_item(item)
        except (LossdError, wire.WireError) as error:
            result = as_lossd_error(error)
        self._due[int(item.request_id)] = result
        return self._in_order()

    def finish(self) -> Iterator[EvaluateResult | LossdError]:
        yield from self._in_order()
        for index in sorted(self._due):  # refused after the last answer
            yield self._due.pop(index)
        if self._failure is not None:
            raise self._failure

    def _in_order(self) -> list[EvaluateResult | LossdError]:
        out = []
        while self._next in self._due:
            out.append(self._due.pop(self._next))
            self._next += 1
        return out


def register_loss_request(name: str, expression: str, params: Optional[Mapping[str, float]],
                          inputs: Optional[Iterable[str]], doc: str, replace: bool
                          ) -> loss_service_pb2.RegisterLossRequest:
    request = loss_service_pb2.RegisterLossRequest(name=name, expression=expression, inputs=list(inputs or ()),
                                                   doc=doc, replace=replace)
    struct = wire.dict_to_struct(params)
    if struct is not None:
        request.params.CopyFrom(struct)
    return request


def loss_infos(response: loss_service_pb2.ListLossesResponse) -> list[LossInfo]:
    return [loss_info(d) for d in response.losses]


def loss_info(description) -> LossInfo:
    """A LossDescription message as a LossInfo."""
    pb = loss_service_pb2
    return LossInfo(
        name=description.name, aliases=list(description.aliases), doc=description.doc,
        parameters=[LossParameter(p.name, p.type, json.loads(p.default_json) if p.default_json else None, p.doc)
                    for p in description.parameters],
        source=pb.LossDescription.Source.Name(description.source).removeprefix("SOURCE_").lower(),
        inputs=list(description.inputs), expression=description.expression)

