"""XLA against a plain compiled graph, through lossd's evaluator in process
(a benchmark, not a test).

Large tensors (the default): every Keras loss at ``--elements``, with its
gradient. The losses XLA makes faster by a clear margin go into
``lossd_server.app.XLA_LOSSES``, which ``LOSSD_XLA=auto`` uses for tensors of
2^20 elements and more.

Small requests (``--small``): prebuilt ragged requests (1-128 rows of 10
float32, Huber with each request's own delta, MSE, categorical
crossentropy; with the gradient) through ``Evaluator.evaluate``, the path a
lone request takes, on the graph (``xla="off"``) and on XLA buckets
(``xla="auto"``, executables compiled beforehand), and 16 of them as one
micro-batch (``Batcher._run``, the call a batch leader makes). Each
TensorFlow executor set-up runs in a process of its own (inter-op threads
are fixed when TensorFlow starts): lossd's default (one inter-op thread),
TensorFlow's default pool (``inter0``), asynchronous eager execution
(``async``: ``tf.config.experimental.set_synchronous_execution(False)``)
and the single-threaded function executor (``single``). The parent hands
blocks to the processes in turn, every side in every block, and prints the
median of the blocks in µs per request, of the worker process's CPU time
(all its threads: robust to a loaded machine) and of wall-clock time, and
the ratios.

Usage: python bench/xla.py [--elements 1e7] [--repeats 5]
       python bench/xla.py --small [--blocks 5] [--block-calls 300] [--executors default,inter0,async,single]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SMALL_LOSSES = ("huber", "mean_squared_error", "categorical_crossentropy")
SIDES = ("graph", "xla")
BATCH = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=float, default=1e7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="small ragged requests: graph against XLA buckets")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--block-calls", type=int, default=300)
    parser.add_argument("--executors", default="default,inter0,async,single")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return small_worker(args.worker)
    if args.small:
        return small(args)

    from lossd_server.evaluation import backend
    from lossd_server.evaluation.evaluator import Evaluator
    from lossd_server.losses.registry import default_registry

    registry = default_registry()
    device = backend.select_device()
    plain = Evaluator(registry, device, xla="off")
    xla = Evaluator(registry, device, xla="on")
    rows = int(args.elements) // 10
    rng = np.random.default_rng(0)
    y_true = rng.uniform(0.05, 0.95, size=(rows, 10)).astype("float32")
    y_pred = rng.uniform(0.05, 0.95, size=(rows, 10)).astype("float32")
    labels = rng.integers(0, 10, size=rows)
    onehot = np.eye(10, dtype="float32")[labels]
    print(f"# bench/xla.py  {rows * 10:.0e} float32 elements, median of {args.repeats}, {device.name}")
    print(f"{'loss':<40} {'graph':>10} {'xla':>10} {'xla/graph':>10}")
    for entry in registry.entries():
        if entry.name in ("ctc", "circle"):
            continue  # need other shapes; not hot paths for large tensors
        if entry.shapes == "sparse":
            tensors = {"y_true": labels, "y_pred": y_pred / y_pred.sum(-1, keepdims=True)}
        elif "categorical" in entry.name or entry.name == "kl_divergence":
            tensors = {"y_true": onehot, "y_pred": y_pred / y_pred.sum(-1, keepdims=True)}
        else:
            tensors = {"y_true": y_true, "y_pred": y_pred}
        times = []
        for evaluator in (plain, xla):
            plan = evaluator.planner.plan({"name": entry.name})
            try:
                evaluator.evaluate(plan, tensors, gradient=True)
            except Exception as exc:  # noqa: BLE001 - report and go on
                times.append(float("nan"))
                print(f"# {entry.name}: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                evaluator.evaluate(plan, tensors, gradient=True)
                samples.append(time.perf_counter() - start)
            times.append(statistics.median(samples))
        graph, jit = times
        print(f"{entry.name:<40} {graph * 1e3:>8.1f}ms {jit * 1e3:>8.1f}ms {jit / graph:>10.2f}")
    return 0


def small_requests(loss: str, count: int, rng) -> list[dict]:
    """Ragged requests of one loss: 1-128 rows of 10 float32 columns, with
    the gradient; Huber requests each with their own delta."""
    out = []
    for _ in range(count):
        rows = int(rng.integers(1, 129))
        y_pred = rng.uniform(0.05, 0.95, (rows, 10)).astype("float32")
        if loss == "categorical_crossentropy":
            y_true = np.eye(10, dtype="float32")[rng.integers(0, 10, rows)]
            y_pred /= y_pred.sum(-1, keepdims=True)
        else:
            y_true = rng.normal(size=(rows, 10)).astype("float32")
        params = {"delta": float(rng.uniform(0.5, 2.0))} if loss == "huber" else {}
        out.append(dict(spec={"name": loss, "params": params}, tensors={"y_true": y_true, "y_pred": y_pred}))
    return out


def small_worker(executor: str) -> int:
    """One executor set-up: reads ``loss side kind calls`` lines on stdin and
    answers each with the µs per request of that many calls, as JSON."""
    from lossd_server.evaluation import backend

    backend.configure_threads(None if executor == "inter0" else 1)  # lossd's default is 1
    import tensorflow as tf
    from tensorflow.python.eager import context

    if executor == "async":
        tf.config.experimental.set_synchronous_execution(False)
    if executor == "single":
        context.context().function_call_options.executor_type = "SINGLE_THREADED_EXECUTOR"
    from lossd_server.evaluation.batching import Batcher
    from lossd_server.evaluation.evaluator import Evaluator
    from lossd_server.losses import custom

    device = backend.select_device("cpu")
    registry = custom.full_registry(plugins=False)
    evaluators = {side: Evaluator(registry, device, xla="off" if side == "graph" else "auto", max_pending_compiles=64,
                                  compile_timeout=600) for side in SIDES}
    batchers = {side: Batcher(ev, max_delay_us=1, max_elements=1 << 16, max_requests=BATCH)
                for side, ev in evaluators.items()}
    rng = np.random.default_rng(0)
    work = {}
    for loss in SMALL_LOSSES:
        reqs = small_requests(loss, 64, rng)
        for side, ev in evaluators.items():
            calls = [(ev.planner.plan(r["spec"]), r["tensors"]) for r in reqs]
            batcher = batchers[side]
            batches = [[batcher._item(plan, tensors, None, "sum_over_batch_size", True)
                        for plan, tensors in calls[k:k + BATCH]] for k in range(0, len(calls), BATCH)]
            for _ in range(3):  # the first pass starts the compilations; later ones find them
                for plan, tensors in calls:
                    ev.evaluate(plan, tensors, gradient=True)
                for items in batches:
                    batcher._run(items)
                ev.wait_compiled(600)
            work[loss, side] = (ev, calls, batcher, batches)
    served = {side: (ev.buckets.calls if ev.buckets else 0) for side, ev in evaluators.items()}
    print(json.dumps({"ready": True, "bucketed_calls": served}), flush=True)
    for line in sys.stdin:
        loss, side, kind, count = line.split()
        ev, calls, batcher, batches = work[loss, side]
        before = ev.buckets.calls if ev.buckets else 0
        start, cpu = time.perf_counter(), time.process_time()
        if kind == "one":
            for k in range(int(count)):
                plan, tensors = calls[k % len(calls)]
                ev.evaluate(plan, tensors, gradient=True)
            done = int(count)
        else:
            rounds = max(1, int(count) // BATCH)
            for k in range(rounds):
                batcher._run(batches[k % len(batches)])
            done = rounds * BATCH
        wall, cpu = (time.perf_counter() - start) / done, (time.process_time() - cpu) / done
        bucketed = (ev.buckets.calls if ev.buckets else 0) - before
        print(json.dumps({"us": wall * 1e6, "cpu_us": cpu * 1e6, "bucketed": bucketed}), flush=True)
    return 0


def small(args) -> int:
    executors = args.executors.split(",")
    workers = {}
    for name in executors:
        workers[name] = subprocess.Popen([sys.executable, __file__, "--worker", name], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
    for name, proc in workers.items():
        ready = json.loads(proc.stdout.readline())
        print(f"# {name}: ready, bucketed calls while warming: {ready['bucketed_calls']}", flush=True)
    kinds = ("one", "batch")
    samples: dict[tuple, list[float]] = {}
    unbucketed = 0
    for block in range(args.blocks):
        order = executors if block % 2 == 0 else executors[::-1]
        for name in order:
            for loss in SMALL_LOSSES:
                for kind in kinds:
                    for side in (SIDES if block % 2 == 0 else SIDES[::-1]):
                        proc = workers[name]
                        proc.stdin.write(f"{loss} {side} {kind} {args.block_calls}\n")
                        proc.stdin.flush()
                        answer = json.loads(proc.stdout.readline())
                        samples.setdefault((name, loss, kind, side, "wall"), []).append(answer["us"])
                        samples.setdefault((name, loss, kind, side, "cpu"), []).append(answer["cpu_us"])
                        unbucketed += side == "xla" and answer["bucketed"] == 0
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    print(f"# bench/xla.py --small  {args.blocks} blocks of {args.block_calls} requests, in-process, "
          f"µs per request (median of blocks); xla blocks served by no bucket: {unbucketed}")
    for measure in ("cpu", "wall"):
        print(f"# {measure}: " + ("CPU time of the whole process (every TensorFlow thread)" if measure == "cpu"
                                  else "wall-clock time"))
        print(f"{'executor':<9} {'loss':<26} {'call':<6} {'graph':>8} {'xla':>8} {'xla/graph':>10} "
              f"{'graph/dflt':>11} {'xla/dflt':>9}")
        for name in executors:
            for loss in SMALL_LOSSES:
                for kind in kinds:
                    g, x, base_g, base_x = (statistics.median(samples[e, loss, kind, side, measure])
                                            for e, side in ((name, "graph"), (name, "xla"),
                                                            (executors[0], "graph"), (executors[0], "xla")))
                    print(f"{name:<9} {loss:<26} {kind:<6} {g:>8.1f} {x:>8.1f} {x / g:>10.2f} {g / base_g:>11.2f} "
                          f"{x / base_x:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
