"""Triton's system shared-memory extension on lossd's Open Inference Protocol
service: registrations bound to their caller, inputs read from and outputs
written to regions through lossd_server.shared_memory, and every answer the
same, bit for bit, as the same request with its tensors in the message.

Real servers (with and without ``LOSSD_SHM``, with a tokens file), lossd's
own stubs of the protocol, regions made as a client makes them. The
published tritonclient's own shared-memory helpers are driven in
tests/server/grpc/test_oip_clients.py.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossd_server.grpc.oip import grpc_predict_v2_pb2 as pb
from lossd_server.grpc.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.oip_requests import error_of, infer_request, outputs
from tests.shm_regions import SHM, region

if not SHM.is_dir():  # pragma: no cover - Linux is where the server reads regions
    pytest.skip("POSIX shared memory under /dev/shm is Linux only", allow_module_level=True)


@pytest.fixture(scope="module")
def shm_server(serve_with_tokens):
    """(address, {name: token}) of a server with shared memory and two evaluate-scope callers."""
    address, tokens, _ = serve_with_tokens({"alice": ("evaluate",), "bob": ("evaluate",)}, shm=True)
    return address, tokens


@pytest.fixture(scope="module")
def stub(shm_server):
    address, _ = shm_server
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def as_(tokens, name):
    return [("authorization", f"Bearer {tokens[name]}")]


def with_regions(request: pb.ModelInferRequest, inputs: dict, outputs_to: dict = {}) -> pb.ModelInferRequest:
    """``request`` with the inputs named in ``inputs`` ({name: (region, offset, size)}) moved to regions,
    and the outputs in ``outputs_to`` written to regions."""
    raw = list(request.raw_input_contents)
    del request.raw_input_contents[:]
    for tensor, content in zip(request.inputs, raw):
        if tensor.name in inputs:
            name, offset, size = inputs[tensor.name]
            tensor.parameters["shared_memory_region"].string_param = name
            tensor.parameters["shared_memory_offset"].int64_param = offset
            tensor.parameters["shared_memory_byte_size"].int64_param = size
        else:
            request.raw_input_contents.append(content)
    for name, (region_name, offset, size) in outputs_to.items():
        output = request.outputs.add(name=name)
        output.parameters["shared_memory_region"].string_param = region_name
        output.parameters["shared_memory_offset"].int64_param = offset
        output.parameters["shared_memory_byte_size"].int64_param = size
    return request


def register(stub, tokens, caller, name, memory, offset=0, size=None):
    stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
        name=name, key=f"/{memory.name}", offset=offset, byte_size=memory.size - offset if size is None else size),
        metadata=as_(tokens, caller))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(1, 40), columns=st.integers(1, 8), delta=st.floats(0.1, 4.0),
       dtype=st.sampled_from([np.float32, np.float64]), offset=st.integers(0, 3),
       reduction=st.sampled_from(["none", "sum_over_batch_size"]), seed=st.integers(0, 2**16))
def test_tensors_in_regions_answer_bit_for_bit_as_in_the_message(stub, shm_server, rows, columns, delta, dtype,
                                                                   offset, reduction, seed):
    """Inputs at any offset of one region, the loss and gradient written to
    another: the same bits as the request with its tensors inline (itself
    proven equal to lossd.v1 Evaluate and to Keras in test_oip.py)."""
    _, tokens = shm_server
    rng = np.random.default_rng(seed)
    y_true, y_pred = (rng.normal(size=(rows, columns)).astype(dtype) for _ in range(2))
    params = {"delta": float(delta), "reduction": reduction, "gradient": True}
    inline = outputs(stub.ModelInfer(infer_request("huber", {"y_true": y_true, "y_pred": y_pred}, params),
                                     metadata=as_(tokens, "alice")))
    start = offset * 8  # any byte offset; the server aligns its own copy
    with region(start + 2 * y_true.nbytes) as inputs, region(64 + 2 * y_true.nbytes) as results:
        inputs.buf[start:start + y_true.nbytes] = y_true.tobytes()
        inputs.buf[start + y_true.nbytes:start + 2 * y_true.nbytes] = y_pred.tobytes()
        register(stub, tokens, "alice", "inputs", inputs)
        register(stub, tokens, "alice", "results", results, offset=64, size=2 * y_true.nbytes)
        try:
            request = with_regions(infer_request("huber", {"y_true": y_true, "y_pred": y_pred}, params),
                                   {"y_true": ("inputs", start, y_true.nbytes),
                                    "y_pred": ("inputs", start + y_true.nbytes, y_pred.nbytes)},
                                   {"loss": ("results", 0, y_true.nbytes),  # room for any reduction
                                    "gradient": ("results", y_true.nbytes, y_true.nbytes)})
            response = stub.ModelInfer(request, metadata=as_(tokens, "alice"))
            got = {}
            for out in response.outputs:
                size = out.parameters["shared_memory_byte_size"].int64_param
                at = 64 + out.parameters["shared_memory_offset"].int64_param  # the registration starts at 64
                assert out.parameters["shared_memory_region"].string_param == "results"
                got[out.name] = np.frombuffer(bytes(results.buf[at:at + size]), dtype).reshape(tuple(out.shape))
            assert list(response.raw_output_contents) == [b"", b""]  # in step with the outputs, empty
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=as_(tokens, "alice"))
    assert got["loss"].tobytes() == inline["loss"].tobytes()
    assert got["gradient"].tobytes() == inline["gradient"].tobytes()


def test_status_lists_a_callers_own_registrations_until_unregistered(stub, shm_server):
    _, tokens = shm_server
    with region(256) as a, region(128) as b:
        register(stub, tokens, "alice", "a", a, offset=16, size=200)
        register(stub, tokens, "alice", "b", b)
        status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=as_(tokens, "alice"))
        assert {n: (r.key, r.offset, r.byte_size) for n, r in status.regions.items()} == {
            "a": (a.name, 16, 200), "b": (b.name, 0, 128)}
        # Bob sees none of them, and cannot name or unregister them.
        none = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=as_(tokens, "bob"))
        assert dict(none.regions) == {}
        with pytest.raises(grpc.RpcError) as missing:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="a"),
                                              metadata=as_(tokens, "bob"))
        assert error_of(missing.value) == (grpc.StatusCode.NOT_FOUND, "SHM_REGION_NOT_FOUND")
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="a"),
                                          metadata=as_(tokens, "alice"))
        one = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=as_(tokens, "alice"))
        assert list(one.regions) == ["b"]
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=as_(tokens, "alice"))
        empty = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=as_(tokens, "alice"))
        assert dict(empty.regions) == {}
        # The objects are the client's: unregistering never unlinks them.
        assert (SHM / a.name).exists() and (SHM / b.name).exists()


def test_another_caller_can_neither_register_nor_read_a_callers_region(stub, shm_server):
    _, tokens = shm_server
    y = np.ones((2, 3), np.float32)
    with region(y.nbytes) as memory:
        memory.buf[:] = y.tobytes()
        register(stub, tokens, "alice", "mine", memory)
        try:
            with pytest.raises(grpc.RpcError) as taken:
                register(stub, tokens, "bob", "mine", memory)
            assert error_of(taken.value) == (grpc.StatusCode.PERMISSION_DENIED, "SHM_REGION_DENIED")
            request = with_regions(infer_request("mse", {"y_true": y, "y_pred": y}),
                                   {"y_pred": ("mine", 0, y.nbytes)})
            with pytest.raises(grpc.RpcError) as unseen:
                stub.ModelInfer(request, metadata=as_(tokens, "bob"))
            assert error_of(unseen.value) == (grpc.StatusCode.NOT_FOUND, "SHM_REGION_NOT_FOUND")
            assert outputs(stub.ModelInfer(request, metadata=as_(tokens, "alice")))["loss"] == 0.0
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=as_(tokens, "alice"))


@pytest.mark.parametrize("name, key, offset, size, code, reason", [
    ("x", "/lossd_abc", 0, 8, grpc.StatusCode.INVALID_ARGUMENT, "SHM_BAD_NAME"),  # lossd.v1 sessions' prefix
    ("x", "/../etc/passwd", 0, 8, grpc.StatusCode.INVALID_ARGUMENT, "SHM_BAD_NAME"),
    ("x\n", "/ok", 0, 8, grpc.StatusCode.INVALID_ARGUMENT, "SHM_BAD_NAME"),
    ("x", "/oip_test_not_there", 0, 8, grpc.StatusCode.NOT_FOUND, "SHM_REGION_NOT_FOUND"),
    ("x", "/ok", 0, 0, grpc.StatusCode.INVALID_ARGUMENT, "SHM_BAD_SIZE"),
    ("x", "/ok", 60, 8, grpc.StatusCode.INVALID_ARGUMENT, "SHM_BAD_SIZE"),  # past the object's 64 bytes
    ("x", "/ok", 0, 1 << 40, grpc.StatusCode.RESOURCE_EXHAUSTED, "SHM_TOO_MANY_BYTES"),
])
def test_bad_registrations_are_refused_with_a_reason(stub, shm_server, name, key, offset, size, code, reason):
    _, tokens = shm_server
    with region(64) as memory:
        key = key.replace("/ok", f"/{memory.name}")
        with pytest.raises(grpc.RpcError) as refused:
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name=name, key=key, offset=offset, byte_size=size), metadata=as_(tokens, "alice"))
        assert error_of(refused.value) == (code, reason), refused.value.details()
    status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=as_(tokens, "alice"))
    assert dict(status.regions) == {}  # nothing half-registered


def test_a_range_outside_the_registration_is_refused_before_evaluating(stub, shm_server):
    _, tokens = shm_server
    y = np.ones((2, 3), np.float32)
    with region(64) as memory:
        register(stub, tokens, "alice", "small", memory, offset=8, size=24)
        try:
            for inputs, outputs_to in [({"y_pred": ("small", 0, 48)}, {}),  # more than the 24 registered
                                       ({"y_pred": ("small", 8, 24)}, {}),
                                       ({}, {"loss": ("small", 20, 8)})]:
                request = with_regions(infer_request("mse", {"y_true": y, "y_pred": y}), inputs, outputs_to)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ModelInfer(request, metadata=as_(tokens, "alice"))
                assert error_of(refused.value) == (grpc.StatusCode.INVALID_ARGUMENT, "SHM_OUT_OF_RANGE")
            # Half the parameters of a range: a clear refusal, not a guess.
            request = infer_request("mse", {"y_true": y, "y_pred": y})
            request.inputs[1].parameters["shared_memory_byte_size"].int64_param = 24
            with pytest.raises(grpc.RpcError) as half:
                stub.ModelInfer(request, metadata=as_(tokens, "alice"))
            assert error_of(half.value) == (grpc.StatusCode.INVALID_ARGUMENT, "SHM_BAD_PARAMETERS")
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=as_(tokens, "alice"))


def test_a_server_without_shared_memory_says_so(serve_with_tokens):
    """LOSSD_SHM=0: no extension offered, calls refused with the reason."""
    address, _, _ = serve_with_tokens({}, tokens_file=None, shm=False)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert "system_shared_memory" not in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
        with pytest.raises(grpc.RpcError) as refused:
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name="x", key="/x", byte_size=8))
        assert error_of(refused.value) == (grpc.StatusCode.FAILED_PRECONDITION, "SHM_DISABLED")
        y = np.ones((2, 3), np.float32)
        request = with_regions(infer_request("mse", {"y_true": y, "y_pred": y}), {"y_pred": ("x", 0, 24)})
        with pytest.raises(grpc.RpcError) as unavailable:
            stub.ModelInfer(request)
        assert error_of(unavailable.value) == (grpc.StatusCode.INVALID_ARGUMENT, "SHM_UNAVAILABLE")


def test_the_server_metadata_offers_the_extension(stub, shm_server):
    _, tokens = shm_server
    extensions = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=as_(tokens, "alice")).extensions
    assert "system_shared_memory" in extensions
