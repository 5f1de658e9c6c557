"""lossd scraped by a real Prometheus server, checked through PromQL.

One module-scoped stack: lossd in process (fresh metrics registry, free
loopback ports) and Debian's ``prometheus`` as a subprocess scraping it every
second. Known traffic goes through ``lossd.Client`` in two waves:

* a warm-up before Prometheus starts: one call of each kind, so every series
  the checks read (per-loss histograms included, which are created on first
  use) exists from the first scrape on and ``rate()`` sees the later increase;
* the main wave once Prometheus has stored a first sample.

The tests then read what Prometheus stored over its HTTP query API. The stack
is torn down (Prometheus terminated, then killed) however the module ends.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

SERVICE = "lossd.v1.LossService"
JOB = "lossd"
UNKNOWN_LOSS = "no_such_loss_xyz"
SCRAPE_WAIT_S = 60.0   # the first sample takes about 5 s to become queryable
WINDOW = "1m"          # longer than the whole module runs: every sample is in range

# Calls per kind: (warm-up wave, main wave).
GOOD_MSE = (1, 7)
GOOD_HUBER = (1, 5)
UNKNOWN = (1, 3)       # INVALID_ARGUMENT, counted under loss="other"
BAD_SHAPE_MSE = (1, 2)  # INVALID_ARGUMENT, counted under the mse canonical name

N = sum(GOOD_MSE)
M = sum(GOOD_HUBER)
K = sum(UNKNOWN) + sum(BAD_SHAPE_MSE)
WARM_UP = GOOD_MSE[0] + GOOD_HUBER[0] + UNKNOWN[0] + BAD_SHAPE_MSE[0]

# sum by (loss, outcome) (lossd_loss_evaluations_total), non-zero series only.
EXPECTED_EVALUATIONS = {
    ("mean_squared_error", "ok"): N,
    ("huber", "ok"): M,
    ("other", "invalid_argument"): sum(UNKNOWN),
    ("mean_squared_error", "invalid_argument"): sum(BAD_SHAPE_MSE),
}


def find_tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus server on loopback, queried over its HTTP API."""

    def __init__(self, binary: str, root: Path, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self.log_path = root / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [binary,
             f"--config.file={config}",
             f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             # Keep it light: short retention, few query workers, quiet logs.
             "--storage.tsdb.retention.time=1h",
             "--query.max-concurrency=4",
             "--web.max-connections=16",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log()}")

    def api(self, path: str, **params) -> object:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[tuple[dict, float]]:
        """An instant query: [(labels, value)] of a vector, or [({}, value)] of a scalar."""
        data = self.api("/api/v1/query", query=promql)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        assert data["resultType"] == "vector", data
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def value(self, promql: str) -> float | None:
        """The single value of a query, None when it returns nothing."""
        result = self.query(promql)
        assert len(result) <= 1, (promql, result)
        return result[0][1] if result else None

    def wait_for(self, promql: str, expected: float, timeout: float = SCRAPE_WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(promql)
            if got == expected:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.25)
        targets = self.api("/api/v1/targets")
        raise TimeoutError(f"{promql} is {got}, expected {expected} after {timeout} s; "
                           f"targets: {targets}\n{self.log()}")

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
        finally:
            self._log.close()


def send(client, wave: int) -> None:
    """Sends one wave of known traffic (0: warm-up, 1: main)."""
    import lossd

    y_true = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(4, 3)
    y_pred = y_true + 0.5
    for _ in range(GOOD_MSE[wave]):
        assert client.evaluate("mse", y_true, y_pred).loss == pytest.approx(0.25)
    for _ in range(GOOD_HUBER[wave]):
        assert client.evaluate("huber", y_true, y_pred).loss == pytest.approx(0.125)
    for _ in range(UNKNOWN[wave]):
        with pytest.raises(lossd.LossdError) as info:
            client.evaluate(UNKNOWN_LOSS, y_true, y_pred)
        assert info.value.code.name == "INVALID_ARGUMENT" and info.value.reason == "UNKNOWN_LOSS"
    for _ in range(BAD_SHAPE_MSE[wave]):
        with pytest.raises(lossd.LossdError) as info:
            client.evaluate("mse", y_true, y_pred[:, :2])
        assert info.value.code.name == "INVALID_ARGUMENT" and info.value.reason == "SHAPE_MISMATCH"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(lossd server, Prometheus) after both waves of traffic have been scraped."""
    binary = find_tool("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian/Ubuntu: "
                    "apt-get install prometheus); CI installs it through .ci/run")
    import lossd
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    tmp = tmp_path_factory.mktemp("prometheus-live")
    server = create_server(Settings(host="127.0.0.1", port=0, metrics_port=0, data_dir=tmp / "lossd"),
                           metrics_registry=CollectorRegistry())
    server.start()
    prometheus = None
    try:
        with lossd.Client(server.address, timeout=30) as client:
            send(client, 0)
            prometheus = Prometheus(binary, tmp / "prometheus", f"127.0.0.1:{server.metrics_port}")
            prometheus.wait_ready()
            # A first sample of the warm-up is stored: the main wave is an increase.
            prometheus.wait_for(f'up{{job="{JOB}"}}', 1)
            prometheus.wait_for('sum(grpc_server_handled_total{grpc_method="Evaluate"})', WARM_UP)
            send(client, 1)
        prometheus.wait_for('grpc_server_handled_total{grpc_method="Evaluate",grpc_code="OK"}', N + M)
        prometheus.wait_for('grpc_server_handled_total{grpc_method="Evaluate",grpc_code="INVALID_ARGUMENT"}', K)
        yield server, prometheus
    finally:
        try:
            if prometheus is not None:
                prometheus.stop()
        finally:
            server.stop(0)


def evaluate_selector(code: str | None = None) -> str:
    code_matcher = f',grpc_code="{code}"' if code else ""
    return f'{{job="{JOB}",grpc_type="unary",grpc_service="{SERVICE}",grpc_method="Evaluate"{code_matcher}}}'


def test_target_is_up(stack):
    _, prometheus = stack
    assert prometheus.value(f'up{{job="{JOB}"}}') == 1


def test_handled_total_counts_every_status(stack):
    _, prometheus = stack
    assert prometheus.value(f"grpc_server_handled_total{evaluate_selector('OK')}") == N + M
    assert prometheus.value(f"grpc_server_handled_total{evaluate_selector('INVALID_ARGUMENT')}") == K
    codes = {labels["grpc_code"]: value
             for labels, value in prometheus.query(f"grpc_server_handled_total{evaluate_selector()}")}
    assert codes == {"OK": N + M, "INVALID_ARGUMENT": K}
    # Failures are started, timed and leave the in-flight gauge too.
    assert prometheus.value(f"grpc_server_started_total{evaluate_selector()}") == N + M + K
    assert prometheus.value(f"grpc_server_handling_seconds_count{evaluate_selector()}") == N + M + K
    assert prometheus.value(
        f'lossd_grpc_in_flight_requests{{grpc_service="{SERVICE}",grpc_method="Evaluate"}}') == 0
    # Every request message is received; only successful calls send a response.
    assert prometheus.value(f"grpc_server_msg_received_total{evaluate_selector()}") == N + M + K
    assert prometheus.value(f"grpc_server_msg_sent_total{evaluate_selector()}") == N + M


def test_evaluations_by_loss_and_outcome(stack):
    _, prometheus = stack
    result = prometheus.query("sum by (loss, outcome) (lossd_loss_evaluations_total)")
    got = {(labels["loss"], labels["outcome"]): value for labels, value in result}
    # Known label values are pre-initialised, so the zero series are there too.
    assert ("huber", "error") in got and ("other", "ok") in got
    nonzero = {key: value for key, value in got.items() if value != 0}
    assert nonzero == EXPECTED_EVALUATIONS
    # The latency histogram counts the same calls, failures included.
    counts = {labels["loss"]: value for labels, value in prometheus.query(
        "sum by (loss) (lossd_loss_evaluation_duration_seconds_count)")}
    assert counts == {"mean_squared_error": N + sum(BAD_SHAPE_MSE), "huber": M, "other": sum(UNKNOWN)}


def test_loss_label_values_are_bounded(stack):
    server, prometheus = stack
    values = set(prometheus.api("/api/v1/label/loss/values"))
    # "composite" is the one non-loss value besides "other" (lossd_server/observability/metrics.py).
    allowed = set(server.evaluator.registry.names()) | {"other", "composite"}
    assert values <= allowed, sorted(values - allowed)
    assert {"mean_squared_error", "huber", "other"} <= values
    assert UNKNOWN_LOSS not in values and "mse" not in values


def test_rate_sees_the_traffic(stack):
    _, prometheus = stack
    ok = prometheus.value(f"rate(grpc_server_handled_total{evaluate_selector('OK')}[{WINDOW}])")
    assert ok is not None and ok > 0
    total = prometheus.value(f"sum(rate(grpc_server_handled_total{evaluate_selector()}[{WINDOW}]))")
    assert total is not None and total >= ok


def test_histogram_quantile_of_evaluation_latency(stack):
    _, prometheus = stack
    p50 = prometheus.value(
        "histogram_quantile(0.5, sum by (le) "
        f"(rate(lossd_loss_evaluation_duration_seconds_bucket[{WINDOW}])))")
    assert p50 is not None and math.isfinite(p50) and 0 < p50 < 5.0, p50
    per_loss = {labels["loss"]: value for labels, value in prometheus.query(
        "histogram_quantile(0.5, sum by (le, loss) "
        f"(rate(lossd_loss_evaluation_duration_seconds_bucket[{WINDOW}])))")}
    for loss in ("mean_squared_error", "huber"):
        assert math.isfinite(per_loss[loss]) and 0 < per_loss[loss] < 5.0, per_loss
    rpc_p99 = prometheus.value(
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(grpc_server_handling_seconds_bucket{evaluate_selector()}[{WINDOW}])))")
    assert rpc_p99 is not None and math.isfinite(rpc_p99) and 0 < rpc_p99 < 5.0, rpc_p99


def test_build_and_device_info(stack):
    import lossd_server

    server, prometheus = stack
    build = prometheus.query(f'lossd_build_info{{job="{JOB}"}}')
    assert len(build) == 1, build
    labels, value = build[0]
    assert value == 1 and labels["version"] == lossd_server.__version__
    # The device the server picked: CPU on a machine without a GPU.
    device_type = server.evaluator.device.device_type
    assert prometheus.value(f'lossd_device_info{{device_type="{device_type}"}}') == 1
    assert prometheus.value("count(lossd_device_info)") == 1
    if not _has_gpu():
        assert prometheus.value('lossd_device_info{device_type="CPU"}') == 1


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def test_promtool_accepts_the_live_exposition(stack):
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")
    server, _ = stack
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        body = resp.read()
    assert b"lossd_loss_evaluations_total" in body
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
