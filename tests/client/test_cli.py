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

from tests.keras_reference import value_and_gradient  # noqa: E402

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
    expected, expected_gradient = value_and_gradient(keras.losses.Huber(delta=2.0), y_true, y_pred)
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


EXPECTED_PAIR = "expects KEY=VALUE. Expected a key, '=' and a value (JSON, else a string). Received: "


@pytest.mark.parametrize("argv, says", [
    (lambda a, b: ["eval", "huber", "--y-true", a, "--y-pred", b, "--param", "delta"],
     f"error: --param {EXPECTED_PAIR}'delta'"),
    (lambda a, b: ["eval", "huber", "--y-true", a, "--y-pred", b, "--param", "=2"],
     f"error: --param {EXPECTED_PAIR}'=2'"),
    (lambda a, b: ["eval", "huber", "--y-true", _text_file(a.parent), "--y-pred", b],
     "error: --y-true: expected a .npy file (numpy.save). Received: '"),
    (lambda a, b: ["eval", "huber", "--y-true", a, "--y-pred", a.parent],
     "error: --y-pred: expected an existing .npy file. Received: "),
    (lambda a, b: ["eval", "mse", "--y-true", a, "--y-pred", b, "--sample-weight", _npz_file(a.parent)],
     "error: --sample-weight: expected a .npy file of one array. Received: "),
    (lambda a, b: ["losses", "register", "scaled", "mean(k * y_pred)", "--param", "k"],
     f"error: --param {EXPECTED_PAIR}'k'"),
    (lambda a, b: ["jobs", "create", "--optimizer-param", "beta_1"],
     f"error: --optimizer-param {EXPECTED_PAIR}'beta_1'"),
    (lambda a, b: ["jobs", "create", "--loss", "mse", "--loss-param", "=1"],
     f"error: --loss-param {EXPECTED_PAIR}'=1'"),
    (lambda a, b: ["jobs", "generate", "jobs/some-vae", "--no-progress", "--init", _text_file(a.parent)],
     "error: --init: expected a .npy file (numpy.save). Received: '"),
])
def test_malformed_flag_says_what_it_expected_before_any_call(capsys, arrays, argv, says):
    """As --tensor does: "error: ... Expected ... Received ...", status 2, and
    no call at all (the address has no server: a call would say UNAVAILABLE)."""
    _, _, a, b = arrays
    code, out, err = run(capsys, *argv(a, b), "--address", dead_address(), "--timeout", "2")
    assert (code, out) == (2, ""), err
    assert err.startswith(says) and "Traceback" not in err and "UNAVAILABLE" not in err, err


