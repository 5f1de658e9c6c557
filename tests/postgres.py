"""A real PostgreSQL server for tests, in a temporary folder.

``initdb`` makes a cluster there and ``pg_ctl`` starts it on a free port of
127.0.0.1, with its socket in the same folder; it is stopped (fast shutdown,
then SIGKILL) at the end. PostgreSQL refuses to run as root, so as root (CI)
the cluster belongs to the unprivileged ``nobody`` and its programs run as
that user; the folder is made outside pytest's temporary folders, which
root's mode 0700 would hide from ``nobody``.

The binaries come from PATH or Debian's ``postgresql`` package
(``/usr/lib/postgresql/<version>/bin``). Without them the fixture fails with
a line saying what to install (``make test-tools`` installs it): a test of
the PostgreSQL store never skips.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from typing import Iterator, Optional

from tests.servers import free_port

# The user that runs the cluster when the tests run as root.
UNPRIVILEGED_USER = "nobody"


def binaries() -> pathlib.Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Raises:
        RuntimeError: PostgreSQL is not installed (say what to install).
    """
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return pathlib.Path(os.path.realpath(found)).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                         reverse=True):
        if os.access(os.path.join(folder, "initdb"), os.X_OK):
            return pathlib.Path(folder)
    raise RuntimeError("PostgreSQL is not installed: the PostgreSQL store tests need initdb and pg_ctl "
                       "(apt-get install postgresql, or run `make test-tools` as root)")


class PostgresServer:
    """A running cluster: ``url(database)`` connects to it, ``create_database()``
    makes a fresh empty database (each test its own)."""

    def __init__(self, folder: pathlib.Path, port: int, user: str, *, bin_dir: pathlib.Path, options: str,
                 env: dict, as_user: dict):
        self.folder = folder
        self.port = port
        self.user = user
        self.bin_dir = bin_dir
        self.options = options
        self.env = env
        self.as_user = as_user

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stops the server (fast shutdown: clients are disconnected); ``start`` starts it again."""
        self._ctl("-m", "fast", "stop")

    def start(self) -> None:
        self._ctl("-o", self.options, "start")

    def _ctl(self, *args: str) -> None:
        done = subprocess.run([str(self.bin_dir / "pg_ctl"), "-D", str(self.folder / "data"), "-l",
                               str(self.folder / "server.log"), "-w", "-t", "60", *args], capture_output=True,
                              text=True, timeout=90, env=self.env, cwd=self.folder, **self.as_user)
        if done.returncode != 0:
            log = (self.folder / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl {args[-1]} failed ({done.returncode}): {done.stderr[-1000:]}\n{log}")


def _as_user(user: Optional[str]) -> dict:
    """``subprocess`` arguments that run a program as ``user`` (None: as we are)."""
    if user is None:
        return {}
    record = pwd.getpwnam(user)
    return {"user": record.pw_uid, "group": record.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Starts a PostgreSQL cluster in a new temporary folder; stops it and
    removes the folder on exit."""
    bin_dir = binaries()
    run_as = UNPRIVILEGED_USER if os.geteuid() == 0 else None
    folder = pathlib.Path(tempfile.mkdtemp(prefix="lossd-pg-"))
    data = folder / "data"
    if run_as is not None:
        record = pwd.getpwnam(run_as)
        os.chown(folder, record.pw_uid, record.pw_gid)
    as_user = _as_user(run_as)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    db_user = "lossd"
    port = free_port()
    try:
        done = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", db_user, "--auth=trust",
                               "--no-sync", "-E", "UTF8"], capture_output=True, text=True, timeout=120, env=env,
                              cwd=folder, **as_user)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")
        options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                   "-c shared_buffers=32MB")
        server = PostgresServer(folder, port, db_user, bin_dir=bin_dir, options=options, env=env, as_user=as_user)
        server.start()
        yield server
    finally:
        _stop(bin_dir, data, env, folder, as_user)
        shutil.rmtree(folder, ignore_errors=True)


def _stop(bin_dir: pathlib.Path, data: pathlib.Path, env: dict, folder: pathlib.Path, as_user: dict) -> None:
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return
    subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "20", "stop"],
                   capture_output=True, timeout=30, env=env, cwd=folder, **as_user)
    if pid_file.exists():  # it did not stop: end it
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text().split()[0]), 9)
            time.sleep(0.5)
