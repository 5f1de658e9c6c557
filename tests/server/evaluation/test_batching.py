"""Micro-batching equals the one-piece evaluation, request by request.

Concurrent requests of one program family are evaluated in one call by
``lossd_server.evaluation.batching.Batcher``; each must get what
``Evaluator.evaluate`` (itself tested against Keras) gives it alone: the
per-sample values (reduction ``none``) and gradients bit for bit, a reduced
loss to rtol 1e-6 of the sum of the magnitudes it adds up (the batch sums
in float64, Keras in the loss's dtype), and its own error. A request the
batcher does not batch (a loss whose rows are coupled, a composite...) goes
through the one-piece path unchanged.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")

from tests.keras_reference import reduced_magnitude  # noqa: E402

from lossd import wire  # noqa: E402
from lossd_server.errors import InvalidArgument  # noqa: E402
from lossd_server.evaluation import backend  # noqa: E402
from lossd_server.evaluation.batching import Batcher  # noqa: E402
from lossd_server.evaluation.evaluator import Evaluator  # noqa: E402
from lossd_server.losses import custom  # noqa: E402
from lossd_server.losses.registry import SHAPES_CTC, SHAPES_LABELS, SHAPES_SPARSE  # noqa: E402

# Losses made of arithmetic alone: their per-sample values and gradients are
# bit for bit the same in any batch. Elsewhere TensorFlow's vectorised
# transcendental kernels (log, exp, pow) round an element differently by its
# position in the tensor (a SIMD lane or the scalar tail), so those agree to
# rtol 1e-6.
EXACT = {"mean_squared_error", "mean_absolute_error", "huber", "expr:mean(square(y_true - y_pred), axis=-1)",
         "expr:y_true * square(y_pred)"}
EXPRESSIONS = [
    "mean(square(y_true - y_pred), axis=-1)",
    "y_true * square(y_pred)",
    "mean(log_softmax(y_pred, axis=-1) * y_true, axis=-1)",
    "mean(square(y_true - y_pred), axis=0)",  # couples the rows: never batched
]
# Values each allow-listed parameter is drawn from (in its documented range).
ROW_PARAMETER_VALUES = {"delta": (0.3, 3.0), "gamma": (0.0, 4.0), "alpha": (0.0, 1.0)}


@pytest.fixture(scope="module")
def evaluator():
    # Requests that are not batched compile their own programs at once.
    ev = Evaluator(custom.full_registry(plugins=False), backend.select_device("cpu"),
                   expression_compiler=custom.inline_entry, max_pending_compiles=64)
    yield ev
    ev.close()


def _batcher(evaluator, **kwargs) -> Batcher:
    settings_ = dict(max_delay_us=2_000_000, max_elements=1 << 20, max_requests=64)
    settings_.update(kwargs)
    return Batcher(evaluator, **settings_)


def _inputs(rng, shapes: str, rows: int, tail: tuple, dtype) -> tuple[np.ndarray, np.ndarray]:
    shape = (rows, *tail)
    if shapes == SHAPES_SPARSE:
        shape = shape if len(shape) >= 2 else (rows, 3)
        return (rng.integers(0, shape[-1], shape[:-1]).astype(np.int32),
                rng.uniform(0.05, 0.95, shape).astype(dtype))
    if shapes == SHAPES_LABELS:
        return rng.integers(0, 3, rows).astype(np.int32), rng.standard_normal((rows, 3)).astype(dtype)
    if shapes == SHAPES_CTC:
        return rng.integers(1, 4, (rows, 3)).astype(np.int32), rng.uniform(0.05, 0.95, (rows, 6, 4)).astype(dtype)
    y_pred = rng.uniform(0.05, 0.95, shape).astype(dtype)
    if rng.integers(0, 2):
        return rng.integers(0, 2, shape).astype(dtype), y_pred
    return rng.uniform(0.05, 0.95, shape).astype(dtype), y_pred


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except InvalidArgument as error:
        return None, error


def _run_together(batcher, calls):
    """Runs ``calls`` (kwargs of Batcher.evaluate) from one thread each, all
    counted in flight before any evaluates, so they batch as a server's
    concurrent RPCs do; returns (result, error) per call. Twice: a family's
    batched program compiles in the background while the first round's
    requests are answered one by one; the second round is batched."""
    _run_threads(batcher, calls)
    assert batcher.evaluator.wait_compiled()
    return _run_threads(batcher, calls)


def _run_threads(batcher, calls):
    out = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def worker(k):
        with batcher.in_flight():
            barrier.wait()
            out[k] = _call(batcher.evaluate_in_flight, **calls[k])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def _magnitude(evaluator, call) -> float:
    """What a reduced loss's rounding is relative to: the reduction of the
    absolute weighted values (as the request's own reduction divides), each
    at least what a cancelling loss keeps of it (``_cancelling_scale``, times
    its weight) over the 1e-6 the comparison allows."""
    values = evaluator.evaluate(call["plan"], call["tensors"], sample_weight=call["sample_weight"],
                                reduction="none").loss
    weight = 1.0 if call["sample_weight"] is None else float(np.max(np.abs(call["sample_weight"]), initial=0.0))
    return reduced_magnitude(values, call["reduction"], call["sample_weight"], _cancelling_scale(call) * weight / 1e-6)


def _assert_same(evaluator, call, got, want, exact: bool):
    assert got.loss.shape == want.loss.shape and got.loss.dtype == want.loss.dtype
    assert got.non_finite == want.non_finite
    assert not got.terms and not want.terms
    if call["reduction"] == "none":
        if exact:
            np.testing.assert_array_equal(got.loss, want.loss)
        else:
            _allclose(got.loss, want.loss, _cancelling_scale(call))
    else:
        scale = _magnitude(evaluator, call)
        assert abs(float(got.loss) - float(want.loss)) <= 1e-6 * scale + 1e-30, (got.loss, want.loss, scale)
    if want.gradient is None:
        assert got.gradient is None
    else:
        assert got.gradient.shape == want.gradient.shape and got.gradient.dtype == want.gradient.dtype
        # Divided by the weights' sum, which the batch adds up in float64.
        by_weights = call["reduction"] == "mean_with_sample_weight" and call["sample_weight"] is not None
        if exact and not by_weights:
            np.testing.assert_array_equal(got.gradient, want.gradient)
        else:  # a gradient that cancels to about 0 (cosine of one column) keeps rounding of that scale
            weight = 1.0 if call["sample_weight"] is None else float(np.max(np.abs(call["sample_weight"]),
                                                                            initial=0.0))
            _allclose(got.gradient, want.gradient, _cancelling_scale(call) * max(weight, 1.0))


def _allclose(a, b, floor: float = 0.0):
    atol = max(1e-6 * float(np.max(np.abs(b), initial=0.0)), floor)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=atol, equal_nan=True)


def _cancelling_scale(call) -> float:
    """A few units in the last place of the inputs' magnitude: a loss that
    subtracts terms of that size (log_cosh is |x| + softplus(-2x) - log 2)
    keeps only that much of a small value, and a vectorised kernel rounds
    those terms by each element's position in the tensor."""
    inputs = call["tensors"]
    eps = float(np.finfo(inputs["y_pred"].dtype).eps)
    return 8 * eps * (1.0 + max(float(np.max(np.abs(a), initial=0.0)) for a in inputs.values()))


@st.composite
def families(draw, entries):
    names = sorted(entries)
    loss = draw(st.sampled_from(names + [f"expr:{e}" for e in EXPRESSIONS]))
    entry = entries.get(loss)
    shapes = entry.shapes if entry is not None else "same"
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rank = draw(st.integers(1, 3))
    tail = tuple(draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1)))
    gradient = draw(st.booleans())
    count = draw(st.integers(2, 5))
    failing = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    calls = []
    for _ in range(count):
        rows = draw(st.integers(1, 9))
        y_true, y_pred = _inputs(rng, shapes, rows, tail, dtype)
        params = {}
        for name in sorted(entry.row_parameters if entry is not None else ()):
            lo, hi = ROW_PARAMETER_VALUES[name]
            params[name] = float(draw(st.floats(lo, hi)))
        if entry is not None and "apply_class_balancing" in {p.name for p in entry.parameters}:
            params["apply_class_balancing"] = True  # so alpha counts
        spec = {"expression": loss[5:]} if loss.startswith("expr:") else {"name": loss, "params": params}
        sample_weight = None
        kind = draw(st.sampled_from(["none", "rows", "rows1", "full"]))
        if kind == "rows":
            sample_weight = rng.uniform(0.0, 2.0, rows).astype(dtype)
        elif kind == "rows1":
            sample_weight = rng.uniform(0.0, 2.0, (rows, 1)).astype(dtype)
        elif kind == "full":
            sample_weight = rng.uniform(0.0, 2.0, y_pred.shape[:max(1, y_pred.ndim - 1)]).astype(dtype)
        calls.append(dict(spec=spec, loss=loss, tensors={"y_true": y_true, "y_pred": y_pred}, sample_weight=sample_weight,
                          reduction=draw(st.sampled_from(wire.REDUCTIONS)), gradient=gradient))
    if failing:  # a request the loss refuses, in the middle of the batch
        bad = dict(calls[0])
        y_pred = bad["tensors"]["y_pred"]
        bad["tensors"] = {"y_true": np.ones((y_pred.shape[0] + 1, *y_pred.shape[1:]), y_pred.dtype),
                          "y_pred": y_pred}
        bad["sample_weight"] = None
        calls.insert(len(calls) // 2, bad)
    return calls


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_batched_equals_one_piece(evaluator, data):
    entries = {e.name: e for e in evaluator.registry.entries() if e.source in ("keras", "builtin")}
    specs = data.draw(families(entries))
    calls = []
    for c in specs:
        call = {k: v for k, v in c.items() if k not in ("spec", "loss")}
        call["plan"] = evaluator.planner.plan(c["spec"])
        calls.append(call)
    batcher = _batcher(evaluator, max_requests=len(calls))
    got = _run_together(batcher, calls)
    batchable = 0
    for call, (result, error) in zip(calls, got):
        want, want_error = _call(evaluator.evaluate, **call)
        if want_error is not None:
            assert error is not None and error.reason == want_error.reason, (error, want_error)
            continue
        assert error is None, error
        batchable += batcher._item(call["plan"], call["tensors"], call["sample_weight"], call["reduction"],
                                   call["gradient"]) is not None
        _assert_same(evaluator, call, result, want, exact=specs[0]["loss"] in EXACT)
    event(f"batchable requests: {batchable}, batched calls: {batcher.batches}")
    if batchable >= 2:
        assert batcher.batches >= 1


def test_every_row_separable_keras_loss_is_batched(evaluator):
    """The control: the property test above does exercise the batched path
    for each loss whose rows are independent (and only for those)."""
    rng = np.random.default_rng(3)
    batched = []
    for entry in evaluator.registry.entries():
        if entry.source != "keras":
            continue
        y_true, y_pred = _inputs(rng, entry.shapes, 4, (3,), np.float32)
        item = _batcher(evaluator)._item(evaluator.planner.plan({"name": entry.name}),
                                         {"y_true": y_true, "y_pred": y_pred}, None, "sum", False)
        if item is not None:
            batched.append(entry.name)
    assert set(batched) == {
        "binary_crossentropy", "binary_focal_crossentropy", "categorical_crossentropy",
        "categorical_focal_crossentropy", "sparse_categorical_crossentropy", "categorical_generalized_cross_entropy",
        "kl_divergence", "poisson", "mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
        "mean_squared_logarithmic_error", "cosine_similarity", "huber", "log_cosh", "categorical_hinge"}, batched


@pytest.mark.parametrize("loss, param", [("huber", "delta"), ("binary_focal_crossentropy", "gamma"),
                                          ("binary_focal_crossentropy", "alpha"),
                                          ("categorical_focal_crossentropy", "gamma"),
                                          ("categorical_focal_crossentropy", "alpha")])
def test_row_parameters_against_keras(evaluator, loss, param):
    """Each allow-listed parameter, different in every request of one batch,
    gives each request what Keras gives it with its own value."""
    rng = np.random.default_rng(4)
    lo, hi = ROW_PARAMETER_VALUES[param]
    calls, expected = [], []
    for rows in (3, 1, 7, 2):
        value = float(rng.uniform(lo, hi))
        params = {param: value, **({"apply_class_balancing": True} if loss == "binary_focal_crossentropy" else {})}
        y_true = rng.integers(0, 2, (rows, 5)).astype(np.float32)
        y_pred = rng.uniform(0.05, 0.95, (rows, 5)).astype(np.float32)
        calls.append(dict(plan=evaluator.planner.plan({"name": loss, "params": params}),
                          tensors={"y_true": y_true, "y_pred": y_pred}, sample_weight=None,
                          reduction="none", gradient=True))
        cls = type(evaluator.registry.get(loss).build({}, "none", "float32"))
        expected.append(keras.ops.convert_to_numpy(cls(**params, reduction="none")(y_true, y_pred)))
    batcher = _batcher(evaluator, max_requests=len(calls))
    got = _run_together(batcher, calls)
    assert batcher.batches >= 1  # the second round at least (the first if the program was cached)
    for (result, error), want, call in zip(got, expected, calls):
        assert error is None, error
        np.testing.assert_allclose(result.loss, want, rtol=1e-6, atol=1e-7)
        one_piece = evaluator.evaluate(**call)
        _allclose(result.gradient, one_piece.gradient)


def test_parameters_not_allowed_per_row_are_grouped_by_value(evaluator):
    """label_smoothing is not per-row (Keras branches on it in Python): two
    values make two batches, each still right."""
    rng = np.random.default_rng(5)
    calls = []
    for smoothing in (0.0, 0.2, 0.0, 0.2):
        calls.append(dict(plan=evaluator.planner.plan({"name": "bce", "params": {"label_smoothing": smoothing}}),
                          tensors={"y_true": rng.integers(0, 2, (3, 4)).astype(np.float32),
                                   "y_pred": rng.uniform(0.05, 0.95, (3, 4)).astype(np.float32)},
                          sample_weight=None, reduction="sum", gradient=True))
    batcher = _batcher(evaluator, max_requests=2)
    got = _run_together(batcher, calls)
    assert batcher.batches >= 2  # two in the second round
    for call, (result, error) in zip(calls, got):
        assert error is None
        _assert_same(evaluator, call, result, evaluator.evaluate(**call), exact=False)


def test_a_batch_that_fails_as_a_whole_answers_each_request_alone(evaluator):
    """If the batched call raises, every request is evaluated on its own: the
    good ones get their answers, the bad one its own error."""
    rng = np.random.default_rng(6)
    batcher = _batcher(evaluator)

    def item(rows, cols):
        plan = evaluator.planner.plan({"name": "mse"})
        tensors = {"y_true": rng.normal(size=(rows, cols)).astype(np.float32),
                   "y_pred": rng.normal(size=(rows, cols)).astype(np.float32)}
        return batcher._item(plan, tensors, None, "mean", True)

    # Rows of different widths cannot be concatenated: the batched call fails.
    items = [item(2, 3), item(4, 5), item(3, 3)]
    batcher._run(items)
    assert evaluator.wait_compiled()
    batcher._run(items)
    assert batcher.batches == 0
    for it in items:
        assert it.error is None
        want = evaluator.evaluate(it.plan, it.tensors, reduction="mean", gradient=True)
        np.testing.assert_array_equal(it.result.loss, want.loss)
        np.testing.assert_array_equal(it.result.gradient, want.gradient)


def test_coupled_losses_and_composites_are_not_batched(evaluator):
    rng = np.random.default_rng(7)
    batcher = _batcher(evaluator)
    y = rng.uniform(0.05, 0.95, (4, 3)).astype(np.float32)
    for spec in ({"name": "dice"}, {"name": "hinge"}, {"expression": "mean(square(y_true - y_pred), axis=0)"},
                 {"name": "sparse_categorical_crossentropy", "params": {"ignore_class": 0}},
                 {"terms": [{"loss": {"name": "mse"}}, {"loss": {"name": "mae"}}]}):
        y_true = rng.integers(0, 3, 4).astype(np.int32) if "sparse" in spec.get("name", "") else y
        assert batcher._item(evaluator.planner.plan(spec), {"y_true": y_true, "y_pred": y}, None, "sum",
                             False) is None, spec
    # A rank-1 y_pred is reduced over its rows by the loss itself.
    assert batcher._item(evaluator.planner.plan({"name": "mse"}), {"y_true": y[:, 0], "y_pred": y[:, 0]}, None,
                         "sum", False) is None


def test_a_lone_request_does_not_wait(evaluator):
    """With a delay of 10 s, a request alone in the server is answered at once."""
    batcher = _batcher(evaluator, max_delay_us=10_000_000)
    plan = evaluator.planner.plan({"name": "huber", "params": {"delta": 1.5}})
    tensors = {"y_true": np.zeros((3, 2), np.float32), "y_pred": np.ones((3, 2), np.float32)}
    batcher.evaluate(plan, tensors)  # compiles
    start = time.perf_counter()
    result = batcher.evaluate(plan, tensors, reduction="sum")
    assert time.perf_counter() - start < 1.0
    assert float(result.loss) == float(evaluator.evaluate(plan, tensors, reduction="sum").loss)


def test_batching_off_is_the_one_piece_path(evaluator):
    batcher = _batcher(evaluator, max_delay_us=0)
    assert not batcher.enabled
    plan = evaluator.planner.plan({"name": "mse"})
    tensors = {"y_true": np.zeros((3, 2), np.float32), "y_pred": np.ones((3, 2), np.float32)}
    with pytest.raises(wire.WireError, match="reduction"):
        batcher.evaluate(plan, tensors, reduction="average")


def test_batch_metrics(evaluator):
    from prometheus_client import CollectorRegistry

    from lossd_server.observability.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry, loss_names=[], version="test", process_metrics=False)
    batcher = _batcher(evaluator, max_requests=3, metrics=metrics)
    plan = evaluator.planner.plan({"name": "mae"})
    calls = [dict(plan=plan, tensors={"y_true": np.zeros((rows, 2), np.float32),
                                      "y_pred": np.ones((rows, 2), np.float32)},
                  sample_weight=None, reduction="sum", gradient=False) for rows in (1, 2, 3)]
    got = _run_threads(batcher, calls)
    assert [float(r.loss) for r, _ in got] == [1.0, 2.0, 3.0]
    assert registry.get_sample_value("lossd_batch_size_requests_count") == 1
    assert registry.get_sample_value("lossd_batch_size_requests_sum") == 3
    assert registry.get_sample_value("lossd_batch_size_elements_sum") == 12
    assert registry.get_sample_value("lossd_batch_wait_seconds_count") == 3


