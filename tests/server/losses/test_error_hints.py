"""Error hints a new user meets, through the real client and server:
suggestions for a mistyped loss name, and integer labels given to a loss
that takes one-hot labels."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import lossd

Y = np.zeros((4, 3), np.float32)


def unknown_loss_message(client, name: str) -> str:
    with pytest.raises(lossd.LossdError) as caught:
        client.evaluate(name, Y, Y)
    assert caught.value.reason == "UNKNOWN_LOSS"
    return caught.value.message


@pytest.mark.parametrize("name, suggestion", [("MSE", "mse"), ("HUBER_LOSS", "huber_loss"), ("Mae", "mae")])
def test_suggestions_ignore_case(client, name, suggestion):
    message = unknown_loss_message(client, name)
    assert message.endswith(f"Received: {name!r}. Did you mean {suggestion}?"), message


def test_each_loss_is_suggested_once(client):
    message = unknown_loss_message(client, "hubber")
    # Other tests in this process may have registered losses of their own
    # (``my_huber``); the built-in is suggested first, and once.
    suggestions = message.split("Did you mean ", 1)[1].removesuffix("?").split(", ")
    assert suggestions[0] == "huber" and suggestions.count("huber") == 1, message
    assert "Huber" not in message


def test_several_losses_are_still_suggested(client):
    message = unknown_loss_message(client, "mse2")
    suggested = message.split("Did you mean ")[1].rstrip("?").split(", ")
    assert "mse" in suggested and len(suggested) == len({s.lower() for s in suggested}) >= 2


def test_nothing_close_suggests_nothing(client):
    assert "Did you mean" not in unknown_loss_message(client, "xyzzy")


@pytest.mark.parametrize("labels", [np.array([0, 2, 1, 1]), np.array([[0], [2], [1], [1]])])
@pytest.mark.parametrize("loss", ["categorical_crossentropy", "cce"])
def test_integer_labels_with_categorical_crossentropy(client, labels, loss):
    probabilities = np.full((4, 3), 1 / 3, np.float32)
    with pytest.raises(lossd.LossdError) as caught:
        client.evaluate(loss, labels, probabilities)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "SHAPE_MISMATCH"
    assert f"y_true.shape={list(labels.shape)}, y_pred.shape=[4, 3]." in error.message
    assert "integer class labels" in error.message
    assert "one-hot y_true of shape [4, 3]" in error.message
    assert "`sparse_categorical_crossentropy`" in error.message
    # ... and what it names does work on those labels:
    sparse = client.evaluate("sparse_categorical_crossentropy", labels, probabilities)
    assert float(sparse.loss) == pytest.approx(np.log(3), rel=1e-5)
    one_hot = client.evaluate(loss, np.eye(3, dtype=np.float32)[labels.reshape(-1)], probabilities)
    assert float(one_hot.loss) == pytest.approx(np.log(3), rel=1e-5)


def test_other_one_hot_losses_say_one_hot(client):
    with pytest.raises(lossd.LossdError) as caught:
        client.evaluate("categorical_focal_crossentropy", np.array([0, 1, 2, 0]), np.full((4, 3), 1 / 3, np.float32))
    assert caught.value.reason == "SHAPE_MISMATCH"
    assert "one-hot y_true of shape [4, 3]" in caught.value.message
    assert "sparse_categorical_crossentropy" not in caught.value.message


def test_a_plain_shape_mismatch_gets_no_label_hint(client):
    with pytest.raises(lossd.LossdError) as caught:
        client.evaluate("mse", np.zeros(4, np.float32), np.zeros((4, 3), np.float32))
    assert caught.value.reason == "SHAPE_MISMATCH"
    assert "class labels" not in caught.value.message
    with pytest.raises(lossd.LossdError) as caught:
        client.evaluate("categorical_crossentropy", np.zeros((4, 2), np.float32), np.zeros((4, 3), np.float32))
    assert "class labels" not in caught.value.message
