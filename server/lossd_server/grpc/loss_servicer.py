"""gRPC servicers: thin adapters that decode requests, call the core and
encode results. Validation and numerics live in the core modules."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import re
import threading
from typing import Iterator, Optional

import grpc
import numpy as np
from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc
from lossd_server.errors import FailedPrecondition, InvalidArgument, LossdError
from lossd_server.evaluation.admission import Admission
from lossd_server.evaluation.batching import Batcher
from lossd_server.evaluation.chunks import ChunkedSession
from lossd_server.grpc import parsing
from lossd_server.grpc.auth import Caller, Callers
from lossd_server.evaluation.evaluator import Evaluator
from lossd_server.losses.plan import Plan
from lossd_server.observability.logs import audited
from lossd_server.grpc.status import handle_errors, to_status

log = logging.getLogger(__name__)

_SOURCES = {
    "keras": loss_service_pb2.LossDescription.SOURCE_KERAS,
    "builtin": loss_service_pb2.LossDescription.SOURCE_BUILTIN,
    "plugin": loss_service_pb2.LossDescription.SOURCE_PLUGIN,
    "expression": loss_service_pb2.LossDescription.SOURCE_EXPRESSION,
}

_TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_RESERVED_TENSORS = {"y_true", "y_pred", "sample_weight"}


def describe(entry) -> loss_service_pb2.LossDescription:
    return loss_service_pb2.LossDescription(
        name=entry.name, aliases=entry.aliases, doc=entry.doc, source=_SOURCES[entry.source],
        inputs=entry.inputs, expression=entry.expression,
        parameters=[loss_service_pb2.LossParameter(name=p.name, type=p.type, default_json=json.dumps(p.default),
                                                   doc=p.doc) for p in entry.parameters])


class _PlanCache:
    """Serialized LossSpec -> Plan, so a repeated spec skips parsing and
    validation (a few tens of microseconds per request)."""

    def __init__(self, evaluator: Evaluator, size: int = 1024):
        self.evaluator = evaluator
        self.size = size
        self._plans: collections.OrderedDict[tuple, Plan] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: loss_pb2.LossSpec, tensor_names: tuple[str, ...] = ("y_true", "y_pred")) -> Plan:
        key = (spec.SerializeToString(deterministic=True), tensor_names)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = self.evaluator.planner.plan(wire.spec_to_dict(spec), tensor_names)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


_OWN_TENSORS = ("y_true", "y_pred", "sample_weight")


@dataclasses.dataclass
class Answer:
    """An evaluation's response: ``head`` (everything but its large tensors)
    and ``tensors`` (``loss``, ``gradient``) to be written into it, once, by
    whichever form the RPC answers with."""

    head: loss_service_pb2.EvaluateResponse
    tensors: dict

    def serialized(self, min_bytes: int = wire.LIFT_MIN_BYTES) -> bytes:
        """The EvaluateResponse's bytes, each tensor copied once
        (``wire.serialize_with_tensors``); below ``min_bytes`` of tensors,
        protobuf serializes it (faster when small)."""
        if sum(np.asarray(a).nbytes for a in self.tensors.values()) < min_bytes:
            return self.message().SerializeToString()
        return wire.serialize_with_tensors(self.head, self.tensors)

    def message(self) -> loss_service_pb2.EvaluateResponse:
        """The EvaluateResponse as a message (for EvaluateStream's items)."""
        for name, array in self.tensors.items():
            getattr(self.head, name).CopyFrom(wire.from_numpy(array, field=name))
        return self.head


@dataclasses.dataclass
class Received:
    """An EvaluateRequest as Evaluate receives it (``receive``): the message
    without its large tensors' contents, which are views of the received
    bytes beside it, or why the bytes are not such a message."""

    message: Optional[loss_service_pb2.EvaluateRequest]
    contents: dict
    error: Optional[wire.WireError] = None


def receive(raw: bytes) -> Received:
    """Evaluate's request deserializer: never raises, since gRPC would answer
    an exception here with INTERNAL; a malformed request is INVALID_ARGUMENT
    from the handler."""
    try:
        return Received(*wire.parse_lifted(raw, loss_service_pb2.EvaluateRequest, _OWN_TENSORS, "tensors"))
    except wire.WireError as error:
        return Received(None, {}, error)


def _serialize(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_loss_service(servicer: "LossServicer", server) -> None:
    """Adds LossService to ``server`` as the generated code would, except
    that every request is parsed inside its handler (``parsing.tolerant``),
    Evaluate's without copying its tensors (``receive``), and Evaluate's
    answer may be bytes already serialized (``Answer.serialized``)."""
    service, handlers = parsing.handlers_of(loss_service_pb2_grpc.add_LossServiceServicer_to_server, servicer,
                                            loss_service_pb2.DESCRIPTOR.services_by_name["LossService"])
    handlers["Evaluate"] = grpc.unary_unary_rpc_method_handler(
        servicer.Evaluate, request_deserializer=receive, response_serializer=_serialize)
    parsing.register(server, service, handlers)


class LossServicer(loss_service_pb2_grpc.LossServiceServicer):
    """Implements ``lossd.v1.LossService`` over an Evaluator."""

    def __init__(self, evaluator: Evaluator, *, max_elements: int, admission: Admission, metrics=None,
                 store=None, callers: Callers = Callers(None), shared_memory=None,
                 batcher: Optional[Batcher] = None):
        self.evaluator = evaluator
        # Evaluate and EvaluateStream items go through the batcher (micro-batching), when there is one.
        self.batcher = batcher
        self.callers = callers  # who calls: Callers.of(context)
        self.admission = admission  # what may run now: sizes, caller rates, bytes in flight
        self.registry = evaluator.registry
        self.max_elements = max_elements
        self.metrics = metrics
        self.store = store  # custom.ExpressionStore, or None where registration is off
        self.plans = _PlanCache(evaluator)
        if store is not None:
            # Plans that named an old definition must not be reused, whichever
            # replica registered, replaced or deleted it.
            store.on_change(self.plans.clear)
        self.shared_memory = shared_memory  # SharedMemoryRegions, or None where shared memory is off

    # -- helpers -------------------------------------------------------------

    def _metric_name(self, spec: loss_pb2.LossSpec) -> str:
        if spec.terms:
            return "composite"
        if spec.expression:
            return "expression"
        return self.registry.canonical(spec.name) or "other"

    def _decode(self, tensor, field: str, regions=None, content=None) -> np.ndarray:
        if regions is not None:  # the caller's shared-memory regions (RegionAccess)
            return regions.read(tensor, field=field, max_elements=self.max_elements, content=content)
        return wire.to_numpy(tensor, field=field, max_elements=self.max_elements, content=content)

    def _declared(self, fields) -> tuple[int, int]:
        """Elements of y_pred and bytes of all tensors, from the ``(field,
        dtype enum, shape)`` the request declares: nothing is decoded."""
        elements = nbytes = 0
        for field, dtype, shape in fields:
            count = wire.check_shape(shape, field=field, max_elements=self.max_elements)
            nbytes += count * wire.numpy_dtype(dtype, field=field).itemsize
            if field == "y_pred":
                elements = count
        return elements, nbytes

    def _usage(self, caller: Caller, elements: int) -> None:
        if self.metrics is not None:
            self.metrics.caller_usage(caller.name, requests=1, elements=elements)

    @contextlib.contextmanager
    def _metered(self, metric_name: str):
        """Times one evaluation (yields its metrics record, or None without
        metrics); a client error counts as ``invalid_argument``, anything else
        raised as ``error``."""
        if self.metrics is None:
            yield None
            return
        with self.metrics.time_evaluation(metric_name) as record:
            try:
                yield record
            except (LossdError, wire.WireError):
                record.outcome = "invalid_argument"
                raise

    def _evaluate(self, request: loss_service_pb2.EvaluateRequest, caller: Caller, context,
                  contents: Optional[dict] = None) -> "Answer":
        """Evaluates a request; ``contents`` holds the tensors' bytes that
        ``receive`` lifted out of it, by field name."""
        with self._metered(self._metric_name(request.loss)) as record:
            return self._evaluate_unmetered(request, record, caller, context, contents or {})

    def _evaluate_unmetered(self, request, record, caller: Caller, context, contents: dict) -> "Answer":
        if not request.HasField("loss"):
            raise InvalidArgument("loss is required. Expected a LossSpec with a name, an expression or "
                                  "terms. Received: none.", reason="BAD_LOSS_SPEC")
        for field in ("y_true", "y_pred"):
            if not request.HasField(field):
                raise InvalidArgument(f"{field} is required. Expected a Tensor. Received: none.",
                                      reason="BAD_TENSOR")
        plan = self.plans.get(request.loss, ("y_true", "y_pred", *sorted(request.tensors)))
        reduction = wire.reduction_name(request.reduction)
        for name in request.tensors:
            if not _TENSOR_NAME.match(name) or name in _RESERVED_TENSORS:
                raise InvalidArgument(
                    f"Invalid tensor name {name[:64]!r}. Expected an identifier other than "
                    f"{sorted(_RESERVED_TENSORS)}.", reason="BAD_TENSOR")
        declared = [("y_true", request.y_true), ("y_pred", request.y_pred),
                    *((f"tensors[{name}]", t) for name, t in request.tensors.items()),
                    *([("sample_weight", request.sample_weight)] if request.HasField("sample_weight") else [])]
        elements, nbytes = self._declared((field, t.dtype, t.shape) for field, t in declared)
        with self.admission.admit(caller.name, caller.limits.elements_per_second, elements=elements,
                                  nbytes=nbytes, wait_seconds=context.time_remaining()):
            self._usage(caller, elements)
            return self._evaluate_admitted(request, record, plan, reduction, caller, contents)

    def _evaluate_admitted(self, request, record, plan: Plan, reduction: str, caller: Caller,
                           contents: dict) -> "Answer":
        if self.batcher is None:
            return self._decode_and_evaluate(request, record, plan, reduction, caller, self.evaluator, contents)
        with self.batcher.in_flight():  # counted from now, so a batch may wait for it
            return self._decode_and_evaluate(request, record, plan, reduction, caller, self.batcher, contents)

    def _decode_and_evaluate(self, request, record, plan: Plan, reduction: str, caller: Caller,
                             evaluator, contents: dict) -> "Answer":
        regions = self.shared_memory.access(caller.name) if self.shared_memory is not None else None

        def decode(tensor, field: str) -> np.ndarray:
            return self._decode(tensor, field, regions, contents.get(field))

        tensors = {"y_true": decode(request.y_true, "y_true"), "y_pred": decode(request.y_pred, "y_pred")}
        for name, tensor in request.tensors.items():
            tensors[name] = decode(tensor, f"tensors[{name}]")
        sample_weight = decode(request.sample_weight, "sample_weight") if request.HasField("sample_weight") else None
        gradient_output = request.gradient_output if request.gradient and request.HasField("gradient_output") else None
        if gradient_output is not None:  # checked before the work
            wire.region_range(gradient_output, regions, field="gradient_output")
            regions.check_output(gradient_output, tensors["y_pred"].nbytes, field="gradient_output")
        if record is not None:
            record.elements = int(tensors["y_pred"].size)
            record.nbytes = sum(a.nbytes for a in tensors.values()) + (
                sample_weight.nbytes if sample_weight is not None else 0)
        result = evaluator.evaluate(plan, tensors, sample_weight=sample_weight,
                                    reduction=reduction, gradient=request.gradient)
        answer = Answer(loss_service_pb2.EvaluateResponse(non_finite=result.non_finite), {"loss": result.loss})
        if result.gradient is not None:
            if gradient_output is None:
                answer.tensors["gradient"] = result.gradient
            else:
                answer.head.gradient.CopyFrom(regions.write(result.gradient, gradient_output,
                                                            field="gradient_output"))
        for label, value, weight in result.terms:
            answer.head.terms.add(label=label, value=wire.from_numpy(value), weight=weight)
        for name, value in result.outputs.items():  # a loss's state: small, written into the head
            answer.head.outputs[name].CopyFrom(wire.from_numpy(value, field=f"outputs[{name}]"))
        return answer

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
        return self._evaluate(received.message, self.callers.of(context), context, received.contents).serialized()

    def EvaluateStream(self, request_iterator, context) -> Iterator[loss_service_pb2.EvaluateStreamResponse]:
        # Per-request failures travel in the response (a refusal with its
        # retry delay too); the stream goes on.
        caller = self.callers.of(context)
        for item in request_iterator:
            out = loss_service_pb2.EvaluateStreamResponse(request_id=item.request_id)
            try:
                out.response.CopyFrom(self._evaluate(item.request, caller, context).message())
            except Exception as exc:  # noqa: BLE001 - to_status logs unexpected ones
                out.error.CopyFrom(to_status(exc))
            yield out

    @handle_errors
    def EvaluateChunked(self, request_iterator, context):
        first = next(request_iterator, None)
        header = first.header if first is not None and first.WhichOneof("kind") == "header" else None
        # The whole stream is one evaluation in the metrics, refused or not.
        with self._metered(self._metric_name(header.loss) if header is not None else "other") as record:
            if header is None:
                raise InvalidArgument("EvaluateChunked starts with a header. Expected a ChunkedHeader first. "
                                      f"Received: {first.WhichOneof('kind') if first else 'nothing'}.",
                                      reason="BAD_CHUNK")
            yield from self._evaluate_chunked(header, request_iterator, record, self.callers.of(context), context)

    def _evaluate_chunked(self, header, request_iterator, record, caller: Caller, context):
        plan = self.plans.get(header.loss)
        infos: dict[str, tuple[str, tuple]] = {}
        enums: dict[str, int] = {}
        for name in ("y_true", "y_pred", "sample_weight"):
            if not header.HasField(name):
                continue
            info = getattr(header, name)
            dt = wire.numpy_dtype(info.dtype, field=name)
            shape = tuple(info.shape)
            wire.check_shape(shape, field=name, max_elements=self.max_elements)
            enums[name] = info.dtype
            infos[name] = (dt.name, shape)
        session = ChunkedSession(self.evaluator, plan, infos, reduction=wire.reduction_name(header.reduction),
                                 gradient=header.gradient)
        # The caller's rate is charged the whole request once, from the
        # header; the in-flight budget holds one chunk at a time, from its
        # declared rows, while it is decoded and evaluated.
        elements, _ = self._declared((name, enums[name], infos[name][1]) for name in enums)
        self.admission.charge(caller.name, caller.limits.elements_per_second, elements)
        self._usage(caller, elements)
        for message in request_iterator:
            if message.WhichOneof("kind") != "chunk":
                raise InvalidArgument("Only chunks may follow the header. Received a second header.",
                                      reason="BAD_CHUNK")
            chunk = message.chunk
            shapes = {name: (chunk.rows, *session.row_shape(name)) for name in enums}
            _, nbytes = self._declared((f"chunk {name}", enums[name], shapes[name]) for name in enums)
            with self.admission.hold(nbytes, wait_seconds=context.time_remaining(), what="This chunk"):
                result = self._feed(session, chunk, enums, shapes, record)
            yield loss_service_pb2.EvaluateChunkedResponse(chunk=result)
        done = session.finish()
        summary = loss_service_pb2.ChunkedSummary(
            gradient_scale=done.gradient_scale, non_finite=done.non_finite,
            y_true_gradient_coefficient=done.y_true_gradient_coefficient,
            y_pred_gradient_coefficient=done.y_pred_gradient_coefficient)
        if done.loss is not None:
            summary.loss.CopyFrom(wire.from_numpy(done.loss))
        yield loss_service_pb2.EvaluateChunkedResponse(summary=summary)

    def _feed(self, session: ChunkedSession, chunk, enums: dict[str, int], shapes: dict[str, tuple],
              record) -> loss_service_pb2.ChunkResult:
        arrays = {name: wire.from_bytes(getattr(chunk, name), enum, shapes[name], field=f"chunk {name}",
                                        max_elements=self.max_elements)
                  for name, enum in enums.items()}
        values, grad = session.feed(chunk.start, arrays)
        if record is not None:
            record.elements += int(arrays["y_pred"].size)
            record.nbytes += sum(a.nbytes for a in arrays.values())
        result = loss_service_pb2.ChunkResult(start=chunk.start)
        if values is not None:
            result.loss.CopyFrom(wire.from_numpy(values))
        if grad is not None:
            result.gradient.CopyFrom(wire.from_numpy(grad))
        return result
