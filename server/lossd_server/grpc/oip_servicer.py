"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``
on lossd's port, beside ``lossd.v1``.

It only decodes and encodes: ``evaluation.inference_protocol`` says what a
model, a parameter and an output are, and ``EvaluationService`` evaluates
(plans, admission, batching, metering), exactly as for ``lossd.v1``
Evaluate, so the same request gets the same answer, bit for bit. Tokens,
scopes and rates are the interceptors' (``grpc/auth.py``), as for every
method; ModelInfer needs the ``evaluate`` scope, and so do the system
shared-memory calls (Triton's extension: a caller registers, lists and
unregisters regions of its own, ``lossd_server.shared_memory``).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from lossd import wire
from lossd_server.evaluation import inference_protocol as oip
from lossd_server.evaluation.service import EvaluationService
from lossd_server.grpc import parsing
from lossd_server.grpc.auth import Callers
from lossd_server.grpc.oip import grpc_predict_v2_pb2 as pb
from lossd_server.grpc.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from lossd_server.errors import FailedPrecondition
from lossd_server.grpc.status import handle_errors
from lossd_server.observability import tracing
from lossd_server.shared_memory import SharedMemoryRegions

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

# The typed-contents field of each datatype that has one (FP16 and BF16
# travel as raw contents only, as the protocol says).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents"}
_EXTENSIONS = ("parameters",)
_EMPTY = np.empty(0, np.uint8)  # the raw entry of an output written to shared memory


