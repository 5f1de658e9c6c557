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
divided by its divisor (``chunks.reduction_divisor``). The padding rows form
requests of their own whose divisor is 0, which ``divide_no_nan`` makes 0
whatever their values are: they take no part in any request's loss, weights,
gradient, NaN/Inf flag or values (``batching.split_results`` reads the real
rows only). Nothing here computes a reduction.

Which requests qualify is ``batching.row_item``'s rule, the one batches
follow (each row's values depend on that row alone: not composites, not the
hinge losses, not ``ignore_class``, not ctc...), on CPU, for y_pred of at
most ``MAX_ELEMENTS`` elements. Executables compile on the evaluator's
compile threads (``Evaluator.rows_program``), within its cache and its
bounds; a request never waits for one: until it is ready, and where XLA
cannot compile a program (an op it lacks), the request takes the path it
took before. A program XLA failed to compile is not tried again.

What differs from the one-piece path is documented in docs/xla.md and checked
against Keras by tests/server/test_buckets.py.
"""

from __future__ import annotations

import logging
import threading
from typing import Mapping, Optional

import numpy as np

from lossd.wire import dtype_name
from lossd_server.evaluation import backend
from lossd_server.evaluation.batching import row_item, rows_arrays, split_results
from lossd_server.evaluation.evaluator import Evaluator, Result
from lossd_server.losses.plan import ROW_DIVISOR_FIXED, ROW_DIVISOR_ROWS, ROW_PARAMETER_PREFIX, ROW_SEGMENTS, Plan

log = logging.getLogger(__name__)

# Fewest rows of a bucket: one executable serves 1 to 8 rows.
MIN_ROWS = 8
# Most y_pred elements of a bucket (padding included): the small requests
# whose TensorFlow call costs more than their arithmetic. Larger ones run
# on the current path (and, under ``xla=auto``, on XLA for the losses it
# speeds up at 1e6 elements and more: ``Evaluator._use_xla``).
MAX_ELEMENTS = 1 << 16


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

    def evaluate(self, plan: Plan, tensors: Mapping[str, np.ndarray], sample_weight: Optional[np.ndarray],
                 reduction: str, gradient: bool) -> Optional[Result]:
        """One checked request (``Evaluator.check``) through its bucket's
        executable; None where it does not qualify or its executable is not
        ready (then it is being compiled, unless XLA failed on it before)."""
        item = row_item(plan, tensors, sample_weight, reduction, gradient, self.max_elements)
        if item is None or not self.run([item], rows_arrays([item])):
            return None
        return item.result

    def run(self, items: list, arrays: dict[str, np.ndarray]) -> bool:
        """Evaluates the items of one rows call (``batching.row_item``, their
        inputs ``batching.rows_arrays``) padded to their bucket, giving each
        its result; False, and nothing changed, where the bucket does not
        serve them (too large, not compiled yet, or refused at run time: the
        caller's path then gives each request its own answer or error)."""
        rows = len(arrays["y_pred"])
        size = bucket(rows, MIN_ROWS)
        if size * (arrays["y_pred"].size // rows) > self.max_elements:
            return False
        padded = _pad(arrays, rows, size, bucket(len(items) + 1))
        names = sorted(padded)
        specs = [backend.InputSpec(n, dtype_name(padded[n].dtype), padded[n].shape) for n in names]
        first = items[0]
        compiled = self.evaluator.rows_program(first.plan, first.key[0], first.row_params, specs, first.key[2],
                                               first.gradient, padded=True)
        if compiled is None:
            return False
        try:
            _, (reduced, values), grad, _ = compiled([padded[n] for n in names])
        except backend.INPUT_ERRORS as exc:  # the current path raises it as this request's own error
            log.debug("bucketed call of %d requests refused (%s); taking the current path", len(items), exc)
            return False
        split_results(items, reduced, values, grad)
        with self._lock:
            self.calls += 1
            self.requests += len(items)
        return True


def _pad(arrays: dict[str, np.ndarray], rows: int, size: int, requests: int) -> dict[str, np.ndarray]:
    """The rows call's inputs padded to ``size`` rows and ``requests``
    requests. Padding rows are zeros (their row parameters are the last
    row's, so they lie in the parameter's range) and belong to the first
    padding request; padding requests divide by 0, so they count for
    nothing (``plan.build_rows_program``)."""
    count = len(arrays[ROW_DIVISOR_ROWS])
    out = {}
    for name, array in arrays.items():
        if name in (ROW_DIVISOR_ROWS, ROW_DIVISOR_FIXED):
            full = np.zeros((requests,), array.dtype)
            full[:count] = array
        elif name == ROW_SEGMENTS:
            full = np.full((size,), count, array.dtype)
            full[:rows] = array
        else:
            full = np.zeros((size, *array.shape[1:]), array.dtype)
            full[:rows] = array
            if name.startswith(ROW_PARAMETER_PREFIX):
                full[rows:] = array[rows - 1]
        out[name] = full
    return out
