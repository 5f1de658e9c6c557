"""The one spec -> plan path (lossd_server.losses.plan), without a network."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lossd_server.errors import InvalidArgument  # noqa: E402
from lossd_server.losses import custom  # noqa: E402
from lossd_server.losses.plan import Planner, build_program  # noqa: E402
from lossd_server.state.sqlite import SqliteStore  # noqa: E402


@pytest.fixture(scope="module")
def planner():
    return Planner(custom.full_registry(plugins=False), custom.inline_entry)


def test_aliases_and_defaults_plan_to_the_same_program(planner):
    by_alias = planner.plan({"name": "huber_loss"})
    spelled_out = planner.plan({"name": "huber", "params": {"delta": 1.0}})
    assert by_alias.key == spelled_out.key
    assert planner.plan({"name": "huber", "params": {"delta": 2.0}}).key != by_alias.key


def test_to_spec_plans_back_to_the_same_program(planner):
    composite = planner.plan({"terms": [
        {"loss": {"name": "mse"}, "weight": 0.5, "label": "a"},
        {"loss": {"expression": "mean(abs(y_true - y_pred) * k, axis=-1)", "params": {"k": 2.0}},
         "reduction": "sum", "label": "b"},
    ]})
    again = planner.plan(composite.to_spec())
    assert again.key == composite.key
    assert [t.label for t in again.terms] == ["a", "b"]


def test_a_registered_expression_is_copied_in_by_to_spec(tmp_path):
    registry = custom.full_registry(plugins=False)
    store = custom.ExpressionStore(SqliteStore(tmp_path / "lossd.sqlite3"), registry)
    store.register("halved", "0.5 * mean(square(y_true - y_pred), axis=-1)", params={})
    planner = Planner(registry, custom.inline_entry)
    spec = planner.plan({"name": "halved"}).to_spec()
    assert spec == {"expression": "0.5 * mean(square(y_true - y_pred), axis=-1)", "params": {}}
    store.delete("halved")
    # The copy means what it meant, though the name is gone.
    planner.plan(spec)
    with pytest.raises(InvalidArgument) as exc:
        planner.plan({"name": "halved"})
    assert exc.value.reason == "UNKNOWN_LOSS"


def test_expressions_can_be_switched_off():
    planner = Planner(custom.full_registry(plugins=False), expression_compiler=None)
    with pytest.raises(InvalidArgument) as exc:
        planner.plan({"expression": "mean(y_pred, axis=-1)"})
    assert exc.value.reason == "EXPRESSIONS_DISABLED"


@pytest.mark.parametrize("reduction", ["none", "sum", "sum_over_batch_size", "mean_with_sample_weight"])
def test_the_program_of_a_composite_is_the_weighted_sum_of_keras_losses(planner, reduction):
    plan = planner.plan({"terms": [
        {"loss": {"name": "huber", "params": {"delta": 0.5}}, "weight": 0.25},
        {"loss": {"name": "mae"}, "weight": 2.0, "reduction": "sum"},
    ]})
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.standard_normal((2, 6, 3)).astype(np.float32)
    weights = rng.uniform(0, 1, 6).astype(np.float32)
    program = build_program(plan, reduction, "float32")
    total, values, outputs = program({"y_true": y_true, "y_pred": y_pred}, weights)
    assert outputs == {}
    huber = keras.losses.Huber(delta=0.5, reduction=reduction)(y_true, y_pred, sample_weight=weights)
    mae = keras.losses.MeanAbsoluteError(reduction="sum")(y_true, y_pred, sample_weight=weights)
    np.testing.assert_allclose(values[0], huber, rtol=1e-6)
    np.testing.assert_allclose(values[1], mae, rtol=1e-6)
    np.testing.assert_allclose(total, 0.25 * np.asarray(huber) + 2.0 * np.asarray(mae), rtol=1e-6)


@pytest.mark.parametrize("spec, reason", [
    ({"name": 3}, "BAD_LOSS_SPEC"),
    ({"name": "mse", "params": [1, 2]}, "BAD_PARAMETER"),
    ({"terms": [{"loss": {"name": "mse"}, "weight": "heavy"}]}, "BAD_LOSS_SPEC"),
    ({"terms": [{"loss": {"name": "mse"}, "weight": True}]}, "BAD_LOSS_SPEC"),
    ({"terms": ["mse"]}, "BAD_LOSS_SPEC"),
    ({"terms": [{"loss": {"name": "mse"}, "reduction": "average"}]}, "BAD_REDUCTION"),
])
def test_malformed_dicts_are_refused_with_a_reason(planner, spec, reason):
    from lossd.wire import WireError

    with pytest.raises((InvalidArgument, WireError)) as exc:
        planner.plan(spec)
    assert exc.value.reason == reason


def test_to_spec_writes_a_registered_expression_over_the_tensors_a_term_maps_it_to(tmp_path):
    registry = custom.full_registry(plugins=False)
    custom.ExpressionStore(SqliteStore(tmp_path / "lossd.sqlite3"), registry).register("gap", "mean(abs(a - b) * k, axis=-1)", params={"k": 2.0},
                                                         inputs=["a", "b"])
    planner = Planner(registry, custom.inline_entry)
    plan = planner.plan({"terms": [{"loss": {"name": "gap"}, "inputs": ["y_true", "y_pred"], "label": "g"},
                                   {"loss": {"name": "mse"}}]})
    spec = plan.to_spec()
    assert spec["terms"][0]["loss"] == {"expression": "mean(abs(y_true - y_pred) * k, axis=-1)", "params": {"k": 2.0}}
    again = planner.plan(spec)
    rng = np.random.default_rng(1)
    tensors = {"y_true": rng.standard_normal((5, 3)).astype(np.float32),
               "y_pred": rng.standard_normal((5, 3)).astype(np.float32)}
    first = build_program(plan, "sum", "float32")(tensors, None)[0]
    second = build_program(again, "sum", "float32")(tensors, None)[0]
    np.testing.assert_allclose(second, first, rtol=1e-6)
