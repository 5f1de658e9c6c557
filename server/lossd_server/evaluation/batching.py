"""Ragged micro-batching: concurrent evaluations of one program family share
one compiled call.

Requests whose plans differ at most in the values of their loss's
``row_parameters`` (Huber's ``delta``, the focal losses' ``gamma`` and
``alpha``), with the same dtypes and the same shapes past the first axis,
form a family. While several requests are in flight, the first of a family
to arrive waits up to ``max_delay`` for others; their rows are concatenated
along axis 0 and evaluated by one rows program (``plan.build_rows_program``):
per-sample values computed once, then each request's own weights, own
reduction, own gradient rows and own error. A request alone in the server
never waits: it is evaluated at once, by the one-piece path.

Only row-separable requests are batched, as ``reductions.row_structure``
decides (each row's values depend on that row alone); not composites, not
the hinge losses (their label conversion looks at the whole batch), not a
loss with ``ignore_class`` (its mask divides by a count over the batch),
not ``ctc``,
not tensors beyond y_true and y_pred, and only float32 and float64. Anything
else goes through ``Evaluator.evaluate`` unchanged.

What is exact: for losses made of arithmetic alone (MSE, MAE, Huber...),
per-sample values (reduction ``none``) and gradient rows equal the one-piece
answer bit for bit (the same Keras ops on the same elements); TensorFlow's
vectorised log, exp and pow round an element by its position in the tensor
(a SIMD lane or the scalar tail), so other losses agree to rtol 1e-6. A
reduced loss sums the request's values in float64, where Keras sums them in
the loss's dtype, so it agrees to rtol 1e-6 of the sum of their magnitudes;
so do the gradients of ``mean_with_sample_weight`` with weights, whose
divisor is the weights' sum (tests/server/evaluation/test_batching.py checks all of
this against the one-piece path). If the batched call fails, every request of the batch is
evaluated on its own, so each gets its own answer or its own error; so it
is while a family's batched program compiles (in the background: a batch
never waits for a compilation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Iterator, Mapping, Optional

import numpy as np

from lossd.wire import DEFAULT_REDUCTION, REDUCTION_NONE, dtype_name
from lossd_server.errors import LossdError
from lossd_server.evaluation import backend
from lossd_server.evaluation.evaluator import Evaluator, Result, any_non_finite
from lossd_server.losses import reductions
from lossd_server.losses.plan import (DEFAULT_INPUTS, ROW_DIVISOR_FIXED, ROW_DIVISOR_ROWS, ROW_PARAMETER_PREFIX,
                                      ROW_SEGMENTS, Plan, row_family)
from lossd_server.losses.registry import ROWS, SHAPES_CTC, SHAPES_SAME, SHAPES_SPARSE, align_ranks, values_shape
from lossd_server.observability import tracing

log = logging.getLogger(__name__)

BATCHED_DTYPES = ("float32", "float64")


@dataclasses.dataclass(eq=False)
class _Item:
    plan: Plan
    tensors: Mapping[str, np.ndarray]
    sample_weight: Optional[np.ndarray]
    reduction: str
    gradient: bool
    key: tuple
    row_params: tuple[str, ...]
    rows: int
    elements: int
    values_shape: Optional[tuple]  # the per-sample values' shape, where known
    weights: Optional[np.ndarray] = None  # sample_weight broadcast to values_shape, in the loss's dtype
    arrived: float = 0.0
    result: Optional[Result] = None
    error: Optional[BaseException] = None

    def like(self, tensors: Mapping[str, np.ndarray], sample_weight: Optional[np.ndarray], rows: int,
             values_shape: Optional[tuple]) -> "_Item":
        """A request of this one's kind (plan, reduction, gradient, program
        key and row parameters) with other inputs: built directly, since
        ``dataclasses.replace`` costs microseconds per request."""
        return _Item(self.plan, tensors, sample_weight, self.reduction, self.gradient, self.key, self.row_params,
                     rows, int(tensors["y_pred"].size), values_shape)


@dataclasses.dataclass(eq=False)
class _Batch:
    key: tuple
    items: list = dataclasses.field(default_factory=list)
    elements: int = 0
    closed: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class Batcher:
    """Evaluates like ``Evaluator.evaluate``, batching concurrent requests.

    Args:
        evaluator: The evaluator whose checks, cache and programs are used.
        max_delay_us: Longest a request waits for company, in microseconds,
            and only while other requests are in flight; 0 turns batching off.
        max_elements: Most y_pred elements in one batch; a batch that reaches
            it runs at once, and a larger request runs on its own.
        max_requests: Most requests in one batch.
        metrics: Optional ``Metrics`` for batch sizes and waits.
    """

    def __init__(self, evaluator: Evaluator, *, max_delay_us: int, max_elements: int, max_requests: int,
                 metrics=None):
        self.evaluator = evaluator
        self.enabled = max_delay_us > 0 and max_requests > 1
        self.max_delay = max_delay_us / 1e6
        self.max_elements = max_elements
        self.max_requests = max_requests
        self.metrics = metrics
        self._cond = threading.Condition(threading.Lock())
        self._open: dict[tuple, _Batch] = {}
        self._active = 0   # requests in flight: arriving (in_flight) or inside evaluate
        self._queued = 0   # requests in open batches: they cannot join another
        self._leading = 0  # leaders waiting for company: whom a change must wake
        self.batches = 0   # batched calls of two or more requests (for tests)

    # -- counting ---------------------------------------------------------------

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Counts a request from its arrival (before its tensors are decoded),
        so a batch waits for requests that are about to join it. Inside it,
        evaluate with ``evaluate_in_flight``: the one entry, counted once."""
        if not self.enabled:
            yield
            return
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._leading:
                    self._cond.notify_all()

    # -- evaluation ---------------------------------------------------------------

    def evaluate(self, plan: Plan, tensors: Mapping[str, np.ndarray], *,
                 sample_weight: Optional[np.ndarray] = None, reduction: str = DEFAULT_REDUCTION,
                 gradient: bool = False, cancellation=None) -> Result:
        """``Evaluator.evaluate``, batched with concurrent requests of its
        family: ``evaluate_in_flight`` counted in flight for its duration."""
        with self.in_flight():
            return self.evaluate_in_flight(plan, tensors, sample_weight=sample_weight, reduction=reduction,
                                           gradient=gradient, cancellation=cancellation)

    def evaluate_in_flight(self, plan: Plan, tensors: Mapping[str, np.ndarray], *,
                           sample_weight: Optional[np.ndarray] = None, reduction: str = DEFAULT_REDUCTION,
                           gradient: bool = False, cancellation=None) -> Result:
        """``evaluate`` for a request already counted by ``in_flight`` (the
        evaluation service counts it from before its decode). ``cancellation``
        (``Evaluator.evaluate``'s) stops the request where it runs alone; a
        batch, which answers other requests too, runs to its end."""
        if not self.enabled:
            return self.evaluator.evaluate(plan, tensors, sample_weight=sample_weight, reduction=reduction,
                                           gradient=gradient, cancellation=cancellation)
        # Read without the lock: a stale answer only decides whether this
        # request looks for company, and a batch with none closes at once.
        if self._active <= 1 and not self._open:  # an idle server: no one to wait for
            return self.evaluator.evaluate(plan, tensors, sample_weight=sample_weight, reduction=reduction,
                                           gradient=gradient, cancellation=cancellation)
        self.evaluator.check(plan, tensors, sample_weight, reduction, gradient)  # its own error, before joining
        item = self._item(plan, tensors, sample_weight, reduction, gradient)
        if item is None:
            return self.evaluator.evaluate_checked(plan, tensors, sample_weight=sample_weight,
                                                   reduction=reduction, gradient=gradient, cancellation=cancellation)
        with tracing.span("lossd.batch", leader=False) as span:
            batch, leader = self._join(item)
            if leader:
                self._lead(batch)
            else:
                batch.done.wait()
            if span is not None:
                span.set_attribute("leader", leader)
        if item.error is not None:
            raise item.error
        return item.result

    def _item(self, plan: Plan, tensors: Mapping[str, np.ndarray], sample_weight: Optional[np.ndarray],
              reduction: str, gradient: bool) -> Optional[_Item]:
        """The request as a batch member, or None where it is not batched."""
        return row_item(plan, tensors, sample_weight, reduction, gradient, self.max_elements)

    # -- forming batches -----------------------------------------------------------

    def _join(self, item: _Item) -> tuple[_Batch, bool]:
        with self._cond:
            item.arrived = time.perf_counter()
            batch = self._open.get(item.key)
            if batch is not None and batch.elements + item.elements > self.max_elements:
                self._close(batch)
                batch = None
            leader = batch is None
            if leader:
                batch = _Batch(item.key)
                self._open[item.key] = batch
            batch.items.append(item)
            batch.elements += item.elements
            self._queued += 1
            if len(batch.items) >= self.max_requests or batch.elements >= self.max_elements:
                self._close(batch)
            if self._leading:
                self._cond.notify_all()
        return batch, leader

    def _lead(self, batch: _Batch) -> None:
        """Waits for company while others are in flight, then runs the batch."""
        deadline = batch.items[0].arrived + self.max_delay
        with self._cond:
            self._leading += 1
            while not batch.closed:
                remaining = deadline - time.perf_counter()
                # Requests in flight that may still join: not waiting in an open batch.
                if remaining <= 0 or self._active - self._queued <= 0:
                    break
                self._cond.wait(remaining)
            self._leading -= 1
            self._close(batch)
        try:
            self._run(batch.items)
        finally:
            batch.done.set()

    def _close(self, batch: _Batch) -> None:
        """Stops a batch taking requests (called with the lock held)."""
        if batch.closed:
            return
        batch.closed = True
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        self._queued -= len(batch.items)
        if self.metrics is not None:
            now = time.perf_counter()
            self.metrics.observe_batch(len(batch.items), batch.elements, [now - i.arrived for i in batch.items])

    # -- running --------------------------------------------------------------------

    def _run(self, items: list[_Item]) -> None:
        if len(items) > 1:
            try:
                if self._run_together(items):
                    with self._cond:
                        self.batches += 1
                    return
            except Exception as exc:  # noqa: BLE001 - each request then gets its own answer or error
                # Expected: an input TensorFlow refuses, memory, a busy compile pool.
                expected = (LossdError, *backend.INPUT_ERRORS, *backend.MEMORY_ERRORS)
                if isinstance(exc, expected):
                    log.debug("batched evaluation of %d requests failed (%s); evaluating them one by one",
                              len(items), exc)
                else:
                    log.warning("batched evaluation of %d requests failed; evaluating them one by one",
                                len(items), exc_info=True)
        for item in items:
            try:
                item.result = self.evaluator.evaluate_checked(
                    item.plan, item.tensors, sample_weight=item.sample_weight, reduction=item.reduction,
                    gradient=item.gradient)
            except Exception as exc:  # noqa: BLE001 - raised in the request's own thread
                item.error = exc

    def _run_together(self, items: list[_Item]) -> bool:
        """Evaluates the items in one call; False while its program compiles."""
        first = items[0]
        buckets = self.evaluator.buckets
        if buckets is not None and buckets.run(items):  # XLA, once its executable is ready
            return True
        arrays = rows_arrays(items)
        names = sorted(arrays)
        specs = [backend.InputSpec(n, dtype_name(arrays[n].dtype), backend.signature_shape(arrays[n].shape))
                 for n in names]
        compiled = self.evaluator.rows_program(first.plan, first.key[0], first.row_params, specs,
                                               first.key[2], first.gradient)
        if compiled is None:
            return False
        _, (reduced, values), grad, _ = compiled([arrays[n] for n in names])
        split_results(items, reduced, values, grad)
        return True


