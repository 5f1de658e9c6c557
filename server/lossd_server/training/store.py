"""The store: jobs, their events, datasets and registered losses in one SQLite
database under the data directory (WAL mode, so readers never wait on the
writer).

Everything a restart needs is here: a job's spec, state, times, error and
latest progress, and every event it emitted (WatchJob replays them), and each
registered loss as one row. The store is shared by the server's threads
behind one lock; only the server process writes to it (job processes report
through a queue).

State that cannot be read never stops the server: at open, a damaged
database file is moved whole into ``<data_dir>/quarantine/`` and a fresh one
created, and a malformed job row is copied there as JSON and removed (see
``Quarantine``). A full disk is ``ResourceExhausted`` (DISK_FULL), never a
bare ``sqlite3`` error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional

from lossd_server.errors import InvalidArgument, disk_full, disk_full_error

log = logging.getLogger(__name__)

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
    progress     TEXT NOT NULL DEFAULT '{}',
    retries      INTEGER NOT NULL DEFAULT 0,
    owner        TEXT NOT NULL DEFAULT ''
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
    create_time REAL NOT NULL,
    owner       TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS losses (
    name        TEXT PRIMARY KEY,
    record      TEXT NOT NULL,
    update_time REAL NOT NULL
);
"""
# Columns added after the first release, with their definitions: an older
# database gains them at open. Rows from before owners get the owner ''
# (NO_OWNER): only admins see them (``Caller.owns``).
_ADDED_COLUMNS = {"jobs": {"retries": "INTEGER NOT NULL DEFAULT 0", "owner": "TEXT NOT NULL DEFAULT ''"},
                  "datasets": {"owner": "TEXT NOT NULL DEFAULT ''"}}
# The owner of what was made before owners were recorded, or by the
# anonymous caller of a server without tokens.
NO_OWNER = ""
QUARANTINE_DIR = "quarantine"

# SQLite primary result codes (the low byte of sqlite_errorcode).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


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
        retries: How many times the job was started again after its process
            died abnormally (see ``Settings.job_max_retries``).
        owner: The name of the caller that created it (``NO_OWNER`` for
            jobs from before owners, or made on a server without tokens).
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
    retries: int = 0
    owner: str = NO_OWNER

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


class Quarantine:
    """``<data_dir>/quarantine/``: persisted state the server could not read.

    Nothing unreadable is deleted: a damaged file is moved here whole, a
    malformed row is written here as JSON before it leaves its table. Each
    item logs one WARNING line saying what moved and why (no traceback), and
    ``items`` lists them for health and metrics.
    """

    def __init__(self, folder: pathlib.Path):
        self.folder = pathlib.Path(folder)
        self.items: list[str] = []

    def _target(self, name: str) -> pathlib.Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.folder / f"{stamp}-{name}"
        n = 1
        while target.exists():
            n += 1
            target = self.folder / f"{stamp}-{n}-{name}"
        return target

    def move(self, path: pathlib.Path, why: str, *, companions: Iterable[pathlib.Path] = ()) -> pathlib.Path:
        """Moves ``path`` (and the ``companions`` that exist, such as SQLite's
        -wal and -shm files, beside it under the same stamp) here."""
        target = self._target(path.name)
        os.replace(path, target)
        for extra in companions:
            if extra.exists():
                os.replace(extra, target.with_name(target.name + extra.name[len(path.name):]))
        self._note(f"moved {path} to {target}: {why}")
        return target

    def save(self, name: str, data: Any, why: str) -> pathlib.Path:
        """Writes ``data`` as ``<stamp>-<name>.json`` here."""
        target = self._target(f"{name}.json")
        target.write_text(json.dumps(data, indent=2, default=str))
        self._note(f"moved {name} to {target}: {why}")
        return target

    def _note(self, line: str) -> None:
        self.items.append(line)
        log.warning("quarantine: %s; the server goes on without it", line)


