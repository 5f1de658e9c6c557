"""``connections=K``: a client opens K channels of their own, each one TCP
connection, and evaluations take them in turn; the answers are those of one
connection, on the sync and the asyncio client alike."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossd
import lossd.aio

pytest.importorskip("keras")


def established_to(port: int) -> int:
    """TCP connections of this host in state ESTABLISHED whose remote end is 127.0.0.1:``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC's sockets are IPv6 ones, 127.0.0.1 mapped
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and remote.endswith(f"0100007F:{port:04X}"):
                count += 1
    return count


def test_each_connection_is_a_tcp_connection_of_its_own(address):
    port = int(address.rsplit(":", 1)[1])
    before = established_to(port)
    with lossd.Client(address, timeout=60, connections=4) as client:
        for _ in range(8):
            client.evaluate("mse", np.zeros(3, np.float32), np.ones(3, np.float32))
        assert established_to(port) - before == 4
    deadline = time.monotonic() + 10
    while established_to(port) > before and time.monotonic() < deadline:  # closed channels hang up
        time.sleep(0.05)
    # Two clients of equal arguments: gRPC shares the subchannels of equal
    # channels, which connections>1 keeps its channels out of.
    with lossd.Client(address, timeout=60, connections=4) as a, lossd.Client(address, timeout=60, connections=4) as b:
        for client in (a, b):
            for _ in range(8):
                client.evaluate("mse", np.zeros(3, np.float32), np.ones(3, np.float32))
        assert established_to(port) - before == 8


@pytest.mark.parametrize("bad", [0, -1, 257, 1.5, True, "2"])
@pytest.mark.parametrize("client_class", [lossd.Client, lossd.aio.Client])
def test_connections_must_be_a_count(address, bad, client_class):
    with pytest.raises(lossd.LossdError) as error:
        client_class(address, connections=bad)
    assert error.value.reason == "CLIENT"
    assert f"Expected an int from 1 to 256. Received: {bad!r}." in error.value.message


LOSSES = [("mse", {}), ("huber", {"delta": 0.5}), ("log_cosh", {}), ("mae", {})]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), columns=st.integers(1, 6), loss=st.sampled_from(LOSSES),
       reduction=st.sampled_from(["none", "sum", "sum_over_batch_size"]), seed=st.integers(0, 2**16),
       calls=st.integers(1, 7))
def test_spread_calls_answer_as_one_connection(address, rows, columns, loss, reduction, seed, calls):
    """Whichever channel a call takes, and on either client, the answer is
    that of a one-connection client (bit for bit one call at a time);
    evaluate_many streams too."""
    name, params = loss
    rng = np.random.default_rng(seed)
    inputs = [(rng.normal(size=(rows, columns)).astype(np.float32), rng.normal(size=(rows, columns)).astype(np.float32))
              for _ in range(calls)]
    kwargs = dict(params=params, reduction=reduction, gradient=True)
    with lossd.Client(address, timeout=60) as one:
        expected = [one.evaluate(name, y_true, y_pred, **kwargs) for y_true, y_pred in inputs]
    with lossd.Client(address, timeout=60, connections=3) as spread:
        got = [spread.evaluate(name, y_true, y_pred, **kwargs) for y_true, y_pred in inputs]
        streamed = list(spread.evaluate_many(
            [dict(loss=name, y_true=y_true, y_pred=y_pred, **kwargs) for y_true, y_pred in inputs]))

    async def asynchronous():
        async with lossd.aio.Client(address, timeout=60, connections=3) as client:
            return await asyncio.gather(*[client.evaluate(name, y_true, y_pred, **kwargs) for y_true, y_pred in inputs])

    for mine, theirs in zip(got, expected, strict=True):  # one at a time: the same programs, bit for bit
        assert np.asarray(mine.loss).tobytes() == np.asarray(theirs.loss).tobytes()
        assert mine.gradient.tobytes() == theirs.gradient.tobytes()
    # Calls in flight together may be micro-batched (the test server batches),
    # whose reduced values are summed in float64: equal to rtol 1e-6, as
    # evaluation/batching.py says and tests/server/evaluation/test_batching.py checks.
    for results in (streamed, asyncio.run(asynchronous())):
        for mine, theirs in zip(results, expected, strict=True):
            np.testing.assert_allclose(mine.loss, theirs.loss, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(mine.gradient, theirs.gradient, rtol=1e-6, atol=1e-7)
