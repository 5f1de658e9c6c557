"""The asyncio lossd client: every method of ``lossd.Client``, with the same
arguments and the same errors, as coroutines (and async generators where the
sync client yields), on a ``grpc.aio`` channel.

>>> async with lossd.aio.Client("localhost:50051") as client:
...     r = await client.evaluate("huber", y_true, y_pred, params={"delta": 2.0}, gradient=True)

Requests are built and answers parsed by the same functions as for the sync
client (``_requests``, ``_chunks``, ``_training``); this module only awaits.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Iterable, Mapping, Optional

import grpc.aio

from lossd import _requests
from lossd._client import _ChannelOwner, _chunked_result
from lossd._errors import LossdError, translate_errors_async
from lossd._requests import EvaluateResult, LossInfo, LossLike
from lossd._monitors import AsyncMonitorMixin
from lossd._training import AsyncTrainingMixin
from lossd.v1 import loss_service_pb2

__all__ = ["Client"]


class Client(_ChannelOwner, AsyncTrainingMixin, AsyncMonitorMixin):
    """An asyncio connection to a lossd server; arguments as for ``lossd.Client``."""

    _secure_channel = staticmethod(grpc.aio.secure_channel)
    _insecure_channel = staticmethod(grpc.aio.insecure_channel)
    _shared_memory_supported = False  # the synchronous Client has it

    @translate_errors_async
    async def losses(self, *, timeout: Optional[float] = None) -> list[LossInfo]:
        """Refer to ``lossd.Client.losses``."""
        return _requests.loss_infos(await self._losses.ListLosses(loss_service_pb2.ListLossesRequest(),
                                                                  **self._call_args(timeout)))

    @translate_errors_async
    async def register_loss(self, name: str, expression: str, *, params: Optional[Mapping[str, float]] = None,
                            inputs: Optional[Iterable[str]] = None, doc: str = "", replace: bool = False,
                            timeout: Optional[float] = None) -> LossInfo:
        """Refer to ``lossd.Client.register_loss``."""
        request = _requests.register_loss_request(name, expression, params, inputs, doc, replace)
        return _requests.loss_info(await self._losses.RegisterLoss(request, **self._call_args(timeout)))

    @translate_errors_async
    async def delete_loss(self, name: str, *, timeout: Optional[float] = None) -> None:
        """Refer to ``lossd.Client.delete_loss``."""
        await self._losses.DeleteLoss(loss_service_pb2.DeleteLossRequest(name=name), **self._call_args(timeout))

    @translate_errors_async
    async def evaluate(self, loss: LossLike, y_true, y_pred, *, params: Optional[Mapping[str, Any]] = None,
                       sample_weight=None, reduction: str = "sum_over_batch_size", gradient: bool = False,
                       tensors: Optional[Mapping[str, Any]] = None, timeout: Optional[float] = None
                       ) -> EvaluateResult:
        """Refer to ``lossd.Client.evaluate``."""
        request, assembler = self._evaluate_call(loss, y_true, y_pred, params, sample_weight, reduction, gradient,
                                                 tensors)
        stub, evaluate_serialized = self._next_evaluator()
        if assembler is None:
            return _requests.parse_response_bytes(await evaluate_serialized(request, **self._call_args(timeout)))
        async for message in stub.EvaluateChunked(request, **self._call_args(timeout)):
            assembler.add(message)
        return _chunked_result(assembler)

    @translate_errors_async
    async def evaluate_many(self, requests: Iterable[Mapping[str, Any]], *, timeout: Optional[float] = None
                            ) -> AsyncIterator[EvaluateResult | LossdError]:
        """Refer to ``lossd.Client.evaluate_many``."""
        stream = _requests.EvaluationStream(requests, self._stream_request)
        window = asyncio.Semaphore(_requests.STREAM_WINDOW)

        async def messages():
            for message in stream.messages():
                await window.acquire()
                yield message

        args = self._call_args(timeout)
        deadline = None if args["timeout"] is None else asyncio.get_running_loop().time() + args["timeout"]
        call = self._next_evaluator()[0].EvaluateStream(messages(), **args)
        try:
            async for answer in call:
                window.release()
                for result in stream.answer(answer):
                    yield result
            for result in stream.finish():
                yield result
        except grpc.aio.AioRpcError as error:
            # When the deadline ends the call while gRPC's asyncio client is
            # still writing requests, it can report INTERNAL "Internal error
            # from Core" instead of the deadline (a race inside grpcio): a
            # status the server never sent. Past the deadline, it is the deadline.
            if (error.code() == grpc.StatusCode.INTERNAL and deadline is not None
                    and asyncio.get_running_loop().time() >= deadline):
                raise LossdError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            raise
        finally:
            call.cancel()  # a caller that stops early ends the call

    async def close(self) -> None:
        """Closes the channels."""
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