class Store:
    """Jobs, events, datasets and registered losses in ``<data_dir>/lossd.sqlite3``.

    Args:
        path: The database file; its folder is created.
        check_job: Raises ``ValueError`` (or ``KeyError``/``TypeError``) for a
            job record the server could not serve; such rows are moved to the
            quarantine at open. ``jobs.check_record`` in the server.
        quarantine: Where unreadable state goes; ``<folder of path>/quarantine``
            by default.

    Attributes:
        quarantine: What was moved aside at open (``Quarantine.items``).
    """

    def __init__(self, path: pathlib.Path, *, check_job: Optional[Callable[[JobRecord], None]] = None,
                 quarantine: Optional[Quarantine] = None):
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.quarantine = quarantine or Quarantine(path.parent / QUARANTINE_DIR)
        self._lock = threading.RLock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise
            self.quarantine.move(path, f"the SQLite database is damaged ({exc}); a new, empty one replaces it",
                                 companions=[path.with_name(path.name + s) for s in ("-wal", "-shm")])
            self._db = self._open()
        self._drop_malformed_jobs(check_job)

    def _open(self) -> sqlite3.Connection:
        # One connection shared by the server's threads, serialised by the lock;
        # autocommit (isolation_level=None) with explicit transactions.
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # quick_check reads every page (not the index-to-table cross checks
            # of integrity_check): a torn or overwritten file fails here, at
            # open, not in the middle of some later request.
            problems = [r[0] for r in db.execute("PRAGMA quick_check(5)").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems)[:300])
            db.executescript(_SCHEMA)
            for table, columns in _ADDED_COLUMNS.items():
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                for name, definition in columns.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
        except sqlite3.DatabaseError as exc:
            db.close()
            if not getattr(exc, "sqlite_errorcode", 0):
                exc.sqlite_errorcode = _SQLITE_CORRUPT  # quick_check's findings
            raise
        return db

    def _drop_malformed_jobs(self, check_job: Optional[Callable[[JobRecord], None]]) -> None:
        """Moves each job row that cannot be read (bad JSON, unknown state, a
        spec ``check_job`` refuses) with its events into the quarantine."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs").fetchall()
            for row in rows:
                try:
                    job = self._job(row)
                    if job.state not in STATES:
                        raise ValueError(f"unknown state {job.state!r}")
                    for field in ("spec", "runtime", "progress"):
                        if not isinstance(getattr(job, field), dict):
                            raise ValueError(f"{field} is not an object")
                    if job.error is not None and not isinstance(job.error, dict):
                        raise ValueError("error is not an object")
                    if check_job is not None:
                        check_job(job)
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    events = [dict(r) for r in self._db.execute("SELECT * FROM events WHERE job_id = ?",
                                                                (row["id"],))]
                    self.quarantine.save(f"job-{str(row['id'])[:64]}", {"table": "jobs", "row": dict(row),
                                                                        "events": events},
                                         f"the job row is malformed ({type(exc).__name__}: {str(exc)[:200]})")
                    with self._transaction("removing a malformed job"):
                        self._db.execute("DELETE FROM events WHERE job_id = ?", (row["id"],))
                        self._db.execute("DELETE FROM jobs WHERE n = ?", (row["n"],))

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[None]:
        """One write transaction (under the lock); a full disk becomes
        ``ResourceExhausted`` (DISK_FULL) after the rollback."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except (sqlite3.OperationalError, OSError) as exc:
                if disk_full(exc):
                    raise disk_full_error(what) from exc
                raise

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
            request_id=row["request_id"], display_name=row["display_name"], retries=row["retries"] or 0,
            owner=row["owner"] or NO_OWNER)

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
            with self._transaction("the new job"):
                self._db.execute(
                    "INSERT INTO jobs (id, request_id, display_name, spec, runtime, model_kind, state, create_time,"
                    " progress, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.request_id or None, job.display_name, json.dumps(job.spec),
                     json.dumps(job.runtime), job.model_kind, job.state, job.create_time, json.dumps(job.progress),
                     job.owner))
                self._append_locked(job.id, "state", {"state": job.state}, job.create_time)
            return job, True

    def get_job(self, job_id: str) -> Optional[JobRecord]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row is not None else None

    def get_job_by_request_id(self, request_id: str) -> Optional[JobRecord]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        return self._job(row) if row is not None else None

    def list_jobs(self, states: Iterable[str] = (), page_size: int = 50, page_token: str = "",
                  owner: Optional[str] = None) -> tuple[list[JobRecord], str]:
        """Jobs newest first (only ``owner``'s when it is not None); returns
        ``(page, next_page_token)``.

        The token is the position of the last job returned, so pages stay
        stable while new jobs are created.
        """
        states = list(states)
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
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

    def count_jobs(self, states: Iterable[str], owner: str) -> int:
        """How many of ``owner``'s jobs are in the given states."""
        states = list(states)
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND state IN "
                                    f"({', '.join('?' * len(states))})", (owner, *states)).fetchone()[0]

    def counts_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS c FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["c"] for r in rows}

    def update_job(self, job_id: str, *, event: Optional[tuple[str, dict]] = None, **fields: Any) -> Optional[int]:
        """Updates columns of a job and, in the same transaction, appends an
        event ``(kind, payload)``; returns the event's sequence number."""
        encoded = {k: json.dumps(v) if k in ("error", "progress") and v is not None else v
                   for k, v in fields.items()}
        seq = None
        with self._transaction(f"an update of job {job_id}"):
            if encoded:
                sets = ", ".join(f"{k} = ?" for k in encoded)
                self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*encoded.values(), job_id))
            seq = self._append_locked(job_id, *event, time.time()) if event else None
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

    def put_dataset(self, name: str, info: dict, owner: str = NO_OWNER) -> None:
        with self._transaction(f"dataset {name!r}"):
            self._db.execute("INSERT OR REPLACE INTO datasets (name, info, create_time, owner) VALUES (?, ?, ?, ?)",
                             (name, json.dumps(info), info.get("create_time") or time.time(), owner))

    def get_dataset(self, name: str) -> Optional[dict]:
        """A dataset's info, with its ``owner``; None when there is none of that name."""
        with self._lock:
            row = self._db.execute("SELECT info, owner FROM datasets WHERE name = ?", (name,)).fetchone()
        return {**json.loads(row["info"]), "owner": row["owner"] or NO_OWNER} if row is not None else None

    def delete_dataset(self, name: str) -> bool:
        """Removes a dataset's record; returns whether there was one."""
        with self._lock:
            return self._db.execute("DELETE FROM datasets WHERE name = ?", (name,)).rowcount > 0

    def dataset_bytes(self, owner: Optional[str] = None) -> int:
        """The stored datasets' sizes (``size_bytes``), added up: all of
        them, or ``owner``'s."""
        sql = "SELECT COALESCE(SUM(json_extract(info, '$.size_bytes')), 0) FROM datasets"
        with self._lock:
            row = self._db.execute(sql + " WHERE owner = ?", (owner,)).fetchone() if owner is not None \
                else self._db.execute(sql).fetchone()
        return int(row[0])

    def list_datasets(self) -> list[dict]:
        """Every dataset's info, with its ``owner``, by name."""
        with self._lock:
            rows = self._db.execute("SELECT info, owner FROM datasets ORDER BY name").fetchall()
        return [{**json.loads(r["info"]), "owner": r["owner"] or NO_OWNER} for r in rows]

    # -- registered losses -----------------------------------------------------

    def losses(self) -> list[tuple[str, str]]:
        """Every stored loss as ``(name, record JSON text)``, oldest change first.
        The text is not parsed here: ``losses.custom.ExpressionStore`` owns its shape."""
        with self._lock:
            rows = self._db.execute("SELECT name, record FROM losses ORDER BY update_time, name").fetchall()
        return [(r["name"], r["record"]) for r in rows]

    def count_losses(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM losses").fetchone()[0]

    def put_losses(self, records: Iterable[tuple[str, dict]]) -> None:
        """Inserts or replaces ``(name, record)`` rows in one transaction.

        Raises:
            ResourceExhausted: the disk is full (DISK_FULL); nothing was written.
        """
        with self._transaction("the registered loss"):
            for name, record in records:
                self._db.execute("INSERT OR REPLACE INTO losses (name, record, update_time) VALUES (?, ?, ?)",
                                 (name, json.dumps(record, sort_keys=True), time.time()))

    def delete_loss(self, name: str) -> None:
        with self._transaction("the loss deletion"):
            self._db.execute("DELETE FROM losses WHERE name = ?", (name,))

    def quarantine_loss(self, name: str, why: str) -> None:
        """Moves a stored loss row that cannot be loaded into the quarantine."""
        with self._lock:
            row = self._db.execute("SELECT * FROM losses WHERE name = ?", (name,)).fetchone()
            if row is None:
                return
            self.quarantine.save(f"loss-{str(name)[:64]}", {"table": "losses", "row": dict(row)}, why)
            with self._transaction("removing a malformed loss"):
                self._db.execute("DELETE FROM losses WHERE name = ?", (name,))
