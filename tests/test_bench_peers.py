"""bench/peers.py's own pieces work without the peers installed: a quick run
of the sides that need no peer venv prints its tables with ratios, and the
process-tree CPU and memory readings it reports and guards with are real."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

from bench import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]

SIDES = ("echo", "sink", "tf", "lossd", "lossd-oip")


def test_quick_run_prints_every_side_with_ratios(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--quick", "--sides", ",".join(SIDES),
                           "--block-seconds", "0.3", "--peers-dir", str(tmp_path / "no-peers")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for side in ("tf", "lossd", "lossd-oip"):  # echo and sink answer no loss
        assert f"# {side}: small answers checked against Keras" in out
        assert f"# {side}: large answers checked against Keras" in out
    assert "WRONG" not in out
    tables = re.split(r"\n## ", out)[1:]
    assert [t.split(";")[0] for t in tables] == ["small load, concurrency 1, 2 blocks x 0.3 s per side",
                                                "small load, concurrency 8, 2 blocks x 0.3 s per side",
                                                "large MSE request, concurrency 1, 2 blocks x 0.3 s per side"]
    for table in tables:
        rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:] if line.strip()}
        assert list(rows) == list(SIDES)
        anchor = "sink" if table.startswith("large") else "echo"
        for side, cells in rows.items():
            assert len(cells) == 12, cells  # 4 figures, each with its ratio to the anchor and to lossd
            values = [float(c.replace(",", "")) for c in cells]
            assert all(v > 0 for v in values), (side, cells)
            # every figure over itself is 1.00: the ratios are computed, not printed blindly
            own = {anchor: slice(1, 12, 3), "lossd": slice(2, 12, 3)}.get(side)
            if own:
                assert cells[own] == ["1.00"] * 4, (side, cells)
    assert not (tmp_path / "no-peers").exists()  # nothing installed for these sides


def test_tree_cpu_counts_children(tmp_path):
    # A parent that starts a child burning about 0.5 s of CPU, and both stay alive.
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
              "while time.process_time() - t < 0.5: pass\\ntime.sleep(60)'])\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.time() + 30
        while peers.tree_cpu_seconds(parent.pid) < 0.5 and time.time() < deadline:
            time.sleep(0.1)
        assert len(peers.tree_pids(parent.pid)) == 2
        assert peers.tree_cpu_seconds(parent.pid) >= 0.5
    finally:
        os.killpg(parent.pid, 9)
        parent.wait()


def test_rss_guard_stops_a_server_over_its_bound():
    hog = subprocess.Popen([sys.executable, "-c", "import time\nx = bytearray(300 << 20)\ntime.sleep(60)"],
                           start_new_session=True)
    guard = peers.RssGuard({"hog": hog.pid}, 100 << 20)
    guard.start()
    try:
        assert hog.wait(30) == -9
        guard.join(5)
        assert guard.tripped.startswith("hog: ") and "over --max-rss-mib 100" in guard.tripped
    finally:
        guard.halt.set()
        if hog.poll() is None:
            hog.kill()
