"""The drift test of monitors (``lossd_server.monitors.stats``), against
what is derived here independently: the KS statistic by its definition
(counting, at every sample, the values at or below it), the Kolmogorov
distribution by its other series (the theta-function form) and by the
textbook critical values, and the p-value by the exact two-sample
distribution of equal samples (counting lattice paths)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lossd_server.monitors import stats

samples = st.lists(st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([0.0, 1.0, 2.0]), min_size=1,
                   max_size=40)


def _definition(a, b) -> float:
    """sup |F_a - F_b| by counting: both are step functions that change only at the samples."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return max(abs(np.sum(a <= x) / a.size - np.sum(b <= x) / b.size) for x in np.concatenate([a, b]))


@settings(max_examples=200, deadline=None)
@given(samples, samples)
def test_ks_statistic_is_its_definition(a, b):
    d = stats.ks_statistic(np.array(a), np.array(b))
    assert d == pytest.approx(_definition(a, b), abs=1e-12)
    assert 0.0 <= d <= 1.0
    assert stats.ks_statistic(np.array(b), np.array(a)) == d  # symmetric


@settings(max_examples=100, deadline=None)
@given(samples)
def test_a_sample_does_not_drift_from_itself(a):
    d = stats.ks_statistic(np.array(a), np.array(a))
    assert d == 0.0
    assert stats.ks_p_value(d, len(a), len(a)) == 1.0


def test_samples_apart_drift_fully():
    d = stats.ks_statistic(np.arange(50.0), np.arange(50.0) + 100)
    assert d == 1.0
    assert stats.ks_p_value(d, 50, 50) < 1e-20


def _kolmogorov_cdf_theta(lam: float) -> float:
    """P(K <= lam) by the other series: sqrt(2 pi)/lam * sum_k exp(-(2k-1)^2 pi^2 / (8 lam^2))."""
    return math.sqrt(2 * math.pi) / lam * sum(math.exp(-((2 * k - 1) ** 2) * math.pi ** 2 / (8 * lam * lam))
                                              for k in range(1, 60))


@pytest.mark.parametrize("lam", [0.25, 0.4, 0.6, 0.8, 1.0, 1.36, 2.0, 3.0])
def test_kolmogorov_q_matches_the_theta_series(lam):
    assert stats.kolmogorov_q(lam) == pytest.approx(1 - _kolmogorov_cdf_theta(lam), abs=1e-9)


@pytest.mark.parametrize("lam, alpha", [(1.22385, 0.10), (1.35810, 0.05), (1.62762, 0.01)])
def test_kolmogorov_q_at_the_textbook_critical_values(lam, alpha):
    assert stats.kolmogorov_q(lam) == pytest.approx(alpha, rel=1e-3)


def _exact_p_value(n: int, d: float) -> float:
    """P(D >= d) for two samples of n values each from one continuous
    distribution: 1 - (lattice paths from (0, 0) to (n, n) that stay
    within |i - j| < d n) / C(2n, n)."""
    bound = d * n - 1e-9
    paths = np.zeros(n + 1)
    paths[0] = 1.0
    for j in range(1, n + 1):  # the first row: only i - j = -j matters
        paths[j] = paths[j - 1] if abs(0 - j) < bound else 0.0
    for i in range(1, n + 1):
        row = np.zeros(n + 1)
        for j in range(n + 1):
            if abs(i - j) < bound:
                row[j] = paths[j] + (row[j - 1] if j else 0.0)
        paths = row
    return 1.0 - paths[n] / math.comb(2 * n, n)


@pytest.mark.parametrize("n", [30, 60, 100])
def test_p_value_lies_between_the_exact_ones(n):
    """The statistic of equal samples takes the values k/n: the asymptotic
    p-value at d lies between the exact P(D >= d + 1/n) and P(D >= d)."""
    for k in range(2, n // 4):
        d = k / n
        assert _exact_p_value(n, d + 1 / n) - 1e-9 <= stats.ks_p_value(d, n, n) <= _exact_p_value(n, d) + 1e-9, k


def test_summary_of_a_window():
    losses = np.array([1.0, 2.0, 3.0, 4.0])
    summary = stats.summarize(60, "", losses, np.array([1.0, 3.0, 5.0, 7.0]), observed=8, labelled=4,
                              reference=np.array([1.0, 2.0, 3.0, 4.0]))
    assert (summary.count, summary.mean, summary.labelled_fraction, summary.median_label_delay) == (4, 2.5, 0.5, 4.0)
    assert summary.percentiles == pytest.approx((2.5, 3.7, 3.97))  # linear interpolation between order statistics
    assert summary.drift == stats.Drift(0.0, 1.0, 4)
    empty = stats.summarize(60, "", np.array([]), np.array([]), observed=0, labelled=0, reference=None)
    assert empty.count == 0 and math.isnan(empty.mean) and math.isnan(empty.labelled_fraction)
    assert empty.drift is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.floats(0, 10) | st.just(math.nan)), max_size=30),
       st.lists(st.integers(0, 110), min_size=1, max_size=8), st.sets(st.integers(1, 50), min_size=1, max_size=3))
def test_history_is_each_windows_mean_by_its_definition(pairs, at, windows):
    times = np.array([float(t) for t, _ in pairs])
    losses = np.array([v for _, v in pairs], dtype=np.float64)
    got = stats.history(times, losses, np.array(at, dtype=np.float64), sorted(windows))
    expected = []
    for t in at:
        for w in sorted(windows):
            inside = [v for time, v in pairs if t - w < time <= t]
            expected.append((float(t), float(w), len(inside), float(np.mean(inside)) if inside else math.nan))
    assert [(t, w, c) for t, w, c, _ in got] == [(t, w, c) for t, w, c, _ in expected]
    for (*_, mean), (*_, want) in zip(got, expected):
        assert (math.isnan(mean) and math.isnan(want)) or mean == pytest.approx(want, rel=1e-9, abs=1e-12)
