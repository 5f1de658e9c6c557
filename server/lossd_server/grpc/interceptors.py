"""One server interceptor for what every RPC needs: a request id in a context
variable, Prometheus RPC metrics (failures counted and timed too), and one
log line per request (DEBUG) or per failure (WARNING)."""

from __future__ import annotations

import logging
import time
from typing import Optional

import grpc

from lossd_server.observability.metrics import Metrics, RpcMethodMetrics
from lossd_server.observability.requestid import METADATA_KEY, clean_request_id, reset_request_id, set_request_id

log = logging.getLogger("lossd_server.access")


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Request ids, RPC metrics and access logs for the synchronous server.

    The wrapped handler of each method is built once and reused: per call it
    only reads the request id from the call's metadata, so the per-request
    cost stays a few label-free counter updates.
    """

    def __init__(self, metrics: Optional[Metrics] = None):
        self.metrics = metrics
        self._handlers: dict[str, tuple] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        cached = self._handlers.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, handler_call_details.method, self.metrics)
        self._handlers[handler_call_details.method] = (handler, wrapped)
        return wrapped


def _wrap(handler, full_method: str, metrics: Optional[Metrics]):
    service, _, method = full_method.lstrip("/").partition("/")  # "/lossd.v1.LossService/Evaluate"
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    rpc = None if metrics is None else metrics.rpc_method(
        service, method, client_streaming=handler.request_streaming, server_streaming=handler.response_streaming)
    observer = _Observer(rpc, f"{service}/{method}", handler.request_streaming)
    wrapped = observer.stream(behavior) if handler.response_streaming else observer.unary(behavior)
    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _request_id(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == METADATA_KEY:
            return clean_request_id(value)
    return clean_request_id(None)


class _Observer:
    """Times, counts and logs the calls of one method."""

    def __init__(self, rpc: Optional[RpcMethodMetrics], name: str, request_streaming: bool):
        self.rpc = rpc  # None with metrics off
        self.name = name  # "lossd.v1.LossService/Evaluate", for the access log
        self.request_streaming = request_streaming

    def _count_received(self, request):
        """Counts request messages: one for unary, each as it is read for streams."""
        if self.rpc is None:
            return request
        if not self.request_streaming:
            self.rpc.received()
            return request

        def counted():
            for message in request:
                self.rpc.received()
                yield message
        return counted()

    def _start(self) -> float:
        if self.rpc is not None:
            self.rpc.started()
        return time.perf_counter()

    def _finish(self, context, start: float, exc: Optional[BaseException]) -> None:
        seconds = time.perf_counter() - start
        code = _code_of(context, exc)
        if self.rpc is not None:
            self.rpc.finished(code, seconds)
        if code == "OK":
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s %.2f ms", self.name, code, seconds * 1e3)
        else:
            log.warning("%s %s %.2f ms: %s", self.name, code, seconds * 1e3, _details_of(context) or exc)

    def unary(self, behavior):
        def wrapper(request, context):
            token = set_request_id(_request_id(context))
            start = self._start()
            exc = None
            try:
                response = behavior(self._count_received(request), context)
                if self.rpc is not None:
                    self.rpc.sent()
                return response
            except BaseException as e:
                exc = e
                raise
            finally:
                self._finish(context, start, exc)
                reset_request_id(token)
        return wrapper

    def stream(self, behavior):
        def wrapper(request, context):
            # gRPC resumes a response generator from its own threads: set the
            # id again after every yield rather than resetting a token.
            request_id = _request_id(context)
            set_request_id(request_id)
            start = self._start()
            exc = None
            try:
                for response in behavior(self._count_received(request), context):
                    if self.rpc is not None:
                        self.rpc.sent()
                    yield response
                    set_request_id(request_id)
            except BaseException as e:
                exc = e
                raise
            finally:
                self._finish(context, start, exc)
        return wrapper


def _code_of(context, exc: Optional[BaseException]) -> str:
    """The status code name the call ends with."""
    code = context.code()  # set by abort() and set_code(); None when the handler set none
    if code is not None:
        return code.name
    if exc is None:
        return "OK"
    # A response stream closed early (client cancelled or deadline passed).
    return "CANCELLED" if isinstance(exc, GeneratorExit) else "UNKNOWN"


def _details_of(context) -> str:
    details = context.details() or ""
    return details.decode("utf-8", "replace") if isinstance(details, bytes) else details
