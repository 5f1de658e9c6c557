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

from lossd_server.observability.metrics import (
    EVALUATION_BUCKETS,
    JOB_STATES,
    Metrics,
    start_metrics_server,
)

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


# Fakes of what the evaluator and the interceptor do around a handler.


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


def test_evaluation_buckets_span_50us_to_30s():
    assert EVALUATION_BUCKETS[0] == 0.00005
    assert EVALUATION_BUCKETS[-1] == 30.0
    assert list(EVALUATION_BUCKETS) == sorted(EVALUATION_BUCKETS)


def test_observe_rpc(metrics):
    metrics.observe_rpc("unary", SERVICE, "Evaluate", "OK", 0.002)
    metrics.observe_rpc("unary", SERVICE, "Evaluate", "INVALID_ARGUMENT", 0.0005)
    labels = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="Evaluate")
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) == 1
    assert value(metrics, "grpc_server_handled_total",
                 grpc_code="INVALID_ARGUMENT", **labels) == 1
    assert value(metrics, "grpc_server_handling_seconds_count", **labels) == 2
    assert bucket(metrics, "grpc_server_handling_seconds", 0.001, **labels) == 1
    assert bucket(metrics, "grpc_server_handling_seconds", 60, **labels) == 2


def test_observe_rpc_accepts_status_code_enum_and_bounds_codes(metrics):
    class StatusCode:  # stands in for grpc.StatusCode.NOT_FOUND
        name = "NOT_FOUND"

    metrics.observe_rpc("unary", SERVICE, "GetJob", StatusCode(), 0.001)
    metrics.observe_rpc("unary", SERVICE, "GetJob", "not a code", 0.001)
    labels = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="GetJob")
    assert value(metrics, "grpc_server_handled_total", grpc_code="NOT_FOUND", **labels) == 1
    assert value(metrics, "grpc_server_handled_total", grpc_code="UNKNOWN", **labels) == 1


def test_init_rpc_method_creates_zero_samples(metrics):
    metrics.init_rpc_method("bidi_stream", SERVICE, "EvaluateStream")
    labels = dict(grpc_type="bidi_stream", grpc_service=SERVICE,
                  grpc_method="EvaluateStream")
    assert value(metrics, "grpc_server_started_total", **labels) == 0
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) == 0
    assert value(metrics, "grpc_server_handling_seconds_count", **labels) == 0


def test_cache_and_compilations(metrics):
    metrics.observe_cache_lookup(hit=False)
    metrics.observe_compilation("huber")
    metrics.observe_cache_lookup(hit=True)
    metrics.observe_cache_lookup(hit=True)
    metrics.lossd_loss_cache_entries.set(1)
    assert value(metrics, "lossd_loss_cache_lookups_total", result="hit") == 2
    assert value(metrics, "lossd_loss_cache_lookups_total", result="miss") == 1
    assert value(metrics, "lossd_loss_compilations_total", loss="huber") == 1
    assert value(metrics, "lossd_loss_cache_entries") == 1


def test_training_metrics(metrics):
    metrics.set_training_jobs({"running": 2, "queued": 1})
    metrics.observe_job_finished("failed", 42.0)
    metrics.lossd_training_epochs_total.inc()
    metrics.lossd_training_examples_total.inc(60000)
    metrics.lossd_training_examples_per_second.set(1234.5)
    metrics.lossd_training_loss.labels("train").set(0.25)
    assert value(metrics, "lossd_training_jobs", state="running") == 2
    assert value(metrics, "lossd_training_jobs", state="succeeded") == 0
    assert value(metrics, "lossd_training_job_duration_seconds_count", state="failed") == 1
    assert bucket(metrics, "lossd_training_job_duration_seconds", 30, state="failed") == 0
    assert bucket(metrics, "lossd_training_job_duration_seconds", 60, state="failed") == 1
    assert value(metrics, "lossd_training_epochs_total") == 1
    assert value(metrics, "lossd_training_examples_total") == 60000
    assert value(metrics, "lossd_training_examples_per_second") == 1234.5
    assert value(metrics, "lossd_training_loss", split="train") == 0.25


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


