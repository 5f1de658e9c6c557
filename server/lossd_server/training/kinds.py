"""The two kinds of model a job trains (``JobRecord.model_kind``, the
``model_kind`` of the TrainingService's Job): a preset's kind decides which
losses suit it (``losses``), how its process trains it (``worker``) and
which call uses it (Predict or Generate, ``inference``).

A module of its own, below both ``models`` and ``losses``: the presets are
defined by kind, the loss checks need the kind, and the VAE's default loss
comes from ``losses``, so neither of those two can hold it without an import
circle.
"""

CLASSIFIER = "classifier"
GENERATOR = "generator"
