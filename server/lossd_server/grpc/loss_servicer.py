"""The ``lossd.v1.LossService`` servicer: it decodes requests, calls the
evaluation service (``lossd_server.evaluation.service``) and encodes its
results. Plans, tensor names, admission, batching and metering live there."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator, Optional

import grpc
import numpy as np
from lossd import wire
from lossd.v1 import loss_service_pb2, loss_service_pb2_grpc
from lossd_server.errors import FailedPrecondition, InvalidArgument
from lossd_server.evaluation.evaluator import Result
from lossd_server.evaluation.service import EvaluationRequest, EvaluationService, Incoming
from lossd_server.grpc import parsing
from lossd_server.grpc.auth import Caller, Callers
from lossd_server.observability import tracing
from lossd_server.observability.logs import audited
from lossd_server.grpc.status import handle_errors, to_status

log = logging.getLogger(__name__)

_SOURCES = {
    "keras": loss_service_pb2.LossDescription.SOURCE_KERAS,
    "builtin": loss_service_pb2.LossDescription.SOURCE_BUILTIN,
    "plugin": loss_service_pb2.LossDescription.SOURCE_PLUGIN,
    "expression": loss_service_pb2.LossDescription.SOURCE_EXPRESSION,
}


def describe(entry) -> loss_service_pb2.LossDescription:
    return loss_service_pb2.LossDescription(
        name=entry.name, aliases=entry.aliases, doc=entry.doc, source=_SOURCES[entry.source],
        inputs=entry.inputs, expression=entry.expression,
        parameters=[loss_service_pb2.LossParameter(name=p.name, type=p.type, default_json=json.dumps(p.default),
                                                   doc=p.doc) for p in entry.parameters])


_OWN_TENSORS = ("y_true", "y_pred", "sample_weight")


@dataclasses.dataclass
class Answer:
    """An evaluation's response: ``head`` (everything but its large tensors)
    and ``tensors`` (``loss``, ``gradient``) to be written into it, once, by
    whichever form the RPC answers with."""

    head: loss_service_pb2.EvaluateResponse
    tensors: dict

    def serialized(self, min_bytes: int = wire.LIFT_MIN_BYTES, within=None) -> bytes:
        """The EvaluateResponse's bytes, each tensor copied once
        (``wire.serialize_with_tensors``); below ``min_bytes`` of tensors,
        protobuf serializes it (faster when small). ``within=(outer,
        field)``: ``outer``'s bytes with the response as its ``field``
        (an EvaluateStreamResponse), the same one copy."""
        if sum(np.asarray(a).nbytes for a in self.tensors.values()) < min_bytes:
            message = self.message()
            if within is None:
                return message.SerializeToString()
            outer, field = within
            getattr(outer, field).CopyFrom(message)
            return outer.SerializeToString()
        return wire.serialize_with_tensors(self.head, self.tensors, within=within)

    def message(self) -> loss_service_pb2.EvaluateResponse:
        """The EvaluateResponse as a message (small answers, tests)."""
        for name, array in self.tensors.items():
            getattr(self.head, name).CopyFrom(wire.from_numpy(array, field=name))
        return self.head


@dataclasses.dataclass
class Received:
    """An EvaluateRequest as Evaluate receives it (``receive``): the message
    without its large tensors' contents, which are views of the received
    bytes beside it, or why the bytes are not such a message. On a stream,
    ``outer`` is the EvaluateStreamRequest around it (without it)."""

    message: Optional[loss_service_pb2.EvaluateRequest]
    contents: dict
    error: Optional[wire.WireError] = None
    outer: Optional[loss_service_pb2.EvaluateStreamRequest] = None


def receive(raw: bytes) -> Received:
    """Evaluate's request deserializer: never raises, since gRPC would answer
    an exception here with INTERNAL; a malformed request is INVALID_ARGUMENT
    from the handler."""
    try:
        return Received(*wire.parse_lifted(raw, loss_service_pb2.EvaluateRequest, _OWN_TENSORS, "tensors"))
    except wire.WireError as error:
        return Received(None, {}, error)


def receive_stream_item(raw: bytes) -> Received:
    """EvaluateStream's request deserializer: ``receive`` for the request
    inside each EvaluateStreamRequest (its tensors' contents lifted, not
    copied). Never raises: a malformed item is answered with its error, and
    the stream goes on."""
    try:
        outer, message, contents = wire.parse_lifted_within(
            raw, loss_service_pb2.EvaluateStreamRequest, "request", loss_service_pb2.EvaluateRequest,
            _OWN_TENSORS, "tensors")
    except wire.WireError as error:
        return Received(None, {}, error)
    return Received(message, contents, None, outer)


def add_loss_service(servicer: "LossServicer", server) -> None:
    """Adds LossService to ``server`` as the generated code would, except
    that every request is parsed inside its handler (``parsing.tolerant``),
    Evaluate's and EvaluateStream's without copying their tensors
    (``receive``, ``receive_stream_item``), and their answers may be bytes
    already serialized (``Answer.serialized``)."""
    service, handlers = parsing.handlers_of(loss_service_pb2_grpc.add_LossServiceServicer_to_server, servicer,
                                            loss_service_pb2.DESCRIPTOR.services_by_name["LossService"])
    handlers["Evaluate"] = grpc.unary_unary_rpc_method_handler(
        servicer.Evaluate, request_deserializer=receive, response_serializer=parsing.serialized)
    handlers["EvaluateStream"] = grpc.stream_stream_rpc_method_handler(
        servicer.EvaluateStream, request_deserializer=receive_stream_item, response_serializer=parsing.serialized)
    parsing.register(server, service, handlers)


class LossServicer(loss_service_pb2_grpc.LossServiceServicer):
    """Implements ``lossd.v1.LossService`` over an ``EvaluationService``.

    Args:
        service: Evaluates (plans, admission, batching, metering).
        callers: Who calls (``Callers.of(context)``).
        store: ``custom.ExpressionStore``, or None where registration is off.
        shared_memory: ``SharedMemoryRegions``, or None where shared memory is off.
    """

    def __init__(self, service: EvaluationService, *, callers: Callers = Callers(None), store=None,
                 shared_memory=None):
        self.service = service
        self.registry = service.registry
        self.callers = callers
        self.store = store
        self.shared_memory = shared_memory

    # -- decoding and encoding -------------------------------------------------

    def _request(self, message: loss_service_pb2.EvaluateRequest, contents: dict, regions
                 ) -> EvaluationRequest:
        """The service's request: each tensor's declared dtype and shape, and
        how to decode it (a view of the received bytes, or the caller's
        shared memory) once admitted."""
        max_elements = self.service.max_elements
        gradient_output = message.gradient_output if message.gradient and message.HasField("gradient_output") \
            else None

        def incoming(tensor, field: str, check_output: bool = False) -> Incoming:
            content = contents.get(field)
            shape = wire.int_shape(tensor.shape)  # read once: declared sizes and the decode both check it
            if regions is not None:
                def decode():
                    array = regions.read(tensor, field=field, max_elements=max_elements, content=content)
                    if check_output:  # the gradient's destination, checked before the work
                        wire.region_range(gradient_output, regions, field="gradient_output")
                        regions.check_output(gradient_output, array.nbytes, field="gradient_output")
                    return array
            elif check_output:
                def decode():
                    array = wire.to_numpy(tensor, field=field, max_elements=max_elements, content=content,
                                          shape=shape)
                    wire.region_range(gradient_output, None, field="gradient_output")  # refuses: no shared memory
                    return array
            else:
                def decode():
                    return wire.to_numpy(tensor, field=field, max_elements=max_elements, content=content,
                                         shape=shape)
            return Incoming(tensor.dtype, shape, decode)

        tensors = {}
        if message.HasField("y_true"):
            tensors["y_true"] = incoming(message.y_true, "y_true")
        if message.HasField("y_pred"):
            tensors["y_pred"] = incoming(message.y_pred, "y_pred", gradient_output is not None)
        for name, tensor in message.tensors.items():
            tensors[name] = incoming(tensor, f"tensors[{name}]")
        return EvaluationRequest(
            loss=message.loss if message.HasField("loss") else None, tensors=tensors,
            sample_weight=incoming(message.sample_weight, "sample_weight") if message.HasField("sample_weight")
            else None,
            reduction=message.reduction, gradient=message.gradient)  # the service checks the enum

    def _cancellation(self, context):
        """A switch that stops this call's evaluations when the call ends
        (cancelled, past its deadline, or done), so an abandoned call stops
        using the server (``EvaluationService.evaluate``)."""
        cancellation = self.service.new_cancellation()
        if not context.add_callback(cancellation.cancel):  # the call is over already
            cancellation.cancel()
        return cancellation

    def _evaluate(self, message: loss_service_pb2.EvaluateRequest, caller: Caller, context,
                  contents: Optional[dict] = None, cancellation=None) -> Answer:
        """Evaluates one EvaluateRequest; ``contents`` holds the tensors'
        bytes that ``receive`` lifted out of it, by field name;
        ``cancellation`` is the stream's (a unary call gets its own)."""
        regions = self.shared_memory.access(caller.name) if self.shared_memory is not None else None
        request = self._request(message, contents or {}, regions)
        result = self.service.evaluate(request, caller, wait_seconds=context.time_remaining(),
                                       cancellation=cancellation or self._cancellation(context))
        return _answer(result, message, regions)

    # -- RPCs ----------------------------------------------------------------

    @handle_errors
    def ListLosses(self, request, context):
        return loss_service_pb2.ListLossesResponse(losses=[describe(e) for e in self.registry.entries()])

    @handle_errors
    def RegisterLoss(self, request, context):
        with audited(self.callers.of(context).name, "register_loss", f"losses/{request.name[:200]}"):
            if self.store is None:
                raise FailedPrecondition("This server does not store losses.", reason="REGISTRATION_DISABLED")
            params = wire.struct_to_dict(request.params) if request.HasField("params") else {}
            entry = self.store.register(request.name, request.expression, params=params,
                                        inputs=list(request.inputs), doc=request.doc, replace=request.replace)
        log.info("registered loss %r: %s", entry.name, entry.expression)
        return describe(entry)

    @handle_errors
    def DeleteLoss(self, request, context):
        with audited(self.callers.of(context).name, "delete_loss", f"losses/{request.name[:200]}"):
            if self.store is None:
                raise FailedPrecondition("This server does not store losses.", reason="REGISTRATION_DISABLED")
            self.store.delete(request.name)
        log.info("deleted loss %r", request.name)
        return loss_service_pb2.DeleteLossResponse()

    @handle_errors
    def Evaluate(self, request, context) -> bytes:
        # add_loss_service registers Evaluate with `receive` (the tensors'
        # contents lifted out of the message, not copied) and a serializer
        # that passes bytes through (each tensor copied once, here).
        received = request if isinstance(request, Received) else Received(request, {})
        if received.error is not None:
            raise received.error
        answer = self._evaluate(received.message, self.callers.of(context), context, received.contents)
        with tracing.span("lossd.encode"):
            return answer.serialized()

    def EvaluateStream(self, request_iterator, context) -> Iterator[bytes]:
        # Per-request failures travel in the response (a refusal with its
        # retry delay too); the stream goes on. Items arrive as Evaluate's
        # do (`receive_stream_item`) and leave as its bytes do.
        caller = self.callers.of(context)
        cancellation = self._cancellation(context)
        for item in request_iterator:
            received = item if isinstance(item, Received) else _received_item(item)
            out = loss_service_pb2.EvaluateStreamResponse(
                request_id=received.outer.request_id if received.outer is not None else "")
            try:
                if received.error is not None:  # bytes that are no message: that item's error, with no id
                    raise received.error
                message = received.message if received.message is not None else loss_service_pb2.EvaluateRequest()
                answer = self._evaluate(message, caller, context, received.contents, cancellation)
            except Exception as exc:  # noqa: BLE001 - to_status logs unexpected ones
                out.error.CopyFrom(to_status(exc))
                yield out.SerializeToString()
                continue
            yield answer.serialized(within=(out, "response"))

    @handle_errors
    def EvaluateChunked(self, request_iterator, context):
        first = next(request_iterator, None)
        header = first.header if first is not None and first.WhichOneof("kind") == "header" else None
        # The whole stream is one evaluation in the metrics, refused or not.
        with self.service.metered(header.loss if header is not None else None) as record:
            if header is None:
                raise InvalidArgument("EvaluateChunked starts with a header. Expected a ChunkedHeader first. "
                                      f"Received: {first.WhichOneof('kind') if first else 'nothing'}.",
                                      reason="BAD_CHUNK")
            yield from self._evaluate_chunked(header, request_iterator, record, self.callers.of(context), context)

    def _evaluate_chunked(self, header, request_iterator, record, caller: Caller, context):
        declared = {name: (getattr(header, name).dtype, tuple(getattr(header, name).shape))
                    for name in ("y_true", "y_pred", "sample_weight") if header.HasField(name)}
        evaluation = self.service.chunked(header.loss, declared, reduction=wire.reduction_name(header.reduction),
                                          gradient=header.gradient, caller=caller, record=record,
                                          cancellation=self._cancellation(context))
        for message in request_iterator:
            if message.WhichOneof("kind") != "chunk":
                raise InvalidArgument("Only chunks may follow the header. Received a second header.",
                                      reason="BAD_CHUNK")
            chunk = message.chunk
            values, grad = evaluation.feed(chunk.start, chunk.rows,
                                           {name: getattr(chunk, name) for name in declared},
                                           wait_seconds=context.time_remaining())
            result = loss_service_pb2.ChunkResult(start=chunk.start)
            if values is not None:
                result.loss.CopyFrom(wire.from_numpy(values))
            if grad is not None:
                result.gradient.CopyFrom(wire.from_numpy(grad))
            yield loss_service_pb2.EvaluateChunkedResponse(chunk=result)
        done = evaluation.finish()
        summary = loss_service_pb2.ChunkedSummary(
            gradient_scale=done.gradient_scale, non_finite=done.non_finite,
            y_true_gradient_coefficient=done.y_true_gradient_coefficient,
            y_pred_gradient_coefficient=done.y_pred_gradient_coefficient)
        if done.loss is not None:
            summary.loss.CopyFrom(wire.from_numpy(done.loss))
        yield loss_service_pb2.EvaluateChunkedResponse(summary=summary)


