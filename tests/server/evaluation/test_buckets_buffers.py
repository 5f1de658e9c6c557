"""An XLA bucket's reused input buffers hold what new arrays would.

``Buckets.run`` writes each call's padded inputs into the buffers an
earlier call of the same bucket left (``batching.RowsBuffers``), writing
only what that call left different. Proven equal to the one-piece layout:
after any sequence of earlier fills (more or fewer rows, more or fewer
requests, other parameters, weights and reductions), a fill gives every
input array exactly (dtype, shape and bits) what ``rows_arrays`` without
buffers gives for the same requests. The answers themselves are compared
with Keras by tests/server/evaluation/test_buckets.py, whose module-wide
evaluator reuses buffers between its examples.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tensorflow")

from lossd import wire  # noqa: E402
from lossd_server.evaluation.batching import RowsBuffers, row_item, rows_arrays  # noqa: E402
from lossd_server.losses.custom import full_registry  # noqa: E402
from lossd_server.losses.plan import Planner  # noqa: E402

SIZE = 32  # the bucket's rows
REQUESTS = 8  # the bucket's requests (padding ones included)
# Losses with and without row parameters (delta; gamma and alpha).
LOSSES = ["huber", "mean_squared_error", "binary_focal_crossentropy"]
PARAMETERS = {"huber": {"delta": (0.3, 3.0)}, "binary_focal_crossentropy": {"gamma": (0.0, 4.0), "alpha": (0.0, 1.0)}}


@pytest.fixture(scope="module")
def planner():
    return Planner(full_registry(plugins=False))


@st.composite
def fill(draw, loss: str, dtype, tail: tuple, weighted: bool, planner):
    """One call's requests: 1 to REQUESTS - 1 of them, SIZE rows at most in
    all, each with its own rows, values, parameters, reduction and weights
    (at least one weighted request where the bucket is weighted)."""
    count = draw(st.integers(1, REQUESTS - 1))
    rows = draw(st.lists(st.integers(1, 8), min_size=count, max_size=count).filter(lambda r: sum(r) <= SIZE))
    weights = [weighted and draw(st.booleans()) for _ in rows]
    if weighted and not any(weights):
        weights[0] = True
    items = []
    for n, with_weights in zip(rows, weights):
        rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
        params = {name: float(draw(st.floats(lo, hi))) for name, (lo, hi) in PARAMETERS.get(loss, {}).items()}
        plan = planner.plan({"name": loss, "params": params})
        tensors = {"y_true": rng.uniform(0, 1, (n, *tail)).astype(dtype),
                   "y_pred": rng.uniform(0, 1, (n, *tail)).astype(dtype)}
        sample_weight = rng.uniform(0, 2, (n,)).astype(dtype) if with_weights else None
        item = row_item(plan, tensors, sample_weight, draw(st.sampled_from(wire.REDUCTIONS)), False, 1 << 16)
        assert item is not None, loss
        items.append(item)
    return items


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_reused_buffers_hold_what_new_arrays_hold(planner, data):
    loss = data.draw(st.sampled_from(LOSSES))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    tail = (data.draw(st.integers(2, 5)),)
    weighted = data.draw(st.booleans())
    calls = data.draw(st.lists(fill(loss, dtype, tail, weighted, planner), min_size=2, max_size=5))
    first = rows_arrays(calls[0], SIZE, REQUESTS)
    buffers = RowsBuffers({name: np.array(a) for name, a in first.items()})
    buffers.rows, buffers.requests = sum(i.rows for i in calls[0]), len(calls[0])
    for items in calls[1:]:
        got = rows_arrays(items, SIZE, REQUESTS, into=buffers)
        want = rows_arrays(items, SIZE, REQUESTS)
        assert got is buffers.arrays and sorted(got) == sorted(want)
        for name, array in want.items():
            assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
            np.testing.assert_array_equal(got[name], array, err_msg=name)
        # What the compiled program is handed: the same arrays in sorted name order.
        assert all(a is got[n] for a, n in zip(buffers.ordered, sorted(got)))


def test_an_answer_outlives_the_next_call_of_its_bucket():
    """A bucket's buffers are written again by its next call as soon as a
    call returns: an answer (per-sample values, gradient) must not be a
    view of them. Two requests of one bucket, the first answer copied
    before the second runs, then compared with itself."""
    from lossd_server.evaluation import backend
    from lossd_server.evaluation.evaluator import Evaluator

    registry = full_registry(plugins=False)
    evaluator = Evaluator(registry, backend.select_device("cpu"), xla="auto", xla_losses=("huber",),
                          compile_timeout=600)
    try:
        plan = evaluator.planner.plan({"name": "huber", "params": {"delta": 0.5}})
        rng = np.random.default_rng(0)
        first, second = ({"y_true": rng.normal(size=(5, 3)).astype(np.float32),
                          "y_pred": rng.normal(size=(5, 3)).astype(np.float32)} for _ in range(2))
        evaluator.evaluate(plan, first, reduction="none", gradient=True)  # starts the bucket's compilation
        assert evaluator.wait_compiled()
        calls = evaluator.buckets.calls
        answer = evaluator.evaluate(plan, first, reduction="none", gradient=True)
        kept = answer.loss.copy(), answer.gradient.copy()
        other = evaluator.evaluate(plan, second, reduction="none", gradient=True)
        assert evaluator.buckets.calls == calls + 2  # both served by the bucket, through its buffers
        assert not np.array_equal(other.loss, kept[0])
        np.testing.assert_array_equal(answer.loss, kept[0])
        np.testing.assert_array_equal(answer.gradient, kept[1])
    finally:
        evaluator.close()
