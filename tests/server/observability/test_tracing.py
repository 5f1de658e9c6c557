"""OpenTelemetry traces, exported over OTLP to a real receiver.

The receiver is the OTLP trace service from ``opentelemetry-proto``, served
by a gRPC server in this test; the lossd server is configured only by the
standard ``OTEL_*`` variables. The test calls lossd inside a span of its own
(the client propagates it as ``traceparent``) and asserts the span tree the
receiver got: lossd.v1 Evaluate with its steps (admission, decode,
compilation, the TensorFlow call, encoding), a batched Evaluate, an OIP
ModelInfer over gRPC and over REST, a failed call with its status, and a
training job's own trace (its queue wait, epochs and checkpoint writes, the
latter from the job's process), linked from CreateJob's span; and the
latency histograms' exemplars, scraped in the OpenMetrics format.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
from opentelemetry import context as otel_context
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from tests.servers import PATIENCE, lossd_servers
from tests.oip_requests import infer_request

import lossd
from lossd_server.grpc.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from lossd_server.observability import tracing


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
                for scope in resource.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, name: str, trace_id: bytes = None, timeout: float = 60.0, count: int = 1):
        """The spans named ``name`` (of trace ``trace_id``), once there are
        ``count`` (the batch processor may export them in separate batches)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [span for _, span in self.spans
                         if span.name == name and trace_id in (None, span.trace_id)]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        with self.lock:
            names = sorted({span.name for _, span in self.spans})
        pytest.fail(f"no span {name!r} exported within {timeout} s; got {names}")


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced(receiver, tmp_path_factory):
    """A server that exports its spans to the receiver, as OTEL_* says."""
    _, port = receiver
    patch = pytest.MonkeyPatch()
    for name, value in {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                        "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_SERVICE_NAME": "lossd-under-test",
                        "OTEL_BSP_SCHEDULE_DELAY": "50"}.items():
        patch.setenv(name, value)
    try:
        with lossd_servers(tmp_path_factory, http_port=0, batch_max_delay_us=3000, max_concurrent_jobs=2) as start:
            srv = start()
            assert srv.tracing.enabled
            yield srv
    finally:
        patch.undo()


