"""The ``lossd`` command line against the real in-process server: in-process
through ``lossd.cli.main`` (fast), and once as a real subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from lossd import cli

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

RNG = np.random.default_rng(21)


def lossd_executable() -> str:
    beside_python = pathlib.Path(sys.executable).parent / "lossd"
    path = str(beside_python) if beside_python.is_file() else shutil.which("lossd")
    assert path, "the `lossd` console script is not installed (pip install -e '.[server]')"
    return path


def dead_address() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"127.0.0.1:{port}"


@pytest.fixture()
def arrays(tmp_path):
    y_true = RNG.normal(size=(6, 4)).astype(np.float32)
    y_pred = (y_true + RNG.normal(scale=3.0, size=(6, 4))).astype(np.float32)
    np.save(tmp_path / "a.npy", y_true)
    np.save(tmp_path / "b.npy", y_pred)
    return y_true, y_pred, tmp_path / "a.npy", tmp_path / "b.npy"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- lossd losses --------------------------------------------------------------------

def test_losses_table(capsys, address):
    code, out, err = run(capsys, "losses", "--address", address)
    assert code == 0, err
    lines = out.splitlines()
    huber = next(line for line in lines if line.startswith("huber "))
    assert "delta=1.0" in huber
    doc = lines[lines.index(huber) + 1]
    assert doc.startswith(" ") and doc.strip(), "each loss is followed by its one-line doc"
    assert any(line.startswith("mean_squared_error ") and "mse" in line for line in lines)


def test_losses_json(capsys, address):
    code, out, err = run(capsys, "losses", "--address", address, "--json")
    assert code == 0, err
    losses = {item["name"]: item for item in json.loads(out)}
    delta = next(p for p in losses["huber"]["parameters"] if p["name"] == "delta")
    assert delta["default"] == 1.0 and delta["type"] == "float"
    assert "mse" in losses["mean_squared_error"]["aliases"]


def test_address_from_environment(capsys, address, monkeypatch):
    monkeypatch.setenv("LOSSD_ADDRESS", address)
    code, out, err = run(capsys, "losses")
    assert code == 0, err
    assert "huber" in out


# -- lossd eval ----------------------------------------------------------------------

def test_eval_with_param_and_gradient_out(capsys, address, arrays, tmp_path):
    y_true, y_pred, a, b = arrays
    g = tmp_path / "g.npy"
    code, out, err = run(capsys, "eval", "huber", "--y-true", a, "--y-pred", b, "--param", "delta=2",
                         "--gradient-out", g, "--address", address)
    assert code == 0, err
    pred = tf.constant(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(pred)
        expected = keras.losses.Huber(delta=2.0)(y_true, pred)
    expected_gradient = tape.gradient(expected, pred).numpy()
    assert float(out.strip()) == pytest.approx(float(expected), rel=1e-6)
    assert float(out.strip()) != pytest.approx(float(keras.losses.Huber()(y_true, y_pred)), rel=1e-3)
    gradient = np.load(g)
    assert gradient.shape == y_pred.shape and gradient.dtype == np.float32
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-5, atol=1e-8)


def test_eval_reduction_none(capsys, address, arrays):
    y_true, y_pred, a, b = arrays
    code, out, err = run(capsys, "eval", "mae", "--y-true", a, "--y-pred", b, "--reduction", "none",
                         "--address", address)
    assert code == 0, err
    values = np.array(out.replace("[", " ").replace("]", " ").split(), dtype=np.float64)
    expected = keras.losses.MeanAbsoluteError(reduction="none")(y_true, y_pred).numpy()
    assert values.shape == (6,)
    np.testing.assert_allclose(values, expected, rtol=1e-6)


def test_eval_with_sample_weight(capsys, address, arrays, tmp_path):
    y_true, y_pred, a, b = arrays
    sw = RNG.uniform(0.5, 2.0, size=6).astype(np.float32)
    np.save(tmp_path / "w.npy", sw)
    code, out, err = run(capsys, "eval", "mse", "--y-true", a, "--y-pred", b, "--sample-weight", tmp_path / "w.npy",
                         "--reduction", "sum", "--address", address)
    assert code == 0, err
    expected = keras.losses.MeanSquaredError(reduction="sum")(y_true, y_pred, sample_weight=sw)
    assert float(out) == pytest.approx(float(expected), rel=1e-6)


def test_eval_non_finite_warns(capsys, address, arrays, tmp_path):
    y_true, y_pred, a, _ = arrays
    y_pred = y_pred.copy()
    y_pred[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", y_pred)
    code, out, err = run(capsys, "eval", "mse", "--y-true", a, "--y-pred", tmp_path / "nan.npy",
                         "--address", address)
    assert code == 0
    assert out.strip() == "nan"
    assert "NaN or Inf" in err


def test_eval_unknown_loss(capsys, address, arrays):
    _, _, a, b = arrays
    code, out, err = run(capsys, "eval", "hubr", "--y-true", a, "--y-pred", b, "--address", address)
    assert code == 1
    assert out == ""
    assert err.startswith("error: INVALID_ARGUMENT UNKNOWN_LOSS: Unknown loss. Expected a registered loss name or alias (see ListLosses). Received: 'hubr'.")
    assert "Did you mean huber" in err
    assert "Traceback" not in err


def test_eval_bad_parameter(capsys, address, arrays):
    _, _, a, b = arrays
    code, _, err = run(capsys, "eval", "huber", "--y-true", a, "--y-pred", b, "--param", "delta=-1",
                       "--address", address)
    assert code == 1
    assert "PARAMETER_OUT_OF_RANGE" in err and "Received: delta=-1" in err


def test_eval_malformed_param(capsys, address, arrays):
    _, _, a, b = arrays
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "huber", "--y-true", str(a), "--y-pred", str(b), "--param", "delta", "--address", address])
    assert "--param expects KEY=VALUE" in str(exc.value.code)


def test_eval_missing_file(capsys, address, arrays, tmp_path):
    _, _, a, _ = arrays
    code, _, err = run(capsys, "eval", "mse", "--y-true", a, "--y-pred", tmp_path / "missing.npy",
                       "--address", address)
    assert code == 2
    assert err.startswith("error: ") and "missing.npy" in err


def test_eval_server_down(capsys, arrays):
    _, _, a, b = arrays
    code, _, err = run(capsys, "eval", "mse", "--y-true", a, "--y-pred", b, "--address", dead_address(),
                       "--timeout", "5")
    assert code == 1
    assert err.startswith("error: UNAVAILABLE")


# -- lossd health ---------------------------------------------------------------------

def test_health(capsys, address):
    code, out, err = run(capsys, "health", "--address", address)
    assert code == 0, err
    assert out.strip() == "SERVING"


def test_health_of_the_loss_service(capsys, address):
    code, out, _ = run(capsys, "health", "--address", address, "--service", "lossd.v1.LossService")
    assert code == 0
    assert out.strip() == "SERVING"


def test_health_server_down(capsys):
    code, out, err = run(capsys, "health", "--address", dead_address(), "--timeout", "2")
    assert code == 1
    assert out == ""
    assert err.startswith("unhealthy: ")


# -- lossd serve's flags ----------------------------------------------------------------

def test_serve_has_a_flag_per_setting():
    from lossd_server.config import Settings

    serve = cli.build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in flags, name
    for needed in ("--host", "--port", "--metrics-port", "--data-dir", "--max-message-bytes", "--log-level"):
        assert needed in flags


# -- a real subprocess -------------------------------------------------------------------

def test_cli_as_a_subprocess(address, arrays, tmp_path):
    y_true, y_pred, a, b = arrays
    env = {**os.environ, "LOSSD_ADDRESS": address}
    g = tmp_path / "g_sub.npy"
    done = subprocess.run([lossd_executable(), "eval", "huber", "--y-true", str(a), "--y-pred", str(b),
                           "--param", "delta=2", "--gradient-out", str(g)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(float(keras.losses.Huber(delta=2.0)(y_true, y_pred)), rel=1e-6)
    assert np.load(g).shape == y_pred.shape

    done = subprocess.run([lossd_executable(), "eval", "hubr", "--y-true", str(a), "--y-pred", str(b)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("error: INVALID_ARGUMENT UNKNOWN_LOSS: Unknown loss. Expected a registered loss name or alias (see ListLosses). Received: 'hubr'."), done.stderr
