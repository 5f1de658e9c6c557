"""The store: jobs, their events, datasets and registered losses, behind one
interface with two backends.

- ``SqliteStore``, the embedded default: one SQLite database under the data
  directory (WAL mode, so readers never wait on the writer), one process.
- ``PostgresStore`` (``LOSSD_DATABASE_URL=postgresql://...``): one PostgreSQL
  database that several replicas share, through a psycopg 3 connection pool.

Both run the same SQL (``Store``) over the same schema, built by the same
versioned migrations (``MIGRATIONS``, recorded in ``schema_version``); what
the two dialects write differently (a column type, a row lock, a JSON field)
is in ``Dialect`` and nowhere else.

Paths of files under the artifacts folder (an uploaded dataset's file, the
dataset a job trains on) are stored relative to it, and those of folder
datasets relative to the dataset root; when read they are resolved against
the folders of the process that reads them, so replicas may mount the
shared folders at different paths (``relative_path``, ``resolve_path``).

Everything a restart needs is here: a job's spec, state, times, error and
latest progress, the lease of the replica running it, every event it
emitted (WatchJob replays them), and each registered loss as one row.

State that cannot be read never stops the server: at open, a damaged SQLite
file (or a directory where the file should be) is moved whole into
``<data_dir>/quarantine/`` and a fresh one created, a missing table is
created again (empty), and a malformed row of jobs, events or datasets is
copied there as JSON and removed (see ``Quarantine``); an event whose
payload cannot be read later is skipped with a warning. A database whose
``schema_version`` is newer than this code is refused (``StartupError``,
``lossd serve`` exits 2) and left as it is. A full disk is ``ResourceExhausted`` (DISK_FULL), never a
bare database error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional

from lossd_server.config import StartupError
from lossd_server.errors import InvalidArgument, Unavailable, disk_full, disk_full_error

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelling", "cancelled")
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED)
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)

# The schema, one migration per version; ``{serial}``, ``{float}`` and the
# like are filled in by ``Dialect.types``. A database records the version it
# has in ``schema_version``; opening it applies the migrations after that
# one, in one transaction. Append new versions; never edit a released one.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE IF NOT EXISTS jobs (
    n            {serial},
    id           TEXT NOT NULL UNIQUE,
    request_id   TEXT UNIQUE,
    display_name TEXT NOT NULL DEFAULT '',
    spec         TEXT NOT NULL,
    runtime      TEXT NOT NULL,
    model_kind   TEXT NOT NULL,
    state        TEXT NOT NULL,
    create_time  {float} NOT NULL,
    start_time   {float},
    end_time     {float},
    error        TEXT,
    progress     TEXT NOT NULL DEFAULT '{{}}',
    retries      INTEGER NOT NULL DEFAULT 0,
    owner        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
    job_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    time    {float} NOT NULL,
    kind    TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS datasets (
    name        TEXT PRIMARY KEY,
    info        TEXT NOT NULL,
    create_time {float} NOT NULL,
    owner       TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS losses (
    name        TEXT PRIMARY KEY,
    record      TEXT NOT NULL,
    update_time {float} NOT NULL
)
"""),
    # Leases: the replica running a job and until when its claim holds
    # (``Store.claim_jobs``); a version counter per kind of shared state, so
    # replicas notice a change with one cheap read (``Store.version``).
    (2, """
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires {float};
CREATE TABLE versions (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
)
"""),
    # Paths under the artifacts folder become relative to it: no SQL, the
    # rows are rewritten by ``Store._relative_paths``.
    (3, ""),
    # Replicas and their job slots, each with a lease it renews as it renews
    # its jobs' (``Store.publish_replica``): CreateJob refuses a job that no
    # live replica could run.
    (4, """
CREATE TABLE replicas (
    id        TEXT PRIMARY KEY,
    job_slots INTEGER NOT NULL,
    expires   {float} NOT NULL
)
"""),
)
NEWEST_SCHEMA = MIGRATIONS[-1][0]
# The table each migration statement creates, changes or indexes: a table
# found missing at open is made again from its statements, in order.
_STATEMENT_TABLE = re.compile(r"^\s*(?:CREATE TABLE(?: IF NOT EXISTS)?|ALTER TABLE|CREATE INDEX(?: IF NOT EXISTS)? \w+ ON)"
                              r"\s+(\w+)", re.IGNORECASE)
# Migration statements that fail when what they make exists already.
_CREATE_TABLE = re.compile(r"^\s*CREATE TABLE\s+(\w+)\s*\(", re.IGNORECASE)
_ADD_COLUMN = re.compile(r"^\s*ALTER TABLE\s+(\w+)\s+ADD COLUMN\s+(\w+)", re.IGNORECASE)
# A dataset's stored info: its fields and their types, as
# ``datasets.DatasetInfo`` has them (tests/robustness/test_store_faults.py
# checks the two agree). The store needs only the name; the server checks
# the rest with ``check_dataset`` (``DatasetInfo.from_dict``).
DATASET_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "source": (str,), "examples": (int,), "image_shape": (list,), "class_names": (list,),
    "create_time": (int, float), "size_bytes": (int,), "path": (str,), "owner": (str,)}
_DATASET_REQUIRED = ("name",)
_MIN_TIME, _MAX_TIME = -62135596800, 253402300799  # what google.protobuf.Timestamp holds
# A job row's scalar columns and the types they may hold (None: NULL allowed).
_JOB_COLUMNS: dict[str, tuple[Any, ...]] = {
    "id": (str,), "request_id": (str, None), "display_name": (str,), "model_kind": (str,), "state": (str,),
    "create_time": (int, float), "start_time": (int, float, None), "end_time": (int, float, None),
    "retries": (int, None), "owner": (str, None), "lease_owner": (str, None), "lease_expires": (int, float, None)}