def test_off_without_otel_variables():
    assert not tracing.configured({})
    assert not tracing.configured({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"})
    assert not tracing.configured({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4317"})
    assert tracing.Tracing.from_environment({}) is tracing.OFF


def test_spans_join_the_callers_trace(receiver, traced):
    receiver, _ = receiver
    tracer = TracerProvider().get_tracer("test")
    address = f"127.0.0.1:{traced.port}"
    y = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    with tracer.start_as_current_span("caller") as caller:
        with lossd.Client(address) as client:
            client.evaluate("huber", y, y * 0.5)
            with pytest.raises(lossd.LossdError):
                client.evaluate("huber", y, y, params={"delta": -1.0})
    trace_id = caller.get_span_context().trace_id.to_bytes(16, "big")
    caller_id = caller.get_span_context().span_id.to_bytes(8, "big")

    spans = receiver.wait_for("lossd.v1.LossService/Evaluate", trace_id, count=2)
    ours = [s for s in spans if s.trace_id == trace_id]
    assert len(ours) == 2, [s.name for s in spans]
    for span in ours:
        assert span.parent_span_id == caller_id and span.kind == span.SPAN_KIND_SERVER
    attributes = [{a.key: a.value.string_value for a in s.attributes} for s in ours]
    assert sorted(a["rpc.grpc.status_code"] for a in attributes) == ["INVALID_ARGUMENT", "OK"]
    failed = next(s for s, a in zip(ours, attributes) if a["rpc.grpc.status_code"] != "OK")
    assert failed.status.code == failed.status.STATUS_CODE_ERROR and "delta" in failed.status.message
    services = {service for service, span in receiver.spans if span.trace_id == trace_id}
    assert services == {"lossd-under-test"}


def test_oip_grpc_and_rest_calls_have_spans(receiver, traced):
    receiver, _ = receiver
    tracer = TracerProvider().get_tracer("test")
    from opentelemetry.propagate import inject

    y = np.random.default_rng(1).normal(size=(2, 2)).astype(np.float32)
    with tracer.start_as_current_span("caller") as caller:
        carrier = {}
        inject(carrier)
        with grpc.insecure_channel(f"127.0.0.1:{traced.port}") as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request("mse", {"y_true": y, "y_pred": y}),
                                                                 metadata=list(carrier.items()))
        request = urllib.request.Request(f"http://127.0.0.1:{traced.http_port}/v2/models/mse", headers=carrier)
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
    trace_id = caller.get_span_context().trace_id.to_bytes(16, "big")
    infer = [s for s in receiver.wait_for("inference.GRPCInferenceService/ModelInfer") if s.trace_id == trace_id]
    rest = [s for s in receiver.wait_for("GET /v2/models/{name}") if s.trace_id == trace_id]
    assert len(infer) == 1 and len(rest) == 1
    status = {a.key: a.value.int_value for a in rest[0].attributes}["http.response.status_code"]
    assert status == 200


def _children(receiver, parent) -> dict:
    """The names of ``parent``'s child spans, and the spans, as exported so far."""
    with receiver.lock:
        return {span.name: span for _, span in receiver.spans if span.parent_span_id == parent.span_id
                and span.trace_id == parent.trace_id}


def test_an_evaluate_span_holds_its_steps(receiver, traced):
    """Admission, decode, compilation, the TensorFlow call and encoding are
    child spans of the call's span."""
    receiver, _ = receiver
    tracer = TracerProvider().get_tracer("test")
    y = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    with tracer.start_as_current_span("caller") as caller:
        with lossd.Client(f"127.0.0.1:{traced.port}") as client:
            client.evaluate("log_cosh", y, y * 0.3)
    trace_id = caller.get_span_context().trace_id.to_bytes(16, "big")
    (evaluate,) = receiver.wait_for("lossd.v1.LossService/Evaluate", trace_id)
    wanted = {"lossd.admission", "lossd.decode", "lossd.compile", "lossd.tensorflow", "lossd.encode"}
    deadline = time.monotonic() + 60
    while not wanted <= set(_children(receiver, evaluate)) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = _children(receiver, evaluate)
    assert wanted <= set(children), sorted(children)
    for name in wanted:  # each inside the call's span
        assert evaluate.start_time_unix_nano <= children[name].start_time_unix_nano
        assert children[name].end_time_unix_nano <= evaluate.end_time_unix_nano


def test_a_batched_evaluate_has_a_batch_span(receiver, traced):
    """Concurrent calls on a batching server: the calls that joined a batch
    show it as a child span (``lossd.batch``, with ``leader``)."""
    receiver, _ = receiver
    tracer = TracerProvider().get_tracer("test")
    rng = np.random.default_rng(3)
    calls = [(rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32))
             for _ in range(64)]
    with tracer.start_as_current_span("caller") as caller:
        context = otel_context.get_current()
        with lossd.Client(f"127.0.0.1:{traced.port}") as client:
            client.evaluate("mse", *calls[0])  # compiled before the crowd

            def one(pair):
                token = otel_context.attach(context)
                try:
                    return client.evaluate("mse", *pair)
                finally:
                    otel_context.detach(token)

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(one, calls))
    trace_id = caller.get_span_context().trace_id.to_bytes(16, "big")
    batches = receiver.wait_for("lossd.batch", trace_id)
    assert batches, "no call of 64 concurrent ones joined a batch"
    deadline = time.monotonic() + 60  # an Evaluate span ends, so is exported, after its batch's
    while True:
        evaluates = {s.span_id for s in receiver.wait_for("lossd.v1.LossService/Evaluate", trace_id)}
        if all(b.parent_span_id in evaluates for b in batches) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all(b.parent_span_id in evaluates for b in batches)
    leaders = [{a.key: a.value.bool_value for a in b.attributes}.get("leader") for b in batches]
    assert True in leaders


def test_a_job_has_a_trace_of_its_own_linked_from_create_job(receiver, traced):
    """A short job's spans: the root ``lossd.job`` (creation to end) with
    the queue wait (recorded by the server), each epoch with its checkpoint
    write inside and the model's save (exported by the job's own process,
    configured by the same OTEL_* variables) under it; CreateJob's span,
    in the caller's trace, links to that root."""
    receiver, _ = receiver
    tracer = TracerProvider().get_tracer("test")
    with lossd.Client(f"127.0.0.1:{traced.port}", timeout=PATIENCE) as client:
        with tracer.start_as_current_span("caller") as caller:
            job = client.create_job("cnn", "digits", epochs=2, steps_per_epoch=2, batch_size=16)
        job = client.wait(job, progress=False, timeout=PATIENCE)
    assert job.state == "succeeded", job
    caller_trace = caller.get_span_context().trace_id.to_bytes(16, "big")
    (create,) = receiver.wait_for("lossd.v1.TrainingService/CreateJob", caller_trace)
    assert create.parent_span_id == caller.get_span_context().span_id.to_bytes(8, "big")
    (link,) = create.links
    assert link.trace_id != caller_trace  # a trace of its own: CreateJob lasts ms, the job minutes
    (root,) = receiver.wait_for("lossd.job", link.trace_id)
    assert root.span_id == link.span_id and not root.parent_span_id
    attributes = {a.key: a.value.string_value for a in root.attributes}
    assert attributes == {"lossd.job.id": job.name.removeprefix("jobs/"), "lossd.job.state": "succeeded"}
    (queued,) = receiver.wait_for("lossd.job.queued", link.trace_id)
    (saved,) = receiver.wait_for("lossd.save_model", link.trace_id)
    epochs = receiver.wait_for("lossd.epoch", link.trace_id, count=2)
    checkpoints = receiver.wait_for("lossd.checkpoint", link.trace_id, count=2)
    assert sorted({a.key: a.value.int_value for a in e.attributes}["lossd.epoch"] for e in epochs) == [1, 2]
    for span in (queued, saved, *epochs):
        assert span.parent_span_id == root.span_id, span.name
        assert root.start_time_unix_nano <= span.start_time_unix_nano
        assert span.end_time_unix_nano <= root.end_time_unix_nano
    assert queued.start_time_unix_nano == root.start_time_unix_nano  # the job's creation
    assert queued.end_time_unix_nano <= min(e.start_time_unix_nano for e in epochs)
    by_epoch = {e.span_id: e for e in epochs}
    assert len(checkpoints) == 2 and all(c.parent_span_id in by_epoch for c in checkpoints)
    for checkpoint in checkpoints:
        epoch = by_epoch[checkpoint.parent_span_id]
        assert epoch.start_time_unix_nano <= checkpoint.start_time_unix_nano
        assert checkpoint.end_time_unix_nano <= epoch.end_time_unix_nano
    services = {service for service, span in receiver.spans if span.trace_id == link.trace_id}
    assert services == {"lossd-under-test"}


def test_a_two_worker_jobs_chief_records_its_epochs(receiver, traced):
    """A job trained by two worker processes: its chief (which alone
    checkpoints and reports) exports each epoch and the model's save under
    the job's root, as a single process does; the other worker records none."""
    receiver, _ = receiver
    with lossd.Client(f"127.0.0.1:{traced.port}", timeout=PATIENCE) as client:
        job = client.create_job("mlp", "digits", workers=2, epochs=2, steps_per_epoch=2, batch_size=16,
                                model_params={"hidden_units": [16]})
        job = client.wait(job, progress=False, timeout=PATIENCE)
    assert job.state == "succeeded", job
    job_id = job.name.removeprefix("jobs/")

    def roots():  # the job's root ends, so is exported, once the server learns the job ended
        with receiver.lock:
            return [s for _, s in receiver.spans if s.name == "lossd.job" and not s.parent_span_id
                    and {a.key: a.value.string_value for a in s.attributes}.get("lossd.job.id") == job_id]

    deadline = time.monotonic() + 60
    while not roots() and time.monotonic() < deadline:
        time.sleep(0.05)
    (root,) = roots()
    epochs = receiver.wait_for("lossd.epoch", root.trace_id, count=2)
    (saved,) = receiver.wait_for("lossd.save_model", root.trace_id)
    assert sorted({a.key: a.value.int_value for a in e.attributes}["lossd.epoch"] for e in epochs) == [1, 2]
    assert all(span.parent_span_id == root.span_id for span in (*epochs, saved))
    time.sleep(0.5)  # a second worker's epochs, had it recorded any, would have arrived with the chief's
    assert len([s for _, s in receiver.spans if s.name == "lossd.epoch" and s.trace_id == root.trace_id]) == 2


def _scrape(port: int, accept: str) -> tuple[str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.headers["Content-Type"], response.read().decode()


def test_latency_histograms_carry_the_trace_as_exemplar(traced):
    """After a traced Evaluate and a traced REST inference, an OpenMetrics
    scrape of the real /metrics shows their trace id as the exemplar of the
    RPC, HTTP and evaluation latency histograms; the classic text format,
    which has no exemplars, does not."""
    from opentelemetry.propagate import inject

    tracer = TracerProvider().get_tracer("test")
    y = np.random.default_rng(4).normal(size=(3, 2)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "y_true", "datatype": "FP32", "shape": [3, 2], "data": y.ravel().tolist()},
                                  {"name": "y_pred", "datatype": "FP32", "shape": [3, 2], "data": y.ravel().tolist()}]})
    with tracer.start_as_current_span("caller") as caller:
        with lossd.Client(f"127.0.0.1:{traced.port}") as client:
            client.evaluate("mean_absolute_error", y, y * 2)
        headers = {"Content-Type": "application/json"}
        inject(headers)
        request = urllib.request.Request(f"http://127.0.0.1:{traced.http_port}/v2/models/mean_squared_error/infer",
                                         data=body.encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
    trace_id = format(caller.get_span_context().trace_id, "032x")
    wanted = {"grpc_server_handling_seconds": {"grpc_method": "Evaluate"},
              "lossd_loss_evaluation_duration_seconds": {"loss": "mean_absolute_error"},
              "http_server_request_duration_seconds": {"http_route": "/v2/models/{name}/infer"}}
    deadline = time.monotonic() + 30  # /metrics may serve a rendering up to 1 s old
    while True:
        content_type, text = _scrape(traced.metrics_port, "application/openmetrics-text; version=1.0.0")
        assert content_type.startswith("application/openmetrics-text"), content_type
        found = set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = wanted.get(family.name)
                if labels and sample.exemplar is not None and sample.exemplar.labels.get("trace_id") == trace_id \
                        and labels.items() <= sample.labels.items():
                    assert len(sample.exemplar.labels["span_id"]) == 16
                    found.add(family.name)
        if found == set(wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found == set(wanted)
    content_type, text = _scrape(traced.metrics_port, "text/plain")
    assert content_type.startswith("text/plain") and trace_id not in text