def _received_item(item: loss_service_pb2.EvaluateStreamRequest) -> Received:
    """A stream item parsed by protobuf (a servicer called without
    ``add_loss_service``), as ``receive_stream_item`` would give it."""
    return Received(item.request if item.HasField("request") else None, {}, None,
                    loss_service_pb2.EvaluateStreamRequest(request_id=item.request_id))


def _answer(result: Result, message: loss_service_pb2.EvaluateRequest, regions) -> Answer:
    """The EvaluateResponse of a result: its large tensors kept apart for
    ``Answer.serialized``, a gradient written to shared memory where the
    request asked for it."""
    answer = Answer(loss_service_pb2.EvaluateResponse(non_finite=result.non_finite), {"loss": result.loss})
    if result.gradient is not None:
        if message.HasField("gradient_output"):
            answer.head.gradient.CopyFrom(regions.write(result.gradient, message.gradient_output,
                                                        field="gradient_output"))
        else:
            answer.tensors["gradient"] = result.gradient
    for label, value, weight in result.terms:
        answer.head.terms.add(label=label, value=wire.from_numpy(value), weight=weight)
    for name, value in result.outputs.items():  # a loss's state: small, written into the head
        answer.head.outputs[name].CopyFrom(wire.from_numpy(value, field=f"outputs[{name}]"))
    return answer
