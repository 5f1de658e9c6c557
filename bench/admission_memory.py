"""Peak server RSS under eight concurrent near-maximum Evaluate calls, with
the in-flight bound (LOSSD_MAX_INFLIGHT_BYTES = 64 MiB, requests of 60 MiB)
and without it (the anchor: a budget of 8 GiB, so all eight evaluate at
once), in alternating runs of ``lossd serve``. Prints each run's baseline,
peak and growth, and the median growth of each side.

The driver is ``tests/inflight_memory.py``, shared with
``tests/robustness/test_inflight_memory.py``.

Usage: python bench/admission_memory.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import inflight_memory  # noqa: E402

MiB = inflight_memory.MiB
SIDES = {"bounded (64 MiB)": 64 * MiB, "anchor (8 GiB)": 8192 * MiB}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    growth: dict[str, list[float]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for side, budget in SIDES.items():
                reading = inflight_memory.measure(pathlib.Path(tmp) / f"{round_}-{budget}", inflight_bytes=budget,
                                                  request_bytes=60 * MiB)
                growth[side].append(reading.growth_bytes / MiB)
                print(f"round {round_} {side}: baseline {reading.baseline_bytes / MiB:.0f} MiB, peak "
                      f"{reading.peak_bytes / MiB:.0f} MiB, growth {reading.growth_bytes / MiB:.0f} MiB; "
                      f"admitted {reading.admitted}, refused {reading.refused}", flush=True)
    for side, values in growth.items():
        print(f"{side}: median growth {statistics.median(values):.0f} MiB over {len(values)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
