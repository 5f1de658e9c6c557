"""Loss monitors from the client, against the real in-process server: the
sync client, its asyncio mirror, and `lossd monitors ...` on the command
line (in process through ``lossd.cli.main``)."""

from __future__ import annotations

import asyncio
import itertools
import json

import keras
import numpy as np
import pytest

import lossd
import lossd.aio
from lossd import cli

_names = (f"client-{i}" for i in itertools.count())


def _pairs(n: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.normal(size=(n, 3)).astype(np.float32)
    return y_true, (y_true + rng.normal(scale=scale, size=(n, 3))).astype(np.float32)


def test_sync_client(client):
    name = next(_names)
    made = client.create_monitor(name, "huber", [60, 3600], loss_params={"delta": 0.5},
                                 segment_keys=["model_version"], retention=600)
    assert made.name == f"monitors/{name}" and made.windows == (60.0, 3600.0) and made.retention == 600.0
    y_true, y_pred = _pairs(40, 1)
    ids = [f"req-{i}" for i in range(40)]
    assert client.observe(name, ids[:30], y_pred[:30], segments={"model_version": "v1"}).pending == 30
    assert client.label(made, ids[:20], y_true[:20]).paired == 20
    results = client.observe_many(name, [
        {"ids": ids[20:30], "y_true": y_true[20:30]},
        {"ids": ids[30:], "y_pred": y_pred[30:], "y_true": y_true[30:], "segments": {"model_version": "v2"}}])
    assert [r.paired for r in results] == [10, 10]
    monitor = client.monitor(name)
    window = monitor.window(3600)
    assert window.count == 40 and window.labelled_fraction == 1.0
    assert window.mean_loss == pytest.approx(float(keras.losses.Huber(delta=0.5)(y_true, y_pred)), rel=1e-5)
    assert monitor.window(60, "model_version=v2").count == 10
    captured = client.capture_reference(name)
    assert captured.reference_window == 3600.0 and captured.window(3600).drift["p_value"] == 1.0
    assert f"monitors/{name}" in [m.name for m in client.monitors()]
    with pytest.raises(lossd.LossdError) as refused:
        client.observe(name, ["a", "a"], y_pred[:2])
    assert refused.value.reason == "BAD_IDS"
    client.delete_monitor(name)
    with pytest.raises(lossd.LossdError) as gone:
        client.monitor(name)
    assert gone.value.reason == "MONITOR_NOT_FOUND"


def test_a_refused_batch_of_a_stream_raises(client):
    name = next(_names)
    client.create_monitor(name, "mse", [60])
    y_true, y_pred = _pairs(4, 2)
    with pytest.raises(lossd.LossdError) as refused:
        client.observe_many(name, [{"ids": ["a", "b"], "y_pred": y_pred[:2]}, {"ids": ["c"], "y_pred": y_pred[:2]}])
    assert refused.value.reason == "SHAPE_MISMATCH"
    assert client.monitor(name).pending["predictions"] == 2  # the first batch went in
    client.delete_monitor(name)


def test_asyncio_client_mirrors_the_sync_one(address):
    name = next(_names)
    y_true, y_pred = _pairs(12, 3)

    async def main():
        async with lossd.aio.Client(address, timeout=60) as client:
            await client.create_monitor(name, "mean_squared_error", [60])
            await client.observe(name, [str(i) for i in range(6)], y_pred[:6])
            await client.label(name, [str(i) for i in range(6)], y_true[:6])
            answers = await client.observe_many(name, [{"ids": [str(i) for i in range(6, 12)],
                                                        "y_pred": y_pred[6:], "y_true": y_true[6:]}])
            captured = await client.capture_reference(name, 60)
            listed = await client.monitors()
            monitor = await client.monitor(name)
            await client.delete_monitor(name)
            return answers, captured, listed, monitor

    answers, captured, listed, monitor = asyncio.run(main())
    assert answers[0].paired == 6 and captured.reference_window == 60.0
    assert f"monitors/{name}" in [m.name for m in listed]
    assert monitor.window(60).mean_loss == pytest.approx(float(keras.losses.MeanSquaredError()(y_true, y_pred)),
                                                         rel=1e-5)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_line(capsys, address, client, tmp_path):
    name = next(_names)
    code, out, err = run(capsys, "monitors", "create", name, "--loss", "mse", "--windows", "1m,1h",
                         "--segment-keys", "region", "--retention", "1d", "--address", address)
    assert (code, out.strip()) == (0, f"monitors/{name}"), err
    y_true, y_pred = _pairs(8, 4)
    client.observe(name, [str(i) for i in range(8)], y_pred, y_true, segments={"region": "eu"})
    code, out, err = run(capsys, "monitors", "list", "--address", address)
    assert code == 0 and f"monitors/{name}  mse  windows=1m,1h  segments=region" in out, err
    code, out, err = run(capsys, "monitors", "get", name, "--json", "--address", address)
    report = json.loads(out)["report"]
    assert code == 0 and [(r["window"], r["segment"], r["count"]) for r in report] == [
        (60, "", 8), (60, "region=eu", 8), (3600, "", 8), (3600, "region=eu", 8)]
    assert report[0]["mean_loss"] == pytest.approx(float(keras.losses.MeanSquaredError()(y_true, y_pred)), rel=1e-5)
    code, out, err = run(capsys, "monitors", "capture", name, "--window", "1h", "--address", address)
    assert code == 0 and "reference captured from the 1h window" in out, err
    code, out, err = run(capsys, "monitors", "watch", name, "--count", "2", "--interval", "0.1", "--address", address)
    assert code == 0, err
    tables = out.strip().split("\n\n")
    assert len(tables) == 2
    lines = tables[0].splitlines()
    assert lines[1].split() == ["WINDOW", "SEGMENT", "PAIRS", "MEAN", "P50", "P90", "P99", "LABELLED", "DELAY",
                                "DRIFT_P"]
    assert lines[2].split()[:3] == ["1m", "(all)", "8"] and lines[2].split()[-1] == "1"
    history = client.monitor(name, history_points=6).history
    assert len(history) == 12 and [h[1] for h in history[:2]] == [60.0, 3600.0]
    assert history[-1][2:] == (8, pytest.approx(report[2]["mean_loss"]))  # now: the hour's mean
    code, out, err = run(capsys, "monitors", "plot", name, "-o", tmp_path / "loss.png", "--address", address)
    assert code == 0 and out.strip() == str(tmp_path / "loss.png"), err
    from PIL import Image

    with Image.open(tmp_path / "loss.png") as image:
        assert image.format == "PNG" and image.width >= 600
    code, out, err = run(capsys, "monitors", "create", "x", "--loss", "mse", "--windows", "5q", "--address", address)
    assert code == 2 and "--windows expects durations" in err
    code, out, err = run(capsys, "monitors", "delete", name, "--address", address)
    assert code == 0, err
    code, out, err = run(capsys, "monitors", "get", name, "--address", address)
    assert code == 1 and "NOT_FOUND MONITOR_NOT_FOUND" in err
