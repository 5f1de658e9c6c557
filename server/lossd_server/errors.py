"""Domain errors of lossd's core, independent of gRPC.

Each error carries an UPPER_SNAKE ``reason`` (sent as ``google.rpc.ErrorInfo``)
and a ``kind`` that the transport maps to a status code in one table
(``lossd_server.grpc.status``). Messages say what was expected and what was received.
An error that a later retry can get past carries ``retry_delay``, the seconds
to wait (sent as ``google.rpc.RetryInfo``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
from typing import Mapping

DOMAIN = "lossd.dev"

# An absolute POSIX path: a slash that starts a token (not a division inside an
# expression such as ``x/2`` or ``f(x)/y``), then name characters.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.)\]/-])/[^\s/'\":,()\[\]]+(?:/[^\s/'\":,()\[\]]*)*")


def redact_paths(text: str) -> str:
    """``text`` with every absolute filesystem path replaced by ``<path>``:
    messages clients see never show where the server keeps its files."""
    return _ABSOLUTE_PATH.sub("<path>", text)


class LossdError(Exception):
    """Base class: an error whose message is safe to show to the client."""

    kind = "invalid_argument"
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: Mapping[str, str] | None = None, retry_delay: float | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.retry_delay = retry_delay  # seconds; None: no RetryInfo


class InvalidArgument(LossdError):
    """The request is malformed: bad tensor, unknown loss, bad parameter."""


class NotFound(LossdError):
    kind = "not_found"
    default_reason = "NOT_FOUND"


class AlreadyExists(LossdError):
    kind = "already_exists"
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(LossdError):
    kind = "failed_precondition"
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(LossdError):
    kind = "resource_exhausted"
    default_reason = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(LossdError):
    """The server stopped waiting: e.g. a stream idle past the server's limit."""

    kind = "deadline_exceeded"
    default_reason = "DEADLINE_EXCEEDED"


class Unauthenticated(LossdError):
    """The call carries no credentials the server accepts."""

    kind = "unauthenticated"
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(LossdError):
    """The caller is known but may not do this (a scope it lacks)."""

    kind = "permission_denied"
    default_reason = "PERMISSION_DENIED"


class Unavailable(LossdError):
    kind = "unavailable"
    default_reason = "UNAVAILABLE"


# SQLite's primary result code for a full disk or a database at its size limit
# (the low byte of ``sqlite3.Error.sqlite_errorcode``).
SQLITE_FULL = 13


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused for lack of space: ENOSPC or a quota
    from the file system, SQLITE_FULL from the database."""
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(what: str) -> ResourceExhausted:
    """What a client gets when ``what`` could not be written for lack of space
    (RESOURCE_EXHAUSTED, ``DISK_FULL``); the message names no path."""
    return ResourceExhausted(f"The server's disk is full: {what} could not be saved, and nothing of it was kept. "
                             "Expected free space in the server's data directory; retry once some is freed.",
                             reason="DISK_FULL")


def require_free_space(path: os.PathLike, minimum: int, what: str) -> None:
    """Refuses to start writing ``what`` when the file system holding ``path``
    has less than ``minimum`` bytes free for the server (0: never refuses):
    RESOURCE_EXHAUSTED, ``DISK_NEARLY_FULL``, before anything is written, so
    a nearly full disk stops new work while what is stored stays whole. The
    message names no path."""
    if minimum <= 0:
        return
    free = shutil.disk_usage(path).free  # what an unprivileged process may still use
    if free < minimum:
        raise ResourceExhausted(
            f"The server's disk is nearly full: {what} was refused before anything was written. Expected at least "
            f"{minimum:,} bytes free in the server's data directory (min_free_disk_bytes). Received: {free:,} "
            "free; retry once some is freed.", reason="DISK_NEARLY_FULL",
            metadata={"free_bytes": str(free), "min_free_bytes": str(minimum)})
