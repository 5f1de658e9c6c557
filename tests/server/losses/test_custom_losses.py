"""Custom losses through the real server: expressions, composites, registered
losses that survive a restart, hostile expressions, and an installed plugin."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tests.keras_reference import value_and_gradient  # noqa: E402
from tests.servers import PATIENCE  # noqa: E402

import lossd  # noqa: E402
from lossd_server.app import create_server  # noqa: E402
from lossd_server.config import Settings  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[3]
HUBER = ("mean(where(abs(y_true - y_pred) <= delta, 0.5 * square(y_true - y_pred), "
         "delta * (abs(y_true - y_pred) - 0.5 * delta)), axis=-1)")
REDUCTIONS = ["none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight"]


def _inputs(seed=0, shape=(16, 6), dtype="float32"):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape).astype(dtype), (rng.normal(size=shape) * 3).astype(dtype),
            rng.uniform(0.1, 2, size=shape[:1]).astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_huber_as_an_expression_equals_the_builtin(client, dtype):
    y_true, y_pred, sw = _inputs(dtype=dtype)
    for reduction in REDUCTIONS:
        for weights in (None, sw):
            expr = client.evaluate({"expression": HUBER, "params": {"delta": 2.0}}, y_true, y_pred,
                                   sample_weight=weights, reduction=reduction, gradient=True)
            builtin = client.evaluate("huber", y_true, y_pred, params={"delta": 2.0}, sample_weight=weights,
                                      reduction=reduction, gradient=True)
            tol = 1e-5 if dtype == "float32" else 1e-12
            np.testing.assert_allclose(expr.loss, builtin.loss, rtol=tol, err_msg=reduction)
            np.testing.assert_allclose(expr.gradient, builtin.gradient, rtol=tol, atol=tol, err_msg=reduction)


def test_vae_loss_as_one_composite_request(client):
    """0.01 * KL(z_mean, z_log_var) + MSE(x, x_hat), compared with the Keras VAE example's arithmetic."""
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(8, 64)).astype("float32")
    x_hat = rng.uniform(size=(8, 64)).astype("float32")
    z_mean = rng.normal(size=(8, 2)).astype("float32")
    z_log_var = rng.normal(size=(8, 2)).astype("float32") * 0.5
    loss = {"terms": [{"name": "vae_kl", "weight": 0.01, "label": "kl"},
                      {"name": "mse", "label": "reconstruction"}]}
    got = client.evaluate(loss, x, x_hat, tensors={"z_mean": z_mean, "z_log_var": z_log_var}, gradient=True)

    kl = tf.reduce_mean(-0.5 * tf.reduce_mean(1 + z_log_var - tf.square(z_mean) - tf.exp(z_log_var), axis=-1))
    reconstruction = keras.losses.MeanSquaredError()(x, x_hat)
    total, total_gradient = value_and_gradient(
        lambda t, p: 0.01 * kl + keras.losses.MeanSquaredError()(t, p), x, x_hat)
    np.testing.assert_allclose(got.loss, total, rtol=1e-5)
    np.testing.assert_allclose(got.terms["kl"], kl.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.terms["reconstruction"], reconstruction.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.gradient, total_gradient, rtol=1e-4, atol=1e-8)


def test_composite_terms_can_name_their_inputs_and_reductions(client):
    rng = np.random.default_rng(2)
    y_true, y_pred = rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=(5, 3)).astype("float32")
    aux_true, aux_pred = rng.normal(size=(5, 4)).astype("float32"), rng.normal(size=(5, 4)).astype("float32")
    loss = {"terms": [{"name": "mae"}, {"name": "huber", "params": {"delta": 0.5}, "weight": 2.0, "reduction": "sum",
                                         "inputs": ["aux_true", "aux_pred"]}]}
    got = client.evaluate(loss, y_true, y_pred, tensors={"aux_true": aux_true, "aux_pred": aux_pred})
    want = (keras.losses.MeanAbsoluteError()(y_true, y_pred)
            + 2.0 * keras.losses.Huber(delta=0.5, reduction="sum")(aux_true, aux_pred)).numpy()
    np.testing.assert_allclose(got.loss, want, rtol=1e-5)
    assert set(got.terms) == {"mean_absolute_error", "huber"}


