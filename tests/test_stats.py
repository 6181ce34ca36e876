"""dmgl_cli.stats against scipy on fixed data and against textbook examples; why pairing by seed matters; and that
one seed gives two strategies the same initial weights and batch order."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dmgl_cli import stats

# Per-seed scores with a large seed effect (seed 4 is a bad seed for everyone) and a small, steady gain of B over A.
SEEDS = list(range(8))
A = [0.712, 0.745, 0.698, 0.731, 0.652, 0.760, 0.723, 0.707]
B = [0.721, 0.752, 0.709, 0.738, 0.664, 0.767, 0.734, 0.713]


def _by_seed(values):
    return dict(zip(SEEDS[: len(values)], values, strict=True))


def test_t_interval_equals_scipys():
    mean, std = float(np.mean(A)), float(np.std(A, ddof=1))
    low, high = stats.t_interval(mean, std, len(A)) or (None, None)
    expected = scipy_stats.t.interval(0.95, len(A) - 1, loc=mean, scale=scipy_stats.sem(A))
    assert low == pytest.approx(expected[0], rel=1e-12) and high == pytest.approx(expected[1], rel=1e-12)
    assert stats.t_interval(0.5, 0.0, 1) is None and stats.t_interval(None, None, 3) is None


def test_paired_difference_equals_scipys_paired_t_test_and_wilcoxon():
    t = stats.paired_difference(_by_seed(B), _by_seed(A))
    diff = np.subtract(B, A)
    assert t.n == 8 and t.test == "t" and t.mean == pytest.approx(diff.mean())
    assert t.p_value == pytest.approx(scipy_stats.ttest_rel(B, A).pvalue, rel=1e-12)
    interval = scipy_stats.ttest_rel(B, A).confidence_interval(0.95)
    assert (t.low, t.high) == (pytest.approx(interval.low, rel=1e-12), pytest.approx(interval.high, rel=1e-12))
    w = stats.paired_difference(_by_seed(B), _by_seed(A), test="wilcoxon")
    assert w.test == "wilcoxon" and w.p_value == pytest.approx(scipy_stats.wilcoxon(B, A).pvalue, rel=1e-12)
    # Wilcoxon needs 6 pairs (below that it cannot reach p < 0.05): the t-test stands in, and says so
    few = stats.paired_difference(_by_seed(B[:5]), _by_seed(A[:5]), test="wilcoxon")
    assert few.test == "t" and few.p_value == pytest.approx(scipy_stats.ttest_rel(B[:5], A[:5]).pvalue)
    # ... as it does when every difference is zero
    same = stats.paired_difference(_by_seed(A), _by_seed(A), test="wilcoxon")
    assert same.test == "t" and same.p_value == 1.0 and same.mean == 0.0
    constant = stats.paired_difference({0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.6})
    assert constant.p_value == 0.0 and constant.std == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown test"):
        stats.paired_difference({}, {}, test="z")


def test_pairs_are_made_only_on_shared_seeds():
    result = stats.paired_difference({0: 0.7, 1: 0.8, 2: 0.9}, {1: 0.75, 2: 0.8, 5: 0.1})
    assert result.seeds == (1, 2) and result.only_first == (0,) and result.only_second == (5,)
    assert result.mean == pytest.approx(0.075)
    one = stats.paired_difference({0: 0.7}, {0: 0.6})
    assert one.n == 1 and one.mean == pytest.approx(0.1) and one.p_value is None and one.low is None
    assert stats.paired_difference({0: 0.7}, {1: 0.6}).mean is None


def test_pairing_by_seed_finds_what_an_unpaired_or_shuffled_comparison_misses():
    """The gain of B over A (about one point) is far below the seed-to-seed spread (about three points): paired by
    seed it is significant, with the seeds shuffled on one side it is not."""
    paired = stats.paired_difference(_by_seed(B), _by_seed(A))
    assert paired.p_value is not None and paired.p_value < 1e-4
    assert scipy_stats.ttest_ind(B, A).pvalue > 0.3  # as two independent samples
    shuffled_p = []
    for trial in range(20):
        order = SEEDS[:]
        random.Random(trial).shuffle(order)
        if order == SEEDS:
            continue
        result = stats.paired_difference(dict(zip(order, B, strict=True)), _by_seed(A))
        assert result.mean == pytest.approx(paired.mean)  # the same means, another pairing
        shuffled_p.append(result.p_value)
    assert all(p is not None and p > 0.01 for p in shuffled_p)
    assert sum(p is not None and p > 0.05 for p in shuffled_p) >= 0.9 * len(shuffled_p)


def test_holm_on_a_textbook_example():
    # Holm (1979)'s procedure as worked in Wikipedia's "Holm–Bonferroni method" example: four hypotheses with
    # p = 0.01, 0.04, 0.03, 0.005 at alpha 0.05. Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06,
    # 0.04*1 = 0.04 -> running max 0.06: H1 and H4 are rejected, H2 and H3 are not.
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [p is not None and p < 0.05 for p in adjusted] == [True, False, False, True]
    assert stats.holm([0.2, None, 0.9]) == [pytest.approx(0.4), None, pytest.approx(0.9)]
    assert stats.holm([0.6, 0.7]) == [pytest.approx(1.0), pytest.approx(1.0)]  # capped at 1
    assert stats.holm([]) == []


def test_seeds_for_power_is_the_smallest_n_with_80_percent_power():
    std = 0.012  # paired std of 1.2 points
    n = stats.seeds_for_power(std, effect=0.01)
    assert n is not None and n > 2
    assert stats.paired_power(n, std, 0.01) >= 0.8 > stats.paired_power(n - 1, std, 0.01)
    # the normal approximation ((z_0.975 + z_0.8) * std / effect)^2 is a slight underestimate
    approximate = ((scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) * std / 0.01) ** 2
    assert approximate <= n <= approximate + 3
    # power by simulation agrees with the noncentral t
    rng = np.random.default_rng(0)
    draws = rng.normal(0.01, std, size=(4000, n))
    rejected = np.mean(scipy_stats.ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05)
    assert rejected == pytest.approx(stats.paired_power(n, std, 0.01), abs=0.03)
    assert stats.seeds_for_power(0.0) == 2 and stats.seeds_for_power(None) is None
    assert stats.seeds_for_power(10.0, limit=1000) is None


# Demšar (2006), "Statistical comparisons of classifiers over multiple data sets", JMLR 7, §3.2.4 and Table 6: C4.5,
# C4.5+m, C4.5+cf and C4.5+m+cf (AUC on 14 data sets) have average ranks 3.143, 2.000, 2.893 and 1.964;
# chi2_F = 9.28, CD = 2.569 * sqrt(4*5 / (6*14)) = 1.25 at alpha 0.05 and 2.291 * sqrt(...) = 1.12 at alpha 0.10.
# At 0.05 no two differ (3.143 - 1.964 = 1.18 < 1.25); at 0.10 C4.5+m+cf and C4.5+m beat C4.5 (1.18, 1.14 > 1.12).
DEMSAR_RANKS = [3.143, 2.000, 2.893, 1.964]


def test_critical_difference_and_cliques_on_demsars_example():
    assert stats.critical_difference(4, 14) == pytest.approx(1.25, abs=0.005)
    assert stats.critical_difference(4, 14, alpha=0.10) == pytest.approx(1.12, abs=0.005)
    q = stats.critical_difference(4, 14) / math.sqrt(4 * 5 / (6 * 14))
    assert q == pytest.approx(2.569, abs=1e-3)  # Demšar's Table 5(a), k = 4
    n, k = 14, 4
    chi2 = 12 * n / (k * (k + 1)) * (sum(r * r for r in DEMSAR_RANKS) - k * (k + 1) ** 2 / 4)
    assert chi2 == pytest.approx(9.28, abs=0.01)
    assert stats.cliques(DEMSAR_RANKS, stats.critical_difference(4, 14)) == [(3, 1, 2, 0)]
    assert stats.cliques(DEMSAR_RANKS, stats.critical_difference(4, 14, alpha=0.10)) == [(3, 1, 2), (2, 0)]


def test_friedman_nemenyi_equals_scipys_friedman_and_ranks_by_hand():
    scores = [
        [0.80, 0.75, 0.70, 0.60],
        [0.82, 0.79, 0.71, 0.72],
        [0.78, 0.80, 0.69, 0.65],
        [0.90, 0.85, 0.80, 0.81],
        [0.70, 0.66, 0.62, 0.55],
    ]
    result = stats.friedman_nemenyi(scores)
    expected = scipy_stats.friedmanchisquare(*np.asarray(scores).T)
    assert result.statistic == pytest.approx(expected.statistic) and result.p_value == pytest.approx(expected.pvalue)
    assert result.ranks == pytest.approx((1.2, 1.8, 3.4, 3.6))
    assert result.cd == pytest.approx(stats.critical_difference(4, 5)) and result.datasets == 5
    assert result.cliques == ((0, 1), (1, 2, 3))  # CD = 2.10: 3.4 - 1.2 is significant, 3.6 - 1.8 not
    lower = stats.friedman_nemenyi([[1 - v for v in row] for row in scores], higher_is_better=False)
    assert lower.ranks == pytest.approx(result.ranks)
    ties = stats.friedman_nemenyi([[0.5, 0.5, 0.5], [0.7, 0.7, 0.7]])
    assert ties.p_value == 1.0 and ties.cliques == ((0, 1, 2),)
    with pytest.raises(ValueError, match=">= 3 methods on >= 2 datasets"):
        stats.friedman_nemenyi([[0.1, 0.2, 0.3]])


# ---------------------------------------------------------------------------------------- seeds pair runs


class _NoSink:
    def log_metrics(self, metrics, step):
        pass

    def save_checkpoint(self, name, state):
        pass


def test_one_seed_gives_two_strategies_the_same_initial_weights_and_batch_order(synthetic):
    """What makes a paired test valid: runs of two strategies with one seed start from the same weights and see the
    batches in the same order, so their difference is the strategy's, not the seed's (ARCHITECTURE.md says where
    this cannot hold)."""
    import torch

    from dmgl_cli.config import resolve
    from dmgl_cli.data.registry import open_dataset
    from dmgl_cli.strategies import parse_strategy
    from dmgl_cli.train import Trainer

    dataset = open_dataset(synthetic)
    trainers = {}
    for spec in ("constant:0.2", "constant:0.8"):
        config = resolve("synthetic", ["train.batch_size=64", "data.num_workers=0"], strategy=parse_strategy(spec))
        trainers[spec] = Trainer(config, dataset, seed=3, sink=_NoSink())
    low, high = trainers["constant:0.2"], trainers["constant:0.8"]
    assert low.strategy is not high.strategy
    low_state, high_state = low.model.state_dict(), high.model.state_dict()
    assert list(low_state) == list(high_state)
    assert all(torch.equal(low_state[k], high_state[k]) for k in low_state)
    orders = []
    for trainer in (low, high):
        sampler = trainer.train_loader.batch_sampler
        sampler.set_epoch(0)
        orders.append(list(iter(sampler)))
    assert orders[0] == orders[1] and len(orders[0]) > 1
    # ... and another seed changes both
    other = Trainer(low.config, dataset, seed=4, sink=_NoSink())
    other.train_loader.batch_sampler.set_epoch(0)
    assert list(iter(other.train_loader.batch_sampler)) != orders[0]
    assert not all(torch.equal(v, other.model.state_dict()[k]) for k, v in low_state.items())
