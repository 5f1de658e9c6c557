"""``evaluate_many`` streams on both clients: it reads the caller's requests
only as the stream has room for them, yields results in order (a request
refused locally in its place), and holds flat memory however long the
generator is. Against the real server."""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import grpc
import numpy as np
import pytest

import lossd
import lossd.aio
from lossd import _requests

# The long stream: 20,000 requests of 256 values, each answered with its
# gradient. The figure was 100,000 requests of 2 values, about a
# minute per client on this 2-core machine (the server answers 1,000-2,000 a
# second); a fifth of the requests, each 128 times larger with a gradient
# as large coming back, keeps every leak the bound guards well over it:
# a client that reads the generator into a list first holds each request's
# two 1 KiB arrays (over 40 MiB), one that keeps each result holds its 1 KiB
# gradient (over 20 MiB), one that keeps each sent message holds its 2 KiB
# of content (over 40 MiB). LOSSD_STREAM_REQUESTS=100000 makes the long run.
REQUESTS = int(os.environ.get("LOSSD_STREAM_REQUESTS", "20000"))
WIDTH = 256  # values per row of the long stream's requests
REFUSE_EVERY = 1000  # every 1000th request has an int y_pred, refused by the client
WARM_UP = 1000  # requests streamed before the memory baseline: gRPC buffers and allocator arenas settle
RSS_GROWTH_LIMIT = 16 << 20  # reading 10,000 requests of 2 values into a list first grew RSS by 30 MiB
# In flight at most: the window of sent requests, the one waiting for a place
# in it, and one refused locally waiting for the next answer.
MOST_AHEAD = _requests.STREAM_WINDOW + 2


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Requests:
    """An endless or bounded generator of requests (rows of ``width`` values,
    with their gradient asked for when ``gradient``) that counts what was
    pulled and calls ``on_start`` before the first. Request ``i`` has
    ``y_pred`` all ``i % 1000``, so its MSE against zeros names it."""

    def __init__(self, count=None, on_start=None, width=2, gradient=False):
        self.count = count
        self.on_start = on_start
        self.width = width
        self.gradient = gradient
        self.pulled = 0

    def __iter__(self):
        if self.on_start is not None:
            self.on_start()
        for i in itertools.count() if self.count is None else range(self.count):
            self.pulled += 1
            dtype = np.int32 if i % REFUSE_EVERY == REFUSE_EVERY - 1 else np.float32
            shape = (1, self.width)
            yield {"loss": "mse", "y_true": np.zeros(shape, np.float32), "y_pred": np.full(shape, i % 1000, dtype),
                   "gradient": self.gradient}


def ignore(result) -> None:
    pass


def stream_sync(address, *streams, timeout=60):
    """Each ``(requests, see)`` in turn through one ``lossd.Client``'s evaluate_many."""
    with lossd.Client(address, timeout=timeout) as client:
        for requests, see in streams:
            for result in client.evaluate_many(requests):
                see(result)


def stream_aio(address, *streams, timeout=60):
    """The same through one ``lossd.aio.Client``."""
    async def main():
        async with lossd.aio.Client(address, timeout=timeout) as client:
            for requests, see in streams:
                async for result in client.evaluate_many(requests):
                    see(result)
    asyncio.run(main())


STREAMS = pytest.mark.parametrize("stream", [stream_sync, stream_aio], ids=["sync", "aio"])


class Watch:
    """Checks each result against its request, and records how far the
    stream read ahead of the results and how much RSS grew from the
    moment the stream started reading the requests."""

    def __init__(self):
        self.requests = Requests(REQUESTS, on_start=self.start, width=WIDTH, gradient=True)
        self.received = 0
        self.ahead = 0
        self.baseline = 0
        self.growth = 0

    def start(self) -> None:
        self.baseline = rss_bytes()

    def see(self, result) -> None:
        i = self.received
        if i % REFUSE_EVERY == REFUSE_EVERY - 1:
            assert isinstance(result, lossd.LossdError) and result.reason == "UNSUPPORTED_DTYPE", (i, result)
        else:
            assert isinstance(result, lossd.EvaluateResult), (i, result)
            # approx: TensorFlow's mean of 256 squares may round (a neighbour's value differs by 0.2 % or more)
            assert float(result.loss) == pytest.approx((i % 1000) ** 2, rel=1e-6), (i, result.loss)
            assert result.gradient.shape == (1, WIDTH), (i, result.gradient.shape)
        self.received += 1
        self.ahead = max(self.ahead, self.requests.pulled - self.received)
        if self.received % 1000 == 1:
            self.growth = max(self.growth, rss_bytes() - self.baseline)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from Linux /proc")
@STREAMS
def test_a_long_generator_streams_in_flat_memory(address, stream):
    watch = Watch()
    stream(address, (Requests(WARM_UP, width=WIDTH, gradient=True), ignore), (watch.requests, watch.see), timeout=600)
    assert watch.received == watch.requests.pulled == REQUESTS
    assert watch.ahead <= MOST_AHEAD, watch.ahead
    assert watch.growth < RSS_GROWTH_LIMIT, f"RSS grew by {watch.growth / 2**20:.1f} MiB over {REQUESTS:,} requests"


@STREAMS
def test_a_stream_past_its_deadline_raises_lossd_error(address, stream):
    requests = Requests()  # endless: only the deadline ends it
    with pytest.raises(lossd.LossdError) as exc:
        stream(address, (requests, ignore), timeout=0.5)
    assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and exc.value.reason == ""
    pulled = requests.pulled
    time.sleep(0.3)
    assert requests.pulled == pulled, "the stream went on reading requests after the call ended"


class BrokenLoader(Exception):
    pass


def failing_requests():
    yield from Requests(5)
    raise BrokenLoader("the caller's generator failed")


@STREAMS
def test_an_error_of_the_callers_generator_reaches_the_caller(address, stream):
    """Not gRPC's CANCELLED: the caller's own exception, after the results before it."""
    results = []
    with pytest.raises(BrokenLoader, match="the caller's generator failed"):
        stream(address, (failing_requests(), results.append))
    assert [float(r.loss) for r in results] == [0.0, 1.0, 4.0, 9.0, 16.0]


def stop_early_sync(address, requests, n):
    with lossd.Client(address, timeout=60) as client:
        results = client.evaluate_many(requests)
        taken = list(itertools.islice(results, n))
        results.close()
        return taken, client.evaluate("mse", np.zeros(2, np.float32), np.ones(2, np.float32))


def stop_early_aio(address, requests, n):
    async def main():
        async with lossd.aio.Client(address, timeout=60) as client:
            results = client.evaluate_many(requests)
            taken = [await anext(results) for _ in range(n)]
            await results.aclose()
            return taken, await client.evaluate("mse", np.zeros(2, np.float32), np.ones(2, np.float32))
    return asyncio.run(main())


@pytest.mark.parametrize("stop_early", [stop_early_sync, stop_early_aio], ids=["sync", "aio"])
def test_a_caller_that_stops_early_ends_the_stream(address, stop_early):
    requests = Requests()  # endless
    taken, after = stop_early(address, requests, 10)
    assert [float(r.loss) for r in taken] == [float(i * i) for i in range(10)]
    assert float(after.loss) == 1.0  # the client goes on working
    pulled = requests.pulled
    assert pulled <= 10 + MOST_AHEAD
    time.sleep(0.3)
    assert requests.pulled == pulled, "the stream went on reading requests after the caller stopped"
