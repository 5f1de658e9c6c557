"""The ``loss`` label of the evaluation metrics, read from the real
``/metrics`` of the test server: an inline expression counts as
``expression``, a composite as ``composite``, a mistyped name as ``other``."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import lossd

Y_TRUE = np.arange(6, dtype=np.float32).reshape(2, 3)
Y_PRED = Y_TRUE + 1


def evaluations(server, loss: str, outcome: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "lossd_loss_evaluations":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels == {"loss": loss, "outcome": outcome}:
                    return sample.value
    return 0.0


def counted(server, loss: str, outcome: str, call) -> float:
    before = evaluations(server, loss, outcome)
    call()
    return evaluations(server, loss, outcome) - before


def test_inline_expression_counts_as_expression(server, client):
    spec = {"expression": "mean(abs(y_true - y_pred), axis=-1)"}
    assert counted(server, "expression", "ok", lambda: client.evaluate(spec, Y_TRUE, Y_PRED)) == 1


def test_a_refused_expression_counts_as_expression(server, client):
    def refused():
        with pytest.raises(lossd.LossdError):
            client.evaluate({"expression": "mean(y_true - nope, axis=-1)"}, Y_TRUE, Y_PRED)
    assert counted(server, "expression", "invalid_argument", refused) == 1


def test_composite_counts_as_composite(server, client):
    spec = {"terms": [{"name": "mse", "weight": 0.5}, {"expression": "mean(abs(y_true - y_pred), axis=-1)"}]}
    assert counted(server, "composite", "ok", lambda: client.evaluate(spec, Y_TRUE, Y_PRED)) == 1


def test_named_loss_counts_by_its_canonical_name(server, client):
    assert counted(server, "mean_squared_error", "ok", lambda: client.evaluate("mse", Y_TRUE, Y_PRED)) == 1


def test_mistyped_name_counts_as_other(server, client):
    def refused():
        with pytest.raises(lossd.LossdError):
            client.evaluate("msee", Y_TRUE, Y_PRED)
    assert counted(server, "other", "invalid_argument", refused) == 1


def test_expression_label_is_there_before_any_evaluation(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'lossd_loss_evaluations_total{loss="expression",outcome="error"}' in text
