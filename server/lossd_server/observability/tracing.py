"""Traces with OpenTelemetry, configured by the standard ``OTEL_*`` variables.

Off unless an exporter is configured: ``OTEL_TRACES_EXPORTER=otlp``, or an
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
(and not ``OTEL_SDK_DISABLED=true``). Off, nothing of OpenTelemetry is
imported and every span helper is a shared no-op, so tracing costs a
function call where a span would start (bench/tracing.py measures it).

On, spans go to an OTLP exporter over gRPC or HTTP
(``OTEL_EXPORTER_OTLP_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``:
``grpc``, the default, or ``http/protobuf``) through a batch processor; the
SDK reads the rest of its ``OTEL_*`` variables itself (endpoint, headers,
timeout, sampler, resource attributes; ``OTEL_SERVICE_NAME`` defaults to
``lossd``). A W3C ``traceparent`` in a call's gRPC metadata or HTTP headers
makes the server's span a child of the caller's.

Every RPC of every service gets a SERVER span (``grpc/tracing.py``), every
REST request one too (``http/oip_rest.py``); code below them opens child
spans with ``span(name)``, which joins whatever span is current.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Optional

_NULL = contextlib.nullcontext()


def configured(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces to be exported."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER")
    if exporter is not None:
        return exporter.strip().lower() not in ("", "none")
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """Spans of one server, exported as the ``OTEL_*`` variables say.

    Use ``Tracing.from_environment()``: it returns ``OFF`` when tracing is
    not configured. ``enabled`` says which.
    """

    enabled = True

    def __init__(self, provider):
        from opentelemetry import trace
        from opentelemetry.propagate import extract

        self.provider = provider
        self.tracer = provider.get_tracer("lossd_server")
        self._extract = extract
        self._kind_server = trace.SpanKind.SERVER
        self._trace = trace

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> "Tracing | _Off":
        """A Tracing exporting where ``env`` says, or ``OFF``."""
        if not configured(env):
            return OFF
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or "grpc").strip().lower()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            from lossd_server.config import StartupError

            raise StartupError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not one lossd exports with: set "
                               "grpc or http/protobuf")
        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "lossd"}).merge(
            OTELResourceDetector().detect())
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    @contextlib.contextmanager
    def server_span(self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]) -> Iterator:
        """A SERVER span for one call, the child of the caller's span where
        ``carrier`` (metadata or headers, lowercase keys) holds a
        ``traceparent``; current for the code inside."""
        with self.tracer.start_as_current_span(name, context=self._extract(carrier), kind=self._kind_server,
                                               attributes=attributes, record_exception=False,
                                               set_status_on_exception=False) as current:
            yield current

    def span(self, name: str, **attributes):
        """A child span of the current one (a no-op outside any span)."""
        if not self._trace.get_current_span().get_span_context().is_valid:
            return _NULL
        return self.tracer.start_as_current_span(name, attributes=attributes or None)

    def error(self, span, message: str) -> None:
        """Marks ``span`` failed, with ``message``."""
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, message[:500]))

    def trace_id(self) -> Optional[str]:
        """The current span's trace id (32 hex digits), or None."""
        context = self._trace.get_current_span().get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    def shutdown(self) -> None:
        """Exports what is buffered and stops."""
        self.provider.shutdown()


class _Off:
    """Tracing when it is not configured: every helper is a no-op."""

    enabled = False

    def server_span(self, name, carrier, attributes):
        return _NULL

    def span(self, name, **attributes):
        return _NULL

    def error(self, span, message) -> None:
        pass

    def trace_id(self) -> None:
        return None

    def shutdown(self) -> None:
        pass


OFF = _Off()

# The server's Tracing, for code deep in a call (the evaluation service's
# admission wait, the batcher) that opens child spans: set by create_server.
current: "Tracing | _Off" = OFF


def span(name: str, **attributes):
    """A child span of the current span, from the server's tracing (no-op when off)."""
    return current.span(name, **attributes)
