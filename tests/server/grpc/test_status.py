"""Status mapping (lossd_server.grpc.status): every error that leaves a servicer
becomes a ``google.rpc.Status`` with an ErrorInfo, and nothing unexpected leaks."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from lossd import wire
from lossd.v1 import tensor_pb2
from lossd_server import errors
from lossd_server.grpc.status import handle_errors, to_status
from lossd_server.observability.requestid import reset_request_id, set_request_id


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    assert len(status.details) == 1, status
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info), status.details[0]
    return info


@pytest.mark.parametrize("error_class, code", [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
])
def test_each_error_kind_has_its_code(error_class, code):
    status = to_status(error_class("Job 'x' does not exist.", reason="SOME_REASON", metadata={"job": "x", "n": 3}))
    assert status.code == code.value[0]
    assert status.message == "Job 'x' does not exist."
    info = error_info(status)
    assert info.reason == "SOME_REASON"
    assert info.domain == errors.DOMAIN
    assert dict(info.metadata) == {"job": "x", "n": "3"}


def test_every_error_kind_is_mapped():
    # A new LossdError subclass needs a code: to_status must not raise for it.
    for error_class in errors.LossdError.__subclasses__():
        to_status(error_class("message"))


def test_an_error_without_a_reason_gets_its_default_reason():
    assert error_info(to_status(errors.NotFound("gone"))).reason == "NOT_FOUND"


def test_a_wire_error_is_invalid_argument_with_its_reason():
    with pytest.raises(wire.WireError) as raised:  # a real refusal of the codec
        wire.to_numpy(tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[4], content=b"\0" * 8),
                      field="y_pred")
    status = to_status(raised.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == str(raised.value)
    assert error_info(status).reason == raised.value.reason == "BAD_TENSOR"


def test_an_unexpected_error_is_internal_with_the_request_id_and_nothing_else(caplog):
    token = set_request_id("req-42")
    try:
        with caplog.at_level(logging.ERROR, logger="lossd_server.grpc.status"):
            status = to_status(KeyError("/secret/path/model.keras"))
    finally:
        reset_request_id(token)
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert "req-42" in status.message
    assert "secret" not in str(status) and "KeyError" not in str(status)
    info = error_info(status)
    assert info.reason == "INTERNAL"
    assert dict(info.metadata) == {"request_id": "req-42"}
    # The details stay in the server's log, with the request id to find them.
    [record] = caplog.records
    assert "req-42" in record.getMessage()
    assert record.exc_info is not None and "secret" in str(record.exc_info[1])


# handle_errors, with a context that records what the servicer ends the call with.


class Aborted(Exception):
    """What ServicerContext.abort_with_status raises."""


class FakeContext:
    def __init__(self):
        self.status = None

    def abort_with_status(self, status):
        self.status = status
        raise Aborted()


class Servicer:
    @handle_errors
    def Unary(self, request, context):
        if request == "fail":
            raise errors.NotFound("Job 'x' does not exist.", reason="JOB_NOT_FOUND")
        if request == "cancelled":
            raise grpc.RpcError()
        return "ok"

    @handle_errors
    def Stream(self, request, context):
        yield 1
        if request == "fail":
            raise wire.WireError("bad bytes", reason="BAD_TENSOR")
        if request == "cancelled":
            raise grpc.RpcError()
        yield 2


def test_handle_errors_passes_results_through():
    assert Servicer().Unary("x", FakeContext()) == "ok"
    assert list(Servicer().Stream("x", FakeContext())) == [1, 2]


def test_handle_errors_ends_a_unary_call_with_the_rich_status():
    context = FakeContext()
    with pytest.raises(Aborted):
        Servicer().Unary("fail", context)
    assert context.status.code == grpc.StatusCode.NOT_FOUND
    assert context.status.details == "Job 'x' does not exist."
    [(key, value)] = context.status.trailing_metadata
    assert key == "grpc-status-details-bin"
    assert error_info(status_pb2.Status.FromString(value)).reason == "JOB_NOT_FOUND"


def test_handle_errors_ends_a_stream_with_the_rich_status_after_what_it_sent():
    context = FakeContext()
    sent = []
    with pytest.raises(Aborted):
        for item in Servicer().Stream("fail", context):
            sent.append(item)
    assert sent == [1]
    assert context.status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(status_pb2.Status.FromString(context.status.trailing_metadata[0][1])).reason == "BAD_TENSOR"


@pytest.mark.parametrize("call", [lambda s, c: s.Unary("cancelled", c), lambda s, c: list(s.Stream("cancelled", c))],
                         ids=["unary", "stream"])
def test_handle_errors_lets_a_cancelled_call_end_as_it_is(call, caplog):
    # Reading a request stream raises RpcError once the client has cancelled.
    context = FakeContext()
    with pytest.raises(grpc.RpcError):
        call(Servicer(), context)
    assert context.status is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
