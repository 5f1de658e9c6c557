"""XLA shape buckets: small row-separable requests run as XLA executables of
a few fixed shapes.

An XLA-compiled call of a small loss takes about 30 µs here, against 100-220 µs
for the same graph on TensorFlow's executor (bench/RESULTS.md), but XLA
compiles one executable per concrete shape, and requests come with any number
of rows. So a request (or a micro-batch of the ``Batcher``) is padded to a
*bucket*: its rows to the next power of two (at least ``MIN_ROWS``), its
requests to the next power of two above their count, and one executable
serves every call that pads to the same bucket.

What runs is the plan's own rows program (``plan.build_rows_program`` with
``padded=True``), the program micro-batches already use: the Keras loss with
reduction ``none`` over all rows, then each request's values summed and
divided by its divisor (``reductions.divisor``). The padding rows form
requests of their own whose divisor is 0, which ``divide_no_nan`` makes 0
whatever their values are: they take no part in any request's loss, weights,
gradient, NaN/Inf flag or values (``batching.split_results`` reads the real
rows only). Nothing here computes a reduction.

Which requests qualify is ``batching.row_item``'s rule, the one batches
follow (each row's values depend on that row alone: not composites, not the
hinge losses, not ``ignore_class``, not ctc...), on CPU, for y_pred of at
most ``MAX_ELEMENTS`` elements. Executables compile on the evaluator's
XLA compile thread (``Evaluator.rows_program``), within its cache and its
bounds; a request never waits for one: until it is ready, and where XLA
cannot compile a program (an op it lacks), the request takes the path it
took before. A program XLA failed to compile is not tried again.

What differs from the one-piece path is documented in docs/xla.md and checked
against Keras by tests/server/evaluation/test_buckets.py.
"""

from __future__ import annotations

import logging
import threading
from typing import Mapping, Optional

import numpy as np

from lossd.wire import dtype_name
from lossd_server.evaluation import backend
from lossd_server.evaluation.batching import RowsBuffers, row_item, rows_arrays, split_results
from lossd_server.evaluation.evaluator import Evaluator, Result
from lossd_server.losses import reductions
from lossd_server.losses.plan import Plan

log = logging.getLogger(__name__)

# Fewest rows of a bucket: one executable serves 1 to 8 rows.
MIN_ROWS = 8
# Most y_pred elements of a bucket (padding included): the small requests
# whose TensorFlow call costs more than their arithmetic. Larger ones run
# on the current path (and, under ``xla=auto``, on XLA for the losses it
# speeds up at 1e6 elements and more: ``Evaluator._use_xla``).
MAX_ELEMENTS = 1 << 16
# Most sets of input buffers kept per bucket for reuse (``Buckets.run``):
# one per call of that bucket running at once, up to this many.
FREE_BUFFERS = 4
# Most bytes those buffers may hold together, over every bucket.
FREE_BUFFER_BYTES = 32 << 20
_UNKNOWN = object()


def bucket(count: int, least: int = 1) -> int:
    """The power of two at or above ``count`` (and at or above ``least``)."""
    return max(least, 1 << max(0, count - 1).bit_length())