def test_composite_errors(client):
    y = np.ones((2, 3), "float32")
    with pytest.raises(lossd.LossdError) as exc:
        client.evaluate({"terms": [{"name": "vae_kl"}]}, y, y)
    assert exc.value.reason == "MISSING_TENSOR" and "z_mean" in exc.value.message
    with pytest.raises(lossd.LossdError) as exc:
        client.evaluate({"terms": [{"name": "mse", "inputs": ["y_true"]}]}, y, y)
    assert exc.value.reason == "BAD_LOSS_SPEC"
    with pytest.raises(lossd.LossdError) as exc:
        client.evaluate({"terms": [{"name": "mse"}, {"name": "mse"}]}, y, y)
    assert exc.value.reason == "BAD_LOSS_SPEC" and "label" in exc.value.message


def test_register_use_restart_delete(tmp_path):
    settings = Settings(host="127.0.0.1", port=0, metrics_port=None, data_dir=tmp_path, grace_seconds=0)
    y_true, y_pred, _ = _inputs(3)
    server = create_server(settings)
    server.start()
    try:
        with lossd.Client(f"127.0.0.1:{server.port}", timeout=30) as client:
            info = client.register_loss("my_huber", HUBER, params={"delta": 1.5}, doc="Huber, by hand.")
            assert info.source == "expression" and info.parameters[0].default == 1.5
            by_name = client.evaluate("my_huber", y_true, y_pred, gradient=True)
            builtin = client.evaluate("huber", y_true, y_pred, params={"delta": 1.5})
            np.testing.assert_allclose(by_name.loss, builtin.loss, rtol=1e-5)
            other = client.evaluate("my_huber", y_true, y_pred, params={"delta": 3.0})
            np.testing.assert_allclose(other.loss, client.evaluate("huber", y_true, y_pred, params={"delta": 3.0}).loss,
                                       rtol=1e-5)
            for name, code, reason in [("huber", grpc.StatusCode.ALREADY_EXISTS, "LOSS_EXISTS"),
                                       ("my_huber", grpc.StatusCode.ALREADY_EXISTS, "LOSS_EXISTS"),
                                       ("Bad-Name", grpc.StatusCode.INVALID_ARGUMENT, "BAD_LOSS_NAME")]:
                with pytest.raises(lossd.LossdError) as exc:
                    client.register_loss(name, HUBER, params={"delta": 1.0})
                assert (exc.value.code, exc.value.reason) == (code, reason)
            with pytest.raises(lossd.LossdError) as exc:
                client.register_loss("sneaky", "y_pred.__class__")
            assert exc.value.reason == "BAD_EXPRESSION" and "column" in exc.value.message
            with pytest.raises(lossd.LossdError) as exc:
                client.delete_loss("mse")
            assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop(0)

    # A new server on the same data directory still has it.
    server = create_server(settings)
    server.start()
    try:
        with lossd.Client(f"127.0.0.1:{server.port}", timeout=30) as client:
            assert "my_huber" in {l.name for l in client.losses()}
            again = client.evaluate("my_huber", y_true, y_pred)
            np.testing.assert_allclose(again.loss, by_name.loss, rtol=1e-6)
            client.delete_loss("my_huber")
            assert "my_huber" not in {l.name for l in client.losses()}
            with pytest.raises(lossd.LossdError) as exc:
                client.evaluate("my_huber", y_true, y_pred)
            assert exc.value.reason == "UNKNOWN_LOSS"
            with pytest.raises(lossd.LossdError) as exc:
                client.delete_loss("my_huber")
            assert exc.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(0)


