"""Eight concurrent near-maximum requests keep the server's peak RSS within
the in-flight budget plus a stated margin (issue 12, quotas). `lossd serve`
runs as a user types it, with a small LOSSD_MAX_INFLIGHT_BYTES; the driver
(tests/inflight_memory.py) is shared with bench/admission_memory.py, which
also runs lossd without the bound and a bare gRPC server as the anchor
(figures in the README and bench/RESULTS.md)."""
from __future__ import annotations

import sys

import pytest

from tests import inflight_memory

pytest.importorskip("tensorflow")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

MiB = inflight_memory.MiB
BUDGET = 64 * MiB
REQUEST = 60 * MiB  # near the largest the budget admits (larger is REQUEST_TOO_LARGE)
# What the budget does not cover: every request's message is received and
# parsed before its declared sizes can be read (gRPC holds its bytes, the
# parsed protobuf holds them again), eight at once here; plus allocator slack.
MARGIN = 8 * 2 * REQUEST + 128 * MiB


@pytest.mark.usefixtures("memory_heavy")  # never beside another such test (tests/conftest.py)
def test_eight_near_maximum_requests_stay_within_the_budget_plus_margin(tmp_path):
    with open(tmp_path / "server.log", "wb") as log:
        reading = inflight_memory.measure(tmp_path / "data", inflight_bytes=BUDGET, request_bytes=REQUEST,
                                          concurrent=8, log=log)
    print(f"baseline {reading.baseline_bytes / MiB:.0f} MiB, peak {reading.peak_bytes / MiB:.0f} MiB, growth "
          f"{reading.growth_bytes / MiB:.0f} MiB (bound {(BUDGET + MARGIN) / MiB:.0f} MiB); "
          f"admitted {reading.admitted}, refused {reading.refused}")
    assert reading.admitted >= 1
    assert set(reading.refused) <= {"QUEUE_FULL", "INFLIGHT_BYTES_FULL"}, reading.refused
    assert reading.growth_bytes <= BUDGET + MARGIN
