"""Measures XLA (``jit_compile=True``) against a plain compiled graph for every
Keras loss, through lossd's evaluator in-process (a benchmark, not a test).

The losses XLA makes faster by a clear margin go into
``lossd_server.app.XLA_LOSSES``, which ``LOSSD_JIT_COMPILE=auto`` uses.

Usage: python bench/xla.py [--elements 1e7] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=float, default=1e7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from lossd_server.evaluation import backend
    from lossd_server.evaluation.evaluator import Evaluator
    from lossd_server.losses.registry import default_registry

    registry = default_registry()
    device = backend.select_device()
    plain = Evaluator(registry, device, jit_compile="off")
    xla = Evaluator(registry, device, jit_compile="on")
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


if __name__ == "__main__":
    sys.exit(main())
