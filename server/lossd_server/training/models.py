"""Model presets a job can train: ``cnn``, ``mlp`` (classifiers), ``vae`` and
``diffusion`` (generators).

Each preset has a table of parameters (type, default, range, doc) that is
checked at job-creation time, in the server, so a bad parameter is an
INVALID_ARGUMENT at once rather than a failed job minutes later. Building a
model needs Keras; checking parameters does not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

from lossd_server.errors import InvalidArgument
from lossd_server.losses.registry import as_int
from lossd_server.training.kinds import CLASSIFIER, GENERATOR


@dataclasses.dataclass(frozen=True)
class ModelParam:
    """A preset parameter.

    Attributes:
        name: The parameter's name in ``ModelSpec.params``.
        type: ``int``, ``float``, ``bool``, ``int_list`` or ``choice``.
        default: Used when the client leaves the parameter out.
        doc: One line for people.
        minimum: Smallest allowed value (each element, for ``int_list``).
        maximum: Largest allowed value (each element, for ``int_list``).
        choices: The allowed strings, for ``choice``.
        max_items: Most elements of an ``int_list``.
    """

    name: str
    type: str
    default: Any
    doc: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: tuple[str, ...] = ()
    max_items: int = 8


@dataclasses.dataclass(frozen=True)
class TrainingDefaults:
    """What a job of a preset trains with where its spec says nothing: chosen so
    that the default job on the built-in digits gives a usable model, as
    measured by ``bench/quality.py`` (bench/RESULTS.md, "Training quality" and
    "Loss-guided generation")."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: Optional[float] = None
    """Adam's learning rate when the spec names none (and keeps Adam); None: Keras's own (1e-3)."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model preset: its kind (``classifier`` or ``generator``), parameters,
    and the training defaults of its jobs."""

    name: str
    kind: str
    doc: str
    params: tuple[ModelParam, ...]
    defaults: TrainingDefaults = TrainingDefaults()


DIFFUSION_DEFAULT_TIMESTEPS = 100
DIFFUSION_MIN_TIMESTEPS = 50     # below this the scaled schedule's last beta would pass 0.4
DIFFUSION_MAX_TIMESTEPS = 1000

_ACTIVATIONS = ("relu", "gelu", "elu", "selu", "silu", "tanh", "sigmoid")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cnn", CLASSIFIER, "A convolutional classifier: conv blocks, then dense layers.", (
        ModelParam("filters", "int_list", [32, 64], "Filters of each conv block (each block halves the image).",
                   1, 1024),
        ModelParam("kernel_size", "int", 3, "Size of the square conv kernels.", 1, 11),
        ModelParam("dense_units", "int", 128, "Units of the dense layer before the output; 0 for none.", 0, 8192),
        ModelParam("dropout", "float", 0.25, "Dropout rate before the output layer.", 0.0, 0.95),
        ModelParam("batch_norm", "bool", False, "Batch normalization after each conv."),
    )),
    Preset("mlp", CLASSIFIER, "A dense classifier over the flattened image.", (
        ModelParam("hidden_units", "int_list", [256, 128], "Units of each hidden layer.", 1, 8192),
        ModelParam("activation", "choice", "relu", "Activation of the hidden layers.", choices=_ACTIVATIONS),
        ModelParam("dropout", "float", 0.2, "Dropout rate after each hidden layer.", 0.0, 0.95),
    )),
    Preset("vae", GENERATOR,
           "A convolutional variational autoencoder (the classic Keras example) that generates images.", (
               ModelParam("latent_dim", "int", 2, "Size of the latent space.", 1, 512),
               ModelParam("filters", "int_list", [32, 64],
                          "Filters of each strided conv of the encoder (mirrored in the decoder).", 1, 1024,
                          max_items=4),
               ModelParam("dense_units", "int", 16, "Units of the encoder's dense layer.", 1, 8192),
               ModelParam("beta", "float", 1.0, "Weight of the KL term: loss = reconstruction + beta * KL.",
                          0.0, 1e6),
           ), TrainingDefaults(epochs=60)),
    Preset("diffusion", GENERATOR,
           "A class-conditioned DDPM denoiser (a small U-Net) that generates images of a chosen class.", (
               ModelParam("filters", "int_list", [32, 64],
                          "Filters of each U-Net level (each level after the first halves the image).", 1, 512,
                          max_items=3),
               ModelParam("embed_dim", "int", 64, "Size of the timestep and class embeddings.", 1, 1024),
               ModelParam("timesteps", "int", DIFFUSION_DEFAULT_TIMESTEPS,
                          "T, the noising steps of the linear beta schedule (also the most sampling steps).",
                          DIFFUSION_MIN_TIMESTEPS, DIFFUSION_MAX_TIMESTEPS),
           # 10 epochs of the general default drew digits a classifier recognised 22 % of the
           # time; these give 89 % (bench/RESULTS.md, "Loss-guided generation").
           ), TrainingDefaults(epochs=100, batch_size=64, learning_rate=2e-3)),
)}


