"""The client's one exception type, translated from gRPC errors in one place."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Mapping, Optional

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from lossd.wire import WireError


class LossdError(Exception):
    """A failed lossd call.

    Attributes:
        code: The ``grpc.StatusCode`` (INVALID_ARGUMENT, NOT_FOUND, ...).
        reason: The server's ``ErrorInfo`` reason, such as ``UNKNOWN_LOSS`` or
            ``SHAPE_MISMATCH``; empty when the call failed before reaching
            lossd (e.g. UNAVAILABLE, DEADLINE_EXCEEDED), or ``CLIENT`` for
            input the client refused before sending.
        message: What was expected and what was received.
        metadata: The ``ErrorInfo`` metadata (e.g. ``{"loss": "huberr"}``).
        retry_delay: Seconds the server asks to wait before retrying (its
            ``google.rpc.RetryInfo``), e.g. on RESOURCE_EXHAUSTED with reason
            ``CALLER_RATE_LIMIT``, ``QUEUE_FULL`` or ``INFLIGHT_BYTES_FULL``;
            None when the server did not say a retry can succeed.
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "",
                 metadata: Optional[Mapping[str, str]] = None, retry_delay: Optional[float] = None):
        super().__init__(f"{code.name}{f' {reason}' if reason else ''}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.retry_delay = retry_delay


def client_error(message: str, reason: str = "CLIENT") -> LossdError:
    """An INVALID_ARGUMENT raised locally, before anything is sent."""
    return LossdError(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


def unavailable_hint(address: str, details: str) -> str:
    """The message for an UNAVAILABLE call to ``address``: the likely cause,
    read from gRPC's own ``details``, what to check, then those details.

    A failed TLS handshake, a certificate for another name and a refused
    connection all reach the client as UNAVAILABLE; each gets its own cause
    rather than one "is lossd serve running there?"."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    if "Failed parsing HTTP/2" in details:
        cause = (f"{address} answers in HTTP/1, not gRPC: it is probably the metrics port. Expected the "
                 "address of lossd's gRPC port (`lossd serve --port`, 50051 by default).")
    elif "Hostname Verification" in details or "No match found for server name" in details:
        cause = (f"The server at {address} presents a TLS certificate that does not name {host}. Expected a "
                 "certificate whose subject alternative names include the host you connect to: connect by a "
                 f"name it lists, or issue it for {host} (`lossd secrets init --host {host}`).")
    elif "CERTIFICATE_VERIFY_FAILED" in details:
        cause = (f"The server at {address} presents a TLS certificate that the client does not trust. Expected "
                 "a certificate signed by the CA the client is given (`tls=lossd.TLS(ca=...)`, `--tls-ca`, "
                 "LOSSD_TLS_CA) or by the system's roots, and not expired.")
    elif "WRONG_VERSION_NUMBER" in details or "TSI_PROTOCOL_FAILURE" in details:
        cause = (f"The server at {address} does not speak TLS: the TLS handshake got a plain-text answer. "
                 "Expected a server started with a certificate (LOSSD_TLS_CERT), or connect without TLS "
                 "(no `tls=`, no `--tls`).")
    elif "Socket closed" in details:
        cause = (f"The server at {address} closed the connection during set-up, as a TLS server does to a "
                 "plain-text client. Expected `tls=True` or `tls=lossd.TLS(ca=...)` (`--tls`, `--tls-ca`) "
                 "for a server with TLS.")
    elif "Connection refused" in details:
        cause = (f"Nothing listens at {address} (connection refused). Expected `lossd serve` running there, "
                 "on that port (50051 by default).")
    else:
        cause = f"Cannot reach a lossd server at {address}: is `lossd serve` running there?"
    return f"{cause} Received: {details}"


def from_rpc_error(error: grpc.RpcError, address: Optional[str] = None) -> LossdError:
    """Translates a ``grpc.RpcError`` (sync or aio) into a LossdError; an
    UNAVAILABLE one says which ``address`` was tried and what to check."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    details: dict = {}
    status = _rich_status(error)
    if status is not None:
        message = status.message
        details = _details(status)
    if code == grpc.StatusCode.UNAVAILABLE and address and not details.get("reason"):
        message = unavailable_hint(address, message or "")
    return LossdError(code, message or "", **details)


def status_error(status) -> LossdError:
    """A LossdError from a ``google.rpc.Status`` message (per-item stream errors)."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return LossdError(code, status.message, **_details(status))


def _details(status) -> dict:
    """The ``reason``, ``metadata`` and ``retry_delay`` a rich status carries
    (its ErrorInfo and RetryInfo details)."""
    found: dict = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.update(reason=info.reason, metadata=dict(info.metadata))
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9
    return found


def _rich_status(error):
    try:
        return rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        # from_call needs trailing metadata; aio errors expose it differently.
        trailing = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
        for key, value in trailing or ():
            if key == "grpc-status-details-bin":
                from google.rpc import status_pb2

                return status_pb2.Status.FromString(value)
        return None


def as_lossd_error(error: BaseException, address: Optional[str] = None) -> LossdError:
    """The LossdError for a gRPC failure or for input ``lossd.wire`` refused
    locally; ``address`` is the server the client called."""
    if isinstance(error, LossdError):
        return error
    if isinstance(error, WireError):
        return client_error(str(error), error.reason)
    return from_rpc_error(error, address)


def _address(args) -> Optional[str]:
    """The server address of a decorated method's client (its ``self``)."""
    address = getattr(args[0], "address", None) if args else None
    return address if isinstance(address, str) else None


TRANSLATED = (grpc.RpcError, WireError)


def translate_errors(method):
    """Decorates a sync client method, or a generator method, so every failure
    leaves it as one LossdError: gRPC errors, and input the wire codec refused
    before sending."""
    if inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method):
        raise TypeError(f"{method.__qualname__} is async: use translate_errors_async")
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def generator_wrapper(*args, **kwargs):
            try:
                return (yield from method(*args, **kwargs))
            except TRANSLATED as error:
                raise as_lossd_error(error, _address(args)) from None
        return generator_wrapper

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except TRANSLATED as error:
            raise as_lossd_error(error, _address(args)) from None
    return wrapper


def translate_errors_async(method):
    """``translate_errors`` for the asyncio client: decorates a coroutine
    method, or an async generator method."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def generator_wrapper(*args, **kwargs):
            # aclosing: a caller that stops early closes the inner generator
            # now (its finally blocks cancel the call), not at garbage collection.
            async with contextlib.aclosing(method(*args, **kwargs)) as items:
                try:
                    async for item in items:
                        yield item
                except TRANSLATED as error:
                    raise as_lossd_error(error, _address(args)) from None
        return generator_wrapper
    if not inspect.iscoroutinefunction(method):
        raise TypeError(f"{method.__qualname__} is not async: use translate_errors")

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except TRANSLATED as error:
            raise as_lossd_error(error, _address(args)) from None
    return wrapper
