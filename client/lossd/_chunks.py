"""Large tensors: splitting a request into row chunks for EvaluateChunked,
and putting the answers back together. Shared by the sync and asyncio clients."""

from __future__ import annotations

from typing import Iterator, Mapping, Optional

import numpy as np

from lossd import wire
from lossd._errors import client_error
from lossd._requests import EvaluateResult
from lossd.v1 import loss_pb2, loss_service_pb2

# Room for the non-tensor fields of a message under the size limit.
_MESSAGE_OVERHEAD = 1 << 16


def needs_chunks(arrays: Mapping[str, np.ndarray], max_message_bytes: int) -> bool:
    """Whether the request would exceed one message (responses carry at most the gradient)."""
    return sum(a.nbytes for a in arrays.values()) + _MESSAGE_OVERHEAD > max_message_bytes


def chunked_requests(spec: loss_pb2.LossSpec, arrays: Mapping[str, np.ndarray], reduction: str,
                     gradient: bool, chunk_bytes: int) -> Iterator[loss_service_pb2.EvaluateChunkedRequest]:
    """The header, then row slices of every tensor of about ``chunk_bytes`` each."""
    if set(arrays) - {"y_true", "y_pred", "sample_weight"}:
        raise client_error("Tensors too large for one message can be sent with y_true, y_pred and "
                           "sample_weight only, not extra named tensors. Raise max_message_bytes (on the "
                           "client and the server) to send them in one message.", "NOT_CHUNKABLE")
    rows = arrays["y_pred"].shape[0] if arrays["y_pred"].ndim else 0
    for name, a in arrays.items():
        if a.ndim == 0 or a.shape[0] != rows:
            raise client_error(f"Large tensors are sent in row slices, so every tensor needs the same first "
                               f"axis. Expected {name}.shape[0] == {rows}. Received: {list(a.shape)}. Raise "
                               "max_message_bytes (on the client and the server) to send them in one message.",
                               "NOT_CHUNKABLE")
    header = loss_service_pb2.ChunkedHeader(loss=spec, reduction=wire.reduction_enum(reduction), gradient=gradient)
    for name, a in arrays.items():
        getattr(header, name).CopyFrom(wire.info(a, field=name))
    yield loss_service_pb2.EvaluateChunkedRequest(header=header)
    row_bytes = sum(a.nbytes // rows for a in arrays.values())
    step = max(1, chunk_bytes // max(row_bytes, 1))
    contiguous = {n: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for n, a in arrays.items()}
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = loss_service_pb2.TensorChunk(start=start, rows=stop - start)
        for name, a in contiguous.items():
            setattr(chunk, name, a[start:stop].tobytes())
        yield loss_service_pb2.EvaluateChunkedRequest(chunk=chunk)


class ChunkAssembler:
    """Puts the chunked answers back together into one EvaluateResult.

    Args:
        y_pred: The predictions sent (for the gradient's shape and dtype).
        gradient: Whether the gradient was asked for.
        y_true: The targets sent; needed where the summary expresses the
            gradient through the inputs (``y_true_gradient_coefficient``).
    """

    def __init__(self, y_pred: np.ndarray, gradient: bool, y_true: Optional[np.ndarray] = None):
        # Zeros, not empty: rows a loss sends no gradient for are exactly 0 times the scale.
        self.gradient = np.zeros(y_pred.shape, dtype=y_pred.dtype) if gradient else None
        self.y_true, self.y_pred = y_true, y_pred
        self.values: list[np.ndarray] = []
        self.result: Optional[EvaluateResult] = None

    def add(self, message: loss_service_pb2.EvaluateChunkedResponse) -> None:
        if message.WhichOneof("kind") == "chunk":
            chunk = message.chunk
            if chunk.HasField("loss"):
                self.values.append(wire.to_numpy(chunk.loss, field="loss", allow_empty=True))
            if chunk.HasField("gradient") and self.gradient is not None:
                rows = wire.to_numpy(chunk.gradient, field="gradient", allow_empty=True)
                self.gradient[chunk.start:chunk.start + rows.shape[0]] = rows
            return
        summary = message.summary
        if self.gradient is not None:
            self._finish_gradient(summary)
        loss = (wire.to_numpy(summary.loss, field="loss", allow_empty=True) if summary.HasField("loss")
                else np.concatenate(self.values) if self.values else np.empty((0,)))
        self.result = EvaluateResult(loss=loss, gradient=self.gradient, non_finite=summary.non_finite)

    def _finish_gradient(self, summary: loss_service_pb2.ChunkedSummary) -> None:
        dtype = self.gradient.dtype.type
        if summary.gradient_scale != 1.0:
            self.gradient *= dtype(summary.gradient_scale)
        a, b = summary.y_true_gradient_coefficient, summary.y_pred_gradient_coefficient
        if a:
            if self.y_true is None:
                raise client_error("the server expressed the gradient through y_true, which this "
                                   "assembler was not given", "NOT_CHUNKABLE")
            self.gradient += (a * self.y_true.astype(np.float64)).astype(self.gradient.dtype).reshape(self.gradient.shape)
        if b:
            self.gradient += (b * self.y_pred.astype(np.float64)).astype(self.gradient.dtype)
