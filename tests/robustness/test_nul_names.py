"""Issue 23: a NUL character in any name is INVALID_ARGUMENT (reason
``NUL_CHARACTER``) at the edge (``grpc/parsing.py``), on both stores. On
PostgreSQL, which refuses NUL in text and JSON, a job's name or display name
with one was INTERNAL (``psycopg.DataError``). Real servers over a real
SQLite file and a real PostgreSQL database (``tests/postgres.py``)."""

from __future__ import annotations

import grpc
import pytest
from tests.grpc_errors import reason_of
from tests.servers import lossd_servers

from lossd.v1 import loss_service_pb2, loss_service_pb2_grpc
from lossd.v1 import training_service_pb2 as pb
from lossd.v1 import training_service_pb2_grpc as pb_grpc


@pytest.fixture(params=["sqlite", "postgresql"])
def channel(request, tmp_path_factory):
    settings = {}
    if request.param == "postgresql":
        settings["database_url"] = request.getfixturevalue("postgres").create_database()
        settings["artifacts_dir"] = tmp_path_factory.mktemp("artifacts")
    with lossd_servers(tmp_path_factory, **settings) as start, \
            grpc.insecure_channel(f"127.0.0.1:{start().port}") as channel:
        yield channel


def _job(**fields) -> pb.CreateJobRequest:
    request = pb.CreateJobRequest(display_name="ok", request_id="r-1")
    request.spec.model.preset = "cnn"
    request.spec.dataset = "digits"
    request.spec.loss.name = "categorical_crossentropy"
    request.spec.epochs = 1
    for path, value in fields.items():
        target = request
        *parents, last = path.split(".")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, last, value)
    return request


CALLS = {
    "display_name": lambda c: pb_grpc.TrainingServiceStub(c).CreateJob(_job(display_name="night\x00ly"), timeout=30),
    "request_id": lambda c: pb_grpc.TrainingServiceStub(c).CreateJob(_job(request_id="r\x00"), timeout=30),
    "dataset": lambda c: pb_grpc.TrainingServiceStub(c).CreateJob(_job(**{"spec.dataset": "dig\x00its"}),
                                                                 timeout=30),
    "loss name": lambda c: pb_grpc.TrainingServiceStub(c).CreateJob(_job(**{"spec.loss.name": "ms\x00e"}),
                                                                   timeout=30),
    "job name": lambda c: pb_grpc.TrainingServiceStub(c).GetJob(pb.GetJobRequest(name="jobs/\x00"), timeout=30),
    "page token": lambda c: pb_grpc.TrainingServiceStub(c).ListJobs(pb.ListJobsRequest(page_token="\x00"),
                                                                    timeout=30),
    "dataset upload": lambda c: pb_grpc.TrainingServiceStub(c).UploadDataset(iter([pb.UploadDatasetRequest(
        header=pb.DatasetHeader(name="up\x00load"))]), timeout=30),
    "registered loss": lambda c: loss_service_pb2_grpc.LossServiceStub(c).RegisterLoss(
        loss_service_pb2.RegisterLossRequest(name="my\x00loss", expression="mean(y_pred, axis=-1)"), timeout=30),
}


def test_a_nul_in_any_name_is_invalid_argument_on_both_stores(channel):
    for what, call in CALLS.items():
        with pytest.raises(grpc.RpcError) as err:
            call(channel)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.value.code(), err.value.details())
        assert reason_of(err.value) == "NUL_CHARACTER", what
        assert "Expected text without NUL characters" in err.value.details(), what
    # Requests without the NUL reach the store.
    training = pb_grpc.TrainingServiceStub(channel)
    assert not training.ListJobs(pb.ListJobsRequest(), timeout=30).jobs
    with pytest.raises(grpc.RpcError) as err:
        training.GetJob(pb.GetJobRequest(name="jobs/nightly"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
