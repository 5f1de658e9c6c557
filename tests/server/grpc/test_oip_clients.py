"""Published Open Inference Protocol clients, unchanged, against a real lossd.

tritonclient (gRPC and HTTP) and KServe's InferenceGRPCClient and
InferenceRESTClient pin an older protobuf than
lossd's, so they run in a virtual
environment of its own that ``make test`` makes (``OIP_CLIENTS_VENV``,
``.venv-clients``): tests/clients/oip_call.py calls the server from there and
prints what the client returned, and this test compares it with Keras. The
server has a tokens file, so the clients' headers carry the bearer token as
a Triton user's would.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import keras
import numpy as np
import pytest
from tests.keras_reference import value_and_gradient
from tests.servers import PATIENCE

ROOT = pathlib.Path(__file__).resolve().parents[3]
VENV = pathlib.Path(os.environ.get("OIP_CLIENTS_VENV", ROOT / ".venv-clients"))
SCRIPT = ROOT / "tests" / "clients" / "oip_call.py"


def clients_python() -> str:
    python = VENV / "bin" / "python"
    assert python.exists(), (f"the OIP clients' virtual environment is missing at {VENV}: `make test` makes it "
                             "(`make test-clients`)")
    return str(python)


def call(client: str, address: str, calls: list, token: str) -> dict:
    done = subprocess.run([clients_python(), str(SCRIPT), client, address, token], input=json.dumps(calls),
                          capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def served(serve_with_tokens):
    """({protocol: address}, tokens) of a server with tokens and the REST port on."""
    address, tokens, _ = serve_with_tokens({"alice": ("evaluate",), "trainer": ("train",)}, http_port=0)
    http = f"127.0.0.1:{serve_with_tokens.server(address).http_port}"
    return {"grpc": address, "http": http}, tokens


def array(output) -> np.ndarray:
    datatype, shape, values = output
    return np.asarray(values, {"FP32": np.float32, "FP64": np.float64}[datatype]).reshape(shape)


@pytest.mark.parametrize("client", ["tritonclient.grpc", "kserve.grpc", "tritonclient.http", "kserve.rest"])
def test_published_clients_get_keras_answers(served, client):
    addresses, tokens = served
    address = addresses["http" if client.endswith((".http", ".rest")) else "grpc"]
    rng = np.random.default_rng(0)
    y_true = rng.normal(size=(6, 3)).astype(np.float32)
    y_pred = rng.normal(size=(6, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 5)
    probs = rng.uniform(0.05, 1.0, (5, 4))
    calls = [
        {"model": "huber", "inputs": {"y_true": ["FP32", [6, 3], y_true.ravel().tolist()],
                                      "y_pred": ["FP32", [6, 3], y_pred.ravel().tolist()]},
         # An integer delta: KServe's client sends no float parameters (an int is a float to the planner).
         "parameters": {"delta": 2, "reduction": "none", "gradient": True}},
        {"model": "sparse_categorical_crossentropy",
         "inputs": {"y_true": ["INT64", [5], labels.tolist()], "y_pred": ["FP64", [5, 4], probs.ravel().tolist()]},
         "outputs": ["loss"]},
        {"model": "huber", "inputs": {"y_true": ["FP32", [6, 3], y_true.ravel().tolist()],
                                      "y_pred": ["FP32", [6, 3], y_pred.ravel().tolist()]},
         "parameters": {"delta": -1}},
        {"model": "hubber", "inputs": {"y_true": ["FP32", [6, 3], y_true.ravel().tolist()],
                                       "y_pred": ["FP32", [6, 3], y_pred.ravel().tolist()]}},
    ]
    got = call(client, address, calls, tokens["alice"])
    assert got["live"] is True and got["ready"] is True
    if "metadata" in got:
        assert [t["name"] for t in got["metadata"]["inputs"]] == ["y_true", "y_pred", "sample_weight"]

    huber = got["results"][0]["outputs"]
    want = keras.losses.Huber(delta=2.0, reduction="none")(y_true, y_pred)
    np.testing.assert_allclose(array(huber["loss"]), np.asarray(want), rtol=1e-6)
    assert huber["gradient"][1] == [6, 3]

    scce = got["results"][1]["outputs"]
    assert list(scce) == ["loss"] and scce["loss"][0] == "FP64"
    want = keras.losses.SparseCategoricalCrossentropy(dtype="float64")(labels, probs)
    np.testing.assert_allclose(array(scce["loss"]), np.asarray(want), rtol=1e-12)

    status, message = got["results"][2]["error"]
    assert status in ("StatusCode.INVALID_ARGUMENT", "400") and "delta" in message
    status, message = got["results"][3]["error"]
    assert status in ("StatusCode.NOT_FOUND", "404") and "huber" in message


@pytest.mark.parametrize("client", ["tritonclient.grpc.shm", "tritonclient.http.shm"])
def test_tritonclient_shared_memory_helpers_work_unchanged(served, client):
    """tritonclient.utils.shared_memory's regions, registered with
    register_system_shared_memory and named by set_shared_memory on inputs
    and outputs, as Triton's own examples do: Keras's answers come back in
    the client's regions."""
    addresses, tokens = served
    rng = np.random.default_rng(1)
    y_true, y_pred = (rng.normal(size=(6, 3)).astype(np.float32) for _ in range(2))
    calls = [{"model": "huber", "inputs": {"y_true": ["FP32", [6, 3], y_true.ravel().tolist()],
                                           "y_pred": ["FP32", [6, 3], y_pred.ravel().tolist()]},
              "parameters": {"delta": 2, "reduction": "none", "gradient": True},
              "outputs": ["loss", "gradient"], "output_bytes": 256}]
    got = call(client, addresses["http" if ".http" in client else "grpc"], calls, tokens["alice"])
    assert "system_shared_memory" in got["extensions"]
    registered, after = got["status"]
    assert registered == ["in_0_y_pred", "in_0_y_true", "out_0_gradient", "out_0_loss"]
    assert after == []  # unregister_system_shared_memory() took every one back
    outputs = got["results"][0]["outputs"]
    value, gradient = value_and_gradient(keras.losses.Huber(delta=2.0, reduction="none"), y_true, y_pred)
    np.testing.assert_allclose(array(outputs["loss"]), value, rtol=1e-6)
    np.testing.assert_allclose(array(outputs["gradient"]), gradient, rtol=1e-5, atol=1e-7)


