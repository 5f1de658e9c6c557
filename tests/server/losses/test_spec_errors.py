"""One spec, one answer: a bad LossSpec gets the same status code, ErrorInfo
reason and message whichever RPC carries it (Evaluate, EvaluateChunked,
CreateJob; RegisterLoss for expressions), because all of them plan it with
the one Planner. And no Struct a client can send gives INTERNAL.

The specs are built as raw messages, not through the client, so that the
server's own checks are what is tested.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.grpc_errors import error_info, status_of
from tests.fuzzing import PARAM_NAMES, STRUCT_VALUES
from tests.fuzzing import make_struct as _struct
from lossd import wire
from lossd.v1 import (loss_pb2, loss_service_pb2, loss_service_pb2_grpc, training_service_pb2,
                      training_service_pb2_grpc)

pytest.importorskip("keras")

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def spec(name="", expression="", params=None, terms=()) -> loss_pb2.LossSpec:
    message = loss_pb2.LossSpec(name=name, expression=expression, terms=list(terms))
    if params is not None:
        message.params.CopyFrom(_struct(params))
    return message


def term(loss: loss_pb2.LossSpec = None, **fields) -> loss_pb2.LossTerm:
    message = loss_pb2.LossTerm(**fields)
    if loss is not None:
        message.loss.CopyFrom(loss)
    return message


MSE = spec("mse")
BAD_SPECS = [
    # (id, spec, reason)
    ("unknown name", spec("huberr"), "UNKNOWN_LOSS"),
    ("very long unknown name", spec("x" * 5000), "UNKNOWN_LOSS"),
    ("name and expression", spec("mse", "mean(y_pred)"), "BAD_LOSS_SPEC"),
    ("param of the wrong type", spec("huber", params={"delta": "two"}), "BAD_PARAMETER"),
    ("param as a string number", spec("huber", params={"delta": "2.0"}), "BAD_PARAMETER"),
    ("param as a bool", spec("huber", params={"delta": True}), "BAD_PARAMETER"),
    ("negative delta", spec("huber", params={"delta": -1.0}), "PARAMETER_OUT_OF_RANGE"),
    ("zero delta", spec("huber", params={"delta": 0.0}), "PARAMETER_OUT_OF_RANGE"),
    ("subnormal delta (zero to TensorFlow)", spec("huber", params={"delta": 1e-309}), "PARAMETER_OUT_OF_RANGE"),
    ("NaN param", spec("huber", params={"delta": math.nan}), "BAD_PARAMETER"),
    ("Inf param", spec("huber", params={"delta": math.inf}), "BAD_PARAMETER"),
    ("-Inf param", spec("huber", params={"delta": -math.inf}), "BAD_PARAMETER"),
    ("nested object as a number", spec("huber", params={"delta": {"a": 1.0}}), "BAD_PARAMETER"),
    ("list as a number", spec("huber", params={"delta": [1.0, 2.0]}), "BAD_PARAMETER"),
    ("unknown param", spec("huber", params={"deltaa": 1.0}), "UNKNOWN_PARAMETER"),
    ("number as a bool", spec("binary_crossentropy", params={"from_logits": 1.0}), "BAD_PARAMETER"),
    ("label smoothing above 1", spec("binary_crossentropy", params={"label_smoothing": 2.0}),
     "PARAMETER_OUT_OF_RANGE"),
    ("axis as a string", spec("cosine_similarity", params={"axis": "x"}), "BAD_PARAMETER"),
    ("axis past 2^63", spec("cosine_similarity", params={"axis": 1e300}), "BAD_PARAMETER"),
    ("ignore_class past int32", spec("sparse_categorical_crossentropy", params={"ignore_class": 2.0 ** 40}),
     "PARAMETER_OUT_OF_RANGE"),
    ("fractional ignore_class", spec("sparse_categorical_crossentropy", params={"ignore_class": 1.5}),
     "BAD_PARAMETER"),
    ("expression syntax error", spec(expression="mean(("), "BAD_EXPRESSION"),
    ("expression calling Python", spec(expression="__import__('os')"), "BAD_EXPRESSION"),
    ("expression with an unknown function", spec(expression="foo(y_pred)"), "BAD_EXPRESSION"),
    ("expression with an attribute", spec(expression="y_pred.numpy()"), "BAD_EXPRESSION"),
    ("expression with a NaN param", spec(expression="mean(square(y_pred) * k, axis=-1)", params={"k": math.nan}),
     "BAD_PARAMETER"),
    ("expression with an unused param", spec(expression="mean(y_pred, axis=-1)", params={"k": 1.0}),
     "UNKNOWN_PARAMETER"),
    ("expression reading no tensor", spec(expression="1.0 + 2.0"), "BAD_EXPRESSION"),
    ("term without a loss", spec(terms=[term(label="a")]), "BAD_LOSS_SPEC"),
    ("nested composite", spec(terms=[term(spec(terms=[term(MSE)]))]), "BAD_LOSS_SPEC"),
    ("duplicate labels", spec(terms=[term(MSE, label="a"), term(spec("mae"), label="a")]), "BAD_LOSS_SPEC"),
    ("NaN weight", spec(terms=[term(MSE, weight=math.nan)]), "BAD_LOSS_SPEC"),
    ("Inf weight", spec(terms=[term(MSE, weight=math.inf)]), "BAD_LOSS_SPEC"),
    ("unknown loss in a term", spec(terms=[term(spec("msee"))]), "UNKNOWN_LOSS"),
    ("bad term reduction", spec(terms=[term(MSE, reduction=99)]), "BAD_REDUCTION"),
    ("term reading too few tensors", spec(terms=[term(MSE, inputs=["y_true"])]), "BAD_LOSS_SPEC"),
    ("terms and a name", spec("mse", terms=[term(MSE)]), "BAD_LOSS_SPEC"),
    ("terms and top-level params", spec(params={"delta": 1.0}, terms=[term(MSE)]), "BAD_LOSS_SPEC"),
    ("bad param inside a term", spec(terms=[term(spec("huber", params={"delta": -2.0}))]),
     "PARAMETER_OUT_OF_RANGE"),
    ("NaN param inside a term", spec(terms=[term(spec("huber", params={"delta": math.nan}))]), "BAD_PARAMETER"),
]
IDS = [case[0] for case in BAD_SPECS]

Y = np.random.default_rng(0).uniform(0.1, 0.9, (4, 3)).astype(np.float32)


def _status(call):
    """Runs a call that must fail; returns (code, reason, message)."""
    with pytest.raises(grpc.RpcError) as exc:
        call()
    status = status_of(exc.value)
    return exc.value.code(), error_info(status).reason, status.message


@pytest.fixture(scope="module")
def stubs(address):
    channel = grpc.insecure_channel(address)
    yield loss_service_pb2_grpc.LossServiceStub(channel), training_service_pb2_grpc.TrainingServiceStub(channel)
    channel.close()


def evaluate(stub, loss):
    request = loss_service_pb2.EvaluateRequest(loss=loss, y_true=wire.from_numpy(Y), y_pred=wire.from_numpy(Y))
    return _status(lambda: stub.Evaluate(request, timeout=60))


def evaluate_chunked(stub, loss):
    header = loss_service_pb2.ChunkedHeader(loss=loss, y_true=wire.info(Y), y_pred=wire.info(Y))
    messages = [loss_service_pb2.EvaluateChunkedRequest(header=header),
                loss_service_pb2.EvaluateChunkedRequest(chunk=loss_service_pb2.TensorChunk(
                    start=0, rows=4, y_true=Y.tobytes(), y_pred=Y.tobytes()))]
    return _status(lambda: list(stub.EvaluateChunked(iter(messages), timeout=60)))


def create_job(stub, loss):
    job = training_service_pb2.JobSpec(dataset="digits", epochs=1, loss=loss)
    job.model.preset = "mlp"
    return _status(lambda: stub.CreateJob(training_service_pb2.CreateJobRequest(spec=job), timeout=60))


@pytest.mark.parametrize("case", BAD_SPECS, ids=IDS)
def test_a_bad_spec_gets_one_answer_on_every_rpc(stubs, case):
    _, loss, reason = case
    losses, jobs = stubs
    answers = {"Evaluate": evaluate(losses, loss), "EvaluateChunked": evaluate_chunked(losses, loss),
               "CreateJob": create_job(jobs, loss)}
    for rpc, (code, got_reason, message) in answers.items():
        assert (code, got_reason) == (INVALID, reason), f"{rpc}: {code} {got_reason}: {message}"
    messages = {rpc: message for rpc, (_, _, message) in answers.items()}
    assert len(set(messages.values())) == 1, messages
    message = messages["Evaluate"].lower()
    assert "expected" in message and "received" in message or "did you mean" in message or "expression" in message, \
        messages["Evaluate"]


EXPRESSION_CASES = [case for case in BAD_SPECS if case[1].expression and not case[1].name]


@pytest.mark.parametrize("case", EXPRESSION_CASES, ids=[c[0] for c in EXPRESSION_CASES])
def test_register_loss_agrees_on_bad_expressions(stubs, case):
    _, loss, reason = case
    losses, _ = stubs
    request = loss_service_pb2.RegisterLossRequest(name="spec_table_case", expression=loss.expression)
    if loss.HasField("params"):
        request.params.CopyFrom(loss.params)
    code, got_reason, message = _status(lambda: losses.RegisterLoss(request, timeout=60))
    assert (code, got_reason) == (INVALID, reason), message
    assert evaluate(losses, loss)[:2] == (INVALID, reason)


# -- no Struct gives INTERNAL --------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(params=st.dictionaries(PARAM_NAMES, STRUCT_VALUES, max_size=3),
       loss=st.sampled_from(["huber", "cosine_similarity", "sparse_categorical_crossentropy",
                             "binary_focal_crossentropy", "expr:mean(square(y_true - y_pred) * k, axis=-1)"]),
       rpc=st.sampled_from(["Evaluate", "EvaluateChunked", "CreateJob", "RegisterLoss", "ModelParams",
                            "OptimizerParams"]))
def test_no_struct_gives_internal(stubs, params, loss, rpc):
    losses, jobs = stubs
    struct = _struct(params)
    message = spec(expression=loss[5:]) if loss.startswith("expr:") else spec(loss)
    message.params.CopyFrom(struct)
    if rpc == "Evaluate":
        call = lambda: losses.Evaluate(loss_service_pb2.EvaluateRequest(  # noqa: E731
            loss=message, y_true=wire.from_numpy(Y), y_pred=wire.from_numpy(Y)), timeout=60)
    elif rpc == "EvaluateChunked":
        header = loss_service_pb2.ChunkedHeader(loss=message, y_true=wire.info(Y), y_pred=wire.info(Y))
        messages = [loss_service_pb2.EvaluateChunkedRequest(header=header),
                    loss_service_pb2.EvaluateChunkedRequest(chunk=loss_service_pb2.TensorChunk(
                        start=0, rows=4, y_true=Y.tobytes(), y_pred=Y.tobytes()))]
        call = lambda: list(losses.EvaluateChunked(iter(messages), timeout=60))  # noqa: E731
    elif rpc == "RegisterLoss":
        request = loss_service_pb2.RegisterLossRequest(name="struct_fuzz", expression="mean(y_pred * k, axis=-1)",
                                                       params=struct, replace=True)
        call = lambda: losses.RegisterLoss(request, timeout=60)  # noqa: E731
    else:
        job = training_service_pb2.JobSpec(dataset="digits", epochs=1, loss=message)
        job.model.preset = "mlp"
        if rpc == "ModelParams":
            job.model.params.CopyFrom(struct)
        elif rpc == "OptimizerParams":
            job.optimizer.name = "adam"
            job.optimizer.params.CopyFrom(struct)
        call = lambda: jobs.CreateJob(training_service_pb2.CreateJobRequest(spec=job), timeout=60)  # noqa: E731
    try:
        answer = call()
        if isinstance(answer, training_service_pb2.Job):  # these params were fine: don't train
            jobs.CancelJob(training_service_pb2.CancelJobRequest(name=answer.name), timeout=60)
    except grpc.RpcError as error:
        assert error.code() != grpc.StatusCode.INTERNAL, (rpc, params, error.details())
        assert error.code() in (INVALID, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS), \
            (rpc, params, error.code(), error.details())
