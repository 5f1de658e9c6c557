"""The store: jobs, their events, datasets, registered losses and replicas,
behind one interface (``Store``) with two backends.

- ``SqliteStore`` (``state.sqlite``), the embedded default: one SQLite
  database under the data directory, one process.
- ``PostgresStore`` (``state.postgres``, ``LOSSD_DATABASE_URL=postgresql://...``):
  one PostgreSQL database that several replicas share.

Both run the same SQL (``Store``) over the same schema, built by the same
versioned migrations (``state.schema``); what the two dialects write
differently (a column type, a row lock, a JSON field) is in
``state.dialect.Dialect`` and nowhere else.

Paths of files under the artifacts folder (an uploaded dataset's file, the
dataset a job trains on) are stored relative to it, and those of folder
datasets relative to the dataset root; when read they are resolved against
the folders of the process that reads them, so replicas may mount the
shared folders at different paths (``relative_path``, ``resolve_path``).

Everything a restart needs is here: a job's spec, state, times, error and
latest progress, the lease of the replica running it, every event it
emitted (WatchJob replays them), and each registered loss as one row.

State that cannot be read never stops the server: a malformed row of jobs,
events or datasets found at open is copied to the quarantine
(``state.quarantine``) as JSON and removed; an event whose payload cannot be
read later is skipped with a warning. A full disk is ``ResourceExhausted``
(DISK_FULL), never a bare database error.
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
import time
from typing import Any, Callable, Iterable, Optional

from lossd_server.config import StartupError
from lossd_server.errors import InvalidArgument
from lossd_server.state import schema
from lossd_server.state.dialect import Connection, Dialect, marks
from lossd_server.state.quarantine import Quarantine

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelling", "cancelled")
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED)
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)

# The path fields of stored JSON (a dataset's info, a job's runtime) and the
# field beside each that names the dataset's source (``Store._with_path``).
_PATH_SOURCES = {"path": "source", "dataset_path": "dataset_source"}
# The owner of what was made before owners were recorded, or by the
# anonymous caller of a server without tokens.
NO_OWNER = ""


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

    dialect: Dialect  # each backend's
    shared = False

    def __init__(self, quarantine: Quarantine, artifacts_root: Optional[pathlib.Path] = None,
                 dataset_root: Optional[pathlib.Path] = None):
        self.quarantine = quarantine
        self.artifacts_root = pathlib.Path(artifacts_root) if artifacts_root is not None else None
        self.dataset_root = pathlib.Path(dataset_root) if dataset_root is not None else None

    # -- what each backend provides ------------------------------------------------

    def _read(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection to read with."""
        raise NotImplementedError

    def _transaction(self, what: str) -> contextlib.AbstractContextManager[Connection]:
        """One write transaction; a full disk becomes ``ResourceExhausted``
        (DISK_FULL) after the rollback."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _unversioned_columns(self, db: Connection) -> None:
        """Adds the columns a database from before ``schema_version`` lacks."""

    # -- schema ----------------------------------------------------------------

    def _migrate(self) -> int:
        """Brings the schema to the newest version (``schema.migrate``), in
        one transaction; returns it."""
        with self._transaction("the schema") as db:
            return schema.migrate(db, self.quarantine, after={1: self._unversioned_columns, 3: self._relative_paths},
                                  damaged=self._damaged)

    def _damaged(self, why: str) -> Exception:
        """The error for a schema this code cannot use: ``SqliteStore``
        moves the file to the quarantine and starts afresh; a shared
        database is not moved, and the server does not start."""
        return StartupError(f"the database's schema cannot be used: {why}. Expected the schema lossd made "
                            f"(version {schema.NEWEST_SCHEMA}); the database was left as it is")

    def _relative_paths(self, db: Connection) -> None:
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
            return schema.newest_version([r["version"] for r in db.execute("SELECT version FROM schema_version")])

    def _drop_malformed_rows(self, check_job: Optional[Callable[[JobRecord], None]],
                             check_dataset: Optional[Callable[[dict], Any]] = None) -> None:
        """Moves each row of jobs (with its events), events and datasets that
        cannot be read (or that ``check_job``, ``check_dataset`` refuse) into
        the quarantine, and deletes it; sets a malformed change counter back."""
        with self._read() as db:
            jobs = [dict(r) for r in db.execute("SELECT * FROM jobs").fetchall()]
        for row in jobs:
            why = schema.why_unreadable(lambda: self._check_job_row(row, check_job))
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
            why = schema.why_unreadable(lambda: schema.check_event_row(row))
            if why is not None:
                self.quarantine.save(f"event-{str(row['job_id'])[:48]}-{str(row['seq'])[:12]}",
                                     {"table": "events", "row": row}, f"the event row is malformed ({why})")
                with self._transaction("removing a malformed event") as db:
                    db.execute("DELETE FROM events WHERE job_id = ? AND seq = ?", (row["job_id"], row["seq"]))
        with self._read() as db:
            counters = [dict(r) for r in db.execute("SELECT * FROM versions").fetchall()]
        for row in counters:  # change counters: a bad one is set back to 0 (replicas then reload once)
            if not (isinstance(row["name"], str) and schema.is_int(row["value"])):
                self.quarantine.save(f"version-{str(row['name'])[:64]}", {"table": "versions", "row": row},
                                     "the change counter is malformed; set to 0")
                with self._transaction("repairing a change counter") as db:
                    db.execute("DELETE FROM versions WHERE name = ?", (row["name"],))
                    if isinstance(row["name"], str):
                        db.execute("INSERT INTO versions (name, value) VALUES (?, 0)", (row["name"],))
        with self._read() as db:
            datasets = [dict(r) for r in db.execute("SELECT * FROM datasets").fetchall()]
        for row in datasets:
            why = schema.why_unreadable(lambda: schema.check_dataset_row(row, check_dataset))
            if why is not None:
                self.quarantine.save(f"dataset-{str(row['name'])[:64]}", {"table": "datasets", "row": row},
                                     f"the dataset row is malformed ({why})")
                with self._transaction("removing a malformed dataset") as db:
                    db.execute("DELETE FROM datasets WHERE name = ?", (row["name"],))

    def _check_job_row(self, row: dict, check_job: Optional[Callable[[JobRecord], None]]) -> None:
        schema.check_types(row, schema.JOB_COLUMNS)
        schema.check_times(row, "create_time", "start_time", "end_time")
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
            where.append(f"state IN ({marks(len(states))})")
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
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({marks(len(states))}) ORDER BY n",
                              states).fetchall()
        return [self._job(r) for r in rows]

    @staticmethod
    def _count(db: Connection, states: Iterable[str], owner: Optional[str] = None) -> int:
        """How many jobs (``owner``'s, when it is not None) are in ``states``."""
        states = list(states)
        sql = f"SELECT COUNT(*) AS c FROM jobs WHERE state IN ({marks(len(states))})"
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
                + (f" AND id NOT IN ({marks(len(skip))})" if skip else "")
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
            db.execute(f"UPDATE jobs SET lease_expires = ? WHERE lease_owner = ? AND id IN ({marks(len(job_ids))})"
                       f" AND state IN (?, ?)", (time.time() + lease_seconds, owner, *job_ids, RUNNING, CANCELLING))
            rows = db.execute(f"SELECT id, state FROM jobs WHERE lease_owner = ? AND id IN ({marks(len(job_ids))})"
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

    def _append(self, db: Connection, job_id: str, kind: str, payload: dict, when: float) -> int:
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
    def _bump(db: Connection, name: str) -> None:
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
