"""The monitors' state in the store (SQLite or PostgreSQL, the tables of
schema version 5): each monitor and its counters, the halves of ids
waiting for their other half, the pairs' per-sample losses, the segments
seen and the frozen reference.

Every write to one monitor runs in one transaction that first locks the
monitor's row (PostgreSQL ``FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE``
serialises every writer), so replicas writing to one monitor take turns:
an id observed on one replica and labelled on another is paired once.
Nothing is acknowledged before its transaction commits.

The SQL is written once with ``?`` placeholders (``state.dialect``); this
module uses the store's connections and nothing else of it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import logging
import math
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np

from lossd_server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from lossd_server.state.dialect import Connection, marks
from lossd_server.state.store import NO_OWNER, Store

log = logging.getLogger(__name__)

_PENDING_COLUMNS = ("id, segment, pred_dtype, pred_shape, pred, observe_time, "
                    "true_dtype, true_shape, label, label_time")


@dataclasses.dataclass
class MonitorRecord:
    """A monitor as stored.

    Attributes:
        name: Its id (the resource name is ``monitors/{name}``).
        loss: The LossSpec's dict form (``lossd.wire.spec_to_dict``).
        windows: The windows in seconds, shortest first.
        segment_keys: The keys an observation's segments may set.
        retention: Seconds a half waits for its other half.
        reference_time, reference_window: When the reference was
            captured and from which window; None before.
    """

    name: str
    loss: dict
    windows: list[float]
    segment_keys: list[str] = dataclasses.field(default_factory=list)
    retention: float = 86400.0
    display_name: str = ""
    owner: str = NO_OWNER
    create_time: float = 0.0
    pending_predictions: int = 0
    pending_labels: int = 0
    expired_predictions: int = 0
    expired_labels: int = 0
    samples: int = 0
    reference_time: Optional[float] = None
    reference_window: Optional[float] = None
    max_loss: Optional[float] = None  # the gauge LossdMonitorLossHigh compares the mean loss with

    def spec(self) -> dict:
        return {"loss": self.loss, "windows": self.windows, "segment_keys": self.segment_keys,
                "retention": self.retention, "display_name": self.display_name, "max_loss": self.max_loss}

    @classmethod
    def from_row(cls, row) -> "MonitorRecord":
        spec = json.loads(row["spec"])
        return cls(name=row["name"], loss=spec["loss"], windows=[float(w) for w in spec["windows"]],
                   segment_keys=list(spec.get("segment_keys", [])), retention=float(spec["retention"]),
                   display_name=str(spec.get("display_name", "")), owner=row["owner"] or NO_OWNER,
                   create_time=row["create_time"], pending_predictions=int(row["pending_predictions"]),
                   pending_labels=int(row["pending_labels"]), expired_predictions=int(row["expired_predictions"]),
                   expired_labels=int(row["expired_labels"]), samples=int(row["samples"]),
                   reference_time=row["reference_time"], reference_window=row["reference_window"],
                   max_loss=None if spec.get("max_loss") is None else float(spec["max_loss"]))


@dataclasses.dataclass(frozen=True)
class Half:
    """One id's prediction or label, as stored: the wire dtype enum, the
    row's shape and its bytes."""

    dtype: int
    shape: tuple[int, ...]
    content: bytes
    time: float

    def array(self, numpy_dtype) -> np.ndarray:
        return np.frombuffer(self.content, numpy_dtype).reshape(self.shape)


class Rows:
    """One half of a request's rows (its ``y_pred`` or ``y_true``), received
    at ``time``: row ``i`` becomes a ``Half`` (its bytes copied) only when it
    is kept pending; a row paired at once is never copied."""

    def __init__(self, dtype: int, array: np.ndarray, time: float):
        self.dtype = dtype
        self.array = np.ascontiguousarray(array)
        self.shape = tuple(int(d) for d in array.shape[1:])
        self.time = time

    def __getitem__(self, i: int) -> Half:
        return Half(self.dtype, self.shape, self.array[i].tobytes(), self.time)


