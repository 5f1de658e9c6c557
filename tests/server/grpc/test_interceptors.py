"""The observability interceptor on real servers: request ids, and RPC metrics
per method with the right ``grpc_type`` for each kind of RPC.

Two servers: a bare gRPC server with the interceptor and a probe service whose
handlers wait, fail or report the request id they see; and lossd itself (the
session ``server`` fixture), called with one real RPC of each kind.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc
from lossd.v1 import training_service_pb2, training_service_pb2_grpc
from lossd_server.grpc.interceptors import ObservabilityInterceptor
from lossd_server.observability.metrics import Metrics
from lossd_server.observability.requestid import current_request_id

PROBE = "lossd.test.Probe"
GENERATED_ID = re.compile(r"^[0-9a-f]{16}$")


class Probe:
    """Handlers of the probe service; requests and responses are raw bytes."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def request_id(self, request, context):
        return current_request_id().encode()

    def wait(self, request, context):
        self.entered.set()
        assert self.release.wait(30)
        time.sleep(0.06)
        return b""

    def fail(self, request, context):
        raise RuntimeError("a bug in a handler")

    def refuse(self, request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused on purpose")

    def request_ids(self, request, context):
        for _ in range(3):
            time.sleep(0.01)  # lets gRPC resume the generator from another thread
            yield current_request_id().encode()

    def count(self, request_iterator, context):
        return str(sum(1 for _ in request_iterator)).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(PROBE, {
            "RequestId": grpc.unary_unary_rpc_method_handler(self.request_id),
            "Wait": grpc.unary_unary_rpc_method_handler(self.wait),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Refuse": grpc.unary_unary_rpc_method_handler(self.refuse),
            "RequestIds": grpc.unary_stream_rpc_method_handler(self.request_ids),
            "Count": grpc.stream_unary_rpc_method_handler(self.count),
        })


@pytest.fixture
def probe():
    """(Probe, its channel, its metrics) on a fresh server and registry."""
    metrics = Metrics(CollectorRegistry(), loss_names=[], version="t", process_metrics=False)
    service = Probe()
    executor = futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(executor, interceptors=[ObservabilityInterceptor(metrics)])
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, channel, metrics
    finally:
        service.release.set()
        channel.close()
        server.stop(0).wait()
        executor.shutdown(wait=False)


def call(channel, method: str, request=b"", **kwargs):
    return channel.unary_unary(f"/{PROBE}/{method}")(request, timeout=30, **kwargs)


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def rpc_labels(grpc_type: str, method: str, service: str = PROBE) -> dict:
    return dict(grpc_type=grpc_type, grpc_service=service, grpc_method=method)


# Request ids.


def test_the_client_request_id_is_current_in_the_handler(probe):
    _, channel, _ = probe
    assert call(channel, "RequestId", metadata=[("x-request-id", "abc-123")]) == b"abc-123"


def test_a_request_id_is_made_up_when_the_client_sends_none(probe):
    _, channel, _ = probe
    first, second = call(channel, "RequestId").decode(), call(channel, "RequestId").decode()
    assert GENERATED_ID.match(first) and GENERATED_ID.match(second), (first, second)
    assert first != second


def test_a_client_request_id_is_bounded(probe):
    _, channel, _ = probe
    assert call(channel, "RequestId", metadata=[("x-request-id", "x" * 100)]) == b"x" * 64


def test_the_request_id_stays_current_across_a_response_stream(probe):
    _, channel, _ = probe
    stream = channel.unary_stream(f"/{PROBE}/RequestIds")(b"", timeout=30, metadata=[("x-request-id", "s-1")])
    assert list(stream) == [b"s-1"] * 3


# Metrics, on the probe: timing, in flight, failures.


def test_a_slow_call_is_in_flight_while_it_runs_and_timed_when_done(probe):
    service, channel, metrics = probe
    labels = rpc_labels("unary", "Wait")
    future = channel.unary_unary(f"/{PROBE}/Wait").future(b"", timeout=30)
    assert service.entered.wait(30)
    assert value(metrics, "grpc_server_started_total", **labels) == 1
    assert value(metrics, "lossd_grpc_in_flight_requests", grpc_service=PROBE, grpc_method="Wait") == 1
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) == 0
    service.release.set()
    assert future.result() == b""
    assert value(metrics, "lossd_grpc_in_flight_requests", grpc_service=PROBE, grpc_method="Wait") == 0
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) == 1
    assert value(metrics, "grpc_server_handling_seconds_bucket", le="0.05", **labels) == 0
    assert value(metrics, "grpc_server_handling_seconds_bucket", le="60.0", **labels) == 1
    assert value(metrics, "grpc_server_msg_received_total", **labels) == 1
    assert value(metrics, "grpc_server_msg_sent_total", **labels) == 1


