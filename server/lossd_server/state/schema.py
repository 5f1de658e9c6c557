"""The schema: the versioned migrations that build it (``MIGRATIONS``,
recorded in ``schema_version``), the repairs made at open, and what a
readable row holds (the checks that send a malformed one to the
quarantine).

Both stores run the same migrations; what the two dialects write
differently is filled in from ``Dialect.types``. A database whose
``schema_version`` is newer than this code is refused (``StartupError``,
``lossd serve`` exits 2) and left as it is.
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
from typing import Any, Callable, Iterable, Mapping, Optional

from lossd_server.config import StartupError
from lossd_server.state.dialect import SQLITE, Connection
from lossd_server.state.quarantine import Quarantine

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
    # Loss monitors (``lossd_server.monitors``): each monitor with its
    # counters, the halves of ids waiting for their other half, the pairs'
    # per-sample losses (and the predictions that expired unlabelled), the
    # segments seen and the frozen reference losses.
    (5, """
CREATE TABLE monitors (
    n                   {serial},
    name                TEXT NOT NULL UNIQUE,
    spec                TEXT NOT NULL,
    owner               TEXT NOT NULL DEFAULT '',
    create_time         {float} NOT NULL,
    pending_predictions BIGINT NOT NULL DEFAULT 0,
    pending_labels      BIGINT NOT NULL DEFAULT 0,
    expired_predictions BIGINT NOT NULL DEFAULT 0,
    expired_labels      BIGINT NOT NULL DEFAULT 0,
    samples             BIGINT NOT NULL DEFAULT 0,
    reference_time      {float},
    reference_window    {float}
);
CREATE TABLE monitor_pending (
    monitor      TEXT NOT NULL,
    id           TEXT NOT NULL,
    segment      TEXT NOT NULL DEFAULT '',
    pred_dtype   INTEGER,
    pred_shape   TEXT,
    pred         {blob},
    observe_time {float},
    true_dtype   INTEGER,
    true_shape   TEXT,
    label        {blob},
    label_time   {float},
    PRIMARY KEY (monitor, id)
);
CREATE INDEX IF NOT EXISTS monitor_pending_observed ON monitor_pending(monitor, observe_time);
CREATE INDEX IF NOT EXISTS monitor_pending_labelled ON monitor_pending(monitor, label_time);
CREATE TABLE monitor_samples (
    monitor      TEXT NOT NULL,
    id           TEXT NOT NULL,
    segment      TEXT NOT NULL,
    time         {float} NOT NULL,
    observe_time {float} NOT NULL,
    label_time   {float},
    loss         {float},
    PRIMARY KEY (monitor, id)
);
CREATE INDEX IF NOT EXISTS monitor_samples_time ON monitor_samples(monitor, time);
CREATE TABLE monitor_segments (
    monitor TEXT NOT NULL,
    segment TEXT NOT NULL,
    PRIMARY KEY (monitor, segment)
);
CREATE TABLE monitor_reference (
    monitor TEXT NOT NULL,
    segment TEXT NOT NULL,
    loss    {float} NOT NULL
);
CREATE INDEX IF NOT EXISTS monitor_reference_monitor ON monitor_reference(monitor)
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
JOB_COLUMNS: dict[str, tuple[Any, ...]] = {
    "id": (str,), "request_id": (str, None), "display_name": (str,), "model_kind": (str,), "state": (str,),
    "create_time": (int, float), "start_time": (int, float, None), "end_time": (int, float, None),
    "retries": (int, None), "owner": (str, None), "lease_owner": (str, None), "lease_expires": (int, float, None)}
# Columns SQLite databases made before ``schema_version`` existed may lack;
# they gain them before version 1 is recorded. Rows from before owners get
# the owner '' (NO_OWNER): only admins see them (``Caller.owns``).
UNVERSIONED_COLUMNS = {"jobs": {"retries": "INTEGER NOT NULL DEFAULT 0", "owner": "TEXT NOT NULL DEFAULT ''"},
                        "datasets": {"owner": "TEXT NOT NULL DEFAULT ''"}}


def why_unreadable(check: Callable[[], None]) -> Optional[str]:
    """None when ``check()`` passes; else what it found, in a line."""
    try:
        check()
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def check_types(values: dict, types: dict[str, tuple[Any, ...]]) -> None:
    for key, allowed in types.items():
        value = values.get(key)
        if value is None and None in allowed:
            continue
        if isinstance(value, bool) or not isinstance(value, tuple(t for t in allowed if t is not None)):
            raise TypeError(f"{key} is {type(value).__name__} {str(value)[:40]!r}; expected "
                            f"{' or '.join('null' if t is None else t.__name__ for t in allowed)}")


def check_times(values: dict, *keys: str) -> None:
    """Times must be what a protobuf Timestamp holds (years 1 to 9999), or null."""
    for key in keys:
        value = values.get(key)
        if value is not None and not _MIN_TIME <= value <= _MAX_TIME:  # NaN fails both
            raise ValueError(f"{key} is {value!r}; expected seconds since the epoch in years 1 to 9999")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def newest_version(values: Iterable[Any]) -> int:
    """The newest schema version recorded, ignoring what is not a number (0: none)."""
    return max((v for v in values if is_int(v)), default=0)