# The path fields of stored JSON (a dataset's info, a job's runtime) and the
# field beside each that names the dataset's source (``Store._with_path``).
_PATH_SOURCES = {"path": "source", "dataset_path": "dataset_source"}
# Columns SQLite databases made before ``schema_version`` existed may lack;
# they gain them before version 1 is recorded. Rows from before owners get
# the owner '' (NO_OWNER): only admins see them (``Caller.owns``).
_UNVERSIONED_COLUMNS = {"jobs": {"retries": "INTEGER NOT NULL DEFAULT 0", "owner": "TEXT NOT NULL DEFAULT ''"},
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


def relative_path(path: str, root: Optional[pathlib.Path]) -> str:
    """``path`` (a file this process reaches, absolute or from its working
    folder) as stored: relative to the artifacts folder ``root`` when it
    lies under it (also when one of them is reached through a symlink),
    else absolute (a folder dataset outside it), or as it is when no
    ``root`` is known."""
    if not path or root is None:
        return path
    path, root = os.path.abspath(path), os.path.abspath(root)
    for base, target in ((root, path), (os.path.realpath(root), os.path.realpath(path))):
        try:
            return pathlib.PurePath(target).relative_to(base).as_posix()
        except ValueError:
            continue
    return path


def resolve_path(stored: str, root: Optional[pathlib.Path]) -> str:
    """A stored path as this process reaches it: under its artifacts folder
    ``root`` when relative; an absolute one (outside it) as it is."""
    if not stored or root is None or os.path.isabs(stored):
        return stored
    return os.path.join(os.path.abspath(root), stored)


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

    def note(self, line: str) -> None:
        """Records (and logs) something repaired in place, such as a missing table made again."""
        self._note(line)

    def _note(self, line: str) -> None:
        self.items.append(line)
        log.warning("quarantine: %s; the server goes on without it", line)


@dataclasses.dataclass(frozen=True)
class Dialect:
    """What SQLite and PostgreSQL write differently, in one place; every
    other statement is written once, with ``?`` placeholders.

    Attributes:
        name: ``sqlite`` or ``postgresql``.
        types: What the migrations' ``{serial}`` and ``{float}`` become.
        lock_row: Appended to a SELECT of one job row that a write follows
            (PostgreSQL locks it; SQLite's ``BEGIN IMMEDIATE`` already
            serialises every writer).
        skip_locked: Appended to the SELECT that claims jobs: rows another
            replica is claiming are skipped, not waited for.
        migration_lock: Run first in the migrating transaction, so replicas
            starting together migrate one after the other ('' for SQLite).
        create_lock: Run first in the transaction that counts jobs and
            inserts one (``Store.create_job`` with ``admit``), so creates on
            all replicas count and insert one after the other. PostgreSQL
            takes a transaction-scoped advisory lock: it orders creates only
            (claims, progress and lease renewals never wait on it), costs no
            retries (unlike SERIALIZABLE, whose count-then-insert conflicts
            abort and must be run again) and is released by COMMIT or
            ROLLBACK, also of a replica that dies. SQLite needs nothing:
            ``BEGIN IMMEDIATE`` takes the database's one write lock first,
            for every process that opens the file, and the reads after it
            see the newest commit.
        placeholder: The driver's parameter marker.
        json_number: ``json_number.format(column=..., key=...)`` reads a
            number from a JSON text column.
    """

    name: str
    types: dict
    lock_row: str
    skip_locked: str
    migration_lock: str
    create_lock: str
    placeholder: str
    json_number: str
    tables: str = ""

    def sql(self, text: str) -> str:
        """``text`` with this driver's placeholders (our SQL has no literal ``?`` or ``%``)."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


SQLITE = Dialect("sqlite", {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "float": "REAL"}, lock_row="",
                 skip_locked="", migration_lock="", create_lock="", placeholder="?",
                 json_number="json_extract({column}, '$.{key}')",
                 tables="SELECT name FROM sqlite_master WHERE type = 'table'")
POSTGRES = Dialect("postgresql", {"serial": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                                  "float": "DOUBLE PRECISION"},
                   lock_row=" FOR UPDATE", skip_locked=" FOR UPDATE SKIP LOCKED",
                   # Any constant: the key of lossd's migration lock.
                   migration_lock="SELECT pg_advisory_xact_lock(7432100)",
                   create_lock="SELECT pg_advisory_xact_lock(7432101)", placeholder="%s",
                   json_number="CAST(CAST({column} AS jsonb)->>'{key}' AS BIGINT)",
                   tables="SELECT table_name AS name FROM information_schema.tables "
                          "WHERE table_schema = current_schema()")


class _Connection:
    """A connection that takes our ``?`` SQL and returns rows read by column name."""

    def __init__(self, raw, dialect: Dialect):
        self.raw = raw
        self.dialect = dialect

    def execute(self, sql: str, args: Iterable[Any] = ()):
        return self.raw.execute(self.dialect.sql(sql), tuple(args))


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _why_unreadable(check: Callable[[], None]) -> Optional[str]:
    """None when ``check()`` passes; else what it found, in a line."""
    try:
        check()
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def _check_types(values: dict, types: dict[str, tuple[Any, ...]]) -> None:
    for key, allowed in types.items():
        value = values.get(key)
        if value is None and None in allowed:
            continue
        if isinstance(value, bool) or not isinstance(value, tuple(t for t in allowed if t is not None)):
            raise TypeError(f"{key} is {type(value).__name__} {str(value)[:40]!r}; expected "
                            f"{' or '.join('null' if t is None else t.__name__ for t in allowed)}")


def _payload(row) -> Optional[dict]:
    """An event's payload; None, with a warning, where it cannot be read
    (written after the checks at open, by hand or by another replica):
    watchers skip it instead of failing."""
    try:
        payload = json.loads(row["payload"])
    except (ValueError, TypeError, RecursionError):
        payload = None
    if not isinstance(payload, dict):
        log.warning("event %s of job %s has an unreadable payload; it is skipped", row["seq"], row["job_id"])
        return None
    return payload


def _check_times(values: dict, *keys: str) -> None:
    """Times must be what a protobuf Timestamp holds (years 1 to 9999), or null."""
    for key in keys:
        value = values.get(key)
        if value is not None and not _MIN_TIME <= value <= _MAX_TIME:  # NaN fails both
            raise ValueError(f"{key} is {value!r}; expected seconds since the epoch in years 1 to 9999")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _newest_version(values: Iterable[Any]) -> int:
    """The newest schema version recorded, ignoring what is not a number (0: none)."""
    return max((v for v in values if _is_int(v)), default=0)


def _check_event_row(row: dict) -> None:
    _check_types(row, {"job_id": (str,), "seq": (int,), "time": (int, float), "kind": (str,)})
    _check_times(row, "time")
    if not isinstance(json.loads(row["payload"]), dict):
        raise ValueError("the payload is not an object")


def check_dataset_info(info: Any) -> None:
    """Raises ``TypeError``/``ValueError`` for a dataset's info that is not
    what ``DATASET_FIELDS`` says (a field missing, unknown or of a wrong type)."""
    if not isinstance(info, dict):
        raise TypeError(f"the info is {type(info).__name__}, not an object")
    missing = [k for k in _DATASET_REQUIRED if k not in info]
    if missing:
        raise ValueError(f"the info lacks {', '.join(missing)}")
    unknown = sorted(set(info) - set(DATASET_FIELDS))
    if unknown:
        raise ValueError(f"the info has unknown fields {', '.join(map(str, unknown))[:100]}")
    _check_types({k: v for k, v in info.items()}, {k: DATASET_FIELDS[k] for k in info})
    shape = info.get("image_shape", [1, 1, 1])
    if len(shape) != 3 or not all(_is_int(d) and d > 0 for d in shape):
        raise ValueError(f"image_shape is {str(shape)[:60]}; expected 3 positive integers")
    if not all(isinstance(c, str) for c in info.get("class_names", ())):
        raise ValueError("class_names holds something other than text")


def _check_dataset_row(row: dict, check_dataset: Optional[Callable[[dict], Any]]) -> None:
    _check_types(row, {"name": (str,), "create_time": (int, float), "owner": (str, None)})
    _check_times(row, "create_time")
    info = json.loads(row["info"])
    check_dataset_info(info)
    _check_times(info, "create_time")
    if check_dataset is not None:
        check_dataset(info)
    if info["name"] != row["name"]:
        raise ValueError(f"the info names {info['name'][:64]!r}, the row {row['name'][:64]!r}")


@functools.lru_cache(maxsize=1)
def _reference_columns() -> dict[str, frozenset[str]]:
    """Each table's columns, as the migrations make them (in an in-memory SQLite database)."""
    db = sqlite3.connect(":memory:")
    try:
        for _, script in MIGRATIONS:
            for statement in script.format(**SQLITE.types).split(";"):
                if statement.strip():
                    db.execute(statement)
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: frozenset(r[1] for r in db.execute(f"PRAGMA table_info({t})")) for t in tables
                if not t.startswith("sqlite_")}
    finally:
        db.close()


