"""The asyncio client against the real server: same results as the sync client."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

keras = pytest.importorskip("keras")

import lossd  # noqa: E402
import lossd.aio  # noqa: E402


def run(coro):
    return asyncio.run(coro)


def test_evaluate_losses_and_errors(address):
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 4)).astype("float32")

    async def main():
        async with lossd.aio.Client(address, timeout=30) as client:
            names = {info.name for info in await client.losses()}
            result = await client.evaluate("huber", y_true, y_pred, params={"delta": 2.0}, gradient=True)
            with pytest.raises(lossd.LossdError) as exc:
                await client.evaluate("nope", y_true, y_pred)
            return names, result, exc.value

    names, result, error = run(main())
    assert "huber" in names
    np.testing.assert_allclose(result.loss, keras.losses.Huber(delta=2.0)(y_true, y_pred).numpy(), rtol=1e-6)
    assert result.gradient.shape == y_pred.shape
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "UNKNOWN_LOSS"


def test_concurrent_calls_and_chunking(address):
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 3)).astype("float32"))
               for n in (2, 50, 7, 300)]
    big = rng.normal(size=(200_000, 3)).astype("float32")

    async def main():
        async with lossd.aio.Client(address, timeout=60, max_message_bytes=1 << 20) as client:
            results = await asyncio.gather(*(client.evaluate("mse", t, p) for t, p in batches))
            chunked = await client.evaluate("mae", big, big * 0.5, gradient=True)
            streamed = [r async for r in client.evaluate_many(
                [{"loss": "mse", "y_true": t, "y_pred": p} for t, p in batches[:2]]
                + [{"loss": "mse", "y_true": batches[0][0], "y_pred": batches[0][1].astype("int32")}]
                + [{"loss": "huberr", "y_true": t, "y_pred": p} for t, p in batches[2:3]])]
            return results, chunked, streamed

    results, chunked, streamed = run(main())
    for (t, p), r in zip(batches, results):
        np.testing.assert_allclose(r.loss, keras.losses.MeanSquaredError()(t, p).numpy(), rtol=1e-6)
    np.testing.assert_allclose(chunked.loss, keras.losses.MeanAbsoluteError()(big, big * 0.5).numpy(), rtol=1e-5)
    assert chunked.gradient.shape == big.shape
    assert [type(x).__name__ for x in streamed] == ["EvaluateResult", "EvaluateResult", "LossdError", "LossdError"]
    assert streamed[2].reason == "UNSUPPORTED_DTYPE" and streamed[3].reason == "UNKNOWN_LOSS"
