"""``matrix_crossentropy``: a crossentropy with state, the matrix ``A`` of
how often each true class is predicted as each other class.

The loss of the article's Duke multi-class loss, for one sample with targets
``t`` (one-hot or soft, shape ``[K]``) and predicted probabilities ``o``::

    loss = Σ_i [ −t_i · log2(o_i) + (A·t)_i · exp(o_i) − t_i · exp(o_i) ]

where ``(A·t)_i = Σ_j A_ij t_j``. Each call also returns the updated
matrix ``A_new = update_matrix(A, t, o, window)``, which the article names
``updateMatrix(A, t, o, 4)`` without defining it. lossd defines it as a
moving average of the batch's row-normalised confusion matrix::

    P_sj    = 1 if j = argmax_k o_sk else 0      (the predicted class of sample s)
    N_i     = Σ_s t_si                           (the samples of true class i)
    C_ij    = Σ_s t_si · P_sj / N_i              (row i: where class i's samples went)
    A_new_i = A_i + (C_i − A_i) / window   where N_i > 0
    A_new_i = A_i                          where N_i = 0 (no sample of class i: no news)

Row i of ``C`` sums to 1, so a row-stochastic ``A`` stays row-stochastic;
``window`` (the article's 4) is the length of the moving average: a class's
row moves a quarter of the way to what each batch shows. Sample weights
weigh the loss, not the update; the update is a constant to the gradient.

Initial value: a request without a matrix starts from the identity ``I_K``.
It is the confusion matrix of a classifier that is never wrong, and with it
``A·t = t``, so the two exp terms cancel and the loss starts as plain
crossentropy (in bits); the matrix terms grow only as mistakes are seen.

``log2(o)`` reads ``o`` clipped to ``[ε, 1 − ε]`` (Keras's epsilon), as
Keras's crossentropy does, so a zero probability gives a finite loss.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import keras
import numpy as np
from keras import ops

from lossd.wire import DEFAULT_REDUCTION, FLOAT_DTYPES, dtype_name
from lossd_server.errors import InvalidArgument
from lossd_server.losses import cost as costs
from lossd_server.losses.registry import SHAPES_SAME, LossEntry, Parameter

NAME = "matrix_crossentropy"
MATRIX = "matrix"
DEFAULT_WINDOW = 4


def initial_matrix(classes: int, dtype: str = "float32"):
    """The matrix a request without one starts from: the identity (see the module docstring)."""
    return ops.eye(classes, dtype=dtype)


def update_matrix(matrix, y_true, y_pred, window):
    """``A_new = updateMatrix(A, t, o, window)``: ``A`` moved ``1 / window``
    of the way to the batch's row-normalised confusion matrix, rows of
    classes absent from the batch unchanged::

        P_sj    = [j = argmax_k o_sk]
        N_i     = Σ_s t_si
        C_ij    = Σ_s t_si · P_sj / N_i
        A_new_i = A_i + (C_i − A_i) / window   if N_i > 0, else A_i

    Args:
        matrix: ``A``, ``[K, K]``.
        y_true: ``t``, ``[batch, K]`` (one-hot or soft targets).
        y_pred: ``o``, ``[batch, K]``; only its argmax counts.
        window: The moving average's length (the article's 4).
    """
    classes = y_pred.shape[-1]
    predicted = ops.one_hot(ops.argmax(y_pred, axis=-1), classes, dtype=y_pred.dtype)
    counts = ops.matmul(ops.transpose(y_true), predicted)            # [true class, predicted class]
    totals = ops.sum(y_true, axis=0)[:, None]                          # N_i
    confusion = ops.divide_no_nan(counts, totals)
    moved = matrix + (confusion - matrix) / ops.cast(window, matrix.dtype)
    return ops.stop_gradient(ops.where(totals > 0, moved, matrix))


@keras.saving.register_keras_serializable(package="lossd")
class MatrixCrossentropy(keras.losses.Loss):
    """Crossentropy with a matrix of past confusions (the module docstring has the formulas).

    Called as ``loss(y_true, y_pred, matrix=None, sample_weight=None)`` with
    ``y_true`` and ``y_pred`` of shape ``[batch, classes]`` (targets and
    probabilities); ``outputs(y_true, y_pred, matrix)`` returns
    ``{"matrix": A_new}``. A matrix of None is the identity.

    Args:
        window: The moving average's length: each batch moves a class's row
            of ``A`` ``1 / window`` of the way to its confusion.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, reduction=DEFAULT_REDUCTION, name: str = NAME,
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.window = int(window)

    def _matrix(self, y_pred, matrix):
        return initial_matrix(y_pred.shape[-1], self.dtype) if matrix is None else matrix

    def __call__(self, y_true, y_pred, matrix=None, sample_weight=None):
        # Keras's Loss.__call__ casts every tensor of the structure to the
        # loss dtype, then applies sample weights and the reduction.
        return super().__call__({"y_true": y_true, MATRIX: self._matrix(y_pred, matrix)}, y_pred,
                                sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        t, matrix = y_true["y_true"], y_true[MATRIX]
        eps = keras.config.epsilon()
        log2 = ops.log(ops.clip(y_pred, eps, 1.0 - eps)) / math.log(2.0)
        expected = ops.matmul(t, ops.transpose(matrix))  # row s: A·t_s
        exp = ops.exp(y_pred)
        return ops.sum(-t * log2 + expected * exp - t * exp, axis=-1)

    def outputs(self, y_true, y_pred, matrix=None) -> dict:
        """``{"matrix": A_new}`` in the loss dtype (``update_matrix``)."""
        y_true = ops.convert_to_tensor(y_true, dtype=self.dtype)
        y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
        matrix = ops.convert_to_tensor(self._matrix(y_pred, matrix), dtype=self.dtype)
        return {MATRIX: update_matrix(matrix, y_true, y_pred, self.window)}

    def initial_outputs(self, y_pred_shape) -> dict:
        """``{"matrix": I_K}`` for predictions of ``y_pred_shape`` (K classes last)."""
        return {MATRIX: initial_matrix(int(y_pred_shape[-1]), self.dtype)}

    def get_config(self):
        return {**super().get_config(), "window": self.window}


def check_tensors(params: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Refuses inputs the loss cannot use: y_pred not ``[batch, classes]``,
    a matrix not ``[classes, classes]`` or not floating."""
    y_pred = tensors["y_pred"]
    if y_pred.ndim != 2:
        raise InvalidArgument(
            f"Loss `{NAME}` takes y_true and y_pred of shape [batch, classes]. Expected rank 2. "
            f"Received: y_pred.shape={list(y_pred.shape)}.", reason="SHAPE_MISMATCH", metadata={"loss": NAME})
    matrix: Optional[np.ndarray] = tensors.get(MATRIX)
    if matrix is None:
        return
    classes = y_pred.shape[-1]
    if matrix.shape != (classes, classes):
        raise InvalidArgument(
            f"Loss `{NAME}` reads a {classes}x{classes} matrix for y_pred's {classes} classes. Expected "
            f"matrix.shape=[{classes}, {classes}]. Received: matrix.shape={list(matrix.shape)}.",
            reason="SHAPE_MISMATCH", metadata={"loss": NAME, "tensor": MATRIX})
    if dtype_name(matrix.dtype) not in FLOAT_DTYPES:
        raise InvalidArgument(
            f"Loss `{NAME}` reads a matrix of rates. Expected a floating dtype ({', '.join(FLOAT_DTYPES)}). "
            f"Received: matrix.dtype={dtype_name(matrix.dtype)}.", reason="UNSUPPORTED_DTYPE",
            metadata={"loss": NAME, "tensor": MATRIX})


def matrix_entry() -> LossEntry:
    """The registry entry of ``matrix_crossentropy``."""
    def build(params: Mapping[str, Any], reduction: str, dtype: str):
        return MatrixCrossentropy(params["window"], reduction=reduction, dtype=dtype)

    return LossEntry(
        name=NAME, aliases=("MatrixCrossentropy",),
        doc="Crossentropy (in bits) plus exp penalties from a matrix of past confusions, which it returns "
            "updated as the output `matrix` (the identity when the request carries none).",
        parameters=(Parameter("window", "int", DEFAULT_WINDOW,
                              "Length of the matrix's moving average: each batch moves a class's row "
                              "1/window of the way to its confusion.", minimum=1),),
        build=build, source="builtin", inputs=("y_true", "y_pred", MATRIX), shapes=SHAPES_SAME,
        optional_inputs=frozenset({MATRIX}), outputs=(MATRIX,), check_tensors=check_tensors,
        cost=costs.matrix_crossentropy)
