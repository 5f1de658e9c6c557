"""The Open Inference Protocol (KServe v2) over HTTP: ``/v2/...`` on a port of
its own (``LOSSD_HTTP_PORT``), with JSON tensors and the binary tensor data
extension (``Inference-Header-Content-Length``).

Like the gRPC servicers it only decodes and encodes: what a model, a
parameter and an output are is ``evaluation.inference_protocol``'s, and the
evaluation is ``EvaluationService``'s, so a REST inference gets the gRPC
one's answer. Tokens and scopes are checked as the gRPC interceptor checks
them (``Authorization: Bearer``; every route needs the ``evaluate`` scope),
and the caller's rate as for ``Evaluate``. The server answers on a fixed
pool of threads and reads no body larger than ``max_body_bytes``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from concurrent import futures
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from lossd import wire
from lossd_server.errors import FailedPrecondition, InvalidArgument, LossdError, PermissionDenied
from lossd_server.evaluation import inference_protocol as oip
from lossd_server.evaluation.service import EvaluationService
from lossd_server.observability import tracing as tracing_module
from lossd_server.observability.logs import ACCESS_LOGGER, one_line
from lossd_server.observability.metrics import HTTP_METHODS
from lossd_server.observability.requestid import (METADATA_KEY, call_request_id, current_request_id, refusal_counter,
                                                   reset_request_id, set_request_id)

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("parameters", "binary_tensor_data")
_HTTP_STATUS = {"invalid_argument": 400, "failed_precondition": 400, "unauthenticated": 401,
                "permission_denied": 403, "not_found": 404, "already_exists": 409, "resource_exhausted": 429,
                "unavailable": 503, "deadline_exceeded": 504}
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 411: "Length Required", 413: "Payload Too Large",
            429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
            504: "Gateway Timeout"}
_MODEL_ROUTE = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$")
_FIXED_ROUTES = ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/systemsharedmemory/status",
                 "/v2/systemsharedmemory/unregister")
# Triton's system shared-memory extension: one region's status, registration and its end.
_REGION_ROUTE = re.compile(r"^/v2/systemsharedmemory/region/(?P<name>[^/]+)/(?P<action>status|register|unregister)$")
# The route of a path that matches none: metrics and span names never carry a raw path.
OTHER_ROUTE = "_OTHER"


def route_of(path: str) -> str:
    """The route template a path matches (``/v2/models/{name}/infer``,
    ``/v2/health/ready``), or ``OTHER_ROUTE``: the bounded ``http_route`` of
    metrics and span names."""
    if path in _FIXED_ROUTES:
        return path
    region = _REGION_ROUTE.match(path)
    if region is not None:
        return "/v2/systemsharedmemory/region/{name}/" + region["action"]
    match = _MODEL_ROUTE.match(path)
    if match is None:
        return OTHER_ROUTE
    return "/v2/models/{name}" + ("/versions/{version}" if match["version"] else "") + (match["rest"] or "")


class HttpError(Exception):
    def __init__(self, status: int, message: str, reason: str):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


class OipRestApp:
    """The WSGI application of ``/v2``.

    Args:
        service: Evaluates (plans, admission, batching, metering).
        ready: Whether the server serves (health SERVING).
        callers: ``grpc.auth.Callers``: finds the caller of a bearer token.
        admission: Refuses a caller in debt of its rate (``refuse_in_debt``).
        version: The server's version, for the server metadata.
        max_body_bytes: The largest request body read (the gRPC port's
            ``max_message_bytes``).
        tracing: ``observability.tracing``: a SERVER span per request (the
            child of a W3C ``traceparent`` header's), when on.
        metrics: ``observability.metrics.Metrics``: the HTTP request metrics
            by method and route template, and refusals by reason; None: none.
        shared_memory: The server's shared-memory regions (``LOSSD_SHM``):
            Triton's system shared-memory extension, as over gRPC.

    Every request writes the access log's line (``lossd_server.access``), as
    a gRPC call does, with its ``X-Request-Id`` header as the request id.
    """

    def __init__(self, service: EvaluationService, *, ready: Callable[[], bool], callers, admission=None,
                 version: str = "", max_body_bytes: int = 256 << 20, tracing=tracing_module.OFF, metrics=None,
                 shared_memory=None):
        self.service = service
        self.shared_memory = shared_memory
        self.extensions = (*EXTENSIONS, *([oip.SHM_EXTENSION] if shared_memory is not None else []))
        self.registry = service.registry
        self.ready = ready
        self.callers = callers
        self.admission = admission
        self.version = version
        self.max_body_bytes = max_body_bytes
        self.tracing = tracing
        self.metrics = metrics

    def __call__(self, environ, start_response):
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "")
        route = route_of(path)
        if not self.tracing.enabled:
            return self._serve(environ, start_response, method, path, route, None)
        carrier = {key[5:].lower().replace("_", "-"): value for key, value in environ.items()
                   if key in ("HTTP_TRACEPARENT", "HTTP_TRACESTATE")}
        known = method if method in HTTP_METHODS else "_OTHER"
        # The span holds the metrics too: the latency histogram's exemplar is its trace.
        with self.tracing.server_span(f"{known} {route}", carrier, {
                "http.request.method": known, "http.route": route, "url.path": path[:200]}) as span:
            return self._serve(environ, start_response, method, path, route, span)

    def _serve(self, environ, start_response, method: str, path: str, route: str, span):
        http = None if self.metrics is None else self.metrics.http_route(method, route)
        sent_id = environ.get("HTTP_X_REQUEST_ID")
        token = set_request_id(call_request_id(((METADATA_KEY, sent_id),) if sent_id is not None else (),
                                               None if self.metrics is None else self.metrics.count_rejection))
        if http is not None:
            http.started()
        start = time.perf_counter()
        status, message = 500, "the request ended before its answer"
        try:
            status, headers, body, message = self._answer(environ, method, path)
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                if message is not None:
                    self.tracing.error(span, message)
            start_response(f"{status} {_REASONS.get(status, '')}", headers)
            return [body]
        finally:
            seconds = time.perf_counter() - start
            if http is not None:
                http.finished(status, seconds)
            # The access log line, as the gRPC interceptor writes it: DEBUG when
            # answered, WARNING with the error's message when refused or failed.
            if message is None:
                if access_log.isEnabledFor(logging.DEBUG):
                    access_log.debug("%s %s %d %.2f ms", one_line(method[:16]), one_line(path[:200]), status,
                                     seconds * 1e3)
            else:
                access_log.warning("%s %s %d %.2f ms: %s", one_line(method[:16]), one_line(path[:200]), status,
                                   seconds * 1e3, one_line(message))
            reset_request_id(token)

    def _answer(self, environ, method: str, path: str):
        """``(status, headers, body, error message or None)`` of one request."""
        message = None
        try:
            status, headers, body = self._route(environ, method, path)
        except HttpError as error:
            status, headers, body, message = error.status, [], self._error_body(error.message, error.reason), \
                error.message
        except (LossdError, wire.WireError) as error:
            kind = getattr(error, "kind", "invalid_argument")
            status = _HTTP_STATUS.get(kind, 400)
            headers = []
            delay = getattr(error, "retry_delay", None)
            if status == 429:
                counter = refusal_counter()  # lossd_rejected_requests_total, as for a gRPC call
                if counter is not None:
                    counter(error.reason)
                if delay is not None:
                    headers.append(("Retry-After", str(max(1, int(delay + 0.999)))))
            message = getattr(error, "message", str(error))
            body = self._error_body(message, error.reason)
        except Exception:  # noqa: BLE001 - every failure gets an answer, and a log line
            log.exception("OIP REST %s %s failed", method[:16], path[:200])
            message = f"Internal error; the server logged it with request id {current_request_id()}."
            status, headers, body = 500, [], self._error_body(message, "INTERNAL")
        if not any(name == "Content-Type" for name, _ in headers):
            headers.append(("Content-Type", "application/json"))
        headers.append(("Content-Length", str(len(body))))
        return status, headers, body, message

    @staticmethod
    def _error_body(message: str, reason: str) -> bytes:
        return json.dumps({"error": message, "reason": reason}).encode()

    # -- routes ----------------------------------------------------------------

    def _route(self, environ, method: str, path: str):
        caller = self._caller(environ)
        if path in ("/v2/health/live", "/v2/health/ready", "/v2"):
            self._only(method, "GET")
            if path == "/v2/health/live":
                return 200, [], json.dumps({"live": True}).encode()
            if path == "/v2/health/ready":
                ready = self.ready()
                return (200 if ready else 503), [], json.dumps({"ready": ready}).encode()
            return 200, [], json.dumps({"name": "lossd", "version": self.version,
                                        "extensions": list(self.extensions)}).encode()
        if path.startswith("/v2/systemsharedmemory/"):
            return self._shared_memory(environ, method, path, caller)
        match = _MODEL_ROUTE.match(path)
        if match is None:
            raise HttpError(404, f"No such route. Expected /v2, /v2/health/live|ready or /v2/models/NAME[/versions/V]"
                                 f"[/ready|/infer]. Received: {path[:200]!r}.", "NOT_FOUND")
        name, version, rest = match["name"], match["version"] or "", match["rest"]
        if rest == "/ready":
            self._only(method, "GET")
            known = name == oip.SPEC_MODEL or self.registry.canonical(name) is not None
            ready = known and version in ("", *oip.VERSIONS) and self.ready()
            return (200 if ready else 400 if not known else 503), [], json.dumps(
                {"name": name, "ready": ready}).encode()
        if rest is None:
            self._only(method, "GET")
            metadata = oip.model_metadata(self.registry, name, version)
            return 200, [], json.dumps({
                "name": metadata.name, "versions": list(metadata.versions), "platform": metadata.platform,
                "inputs": [_tensor_json(t) for t in metadata.inputs],
                "outputs": [_tensor_json(t) for t in metadata.outputs]}).encode()
        self._only(method, "POST")
        if self.admission is not None:
            self.admission.refuse_in_debt(caller.name, caller.limits.elements_per_second)
        return self._infer(environ, name, version, caller)

    def _shared_memory(self, environ, method: str, path: str, caller):
        """Triton's system shared-memory extension over REST: the same
        registrations as over gRPC (``SharedMemoryRegions.register_named``)."""
        if self.shared_memory is None:
            raise FailedPrecondition("This server has no shared memory. Expected a server started with LOSSD_SHM=1 "
                                     "on the client's host.", reason="SHM_DISABLED")
        region = _REGION_ROUTE.match(path)
        if region is None and path not in _FIXED_ROUTES:
            raise HttpError(404, f"No such route. Expected /v2/systemsharedmemory/status, .../unregister or "
                                 f".../region/NAME/status|register|unregister. Received: {path[:200]!r}.", "NOT_FOUND")
        name = urllib.parse.unquote(region["name"]) if region is not None else ""
        action = region["action"] if region is not None else path.rsplit("/", 1)[1]
        if action == "status":
            self._only(method, "GET")
            return 200, [], json.dumps([{"name": r.label, "key": r.name, "offset": r.base, "byte_size": r.size}
                                        for r in self.shared_memory.named(caller.name, name)]).encode()
        self._only(method, "POST")
        if action == "unregister":
            self.shared_memory.unregister_named(caller.name, name)
            return 200, [], b""
        body = _object(self._json(self._body(environ), "registration"), "registration")
        key, offset, byte_size = body.get("key"), body.get("offset", 0), body.get("byte_size")
        if not isinstance(key, str) or any(isinstance(v, bool) or not isinstance(v, int) for v in (offset, byte_size)):
            raise InvalidArgument(f"A registration is {{\"key\": a string, \"offset\": an integer, \"byte_size\": "
                                  f"an integer}}. Received: {json.dumps(body)[:200]}.", reason="SHM_BAD_PARAMETERS")
        self.shared_memory.register_named(caller.name, name, key, offset, byte_size)
        return 200, [], b""

    @staticmethod
    def _json(head: bytes, what: str):
        try:
            return json.loads(head)
        except ValueError as error:
            raise InvalidArgument(f"The {what} is not JSON. Expected the protocol's {what} object. "
                                  f"Received: {str(error)[:200]}.", reason="BAD_REQUEST") from None

    @staticmethod
    def _only(method: str, allowed: str) -> None:
        if method != allowed:
            raise HttpError(405, f"Method not allowed. Expected {allowed}. Received: {method[:16]}.",
                            "METHOD_NOT_ALLOWED")

    def _caller(self, environ):
        header = environ.get("HTTP_AUTHORIZATION")
        caller = self.callers.check((("authorization", header),) if header is not None else ())
        if "evaluate" not in caller.scopes and not caller.admin:
            raise PermissionDenied(f"The Open Inference Protocol needs the scope `evaluate`. Expected a token with "
                                   f"it. Received: a token of {caller.name!r} with "
                                   f"{', '.join(sorted(caller.scopes))}.", reason="MISSING_SCOPE",
                                   metadata={"scope": "evaluate", "caller": caller.name})
        return caller

    def _body(self, environ) -> bytes:
        length = environ.get("CONTENT_LENGTH")
        if not length:
            raise HttpError(411, "An inference needs its body's length. Expected a Content-Length header. "
                                 "Received: none.", "LENGTH_REQUIRED")
        try:
            size = int(length)
        except ValueError:
            raise HttpError(400, f"Bad Content-Length. Expected a number. Received: {length[:32]!r}.",
                            "BAD_REQUEST") from None
        if size < 0 or size > self.max_body_bytes:
            raise HttpError(413, f"The body is too large. Expected at most {self.max_body_bytes:,} bytes "
                                 f"(LOSSD_MAX_MESSAGE_BYTES). Received: {size:,}.", "REQUEST_TOO_LARGE")
        body = environ["wsgi.input"].read(size)
        if len(body) != size:
            raise HttpError(400, f"The body ended early. Expected {size:,} bytes. Received: {len(body):,}.",
                            "BAD_REQUEST")
        return body

    def _infer(self, environ, name: str, version: str, caller):
        body = self._body(environ)
        header_length = environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH")
        if header_length is not None:
            try:
                split = int(header_length)
            except ValueError:
                split = -1
            if not 0 <= split <= len(body):
                raise HttpError(400, f"Bad {HEADER_LENGTH}. Expected a length within the body's "
                                     f"{len(body):,} bytes. Received: {header_length[:32]!r}.", "BAD_REQUEST")
            head, binary = body[:split], memoryview(body)[split:]
        else:
            head, binary = body, memoryview(b"")
        request = self._json(head, "inference request")
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            raise InvalidArgument("The inference request has no inputs. Expected an object with an `inputs` list. "
                                  f"Received: {type(request).__name__}.", reason="BAD_REQUEST")
        parameters = _object(request.get("parameters"), "parameters")
        inputs, offset = [], 0
        for index, tensor in enumerate(request["inputs"]):
            tensor = _object(tensor, f"inputs[{index}]")
            tensor_name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
            if not isinstance(tensor_name, str) or not isinstance(datatype, str) or not isinstance(shape, list) \
                    or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise InvalidArgument(f"inputs[{index}] needs `name` (a string), `datatype` (a string) and `shape` "
                                      f"(a list of integers). Received: {json.dumps(tensor)[:200]}.",
                                      reason="BAD_TENSOR")
            tensor_parameters = _object(tensor.get("parameters"), f"inputs[{index}].parameters")
            size = tensor_parameters.get("binary_data_size")
            region = oip.region_of(tensor_parameters, f"inputs[{tensor_name[:64]}]")
            if region is not None:
                inputs.append(oip.Input(tensor_name, datatype, shape, values=tensor.get("data"), region=region))
            elif size is not None:
                if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                    raise InvalidArgument(f"inputs[{tensor_name[:64]}]: binary_data_size {size!r} does not fit the "
                                          f"{len(binary):,} bytes after the JSON header.", reason="BAD_TENSOR")
                inputs.append(oip.Input(tensor_name, datatype, shape, raw=binary[offset:offset + size]))
                offset += size
            else:
                inputs.append(oip.Input(tensor_name, datatype, shape, values=_flat(tensor.get("data"), tensor_name)))
        requested, binary_outputs, output_regions = [], set(), {}
        for index, output in enumerate(request.get("outputs") or []):
            output = _object(output, f"outputs[{index}]")
            if not isinstance(output.get("name"), str):
                raise InvalidArgument(f"outputs[{index}] needs a `name`. Received: {json.dumps(output)[:200]}.",
                                      reason="BAD_REQUEST")
            requested.append(output["name"])
            output_parameters = _object(output.get("parameters"), f"outputs[{index}].parameters")
            if output_parameters.get("binary_data"):
                binary_outputs.add(output["name"])
            region = oip.region_of(output_parameters, f"outputs[{output['name'][:64]}]")
            if region is not None:
                output_regions[output["name"]] = region
        all_binary = parameters.get("binary_data_output") is True
        regions = self.shared_memory.access(caller.name, named=True) if self.shared_memory is not None else None
        inference = oip.inference(self.registry, name, version, parameters, inputs, requested,
                                  max_elements=self.service.max_elements, regions=regions,
                                  output_regions=output_regions)
        # No cancellation: a WSGI app learns of no client hanging up.
        result = self.service.evaluate(inference.request, caller)
        outputs, chunks = [], []
        for output_name, array in oip.outputs_of(result, inference.outputs):
            array = np.ascontiguousarray(array)
            entry = {"name": output_name, "datatype": wire.oip_datatype(wire.dtype_enum(array.dtype)),
                     "shape": list(array.shape)}
            ref = inference.output_regions.get(output_name)
            if ref is not None:  # written to the caller's region: no data in the answer
                entry["parameters"] = {oip.SHM_REGION: ref.region, oip.SHM_OFFSET: ref.offset,
                                       oip.SHM_BYTE_SIZE: oip.write_output(regions, output_name, array, ref)}
            elif all_binary or output_name in binary_outputs:
                data = array.tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                chunks.append(data)
            else:
                entry["data"] = array.ravel().tolist()
            outputs.append(entry)
        answer = {"model_name": name, "model_version": version or oip.VERSIONS[0],
                  "parameters": {"non_finite": bool(result.non_finite)}, "outputs": outputs}
        if isinstance(request.get("id"), str):
            answer["id"] = request["id"]
        head = json.dumps(answer).encode()
        if not chunks:
            return 200, [], head
        return 200, [("Content-Type", "application/octet-stream"), (HEADER_LENGTH, str(len(head)))], \
            b"".join([head, *chunks])


def _object(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} is an object. Expected {{...}}. Received: {type(value).__name__}.",
                              reason="BAD_REQUEST")
    return value


def _flat(data, name: str) -> list:
    """JSON tensor data, nested or flat, as one flat list (row-major)."""
    if data is None:
        raise InvalidArgument(f"inputs[{name[:64]}] has no data. Expected `data` or the binary extension's "
                              "`binary_data_size`. Received: neither.", reason="BAD_TENSOR")
    if not isinstance(data, list):
        return [data]
    if data and isinstance(data[0], list):
        flat = []
        stack = [iter(data)]
        while stack:
            item = next(stack[-1], stack)
            if item is stack:
                stack.pop()
            elif isinstance(item, list):
                if len(stack) > wire.MAX_RANK:
                    raise InvalidArgument(f"inputs[{name[:64]}]: data nested deeper than {wire.MAX_RANK}.",
                                          reason="BAD_TENSOR")
                stack.append(iter(item))
            else:
                flat.append(item)
        return flat
    return data


def _tensor_json(tensor: oip.TensorMetadata) -> dict:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


class _QuietHandler(WSGIRequestHandler):
    # A connection that sends nothing gives its thread back after this long.
    timeout = 30

    def log_message(self, format, *args):  # noqa: A002 - the app logs what matters
        pass


class _PooledServer(WSGIServer):
    """Answers on ``threads`` threads; at most ``backlog`` connections wait,
    more are closed at once, so no client makes the server start threads."""

    threads = 4
    backlog = 64
    tls = None

    def server_activate(self):
        super().server_activate()
        self._pool = futures.ThreadPoolExecutor(self.threads, thread_name_prefix="oip-http")
        self._waiting = threading.BoundedSemaphore(self.backlog)

    def get_request(self):
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        # The handshake runs on a pool thread at its first read, never in accept().
        return self.tls.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def process_request(self, request, client_address):
        if not self._waiting.acquire(blocking=False):
            self.shutdown_request(request)
            return
        self._pool.submit(self._handle, request, client_address)

    def _handle(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a failed connection never ends a thread
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._waiting.release()

    def handle_error(self, request, client_address):
        log.debug("OIP REST connection from %s failed", client_address[0], exc_info=True)

    def server_close(self):
        super().server_close()
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=False, cancel_futures=True)


def start_oip_http(app: OipRestApp, host: str, port: int, *, threads: int = 4, tls=None) -> tuple[WSGIServer, int]:
    """Serves ``app`` on ``host:port`` (0: a free port) on ``threads``
    threads, HTTPS only with ``tls`` (a ``ReloadingSSLContext``). Returns
    ``(server, bound_port)``; stop with ``shutdown()`` then ``server_close()``."""
    family = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    server_class = type("OipHTTPServer", (_PooledServer,), {"address_family": family, "threads": threads,
                                                             "tls": tls})
    server = make_server(host.strip("[]"), port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="oip-http", daemon=True).start()
    return server, server.server_port


__all__ = ["OipRestApp", "start_oip_http", "HEADER_LENGTH"]
