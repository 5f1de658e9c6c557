"""Side-by-side benchmark of training throughput (a benchmark, not a test).

In one run, with the same model, data, split and batch size:

  (a) in-process: ``model.fit`` on numpy arrays, as a Keras user would
      write it;
  (b) through lossd: a job on an in-process server (the job itself runs in
      its own spawned process, as deployed), watched through the client.

Both report images/s of the training part of each epoch after the first
(the first epoch pays for tracing and, for the job, nothing else: process
start-up happens before it). The rate is total images / total seconds over
epochs 2..N, measured the same way on both sides (epoch begin to the end of
its last training batch). The script prints both and the ratio b / a.

With ``--workers N`` it compares, the same way, (b) a job of one worker
(``model.fit``) with (c) the same job over N workers (MultiWorkerMirroredStrategy
on this machine, loopback collectives), and prints the ratio c / b.

With ``--baseline-tree DIR`` each run also trains (b@base): the same job on
a server run from another checkout (its ``client`` and ``server`` folders on
PYTHONPATH, in a process of its own, the job's process inheriting it), e.g.
the tree before a change, and prints b / b@base.

Usage: python bench/train.py [--model cnn] [--epochs 6] [--batch-size 32] [--repeat 1] [--workers 1]
                             [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def in_process(model_name: str, epochs: int, batch_size: int, seed: int) -> list[tuple[int, float]]:
    """(examples, seconds) of each epoch's training part, for ``model.fit`` here."""
    import keras

    from lossd_server.training import datasets, models

    keras.utils.set_random_seed(seed)
    x, y, classes = datasets.load_digits()
    # The job's split: a seeded shuffle, then the first 20 % held out.
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_val = int(round(len(x) * 0.2))
    params = models.resolve_model_params(model_name, {}, x.shape[1:])
    model = models.build_model(model_name, params, x.shape[1:], len(classes))
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    n_train = len(x) - n_val

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[tuple[int, float]] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = self.end = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append((n_train, self.end - self.start))

    timer = Timer()
    model.fit(x[n_val:], y[n_val:], batch_size=batch_size, epochs=epochs, validation_data=(x[:n_val], y[:n_val]),
              verbose=0, callbacks=[timer])
    return timer.epochs


def through_lossd(model_name: str, epochs: int, batch_size: int, seed: int, workers: int = 1
                  ) -> tuple[list[tuple[int, float]], float]:
    """(examples, seconds) of each epoch as the job reported it, and its val accuracy."""
    from prometheus_client import CollectorRegistry

    import lossd
    from lossd_server.app import create_server
    from lossd_server.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(port=0, metrics_port=None, data_dir=pathlib.Path(tmp), progress_every_batches=1000,
                            max_concurrent_jobs=max(workers, 1))
        server = create_server(settings, metrics_registry=CollectorRegistry())
        server.start()
        try:
            with lossd.Client(f"127.0.0.1:{server.port}", timeout=3600) as client:
                job = client.create_job(model_name, "digits", epochs=epochs, batch_size=batch_size, seed=seed,
                                        validation_split=0.2, workers=workers)
                epochs_seen = [(e.examples, e.examples / e.examples_per_second)
                               for e in watch_all(client, job) if e.kind == "epoch"]
                job = client.get_job(job)
                if job.state != "succeeded":
                    raise SystemExit(f"the job failed: {job.error}")
                return epochs_seen, job.progress["metrics"].get("val_accuracy", float("nan"))
        finally:
            server.stop(0)


def watch_all(client, job) -> list:
    """Every event of the job until it ends, watching again after a stream
    the server ended as idle (a job process still starting on a busy host
    may send nothing for longer than stream_idle_seconds)."""
    import lossd

    events = []
    while True:
        try:
            for event in client.watch(job, after_sequence=events[-1].sequence if events else 0):
                events.append(event)
            return events
        except lossd.LossdError as error:
            if error.reason != "STREAM_IDLE":
                raise


