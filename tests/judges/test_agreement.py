"""A judge's agreement with human labels (dpokit.judges.agreement), against hand-worked examples."""

from __future__ import annotations

import math

import pytest

from dpokit.errors import ConfigError
from dpokit.judges.agreement import human_agreement, kappa_bootstrap_interval, kappa_interval
from dpokit.judges.stats import Z95, wilson_interval

# Twelve labelled pairs: the person's choice and the judge's outcome (both orders, read as a verdict on a).
HUMAN = ["a", "a", "a", "a", "a", "b", "b", "b", "b", "tie", "skip", "a"]
JUDGE = ["a", "a", "a", "b", "tie", "b", "b", "a", "b", "a", "a", "unparseable"]


def test_agreement_and_kappa_match_the_hand_worked_example_with_ties_skips_and_unreadable_left_out():
    """Pairs 10 (the person's tie), 11 (a skip) and 12 (the judge unreadable) are left out and counted:
    n = 9 compared pairs, of which 1, 2, 3, 6, 7, 9 agree, so p_o = 6/9. Pair 5 is the judge's tie on a
    decided pair: a disagreement.

    The person says a 5 times and b 4 times; the judge a 4 times (1, 2, 3, 8), b 4 times (4, 6, 7, 9) and
    tie once. Chance agreement p_e = (5 * 4 + 4 * 4 + 0 * 1) / 9^2 = 36/81 = 4/9, so

        kappa = (p_o - p_e) / (1 - p_e) = (6/9 - 4/9) / (5/9) = 2/5 = 0.4.

    The person prefers a in 5 of 9 compared pairs; the judge in 4 of 9 plus half a tie: 4.5/9 = 0.5.
    """
    report = human_agreement(HUMAN, JUDGE, bootstrap_samples=500, seed=0)
    assert (report.labelled, report.n) == (12, 9)
    assert (report.human_ties, report.human_skips, report.judge_unparseable, report.judge_ties) == (1, 1, 1, 1)
    assert report.agreement == pytest.approx(6 / 9)
    assert report.kappa == pytest.approx(0.4)
    assert (report.agreement_ci_low, report.agreement_ci_high) == pytest.approx(wilson_interval(6, 9))
    assert report.agreement_ci_method == "wilson"
    assert report.kappa_ci_method == "bootstrap"
    assert report.kappa_ci_low < 0.4 < report.kappa_ci_high
    assert report.human_a_rate == pytest.approx(5 / 9) and report.judge_a_rate == pytest.approx(0.5)


def test_kappa_bootstrap_is_seeded_and_narrows_with_more_pairs():
    small_h, small_j = HUMAN[:9], JUDGE[:9]
    assert kappa_bootstrap_interval(small_h, small_j, seed=4) == kappa_bootstrap_interval(small_h, small_j, seed=4)
    low_small, high_small = kappa_bootstrap_interval(small_h, small_j, seed=4)
    low_big, high_big = kappa_bootstrap_interval(small_h * 10, small_j * 10, seed=4)
    assert high_big - low_big < (high_small - low_small) / 2
    assert low_big < 0.4 < high_big


def test_perfect_agreement_on_three_pairs_gets_an_interval_with_width_not_the_collapsed_bootstrap():
    """Three pairs (a, b, a), all agreed: every resample has kappa 1, so the bootstrap says [1, 1].
    Instead Wilson's interval of p_o = 3/3 -- [3 / (3 + z^2), 1] -- is carried through kappa at
    p_e = (2 * 2 + 1 * 1) / 9 = 5/9: low = (3 / (3 + z^2) - 5/9) / (4/9), high = 1."""
    assert kappa_bootstrap_interval(["a", "b", "a"], ["a", "b", "a"], samples=200) == (1.0, 1.0)
    low, high, method = kappa_interval(["a", "b", "a"], ["a", "b", "a"], samples=200)
    assert method == "wilson-p_o"
    assert low == pytest.approx((3 / (3 + Z95**2) - 5 / 9) / (4 / 9)) and high == pytest.approx(1.0)


def test_nothing_compared_reports_nan_counts_and_bad_labels_are_refused():
    report = human_agreement(["tie", "skip", "a"], ["a", "b", "unparseable"])
    assert report.n == 0 and math.isnan(report.agreement) and math.isnan(report.kappa)
    assert report.to_dict()["kappa"] is None and report.to_dict()["human_skips"] == 1
    with pytest.raises(ConfigError, match="unknown human choice 'left'"):
        human_agreement(["left"], ["a"])
    with pytest.raises(ConfigError, match="one judge outcome per human label"):
        human_agreement(["a"], [])
