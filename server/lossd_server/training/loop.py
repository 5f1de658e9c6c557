"""What both training loops share: the single-process job's ``model.fit``
(``worker``) and the multi-worker job's loop of its own (``multiworker``).

It owns the job folder, ``<data_dir>/jobs/<id>/``:

- ``checkpoints/epoch-N.weights.h5`` and ``checkpoint.json`` (which epoch is
  the latest, the history so far, a stateful loss's state and the dropout
  layers' random-number states): written every epoch, atomically, so a
  process killed at any moment leaves a usable checkpoint. Model *and*
  optimizer state are saved, so a resumed job continues where it stopped.
- ``model.keras``, ``history.json`` and ``logs/`` (TensorBoard) at the end.

Every file is written under a temporary name (``tmp-*`` or ``*.tmp``) and
renamed; a failed write removes its temporary file, and ``remove_temp_files``
sweeps what a killed process left before the job starts again.

And the steps of training both loops take: devices, resuming from the
checkpoint, the job's data and its batches, one gradient step of a model
that trains itself, the TensorBoard scalars and the progress reporter
(events, the NaN guard, checkpoints, epoch spans).

TensorFlow and Keras are imported inside the functions that use them: the
server reads the job folder with this module, and a job's process must
choose its GPU before TensorFlow starts.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Optional

from lossd_server.observability import tracing as tracing_module

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_META = "checkpoint.json"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
LOGS_DIR = "logs"
PID_FILE = "worker.pid"
TEMP_PATTERNS = ("tmp-*", "*.tmp", f"{CHECKPOINT_DIR}/tmp-*")
# Progress events carry a stateful loss's state (matrix_crossentropy's K x K
# matrix) up to this many elements (64 classes); checkpoints keep it whole.
MAX_REPORTED_STATE_ELEMENTS = 4096


class NonFiniteLoss(Exception):
    """The training loss became NaN or Inf."""

    def __init__(self, step: int, epoch: int, value: float):
        super().__init__(f"The training loss became {value} at step {step} (epoch {epoch}).")
        self.step, self.epoch, self.value = step, epoch, value


class WorkerLost(Exception):
    """A worker of a multi-worker job got no answer from the others in a
    collective operation within the collective timeout."""

    def __init__(self, timeout: float, detail: str):
        super().__init__(f"A worker of this multi-worker job stopped answering: the gradient all-reduce got no "
                         f"reply within {timeout:g} s (job_collective_timeout_seconds). Expected every worker "
                         f"process to stay alive and reachable. ({detail})")


def read_checkpoint(job_dir: pathlib.Path) -> Optional[dict]:
    """The latest checkpoint's metadata ``{"epoch", "weights", "history"}``, or None."""
    meta = job_dir / CHECKPOINT_META
    if not meta.exists():
        return None
    try:
        data = json.loads(meta.read_text())
        if not isinstance(data.get("epoch"), int) or not isinstance(data.get("history"), dict) \
                or not (job_dir / CHECKPOINT_DIR / str(data["weights"])).is_file():
            return None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None  # unreadable: the job starts again from the beginning
    return data


def remove_temp_files(job_dir: pathlib.Path) -> int:
    """Deletes the temporary files a killed job process may have left in
    ``job_dir``; returns how many. Call it only while no process runs the job."""
    removed = 0
    for pattern in TEMP_PATTERNS:
        for leftover in job_dir.glob(pattern):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                removed += 1
    return removed


def replace_from_temp(target: pathlib.Path, tmp: pathlib.Path, write) -> None:
    """``write(tmp)``, then renames ``tmp`` to ``target``; a failure removes ``tmp``."""
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: pathlib.Path, data: Any) -> None:
    """Writes ``data`` as JSON to ``path`` through ``path.tmp`` (``replace_from_temp``)."""
    replace_from_temp(path, path.with_name(path.name + ".tmp"), lambda tmp: tmp.write_text(json.dumps(data)))


