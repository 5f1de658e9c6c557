"""Server interceptors: one for what every RPC needs (a request id and
refusal counter in one context variable, Prometheus RPC metrics with failures counted and timed too,
refusals counted by reason where their statuses are made (``status.py``),
one log line per request at DEBUG or per failure at WARNING), and one that
bounds streaming calls so they cannot starve unary calls (``StreamLimiter``)."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Optional

import grpc

from lossd_server.errors import DeadlineExceeded, ResourceExhausted
from lossd_server.grpc import status
from lossd_server.grpc.auth import OPEN_SERVICES, authenticated_caller
from lossd_server.observability.logs import one_line as _one_line
from lossd_server.observability.metrics import Metrics, RpcMethodMetrics
from lossd_server.observability.requestid import call_request_id, reset_request_id, set_request_id

log = logging.getLogger("lossd_server.access")


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Request ids, RPC metrics and access logs for the synchronous server.

    The wrapped handler of each method is built once and reused: per call it
    only keeps the call's metadata for a request id made if a log line asks
    for one, so the per-request cost stays a few label-free counter updates.
    """

    def __init__(self, metrics: Optional[Metrics] = None):
        self.metrics = metrics
        self._handlers: dict[str, tuple] = {}
        # One item per call running now: a deque's append and pop are atomic,
        # so counting costs no lock (~60 ns a call), with metrics on or off.
        self._calls: collections.deque = collections.deque()

    def in_flight(self) -> int:
        """Calls running now (their handler started and has not returned);
        a drain that Ctrl-C began ends when it is 0 (``app.serve``)."""
        return len(self._calls)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        cached = self._handlers.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, handler_call_details.method, self.metrics, self._calls)
        self._handlers[handler_call_details.method] = (handler, wrapped)
        return wrapped


