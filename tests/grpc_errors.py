"""lossd's rich statuses as tests read them: straight from the wire, not
through the client's own translation (which these tests also check), with
one owner for every suite."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def status_of(error: grpc.RpcError) -> status_pb2.Status:
    """The ``google.rpc.Status`` a failed call carried (there must be one)."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status: {error.code()} {error.details()}"
    return status


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    """The status's one ErrorInfo (a RetryInfo may stand beside it)."""
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, f"expected exactly one ErrorInfo detail, got {len(infos)}: {status}"
    return infos[0]


def reason_of(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call."""
    return error_info(status_of(error)).reason
