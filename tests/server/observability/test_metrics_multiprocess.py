"""Metrics of several serving processes in one ``/metrics``: real processes
record through ``Metrics`` into prometheus_client's multiprocess files, and
``SupervisorMetrics`` reads them: counters and histograms sum, every gauge
combines as it declares, and a dead process's live gauges leave."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.multiprocess import mark_process_dead

from lossd_server.observability.metrics import Metrics, SupervisorMetrics

# What each gauge does with several processes' values (metrics.py's docstring).
GAUGE_MODES = {
    "lossd_grpc_in_flight_requests": "livesum",
    "http_server_active_requests": "livesum",
    "lossd_loss_cache_entries": "livesum",
    "lossd_training_examples_per_second": "livesum",
    "lossd_shared_memory_regions": "livesum",
    "lossd_shared_memory_mapped_bytes": "livesum",
    "lossd_heavy_lane_queued": "livesum",
    "lossd_training_jobs": "livemostrecent",
    "lossd_training_loss": "livemostrecent",
    "lossd_state_quarantined_items": "livemax",
    "lossd_device_info": "livemax",
    "lossd_build_info": "livemax",
}

# One serving process's recording: argv[1] calls, argv[2] cache entries, then
# it waits for a line on stdin (so the test reads the files while it lives).
PROCESS = """
import sys
from prometheus_client import CollectorRegistry
from lossd_server.observability.metrics import Metrics
calls, entries = int(sys.argv[1]), int(sys.argv[2])
metrics = Metrics(CollectorRegistry(), loss_names=["mse"], version="1", tensorflow_version="2", keras_version="3",
                  process_metrics=False)
method = metrics.rpc_method("lossd.v1.LossService", "Evaluate", client_streaming=False, server_streaming=False)
for _ in range(calls):
    method.started()
    metrics.observe_evaluation("mse", "ok", 0.001, 10, 80)
    method.finished("OK", 0.002)
method.started()  # one call in flight until the process ends
metrics.set_cache_entries(entries)
metrics.set_device_info([("CPU", "/physical_device:CPU:0")])
metrics.set_training_jobs({"queued": entries})
print("recorded", flush=True)
sys.stdin.readline()
"""


def test_every_gauge_declares_how_processes_combine():
    metrics = Metrics(CollectorRegistry(), loss_names=["mse"], version="test", process_metrics=False)
    gauges = {value._name: value._multiprocess_mode for value in vars(metrics).values() if isinstance(value, Gauge)}
    assert gauges == GAUGE_MODES


def sample(registry, name: str, **labels) -> list[float]:
    return [s.value for family in registry.collect() for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def test_counters_sum_and_gauges_combine_over_real_processes(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": ":".join(sys.path)}
    procs = []
    try:
        for calls, entries in ((3, 5), (4, 7)):  # one after the other: the second's gauges are the newest
            procs.append(subprocess.Popen([sys.executable, "-c", PROCESS, str(calls), str(entries)], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            assert procs[-1].stdout.readline().strip() == "recorded"
        supervisor = SupervisorMetrics(str(tmp_path), 2)
        registry = supervisor.registry
        method = dict(grpc_service="lossd.v1.LossService", grpc_method="Evaluate")
        assert sample(registry, "grpc_server_handled_total", grpc_code="OK", **method) == [7]
        assert sample(registry, "grpc_server_handling_seconds_count", **method) == [7]
        assert sample(registry, "lossd_loss_evaluations_total", loss="mse", outcome="ok") == [7]
        assert sample(registry, "lossd_grpc_in_flight_requests", **method) == [2]  # livesum
        assert sample(registry, "lossd_loss_cache_entries") == [12]  # livesum
        assert sample(registry, "lossd_training_jobs", state="queued") == [7]  # the newest reading
        assert sample(registry, "lossd_build_info") == [1]  # livemax: one sample, not one per process
        assert sample(registry, "lossd_device_info") == [1]
        supervisor.set_serving_processes(2)
        assert sample(registry, "lossd_serving_processes", state="serving") == [2]
        assert sample(registry, "lossd_serving_processes", state="configured") == [2]

        # The second process dies: its counters stay in the sums, its live gauges leave.
        procs[1].stdin.close()
        procs[1].wait(30)
        mark_process_dead(procs[1].pid, str(tmp_path))
        supervisor.process_restarted()
        assert sample(registry, "grpc_server_handled_total", grpc_code="OK", **method) == [7]
        assert sample(registry, "lossd_grpc_in_flight_requests", **method) == [1]
        assert sample(registry, "lossd_loss_cache_entries") == [5]
        assert sample(registry, "lossd_serving_process_restarts_total") == [1]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(30)
