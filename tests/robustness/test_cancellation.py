"""Issue 23: a cancelled or timed-out evaluation stops consuming the server
within a second.

A real ``lossd serve`` process (its cost limit raised so that an expensive
``ctc``, about 20 s of CPU here, is admitted) gets that evaluation from one
caller, who gives up: by deadline, or by cancelling the call. Within a
second the server's CPU time stops growing (read from /proc), and another
caller's small Evaluate answers at once. Before issue 23 the graph ran to
its end in the handler thread whatever happened to its call.
"""

from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest

from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc
from tests.servers import kill_group, serve_process

pytest.importorskip("tensorflow")

TICKS = os.sysconf("SC_CLK_TCK")
LABELS = 500  # ctc's cost grows with time steps x (2 x labels)^2
STEPS = 2000


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _ctc(steps: int) -> loss_service_pb2.EvaluateRequest:
    labels = np.ones((1, LABELS), np.int32)
    labels[0, ::2] = 2  # no repeats: every label needs its own steps
    return loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="ctc"), y_true=wire.from_numpy(labels),
                                            y_pred=wire.from_numpy(np.zeros((1, steps, 3), np.float32)))


SMALL = loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="mse"),
                                         y_true=wire.from_numpy(np.zeros((4, 3), np.float32)),
                                         y_pred=wire.from_numpy(np.ones((4, 3), np.float32)))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data = tmp_path_factory.mktemp("cancel-data")
    # The heavy lane off: this proves the server's own cancellation, which
    # every evaluation under the lane's threshold relies on
    # (test_heavy_lane.py proves the lane's).
    proc, address = serve_process(data, data / "server.log", {"LOSSD_WARMUP": "false",
                                                               "LOSSD_MAX_EVALUATION_COST": "1e12",
                                                               "LOSSD_HEAVY_WORKERS": "0"})
    try:
        with grpc.insecure_channel(address) as channel:
            stub = loss_service_pb2_grpc.LossServiceStub(channel)
            # Compiled once beforehand (same signature: labels' length and
            # classes fixed, time steps free), so the calls below only run.
            stub.Evaluate(_ctc(8), timeout=300)
            stub.Evaluate(SMALL, timeout=60)
            yield proc, stub
    finally:
        kill_group(proc)


def _assert_server_stops_and_answers(proc, stub, ended: float) -> None:
    """From ``ended`` (when the expensive call ended for its client): within
    a second the server stops burning CPU, and a small call answers fast."""
    time.sleep(max(0.0, ended + 1.0 - time.monotonic()))
    start = _cpu_seconds(proc.pid)
    time.sleep(2.0)
    burnt = _cpu_seconds(proc.pid) - start
    assert burnt < 0.5, f"the server used {burnt:.2f} s of CPU in the 2 s after the call ended"
    began = time.monotonic()
    stub.Evaluate(SMALL, timeout=30)
    # About a millisecond on a quiet machine; the margin is for a shared one.
    assert time.monotonic() - began < 2.0


def test_deadline_stops_the_evaluation(served):
    proc, stub = served
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Evaluate(_ctc(STEPS), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_server_stops_and_answers(proc, stub, time.monotonic())
    # The evaluation would have run for many seconds: it was really under way.
    assert time.monotonic() - began < 10


def test_client_cancel_stops_the_evaluation(served):
    proc, stub = served
    future = stub.Evaluate.future(_ctc(STEPS), timeout=120)
    time.sleep(1.5)
    busy = _cpu_seconds(proc.pid)
    time.sleep(1.0)
    # On a shared machine the server may get much less than a core.
    assert _cpu_seconds(proc.pid) - busy > 0.1, "the expensive evaluation is not running"
    assert future.cancel()
    _assert_server_stops_and_answers(proc, stub, time.monotonic())
