"""Times as the API writes them: seconds since the epoch (the store's) as a
``google.protobuf.Timestamp``, for every resource (jobs, datasets, monitors)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2


def timestamp(seconds) -> timestamp_pb2.Timestamp | None:
    """``seconds`` since the epoch as a Timestamp (None stays None: the field is left unset)."""
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
