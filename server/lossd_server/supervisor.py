"""``lossd serve --processes N``: N serving processes on one gRPC port, and a
small supervisor over them.

One Python process is bound by its GIL; on a host with many cores more
processes serve more (docs/scaling.md). The kernel spreads the connections
to one port over the processes that listen on it with ``SO_REUSEPORT``;
one HTTP/2 connection stays with one process, so a client that wants them
all opens several (``lossd.Client(..., connections=K)``).

The supervisor (this process) imports neither TensorFlow nor the server:

1. It checks the ports before anything heavy loads: the gRPC port (and the
   health port) must be free to a plain bind, so an unrelated server on it
   is refused as with one process. It then holds each with a socket bound
   with ``SO_REUSEPORT`` that never listens: its own processes can join,
   a server without ``SO_REUSEPORT`` cannot, and port 0 becomes one port
   for all of them.
2. It serves the one ``/metrics`` of all processes from prometheus_client's
   multiprocess files, in a directory made fresh for this start
   (``observability.metrics.SupervisorMetrics``).
3. It starts every process at once (their TensorFlow imports overlap), but
   the first opens the store alone (migrations, the quarantine, resuming
   the jobs a previous server left) and the others open it once it says
   it has. Only the first runs jobs (the others take
   CreateJob into the shared queue, which the first claims from), and
   every process follows the others' registered losses in the store
   (``store.Follower``).
4. SIGTERM or SIGINT: each process drains (health NOT_SERVING on the open
   port for ``drain_seconds``, then ``grace_seconds``); a second signal ends
   the drains early. The processes ignore SIGINT (Ctrl-C reaches the whole
   group) and drain once however many SIGTERMs reach them (systemd signals
   every process of a unit); the supervisor ends their drains with SIGUSR1.
   SIGHUP: each reloads its certificates, and the supervisor the metrics
   port's. The supervisor exits 0 when every process stopped cleanly, 1
   otherwise.
5. A process that dies while serving (killed, out of memory) is reported
   and started again: the others serve meanwhile, and the port keeps
   accepting. More than ``MAX_RESTARTS`` deaths within ``RESTART_WINDOW``
   seconds is a crash loop: the supervisor stops the rest and exits 1, for
   the orchestrator to see. A process that fails to start (a setting, a
   bad certificate) ends the start: exit 2, as with one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue as queue_module
import shutil
import signal
import socket
import tempfile
import time
from typing import Any, Optional

from lossd_server.config import Settings, StartupError
from lossd_server.ports import bind_errno, bind_failure

log = logging.getLogger(__name__)

# A process that dies more often than this is in a crash loop: restarting it
# again would hide the fault.
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0
# How long a process may take to start (TensorFlow's import, warmup) before
# the start is given up.
START_SECONDS = 300.0
# After the drain and the grace, how long the supervisor waits before it kills a process.
STOP_MARGIN_SECONDS = 30.0
# Exit codes of a child that the supervisor reads: a StartupError, as `lossd serve` exits with it.
STARTUP_FAILED = 2


@dataclasses.dataclass
class ProcessRole:
    """What a serving process started by the supervisor is: its index among
    ``count``, and where it reports. The server reads it in ``create_server``
    and ``serve``; ``None`` there is the one-process server."""

    index: int
    count: int
    reports: Any = None  # a multiprocessing queue of (index, kind, value), to the supervisor
    # The others' end of a pipe on which the supervisor says that the first
    # process opened the store, with what it moved to the quarantine: every
    # process reports that (health's lossd.state, lossd_state_quarantined_items).
    store_ready: Any = None
    supervisor: int = 0  # the supervisor's pid (it may be 1, in a container)

    @property
    def runs_jobs(self) -> bool:
        """Only the first process runs training jobs: one host's job slots
        (``max_concurrent_jobs``, its GPUs) are counted once."""
        return self.index == 0

    @property
    def reuse_port(self) -> bool:
        """Whether this process shares its ports with siblings (SO_REUSEPORT)."""
        return self.count > 1

    def wait_for_store(self) -> list:
        """Called before the store opens: the first process opens it alone
        (schema migrations, the quarantine, resuming the jobs a previous
        server left); the others wait here until it has. Returns what the
        first process quarantined (nothing, for the first)."""
        if self.runs_jobs or self.store_ready is None:
            return []
        if not self.store_ready.poll(START_SECONDS):
            raise StartupError(f"the first process did not open the store within {START_SECONDS:.0f} s")
        return list(self.store_ready.recv())

    def store_opened(self, quarantined: list) -> None:
        """Called once the store is open: the first process tells the
        supervisor what it quarantined (the others may start on it now)."""
        if self.runs_jobs and self.reports is not None:
            self.reports.put((self.index, "opened", list(quarantined)))

    def serving(self, port: int) -> None:
        """Called once health is SERVING."""
        if self.reports is not None:
            self.reports.put((self.index, "serving", port))


def run(settings: Settings) -> int:
    """``lossd serve``: the server itself with one process, else the
    supervisor of ``settings.processes``. Returns the exit code."""
    # The OIP REST port (served by the first process) is checked here: a
    # port in use is refused in a moment, not after TensorFlow's import.
    if settings.http_port:
        code = bind_errno(settings.host, settings.http_port)
        if code is not None:
            raise StartupError(bind_failure("OIP REST", settings.host, settings.http_port, code, "host", "http_port"))
    if settings.processes == 1:
        # The port first, as the supervisor checks it.
        code = bind_errno(settings.host, settings.port) if settings.port else None
        if code is not None:
            raise StartupError(bind_failure("gRPC", settings.host, settings.port, code, "host", "port"))
        from lossd_server.app import serve

        return serve(settings)
    return Supervisor(settings).run()


def _child(settings: Settings, role: ProcessRole) -> None:
    """A serving process's main (started with multiprocessing's spawn)."""
    _end_with_parent(role.supervisor)
    # Ctrl-C reaches the whole process group: the supervisor alone answers
    # it (with SIGTERM to each process), so a drain is not cut short by a
    # second signal; SIGHUP waits for serve()'s handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from lossd_server.observability import logs

    logs.configure(settings.log_level, settings.log_format)
    try:
        from lossd_server.app import serve

        code = serve(settings, process=role)
    except StartupError as exc:
        log.error("process %d: %s", role.index, exc)
        role.reports.put((role.index, "failed", str(exc)))
        code = STARTUP_FAILED
    # multiprocessing's own exit would collect TensorFlow's objects first (see app.serve).
    role.reports.close()
    role.reports.join_thread()  # what was put is sent before the exit
    logging.shutdown()
    os._exit(code)


def _end_with_parent(supervisor: int) -> None:
    """SIGTERM (a drain) to this process when the supervisor dies, even by
    ``kill -9``: no serving process outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != supervisor:  # the supervisor died before prctl took effect
        os._exit(1)


