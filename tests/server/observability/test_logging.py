"""Access logs: one DEBUG line per request, one WARNING line per failure, each
with the request id from ``x-request-id`` metadata or a generated one; JSON or
text format (``lossd_server.observability.logs.configure``, setting ``LOSSD_LOG_FORMAT``)."""

from __future__ import annotations

import io
import json
import logging
import re
import time

import numpy as np
import pytest

import lossd
from lossd_server.config import Settings

ACCESS_LOGGER = "lossd_server.access"
JSON_KEYS = {"time", "level", "logger", "message", "request_id"}
GENERATED_ID = re.compile(r"^[0-9a-f]{16}$")

Y_TRUE = np.linspace(0.0, 1.0, 6, dtype=np.float32).reshape(2, 3)
Y_PRED = Y_TRUE + 0.5


def lines_of(stream: io.StringIO, count: int, *, where=lambda line: True, timeout: float = 5.0) -> list:
    """The lines matching ``where`` once there are at least ``count`` of them.

    The interceptor logs before gRPC sends the status, so they are normally
    there when the call returns; the short wait only guards against that
    changing.
    """
    deadline = time.monotonic() + timeout
    while True:
        matching = [line for line in stream.getvalue().splitlines() if where(line)]
        if len(matching) >= count or time.monotonic() > deadline:
            return matching
        time.sleep(0.01)


def json_records(stream: io.StringIO) -> list[dict]:
    records = []
    for line in stream.getvalue().splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict), line
        assert JSON_KEYS <= record.keys(), line
        records.append(record)
    return records


def access_records(stream: io.StringIO, count: int) -> list[dict]:
    lines_of(stream, count, where=lambda line: f'"logger": "{ACCESS_LOGGER}"' in line)
    return [r for r in json_records(stream) if r["logger"] == ACCESS_LOGGER]


def test_successful_call_logs_one_debug_line_with_the_client_request_id(address, configure_logs):
    stream = configure_logs("json")
    with lossd.Client(address, timeout=60, metadata=[("x-request-id", "abc-123")]) as client:
        assert client.evaluate("mse", Y_TRUE, Y_PRED).loss == pytest.approx(0.25)
    records = access_records(stream, 1)
    assert len(records) == 1, records
    record = records[0]
    assert record["level"] == "DEBUG"
    assert record["request_id"] == "abc-123"
    assert "LossService/Evaluate" in record["message"] and "OK" in record["message"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", record["time"]), record["time"]


def test_failing_call_logs_one_warning_line(address, configure_logs):
    stream = configure_logs("json")
    with lossd.Client(address, timeout=60, metadata=[("x-request-id", "bad-loss-1")]) as client:
        with pytest.raises(lossd.LossdError) as info:
            client.evaluate("no_such_loss", Y_TRUE, Y_PRED)
    assert info.value.code.name == "INVALID_ARGUMENT"
    records = access_records(stream, 1)
    assert len(records) == 1, records
    record = records[0]
    assert record["level"] == "WARNING"
    assert record["request_id"] == "bad-loss-1"
    assert "INVALID_ARGUMENT" in record["message"] and "no_such_loss" in record["message"]
    # The failure is logged once, not once more by the error handling.
    warnings = [r for r in json_records(stream)
                if r["level"] in ("WARNING", "ERROR") and r["request_id"] == "bad-loss-1"]
    assert warnings == [record]


def test_generated_request_ids_are_16_hex_chars_and_differ(address, configure_logs):
    stream = configure_logs("json")
    with lossd.Client(address, timeout=60) as client:
        client.evaluate("mse", Y_TRUE, Y_PRED)
        client.evaluate("mse", Y_TRUE, Y_PRED)
        with pytest.raises(lossd.LossdError):
            client.evaluate("mse", Y_TRUE, Y_PRED[:, :2])
    records = access_records(stream, 3)
    assert [r["level"] for r in records] == ["DEBUG", "DEBUG", "WARNING"], records
    ids = [r["request_id"] for r in records]
    assert all(GENERATED_ID.match(rid) for rid in ids), ids
    assert len(set(ids)) == 3, ids


def test_request_id_does_not_leak_outside_the_request(address, configure_logs):
    stream = configure_logs("json")
    with lossd.Client(address, timeout=60, metadata=[("x-request-id", "abc-123")]) as client:
        client.evaluate("mse", Y_TRUE, Y_PRED)
    access_records(stream, 1)
    logging.getLogger("lossd_server.test").warning("outside any request")
    record = json_records(stream)[-1]
    assert record["message"] == "outside any request" and record["request_id"] == "-"


def test_text_format_contains_the_request_id(address, configure_logs):
    stream = configure_logs("text")
    with lossd.Client(address, timeout=60, metadata=[("x-request-id", "abc-123")]) as client:
        client.evaluate("huber", Y_TRUE, Y_PRED)
        with pytest.raises(lossd.LossdError):
            client.evaluate("no_such_loss", Y_TRUE, Y_PRED)
    lines = lines_of(stream, 2, where=lambda line: f" {ACCESS_LOGGER} " in line)
    assert len(lines) == 2, stream.getvalue()
    assert " DEBUG " in lines[0] and " WARNING " in lines[1], lines
    assert all("[abc-123]" in line for line in lines), lines
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_a_client_chosen_name_cannot_split_the_access_line(address, configure_logs):
    # GetJob's NOT_FOUND quotes the name it was given, newline and all.
    stream = configure_logs("text")
    forged = "jobs/x\n2026-01-01_WARNING_lossd_server.access_forged"
    with lossd.Client(address, timeout=60, metadata=[("x-request-id", "split-1")]) as client:
        with pytest.raises(lossd.LossdError) as info:
            client.get_job(forged)
    assert info.value.code.name == "NOT_FOUND" and "\n" in info.value.message  # the client sees it as sent
    lines = lines_of(stream, 1, where=lambda line: f" {ACCESS_LOGGER} [split-1]" in line)
    assert len(lines) == 1 and "GetJob NOT_FOUND" in lines[0], stream.getvalue()
    assert "jobs/x\\n2026-01-01" in lines[0], lines[0]
    assert not [line for line in stream.getvalue().splitlines() if line.startswith("2026-01-01")], stream.getvalue()


def test_info_level_drops_the_per_request_line(address, configure_logs):
    stream = configure_logs("json")
    logging.getLogger().setLevel("INFO")
    with lossd.Client(address, timeout=60) as client:
        client.evaluate("mse", Y_TRUE, Y_PRED)
        with pytest.raises(lossd.LossdError):
            client.evaluate("no_such_loss", Y_TRUE, Y_PRED)
    records = access_records(stream, 1)
    assert [r["level"] for r in records] == ["WARNING"], records


def test_log_format_setting_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOSSD_LOG_FORMAT", "json")
    monkeypatch.setenv("LOSSD_LOG_LEVEL", "DEBUG")
    settings = Settings(data_dir=tmp_path)
    assert settings.log_format == "json" and settings.log_level == "DEBUG"
    monkeypatch.setenv("LOSSD_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        Settings(data_dir=tmp_path)