class RowsBuffers:
    """The input arrays of one padded rows call (``rows_arrays(..., into=)``),
    kept to be written again in place by the next call of the same bucket:
    a small request then allocates nothing (``np.full``, ``np.repeat`` and
    the padded copies of y_true and y_pred cost more than the writes).

    ``arrays`` by name, ``ordered`` the same in sorted name order (what the
    compiled program takes), and what the last fill left in them (its rows
    and requests), so that a fill writes only what differs: the rows past
    its own that the last one filled, and its own requests' divisors.
    One call at a time writes it: ``Buckets`` takes it from a free list
    for the duration of its call."""

    __slots__ = ("arrays", "ordered", "rows", "requests", "nbytes", "kept", "_params")

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.ordered = [arrays[n] for n in sorted(arrays)]
        self.rows = 0  # rows the last fill wrote (every row past them is padding as it should be)
        self.requests = 0  # requests the last fill wrote divisors for
        self.nbytes = sum(a.nbytes for a in arrays.values())
        self.kept = -1  # the owner's bookkeeping (``Buckets``): which generation counted these bytes
        self._params = {name: arrays[name].reshape(-1) for name in arrays if name.startswith(ROW_PARAMETER_PREFIX)}


def rows_arrays(items: list[_Item], size: Optional[int] = None, requests: Optional[int] = None,
                into: Optional[RowsBuffers] = None) -> dict[str, np.ndarray]:
    """The inputs of a rows program (``plan.build_rows_program``) for requests
    of one family: their rows concatenated, each row's request, parameters
    and weights, and each request's divisor (``reductions.divisor``).

    ``size`` and ``requests`` pad them to that many rows and requests (an
    XLA bucket, ``buckets``): padding rows are zeros with the last row's
    parameters and belong to the first padding request; padding requests
    divide by 0, so they count for nothing (``build_rows_program`` with
    ``padded``).

    ``into``: the buffers of an earlier call with the same family key,
    ``size``, ``requests`` and weighting, written in place (and returned)
    instead of new arrays; what they then hold equals what a call without
    them returns (tests/server/evaluation/test_buckets_buffers.py)."""
    first = items[0]
    dtype = dtype_name(first.tensors["y_pred"].dtype)
    lone = len(items) == 1  # a lone request (an XLA bucket's usual call) skips the repeats below
    rows = first.rows if lone else np.array([i.rows for i in items], dtype=np.int64)
    total = int(rows) if lone else int(rows.sum())
    size = size or total
    if into is not None:
        return _refill(into, items, rows, total, dtype)
    segments = np.full(size, len(items), np.int32)
    segments[:total] = 0 if lone else np.repeat(np.arange(len(items), dtype=np.int32), rows)
    arrays = {"y_true": _stack([i.tensors["y_true"] for i in items], size),
              "y_pred": _stack([i.tensors["y_pred"] for i in items], size), ROW_SEGMENTS: segments}
    rank = _param_rank(first)
    for name in first.row_params:
        if lone:  # its value on every row, padding included
            per_row = np.full(size, first.plan.terms[0].params[name], dtype)
        else:
            values = np.array([i.plan.terms[0].params[name] for i in items], dtype=dtype)
            per_row = np.empty(size, dtype)
            per_row[:total] = np.repeat(values, rows)
            per_row[total:] = values[-1]  # in the parameter's range
        arrays[ROW_PARAMETER_PREFIX + name] = per_row.reshape((-1,) + (1,) * (rank - 1))
    divisor_rows = np.zeros(requests or len(items), np.float64)
    divisor_fixed = np.zeros(requests or len(items), np.float64)
    _divisors(items, dtype, divisor_rows, divisor_fixed)
    arrays[ROW_DIVISOR_ROWS], arrays[ROW_DIVISOR_FIXED] = divisor_rows, divisor_fixed
    if any(i.weights is not None for i in items):
        rest = next(i.values_shape[1:] for i in items if i.weights is not None)
        arrays["sample_weight"] = _stack(
            [i.weights if i.weights is not None else np.ones((i.rows, *rest), dtype) for i in items], size)
    return arrays


