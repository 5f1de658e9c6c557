"""Issue 26's example: the loss of a deployed model, live, with late labels.

A ``cnn`` trained on the built-in digits is served with ``Predict``. Its
predictions on clean digits are observed, labelled later, and frozen as the
monitor's reference. Then the camera changes: the same model sees the digits
rotated a quarter turn with noise on top. Their predictions are observed,
their labels come later, and the monitor's short window drifts away from the
reference: its KS p-value falls below the 0.001 of the LossdMonitorDrift
alert (deploy/prometheus/alerts.yml).

Usage (against a running ``lossd serve``):

    python examples/monitor_digits.py [--address localhost:50051] [--job jobs/ID]

Without ``--job`` it trains a cnn first (8 epochs, about a minute on a CPU).
tests/server/training/test_monitor_digits.py runs ``run`` as written.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import lossd

MONITOR = "digits-cnn"
SHORT, LONG = 10, 3600  # seconds: the window that sees the change, and the hour
DRIFT_P_VALUE = 0.001   # LossdMonitorDrift's threshold


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as the server trains on them: N x 8 x 8 x 1 in [0, 1], labels 0-9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images.astype(np.float32) / 16.0)[..., None], data.target.astype(np.float32)


def shifted(images: np.ndarray, rng) -> np.ndarray:
    """What a new camera sends: a quarter turn, and noise."""
    turned = np.rot90(images, k=1, axes=(1, 2))
    return np.clip(turned + rng.normal(scale=0.15, size=turned.shape), 0.0, 1.0).astype(np.float32)


def serve_and_observe(client: lossd.Client, job, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """Predictions as a serving path makes them, observed by request id; the labels arrive afterwards."""
    ids = [f"{prefix}-{i}" for i in range(len(images))]
    for start in range(0, len(images), 128):
        batch = slice(start, start + 128)
        client.observe(MONITOR, ids[batch], client.predict(job, images[batch]), segments={"model_version": "v1"})
    for start in range(0, len(images), 256):  # later, in other batches
        batch = slice(start, start + 256)
        client.label(MONITOR, ids[batch], labels[batch])


def run(client: lossd.Client, job, seed: int = 0) -> lossd.Monitor:
    """The example's steps; returns the monitor after the change."""
    rng = np.random.default_rng(seed)
    x, y = digits()
    order = rng.permutation(len(x))
    before, after = order[:600], order[600:1200]
    client.create_monitor(MONITOR, "sparse_categorical_crossentropy", [SHORT, LONG],
                          segment_keys=["model_version"], max_loss=1.5)
    serve_and_observe(client, job, x[before], y[before], "clean")
    client.capture_reference(MONITOR, SHORT)  # the model as it should behave
    time.sleep(SHORT + 1)  # the short window empties
    serve_and_observe(client, job, shifted(x[after], rng), y[after], "shifted")
    return client.monitor(MONITOR)


def main() -> int:
    parser = argparse.ArgumentParser(description="Monitor a digits cnn through a change of camera.")
    parser.add_argument("--address", default="localhost:50051")
    parser.add_argument("--job", help="a finished cnn job on digits [train one]")
    args = parser.parse_args()
    with lossd.Client(args.address, timeout=600) as client:
        job = args.job or client.wait(client.create_job("cnn", "digits", epochs=8), progress=True)
        monitor = run(client, job)
        short = monitor.window(SHORT)
        print(f"{MONITOR}: mean loss {short.mean_loss:.3f} (reference window {monitor.window(LONG).mean_loss:.3f} "
              f"over the hour), drift p-value {short.drift['p_value']:.2g}: "
              f"{'LossdMonitorDrift fires' if short.drift['p_value'] < DRIFT_P_VALUE else 'no drift'}")
        client.delete_monitor(MONITOR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
