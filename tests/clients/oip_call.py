"""Runs in the published OIP clients' own virtual environment (``make
test`` makes it: tritonclient pins an older protobuf than lossd's), never
in lossd's: it calls a lossd server as a Triton or KServe user would and
prints what it got as JSON, for tests/server/grpc/test_oip_clients.py to compare
with Keras.

Usage: python oip_call.py CLIENT ADDRESS < calls.json
CLIENT is ``tritonclient.grpc``, ``tritonclient.http``, ``kserve.grpc``
(KServe's InferenceGRPCClient) or ``kserve.rest`` (its InferenceRESTClient);
ADDRESS is the gRPC port's, or the REST port's for the HTTP clients. Each call: model, inputs ({name: [datatype,
shape, flat values]}), parameters, outputs. It prints one JSON list: per
call, {"outputs": {name: [datatype, shape, flat values]}} or {"error":
[status, message]}; plus the server's liveness, readiness and a model's
metadata as the client reports them.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def triton_grpc(address: str, calls: list, token: str | None) -> dict:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    headers = {"authorization": f"Bearer {token}"} if token else None
    client = grpcclient.InferenceServerClient(url=address)
    done = {"live": client.is_server_live(headers=headers), "ready": client.is_server_ready(headers=headers),
            "metadata": client.get_model_metadata("huber", headers=headers, as_json=True), "results": []}
    for call in calls:
        inputs = []
        for name, datatype, shape, array in _numpy_inputs(call):
            tensor = grpcclient.InferInput(name, shape, datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [grpcclient.InferRequestedOutput(name) for name in call.get("outputs", [])]
        try:
            result = client.infer(call["model"], inputs, outputs=outputs or None,
                                  parameters=call.get("parameters") or None, headers=headers)
        except InferenceServerException as error:
            done["results"].append({"error": [error.status(), error.message()]})
            continue
        response = result.get_response(as_json=True)
        got = {}
        for output in response["outputs"]:
            array = result.as_numpy(output["name"])
            got[output["name"]] = [output["datatype"], list(array.shape), array.ravel().tolist()]
        done["results"].append({"outputs": got})
    return done


def kserve_grpc(address: str, calls: list, token: str | None) -> dict:
    import asyncio

    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    headers = (("authorization", f"Bearer {token}"),) if token else None

    async def run() -> dict:
        client = InferenceGRPCClient(address, retries=0)
        done = {"live": await client.is_server_live(headers=headers),
                "ready": await client.is_server_ready(headers=headers), "results": []}
        for call in calls:
            inputs = []
            for name, datatype, shape, array in _numpy_inputs(call):
                tensor = InferInput(name, shape, datatype)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            request = InferRequest(call["model"], inputs, parameters=call.get("parameters") or None,
                                   request_outputs=[RequestedOutput(n) for n in call.get("outputs", [])] or None)
            try:
                response = await client.infer(request, headers=headers)
            except grpc.RpcError as error:
                done["results"].append({"error": [str(error.code()), error.details()]})
                continue
            done["results"].append({"outputs": _kserve_outputs(response)})
        await client.close()
        return done

    return asyncio.run(run())


def _kserve_outputs(response) -> dict:
    """A KServe InferResponse's outputs as [datatype, shape, flat values], by name."""
    got = {}
    for output in response.outputs:
        array = output.as_numpy()
        got[output.name] = [output.datatype, list(array.shape), array.ravel().tolist()]
    return got


def _numpy_inputs(call: dict):
    for name, (datatype, shape, values) in call["inputs"].items():
        dtype = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}[datatype]
        yield name, datatype, shape, np.asarray(values, dtype).reshape(shape)


def triton_http(address: str, calls: list, token: str | None) -> dict:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = httpclient.InferenceServerClient(url=address)
    done = {"live": client.is_server_live(headers=headers), "ready": client.is_server_ready(headers=headers),
            "metadata": client.get_model_metadata("huber", headers=headers), "results": []}
    for call in calls:
        inputs = []
        for name, datatype, shape, array in _numpy_inputs(call):
            tensor = httpclient.InferInput(name, shape, datatype)
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in call.get("outputs", [])]
        try:
            result = client.infer(call["model"], inputs, outputs=outputs or None,
                                  parameters=call.get("parameters") or None, headers=headers)
        except InferenceServerException as error:
            done["results"].append({"error": [str(error.status()), error.message()]})
            continue
        got = {}
        for output in result.get_response()["outputs"]:
            array = result.as_numpy(output["name"])
            got[output["name"]] = [output["datatype"], list(array.shape), array.ravel().tolist()]
        done["results"].append({"outputs": got})
    client.close()
    return done


def kserve_rest(address: str, calls: list, token: str | None) -> dict:
    import asyncio

    import httpx
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    headers = {"Authorization": f"Bearer {token}"} if token else None
    base = f"http://{address}"

    async def run() -> dict:
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        done = {"live": await client.is_server_live(base, headers=headers), "results": []}
        for call in calls:
            inputs = []
            for name, datatype, shape, array in _numpy_inputs(call):
                tensor = InferInput(name, shape, datatype)
                tensor.set_data_from_numpy(array, binary_data=True)
                inputs.append(tensor)
            request = InferRequest(call["model"], inputs, parameters=call.get("parameters") or None,
                                   request_outputs=[RequestedOutput(n, {"binary_data": True})
                                                    for n in call.get("outputs", [])] or None)
            try:
                response = await client.infer(base, request, model_name=call["model"], headers=dict(headers or {}))
            except httpx.HTTPStatusError as error:
                done["results"].append({"error": [str(error.response.status_code), error.response.text]})
                continue
            done["results"].append({"outputs": _kserve_outputs(response)})
        done["ready"] = done["live"]
        await client.close()
        return done

    return asyncio.run(run())


CLIENTS = {"tritonclient.grpc": triton_grpc, "kserve.grpc": kserve_grpc, "tritonclient.http": triton_http,
           "kserve.rest": kserve_rest}

if __name__ == "__main__":
    client, address = sys.argv[1], sys.argv[2]
    token = sys.argv[3] if len(sys.argv) > 3 else None
    print(json.dumps(CLIENTS[client](address, json.load(sys.stdin), token)))
