"""``SqliteStore``: the embedded store, one SQLite database under the data
directory (WAL mode, so readers never wait on the writer), for one server
process. A damaged file, or a directory where the file should be, is moved
whole into the quarantine and a fresh database made."""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
import threading
from typing import Any, Callable, Iterator, Optional

from lossd_server.errors import disk_full, disk_full_error
from lossd_server.state.dialect import SQLITE, Connection
from lossd_server.state.quarantine import QUARANTINE_DIR, Quarantine
from lossd_server.state.schema import UNVERSIONED_COLUMNS
from lossd_server.state.store import JobRecord, Store

# SQLite primary result codes (the low byte of sqlite_errorcode).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


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

    def _unversioned_columns(self, db: Connection) -> None:
        for table, columns in UNVERSIONED_COLUMNS.items():
            have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
            for name, definition in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._lock:
            yield Connection(self._db, SQLITE)

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield Connection(self._db, SQLITE)
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
