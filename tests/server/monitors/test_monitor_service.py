"""MonitorService on a real server over gRPC: the resource (create, get,
list in pages, delete, refusals), predictions and labels paired in either
order and at once, their losses proven equal to Keras's over the same
pairs, the bounds refused before any work, expiry, retried calls, the
stream, the drift test and the scopes and owners of tokens."""

from __future__ import annotations

import itertools
import math
import time

import grpc
import keras
import numpy as np
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossd import wire
from lossd.v1 import monitor_service_pb2 as pb
from lossd.v1 import monitor_service_pb2_grpc as pb_grpc
from tests.grpc_errors import error_info, status_of
from tests.servers import lossd_servers

_names = (f"m{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    with lossd_servers(tmp_path_factory, warmup=False, metrics_cache_seconds=0) as start:
        yield start


@pytest.fixture(scope="module")
def stub(serving):
    srv = serving(max_monitors=50, max_pending_ids=40, max_monitor_segments=3, max_monitor_ids_per_call=64,
                  max_monitor_row_bytes=256)
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield pb_grpc.MonitorServiceStub(channel)


def seconds(*values) -> list:
    return [duration_pb2.Duration(seconds=v) for v in values]


def create(stub, loss=None, windows=(3600,), keys=(), retention=None, name=None) -> str:
    name = name or next(_names)
    monitor = pb.Monitor(loss=wire.spec_from_dict(loss or {"name": "mean_squared_error"}), windows=seconds(*windows),
                         segment_keys=keys)
    if retention is not None:
        monitor.retention.seconds = retention
    return stub.CreateMonitor(pb.CreateMonitorRequest(monitor_id=name, monitor=monitor)).name


def observe(stub, name, ids, y_pred=None, y_true=None, **segments):
    request = pb.ObserveRequest(monitor=name, ids=ids, segments=segments)
    if y_pred is not None:
        request.y_pred.CopyFrom(wire.from_numpy(y_pred))
    if y_true is not None:
        request.y_true.CopyFrom(wire.from_numpy(y_true))
    return stub.Observe(request)


def label(stub, name, ids, y_true):
    return stub.Label(pb.LabelRequest(monitor=name, ids=ids, y_true=wire.from_numpy(y_true)))


def refusal(call) -> tuple:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), error_info(status_of(raised.value)).reason


def report(stub, name) -> pb.MonitorReport:
    return stub.GetMonitor(pb.GetMonitorRequest(name=name)).report


# -- the resource -------------------------------------------------------------------


def test_create_get_list_delete(stub):
    names = [create(stub, windows=(300, 60), keys=("region",), retention=120) for _ in range(3)]
    got = stub.GetMonitor(pb.GetMonitorRequest(name=names[0]))
    assert got.name == names[0] and [w.seconds for w in got.windows] == [60, 300]  # shortest first
    assert got.retention.seconds == 120 and list(got.segment_keys) == ["region"] and got.create_time.seconds
    assert not got.HasField("reference_time")
    assert [(w.window.seconds, w.segment, w.count) for w in got.report.windows] == [(60, "", 0), (300, "", 0)]
    assert math.isnan(got.report.windows[0].mean_loss)
    listed, token = [], ""
    while True:
        page = stub.ListMonitors(pb.ListMonitorsRequest(page_size=2, page_token=token))
        assert len(page.monitors) <= 2 and all(not m.HasField("report") for m in page.monitors)
        listed += [m.name for m in page.monitors]
        token = page.next_page_token
        if not token:
            break
    assert set(names) <= set(listed) and listed == sorted(listed)
    for name in names:
        stub.DeleteMonitor(pb.DeleteMonitorRequest(name=name))
    assert refusal(lambda: stub.GetMonitor(pb.GetMonitorRequest(name=names[0]))) == (
        grpc.StatusCode.NOT_FOUND, "MONITOR_NOT_FOUND")
    assert refusal(lambda: stub.DeleteMonitor(pb.DeleteMonitorRequest(name=names[0])))[1] == "MONITOR_NOT_FOUND"


