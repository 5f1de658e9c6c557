"""Side-by-side benchmark of the shared-memory path (a benchmark, not a test).

One ``lossd serve`` process; in one run, in alternating blocks, it times
the same Evaluate (MSE, 1e7 float32 elements per tensor by default, with
the gradient) through:

  (g) ``lossd.Client(address)``: the tensors in the gRPC message, the
      gradient back in the response;
  (s) ``lossd.Client(address, shared_memory=True)``: the tensors in a
      shared-memory region, the gradient written back into it;
  (k) the same Keras loss and gradient under ``tf.function`` in this
      process, on tensors already in memory: what the server itself spends,
      with no transport at all (the floor of both paths);

and prints medians, input bytes per second (y_true + y_pred, as
bench/evaluate.py counts them) and the ratio s/g in bytes per second. The
result is checked equal on both paths before timing.

With ``--baseline-tree DIR``, a second ``lossd serve`` runs from another
checkout (its ``client`` and ``server`` folders on PYTHONPATH), e.g. the
tree before a change, and (g@base) and (s@base) join the same alternating
blocks, with the ratios (s)/(s@base) and (g)/(g@base) in calls per second.
The clients of both are this tree's (they speak to both servers alike).

Usage: python bench/shm.py [--elements 1e7] [--loss mse] [--no-gradient] [--quick] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import lossd  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate import free_port, process, timed_side_by_side, wait_ready  # noqa: E402

KERAS_CLASSES = {"mse": "MeanSquaredError", "huber": "Huber"}


def keras_anchor(loss: str, gradient: bool):
    import keras
    import tensorflow as tf

    loss_obj = keras.losses.get({"class_name": KERAS_CLASSES[loss], "config": {}})

    @tf.function
    def run(y_true, y_pred):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            value = loss_obj(y_true, y_pred)
        return value, (tape.gradient(value, y_pred) if gradient else value)

    def call(y_true, y_pred):
        value, grad = run(tf.constant(y_true), tf.constant(y_pred))
        return value.numpy(), grad.numpy()
    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", default="1e7", help="elements per tensor")
    parser.add_argument("--loss", default="mse", choices=sorted(KERAS_CLASSES))
    parser.add_argument("--no-gradient", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--baseline-tree", help="a checkout to run a second server from (its client and server)")
    args = parser.parse_args()

    import tensorflow as tf

    elements = int(float(args.elements))
    gradient = not args.no_gradient
    rng = np.random.default_rng(0)
    y_true = rng.normal(size=(elements // 10, 10)).astype("float32")
    y_pred = rng.normal(size=(elements // 10, 10)).astype("float32")
    nbytes = y_true.nbytes + y_pred.nbytes
    trees = {"": None}
    if args.baseline_tree:
        base = os.path.abspath(args.baseline_tree)
        trees["@base"] = {"PYTHONPATH": os.pathsep.join([os.path.join(base, "client"), os.path.join(base, "server")])}
    data_dir = os.path.join("/tmp", f"lossd-bench-shm-{os.getpid()}")
    iterations, blocks = (8, 4) if args.quick else (24, 6)
    print(f"# lossd bench/shm.py  tensorflow {tf.__version__}  cpus {os.cpu_count()}  loss {args.loss}  "
          f"elements {elements:,}  gradient {gradient}" + (f"  baseline {args.baseline_tree}" if args.baseline_tree
                                                              else ""))
    with contextlib.ExitStack() as stack:
        anchor = keras_anchor(args.loss, gradient)
        sides = {}
        reference = None
        for tree, env in trees.items():
            port = free_port()
            address = f"127.0.0.1:{port}"
            stack.enter_context(process(
                [sys.executable, "-m", "lossd.cli", "serve", "--port", str(port), "--metrics-port", str(free_port()),
                 "--data-dir", f"{data_dir}{tree}", "--log-level", "ERROR"],
                env=env, wait_for=lambda a=address: wait_ready(a)))
            grpc_client = stack.enter_context(lossd.Client(address, timeout=120))
            shm_client = stack.enter_context(lossd.Client(address, timeout=120, shared_memory=True))
            a = grpc_client.evaluate(args.loss, y_true, y_pred, gradient=gradient)
            b = shm_client.evaluate(args.loss, y_true, y_pred, gradient=gradient)
            if not shm_client.shared_memory_active:
                print(f"shared memory did not come up{tree}: the client fell back to gRPC")
                return 1
            reference = a if reference is None else reference
            for result in (a, b):  # both paths of both trees give the same answer
                assert np.array_equal(result.loss, reference.loss), (result.loss, reference.loss)
                assert gradient is False or np.array_equal(result.gradient, reference.gradient)
            sides[f"(g{tree}) gRPC"] = lambda c=grpc_client: c.evaluate(args.loss, y_true, y_pred, gradient=gradient)
            sides[f"(s{tree}) shared memory"] = \
                lambda c=shm_client: c.evaluate(args.loss, y_true, y_pred, gradient=gradient)
        sides["(k) Keras in process"] = lambda: anchor(y_true, y_pred)
        start = time.perf_counter()
        medians = dict(zip(sides, timed_side_by_side(list(sides.values()), iterations, blocks, warmup=2)))
        took = time.perf_counter() - start
    print(f"{'path':<28} {'median ms':>10} {'input MB/s':>11}")
    for name, seconds in medians.items():
        print(f"{name:<28} {seconds * 1e3:>10.1f} {nbytes / seconds / 1e6:>11.0f}")
    g, s, k = medians["(g) gRPC"], medians["(s) shared memory"], medians["(k) Keras in process"]
    print(f"s/g bytes per second: {g / s:.2f}x   (s) over the in-process floor (k): {(s - k) * 1e3:+.1f} ms")
    if args.baseline_tree:
        print(f"this tree over the baseline, calls per second: (s)/(s@base) "
              f"{medians['(s@base) shared memory'] / s:.2f}   (g)/(g@base) {medians['(g@base) gRPC'] / g:.2f}")
    print(f"# {iterations} calls per path in {blocks} alternating blocks, {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