def configure_devices(config: dict) -> list:
    """Memory growth on this process's GPUs, and mixed precision where the
    job asks and a GPU exists; returns the GPUs."""
    import keras
    import tensorflow as tf

    from lossd_server.evaluation.backend import physical_gpus

    gpus = physical_gpus()  # the first probe: quiet where no GPU is expected, as in the server
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if config.get("mixed_precision") and gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return gpus


def resume(model, job_dir: pathlib.Path, sample, loss_state: dict, send, epochs: int) -> tuple[int, dict]:
    """Loads the job's latest checkpoint, if any, into ``model`` (weights,
    optimizer slots, ``loss_state``, dropout's random states) and says so;
    returns ``(initial_epoch, history)``, ``(0, {})`` without one. ``sample``:
    one batch of inputs, to build the weights the checkpoint fills."""
    import numpy as np

    ckpt_dir = job_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(exist_ok=True)
    checkpoint = read_checkpoint(job_dir)
    if checkpoint is None:
        return 0, {}
    # Weights and optimizer slots must exist before they can be loaded.
    model(sample, training=False)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(ckpt_dir / checkpoint["weights"])
    initial_epoch = int(checkpoint["epoch"])
    for name, value in (checkpoint.get("loss_state") or {}).items():
        if name in loss_state:
            loss_state[name].assign(np.asarray(value, dtype=loss_state[name].dtype))
    seeds = checkpoint.get("seed_states") or {}
    for variable in seed_states(model):
        if variable.path in seeds:
            variable.assign(np.asarray(seeds[variable.path], dtype=variable.dtype))
    send("message", text=f"Resuming from the checkpoint of epoch {initial_epoch}; "
                         f"{epochs - initial_epoch} epochs to go.", resumed_from_epoch=initial_epoch)
    return initial_epoch, checkpoint["history"]


def training_data(config: dict, plan) -> tuple:
    """``(x_train, y_train, x_val, y_val, steps, examples_per_epoch)`` of a
    job: its dataset, labels in the format its loss takes, shuffled with the
    job's seed and split; the same in every worker of a multi-worker job."""
    import numpy as np

    from lossd_server.training import datasets
    from lossd_server.training.kinds import CLASSIFIER
    from lossd_server.training.losses import ONE_HOT, label_format

    spec, runtime = config["spec"], config["runtime"]
    x, y, _ = datasets.load(runtime["dataset_source"], runtime["dataset_path"], config["max_upload_bytes"])
    if config["model_kind"] == CLASSIFIER and label_format(plan) == ONE_HOT:
        # Expression and plugin losses compare y_pred with targets of its own shape.
        y = np.eye(len(runtime["class_names"]), dtype="float32")[y]
    # A seeded shuffle before the split: Keras's validation_split takes the
    # last rows as they are, which for sorted datasets is one class.
    order = np.random.default_rng(int(spec["seed"])).permutation(len(x))
    x, y = x[order], y[order]
    n_val = int(round(len(x) * spec["validation_split"]))
    x_train, y_train = x[n_val:], y[n_val:]
    full_steps = math.ceil(len(x_train) / spec["batch_size"])
    steps = min(spec["steps_per_epoch"] or full_steps, full_steps)
    return x_train, y_train, x[:n_val], y[:n_val], steps, min(steps * spec["batch_size"], len(x_train))