def _bad(preset: str, param: ModelParam, expected: str, value: Any) -> InvalidArgument:
    return InvalidArgument(
        f"Invalid value for parameter `{param.name}` of model `{preset}`. Expected {expected}. "
        f"Received: {param.name}={value!r}.", reason="BAD_MODEL_PARAMETER",
        metadata={"model": preset, "parameter": param.name})


def _in_range(param: ModelParam, value: float) -> bool:
    return ((param.minimum is None or value >= param.minimum)
            and (param.maximum is None or value <= param.maximum))


def _range_text(param: ModelParam) -> str:
    lo = "" if param.minimum is None else f"{param.minimum:g}"
    hi = "" if param.maximum is None else f"{param.maximum:g}"
    return f" in [{lo}, {hi}]" if lo or hi else ""


def _coerce(preset: str, param: ModelParam, value: Any) -> Any:
    if param.type == "bool":
        if not isinstance(value, bool):
            raise _bad(preset, param, "true or false", value)
        return value
    if param.type == "choice":
        if value not in param.choices:
            raise _bad(preset, param, f"one of {list(param.choices)}", value)
        return value
    if param.type == "int":
        integer = as_int(value)
        if integer is None or not _in_range(param, integer):
            raise _bad(preset, param, f"an integer{_range_text(param)}", value)
        return integer
    if param.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not _in_range(param, value):
            raise _bad(preset, param, f"a number{_range_text(param)}", value)
        return float(value)
    if param.type == "int_list":
        items = [as_int(v) for v in value] if isinstance(value, (list, tuple)) else [None]
        if not 1 <= len(items) <= param.max_items or any(v is None or not _in_range(param, v) for v in items):
            raise _bad(preset, param, f"a list of 1 to {param.max_items} integers{_range_text(param)}", value)
        return items
    raise AssertionError(param.type)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; raises InvalidArgument (UNKNOWN_MODEL) otherwise."""
    preset = PRESETS.get(name)
    if preset is None:
        raise InvalidArgument(
            f"Unknown model preset {name!r}. Expected one of {sorted(PRESETS)}.",
            reason="UNKNOWN_MODEL", metadata={"model": str(name)[:80]})
    return preset


def resolve_model_params(name: str, params: Optional[Mapping[str, Any]],
                         image_shape: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Checks a preset's parameters; returns all of them with defaults filled in.

    Args:
        name: The preset's name.
        params: The client's parameters (numbers may be floats, as from a Struct).
        image_shape: ``(height, width, channels)`` of the dataset, to check the
            parameters against the images (the ``vae`` halves the image once
            per filter).

    Raises:
        InvalidArgument: unknown preset (UNKNOWN_MODEL), unknown parameter or
            bad value (BAD_MODEL_PARAMETER), or a model that cannot fit the
            images (INCOMPATIBLE_DATASET).
    """
    preset = get_preset(name)
    params = dict(params or {})
    known = {p.name: p for p in preset.params}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InvalidArgument(
            f"Unknown parameter `{unknown[0]}` for model `{name}`. Expected some of {sorted(known)}. "
            f"Received: {', '.join(unknown)}.", reason="BAD_MODEL_PARAMETER",
            metadata={"model": name, "parameter": unknown[0]})
    resolved = {p.name: _coerce(name, p, params[p.name]) if p.name in params else p.default
                for p in preset.params}
    if name == "vae" and image_shape is not None:
        factor = 2 ** len(resolved["filters"])
        h, w = image_shape[0], image_shape[1]
        if h % factor or w % factor:
            raise InvalidArgument(
                f"Model `vae` with {len(resolved['filters'])} strided convs needs image sides divisible by "
                f"{factor}. Received: images of {h}x{w}.", reason="INCOMPATIBLE_DATASET",
                metadata={"model": name})
    if name == "diffusion" and image_shape is not None:
        factor = 2 ** (len(resolved["filters"]) - 1)
        h, w = image_shape[0], image_shape[1]
        if h % factor or w % factor:
            raise InvalidArgument(
                f"Model `diffusion` with {len(resolved['filters'])} U-Net levels needs image sides divisible by "
                f"{factor}. Expected fewer filters or other images. Received: images of {h}x{w}.",
                reason="INCOMPATIBLE_DATASET", metadata={"model": name})
    return resolved


