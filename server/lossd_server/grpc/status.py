"""Errors to gRPC statuses, in one table: every failure leaves the server as a
``google.rpc.Status`` with an ``ErrorInfo`` (reason, domain, metadata), and a
``RetryInfo`` (the delay to wait) when the error says a retry can succeed.

Every RESOURCE_EXHAUSTED status is made here, so here is where refusals are
counted (``lossd_rejected_requests_total{reason}``): the code that refuses
(admission, job limits, storage, stream limits) raises and knows nothing of
metrics; the ObservabilityInterceptor names the counter for the call it serves
(in the call's context: ``requestid.call_request_id``)."""

from __future__ import annotations

import functools
import inspect
import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lossd.wire import WireError
from lossd_server.errors import DOMAIN, InvalidArgument, LossdError
from lossd_server.observability.requestid import current_request_id, refusal_counter

log = logging.getLogger(__name__)

CODES: dict[str, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
}


# What counts a refusal of the call being served: set per call by the
# ObservabilityInterceptor (None with metrics off, or outside a call).
def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    """A RetryInfo saying to wait ``seconds`` (at least a millisecond)."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1_000_000, int(seconds * 1e9)))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def to_status(exc: BaseException) -> status_pb2.Status:
    """The rich status for an exception; unexpected ones become a generic INTERNAL
    (their text may hold internals, so it is logged, never sent)."""
    if isinstance(exc, WireError):  # the wire codec's refusals are client errors
        exc = InvalidArgument(str(exc), reason=exc.reason)
    if isinstance(exc, LossdError):
        code = CODES[exc.kind]
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
        message = exc.message
    else:
        rid = current_request_id()
        log.error("unexpected error [request_id=%s]", rid, exc_info=exc)
        code = grpc.StatusCode.INTERNAL
        info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata={"request_id": rid})
        message = f"Internal error; the server logged it with request id {rid}."
    details = [info]
    if isinstance(exc, LossdError) and exc.retry_delay is not None:
        details.append(retry_info(exc.retry_delay))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        counter = refusal_counter()
        if counter is not None:
            counter(info.reason)
    packed = []
    for detail in details:
        packed.append(any_pb2.Any())
        packed[-1].Pack(detail)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status for ``exc`` (raises, as context.abort does)."""
    # The access log (interceptors.py) logs the failure once, with its request id.
    context.abort_with_status(rpc_status.to_status(to_status(exc)))


def handle_errors(method):
    """Decorates a servicer method so domain errors become rich statuses.

    Works for unary responses and for generators (streamed responses). A
    ``grpc.RpcError`` passes through: reading a request stream raises one once
    the client has cancelled, and then the call is over already. Inside, raise
    a ``LossdError`` rather than calling ``context.abort``: grpcio's abort
    raises a bare ``Exception``, which this would turn into INTERNAL.
    """
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except grpc.RpcError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure gets a status
                abort(context, exc)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
    return unary
