"""One job over several worker processes: ``tf.distribute.MultiWorkerMirroredStrategy``.

A job with ``workers: N`` runs as N processes of ``worker.run_job`` on this
replica, each told its place by the ``TF_CONFIG`` lossd writes for it
(``tf_config``): a cluster of N workers on free loopback ports, and its own
index. Every worker builds the same model (same seed) and reads the same
deterministic batches (``worker.training_batches``); worker ``i`` takes rows
``i, i+N, i+2N ...`` of each batch of ``batch_size``, so the global batch is
the job's batch size whatever N is. The gradients are summed over the workers
by the Keras optimizer's all-reduce, so every worker applies the same update.

Keras 3's ``model.fit`` fails under multi-worker strategies with TensorFlow
2.21 (keras-team/keras#20585), so these jobs train with a loop of our own:
``strategy.run`` of a GradientTape step over the same Keras model and the
same ``PlanLoss`` (the program evaluation runs). Each worker's loss is its
share's mean scaled by its share of the global batch, so the sum over the
workers is the mean over the whole batch, as one process would compute it.

Worker 0 is the chief: it alone reports progress, writes checkpoints (through
the same reporter single-process jobs use, so the NaN guard, the events and
the checkpoint files are the same) and the final model. The others write no
job files but their weight digests (``replicas/worker-<i>.json``: one
SHA-256 of the weights per epoch, which shows the copies stayed identical).
A worker whose peer died fails its next collective within
``job_collective_timeout_seconds``; the scheduler, which watches all N
processes, stops the others as soon as one ends abnormally and retries the
job from its checkpoint like any crashed job.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import socket

REPLICAS_DIR = "replicas"


def free_addresses(n: int) -> list[str]:
    """``n`` distinct ``127.0.0.1:<port>`` addresses free right now. The
    sockets are closed before the workers bind them: if another process
    takes a port in between, the job fails (TRAINING_ERROR) rather than
    being retried, a known gap."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(cluster: list[str], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` in ``cluster`` (worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": list(cluster)}, "task": {"type": "worker", "index": index}})


def weights_digest(model) -> str:
    """SHA-256 over the model's weights' bytes, in order."""
    digest = hashlib.sha256()
    for value in model.get_weights():
        digest.update(value.tobytes())
    return digest.hexdigest()


def _record_digest(job_dir: pathlib.Path, index: int, epoch: int, digest: str) -> None:
    from lossd_server.training.worker import _write_json_atomic

    folder = job_dir / REPLICAS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"worker-{index}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {"epochs": {}}
    record["epochs"][str(epoch)] = digest
    _write_json_atomic(path, record)


