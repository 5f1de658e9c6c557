"""Issue 23, shared memory: a local process that changes a registered region
under the server cannot crash it, and a region is bound to the session and
caller that registered it. Against real servers and real POSIX shared memory.

- A region shrunk and regrown in a loop while Evaluate reads it (a `lossd
  serve` process, so a SIGBUS would show as its death): every call is
  answered, or refused with INVALID_ARGUMENT, for a fixed time, and the
  server still evaluates afterwards.
- A name under another session's prefix is refused (PERMISSION_DENIED,
  SHM_NOT_IN_SESSION), even for the same caller, and the region is neither
  read nor unlinked.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
import time

import grpc
import numpy as np
import pytest
from tests.grpc_errors import reason_of
from tests.servers import kill_group, serve_process
from tests.shm_regions import region

from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc, tensor_pb2
from lossd.v1 import shared_memory_service_pb2 as pb
from lossd.v1 import shared_memory_service_pb2_grpc as pb_grpc

if not pathlib.Path("/dev/shm").is_dir():  # pragma: no cover - Linux only
    pytest.skip("POSIX shared memory under /dev/shm is Linux only", allow_module_level=True)

SHM = pathlib.Path("/dev/shm")
RACE_SECONDS = 10.0


@contextlib.contextmanager
def session(channel: grpc.Channel):
    """An OpenSession stream: (stub, session id, name prefix); cancelled at the end."""
    stub = pb_grpc.SharedMemoryServiceStub(channel)
    call = stub.OpenSession(pb.OpenSessionRequest())
    first = next(call)
    try:
        yield stub, first.session_id, first.name_prefix
    finally:
        call.cancel()


def mse_request(name: str, half: int, shape) -> loss_service_pb2.EvaluateRequest:
    """MSE of float32 y_true = the region's first ``half`` bytes, y_pred = the next ``half``."""
    request = loss_service_pb2.EvaluateRequest(loss=loss_pb2.LossSpec(name="mse"))
    for i, field in enumerate(("y_true", "y_pred")):
        getattr(request, field).CopyFrom(tensor_pb2.Tensor(
            dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=shape,
            shared_memory=tensor_pb2.SharedMemoryRef(region=name, offset=i * half, byte_size=half)))
    return request


def test_a_region_shrunk_and_regrown_during_reads_never_crashes_the_server(tmp_path):
    proc, address = serve_process(tmp_path / "data", tmp_path / "serve.log")
    half = 4 << 20  # 1 Mi float32 per tensor
    shape = (half // 4 // 16, 16)
    outcomes: dict[str, int] = {}
    try:
        with grpc.insecure_channel(address) as channel, session(channel) as (stub, session_id, prefix), \
                region(2 * half, f"{prefix}race") as memory:
            memory.buf[:2 * half] = np.ones(half // 2, np.float32).tobytes()
            stub.RegisterRegion(pb.RegisterRegionRequest(session_id=session_id, name=memory.name,
                                                         byte_size=2 * half), timeout=30)
            evaluate = loss_service_pb2_grpc.LossServiceStub(channel).Evaluate
            assert evaluate(mse_request(memory.name, half, shape), timeout=60).loss.shape == []
            stop = threading.Event()
            resizes = [0]

            def resize():  # what a hostile (or buggy) local client can do to its own region
                fd = os.open(SHM / memory.name, os.O_RDWR)
                try:
                    while not stop.is_set():
                        os.ftruncate(fd, 4096)
                        os.ftruncate(fd, 2 * half)
                        resizes[0] += 1
                finally:
                    os.close(fd)

            resizer = threading.Thread(target=resize, daemon=True)
            resizer.start()
            deadline = time.monotonic() + RACE_SECONDS
            try:
                while time.monotonic() < deadline:
                    try:
                        evaluate(mse_request(memory.name, half, shape), timeout=60)
                        outcome = "OK"
                    except grpc.RpcError as error:
                        died = error.code() == grpc.StatusCode.UNAVAILABLE  # no rich status then
                        outcome = f"{error.code().name}/{'-' if died else reason_of(error)}"
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    assert proc.poll() is None, f"the server died ({proc.returncode}) after {outcomes}"
            finally:
                stop.set()
                resizer.join(10)
            assert resizes[0] > 100, resizes
            # Every call was answered or refused as the client's fault; none crashed anything.
            assert set(outcomes) <= {"OK", "INVALID_ARGUMENT/SHM_BAD_SIZE"}, outcomes
            assert sum(outcomes.values()) >= 5, outcomes
            assert proc.poll() is None
            memory.buf[:2 * half] = np.ones(half // 2, np.float32).tobytes()
            assert evaluate(mse_request(memory.name, half, shape), timeout=60).loss.content
    finally:
        kill_group(proc)
    assert proc.returncode == -9, (proc.returncode, outcomes)  # killed by us, not by a SIGBUS


def test_a_name_under_another_sessions_prefix_is_neither_registered_nor_unlinked(start_server):
    address = start_server()
    with grpc.insecure_channel(address) as channel, session(channel) as (stub, mine, my_prefix), \
            session(channel) as (_, other, other_prefix):
        assert my_prefix != other_prefix and my_prefix.startswith("lossd_") and my_prefix.endswith("_")
        with region(4096, f"{my_prefix}bound") as memory:
            # Another session (here of the same caller, which knows the name) may not take it.
            with pytest.raises(grpc.RpcError) as err:
                stub.RegisterRegion(pb.RegisterRegionRequest(session_id=other, name=memory.name, byte_size=4096),
                                    timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason_of(err.value) == "SHM_NOT_IN_SESSION"
            assert repr(other_prefix) in err.value.details()
            assert (SHM / memory.name).exists()
            # Nor use it in a request before its own session registered it.
            with pytest.raises(grpc.RpcError) as err:
                loss_service_pb2_grpc.LossServiceStub(channel).Evaluate(
                    mse_request(memory.name, 64, (4, 4)), timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # Its own session registers it.
            stub.RegisterRegion(pb.RegisterRegionRequest(session_id=mine, name=memory.name, byte_size=4096),
                                timeout=10)
