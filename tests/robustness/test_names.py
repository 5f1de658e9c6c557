"""Issue 11, items 9 (a cap on registered losses) and 15 (names): dataset
names are matched whole, registered loss names are NFKC-normal ASCII and not
look-alikes or reserved labels, doc refuses control characters, against the
real server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import lossd


@pytest.fixture(scope="module")
def names_address(start_server):
    """A server that admits 3 registered losses."""
    return start_server(max_registered_losses=3)


@pytest.fixture()
def nclient(names_address):
    with lossd.Client(names_address, timeout=60) as c:
        yield c


def _names(client) -> set[str]:
    return {loss.name for loss in client.losses()}


def _refused(client, name, expression="mean(square(y_true - y_pred))", **kwargs) -> lossd.LossdError:
    before = _names(client)
    with pytest.raises(lossd.LossdError) as exc:
        client.register_loss(name, expression, **kwargs)
    assert _names(client) == before, "a refused loss was registered"
    return exc.value


@pytest.mark.parametrize("name", [
    "m\u0455e",          # mѕe: Cyrillic dze
    "\uff4d\uff53\uff45",  # ｍｓｅ: full width
    "expression", "composite", "other",
    "caf\u00e9",
])
def test_look_alike_and_reserved_loss_names_are_refused(nclient, name):
    err = _refused(nclient, name)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "BAD_LOSS_NAME"
    assert "Expected" in err.message and "Received" in err.message


def test_full_width_name_says_which_loss_it_imitates(nclient):
    err = _refused(nclient, "\uff4d\uff53\uff45")
    assert "'mse'" in err.message


@pytest.mark.parametrize("doc", ["a\x00b", "colour \x1b[31mred", "bell\x07"])
def test_doc_with_control_characters_is_refused(nclient, doc):
    err = _refused(nclient, "doc_ok", doc=doc)
    # A NUL is refused as the request is parsed (grpc/parsing.py), before the loss rules.
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == ("NUL_CHARACTER" if "\0" in doc else "BAD_LOSS_SPEC"), err.message


def test_doc_keeps_newlines_and_tabs(nclient):
    nclient.register_loss("doc_lines", "mean(abs(y_true - y_pred))", doc="line one\n\tline two", replace=True)
    nclient.delete_loss("doc_lines")


def test_registered_losses_are_capped_and_replacing_is_allowed(nclient):
    for i in range(3):
        nclient.register_loss(f"capped_{i}", "mean(square(y_true - y_pred))", replace=True)
    try:
        err = _refused(nclient, "capped_3")
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "TOO_MANY_LOSSES"
        assert "Expected at most 3" in err.message
        nclient.register_loss("capped_0", "mean(abs(y_true - y_pred))", replace=True)
        y = np.ones((2, 3), np.float32)
        assert float(nclient.evaluate("capped_0", y, y * 3).loss) == pytest.approx(2.0)
    finally:
        for i in range(3):
            nclient.delete_loss(f"capped_{i}")


@pytest.mark.parametrize("name", ["a\n", "good\n", "x\r", "v.tmp\n"])
def test_dataset_names_are_matched_whole(nclient, tmp_path, name):
    from lossd_server.training import datasets

    with pytest.raises(datasets.DatasetError) as exc:
        datasets.check_name(name)
    assert exc.value.reason == "BAD_DATASET_NAME"
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 8, 8, 1), np.uint8), y=np.array([0, 1, 0, 1]))
    before = {d.name for d in nclient.list_datasets()}
    with pytest.raises(lossd.LossdError) as err:
        nclient.upload_dataset(path, name=name)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.reason == "BAD_DATASET_NAME"
    assert {d.name for d in nclient.list_datasets()} == before
