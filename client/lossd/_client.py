"""The synchronous lossd client."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import os
import pathlib
import sys
import threading
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import grpc

from lossd import _chunks, _requests, _shm, wire
from lossd._errors import LossdError, client_error, translate_errors
from lossd._requests import EvaluateResult, LossInfo, LossLike
from lossd._monitors import MonitorMixin
from lossd._training import TrainingMixin
from lossd.v1 import loss_service_pb2, loss_service_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
DEFAULT_CHUNK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class TLS:
    """How a client checks the server over TLS, and proves itself for mTLS.

    Attributes:
        ca: PEM file of the CA certificates that signed the server's
            certificate; None trusts the system's roots.
        cert: PEM certificate chain of the client, for a server that asks
            for one (mTLS); with ``key``.
        key: PEM private key of ``cert``.
    """

    ca: Optional[Union[str, os.PathLike]] = None
    cert: Optional[Union[str, os.PathLike]] = None
    key: Optional[Union[str, os.PathLike]] = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials (the files are read now)."""
        if (self.cert is None) != (self.key is None):
            raise client_error("TLS: cert and key go together. Expected both or neither. "
                               f"Received: {'cert' if self.cert is not None else 'key'} only.")

        def read(path):
            return None if path is None else pathlib.Path(path).read_bytes()

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.key),
                                            certificate_chain=read(self.cert))


def _trace_context() -> list[tuple[str, str]]:
    """The caller's current OpenTelemetry context as W3C ``traceparent`` (and
    ``tracestate``) metadata, so the server's span joins the caller's trace.
    Empty unless the application has imported OpenTelemetry: lossd does not
    depend on it, and a process that never imported it has no span to carry."""
    if "opentelemetry.propagate" not in sys.modules and "opentelemetry.trace" not in sys.modules:
        return []
    try:
        from opentelemetry import propagate
    except ImportError:  # pragma: no cover - a half-installed OpenTelemetry
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


