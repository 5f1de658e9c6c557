"""One job over several worker processes: ``tf.distribute.MultiWorkerMirroredStrategy``.

A job with ``workers: N`` runs as N processes of ``worker.run_job`` on this
replica, each told its place by the ``TF_CONFIG`` lossd writes for it
(``tf_config``): a cluster of N workers on free loopback ports, and its own
index. Every worker builds the same model (same seed) and reads the same
deterministic batches (``loop.training_batches``); worker ``i`` takes rows
``i, i+N, i+2N ...`` of each batch of ``batch_size``, so the global batch is
the job's batch size whatever N is. The gradients are summed over the workers
by the Keras optimizer's all-reduce, so every worker applies the same update.

Keras 3's ``model.fit`` fails under multi-worker strategies with TensorFlow
2.21 (keras-team/keras#20585), so these jobs train with a loop of our own:
``strategy.run`` of a GradientTape step over the same Keras model and the
same plan (the program evaluation runs, every term left unreduced). Each
worker turns its rows' per-sample values into its share of the batch's loss
(``worker_share``): per term, the sum of its values over the divisor Keras
would use for the whole batch (``losses.reductions``, the owner chunked
evaluation and micro-batching use), so the shares add up to the
loss one process computes on the whole batch, and the gradients the
all-reduce sums to that loss's gradient.

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

from lossd_server.observability import tracing as tracing_module

REPLICAS_DIR = "replicas"
PORT_TAKEN = "WORKER_PORT_TAKEN"  # the reason of a worker's PortTaken failure


class PortTaken(Exception):
    """A worker could not listen on its cluster address: another process
    took the port between ``free_addresses`` and the worker binding it. The
    scheduler starts the job's workers once more on new ports."""

    def __init__(self, index: int, address: str):
        super().__init__(f"Worker {index} of this multi-worker job could not listen on {address}: another process "
                         "took that port after lossd chose it and before the worker bound it. Expected the port to "
                         "stay free; it is a race with other programs on this machine, so creating the job again "
                         "(a new job gets new ports) helps.")
        self.index, self.address = index, address


def free_addresses(n: int) -> list[str]:
    """``n`` distinct ``127.0.0.1:<port>`` addresses free right now. The
    sockets are closed before the workers bind them: a port another process
    takes in between makes its worker fail with ``PortTaken``, and the
    scheduler starts the workers once more on new ports."""
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


def port_in_use(address: str) -> bool:
    """Whether the port of ``address`` cannot be bound on every interface,
    as TensorFlow's gRPC server binds it (``0.0.0.0:<port>``)."""
    port = int(address.rpartition(":")[2])
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


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
    from lossd_server.training.loop import write_json_atomic

    folder = job_dir / REPLICAS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"worker-{index}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {"epochs": {}}
    record["epochs"][str(epoch)] = digest
    write_json_atomic(path, record)


