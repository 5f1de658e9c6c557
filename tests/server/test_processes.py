"""`lossd serve --processes 2`, typed as a user types it: two serving
processes on one port under a supervisor. A client with four connections
reaches both (seen in each process's own metrics file), `/metrics` sums
them, jobs created in either run once, a killed process is started again,
SIGTERM drains both and the supervisor exits 0, and a port in use is
refused before TensorFlow loads."""

from __future__ import annotations

import glob
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.multiprocess import MultiProcessCollector

import lossd
from tests.keras_reference import value_and_gradient
from tests.servers import alive, free_port, kill_group, serve_process

pytestmark = pytest.mark.slow

LOSSD = pathlib.Path(sys.executable).with_name("lossd")


class Served:
    """The supervisor's process, its address, metrics port, log and metrics files' folder."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self.log = tmp / "server.log"
        self.metrics_port = free_port()
        (tmp / "run").mkdir()
        self.proc, self.address = serve_process(
            tmp / "data", self.log, {"TMPDIR": str(tmp / "run")},
            args=["--processes", "2", "--metrics-port", str(self.metrics_port), "--drain-seconds", "2",
                  "--max-concurrent-jobs", "1"])
        self.wait_for_log("lossd 2 processes listening", 1)

    def wait_for_log(self, text: str, count: int, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while self.log.read_text().count(text) < count:
            assert self.proc.poll() is None, f"the supervisor exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.3)

    def children(self) -> list[int]:
        """The serving processes' pids (the supervisor's spawned children)."""
        pids = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = pathlib.Path(stat).read_text().rsplit(")", 1)[1].split()
                cmdline = pathlib.Path(stat).with_name("cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and b"spawn_main" in cmdline:
                pids.append(int(pathlib.Path(stat).parent.name))
        return sorted(pids)

    def scrape(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()

    def per_process(self, name: str, **labels) -> dict[int, float]:
        """``name``'s value in each process's own multiprocess file (pid -> value), labels matching."""
        found = {}
        for path in glob.glob(str(self.tmp / "run" / "lossd-metrics-*" / "*_[0-9]*.db")):
            pid = int(re.search(r"_(\d+)\.db$", path).group(1))
            for family in MultiProcessCollector.merge([path], accumulate=False):
                for sample in family.samples:
                    if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                        found[pid] = found.get(pid, 0.0) + sample.value
        return found


def exposed(text: str, name: str, **labels) -> float:
    """The value of one sample of a /metrics text, labels matching."""
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    assert total is not None, f"no {name} {labels} in /metrics"
    return total


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = Served(tmp_path_factory.mktemp("processes"))
    try:
        yield server
    finally:
        kill_group(server.proc)


def test_a_client_with_sixteen_connections_reaches_both_processes_and_metrics_sum_them(served):
    # The kernel hashes each connection to one of the processes: 4 connections
    # all land on one of 2 processes 1 time in 8 (seen), 16 of them 1 in 32,768.
    pids = served.children()
    assert len(pids) == 2, served.log.read_text()[-2000:]
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
    import keras

    expected, gradient = value_and_gradient(keras.losses.Huber(delta=0.5), y_true, y_pred)
    calls = 40
    with lossd.Client(served.address, timeout=60, connections=16) as client:
        for _ in range(calls):
            result = client.evaluate("huber", y_true, y_pred, params={"delta": 0.5}, gradient=True)
            np.testing.assert_allclose(result.loss, expected, rtol=1e-6)
            np.testing.assert_allclose(result.gradient, gradient, rtol=1e-5, atol=1e-7)

    handled = served.per_process("grpc_server_handled_total", grpc_method="Evaluate", grpc_code="OK")
    assert set(handled) == set(pids), handled
    assert all(n > 0 for n in handled.values()), f"a process served none of the calls: {handled}"
    assert sum(handled.values()) == calls
    text = served.scrape()
    assert exposed(text, "grpc_server_handled_total", grpc_method="Evaluate", grpc_code="OK") == calls
    assert exposed(text, "lossd_loss_evaluations_total", loss="huber", outcome="ok") == calls
    assert exposed(text, "lossd_serving_processes", state="serving") == 2
    # A live gauge: each process's build info is 1, and the supervisor shows one sample, not two.
    assert len([line for line in text.splitlines() if line.startswith("lossd_build_info{")]) == 1
    assert exposed(text, "lossd_build_info") == 1


def test_one_connection_stays_with_one_process(served):
    before = served.per_process("grpc_server_handled_total", grpc_method="ListLosses", grpc_code="OK")
    with lossd.Client(served.address, timeout=60) as client:
        for _ in range(6):
            client.losses()
    after = served.per_process("grpc_server_handled_total", grpc_method="ListLosses", grpc_code="OK")
    grew = {pid: after[pid] - before.get(pid, 0) for pid in after if after[pid] != before.get(pid, 0)}
    assert list(grew.values()) == [6], grew


def test_jobs_created_in_either_process_run_once(served):
    created = []
    with lossd.Client(served.address, timeout=180) as first:
        # A fresh client is a fresh connection, which the kernel hands to
        # either process: create jobs until both processes took one.
        for _ in range(8):
            with lossd.Client(served.address, timeout=60) as client:
                created.append(client.create_job("mlp", "digits", epochs=1, steps_per_epoch=2))
            if len(served.per_process("grpc_server_handled_total", grpc_method="CreateJob", grpc_code="OK")) == 2:
                break
        assert len(served.per_process("grpc_server_handled_total", grpc_method="CreateJob", grpc_code="OK")) == 2
        for job in created:
            finished = first.wait(job, progress=False)
            assert finished.state == "succeeded", finished.error
            states = [event.state for event in first.watch(job) if event.kind == "state"]
            assert states == ["queued", "running", "succeeded"], (job.id, states)


def test_a_killed_process_is_reported_and_started_again(served):
    victim = served.children()[-1]
    os.kill(victim, signal.SIGKILL)
    served.wait_for_log(f"(pid {victim}) was killed by SIGKILL; starting it again", 1, seconds=10)
    served.wait_for_log("listening on", 4)  # two at start, the restarted one, and the supervisor's line
    assert victim not in served.children() and len(served.children()) == 2
    deadline = time.monotonic() + 10  # the supervisor hears it within 0.5 s; /metrics is at most 1 s old
    while exposed(text := served.scrape(), "lossd_serving_processes", state="serving") != 2:
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    assert exposed(text, "lossd_serving_process_restarts_total") == 1
    with lossd.Client(served.address, timeout=60, connections=4) as client:
        for _ in range(8):
            assert client.evaluate("mse", np.zeros(3, np.float32), np.ones(3, np.float32)).loss == 1.0


def test_a_port_in_use_is_refused_before_tensorflow_loads(served, tmp_path):
    port = int(served.address.rsplit(":", 1)[1])
    # The port of the running supervisor: neither a second supervisor nor a
    # one-process server may join its processes there.
    for processes in ("2", "1"):
        done = subprocess.run([sys.executable, "-X", "importtime", str(LOSSD), "serve", "--processes", processes,
                               "--port", str(port), "--metrics-port", "off", "--data-dir", str(tmp_path / "d")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"error: gRPC port {port} is in use on 127.0.0.1 (set LOSSD_PORT or --port)" in done.stderr
        imported = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                    if line.startswith("import time:") and "|" in line]
        assert "lossd_server.supervisor" in imported  # -X importtime did report the imports
        assert not [name for name in imported if name.split(".")[0] in ("tensorflow", "keras")]
    # An unrelated server's port (a plain listening socket).
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        done = subprocess.run([str(LOSSD), "serve", "--processes", "2", "--port", str(taken), "--metrics-port", "off",
                               "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"gRPC port {taken} is in use" in done.stderr, done.stderr[-2000:]


def health_statuses(address: str, connections: int) -> set:
    """grpc.health.v1 Check("") over ``connections`` connections of their own."""
    statuses = set()
    for _ in range(connections):
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            statuses.add(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return statuses


def test_sighup_reaches_every_process_and_stops_none(served):
    pids = served.children()
    served.proc.send_signal(signal.SIGHUP)
    served.wait_for_log("received SIGHUP: reloading certificates in 2 processes", 1, seconds=10)
    time.sleep(1)  # SIGHUP's default action would end a process that did not expect it
    assert served.children() == pids and served.proc.poll() is None
    assert health_statuses(served.address, 4) == {"SERVING"}


def test_sigterm_drains_both_processes_and_the_supervisor_exits_0(served):
    pids = served.children()
    assert health_statuses(served.address, 8) == {"SERVING"}
    served.proc.send_signal(signal.SIGTERM)
    served.wait_for_log("draining (health NOT_SERVING", 2, seconds=10)
    # During the drain (2 s) every connection, to either process, hears NOT_SERVING.
    assert health_statuses(served.address, 8) == {"NOT_SERVING"}
    assert served.proc.wait(60) == 0, served.log.read_text()[-3000:]
    assert not any(alive(pid) for pid in pids)
    log = served.log.read_text()
    assert log.count("lossd_server.app [-] stopped") >= 2 and "lossd_server.supervisor [-] stopped" in log
    assert not glob.glob(str(served.tmp / "run" / "lossd-metrics-*")), "the metrics files outlived the supervisor"
