"""The evaluation service: the one owner of the Evaluate use case, under
every front end (lossd.v1 gRPC today, the Open Inference Protocol's gRPC and
REST endpoints next). A front end decodes its wire format into an
``EvaluationRequest``, calls ``EvaluationService.evaluate`` and encodes the
``Result`` (or the ``LossdError`` it raises) back; it calls nothing below
this module. ``docs/evaluation.md`` walks a request through it.

What a request goes through here, in order, each step once:

1. **Plan**: the spec (a ``LossSpec`` message or its dict form) and the
   names of the tensors the request carries become a ``Plan``
   (``Planner.plan``), cached by the spec's bytes, so a repeated spec skips
   parsing and validation. Extra tensors' names are checked first: an
   identifier other than ``y_true``, ``y_pred`` and ``sample_weight``.
2. **Declared sizes**: every tensor's declared dtype and shape are checked
   against ``max_elements`` and summed, without decoding anything.
3. **Admission** (``Admission.admit``): the request's size, its caller's
   rate, then its bytes held in the in-flight budget until the answer.
4. **Decode**: only now does each tensor's ``decode`` run (the front end's
   ``numpy.frombuffer`` view, or a shared-memory read).
5. **Evaluate**: through the ``Batcher`` when batching is on (counted in
   flight from before the decode, so a batch may wait for it), else the
   ``Evaluator``; both check the tensors against the plan first.
6. **Metering**: one point per request: the evaluation's count, duration,
   elements and bytes, and the caller's usage.

This module imports neither gRPC nor TensorFlow.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import re
import threading
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from lossd import wire
from lossd.v1 import loss_pb2
from lossd_server.callers import ANONYMOUS, Caller
from lossd_server.errors import InvalidArgument, LossdError
from lossd_server.evaluation.admission import Admission
from lossd_server.evaluation.batching import Batcher
from lossd_server.evaluation.chunks import ChunkedSession
from lossd_server.evaluation.evaluator import Evaluator, Result
from lossd_server.losses.plan import Plan
from lossd_server.observability.metrics import EvaluationRecord
from lossd_server.observability import tracing

__all__ = ["Incoming", "EvaluationRequest", "EvaluationService", "Result"]

_TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
RESERVED_TENSORS = frozenset({"y_true", "y_pred", "sample_weight"})
_REQUIRED = ("y_true", "y_pred")

LossLike = Union[loss_pb2.LossSpec, Mapping[str, Any]]


class Incoming(NamedTuple):
    """One tensor of a request as it arrived: its declared ``dtype`` (a
    ``lossd.wire`` dtype enum) and ``shape``, and ``decode``, which returns
    the array (checking that its bytes match the declaration). The service
    calls ``decode`` only after admission, so nothing is read or allocated
    for a request that is refused."""

    dtype: int
    shape: Sequence[int]
    decode: Callable[[], np.ndarray]

    @classmethod
    def of(cls, array) -> "Incoming":
        """An already decoded array (tests, in-process callers)."""
        array = np.asarray(array)
        return cls(wire.dtype_enum(array.dtype), array.shape, lambda: array)


@dataclasses.dataclass
class EvaluationRequest:
    """What any front end asks of ``EvaluationService.evaluate``.

    Attributes:
        loss: The loss: a ``LossSpec`` message or its dict form
            (``{"name": "huber", "params": {"delta": 2.0}}``, an
            ``expression``, or ``terms``), as ``lossd.wire.spec_to_dict``.
        tensors: Every input tensor by name: ``y_true`` and ``y_pred``
            (required), and the extra tensors an expression or stateful loss
            reads (identifiers, not ``sample_weight``).
        sample_weight: Optional per-sample weights.
        reduction: A ``lossd.wire.REDUCTIONS`` name, or a lossd.v1
            ``Reduction`` enum value (checked here, so a bad one is metered
            as the request's refusal).
        gradient: Whether to return the gradient with respect to y_pred.
    """

    loss: Optional[LossLike]
    tensors: Mapping[str, Incoming]
    sample_weight: Optional[Incoming] = None
    reduction: Union[str, int] = wire.DEFAULT_REDUCTION
    gradient: bool = False


class _PlanCache:
    """Spec -> Plan, so a repeated spec skips parsing and validation (a few
    tens of microseconds per request). Cleared when a stored loss changes."""

    def __init__(self, evaluator: Evaluator, size: int = 1024):
        self.evaluator = evaluator
        self.size = size
        self._plans: collections.OrderedDict[tuple, Plan] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: LossLike, tensor_names: tuple[str, ...] = _REQUIRED) -> Plan:
        if isinstance(spec, loss_pb2.LossSpec):
            key = (spec.SerializeToString(deterministic=True), tensor_names)
        else:
            key = (json.dumps(spec, sort_keys=True, default=repr), tensor_names)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        as_dict = wire.spec_to_dict(spec) if isinstance(spec, loss_pb2.LossSpec) else dict(spec)
        plan = self.evaluator.planner.plan(as_dict, tensor_names)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


class EvaluationService:
    """Evaluates loss requests for every front end: plan cache, tensor-name
    rules, admission, batching, evaluation and metering (module docstring).

    Args:
        evaluator: The compiled-program evaluator (and its ``planner``).
        admission: What may run now: sizes, caller rates, bytes in flight.
        max_elements: Most elements one tensor may declare.
        metrics: Optional ``Metrics``: evaluations and callers' usage.
        batcher: Optional ``Batcher``; off (or None) evaluates one by one.
        store: Optional ``custom.ExpressionStore``: plans naming a stored loss
            are dropped when any replica changes one.
        heavy: Optional ``heavy.HeavyLane``: evaluations it claims (their
            declared cost above its threshold) run in its worker processes.
    """

    def __init__(self, evaluator: Evaluator, admission: Admission, *, max_elements: int, metrics=None,
                 batcher: Optional[Batcher] = None, store=None, heavy=None):
        self.evaluator = evaluator
        self.admission = admission
        self.max_elements = max_elements
        self.metrics = metrics
        self.batcher = batcher if batcher is not None and batcher.enabled else None
        self.registry = evaluator.registry
        self.plans = _PlanCache(evaluator)
        self.heavy = heavy
        if store is not None:
            store.on_change(self.plans.clear)

    # -- the use case ----------------------------------------------------------

    def evaluate(self, request: EvaluationRequest, caller: Caller = ANONYMOUS, *,
                 wait_seconds: Optional[float] = None, cancellation=None) -> Result:
        """Evaluates one request.

        Args:
            request: The loss and its tensors, not yet decoded.
            caller: Who asks (their name for metrics, their rate limit).
            wait_seconds: The most this request may wait for admission (the
                call's remaining deadline); None waits at most the server's
                ``max_queue_seconds``.
            cancellation: A ``new_cancellation()`` the front end cancels when
                its call ends: the evaluation then stops between two of its
                operations (``Evaluator.evaluate``).

        Returns:
            The ``Result``: loss, gradient, composite terms, the NaN/Inf flag
            and a stateful loss's outputs, as numpy arrays.

        Raises:
            LossdError: ``InvalidArgument`` for a request that cannot be
                evaluated (with an ErrorInfo reason), ``ResourceExhausted``
                for one that may not run now (with a retry delay).
            lossd.wire.WireError: a tensor whose bytes do not match its
                declaration.
        """
        metrics = self.metrics
        if metrics is None:
            return self._evaluate(request, caller, wait_seconds, None, cancellation)
        metered = [0, 0, None]  # y_pred elements and bytes decoded; elements charged once admitted
        outcome = "ok"
        start = time.perf_counter()
        try:
            return self._evaluate(request, caller, wait_seconds, metered, cancellation)
        except (LossdError, wire.WireError):
            outcome = "invalid_argument"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            metrics.observe_evaluation(self.metric_name(request.loss), outcome, time.perf_counter() - start,
                                       metered[0], metered[1])
            if metered[2] is not None:
                metrics.caller_usage(caller.name, requests=1, elements=metered[2])

    def _evaluate(self, request: EvaluationRequest, caller: Caller, wait_seconds: Optional[float],
                  metered: Optional[list], cancellation=None) -> Result:
        if request.loss is None:
            raise InvalidArgument("loss is required. Expected a LossSpec with a name, an expression or "
                                  "terms. Received: none.", reason="BAD_LOSS_SPEC")
        tensors = request.tensors
        for name in _REQUIRED:
            if name not in tensors:
                raise InvalidArgument(f"{name} is required. Expected a Tensor. Received: none.",
                                      reason="BAD_TENSOR")
        # Two tensors are y_true and y_pred (checked above): no extras to sort.
        extras = () if len(tensors) == 2 else tuple(sorted(name for name in tensors if name not in _REQUIRED))
        for name in extras:  # before planning: a plan is cached by its tensor names
            if not _TENSOR_NAME.match(name) or name in RESERVED_TENSORS:
                raise InvalidArgument(
                    f"Invalid tensor name {name[:64]!r}. Expected an identifier other than "
                    f"{sorted(RESERVED_TENSORS)}.", reason="BAD_TENSOR")
        plan = self.plans.get(request.loss, _REQUIRED + extras)
        reduction = request.reduction
        reduction = wire.reduction_name(reduction) if isinstance(reduction, int) else wire.check_reduction(reduction)
        # Declared sizes, before anything is decoded.
        max_elements = self.max_elements
        nbytes = 0
        elements = 0
        for name, incoming in tensors.items():
            field = name if name in _REQUIRED else f"tensors[{name}]"
            count = wire.check_shape(incoming.shape, field=field, max_elements=max_elements)
            nbytes += count * wire.numpy_dtype(incoming.dtype, field=field).itemsize
            if name == "y_pred":
                elements = count
        sample_weight = request.sample_weight
        if sample_weight is not None:
            count = wire.check_shape(sample_weight.shape, field="sample_weight", max_elements=max_elements)
            nbytes += count * wire.numpy_dtype(sample_weight.dtype, field="sample_weight").itemsize
        with tracing.span("lossd.admission"):  # the wait for room, when traced
            held = self.admission.admit(caller.name, caller.limits.elements_per_second, elements=elements,
                                        nbytes=nbytes, wait_seconds=wait_seconds)
        with held:
            if metered is not None:
                metered[2] = elements
            heavy = self.heavy
            if heavy is not None and heavy.claims(plan, tensors, request.gradient):  # in a process that can be killed
                arrays, weights = self._decode(request, metered)
                return heavy.evaluate(plan, arrays, sample_weight=weights, reduction=reduction,
                                      gradient=request.gradient, cancellation=cancellation, wait_seconds=wait_seconds)
            batcher = self.batcher
            if batcher is None:
                arrays, weights = self._decode(request, metered)
                return self.evaluator.evaluate(plan, arrays, sample_weight=weights, reduction=reduction,
                                               gradient=request.gradient, cancellation=cancellation)
            with batcher.in_flight():  # counted from before the decode, so a batch may wait for it
                arrays, weights = self._decode(request, metered)
                return batcher.evaluate_in_flight(plan, arrays, sample_weight=weights, reduction=reduction,
                                                  gradient=request.gradient, cancellation=cancellation)

    @staticmethod
    def _decode(request: EvaluationRequest, metered: Optional[list]):
        with tracing.span("lossd.decode"):
            arrays = {name: incoming.decode() for name, incoming in request.tensors.items()}
            weights = request.sample_weight.decode() if request.sample_weight is not None else None
        if metered is not None:
            metered[0] = int(arrays["y_pred"].size)
            metered[1] = sum(a.nbytes for a in arrays.values()) + (weights.nbytes if weights is not None else 0)
        return arrays, weights

    # -- chunked evaluations ---------------------------------------------------

    @contextlib.contextmanager
    def metered(self, loss: Optional[LossLike]) -> Iterator[Optional[EvaluationRecord]]:
        """Meters one long evaluation (a whole EvaluateChunked call) as one
        evaluation, refused or not: yields the record ``chunked`` fills in,
        or None without metrics."""
        if self.metrics is None:
            yield None
            return
        with self.metrics.time_evaluation(self.metric_name(loss)) as record:
            try:
                yield record
            except (LossdError, wire.WireError):
                record.outcome = "invalid_argument"
                raise

    def chunked(self, loss: LossLike, declared: Mapping[str, tuple[int, tuple]], *, reduction: str,
                gradient: bool, caller: Caller = ANONYMOUS,
                record: Optional[EvaluationRecord] = None, cancellation=None) -> "ChunkedEvaluation":
        """Starts an evaluation whose tensors arrive as row slices.

        Args:
            loss: As ``EvaluationRequest.loss``.
            declared: ``y_true``, ``y_pred`` and optionally ``sample_weight``,
                each as ``(wire dtype enum, whole shape)``.
            reduction, gradient, caller, cancellation: As for ``evaluate``.

        The caller's rate is charged the whole request once, here; the
        in-flight budget holds one chunk at a time (``ChunkedEvaluation.feed``).
        """
        plan = self.plans.get(loss)
        infos: dict[str, tuple[str, tuple]] = {}
        elements = 0
        for name, (dtype, shape) in declared.items():
            dt = wire.numpy_dtype(dtype, field=name)
            count = wire.check_shape(shape, field=name, max_elements=self.max_elements)
            infos[name] = (dt.name, tuple(shape))
            if name == "y_pred":
                elements = count
        session = ChunkedSession(self.evaluator, plan, infos, reduction=wire.check_reduction(reduction),
                                 gradient=gradient, cancellation=cancellation)
        self.admission.charge(caller.name, caller.limits.elements_per_second, elements)
        if self.metrics is not None:
            self.metrics.caller_usage(caller.name, requests=1, elements=elements)
        return ChunkedEvaluation(self, session, {name: dtype for name, (dtype, _) in declared.items()}, record)

    # -- helpers ---------------------------------------------------------------

    def new_cancellation(self):
        """A switch for ``evaluate`` and ``chunked`` (``Evaluator.new_cancellation``)."""
        return self.evaluator.new_cancellation()

    def metric_name(self, loss: Optional[LossLike]) -> str:
        """The ``loss`` label of a request's evaluation metrics: the loss's
        canonical name, ``composite``, ``expression``, or ``other``."""
        if loss is None:
            return "other"
        if isinstance(loss, loss_pb2.LossSpec):
            terms, expression, name = loss.terms, loss.expression, loss.name
        else:
            terms, expression, name = loss.get("terms"), loss.get("expression"), loss.get("name")
        if terms:
            return "composite"
        if expression:
            return "expression"
        return (self.registry.canonical(name) if isinstance(name, str) else None) or "other"


class ChunkedEvaluation:
    """One EvaluateChunked call, as ``EvaluationService.chunked`` started it:
    ``feed`` each slice of rows, then ``finish``."""

    def __init__(self, service: EvaluationService, session: ChunkedSession, enums: Mapping[str, int],
                 record: Optional[EvaluationRecord] = None):
        self.service = service
        self.session = session
        self.enums = dict(enums)
        self.record = record  # the call's metrics record (``EvaluationService.metered``), or None

    def feed(self, start: int, rows: int, contents: Mapping[str, bytes], *,
             wait_seconds: Optional[float] = None):
        """Decodes and evaluates one slice of ``rows`` rows from ``start``,
        holding its declared bytes of the in-flight budget meanwhile; returns
        ``ChunkedSession.feed``'s ``(values, gradient rows)``."""
        service = self.service
        shapes = {name: (rows, *self.session.row_shape(name)) for name in self.enums}
        nbytes = 0
        for name, enum in self.enums.items():
            field = f"chunk {name}"
            count = wire.check_shape(shapes[name], field=field, max_elements=service.max_elements)
            nbytes += count * wire.numpy_dtype(enum, field=field).itemsize
        with service.admission.hold(nbytes, wait_seconds=wait_seconds, what="This chunk"):
            arrays = {name: wire.from_bytes(contents[name], enum, shapes[name], field=f"chunk {name}",
                                            max_elements=service.max_elements)
                      for name, enum in self.enums.items()}
            out = self.session.feed(start, arrays)
        if self.record is not None:
            self.record.elements += int(arrays["y_pred"].size)
            self.record.nbytes += sum(a.nbytes for a in arrays.values())
        return out

    def finish(self):
        """The whole request's ``chunks.Summary``."""
        return self.session.finish()