@pytest.mark.parametrize("monitor_id, monitor, reason", [
    ("Bad_Name", {}, "BAD_MONITOR_ID"),
    ("ok", {"loss": None}, "BAD_LOSS_SPEC"),
    ("ok", {"loss": {"name": "no_such_loss"}}, "UNKNOWN_LOSS"),
    ("ok", {"windows": ()}, "BAD_MONITOR_WINDOWS"),
    ("ok", {"windows": (60, 60)}, "BAD_MONITOR_WINDOWS"),
    ("ok", {"windows": (8 * 86400,)}, "BAD_MONITOR_WINDOWS"),
    ("ok", {"keys": ("Region",)}, "BAD_SEGMENT_KEYS"),
    ("ok", {"keys": ("a", "a")}, "BAD_SEGMENT_KEYS"),
    ("ok", {"retention": 0}, "BAD_RETENTION"),
])
def test_create_refuses_what_it_cannot_keep(stub, monitor_id, monitor, reason):
    fields = {"loss": {"name": "mean_squared_error"}, "windows": (60,), "keys": (), **monitor}
    message = pb.Monitor(windows=seconds(*fields["windows"]), segment_keys=fields["keys"])
    if fields["loss"] is not None:
        message.loss.CopyFrom(wire.spec_from_dict(fields["loss"]))
    if "retention" in fields:
        message.retention.CopyFrom(duration_pb2.Duration(seconds=fields["retention"]))
    code, got = refusal(lambda: stub.CreateMonitor(pb.CreateMonitorRequest(monitor_id=monitor_id, monitor=message)))
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


def test_a_name_is_taken_once_and_monitors_are_bounded(serving):
    srv = serving(max_monitors=2)
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = pb_grpc.MonitorServiceStub(channel)
        create(stub, name="first")
        assert refusal(lambda: create(stub, name="first")) == (grpc.StatusCode.ALREADY_EXISTS, "MONITOR_EXISTS")
        create(stub, name="second")
        assert refusal(lambda: create(stub, name="third")) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                               "TOO_MANY_MONITORS")
        stub.DeleteMonitor(pb.DeleteMonitorRequest(name="monitors/second"))
        create(stub, name="third")


# -- pairs and their losses -----------------------------------------------------------

LOSSES = {
    "mean_squared_error": (lambda: keras.losses.MeanSquaredError(), "regression"),
    "huber": (lambda: keras.losses.Huber(delta=0.5), "regression"),
    "categorical_crossentropy": (lambda: keras.losses.CategoricalCrossentropy(), "probabilities"),
    "sparse_categorical_crossentropy": (lambda: keras.losses.SparseCategoricalCrossentropy(), "classes"),
}


def _rows(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "regression":
        return rng.normal(size=(n, 2)).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32)
    logits = rng.normal(size=(n, 4))
    probabilities = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    classes = rng.integers(0, 4, size=n)
    if kind == "classes":
        return probabilities, classes.astype(np.float32)
    return probabilities, np.eye(4, dtype=np.float32)[classes]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(loss=st.sampled_from(sorted(LOSSES)), n=st.integers(1, 30), seed=st.integers(0, 2**16),
       orders=st.data())