def seed_states(model) -> list:
    """The model's random-number states (dropout's seed generators): not
    among the weights ``save_weights`` writes, so checkpoints keep them
    beside, and a resumed job draws the masks an uninterrupted run would."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def epoch_order(seed: int, epoch: int, n: int):
    """The order of the training examples in epoch ``epoch`` (from 0): a
    permutation drawn from ``(seed, epoch)`` alone, so a job resumed at any
    epoch sees the batches an uninterrupted run would have seen."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def training_batches(x, y, *, seed: int, batch_size: int, steps: int, epochs: range):
    """The training batches of ``epochs``, one after another: each epoch's
    first ``steps`` batches in ``epoch_order``. ``model.fit`` reads them with
    ``steps_per_epoch=steps``, which keeps one iterator across epochs."""
    import numpy as np
    import tensorflow as tf

    orders = np.stack([epoch_order(seed, e, len(x)) for e in epochs])
    x, y = tf.constant(x), tf.constant(y)
    batches = tf.data.Dataset.from_tensor_slices(orders).flat_map(
        lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size).take(steps))
    return batches.map(lambda index: (tf.gather(x, index), tf.gather(y, index)),
                       num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def gradient_step(model, compute_losses):
    """One optimisation step of a model that trains itself (``models.VAE``,
    ``models.Diffusion``) on the TensorFlow backend: ``compute_losses()``
    (a tuple whose first item is the total loss) under a GradientTape, the
    optimizer applied. Returns what ``compute_losses`` returned, as a tuple."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        losses = compute_losses()
        losses = tuple(losses) if isinstance(losses, (tuple, list)) else (losses,)
        scaled = model.optimizer.scale_loss(losses[0])
    grads = tape.gradient(scaled, model.trainable_weights)
    model.optimizer.apply_gradients(zip(grads, model.trainable_weights))
    return losses


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def scalar_logger(logs_dir: pathlib.Path):
    """Writes each epoch's metrics as TensorBoard scalars under ``logs/train``
    and ``logs/validation`` (the layout of Keras's TensorBoard callback).

    Keras's own callback needs the ``tensorboard`` package for
    ``tf.summary.scalar``; ``tf.summary.write`` with the scalars plugin's
    metadata writes the same records with TensorFlow alone.
    """
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    class ScalarLogger(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.writers = {}

        def _writer(self, split: str):
            if split not in self.writers:
                self.writers[split] = tf.summary.create_file_writer(str(logs_dir / split))
            return self.writers[split]

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                split, tag = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
                with self._writer(split).as_default():
                    tf.summary.write(f"epoch_{tag}", tf.constant(float(value), tf.float32), step=epoch,
                                     metadata=metadata)
            for writer in self.writers.values():
                writer.flush()

        def on_train_end(self, logs=None):
            for writer in self.writers.values():
                writer.close()

    return ScalarLogger()


def _make_reporter_class():
    import keras

    class Reporter(keras.callbacks.Callback):
        """Reports progress every N batches, checks the loss is finite, and
        checkpoints then reports at every epoch's end."""

        def __init__(self, send, job_dir: pathlib.Path, history: dict, *, epochs: int, steps: int,
                     batch_size: int, examples_per_epoch: int, n_train: int, progress_every: int, loss=None,
                     trace=tracing_module.OFF_JOB):
            super().__init__()
            # observability.tracing.JobTrace: a span per epoch, with its checkpoint write inside.
            self.trace, self.epoch_span = trace, None
            self.send, self.job_dir, self.history = send, job_dir, history
            # A stateful loss (``PlanLoss.build_state``): its state updates on
            # training batches only, and is checkpointed and reported.
            self.loss = loss if loss is not None and loss.state else None
            self.epochs, self.steps, self.batch_size = epochs, steps, batch_size
            self.examples_per_epoch, self.n_train = examples_per_epoch, n_train
            self.progress_every = progress_every
            self.rate = 0.0

        def on_test_begin(self, logs=None):
            if self.loss is not None:  # validation batches must not move the loss's state
                self.loss.updating.assign(False)

        def on_test_end(self, logs=None):
            if self.loss is not None:
                self.loss.updating.assign(True)

        def _loss_state(self, limit: Optional[int] = None) -> dict:
            """The loss's state as lists, leaving out values of more than ``limit`` elements."""
            if self.loss is None:
                return {}
            values = {name: variable.numpy() for name, variable in self.loss.state.items()}
            return {name: v.tolist() for name, v in values.items() if limit is None or v.size <= limit}

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_span = self.trace.start("lossd.epoch", **{"lossd.epoch": epoch + 1})
            self.epoch = epoch
            self.epoch_start = self.mark_time = time.perf_counter()
            self.mark_examples = 0
            self.train_end = None

        def _examples(self, batch: int) -> int:
            return min((batch + 1) * self.batch_size, self.n_train)

        def on_train_batch_end(self, batch, logs=None):
            logs = logs or {}
            loss = logs.get("loss")
            if loss is not None and not _finite(loss):
                raise NonFiniteLoss(step=self.epoch * self.steps + batch + 1, epoch=self.epoch + 1,
                                    value=float(loss))
            self.train_end = time.perf_counter()
            if (batch + 1) % self.progress_every and batch + 1 != self.steps:
                return
            now = self.train_end
            done = self._examples(batch)
            if now > self.mark_time:
                self.rate = (done - self.mark_examples) / (now - self.mark_time)
            self.mark_time, self.mark_examples = now, done
            remaining = (self.epochs - self.epoch) * self.examples_per_epoch - done
            self.send("progress", epoch=self.epoch + 1, epochs=self.epochs, step=batch + 1,
                      steps_per_epoch=self.steps, loss=float(loss) if loss is not None else 0.0,
                      examples=done, examples_per_second=self.rate,
                      eta_seconds=remaining / self.rate if self.rate > 0 else 0.0,
                      loss_state=self._loss_state(MAX_REPORTED_STATE_ELEMENTS))

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            metrics = {k: float(v) for k, v in (logs or {}).items() if _finite(v)}
            for key, value in metrics.items():
                self.history.setdefault(key, []).append(value)
            with self.trace.span("lossd.checkpoint", self.epoch_span, **{"lossd.epoch": epoch + 1}):
                self._checkpoint(epoch + 1)
            self.end_epoch_span()
            train_seconds = (self.train_end or now) - self.epoch_start
            self.send("epoch", epoch=epoch + 1, epochs=self.epochs, metrics=metrics, seconds=now - self.epoch_start,
                      examples=self.examples_per_epoch,
                      examples_per_second=self.examples_per_epoch / train_seconds if train_seconds > 0 else 0.0)

        def end_epoch_span(self) -> None:
            """Ends the current epoch's span, if one is open."""
            if self.epoch_span is not None:
                self.epoch_span.end()
                self.epoch_span = None

        def _checkpoint(self, epoch: int) -> None:
            # New file, then the pointer: a kill at any moment leaves the
            # previous checkpoint or the new one, never a torn file.
            ckpt_dir = self.job_dir / CHECKPOINT_DIR
            name = f"epoch-{epoch}.weights.h5"
            replace_from_temp(ckpt_dir / name, ckpt_dir / f"tmp-{name}", self.model.save_weights)
            write_json_atomic(self.job_dir / CHECKPOINT_META,
                               {"epoch": epoch, "weights": name, "history": self.history,
                                "loss_state": self._loss_state(),
                                "seed_states": {v.path: v.numpy().tolist() for v in seed_states(self.model)}})
            for old in ckpt_dir.glob("epoch-*.weights.h5"):
                if old.name != name:
                    old.unlink(missing_ok=True)

    return Reporter


def progress_reporter(*args, **kwargs):
    """The Keras callback that reports a job's progress through ``send``
    every ``progress_every`` batches, stops it with ``NonFiniteLoss`` when
    the loss is NaN or Inf, and at every epoch's end checkpoints into
    ``job_dir`` (appending the epoch's metrics to ``history``), then reports
    the epoch. Arguments: ``(send, job_dir, history, *, epochs, steps,
    batch_size, examples_per_epoch, n_train, progress_every, loss=None,
    trace=OFF_JOB)``; ``loss`` is a stateful ``PlanLoss``, whose state it
    keeps out of validation, checkpoints and reports; ``trace`` the job's
    trace, given a span per epoch with the checkpoint's inside. The
    multi-worker loop calls its hooks itself. A function, because the class
    is defined only once Keras has started (``_make_reporter_class``)."""
    return _make_reporter_class()(*args, **kwargs)
