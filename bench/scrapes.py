"""What scraping ``/metrics`` costs evaluation (a benchmark, not a test).

Two lossd servers run side by side, one rendering ``/metrics`` on every
scrape (``--metrics-cache-seconds 0``, as before issue 11) and one serving a
rendering at most one second old (the default). Small Evaluate calls (MSE on
64x10 float32) alternate between them in blocks, first with nobody scraping,
then while a separate process scrapes each server's ``/metrics`` from 16
threads without pause. It prints the median Evaluate time of each server in
each phase, and how much the scrapers slowed each one down.

Usage: python bench/scrapes.py [--scrapers 16] [--blocks 6] [--block 300]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import threading
import time
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import lossd  # noqa: E402
from evaluate import free_port, process, wait_ready  # noqa: E402


def scrape_forever(urls: list[str], threads: int, stop) -> None:
    """Scrapes every url from ``threads`` threads each until ``stop`` is set."""
    def loop(url):
        while not stop.is_set():
            with urllib.request.urlopen(url, timeout=30) as response:
                response.read()

    workers = [threading.Thread(target=loop, args=(url,), daemon=True) for url in urls for _ in range(threads)]
    for w in workers:
        w.start()
    stop.wait()


def timed_blocks(clients: dict, y_true, y_pred, blocks: int, block: int) -> dict[str, float]:
    samples = {label: [] for label in clients}
    for _ in range(blocks):
        for label, client in clients.items():
            for _ in range(block):
                start = time.perf_counter()
                client.evaluate("mse", y_true, y_pred)
                samples[label].append(time.perf_counter() - start)
    return {label: statistics.median(s) for label, s in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scrapers", type=int, default=16, help="scraping threads per server")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--block", type=int, default=300, help="calls per block")
    args = parser.parse_args()

    servers = {}
    with contextlib.ExitStack() as stack:
        for label, cache in (("cached", "1"), ("uncached", "0")):
            port, metrics_port = free_port(), free_port()
            cmd = [sys.executable, "-m", "lossd.cli", "serve", "--port", str(port), "--metrics-port",
                   str(metrics_port), "--metrics-cache-seconds", cache, "--data-dir",
                   f"/tmp/lossd-scrapes-{os.getpid()}-{label}", "--log-level", "WARNING"]
            stack.enter_context(process(cmd, wait_for=lambda p=port: wait_ready(f"127.0.0.1:{p}")))
            client = stack.enter_context(lossd.Client(f"127.0.0.1:{port}"))
            servers[label] = (client, f"http://127.0.0.1:{metrics_port}/metrics")
        clients = {label: client for label, (client, _) in servers.items()}
        rng = np.random.default_rng(0)
        y_true, y_pred = rng.random((64, 10), dtype=np.float32), rng.random((64, 10), dtype=np.float32)
        for client in clients.values():
            for _ in range(200):
                client.evaluate("mse", y_true, y_pred)

        quiet = timed_blocks(clients, y_true, y_pred, args.blocks, args.block)
        stop = multiprocessing.Event()
        scraper = multiprocessing.Process(target=scrape_forever,
                                          args=([url for _, url in servers.values()], args.scrapers, stop))
        scraper.start()
        time.sleep(2)
        try:
            scraped = timed_blocks(clients, y_true, y_pred, args.blocks, args.block)
        finally:
            stop.set()
            scraper.join(10)
            if scraper.is_alive():
                scraper.kill()

    print(f"# lossd bench/scrapes.py  cpus {os.cpu_count()}  {args.scrapers} scraping threads per server, "
          f"{args.blocks} blocks of {args.block} calls")
    print(f"{'server':<10} {'p50 quiet':>10} {'p50 scraped':>12} {'scraped/quiet':>14}")
    for label in clients:
        print(f"{label:<10} {quiet[label] * 1e3:>7.2f} ms {scraped[label] * 1e3:>9.2f} ms "
              f"{scraped[label] / quiet[label]:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
