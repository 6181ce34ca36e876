"""Whether a difference between results over seeds is real: intervals, paired tests, corrections, power, ranks.

Numbers only (numpy and ``scipy.stats``); nothing here knows about runs, tables or MLflow. Used by ``dmgl report``
(:mod:`dmgl_cli.report.significance`), ``dmgl reproduce`` and the sweep summary.

* **Interval of a mean** (:func:`t_interval`): the 95% Student-t interval ``mean ± t(0.975, n-1) · std / sqrt(n)``
  from the sample std (``ddof=1``, as :func:`dmgl_cli.metrics.mean_std`); none for one value.
* **Paired difference** (:func:`paired_difference`): two results measured on the same seeds are compared seed by
  seed (a seed fixes the initial weights and the batch order, so seed-to-seed noise cancels in the difference).
  Pairs are made only on the seeds both sides have; the others are reported, never imputed. The difference's
  interval is the t-interval of the per-seed differences; its p-value comes from the named test:

  - ``t``: the paired t-test (``scipy.stats.ttest_rel``). Differences that are all equal (up to rounding) have no
    spread: p = 1 when they are all zero, 0 otherwise (scipy would give NaN or warn of precision loss).
  - ``wilcoxon``: the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided) when n >= 6 and not every
    difference is zero; otherwise the paired t-test, and :attr:`PairedDifference.test` says so. Below 6 pairs the
    smallest two-sided p the signed-rank test can give is 2/2^5 = 0.0625, so it could never reject at 5%.

  One pair gives a difference but neither interval nor p-value.
* **Holm** (:func:`holm`): the step-down correction of several p-values (one table's rows): sort ascending,
  multiply the i-th smallest (from 0) by ``m - i``, take the running maximum, cap at 1 (Holm 1979). It controls
  the family-wise error rate without assuming independence.
* **Power** (:func:`seeds_for_power`): the fewest seeds with which a paired t-test (two-sided, alpha 0.05) detects
  a true difference ``effect`` with probability ``power``, given the std of the paired differences: the statistic
  then follows a noncentral t (``scipy.stats.nct``) with n - 1 degrees of freedom and noncentrality
  ``effect / (std / sqrt(n))``; n is found by doubling, then bisection (power grows with n).
* **Friedman and Nemenyi** (:func:`friedman_nemenyi`): k methods ranked on each of N datasets (Demšar 2006,
  JMLR 7: 1-30). ``scipy.stats.friedmanchisquare`` (with its tie correction) tests that all methods are equal;
  the Nemenyi critical difference ``CD = q_alpha · sqrt(k (k + 1) / (6 N))``, ``q_alpha`` the studentized range
  quantile over sqrt(2) (``scipy.stats.studentized_range.ppf(1 - alpha, k, inf) / sqrt(2)``), is the least
  difference of average ranks that is significant. Cliques (:func:`cliques`) are the maximal groups of two or
  more methods whose average ranks lie within CD of each other: none of them is shown to differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.80
WILCOXON_MIN_PAIRS = 6
TESTS = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}

__all__ = [
    "ALPHA",
    "CONFIDENCE",
    "TESTS",
    "Friedman",
    "PairedDifference",
    "check_test",
    "cliques",
    "critical_difference",
    "friedman_nemenyi",
    "holm",
    "paired_difference",
    "paired_power",
    "seeds_for_power",
    "t_interval",
]


def check_test(test: str) -> None:
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; valid: {', '.join(TESTS)}")


def t_interval(
    mean: float | None, std: float | None, n: int, confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """The Student-t interval of a mean of ``n`` values with sample std ``std``; None for n < 2 or a non-finite
    mean or std."""
    if mean is None or std is None or n < 2 or not (math.isfinite(mean) and math.isfinite(std)):
        return None
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class PairedDifference:
    """``first - second`` seed by seed, over the seeds both have."""

    seeds: tuple[int, ...]  # the shared seeds, ascending
    only_first: tuple[int, ...] = ()  # seeds the second side lacks
    only_second: tuple[int, ...] = ()  # seeds the first side lacks
    mean: float | None = None
    std: float | None = None  # sample std of the differences (None for fewer than 2 pairs)
    low: float | None = None
    high: float | None = None
    p_value: float | None = None
    test: str = ""  # the test that gave p_value ("t" or "wilcoxon"); "" when there is none
    differences: tuple[float, ...] = field(default=(), repr=False)

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired_difference(
    first: Mapping[int, float], second: Mapping[int, float], test: str = "t", confidence: float = CONFIDENCE
) -> PairedDifference:
    """``first[s] - second[s]`` over the seeds ``s`` both map (see the module docstring for the tests)."""
    check_test(test)
    shared = sorted(set(first) & set(second))
    only_first = tuple(sorted(set(first) - set(second)))
    only_second = tuple(sorted(set(second) - set(first)))
    if not shared:
        return PairedDifference((), only_first, only_second)
    a = np.asarray([first[s] for s in shared], dtype=np.float64)
    b = np.asarray([second[s] for s in shared], dtype=np.float64)
    diff = a - b
    mean = float(diff.mean())
    if len(shared) < 2:
        return PairedDifference(tuple(shared), only_first, only_second, mean, differences=tuple(diff.tolist()))
    std = float(diff.std(ddof=1))
    low, high = t_interval(mean, std, len(shared), confidence) or (math.nan, math.nan)
    used = "wilcoxon" if test == "wilcoxon" and len(shared) >= WILCOXON_MIN_PAIRS and np.any(diff != 0) else "t"
    if used == "wilcoxon":
        p = float(scipy_stats.wilcoxon(a, b).pvalue)  # pyright: ignore[reportAttributeAccessIssue]  # scipy's result type is a generated class
    elif np.ptp(diff) <= 1e-12 * max(1.0, float(np.abs(diff).max())):  # no spread (up to rounding): t = ±inf
        p = 1.0 if np.all(diff == 0) else 0.0
    else:
        p = float(scipy_stats.ttest_rel(a, b).pvalue)
    return PairedDifference(
        tuple(shared), only_first, only_second, mean, std, low, high, p, used, differences=tuple(diff.tolist())
    )


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the given order; None entries are left out of the family."""
    present = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running
    return adjusted


