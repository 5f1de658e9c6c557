"""Issue 23, part 1: compute cost bounded before work.

The reproductions (a 28 KB ``ctc`` request that took 55 s of CPU, ``circle``
on 30,000 rows that took RSS past 6 GB, ``matrix_crossentropy`` with 30,000
float16 classes that peaked at 5.3 GB) are refused from their shapes alone:
RESOURCE_EXHAUSTED with the estimate, the limit and the setting in ErrorInfo,
quickly, by a real ``lossd serve`` process whose RSS is watched; realistic
requests still pass. The cost model itself is checked on the envelope of
realistic shapes (docs/limits.md) with hypothesis: the default limits accept
all of it, the estimate never falls when a dimension grows, and a composite
costs the sum of its terms.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.grpc_errors import error_info, status_of
from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc
from tests.servers import kill_group, serve_process

pytest.importorskip("tensorflow")

from lossd_server.config import Settings  # noqa: E402
from lossd_server.errors import ResourceExhausted  # noqa: E402
from lossd_server.losses import cost  # noqa: E402
from lossd_server.losses.custom import full_registry, inline_entry  # noqa: E402
from lossd_server.losses.expression_shapes import ShapeError  # noqa: E402
from lossd_server.losses.plan import Planner  # noqa: E402

DEFAULTS = Settings()
LIMITS = cost.CostLimits(DEFAULTS.max_evaluation_cost, DEFAULTS.max_evaluation_memory_bytes)
ELEMENTWISE = ["mse", "mae", "huber", "log_cosh", "binary_crossentropy", "categorical_crossentropy",
               "kl_divergence", "poisson", "hinge", "cosine_similarity", "dice", "tversky"]


@pytest.fixture(scope="module")
def planner():
    return Planner(full_registry(plugins=False), inline_entry, max_terms=16)


# The three reproductions of issue 23: (spec, y_true, y_pred, reason).
def ctc_bomb():
    return np.ones((1, 1000), np.int32), np.zeros((1, 2000, 3), np.float32)


def circle_bomb():
    return np.arange(30000, dtype=np.int8) % 7, np.ones((30000, 1), np.float16)


def matrix_bomb():
    return np.zeros((1, 30000), np.float16), np.full((1, 30000), 1 / 30000, np.float16)


BOMBS = [("ctc", ctc_bomb, "COST_TOO_HIGH"), ("circle", circle_bomb, "MEMORY_TOO_HIGH"),
         ("matrix_crossentropy", matrix_bomb, "MEMORY_TOO_HIGH")]


@pytest.mark.parametrize("name,make,reason", BOMBS)
def test_reproductions_are_refused_from_their_shapes(planner, name, make, reason):
    y_true, y_pred = make()
    assert y_true.nbytes + y_pred.nbytes <= 130_000  # the request sizes: 28 KB, 90 KB, 120 KB
    plan = planner.plan({"name": name})
    for gradient in (False, True):
        with pytest.raises(ResourceExhausted) as exc:
            LIMITS.check(plan, {"y_true": y_true.shape, "y_pred": y_pred.shape}, y_pred.itemsize, gradient)
        assert exc.value.reason == reason
        setting = {"COST_TOO_HIGH": "LOSSD_MAX_EVALUATION_COST",
                   "MEMORY_TOO_HIGH": "LOSSD_MAX_EVALUATION_MEMORY_BYTES"}[reason]
        assert exc.value.metadata["setting"] == setting
        assert int(exc.value.metadata["estimate"]) > int(exc.value.metadata["limit"])
        assert "Expected at most" in exc.value.message and "Received: y_pred.shape=" in exc.value.message


# The envelope of realistic requests (docs/limits.md): what the defaults must admit.
def elementwise_shapes():
    return st.tuples(st.integers(1, 4096), st.integers(1, 2048)).filter(lambda s: s[0] * s[1] <= 4_000_000)


@st.composite
def realistic(draw):
    kind = draw(st.sampled_from(["elementwise", "circle", "ctc", "matrix", "expression"]))
    gradient = draw(st.booleans())
    if kind == "elementwise":
        shape = draw(elementwise_shapes())
        return {"name": draw(st.sampled_from(ELEMENTWISE))}, {"y_true": shape, "y_pred": shape}, 4, gradient
    if kind == "circle":
        rows, features = draw(st.integers(1, 4096)), draw(st.integers(1, 512))
        return {"name": "circle"}, {"y_true": (rows,), "y_pred": (rows, features)}, 4, gradient
    if kind == "ctc":
        batch, steps, classes = draw(st.integers(1, 32)), draw(st.integers(1, 200)), draw(st.integers(2, 100))
        length = draw(st.integers(1, 50))
        return {"name": "ctc"}, {"y_true": (batch, length), "y_pred": (batch, steps, classes)}, 4, gradient
    if kind == "matrix":
        batch, classes = draw(st.integers(1, 256)), draw(st.integers(2, 4096))
        return {"name": "matrix_crossentropy"}, {"y_true": (batch, classes), "y_pred": (batch, classes)}, 4, gradient
    shape = draw(elementwise_shapes())
    return ({"expression": "mean(square(y_true - y_pred) + 0.5 * abs(log(y_pred + 1e-7)), axis=-1)"},
            {"y_true": shape, "y_pred": shape}, 4, gradient)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=realistic())
def test_default_limits_admit_realistic_requests(planner, case):
    spec, shapes, itemsize, gradient = case
    LIMITS.check(planner.plan(spec), shapes, itemsize, gradient)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=realistic(), axis=st.integers(0, 2), factor=st.integers(2, 8))
def test_cost_never_falls_when_a_dimension_grows(planner, case, axis, factor):
    spec, shapes, itemsize, gradient = case
    plan = planner.plan(spec)
    before = cost.estimate(plan, shapes, itemsize, gradient)
    pred = list(shapes["y_pred"])
    axis %= len(pred)
    pred[axis] *= factor
    grown = dict(shapes, y_pred=tuple(pred))
    true = list(shapes["y_true"])
    if axis < len(true) and (spec.get("name") != "ctc" or axis == 0):
        true[axis] *= factor  # y_true follows y_pred along shared axes (ctc: only the batch)
        grown["y_true"] = tuple(true)
    after = cost.estimate(plan, grown, itemsize, gradient)
    assert after.work >= before.work and after.memory >= before.memory


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=realistic(), second=realistic())
def test_a_composite_costs_the_sum_of_its_terms(planner, first, second):
    if first[1] != second[1]:
        second = (second[0], first[1], first[2], first[3])  # one request: the terms read the same tensors
    spec, shapes, itemsize, gradient = first
    terms = [{"loss": spec, "label": "a"}, {"loss": second[0], "label": "b"}]
    try:
        composite = planner.plan({"terms": terms})
    except Exception:  # noqa: BLE001 - two stateful terms cannot share one output name
        return
    try:
        parts = [cost.estimate(planner.plan(t["loss"]), shapes, itemsize, gradient) for t in terms]
    except ShapeError:  # an expression on shapes it cannot take: refused before its cost is asked
        return
    total = cost.estimate(composite, shapes, itemsize, gradient)
    assert total.work == pytest.approx(parts[0].work + parts[1].work)
    assert total.memory == pytest.approx(parts[0].memory + parts[1].memory)


# ---------------------------------------------------------------------------
# A real `lossd serve` process with default settings, its RSS watched.

def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(field)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data = tmp_path_factory.mktemp("cost-data")
    proc, address = serve_process(data, data / "server.log", {"LOSSD_WARMUP": "false"})
    try:
        # matrix_crossentropy answers with its updated matrix: 4 MB for 1000 classes.
        with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            yield proc, loss_service_pb2_grpc.LossServiceStub(channel)
    finally:
        kill_group(proc)


def _request(name: str, y_true, y_pred, gradient=False) -> loss_service_pb2.EvaluateRequest:
    return loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name=name), y_true=wire.from_numpy(y_true),
                                            y_pred=wire.from_numpy(y_pred), gradient=gradient)


@pytest.mark.parametrize("name,make,reason", BOMBS)
def test_server_refuses_reproductions_quickly_with_bounded_rss(served, name, make, reason):
    proc, stub = served
    before = _rss_mib(proc.pid)
    y_true, y_pred = make()
    for gradient in (False, True):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Evaluate(_request(name, y_true, y_pred, gradient), timeout=30)
        elapsed = time.monotonic() - start
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        info = error_info(status_of(err.value))
        assert info.reason == reason, err.value.details()
        assert info.metadata["loss"] == name and info.metadata["setting"].startswith("LOSSD_MAX_EVALUATION_")
        assert int(info.metadata["estimate"]) > int(info.metadata["limit"])
        assert elapsed < 5, f"refused after {elapsed:.1f} s: the refusal must come before any work"
    # Nothing was compiled or allocated for them: the server's RSS barely moved.
    assert _rss_mib(proc.pid) - before < 100


def test_server_still_evaluates_realistic_requests(served):
    proc, stub = served
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 30, (32, 20)).astype(np.int32)
    logits = rng.standard_normal((32, 100, 30)).astype(np.float32)
    ids = rng.integers(0, 100, 2048).astype(np.int32)
    embeddings = rng.standard_normal((2048, 64)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    onehot = np.eye(1000, dtype=np.float32)[rng.integers(0, 1000, 64)]
    probs = rng.dirichlet(np.ones(1000), 64).astype(np.float32)
    for name, y_true, y_pred in [("ctc", labels, logits), ("circle", ids, embeddings),
                                 ("matrix_crossentropy", onehot, probs)]:
        for gradient in (False, True):
            response = stub.Evaluate(_request(name, y_true, y_pred, gradient), timeout=120)
            assert np.isfinite(wire.to_numpy(response.loss)).all(), name
    assert _rss_mib(proc.pid, "VmHWM") < 4096


def test_chunked_request_whose_row_costs_too_much_is_refused_at_its_header(served):
    _, stub = served
    y_true, y_pred = ctc_bomb()
    header = loss_service_pb2.EvaluateChunkedRequest(header=loss_service_pb2.ChunkedHeader(
        loss=loss_pb2.LossSpec(name="ctc"), y_true=wire.info(y_true, field="y_true"),
        y_pred=wire.info(y_pred, field="y_pred")))
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.EvaluateChunked(iter([header]), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert error_info(status_of(err.value)).reason == "COST_TOO_HIGH"
    assert time.monotonic() - start < 5
