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
import threading
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
        provider = TracerProvider(resource=resource, id_generator=_PresettableIds())
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    def job(self, traceparent: Optional[str]) -> "JobTrace | _OffJob":
        """The spans of the job whose trace ``traceparent`` (its record's) names."""
        context = self._span_context(traceparent) if traceparent else None
        return OFF_JOB if context is None else JobTrace(self, traceparent, context)

    def new_job_trace(self) -> str:
        """A W3C ``traceparent`` for a new job: a trace of its own, whose
        root span (``lossd.job``) ``JobTrace.root`` records when the job
        ends, sampled as the current span (CreateJob's) is."""
        current = self._trace.get_current_span().get_span_context()
        sampled = current.trace_flags.sampled if current.is_valid else True
        ids = self.provider.id_generator
        return f"00-{ids.generate_trace_id():032x}-{ids.generate_span_id():016x}-{'01' if sampled else '00'}"

    def _span_context(self, traceparent: str):
        context = self._trace.get_current_span(self._extract({"traceparent": traceparent})).get_span_context()
        return context if context.is_valid else None

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

    def exemplar(self) -> Optional[dict]:
        """The current span as a metric exemplar's labels (``trace_id``,
        ``span_id``), or None outside a sampled span."""
        context = self._trace.get_current_span().get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            return None
        return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}

    def shutdown(self) -> None:
        """Exports what is buffered and stops."""
        self.provider.shutdown()


class JobTrace:
    """The spans of one training job's trace, from the ``traceparent`` its
    record keeps (``runtime.traceparent``), in whichever process runs that
    part of the job: the server records the queue wait and the root span,
    the job's process its epochs and checkpoint writes.

    The trace is the job's own, not CreateJob's (a call of milliseconds
    would hold spans of hours): CreateJob's span links to it.
    """

    enabled = True

    def __init__(self, tracing: Tracing, traceparent: str, context):
        from opentelemetry.context import Context
        from opentelemetry.trace import NonRecordingSpan, set_span_in_context

        self.tracing = tracing
        self.traceparent = traceparent
        self._context = context
        self._parent = set_span_in_context(NonRecordingSpan(context))
        self._in = set_span_in_context
        self._root = Context()  # no current span: a root's context

    def link_current(self) -> None:
        """Links the current span (CreateJob's) to the job's trace."""
        span = self.tracing._trace.get_current_span()
        if span.is_recording():
            span.add_link(self._context, {"lossd.link": "job"})

    def start(self, name: str, parent=None, **attributes):
        """Starts a span of the job (a child of ``parent``, a span this
        returned, or of the job's root); the caller ends it."""
        return self.tracing.tracer.start_span(name, context=self._parent if parent is None else self._in(parent),
                                              attributes=attributes or None)

    @contextlib.contextmanager
    def span(self, name: str, parent=None, **attributes) -> Iterator:
        """A span of the job around a block (see ``start``)."""
        span = self.start(name, parent, **attributes)
        try:
            yield span
        finally:
            span.end()

    def record(self, name: str, start: float, end: float, **attributes) -> None:
        """A finished child span of the job's root, from ``start`` to ``end``
        (``time.time()`` seconds): what happened before any process held a span."""
        span = self.tracing.tracer.start_span(name, context=self._parent, attributes=attributes or None,
                                              start_time=int(start * 1e9))
        span.end(end_time=int(end * 1e9))

    def root(self, name: str, start: float, end: float, error: Optional[str] = None, **attributes) -> None:
        """The job's root span itself, from its creation (``start``) to its
        end, with the ids its ``traceparent`` gave every child; ``error``:
        a failed job's reason and message (the span's status)."""
        if not self._context.trace_flags.sampled:
            return
        ids = self.tracing.provider.id_generator
        ids.preset(self._context.trace_id, self._context.span_id)
        try:
            span = self.tracing.tracer.start_span(name, context=self._root, attributes=attributes or None,
                                                  start_time=int(start * 1e9))
        finally:
            ids.preset(None, None)
        if error is not None:
            self.tracing.error(span, error)
        span.end(end_time=int(end * 1e9))


class _PresettableIds:
    """Random trace and span ids (the SDK's), except for the one span that
    ``preset`` names on this thread: a job's root span, recorded at the
    job's end with the ids its children were given at its creation."""

    def __init__(self):
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        self._random = RandomIdGenerator()
        self._preset = threading.local()

    def preset(self, trace_id: Optional[int], span_id: Optional[int]) -> None:
        self._preset.ids = None if trace_id is None else [trace_id, span_id]

    def generate_trace_id(self) -> int:
        ids = getattr(self._preset, "ids", None)
        return ids[0] if ids else self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        ids = getattr(self._preset, "ids", None)
        return ids[1] if ids else self._random.generate_span_id()

    def is_trace_id_random(self) -> bool:
        return True


class _OffJob:
    """A job without a trace (tracing off, or a job created without one)."""

    enabled = False

    def link_current(self) -> None:
        pass

    def start(self, name, parent=None, **attributes):
        return _NULL_SPAN

    def span(self, name, parent=None, **attributes):
        return _NULL

    def record(self, name, start, end, **attributes) -> None:
        pass

    def root(self, name, start, end, error=None, **attributes) -> None:
        pass


class _NullSpan:
    def end(self, end_time=None) -> None:
        pass

    def set_attribute(self, key, value) -> None:
        pass


_NULL_SPAN = _NullSpan()
OFF_JOB = _OffJob()


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

    def job(self, traceparent) -> _OffJob:
        return OFF_JOB

    def new_job_trace(self) -> None:
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
