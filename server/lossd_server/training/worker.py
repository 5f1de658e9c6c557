"""The code that runs inside a job's process (started with the ``spawn``
method by the manager): builds the model, data, loss and optimizer, trains
with ``model.fit`` and reports through a queue. The job folder's files, and
the steps this loop shares with the multi-worker one, are ``loop``'s.

TensorFlow is imported inside ``run_job``, after the GPU this job may use is
chosen (``CUDA_VISIBLE_DEVICES`` must be set before TensorFlow starts).
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
import time

from lossd_server.observability import tracing as tracing_module
from lossd_server.training.loop import (HISTORY_FILE, LOGS_DIR, MODEL_FILE, PID_FILE, NonFiniteLoss, WorkerLost,
                                        configure_devices, progress_reporter, remove_temp_files, replace_from_temp,
                                        resume, scalar_logger, training_batches, training_data, write_json_atomic)

log = logging.getLogger(__name__)

# Never send a stack trace to a client: only the exception type and the
# first part of its message, which for training errors is what users need.
_MAX_MESSAGE = 500


def _watch_parent(parent_pid: int) -> None:
    """Ends this process when the server dies (even by ``kill -9``), so a job
    is never trained twice: the restarted server resumes it from its checkpoint."""
    try:  # Linux: the kernel signals us the moment the parent goes.
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(3)

    def poll():  # portable fallback
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()


def _is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is ENOSPC (h5py
    and Keras re-raise it with the errno only in the text)."""
    from lossd_server.errors import disk_full

    seen = 0
    while exc is not None and seen < 10:
        if disk_full(exc) or "No space left on device" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def failure_report(exc: BaseException) -> dict:
    """The ``done`` report for a training that raised ``exc``: a reason, a
    status code name and a message safe for clients (no stack, no paths)."""
    from lossd_server.errors import redact_paths

    if isinstance(exc, NonFiniteLoss):
        return {"state": "failed", "code": "FAILED_PRECONDITION", "reason": "NON_FINITE_LOSS", "message": str(exc),
                "metadata": {"step": exc.step, "epoch": exc.epoch}}
    if isinstance(exc, WorkerLost):
        return {"state": "failed", "code": "UNAVAILABLE", "reason": "WORKER_LOST", "message": str(exc)}
    from lossd_server.training.multiworker import PORT_TAKEN, PortTaken

    if isinstance(exc, PortTaken):
        return {"state": "failed", "code": "UNAVAILABLE", "reason": PORT_TAKEN, "message": str(exc),
                "metadata": {"worker": str(exc.index), "address": exc.address}}
    if _is_disk_full(exc):
        return {"state": "failed", "code": "RESOURCE_EXHAUSTED", "reason": "DISK_FULL",
                "message": "Training stopped: the server's disk is full, so the job's checkpoint or model could "
                           "not be written. Expected free space in the data directory; create the job again once "
                           "the operator has freed some."}
    text = redact_paths(f"{type(exc).__name__}: {exc}")
    return {"state": "failed", "code": "INTERNAL", "reason": "TRAINING_ERROR",
            "message": f"Training failed: {text[:_MAX_MESSAGE]}"}


def run_job(config: dict, queue) -> None:
    """Trains one job; the process's entry point.

    Args:
        config: ``job_id``, ``job_dir``, ``spec``, ``runtime``, ``model_kind``,
            ``progress_every``, ``mixed_precision``, ``gpu`` (an index or None),
            ``parent_pid``, ``max_upload_bytes``; for a worker of a
            multi-worker job also ``cluster`` (the workers' addresses),
            ``worker_index`` and ``collective_timeout`` (``multiworker.train``).
        queue: A ``multiprocessing`` queue; every report is a dict with a
            ``kind``: ``message``, ``progress``, ``epoch`` or ``done`` (and
            the ``worker`` index in a multi-worker job).
    """
    _watch_parent(config["parent_pid"])
    job_dir = pathlib.Path(config["job_dir"])
    if config.get("gpu") is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(config["gpu"])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    index = config.get("worker_index")  # set for the workers of a multi-worker job
    if index is not None:
        from lossd_server.training import multiworker

        os.environ["TF_CONFIG"] = multiworker.tf_config(config["cluster"], index)
    tag = {} if index is None else {"worker": index}

    def send(kind: str, **payload) -> None:
        queue.put({"kind": kind, **payload, **tag})

    # The job's trace, exported as the server's OTEL_* variables (this
    # process's environment is the server's) say; of a multi-worker job, the
    # chief (worker 0) records it, as it alone checkpoints and reports epochs.
    traceparent = config["runtime"].get("traceparent") if not index else None
    tracing = tracing_module.Tracing.from_environment() if traceparent else tracing_module.OFF
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        if not index:  # the chief alone: another worker may already be writing
            remove_temp_files(job_dir)  # a previous process of this job may have been killed mid-write
        (job_dir / (PID_FILE if not index else f"worker-{index}.pid")).write_text(str(os.getpid()))
        if index is None:
            _train(config, job_dir, send, tracing.job(traceparent))
        else:
            multiworker.train(config, job_dir, send, tracing.job(traceparent))
    except Exception as exc:  # noqa: BLE001 - the job fails, the server lives on
        report = failure_report(exc)
        if report["reason"] == "TRAINING_ERROR":
            log.error("job %s failed", config["job_id"], exc_info=True)
        send("done", **report)
    finally:
        tracing.shutdown()  # exports the spans still buffered
        queue.close()
        queue.join_thread()  # flush everything before the process exits


