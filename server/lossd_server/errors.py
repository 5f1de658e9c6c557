"""Domain errors of lossd's core, independent of gRPC.

Each error carries an UPPER_SNAKE ``reason`` (sent as ``google.rpc.ErrorInfo``)
and a ``kind`` that the transport maps to a status code in one table
(``lossd_server.grpc.status``). Messages say what was expected and what was received.
"""

from __future__ import annotations

import re
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
                 metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}


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


class Unavailable(LossdError):
    kind = "unavailable"
    default_reason = "UNAVAILABLE"
