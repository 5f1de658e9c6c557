"""The monitor example of docs/monitors.md (examples/monitor_digits.py), run
as written against the real training server: a cnn trained on digits is
served with Predict, its clean predictions become the reference, and a
change of camera (digits turned and noised) drifts the short window past
the LossdMonitorDrift threshold, which the gauge on /metrics shows too."""

from __future__ import annotations

import pathlib
import re
import sys
import urllib.request

import pytest

import lossd
from tests.servers import PATIENCE

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "examples"))
import monitor_digits  # noqa: E402


def test_the_digits_example_drifts_past_the_alert(training_server, training_address):
    rule = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    threshold = float(re.search(r"lossd_monitor_drift_p_value\{[^}]*\}\) < ([0-9.e-]+)", rule).group(1))
    assert threshold == monitor_digits.DRIFT_P_VALUE
    with lossd.Client(training_address, timeout=PATIENCE) as client:
        job = client.wait(client.create_job("cnn", "digits", epochs=8), progress=False, timeout=PATIENCE)
        assert job.state == "succeeded", job.error
        monitor = monitor_digits.run(client, job)
        short = monitor.window(monitor_digits.SHORT)
        reference = monitor.window(monitor_digits.LONG)
        assert short.count == 600 and reference.count == 1200 and short.labelled_fraction == 1.0
        assert short.drift["reference_count"] == 600
        assert short.drift["p_value"] < threshold and short.mean_loss > 1.5  # above the max_loss it was given
        assert monitor.window(monitor_digits.SHORT, "model_version=v1").drift["p_value"] < threshold
        training_server.monitors.publish()  # what the reporter thread does every few seconds
        if training_server.metrics_port is not None:
            body = urllib.request.urlopen(f"http://127.0.0.1:{training_server.metrics_port}/metrics").read().decode()
            value = re.search(r'lossd_monitor_drift_p_value\{monitor="digits-cnn",segment="",window="10s"\} (\S+)',
                              body)
            assert value is not None and float(value.group(1)) < threshold
        client.delete_monitor(monitor_digits.MONITOR)
