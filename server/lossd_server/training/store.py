"""The job store: jobs, their events and datasets in one SQLite database under
the data directory (WAL mode, so readers never wait on the writer).

Everything a restart needs is here: a job's spec, state, times, error and
latest progress, and every event it emitted (WatchJob replays them). The
store is shared by the server's threads behind one lock; only the server
process writes to it (job processes report through a queue).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import pathlib
import sqlite3
import threading
import time
from typing import Any, Iterable, Optional

from lossd_server.errors import InvalidArgument

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelling", "cancelled")
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED)
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    n            INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    request_id   TEXT UNIQUE,
    display_name TEXT NOT NULL DEFAULT '',
    spec         TEXT NOT NULL,
    runtime      TEXT NOT NULL,
    model_kind   TEXT NOT NULL,
    state        TEXT NOT NULL,
    create_time  REAL NOT NULL,
    start_time   REAL,
    end_time     REAL,
    error        TEXT,
    progress     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
    job_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    time    REAL NOT NULL,
    kind    TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS datasets (
    name        TEXT PRIMARY KEY,
    info        TEXT NOT NULL,
    create_time REAL NOT NULL
);
"""


@dataclasses.dataclass
class JobRecord:
    """A job as stored.

    Attributes:
        id: The job's id (its resource name is ``jobs/{id}``).
        spec: The normalised spec (defaults filled in), as a dict.
        runtime: What the worker needs beyond the spec (dataset location,
            image shape, classes, whether the model outputs logits).
        model_kind: ``classifier`` or ``generator``.
        state: One of ``STATES``.
        error: For failed jobs: ``{"code", "reason", "message", "metadata"}``.
        progress: The latest progress: epochs, step, metrics, examples/s, ETA.
    """

    id: str
    spec: dict
    runtime: dict
    model_kind: str
    state: str = QUEUED
    create_time: float = 0.0
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    error: Optional[dict] = None
    progress: dict = dataclasses.field(default_factory=dict)
    request_id: Optional[str] = None
    display_name: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclasses.dataclass
class Event:
    """One stored job event: ``kind`` is ``state``, ``epoch``, ``progress`` or ``message``."""

    job_id: str
    seq: int
    time: float
    kind: str
    payload: dict


def _encode_token(n: int) -> str:
    return base64.urlsafe_b64encode(f"n:{n}".encode()).decode()


def _decode_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if not text.startswith("n:") or not text[2:].isdigit() or len(text) > 22:
            raise ValueError(text)
        n = int(text[2:])
        if not 0 < n < 2**63:  # a SQLite integer
            raise ValueError(text)
        return n
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument(f"Invalid page_token. Expected the next_page_token of a previous ListJobs "
                              f"response. Received: {token[:64]!r}.", reason="BAD_PAGE_TOKEN") from None


class Store:
    """Jobs, events and datasets in ``<data_dir>/lossd.sqlite3``.

    Args:
        path: The database file; its folder is created.
    """

    def __init__(self, path: pathlib.Path):
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        # One connection shared by the server's threads, serialised by the lock;
        # autocommit (isolation_level=None) with explicit transactions.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ------------------------------------------------------------------

    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"], spec=json.loads(row["spec"]), runtime=json.loads(row["runtime"]),
            model_kind=row["model_kind"], state=row["state"], create_time=row["create_time"],
            start_time=row["start_time"], end_time=row["end_time"],
            error=json.loads(row["error"]) if row["error"] else None, progress=json.loads(row["progress"]),
            request_id=row["request_id"], display_name=row["display_name"])

    def create_job(self, job: JobRecord) -> tuple[JobRecord, bool]:
        """Inserts a job and its first event; returns ``(job, created)``.

        When a job with the same ``request_id`` exists, returns it with
        ``created=False`` and inserts nothing (safe retries, AIP-155).
        """
        with self._lock:
            if job.request_id:
                row = self._db.execute("SELECT * FROM jobs WHERE request_id = ?", (job.request_id,)).fetchone()
                if row is not None:
                    return self._job(row), False
            job.create_time = job.create_time or time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, request_id, display_name, spec, runtime, model_kind, state, create_time,"
                    " progress) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.request_id or None, job.display_name, json.dumps(job.spec),
                     json.dumps(job.runtime), job.model_kind, job.state, job.create_time, json.dumps(job.progress)))
                self._append_locked(job.id, "state", {"state": job.state}, job.create_time)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return job, True

    def get_job(self, job_id: str) -> Optional[JobRecord]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row is not None else None

    def get_job_by_request_id(self, request_id: str) -> Optional[JobRecord]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        return self._job(row) if row is not None else None

    def list_jobs(self, states: Iterable[str] = (), page_size: int = 50, page_token: str = ""
                  ) -> tuple[list[JobRecord], str]:
        """Jobs newest first; returns ``(page, next_page_token)``.

        The token is the position of the last job returned, so pages stay
        stable while new jobs are created.
        """
        states = list(states)
        where, args = [], []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        if page_token:
            where.append("n < ?")
            args.append(_decode_token(page_token))
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY n DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, page_size + 1)).fetchall()
        jobs = [self._job(r) for r in rows[:page_size]]
        token = _encode_token(rows[page_size - 1]["n"]) if len(rows) > page_size else ""
        return jobs, token

    def jobs_in_states(self, states: Iterable[str]) -> list[JobRecord]:
        """Jobs in the given states, oldest first."""
        states = list(states)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(states))})"
                                    " ORDER BY n", states).fetchall()
        return [self._job(r) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS c FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["c"] for r in rows}

    def update_job(self, job_id: str, *, event: Optional[tuple[str, dict]] = None, **fields: Any) -> Optional[int]:
        """Updates columns of a job and, in the same transaction, appends an
        event ``(kind, payload)``; returns the event's sequence number."""
        encoded = {k: json.dumps(v) if k in ("error", "progress") and v is not None else v
                   for k, v in fields.items()}
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if encoded:
                    sets = ", ".join(f"{k} = ?" for k in encoded)
                    self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*encoded.values(), job_id))
                seq = self._append_locked(job_id, *event, time.time()) if event else None
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return seq

    # -- events ----------------------------------------------------------------

    def _append_locked(self, job_id: str, kind: str, payload: dict, when: float) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()
        seq = row[0] + 1
        self._db.execute("INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
                         (job_id, seq, when, kind, json.dumps(payload)))
        return seq

    def append_event(self, job_id: str, kind: str, payload: dict) -> int:
        return self.update_job(job_id, event=(kind, payload))

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                                    (job_id, after, limit)).fetchall()
        return [Event(r["job_id"], r["seq"], r["time"], r["kind"], json.loads(r["payload"])) for r in rows]

    # -- datasets --------------------------------------------------------------

    def put_dataset(self, name: str, info: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO datasets (name, info, create_time) VALUES (?, ?, ?)",
                             (name, json.dumps(info), info.get("create_time") or time.time()))

    def get_dataset(self, name: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT info FROM datasets WHERE name = ?", (name,)).fetchone()
        return json.loads(row["info"]) if row is not None else None

    def delete_dataset(self, name: str) -> bool:
        """Removes a dataset's record; returns whether there was one."""
        with self._lock:
            return self._db.execute("DELETE FROM datasets WHERE name = ?", (name,)).rowcount > 0

    def dataset_bytes(self) -> int:
        """The stored datasets' sizes (``size_bytes``), added up."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(json_extract(info, '$.size_bytes')), 0) FROM datasets").fetchone()
        return int(row[0])

    def list_datasets(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT info FROM datasets ORDER BY name").fetchall()
        return [json.loads(r["info"]) for r in rows]
