"""Start-up of the thin client and the ``lossd`` command, as processes (a
benchmark, not a test).

In one run it times, each as a fresh process started by this script:

  (anchor) ``python -c pass``: the interpreter alone, none of our code;
  (deps)   ``python -c "import numpy, grpc"``: the two packages the thin
           client cannot do without, the floor under ``import lossd``;
  (import) ``python -c "import lossd"``;
  (help)   ``lossd --help``;
  (health) ``lossd health --address ADDRESS`` against a ``lossd serve`` this
           script starts first (and stops at the end).

The sides run in alternating blocks (anchor, deps, import, help, health,
anchor, ...), so a slow spell of this shared machine hits all of them alike.
It prints each side's median wall time and its excess over the anchor.
Goals (issue 24): import at most 150 ms, help and health at most 300 ms.

Usage: python bench/startup.py [--rounds 10] [--block 3] [--address HOST:PORT] [--baseline BIN_DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

LOSSD = str(pathlib.Path(sys.executable).with_name("lossd"))
GOALS_MS = {"import lossd": 150, "lossd --help": 300, "lossd health": 300}


def sides(address: str, baseline: str | None = None) -> dict[str, list[str]]:
    found = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import numpy, grpc": [sys.executable, "-c", "import numpy, grpc"],
        "import lossd": [sys.executable, "-c", "import lossd"],
        "lossd --help": [LOSSD, "--help"],
        "lossd health": [LOSSD, "health", "--address", address, "--timeout", "10"],
    }
    if baseline:  # another install (its bin folder), e.g. the code before a change, in the same blocks
        python, lossd = str(pathlib.Path(baseline, "python")), str(pathlib.Path(baseline, "lossd"))
        found.update({
            "import lossd [base]": [python, "-c", "import lossd"],
            "lossd --help [base]": [lossd, "--help"],
            "lossd health [base]": [lossd, "health", "--address", address, "--timeout", "10"],
        })
    return found


def timed(cmd: list[str]) -> float:
    """Seconds from start to exit of ``cmd``; raises if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return elapsed


def start_server(folder: pathlib.Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen([LOSSD, "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "off",
                             "--data-dir", str(folder / "data"), "--warmup", "false", "--grace-seconds", "0"],
                            stdout=open(folder / "serve.log", "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.monotonic() + 600  # TensorFlow's import alone takes minutes on a loaded machine
    while subprocess.run([LOSSD, "health", "--address", address, "--timeout", "2"],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"lossd serve did not start (exit {proc.poll()}):\n{(folder / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, address


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    parser.add_argument("--block", type=int, default=3, help="runs of each side per round")
    parser.add_argument("--address", help="a running server for `lossd health` (default: start one)")
    parser.add_argument("--baseline", metavar="BIN_DIR",
                        help="also time `import lossd`, `--help` and `health` of the install whose python and "
                             "lossd are in BIN_DIR (another venv: the code before a change), in the same blocks")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lossd-startup-") as tmp:
        proc = None
        address = args.address
        if address is None:
            proc, address = start_server(pathlib.Path(tmp))
        try:
            commands = sides(address, args.baseline)
            times: dict[str, list[float]] = {name: [] for name in commands}
            for cmd in commands.values():  # one untimed run each: the page cache, .pyc files
                timed(cmd)
            for _ in range(args.rounds):
                for name, cmd in commands.items():
                    times[name] += [timed(cmd) for _ in range(args.block)]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)

    load = os.getloadavg()
    print(f"{args.rounds} rounds x {args.block} runs per side, alternating; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    anchor = statistics.median(times["python -c pass"])
    print(f"{'side':<22}{'median ms':>10}{'over pass':>11}{'goal ms':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        goal = GOALS_MS.get(name)
        verdict = "" if goal is None else f"{goal:>9}  {'met' if median * 1e3 <= goal else 'MISSED'}"
        print(f"{name:<22}{median * 1e3:>10.1f}{(median - anchor) * 1e3:>11.1f}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
