"""Issue 23: expensive evaluations run where they can be abandoned (the
heavy lane, ``lossd_server.evaluation.heavy``).

A real ``lossd serve`` process whose heavy threshold is set low
(``LOSSD_HEAVY_EVALUATION_COST=200``; the smallest ``ctc`` costs 688), so
that small ``ctc`` requests take the lane and the tests stay short, while
a small MSE (about 50 units) stays in the server's process:

* the lane answers what Keras answers and what the in-process evaluator
  answers, over shapes hypothesis draws (and the lane's metrics prove the
  requests went there);
* a heavy evaluation whose call passes its deadline or is cancelled has its
  worker process gone within about a second (its pid, read from /proc), a
  new worker takes its place, a cancelled call waiting for a worker
  leaves the queue, and a light caller's evaluations keep
  answering while four heavy ones run and queue (a fifth is refused with
  HEAVY_LANE_FULL and a retry delay);
* a worker past its memory ceiling is killed and its caller gets
  RESOURCE_EXHAUSTED (HEAVY_MEMORY_EXCEEDED);
* a worker killed from outside gives its caller a clear status
  (RESOURCE_EXHAUSTED for SIGKILL, as the out-of-memory killer sends it;
  UNAVAILABLE for another end), and the next heavy call works.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings, strategies as st

from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc
from tests.grpc_errors import reason_of, status_of
from tests.servers import alive, free_port, kill_group, serve_process

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from lossd_server.evaluation import backend  # noqa: E402 - after the skip
from lossd_server.errors import ResourceExhausted  # noqa: E402
from lossd_server.evaluation.evaluator import Evaluator  # noqa: E402
from lossd_server.evaluation.heavy import HeavyLane  # noqa: E402
from lossd_server.losses import custom  # noqa: E402
from tests.keras_reference import value_and_gradient  # noqa: E402

LABELS = 300  # with STEPS time steps: about 2e9 units, a couple of seconds here
STEPS = 1000
CALL_SECONDS = 120


def _ctc(labels: np.ndarray, pred: np.ndarray, gradient: bool = False,
         reduction: int = loss_pb2.REDUCTION_UNSPECIFIED) -> loss_service_pb2.EvaluateRequest:
    return loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="ctc"), y_true=wire.from_numpy(labels),
                                            y_pred=wire.from_numpy(pred), gradient=gradient, reduction=reduction)


def _heavy(steps: int = STEPS) -> loss_service_pb2.EvaluateRequest:
    labels = np.ones((1, LABELS), np.int32)
    labels[0, ::2] = 2  # no repeats: every label needs its own steps
    return _ctc(labels, np.zeros((1, steps, 3), np.float32))


SMALL = loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="mse"),
                                         y_true=wire.from_numpy(np.zeros((4, 3), np.float32)),
                                         y_pred=wire.from_numpy(np.ones((4, 3), np.float32)))


class Served:
    def __init__(self, proc, address: str, metrics_port: int):
        self.proc = proc
        self.channel = grpc.insecure_channel(address)
        self.stub = loss_service_pb2_grpc.LossServiceStub(self.channel)
        self.metrics_port = metrics_port

    def workers(self) -> list[int]:
        """The server's heavy-lane worker processes alive now."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and b"lossd_server.evaluation.heavy" in cmdline and alive(int(entry)):
                pids.append(int(entry))
        return pids

    def metric(self, name: str, **labels) -> float:
        """A sample of the server's /metrics (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).read().decode()
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_metric(self, name: str, value: float, seconds: float = 30.0, **labels) -> None:
        deadline = time.monotonic() + seconds
        while self.metric(name, **labels) < value:
            assert time.monotonic() < deadline, f"{name}{labels} stayed below {value}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data = tmp_path_factory.mktemp("heavy-data")
    metrics_port = free_port()
    proc, address = serve_process(
        data, data / "server.log",
        {"LOSSD_WARMUP": "false", "LOSSD_HEAVY_EVALUATION_COST": "200", "LOSSD_MAX_EVALUATION_COST": "1e12",
         "LOSSD_HEAVY_MAX_QUEUED": "3", "LOSSD_XLA": "off",
         "LOSSD_METRICS_CACHE_SECONDS": "0"},
        args=["--metrics-port", str(metrics_port)])
    try:
        server = Served(proc, address, metrics_port)
        server.stub.Evaluate(SMALL, timeout=CALL_SECONDS)
        yield server
    finally:
        server.channel.close()
        kill_group(proc)


@pytest.fixture(scope="module")
def in_process():
    """The evaluator a server runs in its own process, here in the test's."""
    evaluator = Evaluator(custom.full_registry(plugins=False), backend.select_device("cpu"),
                          expression_compiler=custom.inline_entry)
    yield evaluator
    evaluator.close()


