"""Training losses go through the one planner evaluation uses, and train
with the program evaluation runs.

- A bad loss spec gets the same status code, ErrorInfo reason and message
  from CreateJob as from Evaluate (real server, raw stubs).
- What only training knows (labels, logits, the generator's reconstruction
  loss) is refused with INCOMPATIBLE_LOSS.
- The loss a job trains with (``PlanLoss`` over the stored spec) has the
  value Evaluate returns and Keras computes, for the spec a job stores now
  and for the forms older servers stored.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from tests.grpc_errors import error_info, status_of
from lossd import wire
from lossd.v1 import loss_pb2, loss_service_pb2, loss_service_pb2_grpc
from lossd.v1 import training_service_pb2 as tpb
from lossd.v1 import training_service_pb2_grpc as tpb_grpc
from lossd_server.errors import InvalidArgument
from lossd_server.losses.plan import build_program
from lossd_server.training.losses import PlanLoss, label_format, plan_stored, plan_training_loss

keras = pytest.importorskip("keras")

# Cross-entropy written by hand over one-hot targets.
HAND_CE = "sum(-y_true * log(clip(y_pred, epsilon(), 1.0)), axis=-1)"


# -- one planner: the same error from Evaluate and CreateJob ---------------------

def _struct(values: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def loss(name: str = "", params: dict | None = None, expression: str = "", terms=()) -> loss_pb2.LossSpec:
    """A LossSpec built field by field (the thin client would refuse some of these locally)."""
    spec = loss_pb2.LossSpec(name=name, expression=expression, terms=list(terms))
    if params is not None:
        spec.params.CopyFrom(_struct(params))
    return spec


def term(spec: loss_pb2.LossSpec, **fields) -> loss_pb2.LossTerm:
    return loss_pb2.LossTerm(loss=spec, **fields)


MSE = loss("mse")
BAD_SPECS = [
    (loss("hubber"), "UNKNOWN_LOSS"),
    (loss("no_such_loss", {"delta": 1.0}), "UNKNOWN_LOSS"),
    (loss("huber", expression="mean(y_pred)"), "BAD_LOSS_SPEC"),
    (loss(params={"delta": 1.0}), "BAD_LOSS_SPEC"),
    (loss("huber", {"deltta": 1.0}), "UNKNOWN_PARAMETER"),
    (loss("mse", {"from_logits": True}), "UNKNOWN_PARAMETER"),
    (loss("huber", {"delta": "big"}), "BAD_PARAMETER"),
    (loss("huber", {"delta": True}), "BAD_PARAMETER"),
    (loss("huber", {"delta": {"nested": 1.0}}), "BAD_PARAMETER"),
    (loss("huber", {"delta": [1.0, 2.0]}), "BAD_PARAMETER"),
    (loss("huber", {"delta": math.nan}), None),
    (loss("huber", {"delta": math.inf}), None),
    (loss("sparse_categorical_crossentropy", {"ignore_class": 1e300}), None),
    (loss("sparse_categorical_crossentropy", {"ignore_class": 1.5}), "BAD_PARAMETER"),
    (loss("sparse_categorical_crossentropy", {"from_logits": "yes"}), "BAD_PARAMETER"),
    (loss("huber", {"delta": -1.0}), "PARAMETER_OUT_OF_RANGE"),
    (loss("categorical_generalized_cross_entropy", {"q": 1.5}), "PARAMETER_OUT_OF_RANGE"),
    (loss("binary_focal_crossentropy", {"gamma": -2.0}), "PARAMETER_OUT_OF_RANGE"),
    (loss(expression="mean(square(y_true - y_pred)"), "BAD_EXPRESSION"),
    (loss(expression="mean(frobnicate(y_pred))"), "BAD_EXPRESSION"),
    (loss(expression="mean(square(z - y_pred))"), "BAD_EXPRESSION"),
    (loss(expression="1.0 + 2.0"), "BAD_EXPRESSION"),
    (loss(expression="y_pred.__class__"), "BAD_EXPRESSION"),
    (loss(expression="mean(y_pred)", params={"unused": 1.0}), "UNKNOWN_PARAMETER"),
    (loss(expression="mean(k * y_pred)", params={"k": "two"}), "BAD_PARAMETER"),
    (loss("mse", terms=[term(MSE)]), "BAD_LOSS_SPEC"),
    (loss(params={"delta": 1.0}, terms=[term(MSE)]), "BAD_LOSS_SPEC"),
    (loss(terms=[term(loss(terms=[term(MSE)]))]), "BAD_LOSS_SPEC"),
    (loss(terms=[term(loss())]), "BAD_LOSS_SPEC"),
    (loss(terms=[term(MSE, weight=math.nan)]), "BAD_LOSS_SPEC"),
    (loss(terms=[term(MSE, weight=math.inf)]), "BAD_LOSS_SPEC"),
    (loss(terms=[term(MSE, label="a"), term(loss("mae"), label="a")]), "BAD_LOSS_SPEC"),
    (loss(terms=[term(MSE), term(MSE)]), "BAD_LOSS_SPEC"),  # two default labels
    (loss(terms=[term(MSE, inputs=["y_true"])]), "BAD_LOSS_SPEC"),
    (loss(terms=[term(MSE, reduction=99)]), "BAD_REDUCTION"),
    (loss(terms=[term(MSE), term(loss("hubber"))]), "UNKNOWN_LOSS"),
    (loss(terms=[term(loss("huber", {"delta": -1.0}))]), "PARAMETER_OUT_OF_RANGE"),
    (loss(terms=[term(loss(expression="mean(y_pred"))]), "BAD_EXPRESSION"),
]


@pytest.fixture(scope="module")
def stubs(training_address):
    with grpc.insecure_channel(training_address) as channel:
        yield loss_service_pb2_grpc.LossServiceStub(channel), tpb_grpc.TrainingServiceStub(channel)


def _failure(call, request) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call(request, timeout=60)
    status = status_of(exc.value)
    return exc.value.code(), error_info(status).reason, status.message


@pytest.mark.parametrize("spec, reason", BAD_SPECS, ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD_SPECS)])
def test_a_bad_spec_gets_the_same_error_from_create_job_as_from_evaluate(stubs, spec, reason):
    losses, training = stubs
    evaluate = loss_service_pb2.EvaluateRequest(loss=spec, y_true=wire.from_numpy(np.zeros((4, 3), np.float32)),
                                                y_pred=wire.from_numpy(np.full((4, 3), 0.5, np.float32)))
    job = tpb.JobSpec(dataset="digits", epochs=1, loss=spec)
    job.model.preset = "cnn"
    from_evaluate = _failure(losses.Evaluate, evaluate)
    from_create = _failure(training.CreateJob, tpb.CreateJobRequest(spec=job))
    assert from_create == from_evaluate
    code, got_reason, message = from_create
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    if reason is not None:  # None: non-finite or out-of-range Struct numbers, whose reason the wire owns
        assert got_reason == reason, message


# -- what only training refuses ------------------------------------------------

@pytest.fixture(scope="module")
def planner(training_server):
    return training_server.evaluator.planner  # the server's own: CreateJob plans with it


@pytest.mark.parametrize("spec, kind, words", [
    ({"name": "categorical_crossentropy"}, "classifier", "Use `sparse_categorical_crossentropy` instead"),
    ({"name": "mse"}, "classifier", "integer class labels"),
    ({"name": "circle"}, "classifier", "integer class labels"),
    ({"name": "vae_kl"}, "classifier", "['z_mean', 'z_log_var']"),
    ({"expression": "mean(y_true)"}, "classifier", "does not read y_pred"),
    ({"terms": [{"loss": {"name": "scce"}}, {"loss": {"expression": HAND_CE}}]}, "classifier", "label formats"),
    ({"terms": [{"loss": {"name": "scce", "params": {"from_logits": True}}}, {"loss": {"name": "gce"}}]},
     "classifier", "from_logits"),
    ({"terms": [{"loss": {"name": "mse"}, "inputs": ["y_pred", "y_true"]}]}, "classifier", "terms[0]"),
    ({"terms": [{"loss": {"name": "mse"}}]}, "generator", "composite cannot replace it"),
    ({"name": "sparse_categorical_crossentropy"}, "generator", "reconstruction loss"),
    ({"name": "bce", "params": {"from_logits": True}}, "generator", "from_logits=false"),
])
def test_losses_that_cannot_train_the_model_are_refused(planner, spec, kind, words):
    with pytest.raises(InvalidArgument) as exc:
        plan_training_loss(planner, spec, kind)
    assert exc.value.reason == "INCOMPATIBLE_LOSS"
    assert words in exc.value.message and "Expected" in exc.value.message


def test_a_registered_expression_over_other_tensor_names_trains_as_mapped(planner, tclient):
    """A job keeps a registered loss as its text, written over the tensors the term maps it to."""
    tclient.register_loss("sq_ab", "mean(square(a - b), axis=-1)", inputs=["a", "b"], replace=True)
    try:
        plan = plan_training_loss(planner, {"terms": [{"loss": {"name": "sq_ab"}, "inputs": ["y_true", "y_pred"]}]},
                                  "classifier")
    finally:
        tclient.delete_loss("sq_ab")
    stored = plan.to_spec()
    assert stored["terms"][0]["loss"]["expression"] == "mean(square(y_true - y_pred), axis=-1)"
    again = planner.plan(stored)  # what the job's process does
    rng = np.random.default_rng(2)
    tensors = {"y_true": rng.uniform(0, 1, (6, 10)).astype(np.float32),
               "y_pred": rng.uniform(0, 1, (6, 10)).astype(np.float32)}
    np.testing.assert_allclose(build_program(again, "sum", "float32")(tensors, None)[0],
                               build_program(plan, "sum", "float32")(tensors, None)[0], rtol=1e-6)


def test_a_term_that_ignores_the_labels_takes_any_label_format(planner):
    """An entropy penalty on y_pred alone sits beside a sparse loss."""
    plan = plan_training_loss(planner, {"terms": [
        {"loss": {"name": "scce"}},
        {"loss": {"expression": "sum(y_pred * log(clip(y_pred, epsilon(), 1.0)), axis=-1)"}, "weight": 0.1}]},
        "classifier")
    assert label_format(plan) == "sparse"


# -- the loss a job trains with is the loss Evaluate computes --------------------

def _classifier_batch():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=16)
    logits = rng.normal(size=(16, 10)).astype(np.float32)
    probs = np.asarray(keras.ops.softmax(logits)).astype(np.float32)
    return labels, logits, probs, rng.uniform(0.5, 2.0, size=16).astype(np.float32)


def _trained_value(planner, spec, kind, y_true, y_pred, sample_weight=None, reduction="sum_over_batch_size"):
    """What a job computes: plan at create, store ``to_spec()``, plan again in the job, call PlanLoss."""
    stored = plan_training_loss(planner, spec, kind).to_spec()
    return np.asarray(PlanLoss(plan_stored(stored), reduction=reduction)(y_true, y_pred, sample_weight))


def test_classifier_losses_equal_evaluate_and_keras(planner, tclient):
    labels, logits, probs, weights = _classifier_batch()
    onehot = np.eye(10, dtype=np.float32)[labels]
    scce = keras.losses.SparseCategoricalCrossentropy
    cases = [
        ({"name": "scce", "params": {"from_logits": True}}, labels, logits,
         scce(from_logits=True)(labels, logits, sample_weight=weights)),
        ({"expression": HAND_CE}, onehot, probs, scce()(labels, probs, sample_weight=weights)),
        ({"terms": [{"loss": {"name": "scce"}},
                    {"loss": {"name": "gce", "params": {"q": 0.7}}, "weight": 0.5, "reduction": "sum"}]},
         labels, probs, scce()(labels, probs, sample_weight=weights)
         + 0.5 * keras.losses.CategoricalGeneralizedCrossEntropy(q=0.7, reduction="sum")(
             labels, probs, sample_weight=weights)),
    ]
    for spec, y_true, y_pred, want in cases:
        got = _trained_value(planner, spec, "classifier", y_true, y_pred, weights)
        evaluated = tclient.evaluate(spec, y_true, y_pred, sample_weight=weights).loss
        np.testing.assert_allclose(got, evaluated, rtol=1e-6, err_msg=str(spec))
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, err_msg=str(spec))


def test_a_registered_loss_trains_with_the_definition_it_was_created_with(planner, tclient):
    labels, _, probs, _ = _classifier_batch()
    onehot = np.eye(10, dtype=np.float32)[labels]
    tclient.register_loss("scaled_ce", f"k * {HAND_CE}", params={"k": 2.0}, replace=True)
    try:
        spec = {"name": "scaled_ce", "params": {"k": 3.0}}
        stored = plan_training_loss(planner, spec, "classifier").to_spec()
        evaluated = tclient.evaluate(spec, onehot, probs).loss
    finally:
        tclient.delete_loss("scaled_ce")
    got = np.asarray(PlanLoss(plan_stored(stored))(onehot, probs))  # the loss is gone from the server
    np.testing.assert_allclose(got, evaluated, rtol=1e-6)
    np.testing.assert_allclose(got, 3.0 * keras.losses.SparseCategoricalCrossentropy()(labels, probs), rtol=1e-5)


def test_the_vae_reconstruction_loss_is_per_pixel(planner, tclient):
    """The VAE calls its reconstruction loss with reduction none and sums each image's values."""
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(4, 8, 8, 1)).astype(np.float32)
    decoded = rng.uniform(0.05, 0.95, size=(4, 8, 8, 1)).astype(np.float32)
    for spec, keras_loss in (({"name": "mse"}, keras.losses.MeanSquaredError(reduction="none")),
                             ({"name": "bce"}, keras.losses.BinaryCrossentropy(reduction="none"))):
        got = _trained_value(planner, spec, "generator", images, decoded, reduction="none")
        np.testing.assert_allclose(got, np.asarray(keras_loss(images, decoded)), rtol=1e-6)
        np.testing.assert_allclose(got, tclient.evaluate(spec, images, decoded, reduction="none").loss, rtol=1e-6)
    assert plan_training_loss(planner, None, "generator") is None  # the VAE's own default


