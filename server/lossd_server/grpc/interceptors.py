"""One server interceptor for what every RPC needs: a request id in a context
variable, Prometheus RPC metrics (failures counted and timed too), and one
log line per request (DEBUG) or per failure (WARNING)."""

from __future__ import annotations

import logging
import time
from typing import Optional

import grpc

from lossd_server.observability.requestid import METADATA_KEY, clean_request_id, reset_request_id, set_request_id

log = logging.getLogger("lossd_server.access")

_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Request ids, RPC metrics and access logs for the synchronous server.

    The wrapped handler of each method is built once and reused: per call it
    only reads the request id from the call's metadata, so the per-request
    cost stays a few label-free counter updates.
    """

    def __init__(self, metrics=None):
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


def _wrap(handler, full_method: str, metrics):
    service, _, method = full_method.lstrip("/").partition("/")  # "/lossd.v1.LossService/Evaluate"
    grpc_type = _TYPES[(handler.request_streaming, handler.response_streaming)]
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    observer = _Observer(metrics, grpc_type, service, method, handler.request_streaming)
    wrapped = observer.stream(behavior) if handler.response_streaming else observer.unary(behavior)
    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _request_id(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == METADATA_KEY:
            return clean_request_id(value)
    return clean_request_id(None)


class _Observer:
    """Times, counts and logs the calls of one method (metric children resolved once)."""

    def __init__(self, metrics, grpc_type: str, service: str, method: str, request_streaming: bool):
        self.metrics = metrics
        self.labels = (grpc_type, service, method)
        self.request_streaming = request_streaming
        if metrics is not None:
            self.started = metrics.grpc_server_started_total.labels(*self.labels)
            self.in_flight = metrics.lossd_grpc_in_flight_requests.labels(service, method)
            self.received = metrics.grpc_server_msg_received_total.labels(*self.labels)
            self.sent = metrics.grpc_server_msg_sent_total.labels(*self.labels)

    def _count_received(self, request):
        """Counts request messages: one for unary, each as it is read for streams."""
        if self.metrics is None:
            return request
        if not self.request_streaming:
            self.received.inc()
            return request

        def counted():
            for message in request:
                self.received.inc()
                yield message
        return counted()

    def _start(self):
        if self.metrics is not None:
            self.started.inc()
            self.in_flight.inc()
        return time.perf_counter()

    def _finish(self, context, start: float, exc: Optional[BaseException]) -> None:
        seconds = time.perf_counter() - start
        code = _code_of(context, exc)
        grpc_type, service, method = self.labels
        if self.metrics is not None:
            self.in_flight.dec()
            self.metrics.observe_rpc(grpc_type, service, method, code, seconds)
        if code == "OK":
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s/%s %s %.2f ms", service, method, code, seconds * 1e3)
        else:
            log.warning("%s/%s %s %.2f ms: %s", service, method, code, seconds * 1e3,
                        _details_of(context) or exc)

    def unary(self, behavior):
        def wrapper(request, context):
            token = set_request_id(_request_id(context))
            start = self._start()
            exc = None
            try:
                response = behavior(self._count_received(request), context)
                if self.metrics is not None:
                    self.sent.inc()
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
                    if self.metrics is not None:
                        self.sent.inc()
                    yield response
                    set_request_id(request_id)
            except BaseException as e:
                exc = e
                raise
            finally:
                self._finish(context, start, exc)
        return wrapper


def _code_of(context, exc: Optional[BaseException]) -> str:
    code = None
    try:
        code = context.code()
    except AttributeError:  # older grpcio without ServicerContext.code()
        pass
    if code is not None:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    if exc is None or isinstance(exc, GeneratorExit):
        return "OK" if exc is None else "CANCELLED"
    return "UNKNOWN"


def _details_of(context) -> str:
    try:
        details = context.details() or ""
    except AttributeError:
        return ""
    return details.decode("utf-8", "replace") if isinstance(details, bytes) else details
