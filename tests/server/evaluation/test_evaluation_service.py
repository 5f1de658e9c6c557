"""The evaluation service (``lossd_server.evaluation.service``), in process,
without a network: what every front end calls.

- Its answers are Keras's (``tests/keras_reference.py``), whether the spec
  comes as a ``LossSpec`` message or as its dict form, with batching on or
  off (property test).
- Admission runs on the declared sizes before any tensor is decoded: a
  refused request never calls its ``decode``.
- Tensor-name rules and required fields give their reasons.
- One metering point: an evaluation is counted once with its outcome, and a
  caller's usage only once admitted.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

keras = pytest.importorskip("keras")

from tests.keras_reference import value_and_gradient  # noqa: E402
from lossd import wire  # noqa: E402
from lossd_server.callers import Caller, Limits  # noqa: E402
from lossd_server.errors import InvalidArgument, LossdError, ResourceExhausted  # noqa: E402
from lossd_server.evaluation import backend  # noqa: E402
from lossd_server.evaluation.admission import Admission  # noqa: E402
from lossd_server.evaluation.batching import Batcher  # noqa: E402
from lossd_server.evaluation.evaluator import Evaluator  # noqa: E402
from lossd_server.evaluation.service import EvaluationRequest, EvaluationService, Incoming  # noqa: E402
from lossd_server.losses import custom  # noqa: E402
from lossd_server.observability.metrics import Metrics  # noqa: E402

MiB = 1 << 20


@pytest.fixture(scope="module")
def evaluator():
    ev = Evaluator(custom.full_registry(plugins=False), backend.select_device("cpu"),
                   expression_compiler=custom.inline_entry, max_pending_compiles=64)
    yield ev
    ev.close()


def service(evaluator, *, budget: int = 64 * MiB, metrics=None, batching: bool = False) -> EvaluationService:
    batcher = Batcher(evaluator, max_delay_us=500, max_elements=1 << 16, max_requests=8) if batching else None
    return EvaluationService(evaluator, Admission(budget, 4, 1.0), max_elements=1 << 24, metrics=metrics,
                             batcher=batcher)


def request(loss, y_true, y_pred, **kwargs) -> EvaluationRequest:
    return EvaluationRequest(loss=loss, tensors={"y_true": Incoming.of(y_true), "y_pred": Incoming.of(y_pred)},
                             **kwargs)


KERAS = {"mse": lambda delta: keras.losses.MeanSquaredError(reduction=None),
         "huber": lambda delta: keras.losses.Huber(delta=delta, reduction=None)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(KERAS)), delta=st.floats(0.25, 4.0), rows=st.integers(1, 40),
       columns=st.integers(1, 6), as_message=st.booleans(), batching=st.booleans(), gradient=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_its_answers_are_keras_for_a_message_or_a_dict_spec(evaluator, name, delta, rows, columns, as_message,
                                                            batching, gradient, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.normal(size=(rows, columns)).astype(np.float32)
    y_pred = rng.normal(size=(rows, columns)).astype(np.float32)
    spec = {"name": name, "params": {"delta": delta}} if name == "huber" else {"name": name}
    loss = wire.spec_from_dict(spec) if as_message else spec
    result = service(evaluator, batching=batching).evaluate(
        request(loss, y_true, y_pred, reduction="none", gradient=gradient))
    values, grad = value_and_gradient(KERAS[name](delta), y_true, y_pred)
    np.testing.assert_allclose(result.loss, values, rtol=1e-6, atol=1e-7)
    if gradient:
        np.testing.assert_allclose(result.gradient, grad, rtol=1e-6, atol=1e-7)
    else:
        assert result.gradient is None
    assert result.non_finite is False


def _never(field: str):
    def decode():
        raise AssertionError(f"{field} was decoded before admission refused the request")
    return decode


def test_admission_refuses_from_the_declared_sizes_before_any_decode(evaluator):
    big = EvaluationRequest(loss={"name": "mse"}, tensors={
        "y_true": Incoming(wire.dtype_enum(np.dtype("float32")), (1024, 1024), _never("y_true")),
        "y_pred": Incoming(wire.dtype_enum(np.dtype("float32")), (1024, 1024), _never("y_pred"))})
    with pytest.raises(InvalidArgument) as refused:
        service(evaluator, budget=4 * MiB).evaluate(big)  # 8 MiB declared
    assert refused.value.reason == "REQUEST_TOO_LARGE"
    limited = Caller("slow", frozenset({"evaluate"}), Limits(elements_per_second=100.0))
    small = EvaluationRequest(loss={"name": "mse"}, tensors={
        "y_true": Incoming(wire.dtype_enum(np.dtype("float32")), (1000,), _never("y_true")),
        "y_pred": Incoming(wire.dtype_enum(np.dtype("float32")), (1000,), _never("y_pred"))})
    svc = service(evaluator)
    # A bucket of 100 elements a second takes one request of 1,000 when full, and is then in debt.
    svc.evaluate(request({"name": "mse"}, np.ones(1000, np.float32), np.ones(1000, np.float32)), limited)
    with pytest.raises(ResourceExhausted) as limited_out:
        svc.evaluate(small, limited)
    assert limited_out.value.reason == "CALLER_RATE_LIMIT"


def test_a_shape_beyond_the_element_limit_is_refused_before_any_decode(evaluator):
    huge = EvaluationRequest(loss={"name": "mse"}, tensors={
        "y_true": Incoming(wire.dtype_enum(np.dtype("float32")), (1 << 30, 1 << 30), _never("y_true")),
        "y_pred": Incoming(wire.dtype_enum(np.dtype("float32")), (2,), _never("y_pred"))})
    with pytest.raises(wire.WireError) as refused:
        service(evaluator).evaluate(huge)
    assert "y_true" in str(refused.value)


@pytest.mark.parametrize("tensors, loss, reason", [
    ({"y_pred": np.ones(2, np.float32)}, {"name": "mse"}, "BAD_TENSOR"),
    ({"y_true": np.ones(2, np.float32)}, {"name": "mse"}, "BAD_TENSOR"),
    ({"y_true": np.ones(2, np.float32), "y_pred": np.ones(2, np.float32)}, None, "BAD_LOSS_SPEC"),
    ({"y_true": np.ones(2, np.float32), "y_pred": np.ones(2, np.float32), "sample_weight": np.ones(2)},
     {"expression": "mean(square(y_true - y_pred))"}, "BAD_TENSOR"),
    ({"y_true": np.ones(2, np.float32), "y_pred": np.ones(2, np.float32), "1bad": np.ones(2)},
     {"expression": "mean(square(y_true - y_pred))"}, "BAD_TENSOR"),
    ({"y_true": np.ones(2, np.float32), "y_pred": np.ones(2, np.float32)}, {"name": "no_such_loss"},
     "UNKNOWN_LOSS"),
])
def test_requests_it_cannot_evaluate_get_their_reasons(evaluator, tensors, loss, reason):
    made = EvaluationRequest(loss=loss, tensors={name: Incoming.of(a) for name, a in tensors.items()})
    with pytest.raises(LossdError) as refused:
        service(evaluator).evaluate(made)
    assert refused.value.reason == reason, refused.value


def test_an_extra_tensor_reaches_the_expression(evaluator):
    y = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    made = EvaluationRequest(loss={"expression": "mean(square(y_true - y_pred) * scale)"},
                             tensors={"y_true": Incoming.of(y), "y_pred": Incoming.of(y + 1),
                                      "scale": Incoming.of(np.full((2, 2), 3.0, np.float32))})
    assert float(service(evaluator).evaluate(made).loss) == pytest.approx(3.0)


def _sample(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_one_metering_point_counts_each_evaluation_once_and_usage_once_admitted(evaluator):
    registry = CollectorRegistry()
    metrics = Metrics(registry, loss_names=["mean_squared_error"], version="t", process_metrics=False)
    svc = service(evaluator, metrics=metrics, budget=MiB)
    caller = Caller("alice", frozenset({"evaluate"}))
    metrics.known_callers(["alice"])
    y = np.ones((4, 3), np.float32)
    svc.evaluate(request({"name": "mse"}, y, y), caller)
    with pytest.raises(InvalidArgument):  # refused by admission: counted, no usage
        svc.evaluate(request({"name": "mse"}, np.ones((512, 512), np.float32), np.ones((512, 512), np.float32)),
                     caller)
    with pytest.raises(InvalidArgument):  # admitted, then refused by the loss's shape checks
        svc.evaluate(request({"name": "mse"}, np.ones((4, 3), np.float32), np.ones((5, 3), np.float32)), caller)
    counted = {outcome: _sample(registry, "lossd_loss_evaluations_total", loss="mean_squared_error",
                                outcome=outcome) for outcome in ("ok", "invalid_argument", "error")}
    assert counted == {"ok": 1, "invalid_argument": 2, "error": 0}
    assert _sample(registry, "lossd_loss_evaluation_duration_seconds_count", loss="mean_squared_error") == 3
    assert _sample(registry, "lossd_loss_evaluated_elements_total", loss="mean_squared_error") == 12 + 15
    assert _sample(registry, "lossd_caller_requests_total", caller="alice") == 2
    assert _sample(registry, "lossd_caller_elements_total", caller="alice") == 12 + 15
    assert svc.admission.inflight_bytes == 0  # every admitted request gave its bytes back


def test_a_reduction_comes_as_a_name_or_a_lossd_v1_enum_and_a_bad_one_is_metered(evaluator):
    registry = CollectorRegistry()
    metrics = Metrics(registry, loss_names=["mean_squared_error"], version="t", process_metrics=False)
    svc = service(evaluator, metrics=metrics)
    y = np.arange(6, dtype=np.float32).reshape(3, 2)
    by_name = svc.evaluate(request({"name": "mse"}, y, y + 1, reduction="sum"))
    by_enum = svc.evaluate(request({"name": "mse"}, y, y + 1, reduction=wire.reduction_enum("sum")))
    assert float(by_name.loss) == float(by_enum.loss) == pytest.approx(3.0)
    for bad in (99, "average"):
        with pytest.raises(wire.WireError) as refused:
            svc.evaluate(request({"name": "mse"}, y, y + 1, reduction=bad))
        assert refused.value.reason == "BAD_REDUCTION"
    assert _sample(registry, "lossd_loss_evaluations_total", loss="mean_squared_error",
                   outcome="invalid_argument") == 2
