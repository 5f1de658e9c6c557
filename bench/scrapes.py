"""What abusing ``/metrics`` costs evaluation (a benchmark, not a test).

Each side is a ``lossd serve`` process: ``lossd`` runs this source tree,
and with ``--baseline SRC`` a second side runs the source tree at SRC (for
example a checkout of an older commit) the same way. Client threads in this
process call Evaluate (MSE on 64x10 float32) without pause in blocks of
``--seconds``; the blocks alternate between the sides, and for each side
between quiet and attacked, so a slow spell of this shared machine hits every
column alike. A separate attacker process attacks only the side being timed:

- ``--attack scrape``: ``--scrapers`` threads scrape ``/metrics`` without pause
  (from 127.0.0.2, another address than this process's valid scrapes);
- ``--attack password``: they send a wrong basic-auth password without pause,
  while a "prometheus" thread scrapes with the right one every 0.25 s and the
  users file is re-read (touched) every 2 s; the valid scrapes' p50 and
  worst latency are printed.

It prints each side's Evaluate requests/s quiet and attacked, their ratio,
and the attacker's answered requests/s (with a password, how many of its
guesses the server hashed: its 401s; a refused guess is 429); and, steadier
than requests/s on a loaded machine, the server process's CPU (from /proc)
beyond what its Evaluate requests took in the quiet blocks: the cores the
attack costs the server. Each side's blocks run quiet first in even rounds
and attacked first in odd ones, and each attacked block ends when the
attack's queued requests are answered.

Usage: python bench/scrapes.py [--attack scrape|password] [--scrapers 32] [--rounds 4] [--seconds 3]
                               [--clients 4] [--baseline SRC]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import multiprocessing
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import lossd  # noqa: E402
from evaluate import free_port, process, wait_ready  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def attack_forever(urls: list[str], threads: int, target, answered, password: str | None, stop, go, busy,
                   hashed) -> None:
    """Requests ``urls[target.value]`` from ``threads`` threads without pause
    while ``go`` is set (blocked on it, using no CPU, while it is not) until
    ``stop`` is set, counting answers in ``answered``. With ``password`` each
    request carries a wrong one for the user ``prometheus``. ``busy`` counts
    the requests in flight, ``hashed`` the 401 answers (a wrong password the
    server hashed; a refused one is 429)."""
    headers = {}
    if password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"prometheus:{password}x".encode()).decode()

    def loop():
        while not stop.is_set():
            # Waiting on the event, not polling: 32 threads polling every 10 ms
            # took CPU from the quiet blocks' Evaluate (attacked/quiet came out
            # above 1 on the loaded machine).
            if not go.wait(0.5):
                continue
            index = target.value
            if index < 0:
                continue
            url = urllib.parse.urlsplit(urls[index])
            with busy.get_lock():
                busy.value += 1
            # From 127.0.0.2: another host than the valid scraper's 127.0.0.1, as an attacker would be.
            connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30,
                                                    source_address=("127.0.0.2", 0))
            try:
                connection.request("GET", url.path, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status == 401:
                    with hashed.get_lock():
                        hashed.value += 1
            except OSError:  # a connection the server closed at once (its queue was full)
                continue
            finally:
                connection.close()
                with busy.get_lock():
                    busy.value -= 1
            with answered.get_lock():
                answered.value += 1

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    stop.wait()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process, its threads together."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def evaluate_block(client, y_true, y_pred, clients: int, seconds: float) -> float:
    """Evaluate requests/s of ``clients`` threads calling without pause for ``seconds``."""
    done = [0] * clients
    end = time.perf_counter() + seconds

    def loop(i):
        while time.perf_counter() < end:
            client.evaluate("mse", y_true, y_pred)
            done[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def valid_scrapes(url: str, password: str, users_file: pathlib.Path, stop: threading.Event,
                  latencies: list[float]) -> None:
    """Scrapes with the right password every 0.25 s, touching the users file
    every 2 s so the server re-reads it."""
    headers = {"Authorization": "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()}
    touched = time.monotonic()
    while not stop.wait(0.25):
        if time.monotonic() - touched > 2:
            users_file.write_text(users_file.read_text())
            touched = time.monotonic()
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
                response.read()
            latencies.append(time.perf_counter() - start)
        except OSError as error:
            latencies.append(float("inf"))
            print(f"# a valid scrape failed: {error}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attack", choices=("scrape", "password"), default="scrape")
    parser.add_argument("--scrapers", type=int, default=32, help="attacking threads")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of (quiet, attacked) blocks per side")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per block")
    parser.add_argument("--clients", type=int, default=4, help="Evaluate client threads")
    parser.add_argument("--baseline", metavar="SRC", help="a source tree (with client/ and server/) to run as a "
                                                          "second side, e.g. a checkout of an older commit")
    args = parser.parse_args()

    sides = {"lossd": ROOT} | ({"baseline": pathlib.Path(args.baseline).resolve()} if args.baseline else {})
    folder = pathlib.Path(tempfile.mkdtemp(prefix="lossd-scrapes-"))
    users_file = folder / "metrics-users"
    password = None
    if args.attack == "password":
        made = subprocess.run([sys.executable, "-m", "lossd.cli", "metrics-auth", "create", "prometheus",
                               "--file", str(users_file)], capture_output=True, text=True, check=True)
        password = made.stdout.strip()
    servers, pids = {}, {}
    with contextlib.ExitStack() as stack:
        for label, src in sides.items():
            port, metrics_port = free_port(), free_port()
            env = {"PYTHONPATH": f"{src / 'client'}{os.pathsep}{src / 'server'}"}
            cmd = [sys.executable, "-m", "lossd.cli", "serve", "--port", str(port), "--metrics-port",
                   str(metrics_port), "--data-dir", str(folder / label), "--log-level", "WARNING"]
            if password is not None:
                cmd += ["--metrics-basic-auth-file", str(users_file)]
            server = stack.enter_context(process(cmd, env=env, wait_for=lambda p=port: wait_ready(f"127.0.0.1:{p}")))
            client = stack.enter_context(lossd.Client(f"127.0.0.1:{port}"))
            servers[label] = (client, f"http://127.0.0.1:{metrics_port}/metrics")
            pids[label] = server.pid
        labels = list(servers)
        rng = np.random.default_rng(0)
        y_true, y_pred = rng.random((64, 10), dtype=np.float32), rng.random((64, 10), dtype=np.float32)
        for client, _ in servers.values():
            for _ in range(20):
                client.evaluate("mse", y_true, y_pred)  # compiled before the threads start
            evaluate_block(client, y_true, y_pred, args.clients, 1.0)

        target, answered = multiprocessing.Value("i", -1), multiprocessing.Value("l", 0)
        stop, go, busy = multiprocessing.Event(), multiprocessing.Event(), multiprocessing.Value("i", 0)
        hashed = multiprocessing.Value("l", 0)
        attacker = multiprocessing.Process(target=attack_forever, args=(
            [url for _, url in servers.values()], args.scrapers, target, answered, password, stop, go, busy,
            hashed))
        attacker.start()
        rps = {(label, phase): [] for label in labels for phase in ("quiet", "attacked")}
        answers = {label: [] for label in labels}
        hashes = dict.fromkeys(labels, 0)  # wrong passwords the server hashed (401s) during timed blocks
        latencies = {label: [] for label in labels}
        # (requests, seconds, server CPU seconds) of each block
        blocks = {(label, phase): [] for label in labels for phase in ("quiet", "attacked")}

        def timed_block(label: str, phase: str) -> None:
            client = servers[label][0]
            cpu, start = cpu_seconds(pids[label]), time.perf_counter()
            rate = evaluate_block(client, y_true, y_pred, args.clients, args.seconds)
            seconds = time.perf_counter() - start
            rps[label, phase].append(rate)
            blocks[label, phase].append((rate * seconds, seconds, cpu_seconds(pids[label]) - cpu))

        try:
            def attacked_block(index: int, label: str) -> None:
                url = servers[label][1]
                target.value = index
                go.set()
                time.sleep(0.5)  # the attack under way
                checker_stop = threading.Event()
                checker = threading.Thread(target=valid_scrapes, args=(
                    url, password, users_file, checker_stop, latencies[label])) if password else None
                if checker:
                    checker.start()
                before, hashed_before, start = answered.value, hashed.value, time.perf_counter()
                timed_block(label, "attacked")
                answers[label].append((answered.value - before) / (time.perf_counter() - start))
                hashes[label] += hashed.value - hashed_before
                go.clear()
                target.value = -1
                if checker:
                    checker_stop.set()
                    checker.join()
                # The attack's queued requests drained (32 of them take 3 s at 10 a second), or
                # they would be answered during the next block.
                drained = time.monotonic() + 15
                while busy.value > 0 and time.monotonic() < drained:
                    time.sleep(0.05)

            for round_ in range(args.rounds):
                for index, label in enumerate(labels):
                    # Quiet first in even rounds, attacked first in odd ones: the first block after a
                    # switch of sides ran slower (1.2-1.5x fewer requests/s here, quiet or not).
                    if round_ % 2 == 0:
                        timed_block(label, "quiet")
                        attacked_block(index, label)
                    else:
                        attacked_block(index, label)
                        timed_block(label, "quiet")
        finally:
            stop.set()
            attacker.join(10)
            if attacker.is_alive():
                attacker.kill()

    print(f"# lossd bench/scrapes.py --attack {args.attack}  cpus {os.cpu_count()}  {args.scrapers} attacking "
          f"threads, {args.clients} Evaluate threads, {args.rounds} rounds of {args.seconds:g} s blocks")
    print(f"{'side':<10} {'quiet req/s':>12} {'attacked req/s':>15} {'attacked/quiet':>15} {'attack answers/s':>17}"
          + f" {'server CPU ms/req quiet':>24} {'attack CPU (cores)':>19}"
          + (f" {'hashed (401)':>13} {'valid scrape p50':>17} {'max':>8}" if password else ""))
    for label in labels:
        quiet, attacked = statistics.median(rps[label, "quiet"]), statistics.median(rps[label, "attacked"])
        per_request = sum(c for _, _, c in blocks[label, "quiet"]) / sum(n for n, _, _ in blocks[label, "quiet"])
        # The server's CPU in each attacked block beyond its Evaluate requests' (at the quiet cost per request).
        extra = statistics.median((c - n * per_request) / s for n, s, c in blocks[label, "attacked"])
        line = (f"{label:<10} {quiet:>12.0f} {attacked:>15.0f} {attacked / quiet:>15.2f} "
                f"{statistics.median(answers[label]):>17.0f} {per_request * 1e3:>24.2f} {extra:>19.3f}")
        if password:
            valid = latencies[label] or [float("nan")]
            line += f" {hashes[label]:>13} {statistics.median(valid) * 1e3:>14.1f} ms {max(valid):>6.2f} s"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