def parameter_value(parameter: pb.InferParameter):
    """An InferParameter's Python value (None when none is set)."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _parameters(parameters) -> dict:
    return {name: parameter_value(value) for name, value in parameters.items()}


def _inputs(request: pb.ModelInferRequest, raw) -> list[oip.Input]:
    """The request's inputs; ``raw``: its raw_input_contents (views of the
    received bytes where ``parsing.lifted_unary`` lifted them)."""
    regions = [oip.region_of(_parameters(t.parameters), f"inputs[{t.name[:64]}]") if t.parameters else None
               for t in request.inputs]
    in_memory = sum(region is None for region in regions)  # a tensor in shared memory has no raw entry
    if raw and len(raw) != in_memory:
        raise wire.WireError(f"raw_input_contents holds one entry per input not in shared memory. Expected "
                             f"{in_memory}. Received: {len(raw)}.")
    inputs, position = [], 0
    for tensor, region in zip(request.inputs, regions):
        field = _CONTENTS.get(tensor.datatype)
        values = getattr(tensor.contents, field) if field is not None else None
        if region is not None:
            inputs.append(oip.Input(tensor.name, tensor.datatype, tensor.shape, values=values, region=region))
        elif raw:
            if tensor.HasField("contents") and values:
                raise wire.WireError(f"inputs[{tensor.name[:64]}]: both contents and raw_input_contents are set. "
                                     "Expected one of them.")
            inputs.append(oip.Input(tensor.name, tensor.datatype, tensor.shape, raw=raw[position]))
            position += 1
        else:
            inputs.append(oip.Input(tensor.name, tensor.datatype, tensor.shape, values=values))
    return inputs


def add_oip_service(servicer: "OipServicer", server) -> None:
    """Adds GRPCInferenceService to ``server``, each request parsed inside
    its handler (``parsing.tolerant``): bytes that do not parse are
    INVALID_ARGUMENT, never INTERNAL."""
    service, handlers = parsing.handlers_of(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, SERVICE)
    # ModelInfer's raw contents are views of the received bytes, and its raw
    # outputs are written once, into the answer's bytes (lossd.v1's codec).
    handlers["ModelInfer"] = parsing.lifted_unary(servicer.ModelInfer, pb.ModelInferRequest, "raw_input_contents")
    parsing.register(server, service, handlers)


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Implements ``inference.GRPCInferenceService`` over an ``EvaluationService``.

    Args:
        service: Evaluates (plans, admission, batching, metering).
        ready: Whether the server serves (health SERVING).
        callers: Who calls (``Callers.of(context)``).
        version: The server's version, for ServerMetadata.
        shared_memory: The server's shared-memory regions, where it has
            them (``LOSSD_SHM``): the system shared-memory extension.
    """

    def __init__(self, service: EvaluationService, *, ready: Callable[[], bool], callers: Callers = Callers(None),
                 version: str = "", shared_memory: Optional[SharedMemoryRegions] = None):
        self.service = service
        self.registry = service.registry
        self.ready = ready
        self.callers = callers
        self.version = version
        self.shared_memory = shared_memory
        self.extensions = (*_EXTENSIONS, *([oip.SHM_EXTENSION] if shared_memory is not None else []))

    @handle_errors
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @handle_errors
    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready())

    @handle_errors
    def ModelReady(self, request, context):
        # An unknown name is not ready (as Triton answers), rather than an error.
        known = request.name == oip.SPEC_MODEL or self.registry.canonical(request.name) is not None
        return pb.ModelReadyResponse(ready=known and request.version in ("", *oip.VERSIONS) and self.ready())

    @handle_errors
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="lossd", version=self.version, extensions=self.extensions)

    @handle_errors
    def ModelMetadata(self, request, context):
        metadata = oip.model_metadata(self.registry, request.name, request.version)
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata.name, versions=metadata.versions, platform=metadata.platform,
            inputs=[tensors(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs],
            outputs=[tensors(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs])

    @handle_errors
    def ModelInfer(self, request, context):
        # add_oip_service registers ModelInfer with the raw contents lifted
        # out of the request (parsing.Lifted), and a serializer that passes
        # the answer's bytes through.
        lifted = request if isinstance(request, parsing.Lifted) else parsing.Lifted(request)
        request = lifted.message
        raw = lifted.entries if lifted.entries is not None else request.raw_input_contents
        parameters = _parameters(request.parameters)
        caller = self.callers.of(context)
        regions = self.shared_memory.access(caller.name, named=True) if self.shared_memory is not None else None
        output_regions = {output.name: oip.region_of(_parameters(output.parameters), f"outputs[{output.name[:64]}]")
                          for output in request.outputs if output.parameters}
        inference = oip.inference(self.registry, request.model_name, request.model_version, parameters,
                                  _inputs(request, raw), [output.name for output in request.outputs],
                                  max_elements=self.service.max_elements, regions=regions,
                                  output_regions={k: v for k, v in output_regions.items() if v is not None})
        cancellation = self.service.new_cancellation()
        if not context.add_callback(cancellation.cancel):  # the call is over already
            cancellation.cancel()
        result = self.service.evaluate(inference.request, caller, wait_seconds=context.time_remaining(),
                                       cancellation=cancellation)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                         id=request.id)
        with tracing.span("lossd.encode"):
            response.parameters["non_finite"].bool_param = result.non_finite
            arrays = []
            for name, array in oip.outputs_of(result, inference.outputs):
                array = np.asarray(array)
                output = response.outputs.add(name=name, datatype=wire.oip_datatype(wire.dtype_enum(array.dtype)),
                                              shape=array.shape)
                ref = inference.output_regions.get(name)
                if ref is None:
                    arrays.append(array)
                    continue
                # Written to the caller's region; an empty entry keeps the
                # raw contents in step with the outputs, as clients index them.
                written = oip.write_output(regions, name, array, ref)
                output.parameters[oip.SHM_REGION].string_param = ref.region
                output.parameters[oip.SHM_BYTE_SIZE].int64_param = written
                output.parameters[oip.SHM_OFFSET].int64_param = ref.offset
                arrays.append(_EMPTY)
            if sum(array.nbytes for array in arrays) >= wire.LIFT_MIN_BYTES:  # each copied once, into the answer
                return wire.serialize_with_tensors(response, raw={"raw_output_contents": arrays})
            for array in arrays:  # small: protobuf's own serializer is faster
                response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
        return response

    # -- Triton's system shared-memory extension --------------------------------

    def _regions(self) -> SharedMemoryRegions:
        if self.shared_memory is None:
            raise FailedPrecondition("This server has no shared memory. Expected a server started with LOSSD_SHM=1 "
                                     "on the client's host.", reason="SHM_DISABLED")
        return self.shared_memory

    @handle_errors
    def SystemSharedMemoryStatus(self, request, context):
        regions = self._regions().named(self.callers.of(context).name, request.name)
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(regions={
            r.label: status(name=r.label, key=r.name, offset=r.base, byte_size=r.size) for r in regions})

    @handle_errors
    def SystemSharedMemoryRegister(self, request, context):
        self._regions().register_named(self.callers.of(context).name, request.name, request.key, request.offset,
                                       request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @handle_errors
    def SystemSharedMemoryUnregister(self, request, context):
        self._regions().unregister_named(self.callers.of(context).name, request.name)
        return pb.SystemSharedMemoryUnregisterResponse()