@pytest.mark.parametrize("method, code", [("Fail", "UNKNOWN"), ("Refuse", "INVALID_ARGUMENT")])
def test_a_failing_call_is_counted_and_timed_under_its_code(probe, method, code):
    _, channel, metrics = probe
    labels = rpc_labels("unary", method)
    with pytest.raises(grpc.RpcError) as error:
        call(channel, method)
    assert error.value.code().name == code
    assert value(metrics, "grpc_server_handled_total", grpc_code=code, **labels) == 1
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) == 0
    assert value(metrics, "grpc_server_handling_seconds_count", **labels) == 1
    assert value(metrics, "grpc_server_msg_sent_total", **labels) == 0
    assert value(metrics, "lossd_grpc_in_flight_requests", grpc_service=PROBE, grpc_method=method) == 0


def test_stream_messages_are_counted_one_by_one(probe):
    _, channel, metrics = probe
    assert len(list(channel.unary_stream(f"/{PROBE}/RequestIds")(b"", timeout=30))) == 3
    assert channel.stream_unary(f"/{PROBE}/Count")(iter([b"a", b"b", b"c", b"d"]), timeout=30) == b"4"
    sent = rpc_labels("server_stream", "RequestIds")
    received = rpc_labels("client_stream", "Count")
    assert value(metrics, "grpc_server_msg_sent_total", **sent) == 3
    assert value(metrics, "grpc_server_msg_received_total", **sent) == 1
    assert value(metrics, "grpc_server_msg_received_total", **received) == 4
    assert value(metrics, "grpc_server_msg_sent_total", **received) == 1
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **sent) == 1
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **received) == 1


# Metrics, on lossd: one real RPC of each kind.

LOSS_SERVICE = "lossd.v1.LossService"
TRAINING_SERVICE = "lossd.v1.TrainingService"
HEALTH_SERVICE = "grpc.health.v1.Health"

METHOD_TYPES = {
    (LOSS_SERVICE, "ListLosses"): "unary",
    (LOSS_SERVICE, "Evaluate"): "unary",
    (LOSS_SERVICE, "EvaluateStream"): "bidi_stream",
    (LOSS_SERVICE, "EvaluateChunked"): "bidi_stream",
    (LOSS_SERVICE, "RegisterLoss"): "unary",
    (LOSS_SERVICE, "DeleteLoss"): "unary",
    (TRAINING_SERVICE, "CreateJob"): "unary",
    (TRAINING_SERVICE, "GetJob"): "unary",
    (TRAINING_SERVICE, "ListJobs"): "unary",
    (TRAINING_SERVICE, "CancelJob"): "unary",
    (TRAINING_SERVICE, "WatchJob"): "server_stream",
    (TRAINING_SERVICE, "UploadDataset"): "client_stream",
    (TRAINING_SERVICE, "ListDatasets"): "unary",
    (TRAINING_SERVICE, "DeleteDataset"): "unary",
    (TRAINING_SERVICE, "DownloadArtifact"): "server_stream",
    (TRAINING_SERVICE, "Predict"): "unary",
    (TRAINING_SERVICE, "Generate"): "unary",
    (TRAINING_SERVICE, "GenerateStream"): "server_stream",
}
GRPC_TYPES = ("unary", "client_stream", "server_stream", "bidi_stream")


@pytest.mark.parametrize("service, method", sorted(METHOD_TYPES))
def test_every_method_is_preinitialised_under_its_grpc_type(server, service, method):
    metrics = server.metrics
    expected = METHOD_TYPES[(service, method)]
    for grpc_type in GRPC_TYPES:
        started = value(metrics, "grpc_server_started_total", **rpc_labels(grpc_type, method, service))
        if grpc_type == expected:
            assert started is not None, f"{service}/{method} has no samples under grpc_type={expected}"
        else:
            assert started is None, f"{service}/{method} has samples under grpc_type={grpc_type}"


class Deltas:
    """RPC samples of one method before and after a call."""

    NAMES = ("grpc_server_started_total", "grpc_server_msg_received_total", "grpc_server_msg_sent_total",
             "grpc_server_handling_seconds_count")

    def __init__(self, metrics: Metrics, grpc_type: str, service: str, method: str, code: str):
        self.metrics, self.labels, self.code = metrics, rpc_labels(grpc_type, method, service), code
        self.before = self._read()

    def _read(self) -> dict:
        names = {name: value(self.metrics, name, **self.labels) or 0.0 for name in self.NAMES}
        names["handled"] = value(self.metrics, "grpc_server_handled_total", grpc_code=self.code, **self.labels) or 0.0
        return names

    def __call__(self) -> dict:
        # The interceptor records the end of a call before gRPC sends its status;
        # the short wait only guards against that changing.
        deadline = time.monotonic() + 5
        while True:
            after = self._read()
            changes = {name: after[name] - self.before[name] for name in after}
            if changes["handled"] or time.monotonic() > deadline:
                return changes
            time.sleep(0.01)


