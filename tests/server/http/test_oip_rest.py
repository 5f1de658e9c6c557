"""The Open Inference Protocol's REST form (``LOSSD_HTTP_PORT``), through a
real port: JSON tensors and the binary tensor data extension, compared with
Keras and with the gRPC form (the same answer, bit for bit), tokens and
scopes, errors with HTTP statuses and reasons, bounds on the body.
tests/server/grpc/test_oip_clients.py drives it with tritonclient.http too."""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.error
import urllib.request

import grpc
import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from tests.oip_requests import infer_request, outputs

from lossd_server.grpc.oip import grpc_predict_v2_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def rest(serve_with_tokens):
    """(base URL, gRPC address, tokens) of a server with tokens and the REST port on."""
    address, tokens, _ = serve_with_tokens({"alice": ("evaluate",), "trainer": ("train",)}, http_port=0,
                                           max_message_bytes=1 << 20, metrics_port=0)
    srv = serve_with_tokens.server(address)
    assert srv.http_port
    return f"http://127.0.0.1:{srv.http_port}", address, tokens


def call(url: str, token=None, body=None, headers=None, method=None):
    """(status, headers, body bytes) of one HTTP request."""
    request = urllib.request.Request(url, data=body, method=method, headers={
        **({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_health_and_metadata(rest):
    base, _, tokens = rest
    token = tokens["alice"]
    assert call(f"{base}/v2/health/live", token)[0] == 200
    status, _, body = call(f"{base}/v2/health/ready", token)
    assert status == 200 and json.loads(body) == {"ready": True}
    meta = json.loads(call(f"{base}/v2", token)[2])
    assert meta["name"] == "lossd" and "binary_tensor_data" in meta["extensions"]
    model = json.loads(call(f"{base}/v2/models/huber", token)[2])
    assert [t["name"] for t in model["inputs"]] == ["y_true", "y_pred", "sample_weight"]
    assert call(f"{base}/v2/models/huber/versions/1/ready", token)[0] == 200
    status, _, body = call(f"{base}/v2/models/hubber", token)
    assert status == 404 and json.loads(body)["reason"] == "UNKNOWN_MODEL" and "huber" in json.loads(body)["error"]


def test_tokens_and_scopes(rest):
    base, _, tokens = rest
    status, _, body = call(f"{base}/v2/models/huber")
    assert status == 401 and json.loads(body)["reason"] == "UNAUTHENTICATED"
    status, _, body = call(f"{base}/v2/models/huber", "lsd_nope_nope")
    assert status == 401 and json.loads(body)["reason"] == "BAD_TOKEN"
    status, _, body = call(f"{base}/v2/models/huber", tokens["trainer"])
    assert status == 403 and json.loads(body)["reason"] == "MISSING_SCOPE"


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(1, 12), cols=st.integers(1, 5), delta=st.floats(0.1, 5.0),
       reduction=st.sampled_from(["none", "sum", "sum_over_batch_size", "mean"]),
       dtype=st.sampled_from([np.float32, np.float64]), binary=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_rest_inference_equals_keras_and_grpc(rest, rows, cols, delta, reduction, dtype, binary, seed):
    """A REST inference, JSON or binary both ways, answers Keras's Huber and
    exactly what the gRPC form answers for the same tensors and parameters."""
    base, address, tokens = rest
    rng = np.random.default_rng(seed)
    y_true = rng.normal(size=(rows, cols)).astype(dtype)
    y_pred = rng.normal(size=(rows, cols)).astype(dtype)
    datatype = {np.float32: "FP32", np.float64: "FP64"}[dtype]
    parameters = {"delta": delta, "reduction": reduction, "gradient": True}
    inputs = [{"name": name, "datatype": datatype, "shape": [rows, cols]} for name in ("y_true", "y_pred")]
    headers, tail = {}, b""
    if binary:
        for tensor, array in zip(inputs, (y_true, y_pred)):
            tensor["parameters"] = {"binary_data_size": array.nbytes}
        parameters["binary_data_output"] = True
        tail = y_true.tobytes() + y_pred.tobytes()
    else:
        inputs[0]["data"], inputs[1]["data"] = y_true.tolist(), y_pred.ravel().tolist()  # nested and flat
    head = json.dumps({"id": "q1", "parameters": parameters, "inputs": inputs}).encode()
    if binary:
        headers = {"Inference-Header-Content-Length": str(len(head))}
    status, answer_headers, body = call(f"{base}/v2/models/huber/infer", tokens["alice"], head + tail, headers)
    assert status == 200, body
    split = int(answer_headers.get("Inference-Header-Content-Length", len(body)))
    answer = json.loads(body[:split])
    assert answer["id"] == "q1" and answer["model_name"] == "huber"
    got, offset = {}, split
    for output in answer["outputs"]:
        if binary:
            size = output["parameters"]["binary_data_size"]
            got[output["name"]] = np.frombuffer(body[offset:offset + size], dtype).reshape(output["shape"])
            offset += size
        else:
            got[output["name"]] = np.asarray(output["data"], dtype).reshape(output["shape"])
    want = keras.losses.Huber(delta=delta, reduction=reduction, dtype=np.dtype(dtype).name)(y_true, y_pred)
    np.testing.assert_allclose(got["loss"], np.asarray(want), rtol=1e-6, atol=1e-7)
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request("huber", {"y_true": y_true, "y_pred": y_pred},
                          {"delta": delta, "reduction": reduction, "gradient": True}),
            metadata=[("authorization", f"Bearer {tokens['alice']}")])
    by_grpc = outputs(response)
    for name in ("loss", "gradient"):
        assert got[name].tobytes() == by_grpc[name].tobytes(), name


def test_binary_extension_in_and_out(rest):
    base, _, tokens = rest
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 6).astype(np.int64)
    probs = rng.uniform(0.1, 1.0, (6, 5)).astype(np.float64)
    head = json.dumps({"inputs": [
        {"name": "y_true", "datatype": "INT64", "shape": [6], "parameters": {"binary_data_size": labels.nbytes}},
        {"name": "y_pred", "datatype": "FP64", "shape": [6, 5], "parameters": {"binary_data_size": probs.nbytes}}],
        "outputs": [{"name": "loss", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = call(f"{base}/v2/models/sparse_categorical_crossentropy/infer", tokens["alice"],
                                 head + labels.tobytes() + probs.tobytes(),
                                 {"Inference-Header-Content-Length": str(len(head)),
                                  "Content-Type": "application/octet-stream"})
    assert status == 200, body
    split = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:split])
    (output,) = answer["outputs"]
    assert output["name"] == "loss" and output["parameters"]["binary_data_size"] == 8
    value = struct.unpack("<d", body[split:split + 8])[0]
    want = float(keras.losses.SparseCategoricalCrossentropy(dtype="float64")(labels, probs))
    assert abs(value - want) <= 1e-12 * abs(want)


@pytest.mark.parametrize("body, headers, status, reason", [
    (b"{not json", {}, 400, "BAD_REQUEST"),
    (b'{"inputs": 3}', {}, 400, "BAD_REQUEST"),
    (json.dumps({"inputs": [{"name": "y_true", "datatype": "FP32", "shape": [2], "data": [1, 2]},
                            {"name": "y_pred", "datatype": "FP32", "shape": [2], "data": [1]}]}).encode(),
     {}, 400, "BAD_TENSOR"),
    (json.dumps({"parameters": {"delta": -2.0},
                 "inputs": [{"name": "y_true", "datatype": "FP32", "shape": [2], "data": [1, 2]},
                            {"name": "y_pred", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}).encode(),
     {}, 400, "PARAMETER_OUT_OF_RANGE"),
    (json.dumps({"inputs": [{"name": "y_true", "datatype": "FP32", "shape": [2],
                             "parameters": {"binary_data_size": 99}}]}).encode(),
     {"Inference-Header-Content-Length": "0"}, 400, "BAD_TENSOR"),
    (b"x" * 10, {"Inference-Header-Content-Length": "11"}, 400, "BAD_REQUEST"),
])
def test_bad_requests(rest, body, headers, status, reason):
    base, _, tokens = rest
    if headers.get("Inference-Header-Content-Length") == "0":
        headers = {"Inference-Header-Content-Length": str(len(body))}
    got_status, _, got = call(f"{base}/v2/models/huber/infer", tokens["alice"], body, headers)
    assert (got_status, json.loads(got)["reason"]) == (status, reason), got


def test_body_bound_and_methods(rest):
    base, _, tokens = rest
    # A body past max_message_bytes (1 MiB here) is refused from its header: nothing of it is read.
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /v2/models/huber/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens['alice']}"
                     f"\r\nContent-Length: {2 << 20}\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"413" and json.loads(body)["reason"] == "REQUEST_TOO_LARGE"
    status, _, body = call(f"{base}/v2/models/huber/infer", tokens["alice"])
    assert status == 405
    status, _, _ = call(f"{base}/v1/whatever", tokens["alice"])
    assert status == 404


def _http_requests(metrics_port: int) -> dict:
    """``{(method, route, status): requests}`` from the real ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=60) as response:
        text = response.read().decode()
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name == "http_server_request_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    labels = sample.labels
                    counts[labels["http_request_method"], labels["http_route"],
                           labels["http_response_status_code"]] = sample.value
    return counts


def test_requests_are_counted_by_route_template_and_logged(rest, serve_with_tokens, configure_logs):
    """A REST request moves the HTTP metrics under its route template (never
    its raw path) and writes one access log line with its request id, as a
    gRPC call does; a refused one writes a WARNING line with the reason's message."""
    base, address, tokens = rest
    srv = serve_with_tokens.server(address)
    stream = configure_logs("json")
    before = _http_requests(srv.metrics_port)
    y = [0.5, 1.5, 2.5]
    body = json.dumps({"inputs": [{"name": "y_true", "datatype": "FP32", "shape": [3], "data": y},
                                  {"name": "y_pred", "datatype": "FP32", "shape": [3], "data": y[::-1]}]}).encode()
    status, _, _ = call(f"{base}/v2/models/mse/infer", tokens["alice"], body, {"X-Request-Id": "rest-1"})
    assert status == 200
    assert call(f"{base}/v2/models/hubber/versions/1", tokens["alice"], headers={"X-Request-Id": "rest-2"})[0] == 404
    wanted = {("POST", "/v2/models/{name}/infer", "200"): 1, ("GET", "/v2/models/{name}/versions/{version}", "404"): 1}
    deadline = time.monotonic() + 30  # /metrics serves a rendering up to a second old
    while True:
        after = _http_requests(srv.metrics_port)
        moved = {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}
        if moved == wanted or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert moved == wanted, moved
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = {r["request_id"]: r for r in records if r["logger"] == "lossd_server.access"}
    assert access["rest-1"]["level"] == "DEBUG" and access["rest-1"]["message"].startswith(
        "POST /v2/models/mse/infer 200 ")
    assert access["rest-2"]["level"] == "WARNING" and access["rest-2"]["message"].startswith(
        "GET /v2/models/hubber/versions/1 404 ") and "huber" in access["rest-2"]["message"]
    assert [r["request_id"] for r in records if r["logger"] == "lossd_server.access"].count("rest-1") == 1


def test_route_templates_are_bounded():
    from lossd_server.http.oip_rest import OTHER_ROUTE, route_of

    assert route_of("/v2/models/mse/infer") == "/v2/models/{name}/infer"
    assert route_of("/v2/models/x/versions/7/ready") == "/v2/models/{name}/versions/{version}/ready"
    assert route_of("/v2/health/ready") == "/v2/health/ready"
    assert route_of("/v2/models/a/b/c") == route_of("/anything") == OTHER_ROUTE


def test_system_shared_memory_over_rest(rest):
    """Triton's extension over REST: a registration, an inference whose
    inputs and loss live in regions (the same bits as inline), the caller's
    status, refusals with their reasons, and the end of the registrations."""
    from tests.shm_regions import region

    base, _, tokens = rest
    token = tokens["alice"]
    y_true = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    y_pred = y_true[::-1].copy()
    inline = {"inputs": [{"name": n, "datatype": "FP32", "shape": [4, 3], "data": a.ravel().tolist()}
                         for n, a in (("y_true", y_true), ("y_pred", y_pred))], "parameters": {"reduction": "none"}}
    status, _, body = call(f"{base}/v2/models/mse/infer", token, json.dumps(inline).encode())
    assert status == 200, body
    want = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32)
    with region(96) as inputs, region(64) as results:
        inputs.buf[:48], inputs.buf[48:96] = y_true.tobytes(), y_pred.tobytes()
        for name, memory in (("in", inputs), ("out", results)):
            status, _, body = call(f"{base}/v2/systemsharedmemory/region/{name}/register", token, json.dumps(
                {"key": f"/{memory.name}", "offset": 0, "byte_size": memory.size}).encode())
            assert status == 200, body
        status, _, body = call(f"{base}/v2/systemsharedmemory/status", token)
        assert sorted(r["name"] for r in json.loads(body)) == ["in", "out"]
        shm = {"inputs": [{"name": n, "datatype": "FP32", "shape": [4, 3], "parameters": {
            "shared_memory_region": "in", "shared_memory_offset": at, "shared_memory_byte_size": 48}}
            for n, at in (("y_true", 0), ("y_pred", 48))], "parameters": {"reduction": "none"},
            "outputs": [{"name": "loss", "parameters": {"shared_memory_region": "out",
                                                        "shared_memory_byte_size": 64}}]}
        status, _, body = call(f"{base}/v2/models/mse/infer", token, json.dumps(shm).encode())
        assert status == 200, body
        loss = json.loads(body)["outputs"][0]
        assert "data" not in loss and loss["parameters"]["shared_memory_byte_size"] == 16
        assert bytes(results.buf[:16]) == want.tobytes()
        # A range past the registration, and an object that is not there.
        shm["inputs"][1]["parameters"]["shared_memory_offset"] = 64
        status, _, body = call(f"{base}/v2/models/mse/infer", token, json.dumps(shm).encode())
        assert status == 400 and json.loads(body)["reason"] == "SHM_OUT_OF_RANGE", body
        status, _, body = call(f"{base}/v2/systemsharedmemory/region/x/register", token,
                               json.dumps({"key": "/oip_rest_not_there", "offset": 0, "byte_size": 8}).encode())
        assert status == 404 and json.loads(body)["reason"] == "SHM_REGION_NOT_FOUND", body
        status, _, body = call(f"{base}/v2/systemsharedmemory/region/x/register", token, b'{"key": 7}')
        assert status == 400 and json.loads(body)["reason"] == "SHM_BAD_PARAMETERS", body
        status, _, _ = call(f"{base}/v2/systemsharedmemory/region/in/unregister", token, b"")
        assert status == 200
        status, _, body = call(f"{base}/v2/systemsharedmemory/region/in/status", token)
        assert status == 404 and json.loads(body)["reason"] == "SHM_REGION_NOT_FOUND", body
        status, _, _ = call(f"{base}/v2/systemsharedmemory/unregister", token, b"")
        status, _, body = call(f"{base}/v2/systemsharedmemory/status", token)
        assert status == 200 and json.loads(body) == []
