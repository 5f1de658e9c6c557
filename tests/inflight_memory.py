"""Peak server memory under eight concurrent near-maximum evaluations, the
one driver that ``tests/robustness/test_inflight_memory.py`` and
``bench/admission_memory.py`` share.

It starts ``lossd serve`` as a user types it (``LOSSD_MAX_INFLIGHT_BYTES`` in
its environment), warms it up with one request of the size it will send,
resets the kernel's peak-RSS mark (``/proc/PID/clear_refs``, 5) and reads the
RSS as the baseline, then sends ``concurrent`` requests at once, each
declaring ``request_bytes`` (y_true and y_pred of float32), and reads the peak
(``VmHWM``). Linux only. ``measure_running`` is that measurement of any
server process, so bench/admission_memory.py measures its anchor (a bare
gRPC server) exactly as it measures lossd; ``ceiling_bytes`` kills a server
whose RSS passes it, so a run can never take the machine's memory.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np

import lossd
from tests.servers import free_port

MiB = 1 << 20


@dataclasses.dataclass
class Reading:
    baseline_bytes: int   # server RSS after warm-up
    peak_bytes: int       # server peak RSS while the requests ran
    admitted: int
    refused: dict         # ErrorInfo reason -> count
    killed: bool = False  # its RSS passed the ceiling: stopped, the figures are cut short

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


def _status_kib(pid: int, field: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def arrays(request_bytes: int):
    """y_true and y_pred of float32 that declare ``request_bytes`` together."""
    rows = request_bytes // 8 // 1024
    y_true = np.random.default_rng(0).random((rows, 1024), dtype=np.float32)
    return y_true, y_true + np.float32(0.5)


def _kill_past(pid: int, ceiling_bytes: int, stop: threading.Event, killed: list) -> None:
    """Polls ``pid``'s RSS every 20 ms until ``stop``; SIGKILLs it past ``ceiling_bytes``."""
    while not stop.wait(0.02):
        try:
            rss = _status_kib(pid, "VmRSS") * 1024
        except (OSError, RuntimeError):  # ended
            return
        if rss > ceiling_bytes:
            os.kill(pid, signal.SIGKILL)
            killed.append(rss)
            return


def measure_running(pid: int, call: Callable[[], str], *, concurrent: int = 8,
                    ceiling_bytes: Optional[int] = None) -> Reading:
    """Measures the server process ``pid``, already answering: two warm-up
    ``call()``s, the peak mark reset, the RSS as baseline, ``concurrent``
    calls at once, then the peak. ``call()`` sends one request and returns
    ``"OK"`` or the reason it was refused. Past ``ceiling_bytes`` of RSS the
    server is killed and the reading says so."""
    for _ in range(2):  # warm: the program compiles, the allocator grows once
        call()
    time.sleep(0.5)
    pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")
    baseline = _status_kib(pid, "VmRSS") * 1024
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_past, args=(pid, ceiling_bytes, stop, killed), daemon=True)
    if ceiling_bytes is not None:
        watcher.start()
    outcomes: list = []
    barrier = threading.Barrier(concurrent)

    def one():
        barrier.wait()
        outcomes.append(call())

    threads = [threading.Thread(target=one) for _ in range(concurrent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    stop.set()
    if ceiling_bytes is not None:
        watcher.join()
    peak = killed[0] if killed else _status_kib(pid, "VmHWM") * 1024
    refused: dict = {}
    for outcome in outcomes:
        if outcome != "OK":
            refused[outcome] = refused.get(outcome, 0) + 1
    return Reading(baseline, peak, outcomes.count("OK"), refused, killed=bool(killed))


def measure(data_dir: pathlib.Path, *, inflight_bytes: int, request_bytes: int, concurrent: int = 8,
            extra_env: dict | None = None, log=None, ceiling_bytes: Optional[int] = None) -> Reading:
    """Runs one server with ``inflight_bytes`` and measures it (see the module docstring)."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}, "TF_CPP_MIN_LOG_LEVEL": "2",
           "LOSSD_MAX_INFLIGHT_BYTES": str(inflight_bytes), **(extra_env or {})}
    server = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--port", str(port), "--metrics-port",
                               "off", "--data-dir", str(data_dir), "--drain-seconds", "0", "--grace-seconds", "0"],
                              env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    y_true, y_pred = arrays(request_bytes)
    try:
        with lossd.Client(address, timeout=120) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.losses(timeout=2)
                    break
                except lossd.LossdError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("lossd serve did not start")
                    time.sleep(0.3)

            def call() -> str:
                try:
                    client.evaluate("mse", y_true, y_pred)
                    return "OK"
                except lossd.LossdError as error:
                    return error.reason or error.code.name

            return measure_running(server.pid, call, concurrent=concurrent, ceiling_bytes=ceiling_bytes)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
