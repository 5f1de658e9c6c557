"""Issue 11, item 6 and item 14's page_token: CreateJob refuses a job too long,
a model too large and a queue too deep before anything is spent, and a bad
ListJobs page token is INVALID_ARGUMENT, all against the real server. Issue
23: and a job whose multiply-adds or memory pass max_training_cost or
max_training_memory_bytes (``training/cost.py``)."""

from __future__ import annotations

import base64
import math

import grpc
import pytest

import lossd
from lossd._errors import from_rpc_error
from lossd.v1 import training_service_pb2 as pb
from lossd.v1 import training_service_pb2_grpc as pb_grpc
from lossd_server.errors import ResourceExhausted
from lossd_server.training import cost, models


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

# -- issue 23: a job's cost, bounded at CreateJob before it is queued, as one
# evaluation's is: its multiply-adds (model x examples x epochs,
# max_training_cost) and the memory of a batch through its model
# (max_training_memory_bytes), refused with RESOURCE_EXHAUSTED and an
# ErrorInfo naming the estimate, the limit and the setting. The model's
# arithmetic is checked against the layers Keras builds.

COST_LIMIT = 1e10
MEMORY_LIMIT = 64 << 20


@pytest.fixture(scope="module")
def cost_client(start_server):
    address = start_server(max_concurrent_jobs=1, max_training_cost=COST_LIMIT,
                           max_training_memory_bytes=MEMORY_LIMIT)
    with lossd.Client(address, timeout=120) as c:
        yield c


def _admitted(client, **kwargs) -> None:
    job = client.create_job(**kwargs)
    client.cancel_job(job.name)


def test_a_job_past_the_cost_bound_is_refused_and_a_shorter_one_admitted(cost_client):
    # mlp on digits: 1438 training and 359 validation images; ten times the epochs, ten times the cost.
    _admitted(cost_client, model="mlp", dataset="digits", epochs=10)
    err = _refused(cost_client, model="mlp", dataset="digits", epochs=100)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "TRAINING_COST_TOO_HIGH", err
    assert err.metadata["setting"] == "LOSSD_MAX_TRAINING_COST" and err.metadata["model"] == "mlp"
    assert err.metadata["limit"] == str(int(COST_LIMIT)) and int(err.metadata["estimate"]) > COST_LIMIT
    assert "Expected at most 1e+10" in err.message and "epochs=100" in err.message and "max_training_cost" in err.message


def test_a_job_whose_batch_does_not_fit_is_refused_and_a_smaller_batch_admitted(cost_client):
    wide = {"filters": [256, 256], "dense_units": 128}
    _admitted(cost_client, model="cnn", dataset="digits", epochs=1, steps_per_epoch=1, batch_size=32, model_params=wide)
    err = _refused(cost_client, model="cnn", dataset="digits", epochs=1, steps_per_epoch=1, batch_size=4096,
                   model_params=wide)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "TRAINING_MEMORY_TOO_HIGH", err
    assert err.metadata["setting"] == "LOSSD_MAX_TRAINING_MEMORY_BYTES"
    assert err.metadata["limit"] == str(MEMORY_LIMIT) and int(err.metadata["estimate"]) > MEMORY_LIMIT
    assert "batch_size=4096" in err.message and "max_training_memory_bytes" in err.message


def test_the_defaults_admit_a_long_realistic_job_and_refuse_an_absurd_one():
    from lossd_server.config import Settings

    limits = cost.TrainingLimits.from_settings(Settings())

    def job(preset, params, shape, epochs, batch, examples=50_000, classes=10):
        params = models.resolve_model_params(preset, params, shape)
        n_val = examples // 5
        return cost.JobShape(preset, params, shape, classes, epochs,
                             cost.steps_per_epoch(0, examples - n_val, batch), batch, n_val)

    limits.check(job("diffusion", {}, (32, 32, 3), epochs=100, batch=64))
    limits.check(job("cnn", {"filters": [32, 64, 128, 256]}, (32, 32, 3), epochs=100, batch=32))
    with pytest.raises(ResourceExhausted) as too_long:
        limits.check(job("cnn", {}, (32, 32, 3), epochs=100_000, batch=256))
    assert too_long.value.reason == "TRAINING_COST_TOO_HIGH"
    with pytest.raises(ResourceExhausted) as too_wide:
        limits.check(job("cnn", {"filters": [1024, 1024]}, (32, 32, 3), epochs=1, batch=65_536))
    assert too_wide.value.reason == "TRAINING_MEMORY_TOO_HIGH"


def _layers(model):
    """Every layer of a built Keras model, its sub-models' layers included
    (the VAE's encoder and decoder, the diffusion model's denoiser)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


def _keras_work(model) -> tuple[int, int]:
    """Multiply-adds and output values per example of the convolution and
    dense layers of a built Keras model, read from the layers themselves."""
    import keras

    macs = values = 0
    for layer in _layers(model):
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose, keras.layers.Dense)):
            continue
        out = [int(d) for d in layer.output.shape[1:]]
        kernel = math.prod(int(d) for d in layer.kernel.shape)
        if isinstance(layer, keras.layers.Conv2DTranspose):  # each input position meets the whole kernel
            macs += kernel * math.prod(int(d) for d in layer.input.shape[1:3])
        elif isinstance(layer, keras.layers.Conv2D):  # each output position does
            macs += kernel * out[0] * out[1]
        else:
            macs += kernel
        values += math.prod(out)
    return macs, values


@pytest.mark.parametrize("name, params, shape, classes", [
    ("mlp", {"hidden_units": [64, 32]}, (8, 8, 1), 10),
    ("cnn", {"filters": [32, 64], "dense_units": 128}, (8, 8, 1), 10),
    ("cnn", {"filters": [8, 16, 32, 4], "kernel_size": 5, "dense_units": 0, "batch_norm": True}, (7, 9, 3), 3),
    ("vae", {"latent_dim": 3, "filters": [8, 16], "dense_units": 16}, (8, 12, 1), 10),
    ("vae", {"latent_dim": 2, "filters": [4], "dense_units": 5}, (6, 4, 3), 10),
    ("diffusion", {"filters": [8, 16], "embed_dim": 8}, (8, 8, 1), 10),
    ("diffusion", {"filters": [4, 8, 16], "embed_dim": 4}, (16, 16, 3), 4),
])
def test_work_count_matches_the_layers_keras_builds(name, params, shape, classes):
    params = models.resolve_model_params(name, params, shape)
    model = models.build_model(name, params, shape, classes)
    assert models.count_work(name, params, shape, classes) == _keras_work(model)
