"""Callers and scopes: bearer tokens checked in one interceptor.

The tokens, their file and its reloading are ``lossd_server.security.tokens``;
this module is their gRPC side: which scope each method needs, the
interceptor that checks each call's token before its handler runs, and
``Callers``, which tells a handler who calls.

Scopes: ``evaluate`` (evaluation, ListLosses and shared memory), ``train`` (the training
service) and ``admin`` (registering and deleting losses; every scope's
methods). Health and reflection stay open for probes.

A token may also carry per-caller ``limits`` (``Limits``). Handlers learn who
calls with ``Callers.of(context)``: the token's ``Caller``, or ``ANONYMOUS``
(every scope, no limits) on a server without a tokens file. The interceptor
checks the token once per call and leaves the caller in a context variable
for ``Callers.of``: grpcio runs a call's interceptors and its handler in one
``contextvars.Context`` of its own, so the value is that call's and no other's.

A removed token is refused, and a changed scope or limit applies, from the
next call on, within a second (``security.tokens.tokens_file``).
"""

from __future__ import annotations

import contextvars
import pathlib

import grpc

from lossd_server.callers import ANONYMOUS, Caller
from lossd_server.errors import InvalidArgument, LossdError, PermissionDenied, Unauthenticated
from lossd_server.grpc import status
from lossd_server.security.reload import Reloader
from lossd_server.security.tokens import TOKENS_CHECK_SECONDS, TokenRecord, find_token, tokens_file

__all__ = ["AuthInterceptor", "Callers", "authenticated_caller", "required_scope"]