def _param_rank(first: _Item) -> int:
    """The rank the loss sees y_pred with (Keras aligns a trailing 1): one
    value per row broadcasts against it."""
    true_shape, pred_shape = first.tensors["y_true"].shape, first.tensors["y_pred"].shape
    return len(align_ranks(true_shape, pred_shape)[1]) if first.plan.terms[0].entry.shapes == SHAPES_SAME \
        else len(pred_shape)


def _divisors(items: list[_Item], dtype: str, divisor_rows: np.ndarray, divisor_fixed: np.ndarray) -> None:
    """Each request's divisor, written into its place (padding requests' are left as they are: 0)."""
    for r, item in enumerate(items):
        # Keras divides by the sum of the weights as given (not broadcast).
        weight_sum = (None if item.sample_weight is None
                      else np.sum(item.sample_weight.astype(dtype, copy=False), dtype=np.float64))
        divisor = reductions.divisor(item.reduction, weight_sum)
        divisor_rows[r] = divisor.per_value * item.rows  # times the values per row, in the program
        divisor_fixed[r] = divisor.fixed


def _refill(into: RowsBuffers, items: list[_Item], rows, total: int, dtype: str) -> dict[str, np.ndarray]:
    """``rows_arrays`` written into ``into``: every value as a new call
    would give it, writing only what the last fill left different."""
    arrays = into.arrays
    count = len(items)
    lone = count == 1
    stale = into.rows  # rows past ``total`` up to here hold the last fill's data
    weighted = "sample_weight" in arrays
    if lone:
        tensors = items[0].tensors
        arrays["y_true"][:total] = tensors["y_true"]
        arrays["y_pred"][:total] = tensors["y_pred"]
        if weighted:
            arrays["sample_weight"][:total] = items[0].weights
    else:
        np.concatenate([i.tensors["y_true"] for i in items], out=arrays["y_true"][:total])
        np.concatenate([i.tensors["y_pred"] for i in items], out=arrays["y_pred"][:total])
        if weighted:
            rest = arrays["sample_weight"].shape[1:]
            np.concatenate([i.weights if i.weights is not None else np.ones((i.rows, *rest), dtype)
                            for i in items], out=arrays["sample_weight"][:total])
    segments = arrays[ROW_SEGMENTS]
    if stale > total:  # the last fill's rows past this one's become padding again
        arrays["y_true"][total:stale] = 0
        arrays["y_pred"][total:stale] = 0
        if weighted:
            arrays["sample_weight"][total:stale] = 0
    # Segments: this fill's rows by request, then its first padding request.
    if lone:
        segments[:total] = 0
    else:
        segments[:total] = np.repeat(np.arange(count, dtype=np.int32), rows)
    segments[total:] = count
    for name, flat in into._params.items():
        name = name[len(ROW_PARAMETER_PREFIX):]
        if lone:
            flat[:] = items[0].plan.terms[0].params[name]
        else:
            values = np.array([i.plan.terms[0].params[name] for i in items], dtype=dtype)
            flat[:total] = np.repeat(values, rows)
            flat[total:] = values[-1]
    divisor_rows, divisor_fixed = arrays[ROW_DIVISOR_ROWS], arrays[ROW_DIVISOR_FIXED]
    if into.requests > count:  # the last fill's requests past this one's divide by 0 again
        divisor_rows[count:into.requests] = 0
        divisor_fixed[count:into.requests] = 0
    _divisors(items, dtype, divisor_rows, divisor_fixed)
    into.rows, into.requests = total, count
    return arrays