def test_hostile_expressions_are_refused_quickly_and_the_server_stays_healthy(client, address):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from test_expressions import HOSTILE  # the expression tests' list of 200+ attacks

    y = np.ones((2, 3), "float32")
    slowest = 0.0
    for source, _ in HOSTILE:
        start = time.perf_counter()
        with pytest.raises(lossd.LossdError) as exc:
            client.evaluate({"expression": source, "params": {"delta": 1.0}}, y, y)
        slowest = max(slowest, time.perf_counter() - start)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT, source
        assert exc.value.reason in ("BAD_EXPRESSION", "BAD_PARAMETER", "UNKNOWN_PARAMETER", "BAD_LOSS_SPEC"), (
            source, exc.value)
    assert slowest < 2.0, f"slowest refusal took {slowest:.2f} s"
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    np.testing.assert_allclose(client.evaluate("mse", y, y * 2).loss, 1.0)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    target = tmp_path_factory.mktemp("plugin")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "examples" / "plugin")], check=True)
    return target


def test_plugin_is_loaded_listed_and_evaluated(plugin_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")])}
    script = (
        "import json, numpy as np, lossd\n"
        "from lossd_server.app import create_server\n"
        "from lossd_server.config import Settings\n"
        f"s = create_server(Settings(port=0, metrics_port=None, data_dir={str(tmp_path)!r})); s.start()\n"
        "with lossd.Client(f'127.0.0.1:{s.port}', timeout=30) as c:\n"
        "    info = next(l for l in c.losses() if l.name == 'focal_tversky')\n"
        "    rng = np.random.default_rng(0)\n"
        "    yt = (rng.uniform(size=(4, 8, 8)) > 0.5).astype('float32'); yp = rng.uniform(size=(4, 8, 8)).astype('float32')\n"
        "    r = c.evaluate('focal_tversky', yt, yp, params={'gamma': 1.5}, gradient=True)\n"
        "    from lossd_focal_tversky import FocalTversky\n"
        "    want = float(FocalTversky(gamma=1.5)(yt, yp))\n"
        "    print(json.dumps({'source': info.source, 'params': {p.name: p.default for p in info.parameters},\n"
        "                      'doc': info.doc, 'got': float(r.loss), 'want': want, 'grad': list(r.gradient.shape)}))\n"
        "s.stop(0)\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["source"] == "plugin"
    assert result["params"] == {"alpha": 0.7, "beta": 0.3, "gamma": 0.75, "smooth": 1e-6}
    assert result["doc"].startswith("Focal Tversky loss")
    assert result["grad"] == [4, 8, 8]
    np.testing.assert_allclose(result["got"], result["want"], rtol=1e-5)


def test_a_store_shared_by_two_registries_brings_each_the_others_changes(open_store):
    """What replicas do on one database (ExpressionStore.refresh), on both
    backends: registrations, replacements and deletions made through one
    reach the other, a listener hears of them, and a stored loss named like
    one of this replica's built-in losses does not replace it."""
    from lossd_server.losses import custom

    here, there = custom.full_registry(plugins=False), custom.full_registry(plugins=False)
    mine, theirs = custom.ExpressionStore(open_store(), here), custom.ExpressionStore(open_store(), there)
    mine.load(), theirs.load()
    heard = []
    theirs.on_change(lambda: heard.append(1))
    assert theirs.refresh() == [] and heard == []  # nothing changed: one version read

    mine.register("doubled", "2 * mean(abs(y_true - y_pred), axis=-1)", params={})
    assert theirs.refresh() == ["doubled"] and there.get("doubled").expression.startswith("2 *") and heard
    mine.register("doubled", "4 * mean(abs(y_true - y_pred), axis=-1)", params={}, replace=True)
    assert theirs.refresh() == ["doubled"] and there.get("doubled").expression.startswith("4 *")

    mine.store.put_losses([("huber", {"name": "huber", "expression": "y_pred", "params": {}})])  # a clash
    assert theirs.refresh() == [] and there.get("huber").source != "expression"

    mine.delete("doubled")
    assert theirs.refresh() == ["doubled"] and there.canonical("doubled") is None