class _ChannelOwner:
    """What the sync and asyncio clients share: settings, the channel, call
    arguments, and the requests that depend on the settings. The two clients
    differ only in how they wait for the stub's answers."""

    _secure_channel = staticmethod(grpc.secure_channel)
    _insecure_channel = staticmethod(grpc.insecure_channel)
    _shared_memory_supported = True

    def __init__(self, address: Union[str, Sequence[str]] = DEFAULT_ADDRESS, *, timeout: Optional[float] = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 metadata: Optional[Iterable[tuple[str, str]]] = None, tls: Union[bool, TLS, None] = None,
                 token: Optional[str] = None, options: Optional[Iterable[tuple[str, Any]]] = None,
                 shared_memory: bool = False, shared_memory_min_bytes: int = _shm.DEFAULT_MIN_BYTES,
                 connections: int = 1):
        if isinstance(connections, bool) or not isinstance(connections, int) or not 1 <= connections <= 256:
            raise client_error(f"Invalid connections. Expected an int from 1 to 256. Received: {connections!r}.")
        if shared_memory and not self._shared_memory_supported:
            raise client_error("shared_memory is available on lossd.Client only, not yet on lossd.aio.Client.")
        if tls:
            if credentials is not None:
                raise client_error("Set tls or credentials, not both.")
            credentials = (TLS() if tls is True else tls).credentials()
        address, options = channel_target(address, max_message_bytes, options)
        self.address = address
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = min(chunk_bytes, max_message_bytes // 2)
        self.metadata = list(metadata or ())
        if token:
            self.metadata.append(("authorization", f"Bearer {token}"))
        if connections > 1:
            # Channels with equal arguments share gRPC's global subchannel
            # pool, hence one TCP connection: a local pool each makes each
            # channel connect on its own (to any process of the server).
            options = [*options, ("grpc.use_local_subchannel_pool", 1)]
        self._channels = [self._secure_channel(address, credentials, options) if credentials
                          else self._insecure_channel(address, options) for _ in range(connections)]
        # The first channel carries what holds state in one server process
        # (shared-memory sessions) and the calls that are not evaluations.
        self._channel = self._channels[0]
        self._losses = loss_service_pb2_grpc.LossServiceStub(self._channel)
        # Evaluations take the channels in turn: (stub, Evaluate with a request
        # serialized by hand, _requests.evaluate_request_bytes, its answer read in
        # place, _requests.parse_response_bytes) per channel.
        self._evaluators = [
            (self._losses if channel is self._channel else loss_service_pb2_grpc.LossServiceStub(channel),
             channel.unary_unary("/lossd.v1.LossService/Evaluate", request_serializer=None,
                                 response_deserializer=None))
            for channel in self._channels]
        self._turn = itertools.count()  # next() on it is atomic under the GIL: no lock per call
        self._shared_memory = (_shm.SharedMemoryPath(self._channel, address, self.metadata or None,
                                                     shared_memory_min_bytes) if shared_memory else None)

    @property
    def shared_memory_active(self) -> bool:
        """Whether evaluations go through shared memory now: asked for, the
        server is local and the handshake proved it maps the client's memory
        (it happens at the first evaluation large enough to use it)."""
        return self._shared_memory is not None and self._shared_memory.active

    def _next_evaluator(self) -> tuple:
        """The (stub, serialized Evaluate) of the channel whose turn it is."""
        evaluators = self._evaluators
        return evaluators[next(self._turn) % len(evaluators)] if len(evaluators) > 1 else evaluators[0]

    def _call_args(self, timeout: Optional[float]) -> dict:
        metadata = self.metadata
        trace = _trace_context()
        if trace:
            metadata = [*metadata, *trace]
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": metadata or None}

    def _evaluate_call(self, loss, y_true, y_pred, params, sample_weight, reduction, gradient, tensors
                       ) -> tuple[Union[bytes, Iterator], Optional[_chunks.ChunkAssembler]]:
        """What ``evaluate`` sends: one serialized EvaluateRequest and no assembler or, for
        tensors larger than one message, the EvaluateChunked requests and the
        assembler of their answers."""
        spec = wire.spec_from_dict(loss, params)
        arrays = _requests.prepare(y_true, y_pred, sample_weight, tensors)
        return self._evaluate_messages(spec, arrays, reduction, gradient)

    def _evaluate_messages(self, spec, arrays, reduction, gradient
                           ) -> tuple[Union[bytes, Iterator], Optional[_chunks.ChunkAssembler]]:
        if not _chunks.needs_chunks(arrays, self.max_message_bytes):
            return _requests.evaluate_request_bytes(spec, arrays, reduction, gradient), None
        requests = _chunks.chunked_requests(spec, arrays, reduction, gradient, self.chunk_bytes)
        # Build the header here, so a local refusal raises in the caller's
        # code rather than inside gRPC's reading of the requests.
        requests = itertools.chain([next(requests)], requests)
        return requests, _chunks.ChunkAssembler(arrays["y_pred"], gradient, arrays["y_true"])

    def _stream_request(self, item: Mapping[str, Any]) -> loss_service_pb2.EvaluateRequest:
        """One ``evaluate_many`` request as a message; one too large for a
        message is refused (``evaluate`` sends such tensors in chunks)."""
        args = _requests.stream_arguments(item)
        spec = wire.spec_from_dict(args["loss"], args["params"])
        arrays = _requests.prepare(args["y_true"], args["y_pred"], args["sample_weight"], args["tensors"])
        if _chunks.needs_chunks(arrays, self.max_message_bytes):
            raise client_error(f"Too large for one message of the stream ({self.max_message_bytes:,} bytes at "
                               f"most). Expected smaller tensors; evaluate() sends larger ones in chunks. Received: "
                               f"{sum(a.nbytes for a in arrays.values()):,} bytes of tensors.", "TENSOR_TOO_LARGE")
        return _requests.evaluate_request(spec, arrays, args["reduction"], args["gradient"])


def channel_target(address: Union[str, Sequence[str]], max_message_bytes: int,
                   options: Optional[Iterable[tuple[str, Any]]]) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target and channel options a client's arguments describe.

    Several ``host:port`` addresses become one ``ipv4:``/``ipv6:`` target
    spread by ``round_robin`` (gRPC lists several addresses only as IP
    literals; name a set of replicas with ``dns:///name:port`` instead). The
    caller's ``options`` come first: gRPC takes the first of repeated keys,
    so they win over lossd's defaults.
    """
    options = list(options or ())
    defaults = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
    if isinstance(address, str):
        return address, options + defaults
    addresses = list(address)
    if len(addresses) == 1:
        return addresses[0], options + defaults
    families = set()
    for item in addresses:
        host, _, port = str(item).rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise client_error(f"Several addresses must be IP literals, like 10.0.0.1:50051 or [::1]:50051. "
                               f"Received: {item!r}. Name replicas by DNS with one 'dns:///host:port' address "
                               "and options=[('grpc.lb_policy_name', 'round_robin')].") from None
        if not port.isdigit():
            raise client_error(f"Expected host:port. Received: {item!r}.")
    if not addresses or len(families) > 1:
        raise client_error(f"Expected one or more addresses of one IP family. Received: {addresses!r}.")
    target = f"ipv{families.pop()}:" + ",".join(addresses)
    return target, options + defaults + [("grpc.lb_policy_name", "round_robin")]


def _chunked_result(assembler: _chunks.ChunkAssembler) -> EvaluateResult:
    if assembler.result is None:
        raise LossdError(grpc.StatusCode.INTERNAL, "the server ended the stream without a summary")
    return assembler.result


class Client(_ChannelOwner, TrainingMixin, MonitorMixin):
    """A connection to a lossd server.

    Args:
        address: ``host:port`` of the server.
        timeout: Default deadline in seconds for each call (None: no deadline).
        max_message_bytes: Largest message sent or received; larger tensors
            are sent in chunks automatically. Match the server's
            ``max_message_bytes``.
        chunk_bytes: Size of each chunk when chunking.
        credentials: ``grpc.ChannelCredentials`` for TLS; None for plaintext.
        metadata: Extra call metadata, e.g. ``[("x-request-id", "abc")]``.
        tls: ``True`` for TLS checked against the system's roots, or a
            ``lossd.TLS(ca=..., cert=..., key=...)`` (a private CA, and a
            client certificate for mTLS); instead of ``credentials``.
        token: A bearer token (``lossd tokens create``), for a server with a
            tokens file.
        options: gRPC channel options, passed through after lossd's own
            (which they override): keepalive, ``grpc.lb_policy_name``, or
            retries as ``("grpc.service_config", json.dumps({...}))``.
        shared_memory: Hand tensors over through POSIX shared memory when
            the server is on this host: the address is loopback (or a unix
            socket) and the server proves it maps the client's regions.
            Otherwise, or when it fails, the client uses gRPC. Regions are
            unlinked on ``close()``, and by the server if the client dies.
            See the README, "Shared memory".
        shared_memory_min_bytes: Requests with fewer tensor bytes go over
            gRPC even with ``shared_memory``.
        connections: How many channels, each its own TCP connection, to open
            to ``address``. Evaluations (``evaluate``, and each
            ``evaluate_many`` stream) take them in turn, so a server of
            several processes (``lossd serve --processes N``) serves one
            client's calls in all of them: one HTTP/2 connection stays with
            one process. Everything else (losses, training, and the
            shared-memory session with the evaluations it carries) uses the
            first. See docs/scaling.md.

    ``address`` may be a list of ``ip:port`` replicas, which calls are spread
    over (``round_robin``); a ``dns:///host:port`` address with
    ``options=[("grpc.lb_policy_name", "round_robin")]`` spreads over every
    address the name resolves to.

    Example:

    >>> with lossd.Client("localhost:50051") as client:
    ...     r = client.evaluate("huber", y_true, y_pred, params={"delta": 2.0}, gradient=True)
    ...     r.loss, r.gradient.shape
    """

    @translate_errors
    def losses(self, *, timeout: Optional[float] = None) -> list[LossInfo]:
        """Every loss the server can evaluate, with parameters (name, type, default, doc)."""
        return _requests.loss_infos(self._losses.ListLosses(loss_service_pb2.ListLossesRequest(),
                                                            **self._call_args(timeout)))

    @translate_errors
    def register_loss(self, name: str, expression: str, *, params: Optional[Mapping[str, float]] = None,
                      inputs: Optional[Iterable[str]] = None, doc: str = "", replace: bool = False,
                      timeout: Optional[float] = None) -> LossInfo:
        """Registers a named expression loss on the server (kept across restarts).

        Args:
            name: A lowercase identifier, not a built-in loss's name.
            expression: The loss in lossd's expression language, e.g.
                ``"mean(where(abs(y_true - y_pred) <= delta, ...), axis=-1)"``.
            params: Parameter names with their default values.
            inputs: The tensors it reads, in order (default ``["y_true", "y_pred"]``).
            doc: A one-line description.
            replace: Overwrite a registered loss of the same name.
        """
        request = _requests.register_loss_request(name, expression, params, inputs, doc, replace)
        return _requests.loss_info(self._losses.RegisterLoss(request, **self._call_args(timeout)))

    @translate_errors
    def delete_loss(self, name: str, *, timeout: Optional[float] = None) -> None:
        """Deletes a registered expression loss."""
        self._losses.DeleteLoss(loss_service_pb2.DeleteLossRequest(name=name), **self._call_args(timeout))

    @translate_errors
    def evaluate(self, loss: LossLike, y_true, y_pred, *, params: Optional[Mapping[str, Any]] = None,
                 sample_weight=None, reduction: str = "sum_over_batch_size", gradient: bool = False,
                 tensors: Optional[Mapping[str, Any]] = None, timeout: Optional[float] = None) -> EvaluateResult:
        """Evaluates a loss, as ``keras.losses.get(loss)(y_true, y_pred, sample_weight)`` would.

        Args:
            loss: A registered name (``"huber"``, ``"mse"``), a dict
                ``{"name": ..., "params": {...}}``, ``{"expression": ..., "params": {...}}``
                or a composite ``{"terms": [{"name": ..., "weight": ..., "inputs": [...]}, ...]}``.
            y_true: Targets; integer labels are cast as Keras casts them.
            y_pred: Predictions (float16/32/64); the loss is computed in their dtype.
            params: Loss parameters under Keras's names (merged into ``loss``'s).
            sample_weight: Optional weights broadcastable to the per-sample losses.
            reduction: ``none``, ``sum``, ``sum_over_batch_size`` (default),
                ``mean`` or ``mean_with_sample_weight``.
            gradient: Also return d(loss)/d(y_pred).
            tensors: Extra named tensors for composite terms and expressions.
            timeout: Deadline in seconds for this call.

        Returns:
            An EvaluateResult; ``loss`` is 0-d when reduced.

        Raises:
            LossdError: with ``.code``, ``.reason`` and ``.message``.
        """
        spec = wire.spec_from_dict(loss, params)
        arrays = _requests.prepare(y_true, y_pred, sample_weight, tensors)
        if self._shared_memory is not None:
            result = self._shared_memory.evaluate(spec, arrays, reduction, gradient, self._call_args(timeout))
            if result is not None:
                return result
        request, assembler = self._evaluate_messages(spec, arrays, reduction, gradient)
        stub, evaluate_serialized = self._next_evaluator()
        if assembler is None:
            return _requests.parse_response_bytes(evaluate_serialized(request, **self._call_args(timeout)))
        for message in stub.EvaluateChunked(request, **self._call_args(timeout)):
            assembler.add(message)
        return _chunked_result(assembler)

    @translate_errors
    def evaluate_many(self, requests: Iterable[Mapping[str, Any]], *, timeout: Optional[float] = None
                      ) -> Iterator[EvaluateResult | LossdError]:
        """Evaluates many requests on one stream (higher throughput than one call each).

        Each request is a dict of ``evaluate``'s arguments (``loss``, ``y_true``,
        ``y_pred``, ``params``, ...). They are read from ``requests`` one at a
        time as the stream has room for them, so a generator of any length
        works in flat memory. Yields, in order, an EvaluateResult or the
        LossdError of a request that failed (locally or on the server); the
        stream goes on after a failure.
        """
        stream = _requests.EvaluationStream(requests, self._stream_request)
        window = threading.Semaphore(_requests.STREAM_WINDOW)

        def messages():  # gRPC reads these on a thread of its own
            for message in stream.messages():
                window.acquire()
                yield message

        call = self._next_evaluator()[0].EvaluateStream(messages(), **self._call_args(timeout))
        try:
            for answer in call:
                window.release()
                yield from stream.answer(answer)
            yield from stream.finish()
        finally:
            # A caller that stops early ends the call, and frees gRPC's thread
            # if it waits for room in the window.
            call.cancel()
            window.release(_requests.STREAM_WINDOW)

    def close(self) -> None:
        """Closes the channels (and unlinks the shared-memory regions, if any)."""
        if self._shared_memory is not None:
            self._shared_memory.close()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
