"""Callers and scopes: bearer tokens checked in one interceptor.

A token is ``lsd_<id>_<secret>``. The tokens file (``--tokens-file``) holds
one JSON object per line: the token's ``id``, its caller ``name``, its
``scopes`` and a salted SHA-256 of the whole token, never the token itself.
The id picks the line, so a check is one hash whatever the number of tokens;
the secret is 32 random bytes, so a fast hash is enough (there is no
password to guess), and the comparison takes constant time.

Scopes: ``evaluate`` (evaluation, ListLosses and shared memory), ``train`` (the training
service) and ``admin`` (registering and deleting losses; every scope's
methods). Health and reflection stay open for probes.

A token may also carry per-caller ``limits`` (``Limits``). Handlers learn who
calls with ``Callers.of(context)``: the token's ``Caller``, or ``ANONYMOUS``
(every scope, no limits) on a server without a tokens file. The interceptor
checks the token once per call and leaves the caller in a context variable
for ``Callers.of``: grpcio runs a call's interceptors and its handler in one
``contextvars.Context`` of its own, so the value is that call's and no other's.

The tokens file is re-read when it changes (``security.reload.FileWatch``,
looked at no more than every ``TOKENS_CHECK_SECONDS``) or after SIGHUP: a
removed token is refused, and a changed scope or limit applies, from the next
call on, within a second. A file that does not parse keeps the tokens loaded
before, with a warning; a reload never opens the server. ``lossd tokens
revoke`` rewrites the file by an atomic replace, so the server never reads it
half written.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import pathlib
import secrets
import tempfile
import threading
from typing import Iterable, Iterator

import grpc

from lossd_server.callers import ANONYMOUS, SCOPES, Caller, Limits
from lossd_server.config import StartupError
from lossd_server.errors import InvalidArgument, LossdError, PermissionDenied, Unauthenticated
from lossd_server.grpc import status
from lossd_server.security.reload import FileWatch

__all__ = ["ANONYMOUS", "SCOPES", "AuthInterceptor", "Caller", "Callers", "Limits", "TokenRecord",
           "authenticated_caller", "create_token", "load_tokens", "required_scope", "revoke_tokens",
           "token_digest"]

log = logging.getLogger(__name__)

TOKEN_PREFIX = "lsd_"
# A call looks at the tokens file's stamp no more often than this: a removed
# token is refused within it (plus a reload's few milliseconds), and the
# other calls pay one clock read.
TOKENS_CHECK_SECONDS = 0.25

# The scope each lossd method needs; admin holds every scope.
_LOSS_SERVICE = "lossd.v1.LossService"
_TRAINING_SERVICE = "lossd.v1.TrainingService"
_SHARED_MEMORY_SERVICE = "lossd.v1.SharedMemoryService"
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
}
# Methods refused at once while their caller is in debt of its rate (an
# EvaluateStream's items are charged one by one, each refusal in its place).
RATED_METHODS = (f"/{_LOSS_SERVICE}/Evaluate", f"/{_LOSS_SERVICE}/EvaluateChunked")
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


def token_digest(salt: bytes, token: str) -> str:
    """The salted SHA-256 of ``token`` that the tokens file stores: the one
    hash a token check computes."""
    return hashlib.sha256(salt + token.encode()).hexdigest()

@dataclasses.dataclass(frozen=True)
class TokenRecord:
    """One line of the tokens file."""

    id: str
    name: str
    scopes: frozenset[str]
    salt: str
    sha256: str
    limits: Limits = Limits()

    @property
    def caller(self) -> Caller:
        return Caller(self.name, self.scopes, self.limits)

    def matches(self, token: str) -> bool:
        return hmac.compare_digest(token_digest(bytes.fromhex(self.salt), token), self.sha256)


def create_token(path: pathlib.Path, name: str, scopes: Iterable[str], limits: Limits = Limits()) -> str:
    """Appends a new token for ``name`` with ``scopes`` and ``limits`` to the
    tokens file (created with mode 0600) and returns the token, which is
    stored nowhere."""
    scopes = sorted(set(scopes))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; received {', '.join(scopes) or 'none'}")
    if not name or not name.isprintable() or len(name) > 64:
        raise ValueError("a token's name is 1 to 64 printable characters")
    ident, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
    token = f"{TOKEN_PREFIX}{ident}_{secret}"
    line = {"id": ident, "name": name, "scopes": scopes, "salt": salt.hex(),
            "sha256": token_digest(salt, token)}
    if limits.to_dict():
        line["limits"] = Limits.from_dict(limits.to_dict()).to_dict()
    with _locked(pathlib.Path(path)) as fd:
        os.write(fd, (json.dumps(line) + "\n").encode())
    return token


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[int]:
    """The tokens file opened for appending (created with mode 0600) under an
    exclusive ``flock``, so ``create_token`` and ``revoke_tokens`` run one
    at a time. Revoking replaces the file, so a writer that got the lock on a
    replaced file opens the new one and locks again."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                yield fd
                return
        finally:
            os.close(fd)  # also releases the lock