@pytest.mark.parametrize("old, new", [
    ({"name": "sparse_categorical_crossentropy", "params": {"from_logits": True, "ignore_class": None}},
     {"name": "scce", "params": {"from_logits": True}}),
    ({"expression": HAND_CE, "params": {}, "label": "hand_ce"}, {"expression": HAND_CE}),
    ({"terms": [{"loss": {"name": "sparse_categorical_crossentropy", "params": {}}, "weight": 1.0,
                 "reduction": None, "label": "sparse_categorical_crossentropy"},
                {"loss": {"name": "categorical_generalized_cross_entropy", "params": {"q": 0.7}}, "weight": 0.5,
                 "reduction": "sum", "label": "categorical_generalized_cross_entropy"}]},
     {"terms": [{"loss": {"name": "scce"}},
                {"loss": {"name": "gce", "params": {"q": 0.7}}, "weight": 0.5, "reduction": "sum"}]}),
    ({"terms": [{"loss": {"expression": HAND_CE, "params": {}, "label": "hand_ce"}, "weight": 1.0,
                 "reduction": None, "label": "hand_ce"},
                {"loss": {"expression": f"k * {HAND_CE}", "params": {"k": 0.5}, "label": "expression"},
                 "weight": 2.0, "reduction": "sum", "label": "term_1"}]},
     {"terms": [{"loss": {"expression": HAND_CE}, "label": "hand_ce"},
                {"loss": {"expression": f"k * {HAND_CE}", "params": {"k": 0.5}}, "weight": 2.0,
                 "reduction": "sum"}]}),
])
def test_jobs_stored_by_older_servers_still_build(planner, old, new):
    """The forms older servers stored plan again to the loss a new job gets."""
    labels, _, probs, weights = _classifier_batch()
    old_plan = plan_stored(old)
    y_true = labels if label_format(old_plan) == "sparse" else np.eye(10, dtype=np.float32)[labels]
    old_value = np.asarray(PlanLoss(old_plan)(y_true, probs, weights))
    np.testing.assert_allclose(old_value, _trained_value(planner, new, "classifier", y_true, probs, weights),
                               rtol=1e-6)


def test_a_model_trained_with_a_plan_loss_saves_and_loads(planner, tmp_path):
    """The .keras file loads without compiling (Predict) and compiled, with the same loss."""
    labels, _, _, _ = _classifier_batch()
    x = np.random.default_rng(2).normal(size=(16, 4)).astype(np.float32)
    plan = plan_training_loss(planner, {"terms": [
        {"loss": {"name": "scce"}}, {"loss": {"name": "gce", "params": {"q": 0.5}}, "weight": 0.25}]}, "classifier")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="sgd", loss=PlanLoss(plan))
    model.fit(x, labels, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    from lossd_server.training.models import load_model

    np.testing.assert_allclose(np.asarray(load_model(tmp_path / "m.keras")(x)), np.asarray(model(x)), rtol=1e-6)
    compiled = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(compiled.loss, PlanLoss) and compiled.loss.plan.key == plan.key
    np.testing.assert_allclose(compiled.evaluate(x, labels, verbose=0), model.evaluate(x, labels, verbose=0),
                               rtol=1e-6)