# The scope each lossd method needs; admin holds every scope.
_LOSS_SERVICE = "lossd.v1.LossService"
_TRAINING_SERVICE = "lossd.v1.TrainingService"
_SHARED_MEMORY_SERVICE = "lossd.v1.SharedMemoryService"
_OIP_SERVICE = "inference.GRPCInferenceService"
METHOD_SCOPES = {
    f"/{_LOSS_SERVICE}/ListLosses": "evaluate",
    f"/{_LOSS_SERVICE}/Evaluate": "evaluate",
    f"/{_LOSS_SERVICE}/EvaluateStream": "evaluate",
    f"/{_LOSS_SERVICE}/EvaluateChunked": "evaluate",
    f"/{_LOSS_SERVICE}/RegisterLoss": "admin",
    f"/{_LOSS_SERVICE}/DeleteLoss": "admin",
    f"/{_SHARED_MEMORY_SERVICE}/OpenSession": "evaluate",
    f"/{_SHARED_MEMORY_SERVICE}/RegisterRegion": "evaluate",
    f"/{_SHARED_MEMORY_SERVICE}/UnregisterRegion": "evaluate",
    f"/{_SHARED_MEMORY_SERVICE}/CloseSession": "evaluate",
    # The Open Inference Protocol (grpc/oip_servicer.py): every method evaluates or describes losses.
    **{f"/{_OIP_SERVICE}/{method}": "evaluate" for method in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister")},
}
# Methods refused at once while their caller is in debt of its rate (an
# EvaluateStream's items are charged one by one, each refusal in its place).
RATED_METHODS = (f"/{_LOSS_SERVICE}/Evaluate", f"/{_LOSS_SERVICE}/EvaluateChunked", f"/{_OIP_SERVICE}/ModelInfer")
# Refused at once, too, while its caller is at its share of the evaluation
# slots with its queue full (Admission.refuse_at_share).
_EVALUATE = f"/{_LOSS_SERVICE}/Evaluate"
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")

# The caller AuthInterceptor found for the call running in this context, beside that call's
# metadata object: grpcio gives each call a fresh contextvars.Context for its interceptors and
# handler, and Callers.of also checks that the metadata is its own call's (the same object), so
# a caller can never pass to another call even if a context were shared.
_CALLER: contextvars.ContextVar[tuple[object, Caller] | None] = contextvars.ContextVar("lossd_caller", default=None)


class Callers:
    """The one owner of "who is calling": checks bearer tokens against the
    tokens file, or lets everyone in as ``ANONYMOUS`` without one.

    Built with ``from_file`` it re-reads the file when it changes (looked at
    no more than every ``check_seconds``, by whichever call comes first) or
    after ``reload()``.

    Args:
        tokens: The tokens by id; None for a server without tokens, whose
            every caller is ``ANONYMOUS``.
        file: The tokens file they came from (``security.tokens.tokens_file``),
            read again when it changes; None keeps ``tokens`` as they are.
    """

    def __init__(self, tokens: dict[str, TokenRecord] | None, file: Reloader | None = None):
        self._tokens = tokens
        self._file = file

    @classmethod
    def from_file(cls, path: pathlib.Path, check_seconds: float = TOKENS_CHECK_SECONDS) -> "Callers":
        """Callers of the tokens file ``path``, kept up to date with it.

        Raises:
            StartupError: the file is missing or a line is malformed.
        """
        file = tokens_file(path, check_seconds)
        return cls(file.value, file)

    @property
    def open(self) -> bool:
        """Whether the server has no tokens: every caller is ``ANONYMOUS``."""
        return self._tokens is None

    @property
    def tokens(self) -> dict[str, TokenRecord] | None:
        """The tokens by id, re-read first when the file changed; a call
        that comes while another thread re-reads uses those loaded before."""
        if self._file is not None:
            return self._file.current(wait=False)
        return self._tokens

    @property
    def reloads(self) -> int:
        """How many times the file was re-read successfully (tests read it)."""
        return self._file.loads - 1 if self._file is not None else 0

    def reload(self) -> None:
        """Re-reads the tokens file at the next call, changed or not (SIGHUP)."""
        if self._file is not None:
            self._file.reload()

    def of(self, context) -> Caller:
        """The caller of a call whose token ``AuthInterceptor`` let through:
        the one it found, or, for a handler called without it, the caller its
        metadata's token names."""
        if self._tokens is None:
            return ANONYMOUS
        metadata = context.invocation_metadata()
        found = _CALLER.get()
        if found is not None and found[0] is metadata:
            return found[1]
        return self.check(metadata)

    def check(self, metadata) -> Caller:
        """The caller that ``metadata``'s bearer token names.

        Raises:
            Unauthenticated: no ``authorization`` metadata, or a token the
                file does not hold.
        """
        tokens = self.tokens  # one snapshot for the whole check
        if tokens is None:
            return ANONYMOUS
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            raise Unauthenticated("This server needs a token. Expected `authorization: Bearer <token>` "
                                  "metadata (lossd.Client(token=...), --token or LOSSD_TOKEN). Received: none.",
                                  reason="UNAUTHENTICATED")
        scheme, _, token = str(values[0]).partition(" ")
        record = find_token(tokens, token) if scheme.lower() == "bearer" else None
        if record is None:
            raise Unauthenticated("The token is not valid on this server. Expected a token that "
                                  "`lossd tokens create` made for it. Received: an unknown token.",
                                  reason="BAD_TOKEN")
        return record.caller


def authenticated_caller(metadata) -> Caller | None:
    """The caller whose token ``AuthInterceptor`` accepted for the running
    call (the one whose metadata object is ``metadata``), or None: a server
    without tokens, an open service (health, reflection), or a refused call."""
    found = _CALLER.get()
    return found[1] if found is not None and found[0] is metadata else None


def required_scope(method: str) -> str:
    """The scope a lossd method needs (admin for anything not listed)."""
    return METHOD_SCOPES.get(method) or ("train" if method.startswith(f"/{_TRAINING_SERVICE}/") else "admin")


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks each call's bearer token and scope before its handler runs.

    No ``authorization`` metadata, or a token the file does not hold, is
    UNAUTHENTICATED; a token without the method's scope is PERMISSION_DENIED
    (``MISSING_SCOPE``, naming it).
    """

    def __init__(self, callers: Callers, admission=None):
        self.callers = callers
        # evaluation.admission.Admission: a caller in debt of its rate, or at its share of the
        # evaluation slots with its queue full, is refused here, before its request is read.
        self.admission = admission

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
            return continuation(handler_call_details)
        needed = required_scope(method)
        try:
            caller = self.callers.check(handler_call_details.invocation_metadata)
            if needed not in caller.scopes and not caller.admin:
                raise PermissionDenied(
                    f"{method.lstrip('/')} needs the scope `{needed}`. Expected a token with it. Received: a "
                    f"token of {caller.name!r} with {', '.join(sorted(caller.scopes))}.", reason="MISSING_SCOPE",
                    metadata={"scope": needed, "caller": caller.name})
            slot_first = False
            if self.admission is not None and method in RATED_METHODS:
                self.admission.refuse_in_debt(caller.name, caller.limits.elements_per_second)
                if method == _EVALUATE:
                    self.admission.refuse_at_share(caller.name)
                    slot_first = self.admission.busy(caller.name)
        except LossdError as error:
            handler = continuation(handler_call_details)
            return None if handler is None else _refusing(handler, error)
        _CALLER.set((handler_call_details.invocation_metadata, caller))  # for Callers.of: one hash per call
        handler = continuation(handler_call_details)
        if slot_first and handler is not None:
            # A caller with evaluations in flight takes this one's slot before
            # its message is read: at most its share of its requests are being
            # received and parsed. A caller's first goes the usual way.
            return _slot_first(handler, self.admission, caller.name)
        return handler


def _slot_first(handler, admission, caller: str):
    """Evaluate's handler as a request-streaming one that takes its caller's
    evaluation slot (``Admission.slot_first``, which may wait or refuse)
    before it reads the one request, and gives it back when the call ends.
    Request-streaming, as ``_refusing``: gRPC reads a unary request in full
    before it calls a unary handler."""
    unary = handler.unary_unary

    def evaluate(requests, context):
        try:
            held = admission.slot_first(caller, context.time_remaining())
        except LossdError as error:
            status.abort(context, error)
        with held:
            for request in requests:
                return unary(request, context)
        status.abort(context, InvalidArgument("Evaluate takes one request message. Received: none.",
                                              reason="BAD_REQUEST"))

    return grpc.stream_unary_rpc_method_handler(evaluate, request_deserializer=handler.request_deserializer,
                                                response_serializer=handler.response_serializer)


def _refusing(handler, error: LossdError):
    """A handler that ends the call with ``error`` without reading its request.

    It is a request-streaming handler whatever the method's shape: gRPC reads
    a unary request in full before calling a unary handler, while a streaming
    one reads only what it iterates. A refused caller (no token, no scope,
    in debt) so cannot make the server receive and parse a large message;
    the client sees the status either way.
    """
    def refuse(requests, context):
        status.abort(context, error)

    def refuse_stream(requests, context):
        status.abort(context, error)
        yield  # pragma: no cover - abort raised

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer,
                                                response_serializer=handler.response_serializer)
