"""The id of the request being served, for logs: taken from the client's
``x-request-id`` metadata or made up, and kept in a context variable."""

from __future__ import annotations

import contextvars
import uuid

METADATA_KEY = "x-request-id"

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("lossd_request_id", default="-")


def current_request_id() -> str:
    return _request_id.get()


def clean_request_id(value: str | None) -> str:
    """The client's id, bounded (it ends up in every log line), or a new one."""
    value = "".join(ch for ch in (value or "")[:64] if ch.isprintable())
    return value or uuid.uuid4().hex[:16]


def set_request_id(value: str) -> contextvars.Token:
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)
