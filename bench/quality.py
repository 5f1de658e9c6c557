"""Quality of real training jobs through a lossd server (a benchmark, not a test).

Starts ``lossd serve`` on a free loopback port with a fresh data directory,
then, through the client:

  * trains ``cnn`` on ``digits`` with the job defaults and prints its
    validation accuracy (the issue asks for at least 95 %);
  * trains the same ``cnn`` with ``loss="matrix_crossentropy"`` (the matrix
    kept as the job's state) and prints its validation accuracy beside the
    crossentropy's (issue 14 asks for at most 1 point less) and its final matrix;
  * trains ``vae`` on ``digits``, prints its first and last epoch loss, and
    saves 64 generated digits as a PNG grid (``bench/vae_digits.png``).

Usage: python bench/quality.py [--vae-epochs 60 (0: no vae)] [--out bench/vae_digits.png]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import lossd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-epochs", type=int, default=60)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "vae_digits.png"))
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--port", str(port),
                                   "--metrics-port", "", "--data-dir", data_dir, "--log-level", "WARNING"],
                                  stderr=subprocess.DEVNULL)
        try:
            with lossd.Client(f"127.0.0.1:{port}", timeout=3600) as client:
                deadline = time.time() + 120
                while True:
                    try:
                        client.losses(timeout=2)
                        break
                    except lossd.LossdError:
                        if time.time() > deadline:
                            raise
                        time.sleep(0.5)
                cnn = client.wait(client.create_job("cnn", "digits"), progress=False)
                metrics = cnn.progress["metrics"]
                print(f"cnn on digits (defaults: {cnn.spec['epochs']} epochs, batch {cnn.spec['batch_size']}): "
                      f"state {cnn.state}, val_accuracy {metrics.get('val_accuracy', float('nan')):.4f}")
                matrix = client.wait(client.create_job("cnn", "digits", loss="matrix_crossentropy"), progress=False)
                accuracy = matrix.progress["metrics"].get("val_accuracy", float("nan"))
                print(f"cnn on digits with matrix_crossentropy (defaults): state {matrix.state}, val_accuracy "
                      f"{accuracy:.4f} ({100 * (accuracy - metrics.get('val_accuracy', float('nan'))):+.2f} points "
                      "against crossentropy); its final matrix A (rows: true class, columns: predicted):")
                print(matrix.progress["loss_state"]["matrix"].round(3))
                if args.vae_epochs <= 0:
                    return 0
                vae = client.wait(client.create_job("vae", "digits", epochs=args.vae_epochs), progress=False)
                losses = [e.metrics["loss"] for e in client.watch(vae) if e.kind == "epoch"]
                print(f"vae on digits ({args.vae_epochs} epochs): state {vae.state}, loss {losses[0]:.3f} "
                      f"(epoch 1) -> {losses[-1]:.3f} (epoch {len(losses)})")
                images = client.generate(vae, 64, seed=1)
                lossd.save_image_grid(images, args.out, columns=8, scale=6)
                print(f"saved {len(images)} generated digits to {args.out}")
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
