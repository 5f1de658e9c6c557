"""``PostgresStore``: the shared store (``LOSSD_DATABASE_URL=postgresql://...``),
one PostgreSQL database that several replicas share, through a psycopg 3
connection pool. An unreachable database is UNAVAILABLE
(DATABASE_UNAVAILABLE), logged once per outage."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import re
import threading
import time
from typing import Any, Callable, Iterator, Optional

from lossd_server.errors import Unavailable, disk_full_error
from lossd_server.state.dialect import POSTGRES, Connection
from lossd_server.state.quarantine import Quarantine
from lossd_server.state.store import JobRecord, Store

log = logging.getLogger(__name__)

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
    def _read(self) -> Iterator[Connection]:
        with self._reachable("reading the shared state"), self._pool.connection() as raw:
            yield Connection(raw, POSTGRES)

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[Connection]:
        from psycopg import errors

        try:
            with self._reachable(f"saving {what}"), self._pool.connection() as raw, raw.transaction():
                yield Connection(raw, POSTGRES)
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