def train(config: dict, job_dir: pathlib.Path, send) -> None:
    """Trains one worker's part of a multi-worker job (``config["cluster"]``,
    ``config["worker_index"]``, ``config["collective_timeout"]``; the rest as
    ``worker.run_job``). ``TF_CONFIG`` must be set before TensorFlow starts."""
    import numpy as np
    import tensorflow as tf
    import keras

    from lossd_server.training import models
    from lossd_server.training.losses import PlanLoss, plan_stored
    from lossd_server.training.worker import (HISTORY_FILE, LOGS_DIR, MODEL_FILE, NonFiniteLoss, WorkerLost,
                                              _make_scalar_logger, _replace_from_temp, _Reporter, _training_data,
                                              _write_json_atomic, configure_devices, resume,
                                              training_batches)

    configure_devices(config)  # before the strategy: it takes the devices as they are then
    index, n_workers = int(config["worker_index"]), len(config["cluster"])
    chief = index == 0
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=float(config["collective_timeout"]),
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)

    spec, runtime = config["spec"], config["runtime"]
    seed = int(spec["seed"])
    keras.utils.set_random_seed(seed)
    plan = plan_stored(spec.get("loss"))
    x_train, y_train, x_val, y_val, steps, examples_per_epoch = _training_data(config, plan)
    batch_size, epochs = spec["batch_size"], spec["epochs"]
    model_spec = spec["model"]
    with strategy.scope():
        model = models.build_model(model_spec["preset"], model_spec["params"], runtime["image_shape"],
                                   len(runtime["class_names"]), logits=runtime.get("logits", False), seed=seed)
        loss = PlanLoss(plan)
        per_sample = PlanLoss(_per_sample(plan), reduction="none")
        # Compiled (never fitted) so that checkpoints and the saved model keep
        # the optimizer and the loss, as single-process jobs' do.
        model.compile(optimizer=models.build_optimizer(spec["optimizer"]), loss=loss)
        model(x_train[:1], training=False)
        model.optimizer.build(model.trainable_variables)
    if not chief:  # progress and messages come from the chief alone; the scheduler reads every worker's end
        send = _only_done(send)
    initial_epoch, history = resume(model, job_dir, x_train[:1], {}, send, epochs)
    send("message", text=f"Training {model_spec['preset']} on {len(x_train)} images ({len(x_val)} held out for "
                         f"validation), {steps} batches of {batch_size} per epoch, over {n_workers} workers "
                         f"(MultiWorkerMirroredStrategy, {batch_size} examples per step in all).")

    def shard(context):
        batches = training_batches(x_train, y_train, seed=seed, batch_size=batch_size, steps=steps,
                                   epochs=range(initial_epoch, epochs))
        i, n = context.input_pipeline_id, context.num_input_pipelines
        # Each worker's rows, and how many the whole batch has (a short last batch has fewer).
        return batches.map(lambda x, y: (x[i::n], y[i::n], tf.cast(tf.shape(x)[0], tf.float32)))

    iterator = iter(strategy.distribute_datasets_from_function(shard))

    def replica_step(x, y, total):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            # The per-sample values summed over this worker's rows, over the
            # whole batch's count: the workers' shares add up to the batch's
            # mean (Keras's own reductions would divide by the replica count
            # instead, wrong for a short last batch). No rows: a share of 0.
            values = tf.cast(per_sample(y, pred), tf.float32)
            per_row = tf.cast(tf.reduce_prod(tf.shape(values)[1:]), tf.float32)
            share = tf.math.divide_no_nan(tf.reduce_sum(values), total * per_row)
            scaled = model.optimizer.scale_loss(share)
        grads = tape.gradient(scaled, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduces the gradients
        return share, _correct(y, pred)

    @tf.function
    def train_step():
        shares, correct = strategy.run(replica_step, args=next(iterator))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, shares, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None))

    def _correct(y, pred):
        """How many rows the model classes right (Keras's ``accuracy`` for these labels)."""
        labels = tf.argmax(y, axis=-1) if len(y.shape) > 1 else tf.cast(y, tf.int64)
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(pred, axis=-1), labels), tf.float32))

    @tf.function
    def val_step(x, y):
        pred = model(x, training=False)
        n = tf.cast(tf.shape(x)[0], tf.float32)
        return tf.cast(loss(y, pred), tf.float32) * n, _correct(y, pred)

    def validate() -> dict:
        if not len(x_val):
            return {}
        loss_sum = correct = 0.0
        for start in range(0, len(x_val), max(batch_size, 256)):
            part = slice(start, start + max(batch_size, 256))
            s, c = val_step(x_val[part], y_val[part])
            loss_sum, correct = loss_sum + float(s), correct + float(c)
        return {"val_loss": loss_sum / len(x_val), "val_accuracy": correct / len(x_val)}

    reporter = _Reporter(send, job_dir, history, epochs=epochs, steps=steps, batch_size=batch_size,
                         examples_per_epoch=examples_per_epoch, n_train=len(x_train),
                         progress_every=config["progress_every"], loss=None)
    reporter.set_model(model)
    scalars = _make_scalar_logger(job_dir / LOGS_DIR) if chief else None
    timeout = float(config["collective_timeout"])

    def run_step() -> tuple[float, float]:
        try:
            value, correct = train_step()
            return float(value), float(correct)
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as exc:
            raise WorkerLost(timeout, type(exc).__name__) from None  # TF's message is a page of graph nodes

    for epoch in range(initial_epoch, epochs):
        reporter.on_epoch_begin(epoch)
        total = right = 0.0
        for step in range(steps):
            value, correct = run_step()  # the same on every worker: the guard stops them all at one step
            total, right = total + value, right + correct
            if not np.isfinite(value):
                raise NonFiniteLoss(step=epoch * steps + step + 1, epoch=epoch + 1, value=value)
            # Keras's running mean over the epoch, as model.fit reports it.
            reporter.on_train_batch_end(step, {"loss": total / (step + 1)})
        _record_digest(job_dir, index, epoch + 1, weights_digest(model))
        if chief:
            logs = {"loss": total / steps, "accuracy": right / examples_per_epoch, **validate()}
            reporter.on_epoch_end(epoch, logs)  # checkpoints, then reports the epoch
            scalars.on_epoch_end(epoch, logs)
    if scalars is not None:
        scalars.on_train_end()
    _barrier(strategy)  # every worker has recorded its last digest before the chief reports success
    if chief:
        _replace_from_temp(job_dir / MODEL_FILE, job_dir / ("tmp-" + MODEL_FILE), model.save)
        _write_json_atomic(job_dir / HISTORY_FILE, history)
    send("done", state="succeeded")


def _per_sample(plan):
    """``plan`` with every term's reduction left to the loss (``none`` in a
    per-sample ``PlanLoss``); jobs.py admits only mean-type reductions to
    multi-worker jobs, which this loop then takes over the whole batch."""
    import dataclasses

    terms = tuple(dataclasses.replace(term, reduction=None) for term in plan.terms)
    return dataclasses.replace(plan, terms=terms, key=f"{plan.key}|per-sample")


def _only_done(send):
    """``send`` passing on only ``done`` reports."""
    def send_done(kind: str, **payload) -> None:
        if kind == "done":
            send(kind, **payload)
    return send_done


def _barrier(strategy) -> None:
    """Returns once every worker has called it (one tiny all-reduce)."""
    import tensorflow as tf

    strategy.reduce(tf.distribute.ReduceOp.SUM,
                    strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
                        tf.distribute.ReduceOp.SUM, tf.constant(1.0))), axis=None)