def rate(epochs: list[tuple[int, float]]) -> float:
    later = epochs[1:]
    return sum(n for n, _ in later) / sum(s for _, s in later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="alternate (a) and (b) this many times")
    parser.add_argument("--workers", type=int, default=1, help="N > 1: compare a job of N workers with one of 1")
    parser.add_argument("--baseline-tree", help="a checkout to run (b@base) from (its client and server)")
    parser.add_argument("--job-only", action="store_true", help=argparse.SUPPRESS)  # (b@base)'s process
    args = parser.parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first epoch is not counted)")
    if args.job_only:
        epochs, accuracy = through_lossd(args.model, args.epochs, args.batch_size, args.seed)
        print(json.dumps({"rate": rate(epochs), "accuracy": accuracy}))
        return None
    if args.workers > 1:
        return compare_workers(args)

    a_rates, b_rates, base_rates = [], [], []
    for i in range(args.repeat):
        a = rate(in_process(args.model, args.epochs, args.batch_size, args.seed))
        b_epochs, accuracy = through_lossd(args.model, args.epochs, args.batch_size, args.seed)
        b = rate(b_epochs)
        a_rates.append(a)
        b_rates.append(b)
        line = f"run {i + 1}: in-process {a:,.0f} images/s, lossd job {b:,.0f} images/s, ratio {b / a:.3f}"
        if args.baseline_tree:
            base_rates.append(baseline_job(args))
            line += f", job@base {base_rates[-1]:,.0f} images/s, b / b@base {b / base_rates[-1]:.3f}"
        print(f"{line}  (job val_accuracy {accuracy:.4f})", flush=True)
    a, b = float(np.median(a_rates)), float(np.median(b_rates))
    print(f"\n{args.model} on digits, batch {args.batch_size}, epochs 2-{args.epochs}, median of {args.repeat}:")
    print(f"  (a) in-process model.fit : {a:10,.0f} images/s")
    print(f"  (b) lossd job            : {b:10,.0f} images/s")
    print(f"  ratio b / a              : {b / a:10.3f}")
    if base_rates:
        base = float(np.median(base_rates))
        print(f"  (b@base) job, baseline   : {base:10,.0f} images/s")
        print(f"  ratio b / b@base         : {b / base:10.3f}")


def baseline_job(args) -> float:
    """(b)'s images/s with the server and the job run from ``--baseline-tree``."""
    tree = os.path.abspath(args.baseline_tree)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(tree, "client"), os.path.join(tree, "server")])}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--job-only", "--model", args.model,
                          "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed",
                          str(args.seed)], env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rate"]


def compare_workers(args) -> None:
    """(b) one worker against (c) ``args.workers`` workers, alternating."""
    b_rates, c_rates = [], []
    for i in range(args.repeat):
        b_epochs, b_accuracy = through_lossd(args.model, args.epochs, args.batch_size, args.seed)
        c_epochs, c_accuracy = through_lossd(args.model, args.epochs, args.batch_size, args.seed, args.workers)
        b_rates.append(rate(b_epochs))
        c_rates.append(rate(c_epochs))
        print(f"run {i + 1}: 1 worker {b_rates[-1]:,.0f} images/s, {args.workers} workers {c_rates[-1]:,.0f} "
              f"images/s, ratio {c_rates[-1] / b_rates[-1]:.3f}  (val_accuracy {b_accuracy:.4f} / "
              f"{c_accuracy:.4f})", flush=True)
    b, c = float(np.median(b_rates)), float(np.median(c_rates))
    print(f"\n{args.model} on digits, global batch {args.batch_size}, epochs 2-{args.epochs}, median of "
          f"{args.repeat}, {os.cpu_count()} cpus:")
    print(f"  (b) lossd job, 1 worker (model.fit)  : {b:10,.0f} images/s")
    print(f"  (c) lossd job, {args.workers} workers (custom loop): {c:10,.0f} images/s")
    print(f"  ratio c / b                          : {c / b:10.3f}")


if __name__ == "__main__":
    main()
