"""Logging set-up for ``lossd serve``: plain text or one JSON object per line,
each record carrying the request id of the RPC that logged it; and the audit
line of admin actions (``audited``)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from typing import Iterator

from lossd_server.observability.requestid import current_request_id

AUDIT_LOGGER = "lossd_server.audit"
_audit = logging.getLogger(AUDIT_LOGGER)


ACCESS_LOGGER = "lossd_server.access"


def one_line(text: str) -> str:
    """``text`` with its control characters escaped: an error's details may
    quote what a client sent (a loss name with a newline), which must not
    split the access-log line or forge another."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (and
    the traceback), plus the record's structured ``fields`` (the audit line's)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for key, value in getattr(record, "fields", {}).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Configures the root logger once, for the server process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Audit lines are kept whatever the level: an operator who logs only
    # warnings still learns who changed what.
    _audit.setLevel(logging.INFO)


@contextlib.contextmanager
def audited(caller: str, action: str, target: str, **extra: str) -> Iterator[None]:
    """Logs one audit line when the block ends: ``caller`` (a token's name,
    never a token), ``action`` (such as ``delete_loss``), ``target`` (a
    resource name such as ``losses/x``), ``outcome`` (``ok``, or the reason
    of the error the block raised, ``INTERNAL`` for an unexpected one) and
    the ``extra`` fields. In JSON logs they are fields of the line; in text
    logs the message carries them as ``key="value"`` pairs (JSON-quoted, so
    a name cannot forge another field or line)."""
    outcome = "ok"
    try:
        yield
    except BaseException as exc:
        outcome = str(getattr(exc, "reason", "") or "INTERNAL")
        raise
    finally:
        fields = {"caller": caller, "action": action, "target": target, "outcome": outcome, **extra}
        _audit.info("audit %s", " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items()),
                    extra={"fields": {"audit": True, **fields}})
