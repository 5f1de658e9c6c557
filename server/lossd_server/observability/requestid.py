"""The id of the request being served, for logs: taken from the client's
``x-request-id`` metadata or made up, and kept in a context variable.

A call's id is made only when something reads it (a log line, an INTERNAL
status): the interceptor stores the call's metadata (``call_request_id``),
and ``current_request_id`` cleans the client's id, or draws a new one, on its
first read. A call that logs nothing pays for neither.

The same object is the call's one context variable: it also carries what
counts the call's refusals (``refusal_counter``, read where statuses are
made), so a call sets and resets one context variable, not one per concern."""

from __future__ import annotations

import contextvars
import uuid
from typing import Callable, Optional

METADATA_KEY = "x-request-id"


class _CallRequestId:
    """A call's request id, made from its metadata when first read, and the
    call's refusal counter (see the module's docstring)."""

    __slots__ = ("metadata", "value", "count_refusal")

    def __init__(self, metadata, count_refusal=None):
        self.metadata = metadata
        self.value = None
        self.count_refusal = count_refusal

    def get(self) -> str:
        value = self.value
        if value is None:
            sent = None
            for key, item in self.metadata or ():
                if key == METADATA_KEY:
                    sent = item
                    break
            # Two threads of one streaming call may race here; both make an
            # id and one is kept: every read after that sees the same one.
            value = self.value = clean_request_id(sent)
        return value


_request_id: contextvars.ContextVar = contextvars.ContextVar("lossd_request_id", default="-")


def current_request_id() -> str:
    value = _request_id.get()
    return value if value.__class__ is str else value.get()


def clean_request_id(value: str | None) -> str:
    """The client's id, bounded (it ends up in every log line), or a new one."""
    value = "".join(ch for ch in (value or "")[:64] if ch.isprintable())
    return value or uuid.uuid4().hex[:16]


def call_request_id(metadata, count_refusal: Optional[Callable[[str], None]] = None) -> _CallRequestId:
    """The request id of a call with this invocation metadata, unmade yet,
    and ``count_refusal(reason)``, which counts the RESOURCE_EXHAUSTED
    statuses made for the call: pass it to ``set_request_id``."""
    return _CallRequestId(metadata, count_refusal)


def refusal_counter() -> Optional[Callable[[str], None]]:
    """What counts the current call's refusals (``call_request_id``), or None."""
    value = _request_id.get()
    return None if value.__class__ is str else value.count_refusal


def set_request_id(value) -> contextvars.Token:
    """Makes ``value`` (a string, or a ``call_request_id``) the current id."""
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)
