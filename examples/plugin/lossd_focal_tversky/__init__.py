"""An example lossd plugin: the focal Tversky loss (Abraham & Khan, 2019).

Installed next to the server (``pip install examples/plugin``), it is loaded
through the ``lossd.losses`` entry point and listed by ``ListLosses`` with its
parameters, read from ``__init__``'s signature and the ``Args:`` below.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="lossd_focal_tversky")
class FocalTversky(keras.losses.Loss):
    """Focal Tversky loss for imbalanced segmentation: (1 - Tversky index) ** gamma per sample.

    Args:
        alpha: Weight of false positives.
        beta: Weight of false negatives.
        gamma: Focal exponent; values above 1 focus on hard examples.
        smooth: Added to numerator and denominator to avoid division by zero.
    """

    def __init__(self, alpha=0.7, beta=0.3, gamma=0.75, smooth=1e-6, reduction="sum_over_batch_size",
                 name="focal_tversky", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha, self.beta, self.gamma, self.smooth = alpha, beta, gamma, smooth

    def call(self, y_true, y_pred):
        # Per sample: sum over every axis but the batch axis.
        axes = tuple(range(1, len(y_pred.shape)))
        tp = ops.sum(y_true * y_pred, axis=axes)
        fp = ops.sum((1 - y_true) * y_pred, axis=axes)
        fn = ops.sum(y_true * (1 - y_pred), axis=axes)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return ops.power(1.0 - index, self.gamma)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "smooth": self.smooth}
