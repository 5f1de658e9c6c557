"""The monitor alerts of deploy/prometheus/alerts.yml, driven through a real
Prometheus scraping a real lossd: a drift injected into a monitor's
observations fires LossdMonitorDrift within two rule evaluations of the
first scrape that saw it, and a loss above the monitor's max_loss fires
nothing before its `for` passed (checked as pending).

Prometheus runs with the deployment's rule file, unchanged, and a config of
its own that scrapes and evaluates every second (the deployment's 15 s
would make the test slow, not different). Needs the ``prometheus`` binary
(Debian/Ubuntu: ``apt-get install prometheus``)."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

import lossd
from test_deploy import ALERTS, require
from tests.servers import free_port, lossd_servers

INTERVAL_S = 1  # scrape and rule evaluation


class Prometheus:
    def __init__(self, root, target: str):
        binary = require("prometheus", "Debian/Ubuntu: apt-get install prometheus; `make test` does as root")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(ALERTS, root / "alerts.yml")
        (root / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {INTERVAL_S}s\n  evaluation_interval: {INTERVAL_S}s\n"
            f"rule_files:\n  - alerts.yml\n"
            f"scrape_configs:\n  - job_name: lossd\n    static_configs:\n      - targets: [\"{target}\"]\n")
        self.log = root / "prometheus.log"
        self.process = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def api(self, path: str, **params):
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def until(self, check, what: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                found = check()
            except OSError:
                found = None
            if found:
                return found
            time.sleep(0.2)
        raise TimeoutError(f"{what} not seen after {timeout} s\n{self.log.read_text()[-3000:]}")

    def alerts(self, name: str) -> list[dict]:
        return [a for a in self.api("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture()
def stack(tmp_path_factory, tmp_path):
    with lossd_servers(tmp_path_factory, warmup=False, monitor_report_seconds=0.25, metrics_cache_seconds=0) as start:
        srv = start()
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{srv.metrics_port}")
        try:
            yield srv, prometheus
        finally:
            prometheus.stop()


def _pairs(rng, n: int, noise: float):
    y_true = rng.normal(size=(n, 1)).astype(np.float32)
    return y_true, (y_true + rng.normal(scale=noise, size=(n, 1))).astype(np.float32)


def _seconds(rfc3339: str) -> float:
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_an_injected_drift_fires_within_two_evaluations(stack):
    srv, prometheus = stack
    rng = np.random.default_rng(11)
    with lossd.Client(f"127.0.0.1:{srv.port}", timeout=60) as client:
        client.create_monitor("drifty", "mean_absolute_error", [5], max_loss=1.0)
        y_true, y_pred = _pairs(rng, 200, 0.3)
        client.observe("drifty", [f"ref-{i}" for i in range(200)], y_pred, y_true)
        client.capture_reference("drifty")
        time.sleep(5.5)  # the window empties
        y_true, y_pred = _pairs(rng, 200, 0.3)
        client.observe("drifty", [f"same-{i}" for i in range(200)], y_pred, y_true)
        selector = 'lossd_monitor_drift_p_value{job="lossd", monitor="drifty", window="5s"}'
        prometheus.until(lambda: prometheus.api("/api/v1/query", query=selector)["result"], "the p-value scraped")
        time.sleep(3 * INTERVAL_S)
        assert prometheus.alerts("LossdMonitorDrift") == []  # the same distribution: no drift
        time.sleep(5.5)
        y_true, y_pred = _pairs(rng, 200, 3.0)  # the model got worse
        client.observe("drifty", [f"drift-{i}" for i in range(200)], y_pred, y_true)
        firing = prometheus.until(
            lambda: [a for a in prometheus.alerts("LossdMonitorDrift") if a["state"] == "firing"], "the drift alert")
    assert firing[0]["labels"]["monitor"] == "drifty" and firing[0]["labels"]["window"] == "5s"
    # The first scraped sample that showed the drift, from the raw samples Prometheus stored.
    samples = prometheus.api("/api/v1/query", query=f"{selector}[2m]")["result"][0]["values"]
    first = min(float(t) for t, v in samples if float(v) < 0.001)
    assert _seconds(firing[0]["activeAt"]) - first <= 2 * INTERVAL_S + 0.5, (firing[0]["activeAt"], first)
    # The mean absolute error of the drifted pairs (about 2.4) is above max_loss: pending for its 5 minutes.
    pending = prometheus.until(lambda: prometheus.alerts("LossdMonitorLossHigh"), "the loss alert pending")
    assert pending[0]["state"] == "pending" and pending[0]["labels"]["monitor"] == "drifty"