def test_slow_rpc_is_timed_and_in_flight_while_running(metrics):
    labels = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="Evaluate")
    with metrics.time_rpc("unary", SERVICE, "Evaluate"):
        assert value(metrics, "grpc_server_started_total", **labels) == 1
        assert value(metrics, "lossd_grpc_in_flight_requests",
                     grpc_service=SERVICE, grpc_method="Evaluate") == 1
        time.sleep(0.06)
    assert value(metrics, "lossd_grpc_in_flight_requests",
                 grpc_service=SERVICE, grpc_method="Evaluate") == 0
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) == 1
    assert bucket(metrics, "grpc_server_handling_seconds", 0.05, **labels) == 0
    assert bucket(metrics, "grpc_server_handling_seconds", 0.1, **labels) == 1


@pytest.mark.parametrize("code, expected", [("INVALID_ARGUMENT", "INVALID_ARGUMENT"),
                                            ("OK", "UNKNOWN")])
def test_failing_rpc_is_counted_and_timed(metrics, code, expected):
    labels = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="Evaluate")
    with pytest.raises(RuntimeError):
        with metrics.time_rpc("unary", SERVICE, "Evaluate") as record:
            record.code = code
            raise RuntimeError("handler failed")
    assert value(metrics, "grpc_server_handled_total", grpc_code=expected, **labels) == 1
    assert value(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) is None
    assert value(metrics, "grpc_server_handling_seconds_count", **labels) == 1
    assert value(metrics, "lossd_grpc_in_flight_requests",
                 grpc_service=SERVICE, grpc_method="Evaluate") == 0


# exported_names.


def test_exported_names_include_metrics_without_children(metrics):
    names = metrics.exported_names()
    expected = {
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handling_seconds_sum",
        "grpc_server_handling_seconds_count",
        "grpc_server_msg_received_total",
        "grpc_server_msg_sent_total",
        "lossd_grpc_in_flight_requests",
        "lossd_loss_evaluations_total",
        "lossd_loss_evaluation_duration_seconds_bucket",
        "lossd_loss_evaluation_duration_seconds_sum",
        "lossd_loss_evaluation_duration_seconds_count",
        "lossd_loss_evaluated_elements_total",
        "lossd_loss_evaluated_bytes_total",
        "lossd_loss_compilations_total",
        "lossd_loss_cache_lookups_total",
        "lossd_loss_cache_entries",
        "lossd_training_jobs",
        "lossd_training_job_duration_seconds_bucket",
        "lossd_training_job_duration_seconds_sum",
        "lossd_training_job_duration_seconds_count",
        "lossd_training_epochs_total",
        "lossd_training_examples_total",
        "lossd_training_examples_per_second",
        "lossd_training_loss",
        "lossd_device_info",
        "lossd_gpu_memory_bytes",
        "lossd_build_info",
        "process_cpu_seconds_total",
        "python_info",
    }
    assert expected <= names
    # Family names without their suffix are not sample names.
    assert "lossd_loss_evaluations" not in names
    assert "grpc_server_handling_seconds" not in names


def test_exported_names_without_process_metrics(registry):
    metrics = Metrics(registry, loss_names=LOSSES, version="t", process_metrics=False)
    names = metrics.exported_names()
    assert "lossd_build_info" in names
    assert not any(n.startswith(("process_", "python_")) for n in names)


def test_every_lossd_metric_has_the_prefix(metrics):
    for name in metrics.exported_names():
        assert name.startswith(("lossd_", "grpc_server_", "process_", "python_")), name


# Exposition.


def test_promtool_accepts_the_exposition(metrics):
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install "
                    "prometheus); CI installs it")
    metrics.observe_evaluation("huber", "ok", 0.001, 10, 80)
    metrics.observe_rpc("unary", SERVICE, "Evaluate", "OK", 0.002)
    metrics.observe_job_finished("succeeded", 120.0)
    metrics.set_device_info([("GPU", "/physical_device:GPU:0")])
    metrics.set_gpu_memory_source(lambda: {"/physical_device:GPU:0": (1, 2)})
    metrics.lossd_training_loss.labels("validation").set(0.5)
    result = subprocess.run([promtool, "check", "metrics"],
                            input=generate_latest(metrics.registry),
                            capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_help_texts_are_sentences(metrics):
    for family in metrics.registry.collect():
        if family.name.startswith(("lossd_", "grpc_server_")):
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