@dataclasses.dataclass(frozen=True)
class Pending:
    """One id waiting for its other half."""

    id: str
    segment: str
    prediction: Optional[Half]
    label: Optional[Half]

    @property
    def times(self) -> tuple:
        return (self.prediction.time if self.prediction else None, self.label.time if self.label else None)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What one monitor may hold (the server's settings)."""

    max_pending_ids: int
    max_segments: int
    max_samples: int


@dataclasses.dataclass(frozen=True)
class Write:
    """One Observe or Label, ready to store.

    Attributes:
        ids: The request's ids.
        predictions, labels: The request's halves by id (None: not sent).
        segment: The predictions' segment.
        losses: The per-sample loss of each id paired now, computed from the
            halves ``seen`` (id -> ``Pending.times`` when read); the
            transaction checks they are still what is stored. None when the
            call brings both halves: whatever is stored, every id pairs.
    """

    ids: Sequence[str]
    predictions: Optional[Rows]
    labels: Optional[Rows]
    segment: str
    losses: dict
    seen: Optional[dict]


@dataclasses.dataclass(frozen=True)
class Written:
    paired: int
    pending: int
    duplicates: int


class Changed(Exception):
    """Another call changed the halves of one of the ids between the read
    and the write: the caller reads and computes again."""


def _half(dtype, shape, content, when) -> Optional[Half]:
    if content is None:
        return None
    return Half(int(dtype), _shape(shape), bytes(content), float(when))


@functools.lru_cache(maxsize=256)
def _shape(text: str) -> tuple[int, ...]:
    """A stored row shape (a monitor's rows mostly share one): parsed once."""
    return tuple(json.loads(text))


@functools.lru_cache(maxsize=256)
def _shape_text(shape: tuple[int, ...]) -> str:
    return json.dumps(list(shape))


class _Stored(NamedTuple):
    """What a write needs of a pending id: its segment and its halves' times (None: absent)."""

    segment: str
    observe_time: Optional[float]
    label_time: Optional[float]


def _encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(f"m:{name}".encode()).decode()


def _decode_token(token: str) -> str:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError, binascii.Error):
        text = ""
    if not text.startswith("m:") or len(text) > 70:
        raise InvalidArgument(f"Invalid page_token. Expected the next_page_token of a previous ListMonitors "
                              f"response. Received: {token[:64]!r}.", reason="BAD_PAGE_TOKEN")
    return text[2:]


def _many(db: Connection, sql: str, rows: list) -> None:
    if not rows:
        return
    sql = db.dialect.sql(sql)
    if hasattr(db.raw, "executemany"):  # sqlite3
        db.raw.executemany(sql, rows)
    else:  # psycopg: a cursor's
        with db.raw.cursor() as cursor:
            cursor.executemany(sql, rows)


def _not_found(name: str) -> NotFound:
    return NotFound(f"Monitor `monitors/{name}` does not exist. Expected the name of one of your monitors "
                    f"(ListMonitors). Received: {f'monitors/{name}'[:100]!r}.", reason="MONITOR_NOT_FOUND",
                    metadata={"monitor": f"monitors/{name}"[:100]})


