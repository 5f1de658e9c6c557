"""Quality, measured: a cnn with the default settings on digits reaches at
least 95 % validation accuracy."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_cnn_on_digits_reaches_95_percent(tclient):
    job = tclient.wait(tclient.create_job("cnn", "digits"), progress=False)
    assert job.state == "succeeded", job.error
    assert job.spec["epochs"] == 10 and job.spec["batch_size"] == 32
    accuracy = job.progress["metrics"]["val_accuracy"]
    print(f"cnn on digits, defaults: val_accuracy={accuracy:.4f}")
    assert accuracy >= 0.95