def _stack(parts: list[np.ndarray], size: int) -> np.ndarray:
    """The parts concatenated along the first axis, then zero rows up to ``size``."""
    total = sum(len(p) for p in parts)
    if len(parts) == 1 and total == size:
        return parts[0]
    out = np.empty((size, *parts[0].shape[1:]), np.result_type(*parts))
    np.concatenate(parts, out=out[:total])
    out[total:] = 0
    return out


def split_results(items: list[_Item], reduced: np.ndarray, values: np.ndarray, grad: Optional[np.ndarray]) -> None:
    """Gives each item its own result from a rows program's outputs: its
    values (reduction ``none``) or reduced loss, its gradient rows and its
    NaN/Inf flag, from its own rows and inputs only (rows past the items',
    such as a bucket's padding, are never read)."""
    start = 0
    for r, item in enumerate(items):
        stop = start + item.rows
        loss = values[start:stop] if item.reduction == REDUCTION_NONE else reduced[r, ...]  # a 0-d view
        g = grad[start:stop] if item.gradient else None
        inputs = [item.tensors["y_true"], item.tensors["y_pred"], item.sample_weight]
        item.result = Result(loss, g, [], any_non_finite([loss, g, *inputs]))
        start = stop


def row_item(plan: Plan, tensors: Mapping[str, np.ndarray], sample_weight: Optional[np.ndarray], reduction: str,
             gradient: bool, max_elements: int) -> Optional[_Item]:
    """A request as a member of a rows call (``plan.build_rows_program``), or
    None where its rows are not independent (see the module's docstring) or
    its y_pred has more than ``max_elements`` elements. The one test of what
    a rows call may serve: batches and XLA buckets (``buckets``) both ask it."""
    family = row_family(plan)
    if family is None:
        return None
    term = plan.terms[0]
    y_true, y_pred = tensors["y_true"], tensors["y_pred"]
    dtype = dtype_name(y_pred.dtype)
    if (term.inputs != DEFAULT_INPUTS or plan.tensor_names != frozenset(DEFAULT_INPUTS)
            or term.entry.hinge_labels or term.params.get("ignore_class") is not None
            or dtype not in BATCHED_DTYPES or y_true.ndim < 1 or y_pred.ndim < 1
            or y_true.shape[0] != y_pred.shape[0] or y_pred.size == 0 or y_true.size == 0
            or y_pred.size > max_elements):
        return None
    if term.entry.shapes == SHAPES_CTC or (term.entry.shapes == SHAPES_SPARSE and y_pred.shape[-1] == 1):
        # CTC is never batched (issue 13); sparse labels against a single
        # class broadcast rows against rows once Keras aligns their ranks.
        return None
    structure = reductions.row_structure(term, y_true.shape, y_pred.shape)
    if structure is None or structure.kind != ROWS:
        return None
    rows = int(y_pred.shape[0])
    shape = _values_shape(term, y_true.shape, y_pred.shape)
    if shape is not None and (len(shape) < 1 or shape[0] != rows or 0 in shape):
        return None
    key = (family[0], dtype_name(y_true.dtype), dtype, y_true.shape[1:], y_pred.shape[1:], gradient,
           None if shape is None else shape[1:])
    item = _Item(plan, tensors, sample_weight, reduction, gradient, key, family[1], rows, int(y_pred.size),
                 shape)
    if sample_weight is not None:
        # The rows program multiplies each row by its weights broadcast to the
        # values' shape; where it cannot weigh them as the one-piece program
        # does, that program answers.
        if shape is None or sample_weight.size == 0:
            return None
        item.weights = reductions.weights_for_values(sample_weight, shape, dtype)
        if item.weights is None:
            return None
    return item


def _values_shape(term, true_shape: tuple, pred_shape: tuple) -> Optional[tuple]:
    """The per-sample values' shape of a term on these inputs, where known
    before running (named losses, and expressions whose shapes analyse)."""
    shape = values_shape(term.entry, term.params, true_shape, pred_shape)
    if shape is None:
        analysis = term.entry.value_shapes(dict(zip(term.entry.inputs, (tuple(true_shape), tuple(pred_shape)))))
        shape = getattr(analysis, "shape", None)
    return None if shape is None else tuple(shape)