def handler_parts(handler: grpc.RpcMethodHandler):
    """``(behavior, factory)`` of a method handler: the function its kind
    calls, and the ``grpc.*_rpc_method_handler`` that builds a handler of the
    same kind around a wrapper of it (every interceptor that wraps handlers)."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def _wrap(handler, full_method: str, metrics: Optional[Metrics], calls: collections.deque):
    service, _, method = full_method.lstrip("/").partition("/")  # "/lossd.v1.LossService/Evaluate"
    behavior, factory = handler_parts(handler)
    rpc = None if metrics is None else metrics.rpc_method(
        service, method, client_streaming=handler.request_streaming, server_streaming=handler.response_streaming)
    observer = _Observer(rpc, f"{service}/{method}", handler.request_streaming,
                         None if metrics is None else metrics.count_rejection, calls)
    wrapped = observer.stream(behavior) if handler.response_streaming else observer.unary(behavior)
    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class _Observer:
    """Times, counts and logs the calls of one method."""

    def __init__(self, rpc: Optional[RpcMethodMetrics], name: str, request_streaming: bool,
                 count_rejection, calls: collections.deque):
        self.rpc = rpc  # None with metrics off
        self.name = name  # "lossd.v1.LossService/Evaluate", for the access log
        self.request_streaming = request_streaming
        self.count_rejection = count_rejection  # Metrics.count_rejection, None with metrics off
        self.calls = calls  # ObservabilityInterceptor's calls in flight

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
        self.calls.append(None)
        if self.rpc is not None:
            self.rpc.started()
        return time.perf_counter()

    def _finish(self, context, start: float, exc: Optional[BaseException]) -> None:
        seconds = time.perf_counter() - start
        self.calls.pop()
        code = _code_of(context, exc)
        if self.rpc is not None:
            self.rpc.finished(code, seconds)
        if code == "OK":
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s %.2f ms", self.name, code, seconds * 1e3)
        else:
            log.warning("%s %s %.2f ms: %s", self.name, code, seconds * 1e3,
                        _one_line(_details_of(context) or str(exc)))

    def unary(self, behavior):
        def wrapper(request, context):
            # One context variable per call: its request id and refusal counter.
            token = set_request_id(call_request_id(context.invocation_metadata(), self.count_rejection))
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
            request_id = call_request_id(context.invocation_metadata(), self.count_rejection)
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
    """The status code name the call ends with, as the client sees it."""
    if not context.is_active() or isinstance(exc, (GeneratorExit, grpc.RpcError)):
        # The client went away before the handler ended (a response stream
        # closed early, a request stream that raised or ended short): what
        # it saw is its deadline's status, or its own cancellation, whatever
        # the handler made of the cut.
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()  # set by abort() and set_code(); None when the handler set none
    if code is not None:
        return code.name
    return "OK" if exc is None else "UNKNOWN"


def _details_of(context) -> str:
    details = context.details() or ""
    return details.decode("utf-8", "replace") if isinstance(details, bytes) else details


class StreamLimiter(grpc.ServerInterceptor):
    """Keeps streaming calls from starving unary calls, health, and each other.

    The synchronous server gives every call a thread for its whole life, and
    a stream can live for hours doing nothing (a WatchJob on a queued job, an
    EvaluateChunked that sent only its header). So:

    - at most ``max_streams`` streaming calls run at once; one more is refused
      at once with RESOURCE_EXHAUSTED (``TOO_MANY_STREAMS``). The server's
      pool has ``workers + max_streams`` threads, so ``workers`` threads are
      always left for unary calls and health checks;
    - of those, one token's caller holds at most ``per_caller``, and callers
      without a token (health watches, reflection, calls the token check
      refuses) at most ``unauthenticated`` together, so neither can take the
      slots of every token holder. A server without tokens has no callers to
      tell apart: its own methods share ``max_streams``, while health and
      reflection still get only ``unauthenticated``;
    - a request stream on which the client sends nothing for
      ``idle_seconds`` ends with DEADLINE_EXCEEDED (``STREAM_IDLE``). Its
      messages are read by a reader thread of the stream's own, handing over
      one message at a time (flow control still holds the client back). A
      health watch that has nothing to send for ``idle_seconds`` ends the
      same way (the client watches again); WatchJob and OpenSession end
      themselves when idle, as only they know what counts as use.

    Unary methods pass through untouched.
    """

    def __init__(self, max_streams: int, idle_seconds: float, *, per_caller: Optional[int] = None,
                 unauthenticated: Optional[int] = None, open_server: bool = True):
        self.max_streams = max_streams
        self.idle_seconds = idle_seconds
        self.per_caller = per_caller or max_streams
        self.unauthenticated = unauthenticated or max_streams
        self.open_server = open_server
        self._lock = threading.Lock()
        self._open = 0
        self._held: dict[tuple, int] = {}  # ("caller", name) or ("unauthenticated",) -> streams open
        self._handlers: dict[str, tuple] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        cached = self._handlers.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, handler_call_details.method.lstrip("/").partition("/")[0] in OPEN_SERVICES)
        self._handlers[handler_call_details.method] = (handler, wrapped)
        return wrapped

    def _budget(self, context, open_service: bool) -> tuple[Optional[tuple], int, str]:
        """``(key, limit, what)`` of the budget a call's stream counts against."""
        caller = None if open_service else authenticated_caller(context.invocation_metadata())
        if caller is not None:
            return ("caller", caller.name), self.per_caller, f"one caller ({caller.name!r}; max_streams_per_caller)"
        if open_service or not self.open_server:
            return ("unauthenticated",), self.unauthenticated, \
                "callers without a token, health watches included (max_unauthenticated_streams)"
        return None, self.max_streams, "the server (the server's max_streams)"

    def _admit(self, context, open_service: bool) -> Optional[tuple]:
        """Takes a stream slot and returns its budget's key, or ends the call
        (raises) when the server or the caller's budget has none free."""
        key, limit, what = self._budget(context, open_service)
        with self._lock:
            held = self._held.get(key, 0)
            if self._open < self.max_streams and (key is None or held < limit):
                self._open += 1
                if key is not None:
                    self._held[key] = held + 1
                return key
            if self._open >= self.max_streams:
                limit, what = self.max_streams, "the server (the server's max_streams)"
        status.abort(context, ResourceExhausted(
            f"Too many streams open. Expected at most {limit} at once for {what}; close one or retry later.",
            reason="TOO_MANY_STREAMS", metadata={"limit": str(limit)}))

    def _requests(self, request, streaming: bool):
        return _IdleLimitedRequests(request, self.idle_seconds) if streaming else request

    def _wrap(self, handler, open_service: bool):
        behavior, factory = handler_parts(handler)  # a streaming method: never unary-unary
        streaming_requests = handler.request_streaming
        # Health.Watch sends only on a change: idle-limited on its responses.
        idle_responses = open_service and not streaming_requests

        if handler.response_streaming:
            def wrapper(request, context):
                key = self._admit(context, open_service)
                requests = self._requests(request, streaming_requests)
                responses = None
                try:
                    responses = behavior(requests, context)
                    if idle_responses:
                        responses = _IdleLimitedRequests(responses, self.idle_seconds, what="nothing was sent")
                    yield from responses
                except _StreamIdle as exc:  # raised where no handle_errors turned it into a status
                    status.abort(context, exc)
                finally:
                    if isinstance(responses, _IdleLimitedRequests):
                        responses.close()
                    self._release(requests, key)
        else:
            def wrapper(request, context):
                key = self._admit(context, open_service)
                requests = self._requests(request, streaming_requests)
                try:
                    return behavior(requests, context)
                except _StreamIdle as exc:
                    status.abort(context, exc)
                finally:
                    self._release(requests, key)
        return factory(wrapper, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _release(self, requests, key: Optional[tuple]) -> None:
        if isinstance(requests, _IdleLimitedRequests):
            requests.close()
        with self._lock:
            self._open -= 1
            if key is not None:
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key]


