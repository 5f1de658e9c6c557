"""Tests of lossd_server.observability.metrics, each on a fresh CollectorRegistry."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from lossd_server.observability.metrics import JOB_STATES, Metrics, start_metrics_server

LOSSES = ("mean_squared_error", "huber", "categorical_crossentropy")
SERVICE = "lossd.v1.LossService"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry) -> Metrics:
    return Metrics(registry, loss_names=LOSSES, version="1.2.3")


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def bucket(metrics: Metrics, name: str, le: float, **labels) -> float | None:
    return value(metrics, f"{name}_bucket", le=repr(float(le)), **labels)


def find_tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(name)


# Fakes of what the loss servicer does inside ``time_evaluation``.


def slow_handler(record):
    time.sleep(0.06)
    record.elements, record.nbytes = 8, 64


def invalid_handler(record):
    record.outcome = "invalid_argument"
    raise ValueError("Could not interpret loss identifier: 'nope'")


def crashing_handler(record):
    raise RuntimeError("a bug")


# loss_label.


def test_loss_label_keeps_registered_names(metrics):
    for name in LOSSES:
        assert metrics.loss_label(name) == name
    assert metrics.loss_label("composite") == "composite"


def test_loss_label_bounds_unknown_names(metrics):
    assert metrics.loss_label("no_such_loss") == "other"
    assert metrics.loss_label("") == "other"
    # Aliases are not label values: callers resolve them first.
    assert metrics.loss_label("mse") == "other"


def test_unknown_loss_is_counted_as_other(metrics):
    metrics.observe_evaluation("user-supplied-garbage", "invalid_argument", 1e-4, 0, 16)
    assert value(metrics, "lossd_loss_evaluations_total",
                 loss="other", outcome="invalid_argument") == 1
    assert value(metrics, "lossd_loss_evaluations_total",
                 loss="user-supplied-garbage", outcome="invalid_argument") is None


# Pre-initialised label values.


def test_evaluation_counter_is_preinitialised(metrics):
    for loss in LOSSES + ("other", "composite"):
        for outcome in ("ok", "invalid_argument", "error"):
            assert value(metrics, "lossd_loss_evaluations_total",
                         loss=loss, outcome=outcome) == 0


def test_no_histogram_children_per_loss_before_use(metrics):
    assert value(metrics, "lossd_loss_evaluation_duration_seconds_count",
                 loss="huber") is None


def test_job_states_and_cache_results_are_preinitialised(metrics):
    for state in JOB_STATES:
        assert value(metrics, "lossd_training_jobs", state=state) == 0
    for state in ("succeeded", "failed", "cancelled"):
        assert value(metrics, "lossd_training_job_duration_seconds_count",
                     state=state) == 0
    for result in ("hit", "miss"):
        assert value(metrics, "lossd_loss_cache_lookups_total", result=result) == 0


# observe_*.


def test_observe_evaluation(metrics):
    metrics.observe_evaluation("huber", "ok", 0.0003, elements=1000, nbytes=8000)
    metrics.observe_evaluation("huber", "ok", 0.0004, elements=10, nbytes=80)
    assert value(metrics, "lossd_loss_evaluations_total", loss="huber", outcome="ok") == 2
    assert value(metrics, "lossd_loss_evaluated_elements_total", loss="huber") == 1010
    assert value(metrics, "lossd_loss_evaluated_bytes_total", loss="huber") == 8080
    assert value(metrics, "lossd_loss_evaluation_duration_seconds_count", loss="huber") == 2
    assert value(metrics, "lossd_loss_evaluation_duration_seconds_sum",
                 loss="huber") == pytest.approx(0.0007)
    assert bucket(metrics, "lossd_loss_evaluation_duration_seconds", 0.0002,
                  loss="huber") == 0
    assert bucket(metrics, "lossd_loss_evaluation_duration_seconds", 0.0005,
                  loss="huber") == 2


def test_observe_evaluation_rejects_unknown_outcome(metrics):
    with pytest.raises(ValueError, match="Expected one of .*Received: outcome='fine'"):
        metrics.observe_evaluation("huber", "fine", 0.1, 1, 1)


# RPC methods (the interceptor's side; tests/server/grpc/test_interceptors.py drives
# them through a real server).


def rpc_of(metrics: Metrics, method: str = "Evaluate", **kind):
    kind = {"client_streaming": False, "server_streaming": False, **kind}
    return metrics.rpc_method(SERVICE, method, **kind)


def test_rpc_method_metrics(metrics):
    rpc = rpc_of(metrics)
    rpc.started()
    rpc.received()
    rpc.sent()
    rpc.finished("OK", 0.002)
    rpc.started()
    rpc.received()
    rpc.finished("INVALID_ARGUMENT", 0.0005)
    labels = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="Evaluate")
    assert value(metrics, "grpc_server_started_total", **labels) == 2
    assert value(metrics, "grpc_server_msg_received_total", **labels) == 2
    assert value(metrics, "grpc_server_msg_sent_total", **labels) == 1
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) == 1
    assert value(metrics, "grpc_server_handled_total",
                 grpc_code="INVALID_ARGUMENT", **labels) == 1
    assert value(metrics, "grpc_server_handling_seconds_count", **labels) == 2
    assert bucket(metrics, "grpc_server_handling_seconds", 0.001, **labels) == 1
    assert bucket(metrics, "grpc_server_handling_seconds", 60, **labels) == 2
    assert value(metrics, "lossd_grpc_in_flight_requests",
                 grpc_service=SERVICE, grpc_method="Evaluate") == 0


def test_rpc_method_bounds_the_code_label(metrics):
    rpc = rpc_of(metrics, "GetJob")
    rpc.started()
    rpc.finished("not a code", 0.001)
    labels = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="GetJob")
    assert value(metrics, "grpc_server_handled_total", grpc_code="UNKNOWN", **labels) == 1
    assert value(metrics, "grpc_server_handled_total", grpc_code="not a code", **labels) is None


@pytest.mark.parametrize("client_streaming, server_streaming, grpc_type", [
    (False, False, "unary"),
    (True, False, "client_stream"),
    (False, True, "server_stream"),
    (True, True, "bidi_stream"),
])
def test_rpc_method_creates_zero_samples_under_its_grpc_type(metrics, client_streaming, server_streaming,
                                                              grpc_type):
    rpc_of(metrics, "Method", client_streaming=client_streaming, server_streaming=server_streaming)
    labels = dict(grpc_type=grpc_type, grpc_service=SERVICE, grpc_method="Method")
    assert value(metrics, "grpc_server_started_total", **labels) == 0
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) == 0
    assert value(metrics, "grpc_server_handling_seconds_count", **labels) == 0
    assert value(metrics, "grpc_server_msg_received_total", **labels) == 0
    assert value(metrics, "grpc_server_msg_sent_total", **labels) == 0
    assert value(metrics, "lossd_grpc_in_flight_requests", grpc_service=SERVICE, grpc_method="Method") == 0


def test_rpc_method_is_made_once_per_method(metrics):
    assert rpc_of(metrics) is rpc_of(metrics)
    assert rpc_of(metrics, "Evaluate") is not rpc_of(metrics, "ListLosses")


def test_http_route_metrics_bound_the_method_label(metrics):
    route = metrics.http_route("POST", "/v2/models/{name}/infer")
    route.started()
    assert value(metrics, "http_server_active_requests", http_request_method="POST",
                 http_route="/v2/models/{name}/infer") == 1
    route.finished(200, 0.002)
    route.started()
    route.finished(429, 0.0005)
    labels = dict(http_request_method="POST", http_route="/v2/models/{name}/infer")
    assert value(metrics, "http_server_request_duration_seconds_count", http_response_status_code="200",
                 **labels) == 1
    assert value(metrics, "http_server_request_duration_seconds_count", http_response_status_code="429",
                 **labels) == 1
    assert value(metrics, "http_server_active_requests", **labels) == 0
    # Methods a client makes up share one label value, and one object.
    assert metrics.http_route("BREW", "_OTHER") is metrics.http_route("FOO", "_OTHER")
    metrics.http_route("BREW", "_OTHER").started()
    assert value(metrics, "http_server_active_requests", http_request_method="_OTHER", http_route="_OTHER") == 1


def test_exemplars_only_once_asked_for(metrics):
    """Without ``exemplars_from`` a latency child is the histogram's own (no
    per-call cost); with it, each observation keeps the exemplar given, served
    in the OpenMetrics format only."""
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    plain = metrics.grpc_server_handling_seconds.labels("unary", SERVICE, "Plain")
    assert metrics.latency(plain) is plain
    current = {"trace_id": "ab" * 16, "span_id": "cd" * 8}
    metrics.exemplars_from(lambda: current)
    rpc_of(metrics, "Traced").finished("OK", 0.0003)
    metrics.observe_evaluation("huber", "ok", 0.0003, 8, 64)
    route = metrics.http_route("GET", "/v2")
    current = None  # outside any span: observed without an exemplar
    route.finished(200, 0.0003)
    text = openmetrics(metrics.registry).decode()
    traced = [line for line in text.splitlines() if "ab" * 16 in line]
    assert any(line.startswith("grpc_server_handling_seconds_bucket{") and 'grpc_method="Traced"' in line
               and 'le="0.0005"' in line for line in traced), traced
    assert any(line.startswith("lossd_loss_evaluation_duration_seconds_bucket{") for line in traced), traced
    assert not any(line.startswith("http_server") for line in traced)
    assert "ab" * 16 not in generate_latest(metrics.registry).decode()


def test_cache_and_compilations(metrics):
    metrics.observe_cache_lookup(hit=False)
    metrics.observe_compilation("huber")
    metrics.observe_cache_lookup(hit=True)
    metrics.observe_cache_lookup(hit=True)
    metrics.set_cache_entries(1)
    assert value(metrics, "lossd_loss_cache_lookups_total", result="hit") == 2
    assert value(metrics, "lossd_loss_cache_lookups_total", result="miss") == 1
    assert value(metrics, "lossd_loss_compilations_total", loss="huber") == 1
    assert value(metrics, "lossd_loss_cache_entries") == 1


def test_training_jobs_and_durations(metrics):
    metrics.set_training_jobs({"running": 2, "queued": 1})
    metrics.observe_job_finished("failed", 42.0)
    assert value(metrics, "lossd_training_jobs", state="running") == 2
    assert value(metrics, "lossd_training_jobs", state="succeeded") == 0
    assert value(metrics, "lossd_training_job_duration_seconds_count", state="failed") == 1
    assert bucket(metrics, "lossd_training_job_duration_seconds", 30, state="failed") == 0
    assert bucket(metrics, "lossd_training_job_duration_seconds", 60, state="failed") == 1


def test_training_state_validation(metrics):
    with pytest.raises(ValueError, match="Received: state='running'"):
        metrics.observe_job_finished("running", 1.0)
    with pytest.raises(ValueError, match="Invalid job states"):
        metrics.set_training_jobs({"paused": 1})


def test_device_and_build_info(metrics):
    assert value(metrics, "lossd_build_info", version="1.2.3",
                 tensorflow_version="", keras_version="") == 1
    metrics.set_build_info("1.2.3", tensorflow_version="2.21.0", keras_version="3.12.0")
    assert value(metrics, "lossd_build_info", version="1.2.3",
                 tensorflow_version="", keras_version="") is None
    assert value(metrics, "lossd_build_info", version="1.2.3",
                 tensorflow_version="2.21.0", keras_version="3.12.0") == 1

    metrics.set_device_info([("GPU", "/physical_device:GPU:0"), ("cpu", "/physical_device:CPU:0")])
    assert value(metrics, "lossd_device_info", device_type="GPU",
                 device="/physical_device:GPU:0") == 1
    assert value(metrics, "lossd_device_info", device_type="CPU",
                 device="/physical_device:CPU:0") == 1
    metrics.set_device_info([("CPU", "/physical_device:CPU:0")])
    assert value(metrics, "lossd_device_info", device_type="GPU",
                 device="/physical_device:GPU:0") is None


def test_gpu_memory_is_read_at_scrape_time(metrics):
    calls = []

    def source():
        calls.append(1)
        return {"/physical_device:GPU:0": (1000 * len(calls), 5000)}

    assert value(metrics, "lossd_gpu_memory_bytes",
                 device="/physical_device:GPU:0", kind="in_use") is None
    metrics.set_gpu_memory_source(source)
    assert calls == []  # nothing polls in the background
    assert value(metrics, "lossd_gpu_memory_bytes",
                 device="/physical_device:GPU:0", kind="in_use") == 1000
    assert value(metrics, "lossd_gpu_memory_bytes",
                 device="/physical_device:GPU:0", kind="peak") == 5000
    assert value(metrics, "lossd_gpu_memory_bytes",
                 device="/physical_device:GPU:0", kind="in_use") == 3000


def test_failing_gpu_memory_source_does_not_break_the_scrape(metrics):
    def source():
        raise RuntimeError("driver gone")

    metrics.set_gpu_memory_source(source)
    text = generate_latest(metrics.registry).decode()
    assert "lossd_loss_evaluations_total" in text
    assert 'lossd_gpu_memory_bytes{' not in text


# Slow and failing fakes: the clock must cover the whole handler, and a failure
# must be counted and timed like a success.


def test_slow_handler_is_timed_after_it_finishes(metrics):
    with metrics.time_evaluation("huber") as record:
        slow_handler(record)
    assert value(metrics, "lossd_loss_evaluations_total", loss="huber", outcome="ok") == 1
    assert value(metrics, "lossd_loss_evaluation_duration_seconds_sum",
                 loss="huber") >= 0.06
    assert bucket(metrics, "lossd_loss_evaluation_duration_seconds", 0.05, loss="huber") == 0
    assert bucket(metrics, "lossd_loss_evaluation_duration_seconds", 30, loss="huber") == 1
    assert value(metrics, "lossd_loss_evaluated_elements_total", loss="huber") == 8
    assert value(metrics, "lossd_loss_evaluated_bytes_total", loss="huber") == 64


@pytest.mark.parametrize("handler, outcome", [
    (invalid_handler, "invalid_argument"),
    (crashing_handler, "error"),
])
def test_failing_handler_is_counted_and_timed(metrics, handler, outcome):
    with pytest.raises(Exception):
        with metrics.time_evaluation("mean_squared_error") as record:
            handler(record)
    labels = dict(loss="mean_squared_error")
    assert value(metrics, "lossd_loss_evaluations_total", outcome=outcome, **labels) == 1
    assert value(metrics, "lossd_loss_evaluations_total", outcome="ok", **labels) == 0
    assert value(metrics, "lossd_loss_evaluation_duration_seconds_count", **labels) == 1


def test_every_metric_has_a_known_prefix(metrics):
    for family in metrics.registry.collect():
        # grpc_server_ and http_server_: the names go-grpc-prometheus and
        # OpenTelemetry's HTTP conventions give them, so dashboards work unchanged.
        assert family.name.startswith(("lossd_", "grpc_server_", "http_server_", "process_", "python_")), \
            family.name


def test_process_metrics_can_be_left_out(registry):
    metrics = Metrics(registry, loss_names=LOSSES, version="t", process_metrics=False)
    families = {family.name for family in metrics.registry.collect()}
    assert "lossd_build_info" in families
    assert not any(name.startswith(("process_", "python_")) for name in families)


# Exposition.


def test_promtool_accepts_the_exposition(metrics):
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install "
                    "prometheus); CI installs it")
    metrics.observe_evaluation("huber", "ok", 0.001, 10, 80)
    rpc = rpc_of(metrics)
    rpc.started()
    rpc.finished("OK", 0.002)
    metrics.observe_job_finished("succeeded", 120.0)
    metrics.set_device_info([("GPU", "/physical_device:GPU:0")])
    metrics.set_gpu_memory_source(lambda: {"/physical_device:GPU:0": (1, 2)})
    result = subprocess.run([promtool, "check", "metrics"],
                            input=generate_latest(metrics.registry),
                            capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_help_texts_are_sentences(metrics):
    for family in metrics.registry.collect():
        if family.name.startswith(("lossd_", "grpc_server_", "http_server_")):
            assert family.documentation[:1].isupper(), family.name
            assert family.documentation.endswith("."), family.name


def test_metrics_server_serves_the_registry(metrics):
    server, port = start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert "lossd_build_info{" in body and 'version="1.2.3"' in body
        assert "lossd_loss_evaluations_total" in body
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_port_in_use_is_a_clear_error(metrics):
    server, port = start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"Could not serve metrics on 127.0.0.1:{port} .*LOSSD_METRICS_PORT"):
            start_metrics_server(metrics, "127.0.0.1", port)
    finally:
        server.shutdown()
        server.server_close()