def count_parameters(name: str, params: Mapping[str, Any], image_shape: Sequence[int], num_classes: int) -> int:
    """The parameters ``build_model`` would make (as ``model.count_params()``),
    by arithmetic: nothing is built, and no Keras is needed.

    Args:
        name: The preset's name.
        params: Resolved parameters (``resolve_model_params``).
        image_shape: ``(height, width, channels)``.
        num_classes: Classes of the classifier (ignored by generators).
    """
    h, w, c = (int(d) for d in image_shape)
    total = 0
    if name == "cnn":
        k = params["kernel_size"]
        for filters in params["filters"]:
            total += k * k * c * filters + filters
            if params["batch_norm"]:
                total += 4 * filters  # gamma, beta, moving mean and variance
            c = filters
            if h >= 2 and w >= 2:
                h, w = h // 2, w // 2
        features = h * w * c
        if params["dense_units"]:
            total += features * params["dense_units"] + params["dense_units"]
            features = params["dense_units"]
        return total + features * num_classes + num_classes
    if name == "mlp":
        features = h * w * c
        for units in params["hidden_units"]:
            total += features * units + units
            features = units
        return total + features * num_classes + num_classes
    if name == "vae":
        filters, latent, dense = list(params["filters"]), params["latent_dim"], params["dense_units"]
        factor = 2 ** len(filters)
        channels = c
        for f in filters:  # encoder: 3x3 stride-2 convs
            total += 9 * channels * f + f
            channels = f
        flat = (h // factor) * (w // factor) * filters[-1]
        total += flat * dense + dense + 2 * (dense * latent + latent)
        total += latent * flat + flat  # decoder
        channels = filters[-1]
        for f in reversed(filters):
            total += 9 * channels * f + f
            channels = f
        return total + 9 * channels * c + c
    if name == "diffusion":
        filters, e = list(params["filters"]), params["embed_dim"]
        total = 2 * (e * e + e) + num_classes * e  # time MLP, class embedding
        total += 9 * c * filters[0] + filters[0]  # stem

        def block(c_in: int, f: int) -> int:
            return (9 * c_in * f + f) + (e * f + f) + (9 * f * f + f) + (c_in * f + f if c_in != f else 0)

        channels = filters[0]
        for f in filters:
            total += block(channels, f)
            channels = f
        for i in reversed(range(len(filters) - 1)):
            total += block(channels + filters[i], filters[i])
            channels = filters[i]
        return total + 9 * channels * c + c
    raise AssertionError(name)


def count_work(name: str, params: Mapping[str, Any], image_shape: Sequence[int], num_classes: int
               ) -> tuple[int, int]:
    """``(multiply-adds, values)`` of one example's forward pass through the
    model ``build_model`` would make, by arithmetic as ``count_parameters``:
    the multiply-adds of its convolutions (kernel x output positions; a
    transposed convolution, kernel x input positions) and dense layers
    (kernel), and the values those layers output. ``training/cost.py``
    turns them into a job's cost."""
    h, w, c = (int(d) for d in image_shape)
    macs = values = 0

    def layer(kernel: int, positions: int, outputs: int) -> None:
        nonlocal macs, values
        macs += kernel * positions
        values += outputs

    if name == "cnn":
        k = params["kernel_size"]
        for filters in params["filters"]:
            layer(k * k * c * filters, h * w, h * w * filters)
            c = filters
            if h >= 2 and w >= 2:
                h, w = h // 2, w // 2
        features = h * w * c
        if params["dense_units"]:
            layer(features * params["dense_units"], 1, params["dense_units"])
            features = params["dense_units"]
        layer(features * num_classes, 1, num_classes)
        return macs, values
    if name == "mlp":
        features = h * w * c
        for units in params["hidden_units"]:
            layer(features * units, 1, units)
            features = units
        layer(features * num_classes, 1, num_classes)
        return macs, values
    if name == "vae":
        filters, latent, dense = list(params["filters"]), params["latent_dim"], params["dense_units"]
        factor = 2 ** len(filters)
        rows, cols, channels = h, w, c
        for f in filters:  # 3x3 stride-2 "same" convs: ceil(n / 2) positions each way
            rows, cols = -(-rows // 2), -(-cols // 2)
            layer(9 * channels * f, rows * cols, rows * cols * f)
            channels = f
        layer(rows * cols * channels * dense, 1, dense)
        layer(2 * dense * latent, 1, 2 * latent)
        rows, cols, channels = h // factor, w // factor, filters[-1]
        layer(latent * rows * cols * channels, 1, rows * cols * channels)
        for f in reversed(filters):  # 3x3 stride-2 transposed convs
            layer(9 * channels * f, rows * cols, 4 * rows * cols * f)
            rows, cols, channels = 2 * rows, 2 * cols, f
        layer(9 * channels * c, rows * cols, rows * cols * c)
        return macs, values
    if name == "diffusion":
        filters, e = list(params["filters"]), params["embed_dim"]
        layer(2 * e * e, 1, 2 * e)  # time MLP (the class embedding is a lookup)
        layer(9 * c * filters[0], h * w, h * w * filters[0])  # stem

        def block(c_in: int, f: int, positions: int) -> None:
            layer(9 * c_in * f, positions, positions * f)
            layer(e * f, 1, f)
            layer(9 * f * f, positions, positions * f)
            if c_in != f:
                layer(c_in * f, positions, positions * f)

        rows, cols, channels = h, w, filters[0]
        sizes = []
        for i, f in enumerate(filters):
            block(channels, f, rows * cols)
            channels = f
            if i < len(filters) - 1:
                sizes.append((rows, cols))
                rows, cols = rows // 2, cols // 2
        for i in reversed(range(len(filters) - 1)):
            rows, cols = sizes[i]
            block(channels + filters[i], filters[i], rows * cols)
            channels = filters[i]
        layer(9 * channels * c, h * w, h * w * c)
        return macs, values
    raise AssertionError(name)


# ---------------------------------------------------------------------------
# Building models (needs Keras).

def build_model(name: str, params: Mapping[str, Any], image_shape: Sequence[int], num_classes: int, *,
                logits: bool = False, seed: Optional[int] = None):
    """Builds the Keras model of a preset from resolved parameters.

    Args:
        name: The preset's name.
        params: Resolved parameters (``resolve_model_params``).
        image_shape: ``(height, width, channels)``.
        num_classes: Classes of the classifier (ignored by generators).
        logits: Whether a classifier outputs logits instead of probabilities
            (when its loss takes ``from_logits=True``).
        seed: Seed of the VAE's sampling layer and of the diffusion model's noise.

    Returns:
        An uncompiled ``keras.Model``. The output layer is float32 even under
        mixed precision, so the loss sees float32 values.
    """
    import keras

    shape = tuple(int(d) for d in image_shape)
    if name == "vae":
        return VAE(image_shape=list(shape), latent_dim=params["latent_dim"], filters=list(params["filters"]),
                   dense_units=params["dense_units"], beta=params["beta"], seed=seed)
    if name == "diffusion":
        return Diffusion(image_shape=list(shape), num_classes=num_classes, filters=list(params["filters"]),
                         embed_dim=params["embed_dim"], timesteps=params["timesteps"], seed=seed)
    inputs = keras.Input(shape=shape, name="images")
    x = inputs
    if name == "cnn":
        for i, filters in enumerate(params["filters"]):
            x = keras.layers.Conv2D(filters, params["kernel_size"], padding="same",
                                    activation=None if params["batch_norm"] else "relu", name=f"conv{i}")(x)
            if params["batch_norm"]:
                x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
                x = keras.layers.Activation("relu", name=f"relu{i}")(x)
            # Stop pooling at 1x1 so a deep stack still fits a small image.
            if x.shape[1] >= 2 and x.shape[2] >= 2:
                x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        if params["dense_units"]:
            x = keras.layers.Dense(params["dense_units"], activation="relu", name="dense")(x)
        if params["dropout"]:
            x = keras.layers.Dropout(params["dropout"], name="dropout")(x)
    elif name == "mlp":
        x = keras.layers.Flatten(name="flatten")(x)
        for i, units in enumerate(params["hidden_units"]):
            x = keras.layers.Dense(units, activation=params["activation"], name=f"dense{i}")(x)
            if params["dropout"]:
                x = keras.layers.Dropout(params["dropout"], name=f"dropout{i}")(x)
    else:
        raise AssertionError(name)
    outputs = keras.layers.Dense(num_classes, activation=None if logits else "softmax", dtype="float32",
                                 name="logits" if logits else "probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def _register_vae():
    """Defines the VAE class on first use, so importing this module needs no Keras."""
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="lossd")
    class VAE(keras.Model):
        """The classic Keras convolutional VAE: encoder -> (z_mean, z_log_var)
        -> sampled z -> decoder.

        Its loss is ``reconstruction + beta * KL`` with each term's reduction
        explicit: the reconstruction loss is computed per pixel (reduction
        ``none``), summed over each image and averaged over the batch; the KL
        divergence of ``N(z_mean, exp(z_log_var))`` from ``N(0, 1)`` is summed
        over the latent dimensions and averaged over the batch. The
        reconstruction loss is any registered loss comparing pixels
        (``binary_crossentropy`` by default), given to ``compile``.

        Args:
            image_shape: ``[height, width, channels]``; sides divisible by
                ``2 ** len(filters)``.
            latent_dim: Size of the latent space.
            filters: Filters of each stride-2 conv of the encoder.
            dense_units: Units of the encoder's dense layer.
            beta: Weight of the KL term.
            seed: Seed of the latent sampling.
        """

        def __init__(self, image_shape, latent_dim=2, filters=(32, 64), dense_units=16, beta=1.0, seed=None,
                     **kwargs):
            super().__init__(**kwargs)
            self.image_shape = [int(d) for d in image_shape]
            self.latent_dim = int(latent_dim)
            self.filters = [int(f) for f in filters]
            self.dense_units = int(dense_units)
            self.beta = float(beta)
            self.seed = seed
            h, w, c = self.image_shape
            factor = 2 ** len(self.filters)

            enc_in = keras.Input(shape=(h, w, c), name="images")
            x = enc_in
            for i, f in enumerate(self.filters):
                x = keras.layers.Conv2D(f, 3, strides=2, padding="same", activation="relu", name=f"conv{i}")(x)
            x = keras.layers.Flatten()(x)
            x = keras.layers.Dense(self.dense_units, activation="relu", name="dense")(x)
            z_mean = keras.layers.Dense(self.latent_dim, name="z_mean", dtype="float32")(x)
            z_log_var = keras.layers.Dense(self.latent_dim, name="z_log_var", dtype="float32")(x)
            self.encoder = keras.Model(enc_in, [z_mean, z_log_var], name="encoder")

            dec_in = keras.Input(shape=(self.latent_dim,), name="z")
            x = keras.layers.Dense((h // factor) * (w // factor) * self.filters[-1], activation="relu")(dec_in)
            x = keras.layers.Reshape((h // factor, w // factor, self.filters[-1]))(x)
            for i, f in enumerate(reversed(self.filters)):
                x = keras.layers.Conv2DTranspose(f, 3, strides=2, padding="same", activation="relu",
                                                 name=f"deconv{i}")(x)
            dec_out = keras.layers.Conv2DTranspose(c, 3, padding="same", activation="sigmoid", dtype="float32",
                                                   name="pixels")(x)
            self.decoder = keras.Model(dec_in, dec_out, name="decoder")

            self.seed_generator = keras.random.SeedGenerator(seed)
            self.reconstruction_loss_fn = None
            self.total_loss_tracker = keras.metrics.Mean(name="loss")
            self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
            self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
            # Encoder and decoder are functional models, built above.
            self.built = True

        @property
        def metrics(self):
            return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

        def compile(self, optimizer="adam", reconstruction_loss=None, **kwargs):
            """Compiles with ``reconstruction_loss``: a Keras loss with reduction
            ``none``; None takes the preset's default, binary crossentropy
            planned as any job's loss is (``losses.reconstruction_loss``)."""
            super().compile(optimizer=optimizer, **kwargs)
            if reconstruction_loss is None:
                from lossd_server.training.losses import reconstruction_loss as default  # imports Keras

                reconstruction_loss = default(None)
            self.reconstruction_loss_fn = reconstruction_loss

        def sample(self, z_mean, z_log_var):
            eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
            return z_mean + ops.exp(0.5 * z_log_var) * eps

        def call(self, images, training=False):
            z_mean, z_log_var = self.encoder(images, training=training)
            return self.decoder(self.sample(z_mean, z_log_var), training=training)

        def compute_losses(self, images, training=False):
            """Returns ``(total, reconstruction, kl)``, each a scalar."""
            images = ops.cast(images, "float32")
            z_mean, z_log_var = self.encoder(images, training=training)
            reconstruction = self.decoder(self.sample(z_mean, z_log_var), training=training)
            per_pixel = self.reconstruction_loss_fn(images, reconstruction)  # unreduced
            batch = ops.shape(images)[0]
            # Reconstruction: sum over each image's pixels, mean over the batch.
            rec = ops.mean(ops.sum(ops.reshape(ops.cast(per_pixel, "float32"), (batch, -1)), axis=1))
            # KL(N(mu, sigma^2) || N(0, 1)): sum over latent dimensions, mean over the batch.
            kl = -0.5 * (1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
            kl = ops.mean(ops.sum(kl, axis=1))
            return rec + self.beta * kl, rec, kl

        def _update(self, total, rec, kl):
            self.total_loss_tracker.update_state(total)
            self.reconstruction_loss_tracker.update_state(rec)
            self.kl_loss_tracker.update_state(kl)
            return {m.name: m.result() for m in self.metrics}

        def train_step(self, data):
            # Taking gradients is backend-specific; the training loop owns the
            # TensorFlow side of training (a GradientTape, as in the Keras example).
            from lossd_server.training import loop

            images = data[0] if isinstance(data, (tuple, list)) else data
            return self._update(*loop.gradient_step(self, lambda: self.compute_losses(images, training=True)))

        def test_step(self, data):
            images = data[0] if isinstance(data, (tuple, list)) else data
            return self._update(*self.compute_losses(images, training=False))

        def generate(self, n: int, seed: Optional[int] = None):
            """Decodes ``n`` latent samples from N(0, 1); returns N x H x W x C in [0, 1]."""
            z = keras.random.normal((n, self.latent_dim), seed=seed)
            return self.decoder(z, training=False)

        def get_config(self):
            return {"image_shape": self.image_shape, "latent_dim": self.latent_dim, "filters": self.filters,
                    "dense_units": self.dense_units, "beta": self.beta, "seed": self.seed,
                    "name": self.name}

    return VAE


_CLASSES: dict[str, type] = {}  # the model classes defined so far, by their register function


def _defined(register) -> type:
    """The class ``register`` defines: defined (and registered with Keras) on
    first call, so this module imports without Keras."""
    cls = _CLASSES.get(register.__name__)
    if cls is None:
        cls = _CLASSES[register.__name__] = register()
    return cls


def VAE(*args, **kwargs):  # noqa: N802 - a factory standing in for the lazily defined class
    """Builds a ``VAE`` (see ``_register_vae``)."""
    return vae_class()(*args, **kwargs)


def vae_class() -> type:
    """The registered VAE class."""
    return _defined(_register_vae)


def diffusion_schedule(timesteps: int):
    """The ``diffusion`` preset's noise schedule: ``(betas, alpha_bars)``,
    float64 arrays of ``timesteps`` values.

    Linear betas as in DDPM (Ho et al. 2020, from 1e-4 to 0.02 over 1000
    steps), both ends scaled by ``1000 / timesteps`` so a short chain noises
    as far as DDPM's long one (the scaling of Nichol and Dhariwal 2021).
    ``alpha_bars[t]`` is the product of ``1 - beta`` up to step ``t``: the
    signal kept in ``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) noise``.
    """
    import numpy as np

    scale = 1000.0 / timesteps
    betas = np.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


def _register_diffusion():
    """Defines the Diffusion class on first use, so importing this module needs no Keras."""
    import keras
    import numpy as np
    from keras import ops

    @keras.saving.register_keras_serializable(package="lossd")
    class Diffusion(keras.Model):
        """A class-conditioned DDPM denoiser: a small U-Net predicts the noise
        in ``x_t`` given the step ``t`` and the class.

        Images are scaled from [0, 1] to [-1, 1]. Each U-Net block adds a
        projection of ``silu(time embedding + class embedding)`` to its
        feature maps (the time embedding is sinusoidal, then two dense
        layers). Training draws ``t`` uniformly from ``[0, timesteps)`` and
        noise from N(0, 1); the loss compares the noise with the prediction:
        any registered loss given to ``compile`` (``mse`` by default, the
        DDPM "simple" loss). Sampling is DDIM (Song et al. 2021, eta = 0)
        over ``steps`` evenly spaced steps of the schedule
        (``diffusion_schedule``).

        Args:
            image_shape: ``[height, width, channels]``; sides divisible by
                ``2 ** (len(filters) - 1)``.
            num_classes: Classes the model is conditioned on.
            filters: Filters of each U-Net level.
            embed_dim: Size of the time and class embeddings.
            timesteps: T, the steps of the noise schedule.
            seed: Seed of the training noise and steps.
        """

        def __init__(self, image_shape, num_classes, filters=(32, 64), embed_dim=64, timesteps=100, seed=None,
                     **kwargs):
            super().__init__(**kwargs)
            self.image_shape = [int(d) for d in image_shape]
            self.num_classes = int(num_classes)
            self.filters = [int(f) for f in filters]
            self.embed_dim = int(embed_dim)
            self.timesteps = int(timesteps)
            self.seed = seed
            _, self.alpha_bars = diffusion_schedule(self.timesteps)
            h, w, c = self.image_shape
            e = self.embed_dim

            x_in = keras.Input(shape=(h, w, c), name="noisy_images")
            t_in = keras.Input(shape=(e,), name="time_features")
            y_in = keras.Input(shape=(), dtype="int32", name="classes")
            temb = keras.layers.Dense(e, activation="silu", name="time_dense0")(t_in)
            temb = keras.layers.Dense(e, name="time_dense1")(temb)
            cemb = keras.layers.Embedding(self.num_classes, e, name="class_embedding")(y_in)
            cond = keras.layers.Activation("silu")(keras.layers.Add()([temb, cemb]))

            def block(x, f: int, name: str):
                a = keras.layers.Conv2D(f, 3, padding="same", name=f"{name}_conv0")(x)
                shift = keras.layers.Reshape((1, 1, f))(keras.layers.Dense(f, name=f"{name}_cond")(cond))
                a = keras.layers.Activation("silu")(a + shift)
                a = keras.layers.Conv2D(f, 3, padding="same", activation="silu", name=f"{name}_conv1")(a)
                if x.shape[-1] != f:
                    x = keras.layers.Conv2D(f, 1, name=f"{name}_skip")(x)
                return keras.layers.Add()([a, x])

            x = keras.layers.Conv2D(self.filters[0], 3, padding="same", name="stem")(x_in)
            skips = []
            for i, f in enumerate(self.filters):
                x = block(x, f, f"down{i}")
                if i < len(self.filters) - 1:
                    skips.append(x)
                    x = keras.layers.AveragePooling2D(2)(x)
            for i in reversed(range(len(self.filters) - 1)):
                x = keras.layers.UpSampling2D(2)(x)
                x = keras.layers.Concatenate()([x, skips[i]])
                x = block(x, self.filters[i], f"up{i}")
            out = keras.layers.Conv2D(c, 3, padding="same", dtype="float32", name="noise")(x)
            self.denoiser = keras.Model([x_in, t_in, y_in], out, name="denoiser")

            self.seed_generator = keras.random.SeedGenerator(seed)
            self.noise_loss_fn = None
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.built = True

        @property
        def metrics(self):
            return [self.loss_tracker]

        def compile(self, optimizer="adam", noise_loss=None, **kwargs):
            """Compiles with ``noise_loss``: a Keras loss of ``(noise, predicted
            noise)`` reducing to a scalar (mean squared error when None)."""
            super().compile(optimizer=optimizer, **kwargs)
            self.noise_loss_fn = noise_loss or keras.losses.MeanSquaredError()

        def time_features(self, t):
            """Sinusoidal features (N x embed_dim) of the steps ``t`` (N integers)."""
            half = self.embed_dim // 2
            freqs = np.exp(-np.log(10000.0) * np.arange(half) / max(half, 1)).astype("float32")
            angles = ops.cast(ops.reshape(t, (-1, 1)), "float32") * freqs[None, :]
            parts = [ops.sin(angles), ops.cos(angles)]
            if self.embed_dim % 2:
                parts.append(ops.zeros_like(angles[:, :1]))
            return ops.concatenate(parts, axis=1)

        def denoise(self, x_t, t, classes, training=False):
            """The predicted noise in ``x_t`` at steps ``t`` for ``classes``."""
            return self.denoiser([ops.convert_to_tensor(x_t, "float32"), self.time_features(t),
                                  ops.cast(classes, "int32")], training=training)

        def call(self, inputs, training=False):
            # ``(x_t, t, classes)``; a bare image batch is denoised at t = 0 as
            # class 0 (Keras builds a subclassed model by calling it once).
            if isinstance(inputs, (tuple, list)):
                x_t, t, classes = inputs
            else:
                x_t = inputs
                t = classes = ops.zeros((ops.shape(inputs)[0],), "int32")
            return self.denoise(x_t, t, classes, training=training)

        def compute_losses(self, images, classes, training=False):
            """The noise-prediction loss of a batch at random steps (a scalar)."""
            x0 = ops.cast(images, "float32") * 2.0 - 1.0
            n = ops.shape(x0)[0]
            t = keras.random.randint((n,), 0, self.timesteps, seed=self.seed_generator)
            noise = keras.random.normal(ops.shape(x0), seed=self.seed_generator)
            ab = ops.reshape(ops.take(ops.convert_to_tensor(self.alpha_bars.astype("float32")), t), (-1, 1, 1, 1))
            x_t = ops.sqrt(ab) * x0 + ops.sqrt(1.0 - ab) * noise
            return self.noise_loss_fn(noise, ops.cast(self.denoise(x_t, t, classes, training=training), "float32"))

        def _update(self, loss):
            self.loss_tracker.update_state(loss)
            return {"loss": self.loss_tracker.result()}

        def train_step(self, data):
            from lossd_server.training import loop

            images, classes = data[0], data[1]
            return self._update(loop.gradient_step(self, lambda: self.compute_losses(images, classes, True))[0])

        def test_step(self, data):
            return self._update(self.compute_losses(data[0], data[1], training=False))

        def sample_steps(self, classes, steps: int, seed: Optional[int] = None, guide=None,
                         guidance_scale: float = 1.0):
            """Generates one image per class index in ``classes`` by DDIM, step by step.

            A generator, so a caller can report progress between steps and
            stop sampling by no longer iterating (a cancelled call).

            Args:
                classes: N class indices.
                steps: Sampling steps, 1 to ``timesteps``: the schedule's
                    steps ``linspace(T - 1, 0, steps)`` (rounded).
                seed: Seed of the starting noise; None for a random one.
                guide: Optional ``guide(images) -> gradient``: the gradient
                    of a loss with respect to the clean-image estimate
                    (N x H x W x C in [0, 1]). At each step the estimate moves
                    by ``-guidance_scale * gradient`` before the next noisy
                    image is formed from it.
                guidance_scale: The step along the guide's gradient.

            Yields:
                ``(step, steps, images)`` after each step, ``step`` from 1;
                ``images`` (float32 N x H x W x C in [0, 1]) is None but on
                the last step.
            """
            classes = np.asarray(classes, dtype="int32")
            n = len(classes)
            x = np.random.default_rng(seed).standard_normal((n, *self.image_shape)).astype("float32")
            ts = np.unique(np.round(np.linspace(self.timesteps - 1, 0, int(steps))).astype(int))[::-1]
            x0 = x
            for i, t in enumerate(ts):
                ab = float(self.alpha_bars[t])
                ab_prev = float(self.alpha_bars[ts[i + 1]]) if i + 1 < len(ts) else 1.0
                # predict_on_batch runs a compiled function: about 8x faster than an eager call here.
                features = np.asarray(self.time_features(np.full((n,), t, "int32")))
                eps = np.asarray(self.denoiser.predict_on_batch([x, features, classes]), dtype="float32")
                x0 = np.clip((x - np.sqrt(1.0 - ab) * eps) / np.sqrt(ab), -1.0, 1.0)
                if guide is not None:
                    images = (x0 + 1.0) / 2.0
                    images = images - guidance_scale * np.asarray(guide(images), dtype="float32")
                    x0 = np.clip(images * 2.0 - 1.0, -1.0, 1.0)
                # The noise the (clipped, guided) estimate implies, so a
                # guidance gradient of 0 gives the unguided sample.
                eps = (x - np.sqrt(ab) * x0) / np.sqrt(1.0 - ab)
                x = (np.sqrt(ab_prev) * x0 + np.sqrt(1.0 - ab_prev) * eps).astype("float32")
                last = i + 1 == len(ts)
                yield i + 1, len(ts), np.clip((x0 + 1.0) / 2.0, 0.0, 1.0).astype("float32") if last else None

        def get_config(self):
            return {"image_shape": self.image_shape, "num_classes": self.num_classes, "filters": self.filters,
                    "embed_dim": self.embed_dim, "timesteps": self.timesteps, "seed": self.seed, "name": self.name}

    return Diffusion


def Diffusion(*args, **kwargs):  # noqa: N802 - a factory standing in for the lazily defined class
    """Builds a ``Diffusion`` model (see ``_register_diffusion``)."""
    return diffusion_class()(*args, **kwargs)


def diffusion_class() -> type:
    """The registered Diffusion class."""
    return _defined(_register_diffusion)


def save_model(model, path) -> None:
    """Saves a trained model as the job's ``model.keras`` artifact: its
    architecture and weights, without its compile configuration.

    The compile configuration names the training loss (``lossd>PlanLoss``),
    which plain Keras cannot resolve: with it, ``keras.models.load_model``
    fails outside lossd. Without it, a classifier (cnn, mlp, ...) loads in
    any Keras 3 as an uncompiled model, to predict with or to compile with a
    loss of the user's own; the VAE and Diffusion presets are classes of
    lossd's and load with ``load_model`` below (``lossd[server]`` installed).
    Checkpoints keep the compiled state: this is only the downloadable file.
    """
    compile_config = model.__dict__.get("_compile_config")
    if compile_config is not None:
        # Keras writes ``get_compile_config()`` when the attribute is there;
        # hidden for the write only, so the model in memory stays compiled.
        del model._compile_config
    try:
        model.save(path)
    finally:
        if compile_config is not None:
            model._compile_config = compile_config


def load_model(path):
    """Loads a trained ``.keras`` model (any preset), without compiling it.

    For the classifier presets ``keras.models.load_model(path)`` does the
    same without lossd (``save_model``); the VAE and Diffusion presets need
    their classes, which this registers first."""
    import keras

    vae_class()  # registers lossd>VAE and lossd>Diffusion for deserialization
    diffusion_class()
    return keras.saving.load_model(path, compile=False)


# ---------------------------------------------------------------------------
# Optimizers and metrics.

OPTIMIZERS = ("adam", "sgd", "rmsprop", "adamw", "adagrad", "adadelta", "adamax", "nadam", "ftrl", "lion")
_OPTIMIZER_CLASSES = {"adam": "Adam", "sgd": "SGD", "rmsprop": "RMSprop", "adamw": "AdamW",
                      "adagrad": "Adagrad", "adadelta": "Adadelta", "adamax": "Adamax", "nadam": "Nadam",
                      "ftrl": "Ftrl", "lion": "Lion"}


def build_optimizer(spec: Mapping[str, Any]):
    """Builds a Keras optimizer from ``{"name", "learning_rate", "params"}``."""
    import keras

    cls = getattr(keras.optimizers, _OPTIMIZER_CLASSES[spec["name"]])
    kwargs = dict(spec.get("params") or {})
    if spec.get("learning_rate") is not None:
        kwargs["learning_rate"] = spec["learning_rate"]
    return cls(**kwargs)


def resolve_optimizer(spec: Optional[Mapping[str, Any]], default_learning_rate: Optional[float] = None) -> dict:
    """Checks an optimizer spec by building it once; returns its canonical form.

    ``default_learning_rate`` (a preset's) is Adam's learning rate when the
    spec keeps Adam, the default optimizer, and names no learning rate.

    Raises:
        InvalidArgument: unknown optimizer (UNKNOWN_OPTIMIZER) or parameters
            Keras refuses (BAD_OPTIMIZER_PARAMETER).
    """
    import inspect

    import keras

    spec = dict(spec or {})
    name = (spec.get("name") or "adam").lower()
    if name not in _OPTIMIZER_CLASSES:
        raise InvalidArgument(f"Unknown optimizer {spec.get('name')!r}. Expected one of {list(OPTIMIZERS)}.",
                              reason="UNKNOWN_OPTIMIZER", metadata={"optimizer": str(spec.get("name"))[:80]})
    lr = spec.get("learning_rate")
    if lr is None and name == "adam":
        lr = default_learning_rate
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        raise InvalidArgument(f"Invalid learning_rate for optimizer `{name}`. Expected a number > 0. "
                              f"Received: {lr!r}.", reason="BAD_OPTIMIZER_PARAMETER")
    params = {k: (as_int(v) if as_int(v) is not None and k in ("ema_overwrite_frequency",) else v)
              for k, v in dict(spec.get("params") or {}).items()}
    cls = getattr(keras.optimizers, _OPTIMIZER_CLASSES[name])
    accepted = [p for p in inspect.signature(cls.__init__).parameters
                if p not in ("self", "name", "learning_rate", "kwargs")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InvalidArgument(f"Unknown parameter `{unknown[0]}` for optimizer `{name}`. Expected some of "
                              f"{accepted}. Received: {', '.join(unknown)}.", reason="BAD_OPTIMIZER_PARAMETER",
                              metadata={"optimizer": name, "parameter": unknown[0]})
    canonical = {"name": name, "learning_rate": float(lr) if lr is not None else None, "params": params}
    try:
        build_optimizer(canonical)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"Invalid parameters for optimizer `{name}`: {exc}", reason="BAD_OPTIMIZER_PARAMETER",
                              metadata={"optimizer": name}) from None
    return canonical


def resolve_metrics(names: Sequence[str], model_kind: str) -> list[str]:
    """Checks Keras metric names; returns them (``accuracy`` by default for classifiers)."""
    import keras

    names = list(names)
    if model_kind == GENERATOR:
        if names:
            raise InvalidArgument(
                f"Metrics are not supported for generators (the vae reports loss, reconstruction_loss and "
                f"kl_loss). Expected no metrics. Received: {names}.", reason="BAD_METRIC")
        return []
    for name in names:
        try:
            keras.metrics.get(name)
        except (ValueError, TypeError):
            raise InvalidArgument(f"Unknown metric {name!r}. Expected a Keras metric name, such as `accuracy` "
                                  "or `sparse_top_k_categorical_accuracy`.", reason="BAD_METRIC",
                                  metadata={"metric": str(name)[:80]}) from None
    return names or ["accuracy"]
