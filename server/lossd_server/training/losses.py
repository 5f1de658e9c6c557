"""Training losses: the checks that a planned loss suits a model and its
labels, and the Keras loss a job's process trains with.

A job's loss goes through the one ``Planner`` evaluation uses
(``lossd_server.losses.plan``), so a spec that Evaluate refuses, CreateJob
refuses with the same status, reason and message. What this module adds is
what only training knows, checked on the plan's terms
(``check_suits_model``): a training job feeds a loss the labels (``y_true``)
and the model's output (``y_pred``) and nothing else; a classifier's terms
must agree on the label format and on ``from_logits``; a generator's
reconstruction loss compares images with images.

The job stores ``plan.to_spec()``: self-contained (a registered expression
is copied in as its text), so a job trains with the definition it was
created with and its process needs no access to the server's loss store.
The process plans that spec again (``job_planner``) and trains with
``PlanLoss``: the program ``build_program`` makes, the one evaluation runs.

Label format: classifiers are trained on integer labels. A loss that takes
class indices (``sparse_categorical_crossentropy``...) gets them as they are;
an expression or plugin loss gets one-hot targets of the output's shape
``[batch, classes]``, which is what an expression over ``y_true * log(y_pred)``
needs. A Keras loss that expects one-hot targets (``categorical_crossentropy``)
is refused with a pointer to its sparse twin.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import keras

from lossd.wire import DEFAULT_REDUCTION, REDUCTION_NONE
from lossd_server.errors import InvalidArgument
from lossd_server.losses.plan import Plan, Planner, Term, build_program
from lossd_server.losses.registry import SHAPES_ANY, SHAPES_SAME, SHAPES_SPARSE
from lossd_server.training.kinds import CLASSIFIER

DEFAULT_CLASSIFIER_LOSS = "sparse_categorical_crossentropy"
DIFFUSION = "diffusion"
DEFAULT_DIFFUSION_LOSS = "mse"  # on the noise: DDPM's "simple" loss
DEFAULT_VAE_LOSS = "binary_crossentropy"  # per pixel, as the classic Keras VAE
SPARSE, ONE_HOT = "sparse", "one_hot"
TRAINING_INPUTS = ("y_true", "y_pred")
_SPARSE_TWINS = {"categorical_crossentropy": "sparse_categorical_crossentropy"}


def _incompatible(message: str, loss: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INCOMPATIBLE_LOSS", metadata={"loss": loss})


def _name(term: Term) -> str:
    return term.entry.name or "expression"


def plan_training_loss(planner: Planner, spec: Optional[Mapping[str, Any]], model_kind: str,
                       preset: str = "") -> Optional[Plan]:
    """Plans a job's loss and checks it suits the model.

    Args:
        planner: The planner evaluation uses (``Evaluator.planner``).
        spec: A LossSpec dict (``lossd.wire.spec_to_dict``); None or an
            empty spec means the model's default loss.
        model_kind: ``classifier`` or ``generator``.
        preset: The model preset (``diffusion`` defaults to ``mse`` on the
            noise and takes composites).

    Returns:
        The plan; None for the vae's own default loss (``reconstruction_loss``
        plans it in the job's process).

    Raises:
        InvalidArgument: whatever the planner refuses (with its reasons), or
            INCOMPATIBLE_LOSS for a loss that cannot work with the model and
            its labels.
    """
    if not spec or not any(spec.get(k) for k in ("name", "expression", "terms", "params")):
        if model_kind != CLASSIFIER and preset != DIFFUSION:
            return None
        spec = {"name": DEFAULT_DIFFUSION_LOSS if preset == DIFFUSION else DEFAULT_CLASSIFIER_LOSS}
    plan = planner.plan(spec, TRAINING_INPUTS)
    check_suits_model(plan, model_kind, preset)
    return plan


def check_suits_model(plan: Plan, model_kind: str, preset: str = "") -> None:
    """Refuses (INCOMPATIBLE_LOSS) a plan that cannot train this kind of model."""
    for i, term in enumerate(plan.terms):
        where = f"terms[{i}]" if plan.composite else "loss"
        # Optional inputs are a stateful loss's state, which the job keeps (PlanLoss.build_state).
        required = tuple(given for own, given in zip(term.entry.inputs, term.inputs)
                         if own not in term.entry.optional_inputs)
        if required != tuple(n for n in TRAINING_INPUTS if n in required):
            raise _incompatible(
                f"{where}: loss `{_name(term)}` reads {list(term.inputs)}; a training job feeds a loss the labels "
                "and the model's output only. Expected a loss of (y_true, y_pred).", _name(term))
        if "y_pred" not in term.inputs:
            raise _incompatible(
                f"{where}: loss `{_name(term)}` does not read y_pred, so it cannot train the model. "
                f"Expected a loss of (y_true, y_pred). Received: a loss of {list(term.inputs)}.", _name(term))
    if plan.outputs and model_kind != CLASSIFIER:
        raise _incompatible(
            f"Loss `{plan.metric_name}` keeps state over the classes ({', '.join(plan.outputs)}), so it trains "
            "classifiers only. Expected a classifier preset (cnn, mlp), or a reconstruction loss such as `mse` "
            "for the vae.", plan.metric_name)
    if model_kind == CLASSIFIER:
        label_format(plan)  # refuses what cannot take integer or one-hot labels
        from_logits(plan)  # refuses terms that disagree
        return
    if plan.composite and preset != DIFFUSION:
        raise _incompatible("The vae's loss is already reconstruction + beta * KL; a composite cannot "
                            "replace it. Expected a reconstruction loss such as `mse`.", "composite")
    for term in plan.terms:
        if term.entry.shapes not in (SHAPES_SAME, SHAPES_ANY):
            raise _incompatible(
                f"Loss `{_name(term)}` cannot be a generator's reconstruction loss (or noise loss). Expected a "
                "loss comparing images (the diffusion model's: noise) with others of the same shape, such as "
                "`mse`.", _name(term))
    if from_logits(plan):
        raise _incompatible(
            f"Loss `{_name(plan.terms[0])}` with from_logits=true does not suit a generator, whose output is "
            "pixels (or noise), not logits. Expected from_logits=false.", _name(plan.terms[0]))


def label_format(plan: Plan) -> str:
    """``sparse`` (integer labels) or ``one_hot`` for a classifier's plan.

    Terms that do not read ``y_true`` take any labels.

    Raises:
        InvalidArgument: INCOMPATIBLE_LOSS for a loss that wants neither, or
            terms that want different formats.
    """
    formats = set()
    for term in plan.terms:
        if "y_true" not in term.inputs:
            continue
        if term.entry.shapes == SHAPES_SPARSE:
            formats.add(SPARSE)
        elif term.entry.shapes == SHAPES_ANY or term.entry.source == "builtin":
            # lossd's own classifier losses (matrix_crossentropy) have no sparse twin.
            formats.add(ONE_HOT)
        else:
            twin = _SPARSE_TWINS.get(term.entry.name)
            hint = f" Use `{twin}` instead." if twin else ""
            raise _incompatible(
                f"Loss `{_name(term)}` does not suit a classifier trained on integer class labels: it expects "
                "targets of the model output's shape [batch, classes] (one-hot), and the dataset has labels of "
                "shape [batch]. Expected a loss that takes class indices, such as "
                f"`sparse_categorical_crossentropy`, or an expression loss (it gets one-hot targets).{hint}",
                _name(term))
    if len(formats) > 1:
        raise _incompatible("The terms of this composite need different label formats (class indices for some, "
                            "one-hot targets for others). Expected terms that agree.", "composite")
    return formats.pop() if formats else SPARSE


def from_logits(plan: Optional[Plan]) -> bool:
    """Whether the model should output logits: its loss says ``from_logits``.

    Expression losses read probabilities (the softmax output). The terms of a
    composite must agree, since the model has one output.
    """
    if plan is None:
        return False
    flags = {term.entry.source != "expression" and bool(term.params.get("from_logits")) for term in plan.terms}
    if len(flags) > 1:
        raise _incompatible("The terms of this composite disagree on `from_logits`, and the model has one "
                            "output. Expected every term to take logits, or every term probabilities.",
                            "composite")
    return flags.pop()


@functools.lru_cache(maxsize=1)
def job_planner() -> Planner:
    """The planner a job's process (or a model being loaded) plans a stored
    spec with: the server's registry as a fresh process builds it (Keras,
    lossd's built-ins, plugins) and inline expressions. Registered expression
    losses need no store: a stored spec carries their text."""
    from lossd_server.losses import custom

    return Planner(custom.full_registry(plugins=True), custom.inline_entry)


def plan_stored(spec: Optional[Mapping[str, Any]]) -> Optional[Plan]:
    """Plans a job's stored loss spec again, in the job's process: the
    ``plan.to_spec()`` stored at creation or, for jobs stored by older
    servers, the equivalent plain spec they stored (``{"name", "params"}``,
    ``{"expression", "params", "label"}`` or ``{"terms": [...]}``). None for
    an empty spec (a generator's default loss)."""
    return job_planner().plan(spec, TRAINING_INPUTS) if spec else None


@keras.saving.register_keras_serializable(package="lossd")
class PlanLoss(keras.losses.Loss):
    """A plan as a Keras loss, for ``model.compile(loss=...)``.

    It calls the program ``build_program`` makes (the one evaluation runs)
    on ``{"y_true", "y_pred"}``: each term reduces with its own reduction, or
    with this loss's ``reduction`` where it sets none (``none`` gives the
    per-sample values, as the VAE's reconstruction term needs). A saved model
    keeps the plan's self-contained spec, so it loads with ``compile=True``
    wherever lossd's server package is installed.

    Args:
        plan: The validated loss.
        reduction: The reduction of terms that set none.
        name: Defaults to the plan's metric name.
        dtype: The dtype the loss computes in.
    """

    def __init__(self, plan: Plan, reduction: str = DEFAULT_REDUCTION, name: Optional[str] = None,
                 dtype: Optional[str] = "float32"):
        super().__init__(name=name or plan.metric_name, reduction=reduction, dtype=dtype)
        self.plan = plan
        self._program = build_program(plan, reduction, self.dtype)
        self.state: dict[str, Any] = {}  # output name -> non-trainable keras.Variable (build_state)
        self.updating = None  # a bool variable: whether a call updates the state (training, not validation)

    def build_state(self, y_pred_shape) -> dict:
        """Makes the loss keep its plan's outputs (``Plan.outputs``, such as
        ``matrix_crossentropy``'s matrix) as non-trainable variables, fed
        back as the optional inputs of the same names and updated by every
        call while ``updating`` is true; they start from the program's
        ``initial_outputs``. Returns the variables by name (none for a
        stateless loss). Without it the loss is stateless: each call starts
        from the initial state."""
        if self.plan.outputs and not self.state:
            for name, value in self._program.initial_outputs(y_pred_shape).items():
                self.state[name] = keras.Variable(value, trainable=False, dtype=self.dtype, name=f"loss_{name}")
            self.updating = keras.Variable(True, trainable=False, dtype="bool", name="loss_state_updating")
        return self.state

    def __call__(self, y_true, y_pred, sample_weight=None):
        tensors = {"y_true": y_true, "y_pred": y_pred}
        for term in self.plan.terms:
            for own, given in zip(term.entry.inputs, term.inputs):
                if own in term.entry.optional_inputs and own in self.state:
                    tensors[given] = self.state[own]
        total, _, outputs = self._program(tensors, sample_weight)
        for name, variable in self.state.items():
            variable.assign(keras.ops.where(self.updating, outputs[name], variable))
        return total

    def get_config(self):
        return {**super().get_config(), "dtype": self.dtype, "spec": self.plan.to_spec()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(plan_stored(config.pop("spec")), **config)


def reconstruction_loss(plan: Optional[Plan]) -> PlanLoss:
    """The VAE's reconstruction loss: the job's plan, or where it has none
    the preset's default (``DEFAULT_VAE_LOSS``, planned as a stored spec is),
    unreduced: the VAE sums each image's per-pixel values itself."""
    return PlanLoss(plan if plan is not None else plan_stored({"name": DEFAULT_VAE_LOSS}), reduction=REDUCTION_NONE)