def test_a_monitors_mean_is_keras_mean_over_the_same_pairs(stub, loss, n, seed, orders):
    """Each id arrives prediction first, label first or both at once, in
    calls of random sizes: the window's mean, count and percentiles are
    those of Keras's per-sample losses over the pairs."""
    make, kind = LOSSES[loss]
    params = {"delta": 0.5} if loss == "huber" else {}
    name = create(stub, loss={"name": loss, "params": params})
    y_pred, y_true = _rows(kind, n, seed)
    order = orders.draw(st.lists(st.sampled_from(["pred_first", "label_first", "both"]), min_size=n, max_size=n))
    ids = [f"id-{i}" for i in range(n)]
    groups = {k: [i for i in range(n) if order[i] == k] for k in ("pred_first", "label_first", "both")}
    steps = [("pred", groups["pred_first"]), ("label", groups["label_first"]), ("both", groups["both"]),
             ("pred", groups["label_first"]), ("label", groups["pred_first"])]
    for what, rows in steps:
        for chunk in np.array_split(np.array(rows, int), max(1, len(rows) // 7)):
            if not len(chunk):
                continue
            chosen = [ids[i] for i in chunk]
            if what == "pred":
                observe(stub, name, chosen, y_pred[chunk])
            elif what == "label":
                label(stub, name, chosen, y_true[chunk])
            else:
                observe(stub, name, chosen, y_pred[chunk], y_true[chunk])
    window = report(stub, name).windows[0]
    per_sample = np.asarray(make().call(y_true, y_pred), np.float64)  # Keras's per-sample losses
    assert window.count == n
    assert window.mean_loss == pytest.approx(float(make()(y_true, y_pred)), rel=1e-5, abs=1e-6)
    assert [window.p50_loss, window.p90_loss, window.p99_loss] == pytest.approx(
        np.percentile(per_sample, [50, 90, 99]), rel=1e-5, abs=1e-6)
    assert window.labelled_fraction == 1.0
    stub.DeleteMonitor(pb.DeleteMonitorRequest(name=name))


def test_pending_halves_segments_and_label_delay(stub):
    name = create(stub, keys=("model_version", "region"))
    y_pred, y_true = _rows("regression", 12, 1)
    ids = [f"r{i}" for i in range(12)]
    first = observe(stub, name, ids[:8], y_pred[:8], model_version="v1", region="eu")
    assert (first.accepted, first.paired, first.pending) == (8, 0, 8)
    observe(stub, name, ids[8:], y_pred[8:], model_version="v2")
    time.sleep(0.3)
    done = label(stub, name, ids[4:10], y_true[4:10])
    assert (done.accepted, done.paired, done.pending) == (6, 6, 0)
    got = report(stub, name)
    assert (got.pending_predictions, got.pending_labels) == (6, 0)
    by_segment = {w.segment: w for w in got.windows}
    assert set(by_segment) == {"", "model_version=v1,region=eu", "model_version=v2,region="}
    both = by_segment[""]
    assert both.count == 6 and both.labelled_fraction == pytest.approx(6 / 12)
    assert both.median_label_delay_seconds >= 0.3
    assert by_segment["model_version=v1,region=eu"].count == 4
    assert by_segment["model_version=v2,region="].labelled_fraction == pytest.approx(2 / 4)
    per_sample = np.mean((y_pred[4:10] - y_true[4:10]).astype(np.float64) ** 2, axis=1)
    assert both.mean_loss == pytest.approx(per_sample.mean(), rel=1e-5)


def test_a_retried_call_counts_once(stub):
    name = create(stub)
    y_pred, y_true = _rows("regression", 5, 2)
    ids = [f"x{i}" for i in range(5)]
    assert observe(stub, name, ids, y_pred, y_true).paired == 5
    again = observe(stub, name, ids, y_pred, y_true)
    assert (again.accepted, again.paired, again.duplicates) == (5, 0, 5)
    assert label(stub, name, ids, y_true).duplicates == 5
    assert report(stub, name).windows[0].count == 5


def test_observe_stream_answers_each_request(stub):
    name = create(stub)
    y_pred, y_true = _rows("regression", 6, 3)

    def requests():
        yield pb.ObserveRequest(monitor=name, ids=["a", "b"], y_pred=wire.from_numpy(y_pred[:2]))
        yield pb.ObserveRequest(monitor=name, ids=["c"], y_pred=wire.from_numpy(y_pred[:2]))  # 2 rows, 1 id
        yield pb.ObserveRequest(monitor=name, ids=["a", "b"], y_true=wire.from_numpy(y_true[:2]))  # labels only
        yield pb.ObserveRequest(monitor=name, ids=["d"], y_pred=wire.from_numpy(y_pred[3:4]),
                                y_true=wire.from_numpy(y_true[3:4]))

    answers = list(stub.ObserveStream(requests()))
    assert [(a.pending, a.paired, a.HasField("error")) for a in answers] == [
        (2, 0, False), (0, 0, True), (0, 2, False), (0, 1, False)]
    assert error_info(answers[1].error).reason == "SHAPE_MISMATCH"
    assert report(stub, name).windows[0].count == 3


# -- bounds, before any work ---------------------------------------------------------------


def test_bounds_are_refused_before_anything_is_stored(stub):
    name = create(stub, keys=("v",))
    rows = np.zeros((64, 1), np.float32)
    too_many = [f"i{i}" for i in range(65)]
    assert refusal(lambda: observe(stub, name, too_many, np.zeros((65, 1), np.float32))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_IDS")
    assert refusal(lambda: observe(stub, name, ["big"], np.zeros((1, 65), np.float32)))[1] == "ROW_TOO_LARGE"
    observe(stub, name, [f"p{i}" for i in range(30)], rows[:30], v="a")
    assert refusal(lambda: observe(stub, name, [f"q{i}" for i in range(11)], rows[:11], v="a")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_PENDING_IDS")
    assert refusal(lambda: label(stub, name, [f"q{i}" for i in range(11)], rows[:11]))[1] == "TOO_MANY_PENDING_IDS"
    got = report(stub, name)
    assert (got.pending_predictions, got.pending_labels) == (30, 0)  # nothing of the refused calls
    # Labels for pending predictions make room: they pair, they do not wait.
    assert label(stub, name, [f"p{i}" for i in range(30)], rows[:30]).paired == 30
    observe(stub, name, ["s1"], rows[:1], v="b")
    observe(stub, name, ["s2"], rows[:1], v="c")
    assert refusal(lambda: observe(stub, name, ["s3"], rows[:1], v="d")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_SEGMENTS")
    assert refusal(lambda: observe(stub, name, ["s3"], rows[:1], w="x")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "BAD_SEGMENTS")
    assert refusal(lambda: observe(stub, name, ["d", "d"], rows[:2])) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_IDS")
    assert refusal(lambda: observe(stub, "monitors/nobody", ["a"], rows[:1])) == (
        grpc.StatusCode.NOT_FOUND, "MONITOR_NOT_FOUND")


def test_unpaired_halves_expire_and_are_counted(stub):
    name = create(stub, retention=1, windows=(60,))
    rows = np.ones((5, 1), np.float32)
    observe(stub, name, [f"e{i}" for i in range(5)], rows)
    label(stub, name, [f"l{i}" for i in range(3)], rows[:3])
    time.sleep(1.3)
    got = report(stub, name)
    assert (got.pending_predictions, got.pending_labels, got.expired_predictions, got.expired_labels) == (0, 0, 5, 3)
    assert got.windows[0].count == 0 and got.windows[0].labelled_fraction == 0.0
    # A label after its prediction expired is ignored, as a retried call is: the id is settled.
    late = label(stub, name, ["e0"], rows[:1])
    assert (late.duplicates, late.pending) == (1, 0)


# -- drift ------------------------------------------------------------------------------


def test_drift_against_the_reference(stub):
    name = create(stub, windows=(2, 3600))
    rng = np.random.default_rng(7)

    def pairs(prefix: str, scale: float):
        y_true = rng.normal(size=(60, 1)).astype(np.float32)
        y_pred = (y_true + rng.normal(scale=scale, size=(60, 1))).astype(np.float32)
        observe(stub, name, [f"{prefix}{i}" for i in range(60)], y_pred, y_true)

    pairs("ref", 0.5)
    captured = stub.CaptureReference(pb.CaptureReferenceRequest(name=name, window=duration_pb2.Duration(seconds=2)))
    assert captured.reference_window.seconds == 2 and captured.HasField("reference_time")
    time.sleep(2.2)  # the short window empties
    pairs("same", 0.5)
    same = report(stub, name).windows[0]
    assert same.drift.reference_count == 60 and same.drift.p_value > 0.01
    time.sleep(2.2)
    pairs("shifted", 2.0)
    shifted = report(stub, name).windows[0]
    assert shifted.drift.statistic > 0.5 and shifted.drift.p_value < 1e-6
    assert refusal(lambda: stub.CaptureReference(pb.CaptureReferenceRequest(
        name=name, window=duration_pb2.Duration(seconds=5))))[1] == "BAD_MONITOR_WINDOWS"


# -- tokens -------------------------------------------------------------------------------


def test_scopes_and_owners(serve_with_tokens):
    address, tokens, _ = serve_with_tokens({"alice": ("monitor",), "bob": ("monitor",), "eve": ("evaluate",),
                                            "root": ("admin",)})
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MonitorServiceStub(channel)

        def as_(who):
            return (("authorization", f"Bearer {tokens[who]}"),)

        monitor = pb.Monitor(loss=wire.spec_from_dict({"name": "mean_squared_error"}), windows=seconds(60))
        made = stub.CreateMonitor(pb.CreateMonitorRequest(monitor_id="alices", monitor=monitor), metadata=as_("alice"))
        assert made.owner == "alice"
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListMonitors(pb.ListMonitorsRequest(), metadata=as_("eve"))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(status_of(raised.value)).metadata["scope"] == "monitor"
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetMonitor(pb.GetMonitorRequest(name="monitors/alices"), metadata=as_("bob"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as raised:
            stub.Observe(pb.ObserveRequest(monitor="monitors/alices", ids=["a"],
                                           y_pred=wire.from_numpy(np.zeros((1, 1), np.float32))),
                         metadata=as_("bob"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.ListMonitors(pb.ListMonitorsRequest(), metadata=as_("bob")).monitors == []
        assert [m.name for m in stub.ListMonitors(pb.ListMonitorsRequest(), metadata=as_("root")).monitors] == [
            "monitors/alices"]
        stub.DeleteMonitor(pb.DeleteMonitorRequest(name="monitors/alices"), metadata=as_("root"))
