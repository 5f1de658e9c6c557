"""Streams that hold a server's stream slot for a test: an EvaluateChunked
call that sends its header and then nothing."""
from __future__ import annotations

import threading

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