class MonitorState:
    """The monitors' tables, through a ``Store``'s connections."""

    # Writes expire a monitor's halves at most this often (the reporter does too):
    # three range queries per call otherwise.
    EXPIRE_EVERY_SECONDS = 1.0

    def __init__(self, store: Store):
        self.store = store
        self._expired_at: dict[str, float] = {}

    # -- the resource ------------------------------------------------------------

    def create(self, record: MonitorRecord, max_monitors: int) -> MonitorRecord:
        """Inserts ``record``; ALREADY_EXISTS for a taken name,
        RESOURCE_EXHAUSTED (TOO_MANY_MONITORS) past ``max_monitors``."""
        store = self.store
        with store._transaction(f"monitor {record.name!r}") as db:
            if store.dialect.create_lock:
                db.execute(store.dialect.create_lock)
            if db.execute("SELECT n FROM monitors WHERE name = ?", (record.name,)).fetchone() is not None:
                raise AlreadyExists(f"Monitor `monitors/{record.name}` already exists. Expected a new monitor_id. "
                                    f"Received: {record.name!r}.", reason="MONITOR_EXISTS",
                                    metadata={"monitor": f"monitors/{record.name}"})
            count = db.execute("SELECT COUNT(*) AS c FROM monitors").fetchone()["c"]
            if count >= max_monitors:
                raise ResourceExhausted(
                    f"The server holds {count} monitors, its most (max_monitors). Expected a free place. Received: "
                    f"a new monitor {record.name!r}. Delete a monitor, or raise LOSSD_MAX_MONITORS.",
                    reason="TOO_MANY_MONITORS", metadata={"limit": str(max_monitors), "setting": "max_monitors"})
            db.execute("INSERT INTO monitors (name, spec, owner, create_time) VALUES (?, ?, ?, ?)",
                       (record.name, json.dumps(record.spec(), sort_keys=True), record.owner, record.create_time))
        return record

    def get(self, name: str) -> Optional[MonitorRecord]:
        with self.store._read() as db:
            row = db.execute("SELECT * FROM monitors WHERE name = ?", (name,)).fetchone()
        return self._record(row) if row is not None else None

    def count(self) -> int:
        with self.store._read() as db:
            return db.execute("SELECT COUNT(*) AS c FROM monitors").fetchone()["c"]

    def list(self, owner: Optional[str], page_size: int, page_token: str = "") -> tuple[list[MonitorRecord], str]:
        """A page of monitors by name: ``owner``'s, or all of them (None)."""
        after = _decode_token(page_token) if page_token else ""
        sql, args = "SELECT * FROM monitors WHERE name > ?", [after]
        if owner is not None:
            sql, args = sql + " AND owner = ?", [*args, owner]
        with self.store._read() as db:
            rows = db.execute(sql + " ORDER BY name LIMIT ?", (*args, page_size + 1)).fetchall()
        records = [r for r in (self._record(row) for row in rows[:page_size]) if r is not None]
        token = _encode_token(rows[page_size - 1]["name"]) if len(rows) > page_size else ""
        return records, token

    def all(self) -> list[MonitorRecord]:
        with self.store._read() as db:
            rows = db.execute("SELECT * FROM monitors ORDER BY name").fetchall()
        return [r for r in (self._record(row) for row in rows) if r is not None]

    @staticmethod
    def _record(row) -> Optional[MonitorRecord]:
        try:
            return MonitorRecord.from_row(row)
        except (ValueError, KeyError, TypeError) as exc:  # state written by hand or damaged: skipped, never INTERNAL
            log.warning("monitor %r has an unreadable row (%s); it is skipped", str(row["name"])[:64], exc)
            return None

    def delete(self, name: str) -> bool:
        with self.store._transaction(f"the deletion of monitor {name!r}") as db:
            for table in ("monitor_pending", "monitor_samples", "monitor_segments", "monitor_reference"):
                db.execute(f"DELETE FROM {table} WHERE monitor = ?", (name,))
            return db.execute("DELETE FROM monitors WHERE name = ?", (name,)).rowcount > 0

    # -- observations ------------------------------------------------------------

    def pending(self, name: str, ids: Sequence[str]) -> dict[str, Pending]:
        """The stored halves of ``ids`` that wait for their other half."""
        if not ids:
            return {}
        with self.store._read() as db:
            rows = db.execute(f"SELECT {_PENDING_COLUMNS} FROM monitor_pending WHERE monitor = ? "
                              f"AND id IN ({marks(len(ids))})", (name, *ids)).fetchall()
        return {r["id"]: self._pending(r) for r in rows}

    @staticmethod
    def _pending(row) -> Pending:
        return Pending(row["id"], row["segment"],
                       _half(row["pred_dtype"], row["pred_shape"], row["pred"], row["observe_time"]),
                       _half(row["true_dtype"], row["true_shape"], row["label"], row["label_time"]))

    def write(self, monitor: MonitorRecord, write: Write, now: float, bounds: Bounds) -> Written:
        """Stores one Observe or Label in one transaction: pairs the ids in
        ``write.losses``, keeps the others' halves pending, skips the ids
        already paired (a retried call).

        Raises:
            Changed: another call changed one of the ids' halves since
                ``write.seen`` was read; nothing was written.
            ResourceExhausted: the pending ids or the segments would pass
                their bounds (TOO_MANY_PENDING_IDS, TOO_MANY_SEGMENTS);
                nothing was written.
            NotFound: the monitor was deleted meanwhile.
        """
        name, ids = monitor.name, list(write.ids)
        with self.store._transaction(f"observations of monitor {name!r}") as db:
            if db.execute(f"SELECT n FROM monitors WHERE name = ?{self.store.dialect.lock_row}",
                          (name,)).fetchone() is None:
                raise _not_found(name)
            if now - self._expired_at.get(name, -math.inf) >= self.EXPIRE_EVERY_SECONDS:
                self._expire(db, monitor, now)
                self._expired_at[name] = now
            done = {r["id"] for r in db.execute(f"SELECT id FROM monitor_samples WHERE monitor = ? AND id IN "
                                                f"({marks(len(ids))})", (name, *ids)).fetchall()}
            stored = {r["id"]: _Stored(r["segment"], r["observe_time"], r["label_time"]) for r in db.execute(
                f"SELECT id, segment, observe_time, label_time FROM monitor_pending WHERE monitor = ? "
                f"AND id IN ({marks(len(ids))})", (name, *ids)).fetchall()}
            for ident in ids if write.seen is not None else ():
                if ident not in done and (stored[ident][1:] if ident in stored else (None, None)) \
                        != write.seen.get(ident, (None, None)):
                    raise Changed(ident)
            if write.predictions is not None:
                self._admit_segment(db, name, write.segment, bounds.max_segments)
            paired_rows, pending_rows, freed = [], [], [0, 0]
            new_pending = [0, 0]
            for i, ident in enumerate(ids):
                if ident in done:
                    continue
                before = stored.get(ident)
                if ident in write.losses:
                    observed = write.predictions.time if write.predictions is not None else before.observe_time
                    labelled = write.labels.time if write.labels is not None else before.label_time
                    segment = write.segment if write.predictions is not None else before.segment
                    loss = write.losses[ident]
                    paired_rows.append((name, ident, segment, now, observed, labelled,
                                        None if math.isnan(loss) else loss))  # NULL with a label_time: NaN
                    if before is not None:
                        freed[0] += before.observe_time is not None
                        freed[1] += before.label_time is not None
                    continue
                # Kept waiting: a new row, or this half replacing the same half of an earlier call.
                prediction = write.predictions[i] if write.predictions is not None else None
                label = write.labels[i] if write.labels is not None else None
                if before is None:
                    new_pending[0 if prediction is not None else 1] += 1
                pending_rows.append((name, ident, write.segment if prediction is not None else "",
                                     *((prediction.dtype, _shape_text(prediction.shape), prediction.content,
                                        prediction.time) if prediction else (None,) * 4),
                                     *((label.dtype, _shape_text(label.shape), label.content, label.time)
                                       if label else (None,) * 4)))
            held = monitor_counts(db, name)
            pending_after = held["pending_predictions"] + held["pending_labels"] + sum(new_pending) - sum(freed)
            if sum(new_pending) and pending_after > bounds.max_pending_ids:
                raise ResourceExhausted(
                    f"Monitor `monitors/{name}` would hold {pending_after} ids waiting for their other half, more "
                    f"than max_pending_ids ({bounds.max_pending_ids}). Expected labels for the pending predictions "
                    f"(or a shorter retention). Received: {sum(new_pending)} new pending ids.",
                    reason="TOO_MANY_PENDING_IDS",
                    metadata={"limit": str(bounds.max_pending_ids), "setting": "max_pending_ids",
                              "monitor": f"monitors/{name}"})
            paired_ids = [r[1] for r in paired_rows]
            for chunk in _chunks(paired_ids):
                db.execute(f"DELETE FROM monitor_pending WHERE monitor = ? AND id IN ({marks(len(chunk))})",
                           (name, *chunk))
            _many(db, "INSERT INTO monitor_samples (monitor, id, segment, time, observe_time, label_time, loss)"
                      " VALUES (?, ?, ?, ?, ?, ?, ?)", paired_rows)
            _many(db, f"INSERT INTO monitor_pending (monitor, {_PENDING_COLUMNS}) VALUES "
                      f"(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (monitor, id) DO UPDATE SET "
                      "segment = excluded.segment, pred_dtype = excluded.pred_dtype, "
                      "pred_shape = excluded.pred_shape, pred = excluded.pred, observe_time = excluded.observe_time, "
                      "true_dtype = excluded.true_dtype, true_shape = excluded.true_shape, label = excluded.label, "
                      "label_time = excluded.label_time", pending_rows)
            db.execute("UPDATE monitors SET pending_predictions = pending_predictions + ?, "
                       "pending_labels = pending_labels + ?, samples = samples + ? WHERE name = ?",
                       (new_pending[0] - freed[0], new_pending[1] - freed[1], len(paired_rows), name))
            self._cap_samples(db, name, held["samples"] + len(paired_rows), bounds.max_samples)
        return Written(len(paired_rows), len(pending_rows), len(done))

    @staticmethod
    def _admit_segment(db: Connection, name: str, segment: str, max_segments: int) -> None:
        if db.execute("SELECT 1 AS x FROM monitor_segments WHERE monitor = ? AND segment = ?",
                      (name, segment)).fetchone() is not None:
            return
        count = db.execute("SELECT COUNT(*) AS c FROM monitor_segments WHERE monitor = ?", (name,)).fetchone()["c"]
        if count >= max_segments:
            raise ResourceExhausted(
                f"Monitor `monitors/{name}` has {count} segments, its most (max_monitor_segments). Expected one of "
                f"them. Received: a new segment {segment[:200]!r}.", reason="TOO_MANY_SEGMENTS",
                metadata={"limit": str(max_segments), "setting": "max_monitor_segments",
                          "monitor": f"monitors/{name}"})
        db.execute("INSERT INTO monitor_segments (monitor, segment) VALUES (?, ?)", (name, segment))

    def segments(self, name: str) -> list[str]:
        with self.store._read() as db:
            return [r["segment"] for r in db.execute(
                "SELECT segment FROM monitor_segments WHERE monitor = ? ORDER BY segment", (name,)).fetchall()]

    @staticmethod
    def _cap_samples(db: Connection, name: str, held: int, max_samples: int) -> None:
        """Drops the oldest samples past ``max_samples``."""
        excess = held - max_samples
        if excess <= 0:
            return
        db.execute("DELETE FROM monitor_samples WHERE monitor = ? AND id IN (SELECT id FROM monitor_samples "
                   "WHERE monitor = ? ORDER BY time LIMIT ?)", (name, name, excess))
        db.execute("UPDATE monitors SET samples = samples - ? WHERE name = ?", (excess, name))

    def expire(self, monitor: MonitorRecord, now: float) -> None:
        """Expires the halves older than the retention and drops the samples
        older than the longest window (done by every write, too)."""
        with self.store._transaction(f"the expiry of monitor {monitor.name!r}") as db:
            if db.execute(f"SELECT n FROM monitors WHERE name = ?{self.store.dialect.lock_row}",
                          (monitor.name,)).fetchone() is not None:
                self._expire(db, monitor, now)

    @staticmethod
    def _expire(db: Connection, monitor: MonitorRecord, now: float) -> None:
        name, cutoff = monitor.name, now - monitor.retention
        # A pending row holds one half: a prediction has an observe_time, a label a label_time.
        expired = db.execute("SELECT id, segment, observe_time FROM monitor_pending WHERE monitor = ? "
                             "AND observe_time < ?", (name, cutoff)).fetchall()
        _many(db, "INSERT INTO monitor_samples (monitor, id, segment, time, observe_time, label_time, loss) "
                  "VALUES (?, ?, ?, ?, ?, NULL, NULL) ON CONFLICT (monitor, id) DO NOTHING",
              [(name, r["id"], r["segment"], now, r["observe_time"]) for r in expired])
        if expired:
            db.execute("DELETE FROM monitor_pending WHERE monitor = ? AND observe_time < ?", (name, cutoff))
        labels = db.execute("DELETE FROM monitor_pending WHERE monitor = ? AND label_time < ?",
                            (name, cutoff)).rowcount
        dropped = db.execute("DELETE FROM monitor_samples WHERE monitor = ? AND time < ?",
                             (name, now - max(monitor.windows))).rowcount
        if expired or labels or dropped:
            db.execute("UPDATE monitors SET pending_predictions = pending_predictions - ?, "
                       "pending_labels = pending_labels - ?, expired_predictions = expired_predictions + ?, "
                       "expired_labels = expired_labels + ?, samples = samples + ? - ? WHERE name = ?",
                       (len(expired), labels, len(expired), labels, len(expired), dropped, name))

    # -- what reports read ---------------------------------------------------------

    def samples(self, name: str, since: float) -> dict[str, np.ndarray]:
        """The samples completed at or after ``since``, as columns: segment,
        time, observe_time, label_time (NaN: expired unlabelled) and loss
        (NaN for an expired one, or a pair whose loss is NaN)."""
        with self.store._read() as db:
            rows = db.execute("SELECT segment, time, observe_time, label_time, loss FROM monitor_samples "
                              "WHERE monitor = ? AND time >= ?", (name, since)).fetchall()
        return _columns(rows, ("segment", "time", "observe_time", "label_time", "loss"))

    def pending_observed(self, name: str, since: float) -> dict[str, np.ndarray]:
        """The segment and observe time of each prediction waiting for its
        label, observed at or after ``since``."""
        with self.store._read() as db:
            rows = db.execute("SELECT segment, observe_time FROM monitor_pending WHERE monitor = ? "
                              "AND observe_time >= ?", (name, since)).fetchall()
        return _columns(rows, ("segment", "observe_time"))

    def capture_reference(self, monitor: MonitorRecord, window: float, now: float) -> None:
        """Replaces the reference with the losses of the pairs completed
        within ``window`` of ``now``."""
        name = monitor.name
        with self.store._transaction(f"the reference of monitor {name!r}") as db:
            if db.execute(f"SELECT n FROM monitors WHERE name = ?{self.store.dialect.lock_row}",
                          (name,)).fetchone() is None:
                raise _not_found(name)
            db.execute("DELETE FROM monitor_reference WHERE monitor = ?", (name,))
            db.execute("INSERT INTO monitor_reference (monitor, segment, loss) SELECT monitor, segment, loss "
                       "FROM monitor_samples WHERE monitor = ? AND time >= ? AND loss IS NOT NULL",
                       (name, now - window))
            db.execute("UPDATE monitors SET reference_time = ?, reference_window = ? WHERE name = ?",
                       (now, window, name))

    def reference(self, name: str) -> dict[str, np.ndarray]:
        """The reference's losses: segment and loss columns."""
        with self.store._read() as db:
            rows = db.execute("SELECT segment, loss FROM monitor_reference WHERE monitor = ?", (name,)).fetchall()
        return _columns(rows, ("segment", "loss"))


def monitor_counts(db: Connection, name: str) -> dict:
    return dict(db.execute("SELECT pending_predictions, pending_labels, samples FROM monitors WHERE name = ?",
                           (name,)).fetchone())


def _chunks(items: list, size: int = 4096) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _columns(rows, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for i, column in enumerate(names):
        values = [r[column] for r in rows]
        if column == "segment":
            out[column] = np.array(values, dtype=object)
        else:
            out[column] = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    return out