def revoke_tokens(path: pathlib.Path, name: str) -> int:
    """Removes every token of the caller ``name`` from the tokens file and
    returns how many were removed. The file is replaced atomically (same
    mode), so a server re-reading it sees the old or the new one, never a
    part; it refuses the removed tokens from the next change check on.

    Raises:
        ValueError: the file holds no token named ``name``.
        StartupError: the file is not a tokens file.
    """
    path = pathlib.Path(path)
    if not path.exists():
        load_tokens(path)  # says what is missing, and creates nothing
    with _locked(path):
        load_tokens(path)  # the whole file parses: nothing is dropped that we could not read
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.strip() or json.loads(line).get("name") != name]
        removed = len(lines) - len(kept)
        if not removed:
            names = sorted({record.name for record in load_tokens(path).values()})
            raise ValueError(f"{path} has no token named {name!r}; it has: {', '.join(names) or 'none'}")
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temporary, path.stat().st_mode & 0o777)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
    return removed


def load_tokens(path: pathlib.Path) -> dict[str, TokenRecord]:
    """The tokens file, by id.

    Raises:
        StartupError: the file is missing or a line is malformed (the line
            number is named; no token is shown).
    """
    records = {}
    try:
        lines = pathlib.Path(path).read_text().splitlines()
    except OSError as exc:
        raise StartupError(f"cannot read the tokens file {pathlib.Path(path).name}: {exc.strerror} "
                           "(set LOSSD_TOKENS_FILE or --tokens-file)") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            record = TokenRecord(str(data["id"]), str(data["name"]), frozenset(data["scopes"]),
                                 str(data["salt"]), str(data["sha256"]), Limits.from_dict(data.get("limits", {})))
            bytes.fromhex(record.salt)
            if not record.scopes <= set(SCOPES):
                raise ValueError("unknown scope")
        except (ValueError, KeyError, TypeError) as exc:
            raise StartupError(f"line {number} of the tokens file is not a token record ({exc}); "
                               "make tokens with `lossd tokens create`") from None
        records[record.id] = record
    return records


class Callers:
    """The one owner of "who is calling": checks bearer tokens against the
    tokens file, or lets everyone in as ``ANONYMOUS`` without one.

    Built with ``from_file`` it re-reads the file when it changes (looked at
    no more than every ``check_seconds``, by whichever call comes first) or
    after ``reload()``.
    """

    def __init__(self, tokens: dict[str, TokenRecord] | None):
        self._tokens = tokens
        self._watch: FileWatch | None = None
        self._path: pathlib.Path | None = None
        self._reloading = threading.Lock()
        self.reloads = 0  # how many times the file was re-read successfully (tests read it)

    @classmethod
    def from_file(cls, path: pathlib.Path, check_seconds: float = TOKENS_CHECK_SECONDS) -> "Callers":
        """Callers of the tokens file ``path``, kept up to date with it.

        Raises:
            StartupError: the file is missing or a line is malformed.
        """
        path = pathlib.Path(path)
        try:
            watch = FileWatch([path], check_seconds)  # stamped before the read: a change meanwhile is seen
        except OSError:
            watch = None  # load_tokens says what is wrong
        callers = cls(load_tokens(path))
        callers._watch, callers._path = watch, path
        return callers

    @property
    def open(self) -> bool:
        return self._tokens is None

    @property
    def tokens(self) -> dict[str, TokenRecord] | None:
        """The tokens by id, re-read first when the file changed."""
        watch = self._watch
        if watch is not None and watch.due():
            self._refresh(watch)
        return self._tokens

    def reload(self) -> None:
        """Re-reads the tokens file at the next call, changed or not (SIGHUP)."""
        if self._watch is not None:
            self._watch.force()

    def _refresh(self, watch: FileWatch) -> None:
        # One thread re-reads; calls arriving meanwhile use the tokens loaded before.
        if not self._reloading.acquire(blocking=False):
            return
        try:
            if not watch.changed():
                return
            try:
                tokens = load_tokens(self._path)
            except StartupError as exc:
                log.warning("tokens file not reloaded, the previous %d token(s) stay: %s", len(self._tokens), exc)
                return
            self._tokens = tokens
            self.reloads += 1
            log.info("tokens file %s reloaded (%d token(s))", self._path.name, len(tokens))
        finally:
            self._reloading.release()

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
        record = None
        if scheme.lower() == "bearer" and token.startswith(TOKEN_PREFIX):
            ident = token[len(TOKEN_PREFIX):].partition("_")[0]
            record = tokens.get(ident)
        if record is None or not record.matches(token):
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