def test_unary_health_check(server, address):
    deltas = Deltas(server.metrics, "unary", HEALTH_SERVICE, "Check", "OK")
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert deltas() == {"grpc_server_started_total": 1, "grpc_server_msg_received_total": 1,
                        "grpc_server_msg_sent_total": 1, "grpc_server_handling_seconds_count": 1, "handled": 1}


@pytest.mark.parametrize("method, request_message", [
    ("WatchJob", training_service_pb2.WatchJobRequest(name="jobs/no-such-job")),
    ("DownloadArtifact", training_service_pb2.DownloadArtifactRequest(name="jobs/no-such-job",
                                                                      artifact=training_service_pb2.ARTIFACT_MODEL)),
])
def test_server_stream_of_a_missing_job(server, address, method, request_message):
    deltas = Deltas(server.metrics, "server_stream", TRAINING_SERVICE, method, "NOT_FOUND")
    with grpc.insecure_channel(address) as channel:
        stub = training_service_pb2_grpc.TrainingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            list(getattr(stub, method)(request_message, timeout=30))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert deltas() == {"grpc_server_started_total": 1, "grpc_server_msg_received_total": 1,
                        "grpc_server_msg_sent_total": 0, "grpc_server_handling_seconds_count": 1, "handled": 1}


def test_client_stream_upload_counts_the_messages_read(server, address):
    deltas = Deltas(server.metrics, "client_stream", TRAINING_SERVICE, "UploadDataset", "INVALID_ARGUMENT")
    header = training_service_pb2.DatasetHeader(name="never-stored", size_bytes=3)  # no format
    messages = [training_service_pb2.UploadDatasetRequest(header=header),
                training_service_pb2.UploadDatasetRequest(chunk=b"abc")]
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            training_service_pb2_grpc.TrainingServiceStub(channel).UploadDataset(iter(messages), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server refuses after the header: the chunk is never read, so never counted.
    assert deltas() == {"grpc_server_started_total": 1, "grpc_server_msg_received_total": 1,
                        "grpc_server_msg_sent_total": 0, "grpc_server_handling_seconds_count": 1, "handled": 1}


def test_bidi_evaluate_stream(server, address):
    deltas = Deltas(server.metrics, "bidi_stream", LOSS_SERVICE, "EvaluateStream", "OK")
    y = np.linspace(0.0, 1.0, 6, dtype=np.float32).reshape(2, 3)
    request = loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="mse"),
                                               y_true=wire.from_numpy(y), y_pred=wire.from_numpy(y + 0.5))
    items = [loss_service_pb2.EvaluateStreamRequest(request=request, request_id=str(i)) for i in range(3)]
    with grpc.insecure_channel(address) as channel:
        answers = list(loss_service_pb2_grpc.LossServiceStub(channel).EvaluateStream(iter(items), timeout=60))
    assert [a.request_id for a in answers] == ["0", "1", "2"]
    assert deltas() == {"grpc_server_started_total": 1, "grpc_server_msg_received_total": 3,
                        "grpc_server_msg_sent_total": 3, "grpc_server_handling_seconds_count": 1, "handled": 1}


def test_an_upload_cut_by_the_clients_deadline_counts_as_deadline_exceeded(server, address):
    deltas = Deltas(server.metrics, "client_stream", TRAINING_SERVICE, "UploadDataset", "DEADLINE_EXCEEDED")
    header = training_service_pb2.DatasetHeader(name="too-slow", size_bytes=1 << 20,
                                                format=training_service_pb2.DatasetHeader.FORMAT_NPZ)

    def slow_messages():
        yield training_service_pb2.UploadDatasetRequest(header=header)
        for _ in range(50):
            time.sleep(0.05)
            yield training_service_pb2.UploadDatasetRequest(chunk=b"x")

    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            training_service_pb2_grpc.TrainingServiceStub(channel).UploadDataset(slow_messages(), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 60  # a hang's bound, not a speed's: 10 s ran out once under load
    while deltas().get("handled", 0) < 1:  # the server notices when it next reads
        assert time.monotonic() < deadline, deltas()
        time.sleep(0.05)
    assert deltas()["handled"] == 1
