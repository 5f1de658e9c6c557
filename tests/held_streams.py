"""Streams that hold a server's stream slot for a test: an EvaluateChunked
call that sends its header and then nothing."""
from __future__ import annotations

import threading
import time

import grpc

from lossd.v1 import loss_pb2, loss_service_pb2, tensor_pb2

F32 = tensor_pb2.DATA_TYPE_FLOAT32


class IdleChunked:
    """An EvaluateChunked call that sends its header and then nothing."""

    def __init__(self, stub, metadata=None):
        self.release = threading.Event()
        header = loss_service_pb2.ChunkedHeader(
            loss=loss_pb2.LossSpec(name="mse"), y_true=tensor_pb2.TensorInfo(dtype=F32, shape=[1000, 3]),
            y_pred=tensor_pb2.TensorInfo(dtype=F32, shape=[1000, 3]))

        def requests():
            yield loss_service_pb2.EvaluateChunkedRequest(header=header)
            self.release.wait(60)

        self.call = stub.EvaluateChunked(requests(), timeout=60, metadata=metadata)
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()

    def close(self):
        self.release.set()
        self.call.cancel()


def open_idle_streams(stub, count, metadata=None, patience=10.0):
    """Open `count` idle streams once the server has room for all of them.

    A stream a previous test cancelled frees its server slot a moment after the
    client sees it end, so a test that needs every slot first waits until none
    of its own streams is refused for TOO_MANY_STREAMS."""
    deadline = time.monotonic() + patience
    while True:
        streams = [IdleChunked(stub, metadata) for _ in range(count)]
        time.sleep(0.3)  # a refusal arrives in well under a millisecond
        refused = [s for s in streams if s.ended.is_set() and s.error is not None
                   and s.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        if not refused:
            return streams
        for s in streams:
            s.close()
        assert time.monotonic() < deadline, "earlier streams never gave their slots back"
        time.sleep(0.2)
