"""A SERVER span for every RPC of every service, when tracing is on.

The interceptor is installed only when ``observability.tracing`` is
configured (``create_server``), so a server without tracing runs none of
this. The span is the child of the caller's (a W3C ``traceparent`` in the
call's metadata), current while the handler runs, so the evaluation's own
spans (admission, batching, compilation, the TensorFlow call, encoding)
nest under it; it ends with the call's status code.
"""

from __future__ import annotations

import grpc

from lossd_server.grpc.interceptors import handler_parts
from lossd_server.observability.tracing import Tracing


def _status_name(context) -> str:
    code = context.code() if hasattr(context, "code") else None
    return "OK" if code is None else code.name


class TracingInterceptor(grpc.ServerInterceptor):
    """Wraps every method's handler in a SERVER span named ``service/method``."""

    def __init__(self, tracing: Tracing):
        self.tracing = tracing
        self._handlers: dict[str, tuple] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._handlers[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler, method: str):
        service, _, name = method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        span_name = method.lstrip("/")
        tracing = self.tracing
        behavior, factory = handler_parts(handler)

        def carrier(context) -> dict:
            return {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}

        def finish(span, context, error=None) -> None:
            code = _status_name(context)
            if error is not None and code == "OK":
                code = "UNKNOWN"
            span.set_attribute("rpc.grpc.status_code", code)
            if code != "OK":
                details = context.details() if hasattr(context, "details") else None
                if isinstance(details, bytes):  # grpcio keeps what abort() was given, encoded
                    details = details.decode(errors="replace")
                tracing.error(span, details or str(error or ""))

        if handler.response_streaming:
            def wrapper(request, context):
                with tracing.server_span(span_name, carrier(context), attributes) as span:
                    try:
                        yield from behavior(request, context)
                    except BaseException as error:
                        finish(span, context, error)
                        raise
                    finish(span, context)
        else:
            def wrapper(request, context):
                with tracing.server_span(span_name, carrier(context), attributes) as span:
                    try:
                        response = behavior(request, context)
                    except BaseException as error:
                        finish(span, context, error)
                        raise
                    finish(span, context)
                    return response
        return factory(wrapper, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
