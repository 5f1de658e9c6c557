"""Shared fixtures: a real lossd server on a free loopback port, in process."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Servers in tests start without compiling the common losses first (1-2 s a
# start); tests/server/test_warmup.py turns the warm-up on where it tests it.
os.environ.setdefault("LOSSD_WARMUP", "false")
# Under XLA buckets (the default) a request is answered by the graph until
# its executable is compiled in the background, then by XLA, and the two may
# differ in the last place: tests that compare two answers bit for bit would
# depend on that timing. Servers in tests run without XLA;
# tests/server/evaluation/test_buckets.py tests it, through a server too.
os.environ.setdefault("LOSSD_XLA", "off")

import pytest
from tests.postgres import running_postgres
from tests.servers import lossd_servers


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A running server (port 0 on 127.0.0.1, fresh metrics registry), stopped at the end."""
    from prometheus_client import CollectorRegistry

    from lossd_server.app import create_server
    from lossd_server.config import Settings

    # metrics_cache_seconds=0: tests read a counter right after the call they count.
    # Micro-batching on (it is off by default), so concurrent tests exercise it.
    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, metrics_cache_seconds=0, batch_max_delay_us=500,
                        data_dir=tmp_path_factory.mktemp("lossd-data"), grace_seconds=1.0)
    srv = create_server(settings, metrics_registry=CollectorRegistry())
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture
def memory_heavy(tmp_path_factory):
    """Holds the suite's memory lock while the test runs: a test that moves
    hundreds of MB (1e8 elements, eight near-maximum requests) never runs
    beside another such test in another pytest-xdist worker, so the run's
    total RSS stays within the machine's. The lock is a file in the folder
    all workers' temporary folders share (the run's own folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    folder = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with open(folder / "memory-heavy.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (``tests/postgres.py``) for the whole session;
    ``postgres.create_database()`` gives each test an empty database."""
    with running_postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """``open_store()`` opens a store on this test's database (a new SQLite
    file, or a new PostgreSQL database); call it again to reopen the same
    database, as another process or replica would. Every store is closed at the end."""
    from lossd_server.state.postgres import PostgresStore
    from lossd_server.state.quarantine import Quarantine
    from lossd_server.state.sqlite import SqliteStore

    opened = []
    if request.param == "sqlite":
        def opener():
            opened.append(SqliteStore(tmp_path / "db.sqlite3"))
            return opened[-1]
    else:
        url = request.getfixturevalue("postgres").create_database()

        def opener():
            opened.append(PostgresStore(url, quarantine=Quarantine(tmp_path / "quarantine")))
            return opened[-1]
    yield opener
    for store in opened:
        store.close()


@pytest.fixture(scope="session")
def address(server) -> str:
    return f"127.0.0.1:{server.port}"