def train(config: dict, job_dir: pathlib.Path, send, trace=tracing_module.OFF_JOB) -> None:
    """Trains one worker's part of a multi-worker job (``config["cluster"]``,
    ``config["worker_index"]``, ``config["collective_timeout"]``; the rest as
    ``worker.run_job``; ``trace``: the job's, a span per epoch, given to the
    chief). ``TF_CONFIG`` must be set before TensorFlow starts."""
    import numpy as np
    import tensorflow as tf
    import keras

    from lossd_server.training import models
    from lossd_server.training.losses import PlanLoss, plan_stored
    from lossd_server.training.loop import (HISTORY_FILE, LOGS_DIR, MODEL_FILE, NonFiniteLoss, WorkerLost,
                                            configure_devices, progress_reporter, replace_from_temp, resume,
                                            scalar_logger, training_batches, training_data, write_json_atomic)

    configure_devices(config)  # before the strategy: it takes the devices as they are then
    index, n_workers = int(config["worker_index"]), len(config["cluster"])
    chief = index == 0
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=float(config["collective_timeout"]),
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except tf.errors.UnknownError as exc:  # "Could not start gRPC server", with no text of its own
        if port_in_use(config["cluster"][index]):
            raise PortTaken(index, config["cluster"][index]) from exc
        raise

    spec, runtime = config["spec"], config["runtime"]
    seed = int(spec["seed"])
    keras.utils.set_random_seed(seed)
    plan = plan_stored(spec.get("loss"))
    x_train, y_train, x_val, y_val, steps, examples_per_epoch = training_data(config, plan)
    batch_size, epochs = spec["batch_size"], spec["epochs"]
    model_spec = spec["model"]
    with strategy.scope():
        model = models.build_model(model_spec["preset"], model_spec["params"], runtime["image_shape"],
                                   len(runtime["class_names"]), logits=runtime.get("logits", False), seed=seed)
        loss = PlanLoss(plan)
        program = per_sample_program(plan)
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
            # Divided as the whole batch's loss (Keras's own reductions would
            # divide by the replica count instead, wrong for a short last
            # batch). No rows: a share of 0.
            _, values, _ = program({"y_true": y, "y_pred": pred}, None)
            share, reported = worker_share(plan, values, total)
            scaled = model.optimizer.scale_loss(share)
        grads = tape.gradient(scaled, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduces the gradients
        return reported, _correct(y, pred), tf.cast(tf.shape(x)[0], tf.float32)

    @tf.function
    def train_step():
        reported, correct, rows = strategy.run(replica_step, args=next(iterator))
        return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in (reported, correct, rows))

    def _correct(y, pred):
        """How many rows the model classes right (Keras's ``accuracy`` for these labels)."""
        labels = tf.argmax(y, axis=-1) if len(y.shape) > 1 else tf.cast(y, tf.int64)
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(pred, axis=-1), labels), tf.float32))

    @tf.function
    def val_step(x, y):
        pred = model(x, training=False)
        n = tf.cast(tf.shape(x)[0], tf.float32)
        # Keras's loss tracker: the mean of the loss's values (one, unless a
        # term is unreduced), weighted by the batch's rows.
        return tf.reduce_mean(tf.cast(loss(y, pred), tf.float32)) * n, _correct(y, pred)

    def validate() -> dict:
        if not len(x_val):
            return {}
        loss_sum = correct = 0.0
        for start in range(0, len(x_val), max(batch_size, 256)):
            part = slice(start, start + max(batch_size, 256))
            s, c = val_step(x_val[part], y_val[part])
            loss_sum, correct = loss_sum + float(s), correct + float(c)
        return {"val_loss": loss_sum / len(x_val), "val_accuracy": correct / len(x_val)}

    reporter = progress_reporter(send, job_dir, history, epochs=epochs, steps=steps, batch_size=batch_size,
                         examples_per_epoch=examples_per_epoch, n_train=len(x_train),
                         progress_every=config["progress_every"], loss=None, trace=trace)
    reporter.set_model(model)
    scalars = scalar_logger(job_dir / LOGS_DIR) if chief else None
    timeout = float(config["collective_timeout"])

    def run_step() -> tuple[float, float, float]:
        try:
            value, correct, rows = train_step()
            return float(value), float(correct), float(rows)
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as exc:
            raise WorkerLost(timeout, type(exc).__name__) from None  # TF's message is a page of graph nodes

    try:
        for epoch in range(initial_epoch, epochs):
            reporter.on_epoch_begin(epoch)
            total = right = seen = 0.0
            for step in range(steps):
                value, correct, rows = run_step()  # the same on every worker: the guard stops them all at one step
                total, right, seen = total + value * rows, right + correct, seen + rows
                if not np.isfinite(value):
                    raise NonFiniteLoss(step=epoch * steps + step + 1, epoch=epoch + 1, value=value)
                # Keras's running mean over the epoch, weighted by each batch's
                # rows (a short last batch counts less), as model.fit reports it.
                reporter.on_train_batch_end(step, {"loss": total / seen})
            _record_digest(job_dir, index, epoch + 1, weights_digest(model))
            if chief:
                logs = {"loss": total / seen, "accuracy": right / examples_per_epoch, **validate()}
                reporter.on_epoch_end(epoch, logs)  # checkpoints, then reports the epoch
                scalars.on_epoch_end(epoch, logs)
    finally:
        reporter.end_epoch_span()  # an epoch that raised (a lost worker) still shows, cut short
    if scalars is not None:
        scalars.on_train_end()
    _barrier(strategy)  # every worker has recorded its last digest before the chief reports success
    if chief:
        with trace.span("lossd.save_model"):
            replace_from_temp(job_dir / MODEL_FILE, job_dir / ("tmp-" + MODEL_FILE),
                              lambda tmp: models.save_model(model, tmp))
        write_json_atomic(job_dir / HISTORY_FILE, history)
    send("done", state="succeeded")


