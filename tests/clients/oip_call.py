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


def triton_shm(address: str, calls: list, token: str | None, protocol: str = "grpc") -> dict:
    """tritonclient (gRPC or HTTP) with every input and requested output in
    system shared memory (tritonclient.utils.shared_memory), as its examples
    do. Besides the results: the regions the server listed while registered."""
    import importlib
    import os

    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    grpcclient = importlib.import_module(f"tritonclient.{protocol}")
    as_json = {"as_json": True} if protocol == "grpc" else {}
    headers = {"authorization": f"Bearer {token}"} if token else None
    client = grpcclient.InferenceServerClient(url=address)
    done = {"extensions": client.get_server_metadata(headers=headers, **as_json).get("extensions", []),
            "results": [], "status": []}
    for number, call in enumerate(calls):
        handles, inputs, outputs = [], [], []
        try:
            for name, datatype, shape, array in _numpy_inputs(call):
                region = f"in_{number}_{name}"
                handle = shm.create_shared_memory_region(region, f"/oiptest_{os.getpid()}_{region}", array.nbytes)
                handles.append(handle)
                shm.set_shared_memory_region(handle, [array])
                client.register_system_shared_memory(region, f"/oiptest_{os.getpid()}_{region}", array.nbytes,
                                                     headers=headers)
                tensor = grpcclient.InferInput(name, shape, datatype)
                tensor.set_shared_memory(region, array.nbytes)
                inputs.append(tensor)
            out_handles = {}
            for name in call.get("outputs", []):
                region, size = f"out_{number}_{name}", int(call["output_bytes"])
                handle = shm.create_shared_memory_region(region, f"/oiptest_{os.getpid()}_{region}", size)
                handles.append(handle)
                out_handles[name] = handle
                client.register_system_shared_memory(region, f"/oiptest_{os.getpid()}_{region}", size,
                                                     headers=headers)
                output = grpcclient.InferRequestedOutput(name)
                output.set_shared_memory(region, size)
                outputs.append(output)
            done["status"].append(_region_names(client.get_system_shared_memory_status(headers=headers, **as_json)))
            try:
                result = client.infer(call["model"], inputs, outputs=outputs or None,
                                      parameters=call.get("parameters") or None, headers=headers)
            except InferenceServerException as error:
                done["results"].append({"error": [error.status(), error.message()]})
                continue
            got = {}
            for output in result.get_response(**as_json)["outputs"]:
                shape = [int(d) for d in output.get("shape", [])]
                array = shm.get_contents_as_numpy(out_handles[output["name"]],
                                                  triton_to_np_dtype(output["datatype"]), shape)
                got[output["name"]] = [output["datatype"], shape, np.asarray(array).ravel().tolist()]
            done["results"].append({"outputs": got})
        finally:
            client.unregister_system_shared_memory(headers=headers)  # every region of this caller
            for handle in handles:
                shm.destroy_shared_memory_region(handle)
    done["status"].append(_region_names(client.get_system_shared_memory_status(headers=headers, **as_json)))
    return done


def _region_names(status) -> list:
    """The region names of a status answer: gRPC's {"regions": {name: ...}} or REST's [{"name": ...}]."""
    if isinstance(status, list):
        return sorted(region["name"] for region in status)
    return sorted(status.get("regions", {}))


CLIENTS = {"tritonclient.grpc": triton_grpc, "kserve.grpc": kserve_grpc, "tritonclient.http": triton_http,
           "kserve.rest": kserve_rest, "tritonclient.grpc.shm": triton_shm,
           "tritonclient.http.shm": lambda address, calls, token: triton_shm(address, calls, token, "http")}

if __name__ == "__main__":
    client, address = sys.argv[1], sys.argv[2]
    token = sys.argv[3] if len(sys.argv) > 3 else None
    print(json.dumps(CLIENTS[client](address, json.load(sys.stdin), token)))