@st.composite
def _ctc_cases(draw):
    batch = draw(st.integers(1, 3))
    steps = draw(st.integers(4, 12))
    length = draw(st.integers(1, steps // 2))
    classes = draw(st.integers(3, 5))
    seed = draw(st.integers(0, 2 ** 16))
    reduction = draw(st.sampled_from(["sum_over_batch_size", "sum", "none"]))
    return batch, steps, length, classes, seed, reduction, draw(st.booleans())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_ctc_cases())
def test_the_lane_answers_as_keras_and_as_the_server_process(served, in_process, case):
    batch, steps, length, classes, seed, reduction, gradient = case
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, classes, size=(batch, length)).astype(np.int32)
    pred = rng.normal(size=(batch, steps, classes)).astype(np.float32)
    runs = served.metric("lossd_heavy_lane_runs_total", outcome="ok")

    reply = served.stub.Evaluate(_ctc(labels, pred, gradient, wire.reduction_enum(reduction)), timeout=CALL_SECONDS)

    assert served.metric("lossd_heavy_lane_runs_total", outcome="ok") == runs + 1  # it took the lane
    loss = wire.to_numpy(reply.loss)
    keras_loss = keras.losses.CTC(reduction=reduction)
    want, want_gradient = value_and_gradient(keras_loss, labels, pred)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-5)
    here = in_process.evaluate(in_process.planner.plan({"name": "ctc"}), {"y_true": labels, "y_pred": pred},
                               reduction=reduction, gradient=gradient)
    np.testing.assert_allclose(loss, here.loss, rtol=1e-6, atol=1e-6)
    if gradient:
        got = wire.to_numpy(reply.gradient)
        np.testing.assert_allclose(got, want_gradient, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got, here.gradient, rtol=1e-6, atol=1e-6)
    else:
        assert not reply.HasField("gradient")


def _one_worker(served: Served) -> int:
    deadline = time.monotonic() + CALL_SECONDS
    while True:
        workers = served.workers()
        if len(workers) == 1:
            return workers[0]
        assert time.monotonic() < deadline, f"workers: {workers}"
        time.sleep(0.1)


def _assert_gone_within_a_second(served: Served, pid: int, ended: float) -> None:
    while alive(pid):
        assert time.monotonic() - ended < 1.5, f"worker {pid} still runs {time.monotonic() - ended:.2f} s after"
        time.sleep(0.02)


def test_a_heavy_call_past_its_deadline_kills_its_worker(served):
    served.stub.Evaluate(_heavy(steps=20), timeout=CALL_SECONDS)  # a worker started, the program compiled
    worker = _one_worker(served)
    kills = served.metric("lossd_heavy_lane_kills_total", reason="cancelled")
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Evaluate(_heavy(steps=20 * STEPS), timeout=3)
    ended = time.monotonic()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_gone_within_a_second(served, worker, ended)
    served.wait_metric("lossd_heavy_lane_kills_total", kills + 1, reason="cancelled")
    assert _one_worker(served) != worker  # replaced
    served.stub.Evaluate(_heavy(steps=20), timeout=CALL_SECONDS)


def test_a_cancelled_heavy_call_kills_its_worker(served):
    served.stub.Evaluate(_heavy(steps=20), timeout=CALL_SECONDS)
    worker = _one_worker(served)
    call = served.stub.Evaluate.future(_heavy(steps=20 * STEPS), timeout=CALL_SECONDS)
    time.sleep(2.0)
    assert not call.done()
    call.cancel()
    ended = time.monotonic()
    _assert_gone_within_a_second(served, worker, ended)
    assert _one_worker(served) != worker