def test_malformed_param_as_a_subprocess(arrays):
    """The status and the words a shell sees."""
    _, _, a, b = arrays
    done = subprocess.run([lossd_executable(), "eval", "huber", "--y-true", str(a), "--y-pred", str(b),
                           "--param", "delta:2", "--address", dead_address()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == f"error: --param {EXPECTED_PAIR}'delta:2'\n"


def test_eval_missing_file(capsys, address, arrays, tmp_path):
    _, _, a, _ = arrays
    code, _, err = run(capsys, "eval", "mse", "--y-true", a, "--y-pred", tmp_path / "missing.npy",
                       "--address", address)
    assert code == 2
    assert err.startswith("error: ") and "missing.npy" in err


# -- lossd eval --tensor: extra tensors in, a stateful loss's outputs out ------------------

def test_eval_expression_reads_an_extra_tensor(capsys, address, arrays, tmp_path):
    y_true, y_pred, a, b = arrays
    w = RNG.uniform(0.0, 2.0, size=y_true.shape).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    g = tmp_path / "g.npy"
    code, out, err = run(capsys, "eval", "expr:mean(w * square(y_true - y_pred), axis=-1)", "--y-true", a,
                         "--y-pred", b, "--tensor", f"w={tmp_path / 'w.npy'}", "--gradient-out", g,
                         "--address", address)
    assert code == 0, err
    assert "output" not in out and "note" not in err  # an expression returns no outputs
    t, p, w64 = (x.astype(np.float64) for x in (y_true, y_pred, w))
    # sum_over_batch_size of per-sample means over equal rows: the mean of every element.
    assert float(out.strip()) == pytest.approx(np.mean(w64 * (t - p) ** 2), rel=1e-6)
    assert float(out.strip()) != pytest.approx(np.mean((t - p) ** 2), rel=1e-3)  # w was read
    np.testing.assert_allclose(np.load(g), -2 * w64 * (t - p) / t.size, rtol=1e-5, atol=1e-9)


def matrix_crossentropy_reference(t, o, a, window=4):
    """Mean over the batch of Σ_i [−t_i log2(o_i) + (A·t)_i exp(o_i) − t_i exp(o_i)],
    and A moved 1/window of the way to the batch's row-normalised confusion
    (rows of classes without samples unchanged), in float64 numpy."""
    t, o, a = (np.asarray(x, np.float64) for x in (t, o, a))
    log2 = np.log2(np.clip(o, 1e-7, 1 - 1e-7))
    loss = np.sum(-t * log2 + (t @ a.T) * np.exp(o) - t * np.exp(o), axis=-1).mean()
    counts = t.T @ np.eye(a.shape[0])[np.argmax(o, axis=-1)]
    totals = t.sum(axis=0)[:, None]
    moved = a + (np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0) - a) / window
    return loss, np.where(totals > 0, moved, a)


def test_eval_matrix_crossentropy_as_a_user_types_it(address, tmp_path):
    """Two steps of the stateful loss through the installed ``lossd`` command:
    the matrix goes in with --tensor, the updated one is printed and saved by
    --outputs-dir, and the saved file is the next step's --tensor."""
    classes, batch = 3, 8
    env = {**os.environ, "LOSSD_ADDRESS": address}
    a = RNG.uniform(0.1, 1.0, size=(classes, classes))
    a = (a / a.sum(axis=1, keepdims=True)).astype(np.float32)
    np.save(tmp_path / "A0.npy", a)
    matrix_file = tmp_path / "A0.npy"
    for step in range(2):
        labels = np.array([0, 0, 1, 1, 1, 0, 1, 0]) if step == 0 else RNG.integers(0, classes, batch)
        y_true = np.eye(classes, dtype=np.float32)[labels]  # step 0: class 2 absent, its row must stay
        y_pred = RNG.dirichlet(np.ones(classes), batch).astype(np.float32)
        np.save(tmp_path / f"t{step}.npy", y_true)
        np.save(tmp_path / f"o{step}.npy", y_pred)
        outputs = tmp_path / f"out{step}"
        done = subprocess.run([lossd_executable(), "eval", "matrix_crossentropy", "--y-true", str(tmp_path / f"t{step}.npy"),
                               "--y-pred", str(tmp_path / f"o{step}.npy"), "--tensor", f"matrix={matrix_file}",
                               "--outputs-dir", str(outputs)], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        want_loss, want_matrix = matrix_crossentropy_reference(y_true, y_pred, np.load(matrix_file))
        lines = done.stdout.splitlines()
        assert float(lines[0]) == pytest.approx(want_loss, rel=1e-5)
        assert lines[1].startswith("  output matrix: [[")
        printed = np.array(" ".join(lines[1:]).split(":", 1)[1].replace("[", " ").replace("]", " ").split(),
                           dtype=np.float64).reshape(classes, classes)
        np.testing.assert_allclose(printed, want_matrix, rtol=1e-6, atol=1e-7)  # array2string's 8 digits
        saved = np.load(outputs / "matrix.npy")
        assert saved.shape == (classes, classes) and saved.dtype == np.float32
        np.testing.assert_allclose(saved, want_matrix, rtol=1e-6, atol=1e-7)
        if step == 0:
            np.testing.assert_array_equal(saved[2], a[2])
            assert not np.allclose(saved[:2], a[:2])
        matrix_file = outputs / "matrix.npy"


def test_eval_without_outputs_dir_prints_the_matrix_only(capsys, address, tmp_path):
    y_true = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    y_pred = RNG.dirichlet(np.ones(3), 4).astype(np.float32)
    np.save(tmp_path / "t.npy", y_true)
    np.save(tmp_path / "o.npy", y_pred)
    code, out, err = run(capsys, "eval", "matrix_crossentropy", "--y-true", tmp_path / "t.npy", "--y-pred",
                         tmp_path / "o.npy", "--param", "window=2", "--address", address)
    assert code == 0, err
    # Without --tensor the matrix starts as the identity.
    want_loss, want_matrix = matrix_crossentropy_reference(y_true, y_pred, np.eye(3), window=2)
    assert float(out.splitlines()[0]) == pytest.approx(want_loss, rel=1e-5)
    printed = out.split("output matrix:", 1)[1].replace("[", " ").replace("]", " ").split()
    np.testing.assert_allclose(np.array(printed, dtype=np.float64).reshape(3, 3), want_matrix, atol=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.npy", "t.npy"]


def test_outputs_dir_with_a_loss_without_outputs_says_so(capsys, address, arrays, tmp_path):
    _, _, a, b = arrays
    code, out, err = run(capsys, "eval", "mse", "--y-true", a, "--y-pred", b, "--outputs-dir", tmp_path / "out",
                         "--address", address)
    assert code == 0, err
    assert "output" not in out
    assert err == f"note: mse returns no outputs; nothing saved in {tmp_path / 'out'}\n"
    assert not (tmp_path / "out").exists()


def _text_file(folder):
    (folder / "m.txt").write_text("1 0\n0 1\n")
    return folder / "m.txt"


def _npz_file(folder):
    np.savez(folder / "m.npz", matrix=np.eye(3))
    return folder / "m.npz"


@pytest.mark.parametrize("value, says", [
    (lambda d: "matrix", "error: --tensor expects NAME=FILE.npy. Received: 'matrix'"),
    (lambda d: f"={d / 'a.npy'}", "error: --tensor expects NAME=FILE.npy. Received: '="),
    (lambda d: "matrix=", "error: --tensor expects NAME=FILE.npy. Received: 'matrix='"),
    (lambda d: f"matrix={d / 'missing.npy'}", "error: --tensor matrix: expected an existing .npy file. Received: '"),
    (lambda d: f"matrix={d}", "(a directory)"),
    (lambda d: f"matrix={_text_file(d)}", "error: --tensor matrix: expected a .npy file (numpy.save). Received: '"),
    (lambda d: f"matrix={_npz_file(d)}", "an .npz archive; save each array with numpy.save"),
    (lambda d: f"y_true={d / 'a.npy'}", "error: --tensor y_true: y_true has its own flag. Expected --y-true "),
])
def test_eval_malformed_tensor_says_what_it_expected(capsys, address, arrays, value, says):
    _, _, a, b = arrays
    code, out, err = run(capsys, "eval", "matrix_crossentropy", "--y-true", a, "--y-pred", b,
                         "--tensor", value(a.parent), "--address", address)
    assert code == 2
    assert out == ""
    assert says in err and err.startswith("error: ") and "Traceback" not in err, err


def test_eval_tensor_named_twice_is_refused(capsys, address, arrays):
    _, _, a, b = arrays
    code, out, err = run(capsys, "eval", "expr:mean(w * y_pred, axis=-1)", "--y-true", a, "--y-pred", b,
                         "--tensor", f"w={a}", "--tensor", f"w={b}", "--address", address)
    assert code == 2 and out == ""
    assert err.startswith("error: --tensor w: given twice. Expected each name once. Received: --tensor w="), err


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

    parser = cli.build_parser()
    parser.parse_args(["serve"])  # serve's flags are made when it is parsed (cli.LazyParser)
    serve = parser.get_default("commands").choices["serve"]
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
