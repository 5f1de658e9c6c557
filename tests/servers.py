"""Real lossd servers for tests: in process (one factory for every suite),
or as `lossd serve` processes that a test can kill."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Optional, Sequence


@contextlib.contextmanager
def lossd_servers(tmp_path_factory, **defaults) -> Iterator:
    """Yields ``start(data_dir=None, **settings)``, which builds and starts a
    server on a free loopback port (metrics on a free port too) with its own
    data directory unless given, and returns the ``Server``. ``defaults``
    apply to every server; every server still running is stopped on exit."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    servers = []

    def start(data_dir=None, **overrides):
        settings = Settings(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grace_seconds": 0, **defaults,
                               "data_dir": data_dir or tmp_path_factory.mktemp("lossd-data"), **overrides})
        srv = create_server(settings, metrics_registry=CollectorRegistry())
        srv.start()
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            srv.stop(0)


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(data_dir: pathlib.Path, log: pathlib.Path, env: Optional[dict] = None, *,
                  token: Optional[str] = None, args: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    """Starts the real `lossd serve` command on a free port, with ``data_dir``,
    in a process group of its own (``kill_group`` ends it with its job
    processes), its output appended to ``log``; ``env`` adds variables
    (``LOSSD_*`` settings) and ``args`` more flags (a repeated flag's last
    value wins: ``--metrics-port N`` serves metrics). Returns the process and its address once it
    answers (asked with ``token``, for a server with a tokens file)."""
    import lossd

    port = free_port()
    lossd_cmd = pathlib.Path(sys.executable).with_name("lossd")
    proc = subprocess.Popen([str(lossd_cmd), "serve", "--port", str(port), "--metrics-port", "off",
                             "--data-dir", str(data_dir), "--grace-seconds", "0", *args],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    with lossd.Client(address, timeout=2, token=token) as client:
        while True:
            try:
                client.list_jobs(limit=1)
                return proc, address
            except lossd.LossdError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    kill_group(proc)
                    raise RuntimeError(f"lossd serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to ``proc``'s whole process group: the server and any job process it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return False
