"""Open Inference Protocol requests and answers for the tests, built with
lossd's own stubs of the protocol (tests/server/grpc/test_oip.py,
tests/server/http/test_oip_rest.py, tests/server/observability/test_tracing.py)."""

from __future__ import annotations

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from lossd_server.grpc.oip import grpc_predict_v2_pb2 as pb


def infer_request(model: str, tensors: dict, parameters: dict = None, outputs=(), raw: bool = True):
    request = pb.ModelInferRequest(model_name=model, id="r1")
    for name, value in (parameters or {}).items():
        param = request.parameters[name]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value
    for name, array in tensors.items():
        datatype = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32",
                    "float16": "FP16"}[array.dtype.name]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            request.raw_input_contents.append(array.tobytes())
        else:
            field = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                     "INT32": "int_contents"}[datatype]
            getattr(tensor.contents, field).extend(array.ravel().tolist())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def outputs(response) -> dict:
    """The response's outputs as arrays, from raw_output_contents."""
    dtypes = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}
    return {out.name: np.frombuffer(raw, dtypes[out.datatype]).reshape(tuple(out.shape))
            for out, raw in zip(response.outputs, response.raw_output_contents)}


def error_of(exc: grpc.RpcError):
    status = rpc_status.from_call(exc)
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
    return exc.code(), info.reason