def per_sample_program(plan, dtype: str = "float32"):
    """The program a worker runs on its rows (``plan.build_program``): the
    plan's spec planned again (``training.losses.job_planner``, as the job's
    own plan was) with every term unreduced, so that it returns each term's
    per-sample values (``worker_share`` reduces them)."""
    from lossd.wire import REDUCTION_NONE
    from lossd_server.losses.plan import build_program
    from lossd_server.training.losses import TRAINING_INPUTS, job_planner

    spec = plan.to_spec()  # a single loss sets no reduction of its own
    if plan.composite:
        spec = {"terms": [{**term, "reduction": None} for term in spec["terms"]]}
    return build_program(job_planner().plan(spec, TRAINING_INPUTS), REDUCTION_NONE, dtype)


def worker_share(plan, values, rows):
    """One worker's share of a batch's loss, from its rows of the batch.

    Keras's ``model.fit`` (the single-process path) trains on the gradient of
    the sum of the loss's values ``L = sum_k weight_k * T_k`` (a scalar,
    unless a term is unreduced: then TensorFlow's gradient of a tensor is
    that of its sum) and reports their mean. Each term ``T_k`` is its
    per-sample values' sum over the divisor of the whole batch's value count
    (``reductions.combine``), a sum the workers' rows split exactly; an
    unreduced term is the values themselves, broadcast against the other
    terms, so its sum counts once per element of ``L`` that each value
    reaches. The terms are weighted as the program weighs them
    (``plan.weighted_sum``).

    Args:
        plan: The job's plan (its terms' weights and reductions; a term that
            sets none takes ``PlanLoss``'s, ``DEFAULT_REDUCTION``).
        values: Per term, the per-sample values of this worker's rows, as
            ``per_sample_program(plan)`` returns them (rows on the first axis).
        rows: The whole batch's row count (over every worker).

    Returns:
        ``(gradient share, reported share)``: summed over the workers, the
        sum of the one-piece loss's values (train on its gradient) and their
        mean (what ``model.fit`` reports). Equal unless a term is unreduced.
    """
    import tensorflow as tf

    from lossd.wire import DEFAULT_REDUCTION, REDUCTION_MEAN, REDUCTION_NONE
    from lossd_server.losses import reductions
    from lossd_server.losses.plan import weighted_sum

    rows = tf.cast(rows, tf.float32)
    shares = []
    elements = None  # the shape of L where a term is unreduced; None: L is a scalar
    for term, value in zip(plan.terms, values):
        reduction = term.reduction or DEFAULT_REDUCTION
        value = tf.cast(value, tf.float32)
        count = rows * tf.cast(tf.reduce_prod(tf.shape(value)[1:]), tf.float32)  # the whole batch's values
        if reduction == REDUCTION_NONE:
            # T_k is the batch's values: L's mean takes their mean (each
            # reaches size(L) / size(T_k) elements of L), its sum size(L) times that.
            reduction = REDUCTION_MEAN
            shape = tf.concat([tf.reshape(tf.cast(rows, tf.int32), [1]), tf.shape(value)[1:]], axis=0)
            elements = shape if elements is None else tf.broadcast_dynamic_shape(elements, shape)
        # Training passes no sample weights.
        shares.append(reductions.combine(tf.reduce_sum(value), count, reduction))
    reported = weighted_sum(plan.terms, shares)
    if elements is None:
        return reported, reported
    return reported * tf.cast(tf.reduce_prod(elements), tf.float32), reported


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