def test_a_batch_does_not_wait_for_its_program_to_compile(evaluator):
    """The first batch of a family is answered one by one while its batched
    program compiles on a compile thread; the next batch uses it."""
    batcher = _batcher(evaluator, max_requests=2)
    plan = evaluator.planner.plan({"name": "mse"})
    calls = [dict(plan=plan, tensors={"y_true": np.zeros((rows, 7), np.float32),
                                      "y_pred": np.ones((rows, 7), np.float32)},
                  sample_weight=None, reduction="sum", gradient=True) for rows in (1, 2)]
    first = _run_threads(batcher, calls)
    assert batcher.batches == 0 and [float(r.loss) for r, _ in first] == [1.0, 2.0]
    assert evaluator.wait_compiled()
    second = _run_threads(batcher, calls)
    assert batcher.batches == 1 and [float(r.loss) for r, _ in second] == [1.0, 2.0]


# -- through the server: unary calls and stream items batch together -------------------

def test_concurrent_calls_through_the_server_are_batched_and_exact(server, address):
    """Ragged Huber requests with their own deltas from 12 threads (unary) and
    a stream: each answer equals the server's own evaluator on that request
    alone, a bad request fails alone, and the batch metrics saw batches of
    more than one request."""
    import lossd

    registry = server.metrics.registry
    before = (registry.get_sample_value("lossd_batch_size_requests_sum") or 0.0,
              registry.get_sample_value("lossd_batch_size_requests_count") or 0.0)
    rng = np.random.default_rng(8)
    requests = []
    for k in range(48):
        rows = int(rng.integers(1, 40))
        requests.append(dict(loss="huber", params={"delta": float(rng.uniform(0.5, 2.0))},
                             y_true=rng.normal(size=(rows, 10)).astype(np.float32),
                             y_pred=rng.normal(size=(rows, 10)).astype(np.float32),
                             reduction=wire.REDUCTIONS[k % len(wire.REDUCTIONS)], gradient=bool(k % 2),
                             sample_weight=rng.uniform(0, 2, rows).astype(np.float32) if k % 3 else None))
    bad_rows = requests[20]["y_pred"].shape[0] + 1
    requests[20]["y_true"] = np.zeros((bad_rows, 10), np.float32)  # rows that do not match y_pred's
    answers: dict[int, object] = {}

    def unary(indices):
        with lossd.Client(address, timeout=60) as c:
            for i in indices:
                for _ in range(100):  # a burst of new programs is refused (COMPILE_BUSY) while they compile
                    try:
                        answers[i] = c.evaluate(**requests[i])
                    except lossd.LossdError as error:
                        answers[i] = error
                    if getattr(answers[i], "reason", "") != "COMPILE_BUSY":
                        break
                    time.sleep(0.1)

    def stream(indices):
        with lossd.Client(address, timeout=60) as c:
            for i, answer in zip(indices, c.evaluate_many(requests[i] for i in indices)):
                answers[i] = answer
        unary([i for i in indices if getattr(answers[i], "reason", "") == "COMPILE_BUSY"])

    for _ in range(2):  # the first round compiles; the second finds programs cached
        threads = [threading.Thread(target=unary, args=(range(k, 40, 10),)) for k in range(10)]
        threads.append(threading.Thread(target=stream, args=(range(40, 48),)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(answers) == len(requests)
    evaluator = server.evaluator
    for i, request in enumerate(requests):
        plan = evaluator.planner.plan({"name": "huber", "params": request["params"]})
        call = dict(plan=plan, tensors={"y_true": request["y_true"], "y_pred": request["y_pred"]},
                    sample_weight=request["sample_weight"], reduction=request["reduction"],
                    gradient=request["gradient"])
        if i == 20:
            assert isinstance(answers[i], lossd.LossdError) and answers[i].reason == "SHAPE_MISMATCH", answers[i]
            continue
        got = answers[i]
        assert not isinstance(got, Exception), got
        _assert_same(evaluator, call, got, evaluator.evaluate(**call), exact=True)
    after = (registry.get_sample_value("lossd_batch_size_requests_sum"),
             registry.get_sample_value("lossd_batch_size_requests_count"))
    assert after[0] - before[0] > after[1] - before[1], "no batch of more than one request"