class Store:
    """Jobs, events, datasets and registered losses: the one interface the
    server uses, whichever database is behind it. Open one with
    ``SqliteStore`` or ``PostgresStore``.

    Attributes:
        quarantine: What was moved aside at open (``Quarantine.items``).
        shared: Whether other processes (replicas) use the same database:
            then jobs are only ever taken over through expired leases,
            never because this process starts.
        artifacts_root: This process's artifacts folder
            (``artifacts.artifacts_root``): paths under it are stored
            relative to it and read back under it. None stores paths as
            given (a store that holds no artifacts' paths).
        dataset_root: This process's ``dataset_root``: the same for the
            paths of folder datasets (source ``folder``).
    """

    dialect: Dialect = SQLITE
    shared = False

    def __init__(self, quarantine: Quarantine, artifacts_root: Optional[pathlib.Path] = None,
                 dataset_root: Optional[pathlib.Path] = None):
        self.quarantine = quarantine
        self.artifacts_root = pathlib.Path(artifacts_root) if artifacts_root is not None else None
        self.dataset_root = pathlib.Path(dataset_root) if dataset_root is not None else None

    # -- what each backend provides ------------------------------------------------

    def _read(self) -> contextlib.AbstractContextManager[_Connection]:
        """A connection to read with."""
        raise NotImplementedError

    def _transaction(self, what: str) -> contextlib.AbstractContextManager[_Connection]:
        """One write transaction; a full disk becomes ``ResourceExhausted``
        (DISK_FULL) after the rollback."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _unversioned_columns(self, db: _Connection) -> None:
        """Adds the columns a database from before ``schema_version`` lacks."""

    # -- schema ----------------------------------------------------------------

    def _migrate(self) -> int:
        """Brings the schema to the newest version; returns it."""
        with self._transaction("the schema") as db:
            if self.dialect.migration_lock:
                db.execute(self.dialect.migration_lock)
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = [r["version"] for r in db.execute("SELECT version FROM schema_version").fetchall()]
            have = _newest_version(rows)
            if len(rows) != sum(_is_int(v) for v in rows):  # only SQLite, which has no column types, lets them in
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (have,))
                self.quarantine.note(f"schema_version held values other than version numbers "
                                     f"({', '.join(repr(v)[:40] for v in rows if not _is_int(v))}); kept {have}")
            if have > NEWEST_SCHEMA:
                raise StartupError(
                    f"the database has schema version {have}, newer than this lossd's {NEWEST_SCHEMA}: a newer "
                    f"lossd wrote it. Expected version {NEWEST_SCHEMA} or older. Run the newer lossd, or restore a "
                    "backup from this version; the database was left as it is")
            for version, script in MIGRATIONS:
                if version <= have:
                    continue
                for statement in script.format(**self.dialect.types).split(";"):
                    if statement.strip() and not self._done_already(db, statement):
                        db.execute(statement)
                if version == 1:
                    self._unversioned_columns(db)
                if version == 3:
                    self._relative_paths(db)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                have = version
            self._repair_tables(db)
        return have

    def _done_already(self, db: _Connection, statement: str) -> bool:
        """Whether a migration statement's table or column exists already: a
        ``schema_version`` row lost or lowered by hand makes the migrations
        after it run again, and they must not fail on what they made."""
        made = _CREATE_TABLE.match(statement)
        added = _ADD_COLUMN.match(statement)
        if not made and not added:
            return False
        tables = {r["name"] for r in db.execute(self.dialect.tables).fetchall()}
        if made:
            return made.group(1) in tables
        table, column = added.groups()
        return table in tables and column in self._column_names(db, table)

    @staticmethod
    def _column_names(db: _Connection, table: str) -> set[str]:
        return {d[0] for d in db.execute(f"SELECT * FROM {table} LIMIT 0").description}

    def _repair_tables(self, db: _Connection) -> None:
        """Makes a table the migrations made, found missing (dropped by hand,
        say), again from its statements, empty; a table that lacks one of
        its columns cannot be used (``_damaged``)."""
        expected: dict[str, list[str]] = {}
        for _, script in MIGRATIONS:
            for statement in script.format(**self.dialect.types).split(";"):
                match = _STATEMENT_TABLE.match(statement)
                if match:
                    expected.setdefault(match.group(1), []).append(statement)
        present = {r["name"] for r in db.execute(self.dialect.tables).fetchall()}
        for table, statements in expected.items():
            if table not in present:
                for statement in statements:
                    db.execute(statement)
                self.quarantine.note(f"the table {table} was missing; made again, empty")
        reference = _reference_columns()
        for table in expected:
            have = self._column_names(db, table)
            missing = sorted(reference[table] - have)
            if missing:
                raise self._damaged(f"the table {table} lacks the column(s) {', '.join(missing)}")

    def _damaged(self, why: str) -> Exception:
        """The error for a schema this code cannot use: ``SqliteStore``
        moves the file to the quarantine and starts afresh; a shared
        database is not moved, and the server does not start."""
        return StartupError(f"the database's schema cannot be used: {why}. Expected the schema lossd made "
                            f"(version {NEWEST_SCHEMA}); the database was left as it is")

    def _relative_paths(self, db: _Connection) -> None:
        """Version 3: the absolute paths under ``artifacts_root`` (and
        ``dataset_root``) that older servers stored (a dataset's ``path``, a
        job's ``dataset_path``) become relative to it. A row that cannot be
        read is left for the checks at open (``_drop_malformed_rows``)."""
        for table, key, column, field in (("datasets", "name", "info", "path"),
                                          ("jobs", "id", "runtime", "dataset_path")):
            for row in db.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                try:
                    value = json.loads(row[column])
                    stored = self._with_path(value, field, relative_path)
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue
                if stored != value:
                    db.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (json.dumps(stored), row[key]))

    def _with_path(self, data: dict, field: str, convert: Callable[[str, Optional[pathlib.Path]], str]) -> dict:
        """``data`` (a dataset's info, a job's runtime) with its path
        ``field`` converted (``relative_path`` to store, ``resolve_path`` to
        read) against the root its source's files live under; ``data``
        itself is not changed."""
        if not isinstance(data, dict) or not isinstance(data.get(field), str):
            return data
        source = data.get(_PATH_SOURCES[field])
        return {**data, field: convert(data[field], self.dataset_root if source == "folder" else self.artifacts_root)}

    def schema_version(self) -> int:
        with self._read() as db:
            return _newest_version([r["version"] for r in db.execute("SELECT version FROM schema_version")])

    def _drop_malformed_rows(self, check_job: Optional[Callable[[JobRecord], None]],
                             check_dataset: Optional[Callable[[dict], Any]] = None) -> None:
        """Moves each row of jobs (with its events), events and datasets that
        cannot be read (or that ``check_job``, ``check_dataset`` refuse) into
        the quarantine, and deletes it; sets a malformed change counter back."""
        with self._read() as db:
            jobs = [dict(r) for r in db.execute("SELECT * FROM jobs").fetchall()]
        for row in jobs:
            why = _why_unreadable(lambda: self._check_job_row(row, check_job))
            if why is not None:
                with self._read() as db:
                    events = [dict(r) for r in db.execute("SELECT * FROM events WHERE job_id = ?", (row["id"],))]
                self.quarantine.save(f"job-{str(row['id'])[:64]}", {"table": "jobs", "row": row, "events": events},
                                     f"the job row is malformed ({why})")
                with self._transaction("removing a malformed job") as db:
                    db.execute("DELETE FROM events WHERE job_id = ?", (row["id"],))
                    db.execute("DELETE FROM jobs WHERE n = ?", (row["n"],))
        with self._read() as db:
            events = [dict(r) for r in db.execute("SELECT * FROM events").fetchall()]
        for row in events:
            why = _why_unreadable(lambda: _check_event_row(row))
            if why is not None:
                self.quarantine.save(f"event-{str(row['job_id'])[:48]}-{str(row['seq'])[:12]}",
                                     {"table": "events", "row": row}, f"the event row is malformed ({why})")
                with self._transaction("removing a malformed event") as db:
                    db.execute("DELETE FROM events WHERE job_id = ? AND seq = ?", (row["job_id"], row["seq"]))
        with self._read() as db:
            counters = [dict(r) for r in db.execute("SELECT * FROM versions").fetchall()]
        for row in counters:  # change counters: a bad one is set back to 0 (replicas then reload once)
            if not (isinstance(row["name"], str) and _is_int(row["value"])):
                self.quarantine.save(f"version-{str(row['name'])[:64]}", {"table": "versions", "row": row},
                                     "the change counter is malformed; set to 0")
                with self._transaction("repairing a change counter") as db:
                    db.execute("DELETE FROM versions WHERE name = ?", (row["name"],))
                    if isinstance(row["name"], str):
                        db.execute("INSERT INTO versions (name, value) VALUES (?, 0)", (row["name"],))
        with self._read() as db:
            datasets = [dict(r) for r in db.execute("SELECT * FROM datasets").fetchall()]
        for row in datasets:
            why = _why_unreadable(lambda: _check_dataset_row(row, check_dataset))
            if why is not None:
                self.quarantine.save(f"dataset-{str(row['name'])[:64]}", {"table": "datasets", "row": row},
                                     f"the dataset row is malformed ({why})")
                with self._transaction("removing a malformed dataset") as db:
                    db.execute("DELETE FROM datasets WHERE name = ?", (row["name"],))

    def _check_job_row(self, row: dict, check_job: Optional[Callable[[JobRecord], None]]) -> None:
        _check_types(row, _JOB_COLUMNS)
        _check_times(row, "create_time", "start_time", "end_time")
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

    # -- jobs ------------------------------------------------------------------

    def _job(self, row) -> JobRecord:
        return JobRecord(
            id=row["id"], spec=json.loads(row["spec"]),
            runtime=self._with_path(json.loads(row["runtime"]), "dataset_path", resolve_path),
            model_kind=row["model_kind"], state=row["state"], create_time=row["create_time"],
            start_time=row["start_time"], end_time=row["end_time"],
            error=json.loads(row["error"]) if row["error"] else None, progress=json.loads(row["progress"]),
            request_id=row["request_id"], display_name=row["display_name"], retries=row["retries"] or 0,
            owner=row["owner"] or NO_OWNER)

    def create_job(self, job: JobRecord, admit: Optional[Callable[[Callable[..., int]], None]] = None
                   ) -> tuple[JobRecord, bool]:
        """Inserts a job and its first event; returns ``(job, created)``.

        When a job with the same ``request_id`` exists, returns it with
        ``created=False`` and inserts nothing (safe retries, AIP-155), also
        when the other create runs at the same time on another replica.

        Args:
            admit: Decides, in the insert's own transaction, whether the job
                may be added: it is called with ``count(states, owner=None)``
                (how many jobs, or ``owner``'s, are in ``states``) and raises
                to refuse; then nothing is inserted. Creates that pass an
                ``admit`` count and insert one at a time across every process
                and replica on this database (``Dialect.create_lock``), so a
                limit it checks holds exactly. A retried ``request_id`` gets
                its job without being counted.
        """
        if job.request_id:
            existing = self.get_job_by_request_id(job.request_id)
            if existing is not None:
                return existing, False
        job.create_time = job.create_time or time.time()
        with self._transaction("the new job") as db:
            if admit is not None:
                if self.dialect.create_lock:
                    db.execute(self.dialect.create_lock)
                if job.request_id:  # a create with this request_id that won meanwhile
                    row = db.execute("SELECT * FROM jobs WHERE request_id = ?", (job.request_id,)).fetchone()
                    if row is not None:
                        return self._job(row), False
                admit(lambda states, owner=None: self._count(db, states, owner))
            # ON CONFLICT DO NOTHING: a concurrent create with the same
            # request_id that committed first wins, and this one inserts nothing.
            inserted = db.execute(
                "INSERT INTO jobs (id, request_id, display_name, spec, runtime, model_kind, state, create_time,"
                " progress, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (job.id, job.request_id or None, job.display_name, json.dumps(job.spec),
                 json.dumps(self._with_path(job.runtime, "dataset_path", relative_path)), job.model_kind,
                 job.state, job.create_time, json.dumps(job.progress),
                 job.owner)).rowcount
            if inserted:
                self._append(db, job.id, "state", {"state": job.state}, job.create_time)
        if not inserted:
            existing = self.get_job_by_request_id(job.request_id) if job.request_id else None
            if existing is None:
                raise RuntimeError(f"job id {job.id} is taken")  # a 64-bit random id twice: not expected
            return existing, False
        return job, True

    def get_job(self, job_id: str) -> Optional[JobRecord]:
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row is not None else None

    def get_job_by_request_id(self, request_id: str) -> Optional[JobRecord]:
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
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
            where.append(f"state IN ({_marks(len(states))})")
            args.extend(states)
        if page_token:
            where.append("n < ?")
            args.append(_decode_token(page_token))
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY n DESC LIMIT ?"
        with self._read() as db:
            rows = db.execute(sql, (*args, page_size + 1)).fetchall()
        jobs = [self._job(r) for r in rows[:page_size]]
        token = _encode_token(rows[page_size - 1]["n"]) if len(rows) > page_size else ""
        return jobs, token

    def jobs_in_states(self, states: Iterable[str]) -> list[JobRecord]:
        """Jobs in the given states, oldest first."""
        states = list(states)
        with self._read() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({_marks(len(states))}) ORDER BY n",
                              states).fetchall()
        return [self._job(r) for r in rows]

    @staticmethod
    def _count(db: _Connection, states: Iterable[str], owner: Optional[str] = None) -> int:
        """How many jobs (``owner``'s, when it is not None) are in ``states``."""
        states = list(states)
        sql = f"SELECT COUNT(*) AS c FROM jobs WHERE state IN ({_marks(len(states))})"
        if owner is None:
            return db.execute(sql, states).fetchone()["c"]
        return db.execute(sql + " AND owner = ?", (*states, owner)).fetchone()["c"]

    def counts_by_state(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT state, COUNT(*) AS c FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["c"] for r in rows}

    def update_job(self, job_id: str, *, event: Optional[tuple[str, dict]] = None, **fields: Any) -> Optional[int]:
        """Updates columns of a job and, in the same transaction, appends an
        event ``(kind, payload)``; returns the event's sequence number."""
        encoded = {k: json.dumps(v) if k in ("error", "progress") and v is not None else v
                   for k, v in fields.items()}
        seq = None
        with self._transaction(f"an update of job {job_id}") as db:
            if encoded:
                sets = ", ".join(f"{k} = ?" for k in encoded)
                db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*encoded.values(), job_id))
            seq = self._append(db, job_id, *event, time.time()) if event else None
        return seq

    # -- leases: which replica runs a job ------------------------------------------

    def claim_jobs(self, owner: str, limit: int, lease_seconds: float, *, skip: Iterable[str] = ()
                   ) -> list[tuple[JobRecord, str]]:
        """Claims up to ``limit`` jobs for the replica ``owner``: queued ones,
        and running ones whose lease expired (their replica died), oldest
        first. Each becomes RUNNING, leased to ``owner`` for ``lease_seconds``;
        returns ``(job, state before)`` pairs. A CANCELLING job whose lease
        expired is CANCELLED here, not claimed.

        On PostgreSQL the rows are locked ``FOR UPDATE SKIP LOCKED``, so two
        replicas claiming at once never get the same job.
        """
        skip = list(skip)
        now = time.time()
        claimed = []
        with self._transaction("a job claim") as db:
            rows = db.execute(
                f"SELECT * FROM jobs WHERE {_CLAIMABLE}"
                + (f" AND id NOT IN ({_marks(len(skip))})" if skip else "")
                + f" ORDER BY n LIMIT ?{self.dialect.skip_locked}",
                (*_claimable_args(now), *skip, limit)).fetchall()
            for row in rows:
                job = self._job(row)
                if job.state == CANCELLING:  # its replica died while cancelling it
                    db.execute("UPDATE jobs SET state = ?, end_time = ?, lease_owner = NULL WHERE id = ?",
                               (CANCELLED, now, job.id))
                    self._append(db, job.id, "state", {"state": CANCELLED}, now)
                    continue
                db.execute("UPDATE jobs SET state = ?, start_time = ?, lease_owner = ?, lease_expires = ?"
                           " WHERE id = ?", (RUNNING, job.start_time or now, owner, now + lease_seconds, job.id))
                self._append(db, job.id, "state", {"state": RUNNING}, now)
                before, job.state, job.start_time = job.state, RUNNING, job.start_time or now
                claimed.append((job, before))
        return claimed

    def renew_leases(self, owner: str, job_ids: Iterable[str], lease_seconds: float) -> dict[str, str]:
        """Extends ``owner``'s leases on ``job_ids``; returns the state of each
        job it still holds. A job missing from the answer was taken over by
        another replica (its lease expired before this renewal): stop it."""
        job_ids = list(job_ids)
        if not job_ids:
            return {}
        with self._transaction("a lease renewal") as db:
            db.execute(f"UPDATE jobs SET lease_expires = ? WHERE lease_owner = ? AND id IN ({_marks(len(job_ids))})"
                       f" AND state IN (?, ?)", (time.time() + lease_seconds, owner, *job_ids, RUNNING, CANCELLING))
            rows = db.execute(f"SELECT id, state FROM jobs WHERE lease_owner = ? AND id IN ({_marks(len(job_ids))})"
                              " AND state IN (?, ?)", (owner, *job_ids, RUNNING, CANCELLING)).fetchall()
        return {r["id"]: r["state"] for r in rows}

    def cancel_queued(self, job_id: str) -> bool:
        """Cancels ``job_id`` if it is still queued (no replica claimed it);
        returns whether it was."""
        now = time.time()
        with self._transaction(f"the cancel of job {job_id}") as db:
            done = db.execute("UPDATE jobs SET state = ?, end_time = ? WHERE id = ? AND state = ?",
                              (CANCELLED, now, job_id, QUEUED)).rowcount
            if done:
                self._append(db, job_id, "state", {"state": CANCELLED}, now)
        return bool(done)

    # -- events ----------------------------------------------------------------

    def _append(self, db: _Connection, job_id: str, kind: str, payload: dict, when: float) -> int:
        # The job's row lock (PostgreSQL) orders two replicas appending to one job.
        db.execute(f"SELECT n FROM jobs WHERE id = ?{self.dialect.lock_row}", (job_id,))
        row = db.execute("SELECT COALESCE(MAX(seq), 0) AS top FROM events WHERE job_id = ?", (job_id,)).fetchone()
        seq = row["top"] + 1
        db.execute("INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
                   (job_id, seq, when, kind, json.dumps(payload)))
        return seq

    def append_event(self, job_id: str, kind: str, payload: dict) -> int:
        return self.update_job(job_id, event=(kind, payload))

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                              (job_id, after, limit)).fetchall()
        return [Event(r["job_id"], r["seq"], r["time"], r["kind"], _payload(r)) for r in rows]

    # -- datasets --------------------------------------------------------------

    def put_dataset(self, name: str, info: dict, owner: str = NO_OWNER) -> None:
        with self._transaction(f"dataset {name!r}") as db:
            db.execute("INSERT INTO datasets (name, info, create_time, owner) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT (name) DO UPDATE SET info = excluded.info, create_time = excluded.create_time,"
                       " owner = excluded.owner",
                       (name, json.dumps(self._with_path(info, "path", relative_path)),
                        info.get("create_time") or time.time(), owner))

    def get_dataset(self, name: str) -> Optional[dict]:
        """A dataset's info, with its ``owner``; None when there is none of that name."""
        with self._read() as db:
            row = db.execute("SELECT info, owner FROM datasets WHERE name = ?", (name,)).fetchone()
        return self._dataset(row) if row is not None else None

    def delete_dataset(self, name: str) -> bool:
        """Removes a dataset's record; returns whether there was one."""
        with self._transaction(f"the deletion of dataset {name!r}") as db:
            return db.execute("DELETE FROM datasets WHERE name = ?", (name,)).rowcount > 0

    def dataset_bytes(self, owner: Optional[str] = None) -> int:
        """The stored datasets' sizes (``size_bytes``), added up: all of
        them, or ``owner``'s."""
        size = self.dialect.json_number.format(column="info", key="size_bytes")
        sql = f"SELECT COALESCE(SUM({size}), 0) AS total FROM datasets"
        with self._read() as db:
            row = db.execute(sql + " WHERE owner = ?", (owner,)).fetchone() if owner is not None \
                else db.execute(sql).fetchone()
        return int(row["total"])

    def list_datasets(self) -> list[dict]:
        """Every dataset's info, with its ``owner``, by name."""
        with self._read() as db:
            rows = db.execute("SELECT info, owner FROM datasets ORDER BY name").fetchall()
        return [self._dataset(r) for r in rows]

    def _dataset(self, row) -> dict:
        return {**self._with_path(json.loads(row["info"]), "path", resolve_path), "owner": row["owner"] or NO_OWNER}

    # -- registered losses -----------------------------------------------------

    def losses(self) -> list[tuple[str, str]]:
        """Every stored loss as ``(name, record JSON text)``, oldest change first.
        The text is not parsed here: ``losses.custom.ExpressionStore`` owns its shape."""
        with self._read() as db:
            rows = db.execute("SELECT name, record FROM losses ORDER BY update_time, name").fetchall()
        return [(r["name"], r["record"]) for r in rows]

    def count_losses(self) -> int:
        with self._read() as db:
            return db.execute("SELECT COUNT(*) AS c FROM losses").fetchone()["c"]

    def put_losses(self, records: Iterable[tuple[str, dict]]) -> None:
        """Inserts or replaces ``(name, record)`` rows in one transaction.

        Raises:
            ResourceExhausted: the disk is full (DISK_FULL); nothing was written.
        """
        with self._transaction("the registered loss") as db:
            for name, record in records:
                db.execute("INSERT INTO losses (name, record, update_time) VALUES (?, ?, ?)"
                           " ON CONFLICT (name) DO UPDATE SET record = excluded.record,"
                           " update_time = excluded.update_time",
                           (name, json.dumps(record, sort_keys=True), time.time()))
            self._bump(db, LOSSES)

    def delete_loss(self, name: str) -> None:
        with self._transaction("the loss deletion") as db:
            db.execute("DELETE FROM losses WHERE name = ?", (name,))
            self._bump(db, LOSSES)

    def quarantine_loss(self, name: str, why: str) -> None:
        """Moves a stored loss row that cannot be loaded into the quarantine."""
        with self._read() as db:
            row = db.execute("SELECT * FROM losses WHERE name = ?", (name,)).fetchone()
        if row is None:
            return
        self.quarantine.save(f"loss-{str(name)[:64]}", {"table": "losses", "row": dict(row)}, why)
        self.delete_loss(name)

    # -- versions: has another replica changed something? -------------------------

    @staticmethod
    def _bump(db: _Connection, name: str) -> None:
        db.execute("INSERT INTO versions (name, value) VALUES (?, 1)"
                   " ON CONFLICT (name) DO UPDATE SET value = versions.value + 1", (name,))

    def version(self, name: str) -> int:
        """How many times the state ``name`` (``LOSSES``) has changed: one
        indexed read, for replicas that poll for each other's changes."""
        with self._read() as db:
            row = db.execute("SELECT value FROM versions WHERE name = ?", (name,)).fetchone()
        return row["value"] if row is not None else 0


    def look(self) -> "Look":
        """Everything a replica polls the shared store for, in one query: the
        version counters, the jobs by state and whether a job is claimable
        now (queued, or leased by a replica whose lease ran out)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT 'version' AS kind, name AS key, value AS n FROM versions"
                " UNION ALL SELECT 'state', state, COUNT(*) FROM jobs GROUP BY state"
                f" UNION ALL SELECT 'claimable', '', COUNT(*) FROM jobs WHERE {_CLAIMABLE}",
                _claimable_args(time.time())).fetchall()
        found: dict[str, dict[str, int]] = {"version": {}, "state": {}, "claimable": {}}
        for row in rows:
            found[row["kind"]][row["key"]] = int(row["n"])
        return Look(found["version"], found["state"], found["claimable"].get("", 0) > 0)


    # -- replicas: the job slots that are live ----------------------------------

    def publish_replica(self, replica: str, job_slots: int, lease_seconds: float) -> None:
        """Records that ``replica`` runs up to ``job_slots`` job slots, until
        ``lease_seconds`` from now unless published again. Rows of replicas
        gone for a day are dropped."""
        now = time.time()
        with self._transaction("a replica's job slots") as db:
            db.execute("INSERT INTO replicas (id, job_slots, expires) VALUES (?, ?, ?) ON CONFLICT (id)"
                       " DO UPDATE SET job_slots = excluded.job_slots, expires = excluded.expires",
                       (replica, job_slots, now + lease_seconds))
            db.execute("DELETE FROM replicas WHERE expires < ?", (now - 86400,))

    def withdraw_replica(self, replica: str) -> None:
        """``replica`` stops: its slots are no longer live."""
        with self._transaction("a replica's job slots") as db:
            db.execute("DELETE FROM replicas WHERE id = ?", (replica,))

    def live_replicas(self) -> dict[str, int]:
        """The job slots of each replica whose publication has not expired."""
        with self._read() as db:
            rows = db.execute("SELECT id, job_slots FROM replicas WHERE expires >= ?", (time.time(),)).fetchall()
        return {r["id"]: int(r["job_slots"]) for r in rows}


# The version counter of the registered losses (``Store.version``).
LOSSES = "losses"

# The jobs a replica may claim (``Store.claim_jobs``): queued ones, and running or cancelling
# ones whose replica stopped renewing its lease. Its arguments: ``_claimable_args(now)``.
_CLAIMABLE = "(state = ? OR (state IN (?, ?) AND (lease_expires IS NULL OR lease_expires < ?)))"


def _claimable_args(now: float) -> tuple:
    return QUEUED, RUNNING, CANCELLING, now


@dataclasses.dataclass(frozen=True)
class Look:
    """One poll of a shared store (``Store.look``)."""

    versions: dict[str, int]  # counter name (``LOSSES``) -> value; a counter never bumped is absent
    counts: dict[str, int]    # job state -> how many jobs are in it
    claimable: bool           # whether some job can be claimed now


class Follower:
    """Polls a shared store for what other replicas changed: one ``look``
    (one query) every ``interval`` seconds on a thread of its own, handed to
    every listener (the registered losses, the training scheduler). A look
    or listener that fails is tried again at the next interval and logged
    once per run of failures; an unreachable database is left to the
    store, which logs each outage once."""

    def __init__(self, store: Store, interval: float):
        self.store = store
        self.interval = interval
        self._listeners: list[Callable[[Look], None]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def listen(self, listener: Callable[[Look], None]) -> None:
        """Calls ``listener(look)`` after every successful look."""
        self._listeners.append(listener)

    def start(self) -> None:
        """Starts looking, the first look one interval from now."""
        self._thread = threading.Thread(target=self._follow, name="store-follower", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        failing: set = set()  # the look (None) and the listeners whose last try failed: logged once
        while not self._stop.wait(self.interval):
            for step in (None, *self._listeners):
                try:
                    if step is None:
                        look = self.store.look()
                    else:
                        step(look)
                    failing.discard(step)
                except Exception as exc:  # noqa: BLE001 - the next look may work
                    # An unreachable database is logged once per outage by the store itself.
                    if step not in failing and not isinstance(exc, Unavailable):
                        log.warning("could not %s: %s", "look for the changes of other replicas in the shared "
                                    "store" if step is None else f"follow them ({step.__qualname__})", exc)
                    failing.add(step)
                    if step is None:
                        break

    def stop(self) -> None:
        """Stops looking; returns once a look under way has ended (5 s at most)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class SqliteStore(Store):
    """The embedded store: ``<data_dir>/lossd.sqlite3``, for one server process.

    Args:
        path: The database file; its folder is created.
        check_job: Raises ``ValueError`` (or ``KeyError``/``TypeError``) for a
            job record the server could not serve; such rows are moved to the
            quarantine at open. ``jobs.check_record`` in the server.
        check_dataset: The same for a dataset's info (``DatasetInfo.from_dict``
            in the server).
        quarantine: Where unreadable state goes; ``<folder of path>/quarantine``
            by default.
        artifacts_root, dataset_root: As for ``Store``.
    """

    dialect = SQLITE
    shared = False

    def __init__(self, path: pathlib.Path, *, check_job: Optional[Callable[[JobRecord], None]] = None,
                 check_dataset: Optional[Callable[[dict], Any]] = None,
                 quarantine: Optional[Quarantine] = None, artifacts_root: Optional[pathlib.Path] = None,
                 dataset_root: Optional[pathlib.Path] = None):
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(quarantine or Quarantine(path.parent / QUARANTINE_DIR), artifacts_root, dataset_root)
        self.path = path
        self._lock = threading.RLock()
        if path.exists() and not path.is_file():  # a directory (or a socket...) where the file should be
            self.quarantine.move(path, "it is not a file; a new, empty database replaces it",
                                 companions=[path.with_name(path.name + s) for s in ("-wal", "-shm")])
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise
            self.quarantine.move(path, f"the SQLite database is damaged ({exc}); a new, empty one replaces it",
                                 companions=[path.with_name(path.name + s) for s in ("-wal", "-shm")])
            self._db = self._open()
        self._drop_malformed_rows(check_job, check_dataset)

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
            self._db = db
            self._migrate()
        except sqlite3.DatabaseError as exc:
            db.close()
            if not getattr(exc, "sqlite_errorcode", 0):
                exc.sqlite_errorcode = _SQLITE_CORRUPT  # quick_check's findings
            raise
        return db

    def _damaged(self, why: str) -> Exception:
        exc = sqlite3.DatabaseError(why)
        exc.sqlite_errorcode = _SQLITE_CORRUPT  # so the file moves to the quarantine, as a torn one does
        return exc

    def _unversioned_columns(self, db: _Connection) -> None:
        for table, columns in _UNVERSIONED_COLUMNS.items():
            have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
            for name, definition in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")

    @contextlib.contextmanager
    def _read(self) -> Iterator[_Connection]:
        with self._lock:
            yield _Connection(self._db, SQLITE)

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[_Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield _Connection(self._db, SQLITE)
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


# How long psycopg_pool retries one lost connection (1, 2, 2 s apart) before the next call starts over.
RECONNECT_SECONDS = 5.0


class PostgresStore(Store):
    """The shared store: one PostgreSQL database for every replica
    (``LOSSD_DATABASE_URL``), through a pool of psycopg 3 connections.

    Args:
        url: A libpq connection string or URL (``postgresql://user@host/db``).
        quarantine: Where unreadable rows go (this replica's data directory).
        check_job: As for ``SqliteStore``.
        pool_size: Most connections this replica opens.
        connect_timeout: How long opening waits for the database.
        artifacts_root, dataset_root: As for ``Store``.

    Raises:
        ConnectionError: the database cannot be reached within ``connect_timeout``.
    """

    dialect = POSTGRES
    shared = True

    def __init__(self, url: str, *, quarantine: Quarantine, check_job: Optional[Callable[[JobRecord], None]] = None,
                 check_dataset: Optional[Callable[[dict], Any]] = None,
                 pool_size: int = 8, connect_timeout: float = 10.0, artifacts_root: Optional[pathlib.Path] = None,
                 dataset_root: Optional[pathlib.Path] = None):
        from psycopg.rows import dict_row  # the server extra: imported only when PostgreSQL is used
        from psycopg_pool import ConnectionPool, PoolTimeout

        super().__init__(quarantine, artifacts_root, dataset_root)
        self.url = url
        # psycopg_pool warns at every failed reconnect while the database is
        # down (a line a second, then further apart, for as long as it lasts);
        # this store says once that the database went away and once that it
        # is back (``_reachable``). The pool's errors still show, and a level
        # someone set on its logger is left alone.
        pool_log = logging.getLogger("psycopg.pool")
        if pool_log.level == logging.NOTSET:
            pool_log.setLevel(logging.ERROR)
        self._outage = threading.Lock()
        self._down_since: Optional[float] = None  # monotonic time the outage was first seen; None: up
        # psycopg_pool retries a lost connection 1, 2, 4, 8 ... s apart for
        # reconnect_timeout (5 minutes by default): after an outage of a
        # minute, a replica would stay UNAVAILABLE for up to another minute
        # with the database back. Giving up after RECONNECT_SECONDS lets the
        # next call (the Follower's look, twice a second) start over at once,
        # so a replica answers within a few seconds of the database's return.
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout,
                                    kwargs={"autocommit": True, "row_factory": dict_row},
                                    name="lossd-store", reconnect_timeout=RECONNECT_SECONDS)
        self._pool.open()
        try:
            self._pool.wait(timeout=connect_timeout)
        except PoolTimeout:
            self._pool.close()
            raise ConnectionError(f"cannot connect to the PostgreSQL database at {_redact_url(url)} within "
                                  f"{connect_timeout:g} s") from None
        self._migrate()
        self._drop_malformed_rows(check_job, check_dataset)

    @contextlib.contextmanager
    def _read(self) -> Iterator[_Connection]:
        with self._reachable("reading the shared state"), self._pool.connection() as raw:
            yield _Connection(raw, POSTGRES)

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[_Connection]:
        from psycopg import errors

        try:
            with self._reachable(f"saving {what}"), self._pool.connection() as raw, raw.transaction():
                yield _Connection(raw, POSTGRES)
        except errors.DiskFull as exc:
            raise disk_full_error(what) from exc

    @contextlib.contextmanager
    def _reachable(self, what: str) -> Iterator[None]:
        """A database that cannot be reached (down, restarting, the pool
        exhausted for its timeout) is UNAVAILABLE (DATABASE_UNAVAILABLE),
        which clients retry; the pool replaces broken connections. The
        first failure of an outage is logged (a warning), and the first
        success after it (an info line); the failures between are not."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            yield
        except (psycopg.OperationalError, PoolTimeout) as exc:
            if isinstance(exc, psycopg.errors.DiskFull):
                raise
            self._went_away(what, exc)
            raise Unavailable(f"The shared database is unreachable: {what} failed. Expected the PostgreSQL server "
                              f"at {_redact_url(self.url)} to answer; retry shortly.",
                              reason="DATABASE_UNAVAILABLE") from None
        if self._down_since is not None:
            self._came_back()

    def _went_away(self, what: str, exc: Exception) -> None:
        with self._outage:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        log.warning("the PostgreSQL database at %s is unreachable (%s failed: %s); calls that need it are "
                    "UNAVAILABLE (DATABASE_UNAVAILABLE) until it answers again, which will be logged",
                    _redact_url(self.url), what, " ".join(str(exc).split())[:300])

    def _came_back(self) -> None:
        with self._outage:
            if self._down_since is None:
                return
            seconds, self._down_since = time.monotonic() - self._down_since, None
        log.info("the PostgreSQL database at %s answers again, after %.1f s unreachable", _redact_url(self.url),
                 seconds)

    def close(self) -> None:
        self._pool.close()


def _redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
