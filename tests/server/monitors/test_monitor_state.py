"""Monitors' state in the store, with real servers: a `lossd serve`
killed with SIGKILL while observations stream in loses none that it
acknowledged, and replicas on one PostgreSQL database share monitors: ids
observed on one replica and labelled on the other, concurrently, each
count once."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2

from lossd import wire
from lossd.v1 import monitor_service_pb2 as pb
from lossd.v1 import monitor_service_pb2_grpc as pb_grpc
from tests.servers import kill_group, lossd_servers, serve_process


def _create(stub, name: str, windows=(3600,)) -> str:
    monitor = pb.Monitor(loss=wire.spec_from_dict({"name": "mean_absolute_error"}),
                         windows=[duration_pb2.Duration(seconds=w) for w in windows])
    return stub.CreateMonitor(pb.CreateMonitorRequest(monitor_id=name, monitor=monitor)).name


def test_a_killed_server_keeps_every_acknowledged_observation(tmp_path):
    data = tmp_path / "data"
    proc, address = serve_process(data, tmp_path / "serve.log", {"LOSSD_WARMUP": "false"})
    acknowledged: list[str] = []
    stop = threading.Event()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.MonitorServiceStub(channel)
            name = _create(stub, "durable")
            rows = np.arange(16, dtype=np.float32).reshape(16, 1)
            # Half the ids wait for labels, half arrive with them: both kinds must survive.
            stub.Observe(pb.ObserveRequest(monitor=name, ids=[f"w{i}" for i in range(16)],
                                           y_pred=wire.from_numpy(rows)))

            def send():
                for batch in range(100_000):
                    if stop.is_set():
                        return
                    ids = [f"b{batch}-{i}" for i in range(16)]
                    try:
                        stub.Observe(pb.ObserveRequest(monitor=name, ids=ids, y_pred=wire.from_numpy(rows),
                                                       y_true=wire.from_numpy(rows + 1)), timeout=30)
                    except grpc.RpcError:
                        return  # the server died: this call was not acknowledged
                    acknowledged.extend(ids)

            sender = threading.Thread(target=send)
            sender.start()
            while len(acknowledged) < 160 and sender.is_alive():
                time.sleep(0.05)
            kill_group(proc)  # SIGKILL, mid-stream
            stop.set()
            sender.join(30)
    finally:
        kill_group(proc)
    assert len(acknowledged) >= 160
    proc, address = serve_process(data, tmp_path / "serve.log", {"LOSSD_WARMUP": "false"})
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.MonitorServiceStub(channel)
            got = stub.GetMonitor(pb.GetMonitorRequest(name="monitors/durable"))
            window = got.report.windows[0]
            # Every acknowledged pair is there; at most the one call in flight at the kill is too.
            assert len(acknowledged) <= window.count <= len(acknowledged) + 16
            assert window.mean_loss == pytest.approx(1.0)
            assert got.report.pending_predictions == 16
            again = stub.Observe(pb.ObserveRequest(monitor="monitors/durable", ids=acknowledged[:16],
                                                   y_pred=wire.from_numpy(rows), y_true=wire.from_numpy(rows)))
            assert again.duplicates == 16  # settled before the kill, and still known as such
    finally:
        kill_group(proc)


@pytest.fixture()
def replicas(tmp_path_factory, postgres, tmp_path):
    shared = {"database_url": postgres.create_database(), "artifacts_dir": tmp_path / "artifacts"}
    with lossd_servers(tmp_path_factory, **shared, warmup=False, shared_state_poll_seconds=0.2) as start:
        yield start


def test_replicas_share_monitors_and_pair_each_id_once(replicas):
    a, b = replicas(), replicas()
    n, size = 384, 16
    rng = np.random.default_rng(5)
    y_pred = rng.normal(size=(n, 1)).astype(np.float32)
    y_true = rng.normal(size=(n, 1)).astype(np.float32)
    ids = [f"id{i}" for i in range(n)]
    with grpc.insecure_channel(f"127.0.0.1:{a.port}") as ca, grpc.insecure_channel(f"127.0.0.1:{b.port}") as cb:
        stubs = (pb_grpc.MonitorServiceStub(ca), pb_grpc.MonitorServiceStub(cb))
        name = _create(stubs[0], "shared")
        assert stubs[1].GetMonitor(pb.GetMonitorRequest(name=name)).name == name

        # Every batch of ids is observed through one replica and labelled through the other, all at once,
        # labels racing their predictions.
        def call(task):
            start, half, replica = task
            chunk = slice(start, start + size)
            stub = stubs[replica]
            if half == "pred":
                return stub.Observe(pb.ObserveRequest(monitor=name, ids=ids[chunk], y_pred=wire.from_numpy(y_pred[chunk])))
            return stub.Label(pb.LabelRequest(monitor=name, ids=ids[chunk], y_true=wire.from_numpy(y_true[chunk])))

        tasks = [(s, half, (s // size + (half == "label")) % 2) for s in range(0, n, size) for half in ("pred", "label")]
        rng.shuffle(tasks)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, tasks))
        assert sum(a.paired for a in answers) == n
        for stub in stubs:
            got = stub.GetMonitor(pb.GetMonitorRequest(name=name)).report
            assert (got.windows[0].count, got.pending_predictions, got.pending_labels) == (n, 0, 0)
            assert got.windows[0].mean_loss == pytest.approx(float(np.mean(np.abs(y_pred - y_true))), rel=1e-5)
