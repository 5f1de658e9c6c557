"""What a monitor reports from its per-sample losses: the summary of a
window (count, mean, percentiles, labelled fraction, label delay) and the
drift from the reference, a two-sample Kolmogorov-Smirnov test.

Plain numpy, no scipy (not a dependency of the server): the KS statistic
is exact, its p-value the asymptotic Kolmogorov distribution with
Stephens' small-sample correction (as in Numerical Recipes' ``kstwo``).
For equal samples of 30 to 100 losses it lies between the exact
P(D >= d + 1/n) and P(D >= d) (tests/server/monitors/test_stats.py), up to
0.06 below the latter at 30 losses a side, less with more.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

# The terms of the Kolmogorov series summed at most; they shrink as
# exp(-2 j^2 lambda^2), so 100 reach double precision for any lambda where
# the series is used (below 0.2 the p-value is 1 to 7 digits: see ks_p_value).
_SERIES_TERMS = 100
PERCENTILES = (50.0, 90.0, 99.0)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample KS statistic: the largest distance between the
    empirical distribution functions of ``a`` and ``b`` (1-D, non-empty)."""
    a = np.sort(np.asarray(a, np.float64))
    b = np.sort(np.asarray(b, np.float64))
    points = np.concatenate([a, b])
    # Both functions jump only at the samples, and are right-continuous: the
    # supremum is reached at one of them, evaluated after its jump.
    fa = np.searchsorted(a, points, side="right") / a.size
    fb = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


def kolmogorov_q(lam: float) -> float:
    """Q_KS(lam) = 2 * sum_{j>=1} (-1)^(j-1) exp(-2 j^2 lam^2): the
    probability that the Kolmogorov distribution exceeds ``lam``."""
    if lam < 0.2:  # the series converges too slowly here, and Q is 1 - O(1e-9)
        return 1.0
    total, sign = 0.0, 1.0
    for j in range(1, _SERIES_TERMS + 1):
        term = sign * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-16 * max(abs(total), 1e-300):
            break
        sign = -sign
    return min(1.0, max(0.0, 2.0 * total))


def ks_p_value(statistic: float, n: int, m: int) -> float:
    """The asymptotic p-value of a two-sample KS ``statistic`` between
    samples of ``n`` and ``m`` values."""
    effective = math.sqrt(n * m / (n + m))
    return kolmogorov_q((effective + 0.12 + 0.11 / effective) * statistic)


@dataclasses.dataclass(frozen=True)
class Drift:
    statistic: float
    p_value: float
    reference_count: int


def drift(losses: np.ndarray, reference: np.ndarray) -> Drift:
    """The KS test of ``losses`` against ``reference``; NaN where either is empty."""
    if losses.size == 0 or reference.size == 0:
        return Drift(math.nan, math.nan, int(reference.size))
    d = ks_statistic(losses, reference)
    return Drift(d, ks_p_value(d, losses.size, reference.size), int(reference.size))


def history(times: np.ndarray, losses: np.ndarray, at: np.ndarray, windows) -> list[tuple]:
    """Each window's mean loss as it stood at each time of ``at``: the losses
    whose ``times`` lie in ``(t - window, t]``; ``(t, window, count, mean)``
    per time and window (mean NaN with no losses, or with a NaN loss among
    them, as the window's own mean would be)."""
    order = np.argsort(times, kind="stable")
    times, losses = times[order], losses[order].astype(np.float64)
    nan = np.isnan(losses)
    sums = np.concatenate([[0.0], np.cumsum(np.where(nan, 0.0, losses))])
    nans = np.concatenate([[0], np.cumsum(nan)])
    out = []
    for t in at:
        end = np.searchsorted(times, t, side="right")
        for window in windows:
            start = np.searchsorted(times, t - window, side="right")
            count = int(end - start)
            mean = math.nan if count == 0 or nans[end] > nans[start] else float((sums[end] - sums[start]) / count)
            out.append((float(t), float(window), count, mean))
    return out


@dataclasses.dataclass(frozen=True)
class Summary:
    """One window of one segment (``WindowReport`` on the wire)."""

    window: float
    segment: str
    count: int
    mean: float
    percentiles: tuple[float, float, float]  # PERCENTILES of the losses
    labelled_fraction: float
    median_label_delay: float
    drift: Optional[Drift] = None


def summarize(window: float, segment: str, losses: np.ndarray, delays: np.ndarray, observed: int,
              labelled: int, reference: Optional[np.ndarray]) -> Summary:
    """The summary of a window's pairs.

    Args:
        losses: The per-sample losses of the pairs completed within the window.
        delays: Their label delays in seconds (a label that came first: 0).
        observed: Predictions observed within the window: paired, pending
            or expired.
        labelled: Of them, those paired.
        reference: The reference losses of the segment; None before one is captured.
    """
    nan = math.nan
    if losses.size:
        mean = float(np.mean(losses, dtype=np.float64))
        percentiles = tuple(float(p) for p in np.percentile(losses.astype(np.float64), PERCENTILES))
        delay = float(np.median(delays))
    else:
        mean, percentiles, delay = nan, (nan, nan, nan), nan
    return Summary(window, segment, int(losses.size), mean, percentiles,
                   labelled / observed if observed else nan, delay,
                   drift(losses, reference) if reference is not None else None)