class Buckets:
    """Evaluates small row-separable requests with XLA executables of bucketed shapes.

    Args:
        evaluator: Whose compile threads, cache and bounds the executables use.
        max_elements: Most y_pred elements of a padded call.

    Attributes:
        calls: Calls served by a bucketed executable (one per request or batch).
        requests: Requests those calls answered.
    """

    def __init__(self, evaluator: Evaluator, max_elements: int = MAX_ELEMENTS):
        self.evaluator = evaluator
        self.max_elements = max_elements
        self.calls = 0
        self.requests = 0
        self._lock = threading.Lock()
        # What row_item said for a kind of request (see _kind): None or an
        # item to copy; and each bucket's input specs. Both are asked per
        # request and computed once.
        self._kinds: dict[tuple, object] = {}
        self._specs: dict[tuple, tuple[backend.InputSpec, ...]] = {}
        # Each bucket's input buffers not in use now, written in place by
        # its next call (``batching.RowsBuffers``).
        self._free: dict[tuple, list[RowsBuffers]] = {}
        self._kept_bytes = 0  # bytes of the buffers counted as kept (in ``_free`` or in use)
        self._generation = 0  # bumped when ``_free`` starts over

    def evaluate(self, plan: Plan, tensors: Mapping[str, np.ndarray], sample_weight: Optional[np.ndarray],
                 reduction: str, gradient: bool) -> Optional[Result]:
        """One checked request (``Evaluator.check``) through its bucket's
        executable; None where it does not qualify or its executable is not
        ready (then it is being compiled, unless XLA failed on it before)."""
        kind = _kind(plan, tensors, sample_weight, reduction, gradient)
        if kind is None:
            return None
        y_true, y_pred = tensors["y_true"], tensors["y_pred"]
        rows = y_pred.shape[0] if y_pred.ndim else 0
        if not 0 < y_pred.size <= self.max_elements or y_true.ndim < 1 or y_true.shape[0] != rows:
            return None
        template = self._kinds.get(kind, _UNKNOWN)
        if template is _UNKNOWN:
            # Both answers below depend on the kind alone (its plan) once the
            # sizes above are checked: asked once per kind.
            evaluator = self.evaluator
            if evaluator.xla == "auto" and not all(t.entry.name in evaluator.xla_losses for t in plan.terms):
                # A lone request pays the bucket's padding and Python: measured
                # slower than the graph for MSE (bench/xla.py --small, 1.17x CPU),
                # faster for Huber and the crossentropies. ``auto`` buckets a lone
                # request only for the losses measured faster (app.XLA_LOSSES);
                # micro-batches (``run``) gain for every loss and are bucketed all.
                item = None
            else:
                item = row_item(plan, tensors, sample_weight, reduction, gradient, self.max_elements)
            self._remember(self._kinds, kind, item)
        elif template is None:
            return None
        else:
            shape = template.values_shape
            item = template.like(tensors, sample_weight, rows, None if shape is None else (rows, *shape[1:]))
            if sample_weight is not None:  # the kind's template took weights of this rank and trailing shape
                item.weights = reductions.weights_for_values(sample_weight, item.values_shape, y_pred.dtype)
                if item.weights is None:
                    return None
        if item is None or not self.run([item]):
            return None
        return item.result

    def run(self, items: list) -> bool:
        """Evaluates the items of one rows call (``batching.row_item``)
        padded to their bucket, giving each its result; False, and nothing
        changed, where the bucket does not serve them (too large, not
        compiled yet, or refused at run time: the caller's path then gives
        each request its own answer or error)."""
        first = items[0]
        lone = len(items) == 1
        rows = first.rows if lone else sum(i.rows for i in items)
        size = bucket(rows, MIN_ROWS)
        y_pred = first.tensors["y_pred"]
        if size * (y_pred.size // first.rows) > self.max_elements:
            return False
        requests = bucket(len(items) + 1)
        weighted = first.weights is not None if lone else any(i.weights is not None for i in items)
        spec_key = (first.key, size, requests, weighted)
        free = self._free.get(spec_key)
        try:
            buffers = free.pop()  # atomic: no two calls write one buffer
        except (AttributeError, IndexError):  # no list yet, or every buffer of the bucket in use
            buffers = None
        if buffers is None:
            arrays = rows_arrays(items, size, requests)
            buffers = RowsBuffers({n: np.array(a) for n, a in arrays.items()})  # owned copies, written again later
            buffers.rows, buffers.requests = rows, len(items)
        else:
            rows_arrays(items, size, requests, into=buffers)
        try:
            specs = self._specs.get(spec_key)
            if specs is None:
                arrays = buffers.arrays
                specs = tuple(backend.InputSpec(n, dtype_name(arrays[n].dtype), arrays[n].shape)
                              for n in sorted(arrays))
                self._remember(self._specs, spec_key, specs)
            compiled = self.evaluator.rows_program(first.plan, first.key[0], first.row_params, specs,
                                                   first.key[2], first.gradient, padded=True)
            if compiled is None:
                return False
            try:
                # The call has returned its outputs before the buffers are
                # given back: XLA's outputs never alias its inputs.
                _, (reduced, values), grad, _ = compiled(buffers.ordered)
            except (*backend.INPUT_ERRORS, *backend.MEMORY_ERRORS) as exc:  # the current path answers it
                log.debug("bucketed call of %d requests refused (%s); taking the current path", len(items), exc)
                return False
        finally:
            self._give_back(spec_key, free, buffers)
        split_results(items, reduced, values, grad)
        with self._lock:
            self.calls += 1
            self.requests += len(items)
        return True

    def _give_back(self, spec_key: tuple, free: Optional[list], buffers: RowsBuffers) -> None:
        """Keeps a bucket's buffers for its next call: at most ``FREE_BUFFERS``
        sets per bucket (as many as calls of it ran at once), and at most
        ``FREE_BUFFER_BYTES`` in all; a flood of new buckets starts over."""
        if free is None:
            free = []
            with self._lock:
                if len(self._free) >= 4 * self.evaluator.cache_size:
                    self._free.clear()
                    self._kept_bytes = 0
                    self._generation += 1
                free = self._free.setdefault(spec_key, free)
        if len(free) >= FREE_BUFFERS:
            return
        if buffers.kept != self._generation:  # not counted since the last start-over
            with self._lock:
                if self._kept_bytes + buffers.nbytes > FREE_BUFFER_BYTES:
                    return
                self._kept_bytes += buffers.nbytes
                buffers.kept = self._generation
        free.append(buffers)

    def _remember(self, table: dict, key: tuple, value) -> None:
        # Bounded like the program cache: a flood of new kinds starts over.
        if len(table) >= 4 * self.evaluator.cache_size:
            table.clear()
        table[key] = value


def _kind(plan: Plan, tensors: Mapping[str, np.ndarray], sample_weight: Optional[np.ndarray], reduction: str,
          gradient: bool) -> Optional[tuple]:
    """What ``batching.row_item``'s answer depends on, besides the size: the
    plan, reduction and gradient, and every input's dtype and shape past the
    first axis (and whether that axis is 1, which broadcasts). None where
    the request has other tensors than y_true and y_pred."""
    if len(tensors) != 2 or "y_true" not in tensors or "y_pred" not in tensors:
        return None
    y_true, y_pred = tensors["y_true"], tensors["y_pred"]
    weights = None if sample_weight is None else (sample_weight.dtype, sample_weight.shape[1:],
                                                  sample_weight.shape[:1] == (1,), sample_weight.ndim)
    return (plan.key, reduction, gradient, y_true.dtype, y_true.shape[1:], y_true.shape[:1] == (1,),
            y_true.ndim, y_pred.dtype, y_pred.shape[1:], y_pred.shape[:1] == (1,), y_pred.ndim, weights)
