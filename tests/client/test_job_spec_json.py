"""``Job.spec`` (and so ``lossd jobs get``) shows numbers as a user writes
them: 64-bit integers as ints (``"seed": 1``, not protobuf's JSON string
``"1"``) and the whole numbers of a Struct as ints (``"filters": [32, 64]``,
not ``[32.0, 64.0]``), every other value as protobuf's JSON mapping gives it."""

from __future__ import annotations

import json

from google.protobuf import json_format
from hypothesis import given, settings, strategies as st

from lossd import wire
from lossd._jobs import message_to_plain_dict
from lossd.v1 import training_service_pb2 as pb

numbers = st.one_of(st.integers(-2 ** 52, 2 ** 52), st.floats(allow_nan=False, allow_infinity=False, width=64))
params = st.dictionaries(st.sampled_from(["filters", "dropout", "beta", "units"]),
                         st.one_of(numbers, st.lists(numbers, max_size=3), st.text(max_size=3), st.booleans()))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 63 - 1), model_params=params, loss_params=params)
def test_plain_dict_is_protobufs_json_with_ints_where_the_number_is_whole(seed, model_params, loss_params):
    spec = pb.JobSpec(dataset="digits", seed=seed, epochs=3, metrics=["accuracy"])
    spec.model.preset = "cnn"
    spec.model.params.update(model_params)
    spec.loss.name = "huber"
    spec.loss.params.update(loss_params)
    plain = message_to_plain_dict(spec)
    reference = json_format.MessageToDict(spec, preserving_proto_field_name=True)

    if seed:
        assert plain["seed"] == seed and type(plain["seed"]) is int and reference["seed"] == str(seed)
        reference["seed"] = seed
    assert plain == reference  # the same values (1 == 1.0): only their types differ

    def whole_numbers(value):
        if isinstance(value, dict):
            return [n for v in value.values() for n in whole_numbers(v)]
        if isinstance(value, list):
            return [n for v in value for n in whole_numbers(v)]
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []

    for name in ("model", "loss"):
        for number in whole_numbers(plain[name].get("params", {})):
            assert type(number) is (int if float(number).is_integer() else float), number
    json.dumps(plain)  # still JSON


def test_the_shape_lossd_jobs_get_printed_before():
    spec = pb.JobSpec(dataset="digits", seed=1)
    spec.model.preset = "cnn"
    spec.model.params.update({"filters": [32, 64], "dropout": 0.25})
    spec.loss.CopyFrom(wire.spec_from_dict({"name": "huber", "params": {"delta": 2.0}}))
    assert json.dumps(message_to_plain_dict(spec), sort_keys=True) == json.dumps({
        "dataset": "digits", "seed": 1, "model": {"preset": "cnn", "params": {"filters": [32, 64], "dropout": 0.25}},
        "loss": {"name": "huber", "params": {"delta": 2}}}, sort_keys=True)
