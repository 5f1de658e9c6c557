"""Real lossd servers for tests: in process (one factory for every suite),
or as `lossd serve` processes that a test can kill."""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
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


# How long a test waits for what only a busy machine makes slow: a `lossd serve`
# process starting (importing TensorFlow), a tiny training job finishing. A
# deadline against a hang, not a bound on speed: in a parallel run on this
# loaded 2-core machine, starts took over 90 s and tiny jobs over 180 s.
PATIENCE = 600.0

# free_port's ports: below the kernel's ephemeral range, a block per pytest-xdist worker.
PORTS_FROM = 12_000
PORTS_PER_WORKER = 800
_next_port: dict[str, int] = {}


def _ephemeral_start() -> int:
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA range's start
        return 49152


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` free right now, for a server started after
    this returns (a ``lossd serve`` process, PostgreSQL, Prometheus).

    Not port 0's pick: between this call and the server's bind, a port from
    the ephemeral range can go to another worker's ``free_port`` or to any
    outgoing connection, and the server then fails to start. The ports come
    from below the ephemeral range, in a block of ``PORTS_PER_WORKER`` per
    pytest-xdist worker (``PYTEST_XDIST_WORKER``, gw0, gw1, ...), handed out
    in turn from a random start (another test run on the machine starts
    elsewhere), each checked by binding it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    first = PORTS_FROM + index * PORTS_PER_WORKER
    if first + PORTS_PER_WORKER > _ephemeral_start():  # too many workers for the range: the kernel picks
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    key = f"{worker}/{host}"
    for _ in range(PORTS_PER_WORKER):
        offset = _next_port.get(key, random.randrange(PORTS_PER_WORKER))
        _next_port[key] = (offset + 1) % PORTS_PER_WORKER
        port = first + offset
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:  # in use (or in TIME_WAIT): the next one
                continue
            return port
    raise RuntimeError(f"no free port of {host} in {first}-{first + PORTS_PER_WORKER - 1}")


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
    deadline = time.monotonic() + PATIENCE
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
