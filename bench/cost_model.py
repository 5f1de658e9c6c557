"""Calibrates the cost model (``lossd_server.losses.cost``) against what
evaluations really take here: for each case, the model's estimate (work in
cost units, memory in bytes) beside the CPU time and the peak RSS growth of
evaluating it through the server's own evaluator (the compiled program and
its direct call, as Evaluate runs it), each case in a fresh process so the
allocator holds nothing from another.

A cost unit is meant to be about one nanosecond of one core of the machine
the model was calibrated on, so ``ns/unit`` should be near 1 for every loss
(CPU time counts every core TensorFlow uses); ``rss/estimate`` should be at
most about 1 (the estimate bounds the peak; the allocator may keep less).

    .venv/bin/python bench/cost_model.py [--repeat 3] [--only ctc,circle]

Prints one row per case; docs/limits.md records a run.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_LIBC = ctypes.CDLL("libc.so.6")
rng = np.random.default_rng(0)


def _probs(shape, dtype="float32"):
    x = rng.random(shape, dtype=np.float32) + 0.1
    return (x / x.sum(-1, keepdims=True)).astype(dtype)


def _unit(shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cases():
    yield "mse 1000x1000", {"name": "mse"}, lambda: (_probs((1000, 1000)), _probs((1000, 1000)))
    yield "cce 2000x1000", {"name": "categorical_crossentropy"}, lambda: (_probs((2000, 1000)), _probs((2000, 1000)))
    yield "expression 1000x1000", {"expression": "mean(square(y_true - y_pred) + abs(y_true - y_pred))"}, \
        lambda: (_probs((1000, 1000)), _probs((1000, 1000)))
    yield "circle B=2048 D=64", {"name": "circle"}, \
        lambda: (rng.integers(0, 50, 2048).astype(np.int32), _unit((2048, 64)))
    yield "circle B=4096 D=16", {"name": "circle"}, \
        lambda: (rng.integers(0, 50, 4096).astype(np.int32), _unit((4096, 16)))
    yield "ctc B=8 T=200 L=50 C=30", {"name": "ctc"}, \
        lambda: (rng.integers(1, 30, (8, 50)).astype(np.int32), rng.standard_normal((8, 200, 30), dtype=np.float32))
    yield "ctc B=1 T=500 L=200 C=3", {"name": "ctc"}, \
        lambda: (rng.integers(1, 3, (1, 200)).astype(np.int32), rng.standard_normal((1, 500, 3), dtype=np.float32))
    yield "matrix C=2000 B=64", {"name": "matrix_crossentropy"}, \
        lambda: (np.eye(2000, dtype=np.float32)[rng.integers(0, 2000, 64)], _probs((64, 2000)))
    yield "matrix C=4000 B=16", {"name": "matrix_crossentropy"}, \
        lambda: (np.eye(4000, dtype=np.float32)[rng.integers(0, 4000, 16)], _probs((16, 4000)))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(label: str, gradient: bool, repeat: int) -> str:
    """One case in this (fresh) process: its program compiled on a one-row
    input of the same signature, then the peak RSS growth of its first
    evaluation (the allocator holds nothing of an earlier one yet), then
    the best CPU time of ``repeat`` more."""
    from lossd_server.evaluation import backend
    from lossd_server.evaluation.evaluator import Evaluator
    from lossd_server.losses import custom

    evaluator = Evaluator(custom.full_registry(plugins=False), backend.select_device("cpu"),
                          expression_compiler=custom.inline_entry, compile_timeout=600)
    _, spec, make = next(c for c in cases() if c[0] == label)
    y_true, y_pred = make()
    plan = evaluator.planner.plan(spec)
    tensors = {"y_true": y_true, "y_pred": y_pred}
    cost = evaluator.check_cost(plan, {k: v.shape for k, v in tensors.items()}, y_pred.dtype.itemsize, gradient)
    evaluator.evaluate(plan, {k: v[:2] for k, v in tensors.items()}, gradient=gradient)  # compiles
    _LIBC.malloc_trim(0)
    base = _rss_kib("VmRSS")
    _reset_peak()
    evaluator.evaluate(plan, tensors, gradient=gradient)
    grown = max(0, _rss_kib("VmHWM") - base) / 1024
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        evaluator.evaluate(plan, tensors, gradient=gradient)
        best = min(best, time.process_time() - start)
    estimate = cost.memory / 2 ** 20
    return (f"{label:28} {'yes' if gradient else 'no':>4} {cost.work:9.3g} {best:8.3f} "
            f"{best * 1e9 / cost.work:8.2f} {estimate:8.0f} {grown:8.0f} {grown / estimate:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated substrings of case labels")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # a child process: one case
    parser.add_argument("--gradient", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(measure(args.case, args.gradient, args.repeat), flush=True)
        return
    print(f"{'case':28} {'grad':>4} {'units':>9} {'cpu s':>8} {'ns/unit':>8} {'est MiB':>8} {'rss MiB':>8} "
          f"{'rss/est':>7}", flush=True)
    wanted = [w for w in args.only.split(",") if w]
    for label, _, _ in cases():
        if wanted and not any(w in label for w in wanted):
            continue
        for gradient in (False, True):
            command = [sys.executable, __file__, "--case", label, "--repeat", str(args.repeat)]
            done = subprocess.run(command + (["--gradient"] if gradient else []), capture_output=True, text=True)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or ["no output"]
                print(f"{label:28} {'yes' if gradient else 'no':>4} failed (exit {done.returncode}): {lines[-1]}")
                continue
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
