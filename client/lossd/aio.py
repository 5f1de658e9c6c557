"""The asyncio lossd client: the loss-evaluation methods of ``lossd.Client``,
as coroutines, on a ``grpc.aio`` channel.

>>> async with lossd.aio.Client("localhost:50051") as client:
...     r = await client.evaluate("huber", y_true, y_pred, params={"delta": 2.0}, gradient=True)
"""

from __future__ import annotations

import itertools
from typing import Any, AsyncIterator, Iterable, Mapping, Optional

import grpc
import grpc.aio

from lossd import _chunks, _requests, wire
from lossd._client import _ChannelOwner
from lossd._errors import LossdError, as_lossd_error, from_rpc_error
from lossd._requests import EvaluateResult, LossInfo, LossLike
from lossd.v1 import loss_service_pb2

__all__ = ["Client"]


class Client(_ChannelOwner):
    """An asyncio connection to a lossd server; arguments as for ``lossd.Client``."""

    _secure_channel = staticmethod(grpc.aio.secure_channel)
    _insecure_channel = staticmethod(grpc.aio.insecure_channel)

    async def losses(self, *, timeout: Optional[float] = None) -> list[LossInfo]:
        """Every loss the server can evaluate, with its parameters."""
        try:
            response = await self._losses.ListLosses(loss_service_pb2.ListLossesRequest(), **self._call_args(timeout))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return [_requests.loss_info(d) for d in response.losses]

    async def evaluate(self, loss: LossLike, y_true, y_pred, *, params: Optional[Mapping[str, Any]] = None,
                       sample_weight=None, reduction: str = "sum_over_batch_size", gradient: bool = False,
                       tensors: Optional[Mapping[str, Any]] = None, timeout: Optional[float] = None
                       ) -> EvaluateResult:
        """Evaluates a loss; see ``lossd.Client.evaluate``."""
        spec = wire.spec_from_dict(loss, params)
        arrays = _requests.prepare(y_true, y_pred, sample_weight, tensors)
        try:
            if _chunks.needs_chunks(arrays, self.max_message_bytes):
                requests = _chunks.chunked_requests(spec, arrays, reduction, gradient, self.chunk_bytes)
                requests = itertools.chain([next(requests)], requests)  # local refusals raise here
                assembler = _chunks.ChunkAssembler(arrays["y_pred"], gradient)
                async for message in self._losses.EvaluateChunked(requests, **self._call_args(timeout)):
                    assembler.add(message)
                if assembler.result is None:
                    raise LossdError(grpc.StatusCode.INTERNAL, "the server ended the stream without a summary")
                return assembler.result
            request = _requests.evaluate_request(spec, arrays, reduction, gradient)
            return _requests.parse_response(await self._losses.Evaluate(request, **self._call_args(timeout)))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def evaluate_many(self, requests: Iterable[Mapping[str, Any]], *, timeout: Optional[float] = None
                            ) -> AsyncIterator[EvaluateResult | LossdError]:
        """Evaluates many requests on one stream; yields results (or errors) in order."""
        items = []
        for kwargs in requests:
            kwargs = dict(kwargs)
            try:
                spec = wire.spec_from_dict(kwargs.pop("loss"), kwargs.pop("params", None))
                arrays = _requests.prepare(kwargs.pop("y_true"), kwargs.pop("y_pred"),
                                           kwargs.pop("sample_weight", None), kwargs.pop("tensors", None))
                items.append(_requests.evaluate_request(spec, arrays, kwargs.pop("reduction", "sum_over_batch_size"),
                                                        kwargs.pop("gradient", False)))
            except (LossdError, wire.WireError) as error:
                items.append(as_lossd_error(error))
        messages = [loss_service_pb2.EvaluateStreamRequest(request=item, request_id=str(i))
                    for i, item in enumerate(items) if not isinstance(item, LossdError)]
        answers: dict[int, EvaluateResult | LossdError] = {i: item for i, item in enumerate(items)
                                                           if isinstance(item, LossdError)}
        next_index = 0
        try:
            async for item in self._losses.EvaluateStream(iter(messages), **self._call_args(timeout)):
                try:
                    answers[int(item.request_id)] = _requests.parse_stream_item(item)
                except LossdError as error:
                    answers[int(item.request_id)] = error
                while next_index in answers:
                    yield answers.pop(next_index)
                    next_index += 1
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        while next_index in answers:
            yield answers.pop(next_index)
            next_index += 1

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