def test_tritonclient_needs_the_evaluate_scope(served):
    addresses, tokens = served
    done = subprocess.run([clients_python(), str(SCRIPT), "tritonclient.grpc", addresses["grpc"], tokens["trainer"]],
                          input="[]", capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode != 0, done.stdout
    assert "needs the scope `evaluate`" in done.stderr, done.stderr[-2000:]


def test_the_docs_tritonclient_example_runs_as_written(served, serve_with_tokens):
    """docs/oip.md's tritonclient block, run in the clients' environment
    against a server without tokens (as the block is written), its printed
    loss compared with Keras."""
    text = (ROOT / "docs" / "oip.md").read_text()
    block = text.split("## tritonclient", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    address, _, _ = serve_with_tokens({}, tokens_file=None)
    source = block.replace("localhost:50051", address)
    assert source != block, "the example no longer names localhost:50051"
    done = subprocess.run([clients_python(), "-c", source], capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 0, done.stderr[-3000:]
    y_true = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    y_pred = np.array([[0.1, 0.8], [0.7, 0.4]], np.float32)
    want = float(keras.losses.Huber(delta=0.5)(y_true, y_pred))
    printed = done.stdout.split("loss", 1)[1].split("gradient", 1)[0].strip()
    assert abs(float(printed) - want) <= 1e-6 * abs(want), (printed, want)