def _create_token(path, name: str, scopes: str, *options: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    done = subprocess.run([sys.executable, "-m", "lossd.cli", "tokens", "create", name, "--scopes", scopes,
                           *options, "--file", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="session")
def create_token():
    """``create_token(path, name, scopes, *options)``: runs ``lossd tokens
    create`` as a user types it (``options`` such as ``--max-jobs 2``) and
    returns the token it prints."""
    return _create_token


@pytest.fixture(scope="module")
def serve_with_tokens(tmp_path_factory, create_token):
    """``serve_with_tokens({name: (scopes, *options)}, **settings)``: a real
    server on a free loopback port with its own data directory and a tokens
    file holding a token per name (made by ``lossd tokens create``); returns
    ``(address, {name: token}, folder)``, the folder holding ``data/`` and
    ``tokens.jsonl``. Every server started is stopped at the end of the module."""
    class Servers:
        """Starts servers (call it); ``server(address)`` is the one at ``address``."""

        def __init__(self, start):
            self.start = start
            self.started = {}

        def __call__(self, callers: dict, **settings):
            folder = tmp_path_factory.mktemp("tokens")
            path = folder / "tokens.jsonl"
            tokens = {name: create_token(path, name, *spec) for name, spec in callers.items()}
            srv = self.start(folder / "data", **{"metrics_port": None, "tokens_file": path, **settings})
            self.started[srv.address] = srv
            return srv.address, tokens, folder

        def server(self, address: str):
            return self.started[address]

    with lossd_servers(tmp_path_factory) as start:
        yield Servers(start)


@pytest.fixture
def configure_logs():
    """``configure_logs(fmt, level="DEBUG")``: the server's logging set-up
    (``logs.configure``) writing into a StringIO it returns; the root logger
    is restored after."""
    from lossd_server.observability import logs

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def configure(fmt: str, level: str = "DEBUG") -> io.StringIO:
        stream = io.StringIO()
        logs.configure(level=level, fmt=fmt, stream=stream)
        return stream

    yield configure
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


@pytest.fixture()
def client(address):
    import lossd

    with lossd.Client(address, timeout=60) as c:
        yield c


# The files that take longest, most first: every file of 60 s or more in a
# 2-worker run at load 9-16 (41 min in all), with the seconds of its tests'
# setup, call and teardown (docs/testing.md). `make test` runs files on two
# workers (--dist loadfile), and the run ends when the last file on either
# ends: started first, these files finish while the hundreds of short files
# fill in around them, and neither worker idles at the end (in that run the
# two ended 20 s apart). xdist's own order (files with the most tests first)
# left the 100-second fault-injection file, one test, among the last. A file
# not named here keeps xdist's order after them.
SLOWEST_FILES = (
    "tests/server/training/test_multiworker.py",  # 756 s
    "tests/server/training/test_replicas.py",  # 470 s
    "tests/server/training/test_jobs.py",  # 396 s
    "tests/server/training/test_diffusion.py",  # 203 s
    "tests/server/losses/test_numerics.py",  # 192 s
    "tests/robustness/test_state_fault_injection.py",  # 171 s
    "tests/server/training/test_matrix_training.py",  # 165 s
    "tests/server/evaluation/test_buckets.py",  # 127 s
    "tests/server/test_lifecycle.py",  # 124 s
    "tests/robustness/test_streams_and_compiles.py",  # 123 s
    "tests/robustness/test_state_faults.py",  # 109 s
    "tests/deploy/test_k8s.py",  # 88 s
    "tests/server/test_processes.py",  # 81 s
    "tests/server/training/test_restart.py",  # 75 s
    "tests/server/evaluation/test_batching.py",  # 73 s
    "tests/test_bench_peers.py",  # 72 s
    "tests/server/training/test_generate_stream.py",  # 71 s
    "tests/deploy/test_prometheus_live.py",  # 69 s
    "tests/server/training/test_custom_training.py",  # 65 s
    "tests/server/grpc/test_tokens.py",  # 65 s
    "tests/robustness/test_store_faults.py",  # 64 s
    "tests/server/losses/test_custom_losses.py",  # 61 s
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    """Orders the files: SLOWEST_FILES first, in their order, then the others
    with the most tests first (what xdist's --loadscope-reorder did); a file's
    tests keep their order and stay together."""
    counts: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        counts[path] = counts.get(path, 0) + 1
    first = {path: rank for rank, path in enumerate(SLOWEST_FILES)}
    order = {path: (first.get(path, len(first)), -count, index)
             for index, (path, count) in enumerate(counts.items())}
    items.sort(key=lambda item: order[item.nodeid.split("::", 1)[0]])


# CI (.ci/run) sets LOSSD_FAIL_ON_SKIP=1: there every tool and extra is
# installed, so a skipped test is a check that silently did not run, and the
# run fails. Locally a skip stays a skip (listed by -ra).
FAIL_ON_SKIP = "LOSSD_FAIL_ON_SKIP"


def _skipped(session) -> list:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter else []


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(FAIL_ON_SKIP) == "1" and _skipped(session) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if os.environ.get(FAIL_ON_SKIP) == "1" and skipped:
        terminalreporter.write_line(
            f"{FAIL_ON_SKIP}=1: {len(skipped)} skipped test(s) fail this run; "
            "install what the skip reasons above name", red=True, bold=True)
