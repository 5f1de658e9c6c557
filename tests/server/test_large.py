"""A 1e8-element evaluation: the client switches to chunks by itself and the
server's memory stays bounded by a few chunks, not by the 800 MB of tensors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import lossd  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_bytes(pid: int) -> int:
    # VmHWM: the process's peak resident set size so far.
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to read peak memory")
def test_1e8_elements_with_bounded_server_memory(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--port", str(port), "--metrics-port", "",
                             "--data-dir", str(tmp_path), "--log-level", "WARNING", "--drain-seconds", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        rows, cols = 10_000_000, 10
        rng = np.random.default_rng(0)
        y_true = rng.standard_normal((rows, cols), dtype=np.float32)
        y_pred = rng.standard_normal((rows, cols), dtype=np.float32)
        with lossd.Client(f"127.0.0.1:{port}", timeout=300) as client:
            deadline = time.time() + 120
            while True:  # wait until the server answers
                try:
                    client.evaluate("mse", y_true[:2], y_pred[:2])
                    break
                except lossd.LossdError:
                    if time.time() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.5)
            # Warm up the chunked path on a tenth of the data (forced into chunks
            # by a smaller message limit), so allocator arenas and gRPC buffers
            # reach their working size; then ten times more data must not grow it.
            with lossd.Client(f"127.0.0.1:{port}", timeout=300, max_message_bytes=64 << 20) as small:
                small.evaluate("mse", y_true[: rows // 10], y_pred[: rows // 10])
            before = _peak_rss_bytes(proc.pid)
            result = client.evaluate("mse", y_true, y_pred)
            grown = _peak_rss_bytes(proc.pid) - before
        want = keras.losses.MeanSquaredError()(y_true, y_pred).numpy()
        np.testing.assert_allclose(result.loss, want, rtol=1e-5)
        tensors = y_true.nbytes + y_pred.nbytes
        # "A few chunks": gRPC may hold several received chunks in its buffers
        # while one is evaluated; eight chunks is a sixth of the tensors.
        limit = 8 * client.chunk_bytes
        assert grown < limit, (f"server peak memory grew by {grown / 2**20:.0f} MiB for "
                               f"{tensors / 2**20:.0f} MiB of tensors (limit {limit / 2**20:.0f} MiB)")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