class Supervisor:
    """Starts, watches and stops the serving processes of ``settings``
    (``settings.processes`` > 1); see the module's docstring."""

    def __init__(self, settings: Settings):
        if not hasattr(socket, "SO_REUSEPORT"):
            raise StartupError("processes above 1 need SO_REUSEPORT, which this system lacks "
                               "(set LOSSD_PROCESSES or --processes to 1)")
        self.settings = settings
        self.count = settings.processes
        self._ctx = multiprocessing.get_context("spawn")
        self._reports = None
        self._procs: dict[int, Any] = {}  # index -> multiprocessing.Process
        self._deaths: list[float] = []  # monotonic times of deaths while serving
        self._serving: set[int] = set()  # the indexes of the processes that reported SERVING and live
        self._quarantined: Optional[list] = None  # what the first process quarantined, once it opened the store
        self._store_ready: dict[int, Any] = {}  # index -> the supervisor's end of its pipe, until sent
        self._held: list[socket.socket] = []
        self._signals: list[int] = []
        self.metrics = None  # SupervisorMetrics, with a metrics port
        self.metrics_port: Optional[int] = None
        self._metrics_http = None
        self._metrics_tls = None
        self._multiproc_dir: Optional[str] = None

    # -- ports -----------------------------------------------------------------

    def _hold(self, port: int, what: str, setting: str) -> int:
        """Checks that ``port`` is free (a plain bind, as one process does),
        then holds it bound with SO_REUSEPORT; returns the port (0: a free one)."""
        host = self.settings.host
        if port:
            code = bind_errno(host, port)
            if code is not None:
                raise StartupError(bind_failure(what, host, port, code, "host", setting))
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        held = socket.socket(family, kind, proto)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            held.bind(address)
        except OSError as error:
            held.close()
            raise StartupError(bind_failure(what, host, port, error.errno, "host", setting)) from None
        self._held.append(held)
        return held.getsockname()[1]

    def _start_metrics(self) -> None:
        from lossd_server.observability.metrics import SupervisorMetrics, start_metrics_server
        from lossd_server.security.basic_auth import BasicAuth
        from lossd_server.security.certificates import ReloadingSSLContext
        from lossd_server.security.reload import SecurityFileError

        s = self.settings
        try:
            tls = ReloadingSSLContext(s.metrics_tls_cert, s.metrics_tls_key) if s.metrics_tls_cert else None
            auth = BasicAuth(s.metrics_basic_auth_file) if s.metrics_basic_auth_file else None
        except SecurityFileError as exc:
            raise StartupError(str(exc)) from exc
        self._metrics_tls = tls
        self.metrics = SupervisorMetrics(self._multiproc_dir, self.count)
        try:
            self._metrics_http, port = start_metrics_server(self.metrics, s.metrics_host, s.metrics_port,
                                                            cache_seconds=s.metrics_cache_seconds, tls=tls,
                                                            basic_auth=auth,
                                                            rate_per_address=s.metrics_rate_per_address)
        except OSError as error:
            raise StartupError(bind_failure("metrics", s.metrics_host, s.metrics_port, error.errno, "metrics_host",
                                            "metrics_port")) from error
        self.metrics_port = port

    # -- the run ---------------------------------------------------------------

    def run(self) -> int:
        """Runs until a signal stops every process, or a crash loop; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self._signals.append(signum))
        try:
            self.port = self._hold(self.settings.port, "gRPC", "port")
            self.health_port = (self._hold(self.settings.health_port, "health", "health_port")
                                if self.settings.health_port is not None else None)
            # Every process records into files here, read by the one /metrics.
            self._multiproc_dir = tempfile.mkdtemp(prefix="lossd-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._multiproc_dir
            if self.settings.metrics_port is not None:
                self._start_metrics()
            child = self.settings.model_copy(update={"port": self.port, "health_port": self.health_port})
            self._child_settings = child
            self._reports = self._ctx.Queue()
            code = self._start_all()
            if code is None:
                code = self._serve()
            return code
        except StartupError:
            if self._procs:
                self._stop_all(hurry=True)
            raise
        finally:
            self._close()

    def _settings_of(self, index: int) -> Settings:
        if index == 0:
            return self._child_settings
        # Job slots are the host's (its GPUs): only the first process has them.
        return self._child_settings.model_copy(update={"max_concurrent_jobs": 0})

    def _spawn(self, index: int) -> None:
        receive = None
        if index > 0:
            receive, send = self._ctx.Pipe(duplex=False)
            self._store_ready[index] = send, receive
        role = ProcessRole(index, self.count, self._reports, receive, os.getpid())
        proc = self._ctx.Process(target=_child, args=(self._settings_of(index), role), name=f"lossd-serve-{index}")
        proc.start()
        self._procs[index] = proc
        log.info("process %d started (pid %d)", index, proc.pid)
        self._say_store_ready()

    def _say_store_ready(self) -> None:
        """Once the first process opened the store, tells the others (also those started later)."""
        if self._quarantined is None:
            return
        for index, (send, receive) in list(self._store_ready.items()):
            with contextlib.suppress(OSError):
                send.send(self._quarantined)
            send.close()
            receive.close()
            del self._store_ready[index]

    def _start_all(self) -> Optional[int]:
        """Starts every process (the others wait for the first to open the
        store); returns once all are SERVING (None), or an exit code."""
        for index in range(self.count):
            self._spawn(index)
        waiting = set(range(self.count))
        deadline = time.monotonic() + START_SECONDS
        while waiting:
            if self._signals:
                log.info("received %s while starting: stopping", signal.Signals(self._signals[0]).name)
                return self._stop_all(hurry=False)
            for index in list(waiting):
                proc = self._procs[index]
                if not proc.is_alive():
                    failed = self._failure(0.2)
                    if failed:
                        raise StartupError(failed)
                    log.error("process %d (pid %d) %s while starting", index, proc.pid, _how(proc.exitcode))
                    self._stop_all(hurry=True)
                    return 1
            if time.monotonic() > deadline:
                log.error("the processes did not start within %.0f s", START_SECONDS)
                self._stop_all(hurry=True)
                return 1
            report = self._next_report(0.5)
            if report is None:
                continue
            index, kind, value = report
            if kind == "opened" and self._quarantined is None:
                self._quarantined = list(value)
                self._say_store_ready()
            elif kind == "serving":
                waiting.discard(index)
                self._serving.add(index)
            elif kind == "failed":
                raise StartupError(value)
        self._set_alive()
        s = self.settings
        log.info("lossd %d processes listening on %s:%d (gRPC, pids %s)%s; metrics %s", self.count, s.host,
                 self.port, " ".join(str(p.pid) for p in self._procs.values()),
                 f", health on {s.host}:{self.health_port}" if self.health_port else "",
                 f"on {s.metrics_host}:{self.metrics_port}/metrics (all processes)" if self._metrics_http else "off")
        return None

    def _serve(self) -> int:
        """Watches the processes until a signal; returns the exit code."""
        while True:
            if self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self._reload()
                    continue
                log.info("received %s: draining %d processes (health NOT_SERVING for %.1f s, then grace %.1f s)",
                         signal.Signals(signum).name, self.count, self.settings.drain_seconds,
                         self.settings.grace_seconds)
                return self._stop_all(hurry=False)
            sentinels = [p.sentinel for p in self._procs.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            self._read_reports()
            for index, proc in list(self._procs.items()):
                if proc.is_alive():
                    continue
                self._serving.discard(index)
                proc.join()
                self._forget(proc)
                now = time.monotonic()
                self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
                if len(self._deaths) > MAX_RESTARTS:
                    log.error("process %d (pid %d) %s: %d processes died within %.0f s, a crash loop; stopping",
                              index, proc.pid, _how(proc.exitcode), len(self._deaths), RESTART_WINDOW)
                    self._stop_all(hurry=True)
                    return 1
                log.error("process %d (pid %d) %s; starting it again", index, proc.pid, _how(proc.exitcode))
                self.metrics is not None and self.metrics.process_restarted()
                self._spawn(index)
            self._set_alive()

    def _reload(self) -> None:
        log.info("received SIGHUP: reloading certificates in %d processes", self.count)
        if self._metrics_tls is not None:
            self._metrics_tls.reload()
        self._send(signal.SIGHUP)

    def _stop_all(self, hurry: bool) -> int:
        """Drains and stops every process (SIGTERM; a second signal to the
        supervisor, or ``hurry``, ends their drains early with SIGUSR1: a
        SIGTERM sent to the whole group must not count twice); kills those still
        running after the drain, the grace and a margin. Returns 0 when each
        exited 0, else 1."""
        self._send(signal.SIGTERM)
        if hurry:
            self._send(signal.SIGUSR1)
        s = self.settings
        deadline = time.monotonic() + s.drain_seconds + s.grace_seconds + STOP_MARGIN_SECONDS
        hurried = hurry
        while any(p.is_alive() for p in self._procs.values()):
            if self._signals and not hurried:
                self._signals.clear()
                log.info("received another signal: ending the drains")
                self._send(signal.SIGUSR1)
                hurried = True
            if time.monotonic() > deadline:
                for proc in self._procs.values():
                    if proc.is_alive():
                        log.error("process (pid %d) did not stop within the drain and grace; killing it", proc.pid)
                        proc.kill()
                break
            multiprocessing.connection.wait([p.sentinel for p in self._procs.values()], timeout=0.5)
        code = 0
        for index, proc in self._procs.items():
            proc.join(10)
            if proc.exitcode != 0:
                log.error("process %d (pid %d) %s", index, proc.pid, _how(proc.exitcode))
                code = 1
            self._forget(proc)
        self._serving.clear()
        self._set_alive()
        if code == 0:
            log.info("stopped")
        return code

    # -- helpers ---------------------------------------------------------------

    def _send(self, signum: int) -> None:
        for proc in self._procs.values():
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    def _next_report(self, timeout: float):
        try:
            return self._reports.get(timeout=timeout)
        except queue_module.Empty:
            return None

    def _read_reports(self) -> None:
        """Reads what restarted processes report: when they serve again."""
        while (report := self._next_report(0)) is not None:
            if report[1] == "serving" and self._procs[report[0]].is_alive():
                self._serving.add(report[0])
        self._set_alive()

    def _failure(self, timeout: float) -> Optional[str]:
        """The StartupError a process reported before it exited, if any."""
        deadline = time.monotonic() + timeout
        while True:
            report = self._next_report(max(0.0, deadline - time.monotonic()))
            if report is None:
                return None
            if report[1] == "failed":
                return report[2]

    def _forget(self, proc) -> None:
        """A dead process's live gauges leave /metrics; its counters stay in the sums."""
        if self._multiproc_dir is not None and proc.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(proc.pid, self._multiproc_dir)

    def _set_alive(self) -> None:
        if self.metrics is not None:
            self.metrics.set_serving_processes(len(self._serving))

    def _close(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        for held in self._held:
            held.close()
        if self._reports is not None:
            self._reports.close()
            self._reports.join_thread()
        if self._multiproc_dir is not None:
            shutil.rmtree(self._multiproc_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def _how(exitcode: Optional[int]) -> str:
    """How a process ended, in words: ``exited with code 1``, ``was killed by SIGKILL``."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
