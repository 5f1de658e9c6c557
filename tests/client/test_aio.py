"""The asyncio client mirrors the sync one: the same methods with the same
signatures, the same results and the same errors, against the real server."""

from __future__ import annotations

import asyncio
import inspect
import io

import grpc
import numpy as np
import pytest

import lossd
import lossd.aio

keras = pytest.importorskip("keras")

MiB = 1 << 20


def public_methods(cls) -> dict:
    return {name: f for name, f in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def sync_call(address, method, *args, client_kwargs=None, **kwargs):
    """``lossd.Client.<method>(...)``; a generator's items as a list."""
    with lossd.Client(address, timeout=60, **(client_kwargs or {})) as client:
        result = getattr(client, method)(*args, **kwargs)
        return list(result) if inspect.isgenerator(result) else result


def aio_call(address, method, *args, client_kwargs=None, **kwargs):
    """``await lossd.aio.Client.<method>(...)`` in a fresh event loop; an async generator's items as a list."""
    async def main():
        async with lossd.aio.Client(address, timeout=60, **(client_kwargs or {})) as client:
            result = getattr(client, method)(*args, **kwargs)
            return [item async for item in result] if inspect.isasyncgen(result) else await result
    return asyncio.run(main())


def error_of(call, *args, **kwargs) -> lossd.LossdError:
    with pytest.raises(lossd.LossdError) as exc:
        call(*args, **kwargs)
    return exc.value


# -- the same methods ----------------------------------------------------------------

def test_every_sync_method_has_an_async_twin_with_the_same_signature():
    sync, aio = public_methods(lossd.Client), public_methods(lossd.aio.Client)
    assert sorted(aio) == sorted(sync)
    for name, method in sync.items():
        twin = aio[name]
        mine, theirs = inspect.signature(twin), inspect.signature(method)
        assert list(mine.parameters.values()) == list(theirs.parameters.values()), name
        if inspect.isgeneratorfunction(method):
            assert inspect.isasyncgenfunction(twin), f"{name} yields on the sync client: an async generator here"
            assert mine.return_annotation == theirs.return_annotation.replace("Iterator[", "AsyncIterator[", 1), name
        else:
            assert inspect.iscoroutinefunction(twin), f"{name} must be a coroutine function"
            assert mine.return_annotation == theirs.return_annotation, name


# -- the same errors -------------------------------------------------------------------

Y = np.zeros((4, 3), np.float32)
NAN = float("nan")

# (method, args, kwargs, code, reason): refused locally (by lossd.wire or the
# client's checks) or by the server; both clients must raise the same error.
BAD_CALLS = [
    ("evaluate", ("huberr", Y, Y), {}, "INVALID_ARGUMENT", "UNKNOWN_LOSS"),
    ("evaluate", (3, Y, Y), {}, "INVALID_ARGUMENT", "BAD_LOSS_SPEC"),
    ("evaluate", ({"nam": "huber"}, Y, Y), {}, "INVALID_ARGUMENT", "BAD_LOSS_SPEC"),
    ("evaluate", ("huber", Y, Y), {"params": {"delta": NAN}}, "INVALID_ARGUMENT", "BAD_PARAMETER"),
    ("evaluate", ("huber", Y, Y), {"params": {"delta": -1.0}}, "INVALID_ARGUMENT", "PARAMETER_OUT_OF_RANGE"),
    ("evaluate", ("mse", Y, Y), {"reduction": "average"}, "INVALID_ARGUMENT", "BAD_REDUCTION"),
    ("evaluate", ("mse", Y, Y.astype(np.int32)), {}, "INVALID_ARGUMENT", "UNSUPPORTED_DTYPE"),
    ("evaluate", ("mse", Y, Y[:, :2]), {}, "INVALID_ARGUMENT", "SHAPE_MISMATCH"),
    ("evaluate", ("mse", Y, np.zeros((0, 3), np.float32)), {}, "INVALID_ARGUMENT", "CLIENT"),
    ("register_loss", ("my_loss", "mean(square(y_true - y_pred"), {}, "INVALID_ARGUMENT", "BAD_EXPRESSION"),
    ("register_loss", ("my_loss", "mean(y_pred)"), {"params": {"k": NAN}}, "INVALID_ARGUMENT", "BAD_PARAMETER"),
    ("delete_loss", ("no_such_loss",), {}, "NOT_FOUND", "LOSS_NOT_FOUND"),
    ("get_job", ("jobs/nope",), {}, "NOT_FOUND", "JOB_NOT_FOUND"),
    ("cancel_job", ("nope",), {}, "NOT_FOUND", "JOB_NOT_FOUND"),
    ("watch", ("nope",), {}, "NOT_FOUND", "JOB_NOT_FOUND"),
    ("list_jobs", (["sleeping"],), {}, "INVALID_ARGUMENT", "CLIENT"),
    ("create_job", ("resnet9000",), {}, "INVALID_ARGUMENT", "UNKNOWN_MODEL"),
    ("create_job", ("mlp",), {"model_params": {"units": NAN}}, "INVALID_ARGUMENT", "BAD_PARAMETER"),
    ("create_job", ("mlp",), {"loss": {"terms": [7]}}, "INVALID_ARGUMENT", "BAD_LOSS_SPEC"),
    ("download", ("nope",), {}, "NOT_FOUND", "JOB_NOT_FOUND"),
    ("download", ("nope",), {"artifact": "weights"}, "INVALID_ARGUMENT", "CLIENT"),
    ("predict", ("nope", np.zeros((1, 8, 8), np.uint8)), {}, "NOT_FOUND", "JOB_NOT_FOUND"),
    ("predict", ("nope", np.zeros((1, 8, 8), np.complex64)), {}, "INVALID_ARGUMENT", "UNSUPPORTED_DTYPE"),
    ("generate", ("nope", 2), {}, "NOT_FOUND", "JOB_NOT_FOUND"),
    ("upload_dataset", ("digits.csv",), {}, "INVALID_ARGUMENT", "CLIENT"),
]


@pytest.mark.parametrize("method, args, kwargs, code, reason", BAD_CALLS,
                         ids=[f"{c[0]}-{c[4]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_both_clients_raise_the_same_error(address, method, args, kwargs, code, reason):
    sync = error_of(sync_call, address, method, *args, **kwargs)
    aio = error_of(aio_call, address, method, *args, **kwargs)
    assert (sync.code.name, sync.reason) == (code, reason), sync
    assert (aio.code, aio.reason, aio.message, aio.metadata) == (sync.code, sync.reason, sync.message, sync.metadata)


def test_both_clients_yield_the_same_stream_of_results_and_errors(address):
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    big = np.zeros((MiB // 4, 2), np.float32)  # 2 MiB: more than one message of these clients
    requests = [
        {"loss": "mse", "y_true": y_true, "y_pred": y_pred},
        {"loss": "hubr", "y_true": y_true, "y_pred": y_pred},  # refused by the server
        {"loss": "mse", "y_true": y_true, "y_pred": y_pred.astype(np.int32)},  # refused locally ...
        {"loss": "mse", "y_true": y_true},
        {"loss": "mse", "y_true": y_true, "y_pred": y_pred, "reductoin": "sum"},
        "mse",
        {"loss": "mse", "y_true": big, "y_pred": big},
        {"loss": "mse", "y_true": y_true, "y_pred": y_pred, "params": {"x": NAN}},
        {"loss": "huber", "y_true": y_true, "y_pred": y_pred, "reduction": "none", "gradient": True},
        {"loss": "mse", "y_true": y_true, "y_pred": y_pred[:, :2]},  # ... and by the server, last
    ]
    small = {"max_message_bytes": MiB}
    sync = sync_call(address, "evaluate_many", requests, client_kwargs=small)
    aio = aio_call(address, "evaluate_many", requests, client_kwargs=small)

    reasons = [r.reason if isinstance(r, lossd.LossdError) else None for r in sync]
    assert reasons == [None, "UNKNOWN_LOSS", "UNSUPPORTED_DTYPE", "CLIENT", "CLIENT", "CLIENT", "TENSOR_TOO_LARGE",
                       "BAD_PARAMETER", None, "SHAPE_MISMATCH"]
    assert "missing ['y_pred']" in sync[3].message and "unknown ['reductoin']" in sync[4].message
    assert len(aio) == len(sync)
    for mine, theirs in zip(aio, sync):
        assert type(mine) is type(theirs)
        if isinstance(theirs, lossd.LossdError):
            assert (mine.code, mine.reason, mine.message) == (theirs.code, theirs.reason, theirs.message)
        else:
            np.testing.assert_array_equal(mine.loss, theirs.loss)
            assert (mine.gradient is None) == (theirs.gradient is None)
    np.testing.assert_allclose(sync[0].loss, keras.losses.MeanSquaredError()(y_true, y_pred), rtol=1e-6)
    np.testing.assert_allclose(sync[8].loss, keras.losses.Huber(reduction="none")(y_true, y_pred), rtol=1e-6)


# -- the same results ------------------------------------------------------------------

def test_evaluate_concurrently_and_in_chunks(address):
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 3)).astype("float32"))
               for n in (2, 50, 7, 300)]
    big = rng.normal(size=(200_000, 3)).astype("float32")

    async def main():
        async with lossd.aio.Client(address, timeout=60, max_message_bytes=MiB) as client:
            results = await asyncio.gather(*(client.evaluate("mse", t, p) for t, p in batches))
            chunked = await client.evaluate("mae", big, big * 0.5, gradient=True)
            return results, chunked

    results, chunked = asyncio.run(main())
    for (t, p), r in zip(batches, results):
        np.testing.assert_allclose(r.loss, keras.losses.MeanSquaredError()(t, p).numpy(), rtol=1e-6)
    np.testing.assert_allclose(chunked.loss, keras.losses.MeanAbsoluteError()(big, big * 0.5).numpy(), rtol=1e-5)
    assert chunked.gradient.shape == big.shape


def test_register_use_and_delete_a_loss(address):
    async def main():
        async with lossd.aio.Client(address, timeout=60) as client:
            info = await client.register_loss("aio_scaled_mse", "k * mean(square(y_true - y_pred), axis=-1)",
                                              params={"k": 2.0}, doc="twice the MSE", replace=True)
            listed = {i.name for i in await client.losses()}
            result = await client.evaluate("aio_scaled_mse", Y, Y + 1)
            await client.delete_loss("aio_scaled_mse")
            with pytest.raises(lossd.LossdError) as exc:
                await client.evaluate("aio_scaled_mse", Y, Y + 1)
            return info, listed, result, exc.value

    info, listed, result, error = asyncio.run(main())
    assert info.name == "aio_scaled_mse" and info.source == "expression" and "aio_scaled_mse" in listed
    assert float(result.loss) == 2.0
    assert error.reason == "UNKNOWN_LOSS"


@pytest.mark.slow
def test_a_training_round_trip(address, tmp_path):
    """Upload, create, wait (with the progress bar), get, list, predict,
    download, and the errors of a finished job, all through lossd.aio."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images[:60] * (255 / 16)).round().astype(np.uint8), digits.target[:60]
    np.savez(tmp_path / "aio_digits.npz", x=x, y=y)
    progress = io.StringIO()

    async def main():
        async with lossd.aio.Client(address, timeout=180) as client:
            dataset = await client.upload_dataset(tmp_path / "aio_digits.npz")
            datasets = {d.name for d in await client.list_datasets()}
            job = await client.create_job("mlp", dataset.name, epochs=1, steps_per_epoch=2, batch_size=16,
                                          display_name="aio round trip")
            done = await client.wait(job, file=progress, timeout=180)
            again = await client.get_job(job.id)
            listed = [j.name for j in await client.list_jobs(["succeeded"], page_size=1, limit=50)]
            events = [e.kind async for e in client.watch(job)]
            probabilities = await client.predict(job, x[:5])
            path = await client.download(job, tmp_path, artifact="history")
            errors = [await error(client.cancel_job(job)), await error(client.generate(job, 2))]
            return dataset, datasets, job, done, again, listed, events, probabilities, path, errors

    async def error(coroutine):
        with pytest.raises(lossd.LossdError) as exc:
            await coroutine
        return exc.value

    dataset, datasets, job, done, again, listed, events, probabilities, path, errors = asyncio.run(main())
    assert dataset.examples == 60 and dataset.image_shape[:2] == (8, 8) and {"digits", dataset.name} <= datasets
    assert job.state == "queued" and done.state == "succeeded", done.error
    assert again.name == job.name and again.done and job.name in listed
    assert events[0] == "state" and "epoch" in events and "state: succeeded" in progress.getvalue()
    assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert path.parent == tmp_path and path.stat().st_size > 0 and not list(tmp_path.glob("*.part"))
    assert [(e.code, e.reason) for e in errors] == [(grpc.StatusCode.FAILED_PRECONDITION, "JOB_ALREADY_FINISHED"),
                                                    (grpc.StatusCode.FAILED_PRECONDITION, "WRONG_MODEL_KIND")]
    sync_errors = [error_of(sync_call, address, "cancel_job", job), error_of(sync_call, address, "generate", job, 2)]
    assert [(e.code, e.reason, e.message) for e in errors] == [(e.code, e.reason, e.message) for e in sync_errors]
