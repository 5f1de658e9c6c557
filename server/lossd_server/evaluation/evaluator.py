"""The loss evaluator: turns a plan (``lossd_server.losses.plan``) and numpy
tensors into the loss, its terms and its gradient, through a bounded cache of
compiled programs.

A compiled program is keyed by the plan,
the reduction, the gradient flag and each input's dtype and traced shape, so
the same loss on a new batch size reuses the compiled graph (see
``backend.signature_shape``). Nothing here imports gRPC.

Programs are traced in a small pool of compile threads, one trace per key
however many requests want it. A request whose program is cached never waits
for a compilation, a request waits for its own at most ``compile_timeout``
seconds, and at most ``max_pending_compiles`` requests wait for traces at
once: a flood of new programs is refused, not queued without end, and never
takes every RPC thread. The
cache is bounded by count and by the graph operations it holds, since a
program's memory grows with its graph (about 8 KB per operation measured
here: a 16-term composite of 11k operations kept 86 MB).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from concurrent import futures
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from lossd.wire import DEFAULT_REDUCTION, FLOAT_DTYPES, REDUCTION_NONE, check_reduction, dtype_name
from lossd_server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from lossd_server.evaluation import backend
from lossd_server.evaluation.admission import evaluation_caller
from lossd_server.losses import reductions
from lossd_server.losses.cost import Cost, CostLimits
from lossd_server.losses.expression_shapes import ShapeError, broadcast_shapes
from lossd_server.losses.plan import (ExpressionCompiler, Plan, Planner, Program, build_program,
                                      build_rows_program)
from lossd_server.losses.registry import LossRegistry, check_labels, values_shape
from lossd_server.observability import tracing

log = logging.getLogger(__name__)

XLA_MIN_ELEMENTS = 1 << 20
# Up to this many elements ``isfinite().all()`` is the faster NaN/Inf check;
# above it, min/max, which allocate nothing (see any_non_finite).
ISFINITE_MAX_ELEMENTS = 1 << 16


@dataclasses.dataclass
class Result:
    """What an evaluation returns."""

    loss: np.ndarray
    gradient: Optional[np.ndarray]
    terms: list[tuple[str, np.ndarray, float]]  # (label, value, weight) for composites
    non_finite: bool
    outputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # Plan.outputs, by name


class Evaluator:
    """Evaluates loss plans on numpy tensors with compiled, cached programs.

    Args:
        registry: Where loss names resolve.
        device: Where to run (``backend.select_device()``).
        cache_size: Most compiled programs kept; the least recently used goes.
        metrics: Optional ``lossd_server.observability.metrics.Metrics`` for cache and
            compilation counts.
        xla: ``"auto"``: small row-separable requests on CPU run as XLA
            executables of bucketed shapes (``buckets``), and tensors of at
            least ``XLA_MIN_ELEMENTS`` as XLA programs where their losses are
            in ``xla_losses``; ``"on"``: the buckets, and XLA for every other
            program too; ``"off"`` (the default here; the server's
            ``LOSSD_XLA`` defaults to ``auto``): no XLA. See docs/xla.md.
        expression_compiler: Turns an inline expression into a registry
            entry (``custom.inline_entry``); None refuses expressions.
        max_broadcast_elements: Most elements any value inside a loss may
            have, as its entry computes from the input shapes
            (``LossEntry.largest_intermediate``) before anything is traced;
            None is unlimited.
        max_composite_terms: Most terms of a composite (the planner's bound);
            None is unlimited.
        max_program_nodes: Most expression parts one plan may have, summed
            over its terms (the planner's bound); None is unlimited.
        compile_workers: Threads that trace programs.
        max_pending_compiles: Most requests waiting for a trace (of any
            program); one more is refused (``COMPILE_BUSY``).
        compile_timeout: Most seconds a request waits for its program's
            trace; past it the request is refused (``COMPILE_TIMEOUT``) and
            the trace goes on, so a retry finds the program cached.
        cache_max_ops: Most graph operations the cached programs may hold
            together; least recently used programs go first.
        cost_limits: The most one evaluation may cost, estimated from the
            shapes before anything is traced (``lossd_server.losses.cost``);
            None is unlimited.

    Attributes:
        planner: The ``Planner`` every front end turns specs into plans with.
    """

    def __init__(self, registry: LossRegistry, device: backend.Device, *, cache_size: int = 256,
                 metrics=None, xla: str = "off", xla_losses: Sequence[str] = (),
                 expression_compiler: Optional[ExpressionCompiler] = None,
                 max_broadcast_elements: Optional[int] = None, max_composite_terms: Optional[int] = None,
                 max_program_nodes: Optional[int] = None, compile_workers: int = 2,
                 max_pending_compiles: int = 4, compile_timeout: float = 30.0,
                 cache_max_ops: Optional[int] = None, cost_limits: Optional[CostLimits] = None):
        self.registry = registry
        self.planner = Planner(registry, expression_compiler, max_terms=max_composite_terms,
                               max_nodes=max_program_nodes)
        self.max_broadcast_elements = max_broadcast_elements
        self.cost_limits = cost_limits or CostLimits()
        self.device = device
        self.cache_size = cache_size
        self.metrics = metrics
        self.xla = xla
        self.xla_losses = frozenset(xla_losses)
        self.max_pending_compiles = max_pending_compiles
        self.compile_timeout = compile_timeout
        self.cache_max_ops = cache_max_ops
        self._cache: collections.OrderedDict[tuple, backend.Compiled] = collections.OrderedDict()
        self._cache_ops = 0  # graph operations of the cached programs
        self._pending: dict[tuple, futures.Future] = {}  # key -> its trace, queued or running
        self._waiting = 0  # requests waiting for a trace
        self._lock = threading.Lock()  # guards _cache, _cache_ops, _pending and compilations
        self._compile_pool = futures.ThreadPoolExecutor(max_workers=compile_workers, thread_name_prefix="compile")
        # XLA buckets compile on a thread of their own: no request waits for
        # them, and a request waiting for its own program never queues behind them.
        self._xla_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile-xla")
        self.compilations = 0
        # Padded programs XLA could not compile (by program, any bucket): never tried again.
        self._xla_failed: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        # Requests whose shape-only checks passed, by what those checks read
        # (see check): the plan (held, so a reused id is no match), the
        # reduction, the gradient flag and each input's name, dtype and shape.
        self._checked_shapes: dict[tuple, Plan] = {}
        self.buckets = None
        if xla != "off" and device.device_type == "CPU":
            # Imported here: buckets builds on batching's row rules, which import this module.
            from lossd_server.evaluation.buckets import Buckets

            self.buckets = Buckets(self)
        # admission.FairSlots sharing the max_pending_compiles waits between
        # callers (set by the server when it has tokens); None: first come,
        # first served, the one bound below.
        self.compile_slots = None

    def wait_compiled(self, timeout: float = 60.0) -> bool:
        """Waits until no program is being traced (at most ``timeout``
        seconds); whether none is. For warm-ups and tests."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._pending.values())
            if not pending:
                return True
            futures.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                with self._lock:
                    return not self._pending

    def warm_up(self, losses: Sequence[tuple[str, tuple[int, ...]]], dtype: str = "float32") -> list[str]:
        """Compiles each ``(loss name, y_pred shape)`` with and without its
        gradient through ``evaluate``, the path requests take, so requests of
        the same programs (same dtype, rank and last axis: any batch size)
        find them cached. Names the registry lacks are passed over. Returns
        the names compiled.

        Raises:
            InvalidArgument: a loss refused its example inputs (a bug here).
        """
        done = []
        for name, shape in losses:
            if name not in self.registry:
                continue
            plan = self.planner.plan({"name": name})
            # A one-hot-like row is valid input for regression and
            # classification losses alike.
            y = np.zeros(shape, dtype=dtype)
            y[..., 0] = 1
            for gradient in (False, True):
                self.evaluate(plan, {"y_true": y, "y_pred": y}, gradient=gradient)
            done.append(name)
        return done

    def close(self) -> None:
        """Stops the compile threads (traces in progress finish first)."""
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._xla_pool.shutdown(wait=False, cancel_futures=True)

    # -- evaluation ----------------------------------------------------------

    def evaluate(self, plan: Plan, tensors: Mapping[str, np.ndarray], *,
                 sample_weight: Optional[np.ndarray] = None, reduction: str = DEFAULT_REDUCTION,
                 gradient: bool = False, cancellation: Optional[backend.Cancellation] = None) -> Result:
        """Evaluates a plan on named tensors (``y_true``, ``y_pred`` and extras).

        ``cancellation`` (``new_cancellation``), once cancelled, stops the
        evaluation between two of its operations: the transport cancels it
        when its call ends, so a cancelled or timed-out call stops using the
        server.

        Raises:
            InvalidArgument: dtypes, shapes, labels or sample weights that do
                not fit the loss, or inputs TensorFlow refuses.
            ResourceExhausted: an evaluation above ``cost_limits``.
            DeadlineExceeded: ``cancellation`` was cancelled (``EVALUATION_CANCELLED``).
        """
        self.check(plan, tensors, sample_weight, reduction, gradient)
        return self.evaluate_checked(plan, tensors, sample_weight=sample_weight, reduction=reduction,
                                     gradient=gradient, cancellation=cancellation)

    @staticmethod
    def new_cancellation() -> backend.Cancellation:
        """A switch for ``evaluate(..., cancellation=)``: its ``cancel`` stops
        the evaluations given it (``backend.Cancellation``)."""
        return backend.Cancellation()

    def check(self, plan: Plan, tensors: Mapping[str, np.ndarray], sample_weight: Optional[np.ndarray],
              reduction: str, gradient: bool = True) -> None:
        """Everything ``evaluate`` checks before it compiles or runs anything
        (its cost as if with the gradient, unless ``gradient`` is False).

        Raises:
            InvalidArgument: as ``evaluate``.
            ResourceExhausted: an evaluation above ``cost_limits``.

        The checks that read only dtypes and shapes (reduction, dtypes,
        missing tensors, per-sample shapes, sample weights, intermediate
        sizes, cost) run once per kind of request: once they have passed for
        a plan, reduction, gradient flag and the inputs' names, dtypes and
        shapes, a request of the same kind runs only the checks that read
        values (class labels, a loss's own ``check_tensors``). Only passes
        are remembered, so a refused request is refused in full every time.
        """
        key = (id(plan), reduction, gradient,
               tuple([(name, array.dtype, array.shape) for name, array in tensors.items()]),
               None if sample_weight is None else (sample_weight.dtype, sample_weight.shape))
        if self._checked_shapes.get(key) is plan:
            for term in plan.terms:
                _check_term_values(term, tensors)
            return
        self._check_all(plan, tensors, sample_weight, reduction, gradient)
        checked = self._checked_shapes
        if len(checked) >= 4 * self.cache_size:  # bounded: a flood of new shapes starts over
            checked.clear()
        checked[key] = plan

    def _check_all(self, plan: Plan, tensors: Mapping[str, np.ndarray], sample_weight: Optional[np.ndarray],
                   reduction: str, gradient: bool) -> None:
        check_reduction(reduction)
        y_pred = tensors.get("y_pred")
        if y_pred is None:
            raise InvalidArgument("y_pred is required.", reason="BAD_TENSOR")
        compute_dtype = dtype_name(y_pred.dtype)
        if compute_dtype not in FLOAT_DTYPES:
            raise InvalidArgument(
                f"y_pred: expected a floating dtype ({', '.join(FLOAT_DTYPES)}); the loss is "
                f"computed in y_pred's dtype. Received: {compute_dtype}.", reason="UNSUPPORTED_DTYPE")
        missing = sorted(plan.tensor_names - set(tensors))
        if missing:
            raise InvalidArgument(
                f"The loss reads tensor {missing[0]!r}, which the request does not carry. "
                f"Expected tensors: {sorted(plan.tensor_names)}. Received: {sorted(tensors)}.",
                reason="MISSING_TENSOR")
        self._check_inputs(plan, tensors, sample_weight, reduction)
        self._check_intermediates(plan, tensors, sample_weight, reduction)
        self.check_cost(plan, {name: array.shape for name, array in tensors.items()}, y_pred.dtype.itemsize,
                        gradient)

    def check_cost(self, plan: Plan, shapes: Mapping[str, tuple], itemsize: int, gradient: bool) -> Cost:
        """The cost of evaluating ``plan`` on tensors of ``shapes`` in a
        dtype of ``itemsize`` bytes (``cost.estimate``), refused above
        ``cost_limits`` (ResourceExhausted, ``COST_TOO_HIGH`` or
        ``MEMORY_TOO_HIGH``): from the shapes, so EvaluateChunked checks
        its chunks before they arrive."""
        return self.cost_limits.check(plan, shapes, itemsize, gradient)

    def evaluate_checked(self, plan: Plan, tensors: Mapping[str, np.ndarray], *,
                         sample_weight: Optional[np.ndarray] = None, reduction: str = DEFAULT_REDUCTION,
                         gradient: bool = False, cancellation: Optional[backend.Cancellation] = None) -> Result:
        """``evaluate`` for inputs that passed ``check``."""
        if self.buckets is not None:  # XLA, where its bucket's executable is ready
            with tracing.span("lossd.xla_bucket"):
                bucketed = self.buckets.evaluate(plan, tensors, sample_weight, reduction, gradient)
            if bucketed is not None:
                return bucketed
        y_pred = tensors["y_pred"]
        compute_dtype = dtype_name(y_pred.dtype)
        names = sorted(plan.tensor_names | {"y_pred"} | (plan.optional_tensor_names & tensors.keys()))
        arrays = [tensors[n] for n in names]
        specs = [backend.InputSpec(n, dtype_name(a.dtype), backend.signature_shape(a.shape))
                 for n, a in zip(names, arrays)]
        if sample_weight is not None:
            names.append("sample_weight")
            arrays.append(sample_weight)
            specs.append(backend.InputSpec("sample_weight", dtype_name(sample_weight.dtype),
                                           backend.signature_shape(sample_weight.shape)))
        xla = self._use_xla(plan, y_pred.size)
        key = (plan.key, reduction, gradient, xla, tuple(specs))
        try:
            # Keras checks shapes while the program is traced, TensorFlow while it
            # runs: a refusal from either is about this request's inputs.
            with tracing.span("lossd.compile"):  # a cache lookup, or the wait for a compilation
                compiled = self._compiled(key, plan, specs, lambda: build_program(plan, reduction, compute_dtype),
                                          sample_weight is not None, gradient, xla)
            with tracing.span("lossd.tensorflow"):
                total, terms, grad, outputs = compiled(arrays, cancellation)
        except backend.CANCELLED:
            raise DeadlineExceeded(
                f"Loss `{plan.metric_name}` was stopped before it finished: its call was cancelled or passed its "
                "deadline. Expected a call that waits for its answer. Received: a call that ended first.",
                reason="EVALUATION_CANCELLED", metadata={"loss": plan.metric_name}) from None
        except backend.INPUT_ERRORS as exc:
            raise _refused(exc, plan) from exc
        except backend.MEMORY_ERRORS:
            raise ResourceExhausted(
                f"Loss `{plan.metric_name}` ran out of memory on {self.device.name} with these inputs "
                f"(y_pred.shape={list(y_pred.shape)}). Expected inputs that fit in the memory free now: send "
                "smaller batches, or retry later.", reason="OUT_OF_MEMORY",
                metadata={"loss": plan.metric_name}) from None
        non_finite = any_non_finite([total, *terms, grad, *outputs.values(), *arrays])
        term_values = [(t.label, v, t.weight) for t, v in zip(plan.terms, terms)] if plan.composite else []
        return Result(total, grad, term_values, non_finite, outputs)

    def _check_inputs(self, plan: Plan, tensors: Mapping[str, np.ndarray],
                      sample_weight: Optional[np.ndarray], reduction: str) -> None:
        for name, array in tensors.items():
            if array.dtype.kind not in "biuf" and dtype_name(array.dtype) != "bfloat16":
                raise InvalidArgument(f"{name}: expected a numeric dtype. Received: {array.dtype.name}.",
                                      reason="UNSUPPORTED_DTYPE")
        shapes = []
        for term in plan.terms:
            if len(term.inputs) >= 2:  # (y_true, y_pred) first, then optional state
                true_name, pred_name = term.inputs[:2]
                shape = values_shape(term.entry, term.params, tensors[true_name].shape,
                                     tensors[pred_name].shape)
            else:
                shape = None
            _check_term_values(term, tensors)
            shapes.append(shape)
            term_reduction = term.reduction or reduction
            if sample_weight is not None and shape is not None:
                reductions.check_sample_weight(sample_weight.shape, shape, term.entry.name)
            if term_reduction == REDUCTION_NONE and plan.composite and shape is not None:
                known = [s for s, t in zip(shapes, plan.terms) if s is not None]
                if known and known[0] != shape:
                    raise InvalidArgument(
                        "Composite terms with reduction `none` must give per-sample values of one "
                        f"shape. Received: {list(known[0])} and {list(shape)} ({term.label}).",
                        reason="SHAPE_MISMATCH")
        if sample_weight is not None and sample_weight.dtype.kind not in "biuf":
            raise InvalidArgument(
                f"sample_weight: expected a numeric dtype. Received: {sample_weight.dtype.name}.",
                reason="UNSUPPORTED_DTYPE")

    def _check_intermediates(self, plan: Plan, tensors: Mapping[str, np.ndarray],
                             sample_weight: Optional[np.ndarray], reduction: str) -> None:
        """Refuses inputs on which the loss would compute a value larger than
        ``max_broadcast_elements``, or that an expression cannot work on
        (operands that do not broadcast, an axis out of range), from the
        shapes alone: before tracing, so nothing is allocated.

        Counted: each term's largest value (``(N, 1) - (1, N)`` inside an
        expression), its per-sample values times ``sample_weight`` (values
        (1, N) weighted by (N, 1)) and, for a composite, the sum of its
        terms' values (per-sample terms of shapes (N, 1) and (1, N))."""
        limit = self.max_broadcast_elements
        outputs: list[Optional[tuple]] = []
        for term in plan.terms:
            loss = term.label if plan.composite else plan.metric_name
            shapes = {own: tuple(tensors[given].shape) for own, given in zip(term.entry.inputs, term.inputs)
                      if given in tensors}
            try:
                analysis = term.entry.value_shapes(shapes)
            except ShapeError as exc:
                raise InvalidArgument(f"Loss `{loss}` cannot be evaluated on these inputs: {exc}",
                                      reason=exc.reason, metadata={"loss": loss}) from None
            largest, out = (analysis.largest, analysis.shape) if analysis is not None else (0, None)
            if out is None and len(term.inputs) >= 2:
                out = values_shape(term.entry, term.params, tensors[term.inputs[0]].shape,
                                   tensors[term.inputs[1]].shape)
            if out is not None and sample_weight is not None:
                out = reductions.weighted_shape(out, tuple(sample_weight.shape)) or out
                largest = max(largest, math.prod(out))
            received = [f"{given}.shape={list(tensors[given].shape)}" for given in term.inputs if given in tensors]
            if sample_weight is not None:
                received.append(f"sample_weight.shape={list(sample_weight.shape)}")
            _check_size(loss, largest, limit, received)
            outputs.append(out if (term.reduction or reduction) == REDUCTION_NONE else ())
        if plan.composite and all(o is not None for o in outputs):
            total = broadcast_shapes(outputs)
            if total is not None:
                _check_size(plan.metric_name, math.prod(total), limit,
                            [f"{t.label}: {list(o)}" for t, o in zip(plan.terms, outputs)])

    def rows_program(self, plan: Plan, family: str, row_params: Sequence[str], specs: Sequence[backend.InputSpec],
                     dtype: str, gradient: bool, *, padded: bool = False) -> Optional[backend.Compiled]:
        """The compiled program that evaluates many requests of one program
        family at once (``plan.build_rows_program``), from the same cache and
        compile threads as every other program.

        Never waits: while the program is not compiled it returns None, having
        started its trace on a compile thread unless ``max_pending_compiles``
        traces are already under way (then a later batch starts it). The
        caller evaluates the requests one by one meanwhile, so a batch never
        holds its requests' RPC threads for a compilation.

        ``padded``: the XLA program of the bucket whose static shapes
        ``specs`` are (``buckets``), compiled by XLA on a compile thread of
        its own (``backend.Compiled`` runs it once there), so that requests
        waiting for their programs never queue behind it. Where XLA fails on it,
        the program is remembered and None returned from then on, for any
        bucket, without another try.
        """
        specs = tuple(specs)
        key = ("rows", family, tuple(row_params), gradient, padded, specs)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
            elif padded and _program(key) in self._xla_failed:
                return None
            elif key not in self._pending and len(self._pending) < self.max_pending_compiles:
                has_sw = any(s.name == "sample_weight" for s in specs)
                pool = self._xla_pool if padded else self._compile_pool
                self._pending[key] = pool.submit(
                    self._compile, key, plan, specs,
                    lambda: build_rows_program(plan, dtype, row_params, padded=padded), has_sw, gradient, padded)
        self._count_lookup("hit" if compiled is not None else "miss")
        return compiled

    def _compiled(self, key, plan: Plan, specs, build: Callable[[], Program], has_sw: bool,
                  gradient: bool, xla: bool) -> backend.Compiled:
        slots = self.compile_slots
        if slots is None:
            return self._compiled_waiting(key, plan, specs, build, has_sw, gradient, xla, bounded=True)
        with self._lock:
            cached = key in self._cache  # a cached program takes no compile slot
        if cached:
            return self._compiled_waiting(key, plan, specs, build, has_sw, gradient, xla, bounded=False)
        caller = evaluation_caller()
        slots.acquire(caller)  # COMPILE_BUSY past the caller's share of the waits
        try:
            return self._compiled_waiting(key, plan, specs, build, has_sw, gradient, xla, bounded=False)
        finally:
            slots.release(caller)

    def _compiled_waiting(self, key, plan: Plan, specs, build: Callable[[], Program], has_sw: bool,
                          gradient: bool, xla: bool, *, bounded: bool) -> backend.Compiled:
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
            else:
                # Each waiting request holds one of the server's RPC threads:
                # bounding them keeps threads free for compiled programs and health.
                if bounded and self._waiting >= self.max_pending_compiles:
                    raise ResourceExhausted(
                        f"{self._waiting} requests are waiting for loss programs to compile. Expected at most "
                        f"{self.max_pending_compiles} at once (the server's max_pending_compiles); retry in a "
                        "few seconds. Programs already compiled are served meanwhile.",
                        reason="COMPILE_BUSY", metadata={"limit": str(self.max_pending_compiles)})
                pending = self._pending.get(key)
                if pending is None:
                    pending = self._compile_pool.submit(self._compile, key, plan, specs, build, has_sw, gradient, xla)
                    self._pending[key] = pending
                self._waiting += 1
        self._count_lookup("hit" if compiled is not None else "miss")
        if compiled is not None:
            return compiled
        try:
            return pending.result(timeout=self.compile_timeout)
        except futures.TimeoutError:
            raise ResourceExhausted(
                f"Loss `{plan.metric_name}` did not compile within {self.compile_timeout:g} s (the server's "
                "compile_timeout_seconds). Its compilation goes on: retry later, or send a smaller loss.",
                reason="COMPILE_TIMEOUT", metadata={"loss": plan.metric_name}) from None
        finally:
            with self._lock:
                self._waiting -= 1

    def _compile(self, key, plan: Plan, specs, build: Callable[[], Program], has_sw: bool, gradient: bool,
                 xla: bool) -> Optional[backend.Compiled]:
        """Traces one program on a compile thread and caches it (a trace that
        raises caches nothing: the same key traces again next time, except a
        padded XLA program, which is remembered as failed)."""
        try:
            try:
                compiled = backend.Compiled(
                    build(), specs, has_sample_weight=has_sw, gradient=gradient,
                    device=self.device, jit_compile=xla, on_trace=lambda: self._on_trace(plan),
                    outputs=plan.outputs)
            except Exception as exc:  # noqa: BLE001 - an op XLA lacks, or a loss it cannot trace
                if key[0] != "rows" or not key[4]:
                    raise
                with self._lock:
                    self._xla_failed[_program(key)] = None
                    while len(self._xla_failed) > self.cache_size:
                        self._xla_failed.popitem(last=False)
                log.debug("XLA cannot compile %s (%s); its requests take the graph path",
                          plan.metric_name, backend.error_text(exc))
                return None
            with self._lock:
                self._cache[key] = compiled
                self._cache_ops += compiled.ops
                while len(self._cache) > 1 and (
                        len(self._cache) > self.cache_size
                        or self.cache_max_ops is not None and self._cache_ops > self.cache_max_ops):
                    _, evicted = self._cache.popitem(last=False)
                    self._cache_ops -= evicted.ops
                entries = len(self._cache)
        finally:
            with self._lock:
                self._pending.pop(key, None)
        if self.metrics is not None:
            self.metrics.set_cache_entries(entries)
        return compiled

    def _use_xla(self, plan: Plan, elements: int) -> bool:
        """XLA compiles once per concrete input shape (the traced graph is
        shape-polymorphic, XLA's kernels are not), so ``auto`` uses it only
        for large tensors, where one compilation pays for itself at once,
        and only for the losses measured faster with it (bench/xla.py)."""
        if self.xla == "on":
            return True
        if self.xla == "off":
            return False
        return elements >= XLA_MIN_ELEMENTS and all(t.entry.name in self.xla_losses for t in plan.terms)

    def _count_lookup(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_cache_lookup(result == "hit")

    def _on_trace(self, plan: Plan) -> None:
        with self._lock:  # traces run on several compile threads
            self.compilations += 1
        log.debug("compiling %s", plan.metric_name)
        if self.metrics is not None:
            self.metrics.observe_compilation(plan.metric_name)


def _program(key: tuple) -> tuple:
    """A padded rows program's key without its bucket (the first axis of
    each input): what an XLA failure is remembered by."""
    return key[:5] + (tuple((s.name, s.dtype, s.shape[1:]) for s in key[5]),)


def any_non_finite(arrays) -> bool:
    """Whether any floating array holds NaN or Inf.

    For large arrays, min and max propagate NaN and expose Inf without the
    temporary boolean array of ``isfinite().all()``: measured here at 3 ms
    for 1e7 float32 elements against 5 ms, and against 7 ms for the same
    check inside the TensorFlow graph (which also cost 170 µs on a small
    request). For small arrays ``isfinite().all()`` is one call instead of
    two (3 µs against 8 µs at 640 elements). A scalar (a reduced loss) is
    one ``math.isfinite``: 0.04 µs against 1.4 µs. (A finite sum would
    prove a small array finite in 0.9 µs against 1.3, but numpy warns when
    a sum overflows or adds Inf to -Inf.)
    """
    for a in arrays:
        if a is None or a.size == 0 or a.dtype.kind != "f" and dtype_name(a.dtype) != "bfloat16":
            continue
        if a.ndim == 0:
            if not math.isfinite(a):
                return True
        elif a.size <= ISFINITE_MAX_ELEMENTS:
            if not np.isfinite(a).all():
                return True
        elif not (np.isfinite(a.min()) and np.isfinite(a.max())):
            return True
    return False


def _check_term_values(term, tensors: Mapping[str, np.ndarray]) -> None:
    """The checks of one plan term that read the tensors' values: class
    labels in range, and the loss's own ``check_tensors``."""
    if len(term.inputs) >= 2:  # (y_true, y_pred) first, then optional state
        true_name, pred_name = term.inputs[:2]
        check_labels(term.entry, term.params, tensors[true_name], tensors[pred_name].shape)
    term.entry.check_tensors(term.params, {own: tensors[given] for own, given in
                                           zip(term.entry.inputs, term.inputs) if given in tensors})


def _check_size(loss: str, elements: int, limit: Optional[int], received: Sequence[str]) -> None:
    if limit is not None and elements > limit:
        raise InvalidArgument(
            f"Loss `{loss}` would compute a value of {elements} elements on these inputs (the tensors "
            f"broadcast against each other). Expected at most {limit} elements (the server's "
            f"max_broadcast_elements). Received: {', '.join(received)}.",
            reason="BROADCAST_TOO_LARGE", metadata={"loss": loss, "limit": str(limit), "elements": str(elements)})


def _refused(exc: Exception, plan: Plan) -> InvalidArgument:
    """What TensorFlow or Keras raise on bad input, as InvalidArgument (first line, bounded)."""
    text = backend.error_text(exc)[:300]
    return InvalidArgument(f"Loss `{plan.metric_name}` cannot be evaluated on these inputs: {text}",
                           reason="EVALUATION_FAILED", metadata={"loss": plan.metric_name})