class _StreamIdle(DeadlineExceeded):
    pass


class _IdleLimitedRequests:
    """A request iterator whose ``next()`` gives up after ``idle_seconds``
    without a message, raising DEADLINE_EXCEEDED (``STREAM_IDLE``).

    gRPC's own request iterator blocks without a timeout, so a reader thread
    calls it, and the handler waits for the reader's answer with a timeout.
    The reader reads a message only when the handler asks for one: nothing
    is read ahead, so flow control and the received-message counts are
    those of a handler reading gRPC's iterator itself.
    """

    _END = object()
    _CLOSE = object()

    def __init__(self, requests, idle_seconds: float, what: str = "no message arrived"):
        self._requests = requests
        self._idle_seconds = idle_seconds
        self._what = what
        self._asks: queue.SimpleQueue = queue.SimpleQueue()
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._reader: Optional[threading.Thread] = None
        self._ended = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="stream-reader", daemon=True)
            self._reader.start()
        self._asks.put(True)
        try:
            item = self._answers.get(timeout=self._idle_seconds)
        except queue.Empty:
            self._ended = True
            raise _StreamIdle(
                f"On this stream {self._what} for {self._idle_seconds:g} s. Expected the next message "
                "within the server's stream_idle_seconds (LOSSD_STREAM_IDLE_SECONDS); open a new stream to go on.",
                reason="STREAM_IDLE", metadata={"idle_seconds": f"{self._idle_seconds:g}"}) from None
        if item is self._END:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def _read(self) -> None:
        while self._asks.get() is not self._CLOSE:
            try:
                self._answers.put(next(self._requests))
            except StopIteration:
                self._answers.put(self._END)
                return
            except BaseException as exc:  # noqa: BLE001 - a cancelled call: the handler gets the error
                self._answers.put(exc)
                return

    def close(self) -> None:
        """The call is over: a reader waiting to be asked ends now; one
        inside gRPC's iterator ends when that returns, as it does once the
        call has ended."""
        self._asks.put(self._CLOSE)