def test_a_cancelled_call_waiting_for_a_worker_leaves_the_queue(served):
    served.stub.Evaluate(_heavy(steps=20), timeout=CALL_SECONDS)
    worker = _one_worker(served)
    running = served.stub.Evaluate.future(_heavy(steps=20 * STEPS), timeout=CALL_SECONDS)
    waiting = served.stub.Evaluate.future(_heavy(steps=20), timeout=CALL_SECONDS)
    served.wait_metric("lossd_heavy_lane_queued", 1)
    waiting.cancel()
    ended = time.monotonic()
    while served.metric("lossd_heavy_lane_queued") > 0:
        assert time.monotonic() - ended < 1.5, "the cancelled call still waits for a worker"
        time.sleep(0.05)
    assert alive(worker) and not running.done()  # the running one was not disturbed
    running.cancel()
    _assert_gone_within_a_second(served, worker, time.monotonic())


def test_a_light_caller_keeps_answering_while_heavy_ones_run_and_queue(served):
    served.stub.Evaluate(_heavy(), timeout=CALL_SECONDS)  # compiled, and its time known
    outcomes: list = []

    def heavy():
        try:
            served.stub.Evaluate(_heavy(), timeout=CALL_SECONDS)
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(exc.code())

    threads = [threading.Thread(target=heavy) for _ in range(4)]
    for thread in threads:
        thread.start()
    served.wait_metric("lossd_heavy_lane_queued", 3)  # one runs, three wait: the lane's queue is full
    with pytest.raises(grpc.RpcError) as refused:
        served.stub.Evaluate(_heavy(), timeout=CALL_SECONDS)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(refused.value) == "HEAVY_LANE_FULL"
    retry = [d for d in status_of(refused.value).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "a full queue's refusal carries a retry delay"
    latencies = []
    while any(thread.is_alive() for thread in threads):
        began = time.monotonic()
        served.stub.Evaluate(SMALL, timeout=CALL_SECONDS)
        latencies.append(time.monotonic() - began)
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    assert outcomes == ["ok"] * 4
    # In the server's process, the heavy ones would hold its one inter-op
    # thread seconds at a time; a light call here takes milliseconds (the
    # margin is for a machine shared with other test runs).
    assert len(latencies) >= 10 and max(latencies) < 2.0, latencies


@pytest.mark.parametrize("sent, code, reason", [
    (signal.SIGKILL, grpc.StatusCode.RESOURCE_EXHAUSTED, "HEAVY_WORKER_KILLED"),
    (signal.SIGTERM, grpc.StatusCode.UNAVAILABLE, "HEAVY_WORKER_DIED"),
])
def test_a_worker_that_dies_gives_a_clear_status_and_the_next_call_works(served, sent, code, reason):
    served.stub.Evaluate(_heavy(steps=20), timeout=CALL_SECONDS)
    worker = _one_worker(served)
    call = served.stub.Evaluate.future(_heavy(steps=20 * STEPS), timeout=CALL_SECONDS)
    time.sleep(2.0)
    os.kill(worker, sent)
    with pytest.raises(grpc.RpcError) as caught:
        call.result()
    assert caught.value.code() == code
    assert reason_of(caught.value) == reason
    reply = served.stub.Evaluate(_heavy(steps=20), timeout=CALL_SECONDS)
    assert np.isfinite(wire.to_numpy(reply.loss)).all()
    assert served.proc.poll() is None


def test_a_worker_past_its_memory_ceiling_is_killed_and_replaced(in_process):
    # A ceiling below what the worker holds idle: the watcher's first look
    # while the evaluation runs (about 1 s of ctc) finds it past.
    lane = HeavyLane(in_process, threshold=0, worker_config={"device": "cpu"}, memory_slack_bytes=-(64 << 30))
    try:
        plan = in_process.planner.plan({"name": "ctc"})
        labels = np.ones((1, LABELS), np.int32)
        labels[0, ::2] = 2
        small = {"y_true": labels[:, :4], "y_pred": np.zeros((1, 20, 3), np.float32)}
        heavy = {"y_true": labels, "y_pred": np.zeros((1, STEPS, 3), np.float32)}
        with pytest.raises(ResourceExhausted) as refused:
            lane.evaluate(plan, heavy)
        assert refused.value.reason == "HEAVY_MEMORY_EXCEEDED"
        assert {"rss", "limit", "loss"} <= refused.value.metadata.keys()
        lane.memory_slack_bytes = 512 << 20
        want = in_process.evaluate(plan, small)
        np.testing.assert_allclose(lane.evaluate(plan, small).loss, want.loss, rtol=1e-6)  # a new worker
    finally:
        lane.close()
