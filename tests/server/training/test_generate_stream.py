"""GenerateStream against a real server and a real (tiny) diffusion job:
progress after every step, then the images Generate gives for the same
request; the statuses Generate gives for bad requests; a cancelled or
expired stream stops sampling."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

import lossd
from lossd.v1 import training_service_pb2 as pb
from lossd.v1 import training_service_pb2_grpc as pb_grpc


def _steps_run(server) -> float:
    """The server's count of sampling steps run (``lossd_generation_steps_total``)."""
    return server.metrics.registry.get_sample_value("lossd_generation_steps_total")


def _settled_steps(server, quiet: float = 1.0, limit: float = 30.0) -> float:
    """The step count once it has not moved for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last = _steps_run(server)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = _steps_run(server)
        if now == last:
            return now
        last = now
    raise AssertionError(f"sampling never stopped: {last} steps and counting")


def test_the_stream_reports_each_step_in_order_then_generates_images(training_address, tclient, diffusion_job):
    request = pb.GenerateRequest(name=diffusion_job.name, count=5, seed=3, prompt="7", steps=12)
    with grpc.insecure_channel(training_address) as channel:
        messages = list(pb_grpc.TrainingServiceStub(channel).GenerateStream(request, timeout=120))
    kinds = [m.WhichOneof("kind") for m in messages]
    assert kinds == ["progress"] * 12 + ["result"]
    progress = [m.progress for m in messages[:-1]]
    assert [p.step for p in progress] == list(range(1, 13)) and {p.steps for p in progress} == {12}
    elapsed = [p.elapsed_seconds for p in progress]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert all(p.eta_seconds >= 0 for p in progress) and progress[-1].eta_seconds == 0
    # The ETA is the mean step time so far times the steps left.
    p = progress[5]
    assert p.eta_seconds == pytest.approx(p.elapsed_seconds / 6 * 6, rel=1e-6)
    images = lossd.wire.to_numpy(messages[-1].result.images)
    unary = tclient.generate(diffusion_job, 5, seed=3, prompt="7", steps=12)
    assert images.dtype == np.float32 and images.shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(images, unary)  # one sampling path: bit for bit


def test_the_clients_stream_ends_with_the_images_of_generate(tclient, diffusion_job):
    from sklearn.datasets import load_digits

    digits = load_digits()
    init = (digits.images[digits.target == 3][:4] / 16.0)[..., None].astype(np.float32)
    kwargs = dict(seed=9, prompt="3", steps=8, init_images=init, init_weight=1.0)  # guided: the guide runs too
    items = list(tclient.generate_stream(diffusion_job, 4, **kwargs))
    assert [i.step for i in items] == list(range(1, 9)) and all(i.steps == 8 for i in items)
    assert [i.done for i in items] == [False] * 7 + [True]
    assert all(i.images is None for i in items[:-1])
    np.testing.assert_array_equal(items[-1].images, tclient.generate(diffusion_job, 4, **kwargs))


def test_a_vae_streams_one_step(tclient, vae_job):
    items = list(tclient.generate_stream(vae_job, 3, seed=2))
    assert [(i.step, i.steps) for i in items] == [(1, 1)]
    np.testing.assert_array_equal(items[0].images, tclient.generate(vae_job, 3, seed=2))


def test_the_async_client_streams_and_cancels_too(training_server, training_address, diffusion_job):
    from lossd import aio

    async def run():
        async with aio.Client(training_address, timeout=120) as client:
            items = [i async for i in client.generate_stream(diffusion_job, 2, seed=1, prompt="4", steps=6)]
            unary = await client.generate(diffusion_job, 2, seed=1, prompt="4", steps=6)
            before = _settled_steps(training_server)  # blocks the loop: nothing else runs on it
            async for first in client.generate_stream(diffusion_job, LONG_COUNT, **LONG):
                break  # leaving the loop cancels the call (when asyncio finalizes the generator)
            await asyncio.sleep(0.2)
            # Counted with the channel still open: the cancel, not the channel's close, stopped it.
            return items, unary, first, _settled_steps(training_server) - before

    items, unary, first, ran = asyncio.run(run())
    assert [i.step for i in items] == list(range(1, 7))
    np.testing.assert_array_equal(items[-1].images, unary)
    assert (first.step, first.steps) == (1, 100)
    assert 1 <= ran < 50, ran


@pytest.mark.parametrize("kwargs", [
    {"prompt": "eleven"},                                            # UNKNOWN_CLASS
    {"steps": 101},                                                  # BAD_STEPS
    {"count": 0},                                                    # BAD_COUNT
    {"count": 1024, "steps": 100, "limit": 1000},                    # GENERATION_TOO_LARGE
    {"init_weight": 1.0},                                            # MISSING_TENSOR
    {"guidance": {"name": "no_such_loss"}},                          # UNKNOWN_LOSS
    {"classifier": "jobs/doesnotexist"},                             # NOT_FOUND
    {"job": "jobs/doesnotexist"},                                    # NOT_FOUND
    {"job": "VAE", "prompt": "7"},                                   # NOT_CONDITIONAL
])
def test_bad_requests_get_the_status_generate_gives(training_server, tclient, diffusion_job, vae_job, kwargs):
    kwargs = dict(kwargs)
    job = kwargs.pop("job", diffusion_job)
    job = vae_job if job == "VAE" else job
    count = kwargs.pop("count", 4)
    limit = kwargs.pop("limit", None)
    inference = training_server.training.inference
    saved = inference.max_pixel_steps
    if limit is not None:
        inference.max_pixel_steps = limit
    try:
        before = _steps_run(training_server)
        with pytest.raises(lossd.LossdError) as unary:
            tclient.generate(job, count, seed=1, **kwargs)
        with pytest.raises(lossd.LossdError) as stream:
            list(tclient.generate_stream(job, count, seed=1, **kwargs))
    finally:
        inference.max_pixel_steps = saved
    assert unary.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert (stream.value.code, stream.value.reason, stream.value.message) == \
        (unary.value.code, unary.value.reason, unary.value.message)
    if stream.value.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert "Expected" in stream.value.message
    assert _steps_run(training_server) == before  # refused before any step


# A generation long enough to cancel in the middle: 100 DDIM steps of 1024 images.
LONG = dict(seed=1, prompt="5", steps=100)
LONG_COUNT = 1024


def test_cancelling_the_stream_stops_sampling(training_server, tclient, diffusion_job):
    before = _settled_steps(training_server)
    stream = tclient.generate_stream(diffusion_job, LONG_COUNT, **LONG)
    first = next(stream)
    assert (first.step, first.steps) == (1, 100)
    stream.close()  # the client's cancel
    ran = _settled_steps(training_server) - before
    assert 1 <= ran < 50, ran  # stopped at the next step, far from the 100
    started = time.monotonic()
    assert tclient.generate(diffusion_job, 2, seed=1, prompt="5", steps=5).shape == (2, 8, 8, 1)
    assert time.monotonic() - started < 10  # the thread is free: a later call is served at once


@pytest.mark.parametrize("call", ["stream", "unary"])
def test_a_deadline_stops_sampling(training_server, tclient, diffusion_job, call):
    # The deadline: about 20 of the 100 steps, whatever this machine's speed.
    probe = list(tclient.generate_stream(diffusion_job, LONG_COUNT, seed=1, prompt="5", steps=4))
    deadline = 20 * (probe[-1].elapsed_seconds - probe[0].elapsed_seconds) / 3
    before = _settled_steps(training_server)
    with pytest.raises(lossd.LossdError) as exc:
        if call == "stream":
            list(tclient.generate_stream(diffusion_job, LONG_COUNT, timeout=deadline, **LONG))
        else:
            tclient.generate(diffusion_job, LONG_COUNT, timeout=deadline, **LONG)
    assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    ran = _settled_steps(training_server) - before
    assert ran < 60, (ran, deadline)  # not the 100 steps: sampling stopped soon after the deadline