def paired_power(n: int, std: float, effect: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs to detect a true mean difference ``effect`` when the
    differences have std ``std``."""
    if n < 2:
        return 0.0
    if std <= 0:
        return 1.0
    df = n - 1
    critical = float(scipy_stats.t.ppf(1 - alpha / 2, df))
    noncentrality = effect / (std / math.sqrt(n))
    upper = float(scipy_stats.nct.sf(critical, df, noncentrality))
    lower = float(scipy_stats.nct.cdf(-critical, df, noncentrality))
    return upper + lower


def seeds_for_power(
    std: float | None, effect: float = 0.01, power: float = POWER, alpha: float = ALPHA, limit: int = 100_000
) -> int | None:
    """The fewest seeds (>= 2) for which :func:`paired_power` reaches ``power``; None when ``std`` is unknown or
    more than ``limit`` seeds would be needed."""
    if std is None or not math.isfinite(std) or effect <= 0:
        return None
    if paired_power(2, std, effect, alpha) >= power:
        return 2
    low, high = 2, 4  # power(low) < target
    while paired_power(high, std, effect, alpha) < power:
        if high >= limit:
            return None
        low, high = high, min(limit, high * 2)
    while high - low > 1:
        middle = (low + high) // 2
        if paired_power(middle, std, effect, alpha) >= power:
            high = middle
        else:
            low = middle
    return high


# ---------------------------------------------------------------------------------- Friedman and Nemenyi


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical difference of average ranks for ``k`` methods on ``n`` datasets (Demšar 2006, §3.2.2)."""
    q_alpha = float(scipy_stats.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    return q_alpha * math.sqrt(k * (k + 1) / (6 * n))


def cliques(ranks: Sequence[float], cd: float) -> list[tuple[int, ...]]:
    """Maximal groups (two or more members, indices into ``ranks``, best rank first) whose average ranks all lie
    within ``cd`` of each other (a difference of at least ``cd`` is significant, as in Demšar 2006)."""
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    groups: list[tuple[int, ...]] = []
    for start, first in enumerate(order):
        group = tuple(i for i in order[start:] if ranks[i] - ranks[first] < cd)
        if len(group) > 1 and not any(set(group) <= set(g) for g in groups):
            groups.append(group)
    return groups


@dataclass(frozen=True)
class Friedman:
    statistic: float
    p_value: float
    ranks: tuple[float, ...]  # average rank per method, 1 = best
    datasets: int  # N
    cd: float
    alpha: float
    cliques: tuple[tuple[int, ...], ...]

    @property
    def methods(self) -> int:
        return len(self.ranks)


def friedman_nemenyi(
    scores: Sequence[Sequence[float]], higher_is_better: bool = True, alpha: float = ALPHA
) -> Friedman:
    """Friedman's test and Nemenyi's critical difference over ``scores[dataset][method]`` (N >= 2 datasets, k >= 3
    methods, no missing value); ties share their average rank."""
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 3:
        raise ValueError(f"Friedman's test needs scores of >= 3 methods on >= 2 datasets; got shape {table.shape}")
    if not np.all(np.isfinite(table)):
        raise ValueError("Friedman's test needs a score for every method on every dataset")
    signed = -table if higher_is_better else table
    ranks = np.asarray([scipy_stats.rankdata(row) for row in signed]).mean(axis=0)
    n, k = table.shape
    if np.all(table == table[:, :1]):  # every method ties on every dataset: scipy's tie correction divides by 0
        statistic, p_value = 0.0, 1.0
    else:
        result = scipy_stats.friedmanchisquare(*table.T)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    cd = critical_difference(k, n, alpha)
    return Friedman(
        statistic,
        p_value,
        tuple(float(r) for r in ranks),
        n,
        cd,
        alpha,
        tuple(cliques(ranks.tolist(), cd)),
    )
