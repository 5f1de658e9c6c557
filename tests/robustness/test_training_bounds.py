"""Issue 11, item 6 and item 14's page_token: CreateJob refuses a job too long,
a model too large and a queue too deep before anything is spent, and a bad
ListJobs page token is INVALID_ARGUMENT, all against the real server."""

from __future__ import annotations

import base64

import grpc
import pytest

import lossd
from lossd._errors import from_rpc_error
from lossd.v1 import training_service_pb2 as pb
from lossd.v1 import training_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def bounded_address(start_server):
    """A server with small training bounds: 5000 steps, 100k parameters, 2 queued jobs, 1 slot."""
    return start_server(max_concurrent_jobs=1, max_training_steps=5000, max_model_parameters=100_000,
                        max_queued_jobs=2)


@pytest.fixture()
def bclient(bounded_address):
    with lossd.Client(bounded_address, timeout=60) as c:
        yield c


def _refused(client, **kwargs) -> lossd.LossdError:
    before = len(client.list_jobs())
    with pytest.raises(lossd.LossdError) as exc:
        client.create_job(**kwargs)
    assert len(client.list_jobs()) == before, "a refused job was stored"
    return exc.value


def test_epochs_times_steps_past_the_bound_is_refused(bclient):
    err = _refused(bclient, model="mlp", dataset="digits", epochs=100000, steps_per_epoch=2**30)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "TOO_MANY_STEPS"
    assert "Expected at most 5000" in err.message and "100000" in err.message


def test_whole_dataset_epochs_count_their_batches(bclient):
    # digits: 1797 images, 80% for training = 1438 -> 45 batches of 32; 112 epochs = 5040 steps.
    err = _refused(bclient, model="mlp", dataset="digits", epochs=112, batch_size=32)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "TOO_MANY_STEPS"
    assert "45 batches of 32" in err.message


def test_a_model_past_the_parameter_bound_is_refused(bclient):
    err = _refused(bclient, model="mlp", dataset="digits", epochs=1, steps_per_epoch=1,
                   model_params={"hidden_units": [8192] * 8})
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "MODEL_TOO_LARGE"
    assert "Expected at most 100000 parameters" in err.message and "470" in err.message  # 470,3xx,xxx


@pytest.mark.parametrize("name, params, shape, classes", [
    ("mlp", {"hidden_units": [64, 32], "activation": "relu", "dropout": 0.2}, (8, 8, 1), 10),
    ("mlp", {"hidden_units": [5], "activation": "tanh", "dropout": 0.0}, (3, 5, 3), 2),
    ("cnn", {"filters": [32, 64], "kernel_size": 3, "dense_units": 128, "dropout": 0.25, "batch_norm": False},
     (8, 8, 1), 10),
    ("cnn", {"filters": [8, 16, 32, 4], "kernel_size": 5, "dense_units": 0, "dropout": 0.0, "batch_norm": True},
     (7, 9, 3), 3),
    ("vae", {"latent_dim": 3, "filters": [8, 16], "dense_units": 16, "beta": 1.0}, (8, 12, 1), 10),
    ("vae", {"latent_dim": 2, "filters": [4], "dense_units": 5, "beta": 1.0}, (6, 4, 3), 10),
])
def test_parameter_count_matches_keras(name, params, shape, classes):
    from lossd_server.training import models

    model = models.build_model(name, params, shape, classes)
    assert models.count_parameters(name, params, shape, classes) == model.count_params()


def test_queued_jobs_past_the_bound_are_refused_and_a_retry_still_gets_its_job(bclient):
    created, err = [], None
    try:
        for i in range(4):  # one may start running; at most 2 wait
            try:
                created.append(bclient.create_job("mlp", "digits", epochs=10, steps_per_epoch=400,
                                                  request_id=f"queue-{i}"))
            except lossd.LossdError as exc:
                err = exc
                break
        assert err is not None, "no create was refused"
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "TOO_MANY_JOBS"
        assert "Expected at most 2" in err.message
        assert len(bclient.list_jobs()) == len(created)
        again = bclient.create_job("mlp", "digits", epochs=10, steps_per_epoch=400,
                                   request_id=f"queue-{len(created) - 1}")
        assert again.id == created[-1].id and len(bclient.list_jobs()) == len(created)
    finally:
        for job in created:
            bclient.cancel_job(job)


@pytest.mark.parametrize("token", [
    base64.urlsafe_b64encode(b"n:" + b"9" * 40).decode(),   # past SQLite's integers (was INTERNAL)
    base64.urlsafe_b64encode(b"n:" + b"9" * 5000).decode(),
    base64.urlsafe_b64encode(b"n:-5").decode(),
    base64.urlsafe_b64encode(b"n:0x10").decode(),
    "not base64 at all!",
    "bjo",
])
def test_a_bad_page_token_is_invalid_argument(bounded_address, token):
    with grpc.insecure_channel(bounded_address) as channel:
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.TrainingServiceStub(channel).ListJobs(pb.ListJobsRequest(page_token=token), timeout=30)
    err = from_rpc_error(exc.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "BAD_PAGE_TOKEN"