def check_event_row(row: dict) -> None:
    check_types(row, {"job_id": (str,), "seq": (int,), "time": (int, float), "kind": (str,)})
    check_times(row, "time")
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
    check_types({k: v for k, v in info.items()}, {k: DATASET_FIELDS[k] for k in info})
    shape = info.get("image_shape", [1, 1, 1])
    if len(shape) != 3 or not all(is_int(d) and d > 0 for d in shape):
        raise ValueError(f"image_shape is {str(shape)[:60]}; expected 3 positive integers")
    if not all(isinstance(c, str) for c in info.get("class_names", ())):
        raise ValueError("class_names holds something other than text")


def check_dataset_row(row: dict, check_dataset: Optional[Callable[[dict], Any]]) -> None:
    check_types(row, {"name": (str,), "create_time": (int, float), "owner": (str, None)})
    check_times(row, "create_time")
    info = json.loads(row["info"])
    check_dataset_info(info)
    check_times(info, "create_time")
    if check_dataset is not None:
        check_dataset(info)
    if info["name"] != row["name"]:
        raise ValueError(f"the info names {info['name'][:64]!r}, the row {row['name'][:64]!r}")


@functools.lru_cache(maxsize=1)
def reference_columns() -> dict[str, frozenset[str]]:
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


def migrate(db: Connection, quarantine: Quarantine, *, after: Mapping[int, Callable[[Connection], None]],
            damaged: Callable[[str], Exception]) -> int:
    """Brings the schema to the newest version inside the transaction ``db``
    and returns it; then makes missing tables again (``repair_tables``).

    Args:
        after: Steps a store runs right after a version's statements, in the
            same transaction (the columns an unversioned SQLite database
            lacks after 1, the paths made relative after 3).
        damaged: The error to raise for a schema that cannot be used.

    Raises:
        StartupError: the database's schema is newer than this code's.
    """
    if db.dialect.migration_lock:
        db.execute(db.dialect.migration_lock)
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    rows = [r["version"] for r in db.execute("SELECT version FROM schema_version").fetchall()]
    have = newest_version(rows)
    if len(rows) != sum(is_int(v) for v in rows):  # only SQLite, which has no column types, lets them in
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (have,))
        quarantine.note(f"schema_version held values other than version numbers "
                        f"({', '.join(repr(v)[:40] for v in rows if not is_int(v))}); kept {have}")
    if have > NEWEST_SCHEMA:
        raise StartupError(
            f"the database has schema version {have}, newer than this lossd's {NEWEST_SCHEMA}: a newer "
            f"lossd wrote it. Expected version {NEWEST_SCHEMA} or older. Run the newer lossd, or restore a "
            "backup from this version; the database was left as it is")
    for version, script in MIGRATIONS:
        if version <= have:
            continue
        for statement in script.format(**db.dialect.types).split(";"):
            if statement.strip() and not _done_already(db, statement):
                db.execute(statement)
        if version in after:
            after[version](db)
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        have = version
    repair_tables(db, quarantine, damaged)
    return have


def _done_already(db: Connection, statement: str) -> bool:
    """Whether a migration statement's table or column exists already: a
    ``schema_version`` row lost or lowered by hand makes the migrations
    after it run again, and they must not fail on what they made."""
    made = _CREATE_TABLE.match(statement)
    added = _ADD_COLUMN.match(statement)
    if not made and not added:
        return False
    tables = {r["name"] for r in db.execute(db.dialect.tables).fetchall()}
    if made:
        return made.group(1) in tables
    table, column = added.groups()
    return table in tables and column in column_names(db, table)


def column_names(db: Connection, table: str) -> set[str]:
    """The columns ``table`` has in the database."""
    return {d[0] for d in db.execute(f"SELECT * FROM {table} LIMIT 0").description}


def repair_tables(db: Connection, quarantine: Quarantine, damaged: Callable[[str], Exception]) -> None:
    """Makes a table the migrations made, found missing (dropped by hand,
    say), again from its statements, empty; a table that lacks one of its
    columns cannot be used (``damaged`` is raised)."""
    expected: dict[str, list[str]] = {}
    for _, script in MIGRATIONS:
        for statement in script.format(**db.dialect.types).split(";"):
            match = _STATEMENT_TABLE.match(statement)
            if match:
                expected.setdefault(match.group(1), []).append(statement)
    present = {r["name"] for r in db.execute(db.dialect.tables).fetchall()}
    for table, statements in expected.items():
        if table not in present:
            for statement in statements:
                db.execute(statement)
            quarantine.note(f"the table {table} was missing; made again, empty")
    reference = reference_columns()
    for table in expected:
        missing = sorted(reference[table] - column_names(db, table))
        if missing:
            raise damaged(f"the table {table} lacks the column(s) {', '.join(missing)}")