def _train(config: dict, job_dir: pathlib.Path, send, trace=tracing_module.OFF_JOB) -> None:
    import tensorflow as tf
    import keras

    from lossd_server.training import models
    from lossd_server.training.kinds import GENERATOR
    from lossd_server.training.losses import PlanLoss, plan_stored, reconstruction_loss

    gpus = configure_devices(config)

    spec, runtime = config["spec"], config["runtime"]
    seed = int(spec["seed"])
    keras.utils.set_random_seed(seed)

    plan = plan_stored(spec.get("loss"))  # the same program evaluation runs
    x_train, y_train, x_val, y_val, steps, examples_per_epoch = training_data(config, plan)
    n_val = len(x_val)
    batch_size, epochs = spec["batch_size"], spec["epochs"]

    val = (tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(max(batch_size, 256)).prefetch(2)
           if n_val else None)

    model_spec = spec["model"]
    model = models.build_model(model_spec["preset"], model_spec["params"], runtime["image_shape"],
                               len(runtime["class_names"]), logits=runtime.get("logits", False), seed=seed)
    optimizer = models.build_optimizer(spec["optimizer"])
    loss, loss_state = None, {}
    if model_spec["preset"] == "diffusion":
        # The noise-prediction loss, reduced as the plan says (sum_over_batch_size by default).
        model.compile(optimizer=optimizer, noise_loss=PlanLoss(plan))
    elif config["model_kind"] == GENERATOR:
        model.compile(optimizer=optimizer, reconstruction_loss=reconstruction_loss(plan))
    else:
        loss = PlanLoss(plan)
        # A stateful loss (matrix_crossentropy) keeps its state as variables
        # beside the model, checkpointed and reported with it.
        loss_state = loss.build_state((None, len(runtime["class_names"])))
        model.compile(optimizer=optimizer, loss=loss, metrics=list(spec["metrics"]))

    initial_epoch, history = resume(model, job_dir, x_train[:1], loss_state, send, epochs)
    send("message", text=f"Training {model_spec['preset']} on {len(x_train)} images ({n_val} held out for "
                         f"validation), {steps} batches of {batch_size} per epoch, on "
                         f"{'GPU' if gpus else 'CPU'}.")

    reporter = progress_reporter(send, job_dir, history, epochs=epochs, steps=steps, batch_size=batch_size,
                         examples_per_epoch=examples_per_epoch, n_train=len(x_train),
                         progress_every=config["progress_every"], loss=loss, trace=trace)
    callbacks = [reporter, scalar_logger(job_dir / LOGS_DIR)]
    if initial_epoch < epochs:
        train = training_batches(x_train, y_train, seed=seed, batch_size=batch_size, steps=steps,
                                 epochs=range(initial_epoch, epochs))
        try:
            model.fit(train, validation_data=val, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
                      shuffle=False, steps_per_epoch=steps, callbacks=callbacks)
        finally:
            reporter.end_epoch_span()  # an epoch that raised (a non-finite loss) still shows, cut short

    with trace.span("lossd.save_model"):
        replace_from_temp(job_dir / MODEL_FILE, job_dir / ("tmp-" + MODEL_FILE),
                           lambda tmp: models.save_model(model, tmp))
    write_json_atomic(job_dir / HISTORY_FILE, history)
    send("done", state="succeeded")
