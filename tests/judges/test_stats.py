"""The statistics of judged win rates, each against a hand-worked example."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpokit.errors import ConfigError
from dpokit.judges.base import PairJudgment
from dpokit.judges.stats import (
    LC_L2,
    agreement,
    bootstrap_interval,
    cohen_kappa,
    fit_length_logistic,
    length_controlled,
    pair_outcome,
    wilson_interval,
    win_rate,
    win_stats,
)
from tests.judges.fakes import AlwaysFirst, Oracle


def J(p):  # noqa: N802
    return PairJudgment(p, "")


def test_wilson_interval_matches_the_hand_worked_example():
    # 8 successes of 10, z = 1.96: p = 0.8, center = (0.8 + z^2/20) / (1 + z^2/10) = 0.716745,
    # half-width = z / (1 + z^2/10) * sqrt(0.8 * 0.2 / 10 + z^2 / 400) = 0.226578.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.716745 - 0.226578, abs=1e-5) and high == pytest.approx(0.716745 + 0.226578, abs=1e-5)
    # 0 of 5: the interval starts at 0 and reaches z^2 / (n + z^2) = 3.8415 / 8.8415.
    low, high = wilson_interval(0, 5)
    assert low == 0.0 and high == pytest.approx(3.841459 / 8.841459, abs=1e-5)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_bootstrap_over_prompts_matches_the_enumerated_distribution_and_is_seeded():
    # Two prompts, one won, one lost: resampled win rates 1, 0.5, 0 with probabilities 1/4, 1/2, 1/4.
    assert bootstrap_interval([["win"], ["loss"]], samples=4000, seed=1) == (0.0, 1.0)
    # Every prompt won: no uncertainty left.
    assert bootstrap_interval([["win", "win"], ["win"]], samples=200) == (1.0, 1.0)
    # Samples of one prompt move together: the groups are resampled whole.
    grouped = bootstrap_interval([["win"] * 10, ["loss"] * 10], samples=2000, seed=0)
    assert grouped == (0.0, 1.0)
    many = [["win"]] * 30 + [["loss"]] * 10
    assert bootstrap_interval(many, seed=3) == bootstrap_interval(many, seed=3)
    low, high = bootstrap_interval(many, seed=3)
    assert low < 0.75 < high and high - low < 0.4
    assert all(math.isnan(v) for v in bootstrap_interval([["unparseable"]]))


def test_cohen_kappa_matches_the_hand_worked_example():
    # both A: 4, both B: 3, (A, B): 2, (B, A): 1 -> p_o = 0.7, p_e = 0.6 * 0.5 + 0.4 * 0.5 = 0.5, kappa = 0.4
    first = ["A"] * 4 + ["B"] * 3 + ["A"] * 2 + ["B"]
    second = ["A"] * 4 + ["B"] * 3 + ["B"] * 2 + ["A"]
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["A", "B"], ["A", "B"]) == 1.0
    assert cohen_kappa(["A", "A"], ["A", "A"]) == 1.0  # one label only, all equal
    assert cohen_kappa(["A", "B"], ["B", "A"]) == pytest.approx(-1.0)
    with pytest.raises(ConfigError):
        cohen_kappa(["A"], [])
    assert math.isnan(cohen_kappa([], []))


def test_pair_outcomes_in_both_orders():
    assert pair_outcome(J(0.9), J(0.1)) == "win"  # x first: A wins; y first: B (= x) wins
    assert pair_outcome(J(0.2), J(0.7)) == "loss"
    assert pair_outcome(J(0.5), J(0.5)) == "tie"
    assert pair_outcome(J(0.9), J(0.9)) == "tie"  # the orders disagree: a tie by default
    assert pair_outcome(J(0.9), J(0.6), inconsistent="average") == "win"  # (0.9 + 0.4) / 2 > 0.5
    assert pair_outcome(J(0.6), J(0.9), inconsistent="average") == "loss"
    assert pair_outcome(J(0.6), J(0.6), inconsistent="average") == "tie"
    assert pair_outcome(PairJudgment(float("nan"), "??", parsed=False), J(0.1)) == "unparseable"
    with pytest.raises(ConfigError):
        pair_outcome(J(0.9), J(0.1), inconsistent="coin")
    assert win_rate(["win", "tie", "loss", "unparseable"]) == 0.5
    assert math.isnan(win_rate(["unparseable"]))


def test_position_swapping_cancels_a_judge_that_always_prefers_the_first_answer():
    from dpokit.analysis.winrate import judge_both_orders

    prompts = [f"p{i}" for i in range(8)]
    better = ["a much longer response"] * 8  # the oracle prefers these
    worse = ["short"] * 8
    biased = AlwaysFirst()
    stats, outcomes = win_stats(judge_both_orders(biased, prompts, worse, better), list(range(8)))
    assert outcomes == ["tie"] * 8 and stats.win_rate == 0.5  # it cannot make the worse response win
    assert stats.position_consistency == 0.0 and stats.position_bias == 0.5
    assert biased.calls == 16  # every pair in both orders
    # Judged in one order only, the same judge would have declared the worse response the winner every time.
    assert all(j.verdict == "A" for j in biased.judge_pairs(prompts, worse, better))
    fair, outcomes = win_stats(judge_both_orders(Oracle(), prompts, worse, better), list(range(8)), ci="wilson")
    assert outcomes == ["loss"] * 8 and fair.win_rate == 0.0
    assert fair.position_consistency == 1.0 and fair.position_bias == 0.0
    assert fair.ci_method == "wilson" and fair.ci_low == 0.0
    with pytest.raises(ConfigError):
        win_stats([], [], ci="normal")


def test_agreement_ignores_unparseable_items():
    result = agreement(["win", "loss", "tie", "unparseable"], ["win", "win", "tie", "win"])
    assert result["n"] == 3 and result["agreement"] == pytest.approx(2 / 3)
    assert agreement(["unparseable"], ["win"])["n"] == 0
    stats, _ = win_stats([(J(0.9), J(0.1))], [0])
    assert stats.to_dict()["win_rate"] == 1.0


def test_all_wins_on_48_prompts_report_a_wilson_interval_instead_of_a_collapsed_bootstrap():
    """48 prompts, every one won: each bootstrap resample holds 48 wins, so the percentile interval is
    [1, 1] -- certainty the data cannot give. Wilson at 95% (z = 1.959964, z^2 = 3.841459) with p = 1,
    n = 48: center = (1 + z^2/96) / (1 + z^2/48), half-width = (z^2/96) / (1 + z^2/48), so the lower
    bound is 1 / (1 + z^2/48) = 48 / 51.841459 = 0.925900 and the upper bound is 1. All losses mirror it:
    [0, 1 - 0.925900] = [0, 0.074100]."""
    wins, _ = win_stats([(J(0.9), J(0.1))] * 48, list(range(48)))
    assert wins.ci_method == "wilson"
    assert wins.ci_low == pytest.approx(0.925900, abs=1e-6) and wins.ci_high == 1.0
    losses, _ = win_stats([(J(0.1), J(0.9))] * 48, list(range(48)))
    assert losses.ci_method == "wilson" and losses.ci_low == 0.0
    assert losses.ci_high == pytest.approx(0.074100, abs=1e-6)


def test_a_collapsed_bootstrap_inside_the_range_also_gives_way_to_wilson_on_the_number_of_prompts():
    """8 prompts with 3 samples each, every pair a tie: the bootstrap interval is [0.5, 0.5]. Wilson with
    n = 8 prompts (the bootstrap's unit, not the 24 pairs) and 4 successes: p = 0.5, center 0.5,
    half-width = z / (1 + z^2/8) * sqrt(0.25/8 + z^2/256) = 1.324127 * 0.215073 = 0.284784, so
    [0.215216, 0.784784]."""
    stats, _ = win_stats([(J(0.5), J(0.5))] * 24, [i // 3 for i in range(24)])
    assert stats.ci_method == "wilson" and stats.win_rate == 0.5
    assert stats.ci_low == pytest.approx(0.215216, abs=1e-6) and stats.ci_high == pytest.approx(0.784784, abs=1e-6)


def test_an_informative_bootstrap_is_kept():
    """30 prompts won and 10 lost: the bootstrap interval has width, so it is the one reported."""
    pairs = [(J(0.9), J(0.1))] * 30 + [(J(0.1), J(0.9))] * 10
    stats, _ = win_stats(pairs, list(range(40)), bootstrap_samples=500)
    assert stats.ci_method == "bootstrap" and stats.ci_low < 0.75 < stats.ci_high < 1.0


# ------------------------------------------------------------------------------- length control


def _pairs_of(outcomes):
    """Judgments in both orders that give each pair the wanted outcome."""
    verdicts = {"win": (J(0.9), J(0.1)), "loss": (J(0.1), J(0.9)), "tie": (J(0.5), J(0.5))}
    return [verdicts[o] for o in outcomes]


def _longer_side_drawn(rng, n, effect):
    """x longer than y by about 30 characters (sd 40); x wins with probability sigmoid(effect * tanh(d / sd))."""
    d = rng.normal(30.0, 40.0, n)
    p = 1.0 / (1.0 + np.exp(-effect * np.tanh(d / d.std(ddof=1))))
    return d, ["win" if u < q else "loss" for u, q in zip(rng.random(n), p, strict=True)]


def test_the_length_fit_solves_the_hand_worked_penalised_equations():
    """Wins at features -1 and 1, a loss at 0: by symmetry phi = 0, and theta solves the score equation
    2 - 3 sigmoid(theta) = 0.01 theta (the L2 term's pull), the root near logit(2/3) = 0.693."""
    theta, phi = fit_length_logistic(np.array([1.0, 0.0, 1.0]), np.array([-1.0, 0.0, 1.0]), np.ones((1, 3)))[0]
    assert phi == pytest.approx(0.0, abs=1e-12)
    assert 2 - 3 / (1 + math.exp(-theta)) == pytest.approx(LC_L2 * theta, abs=1e-10)
    assert 0.6 < theta < math.log(2)
    # Weights are counts: a pair drawn twice counts as two identical pairs.
    doubled = fit_length_logistic(np.array([1.0, 0.0, 1.0, 1.0]), np.array([-1.0, 0.0, 1.0, 1.0]), np.ones((1, 4)))
    weighted = fit_length_logistic(np.array([1.0, 0.0, 1.0]), np.array([-1.0, 0.0, 1.0]), np.array([[1.0, 1.0, 2.0]]))
    assert weighted == pytest.approx(doubled, abs=1e-9)


def test_a_win_rate_driven_entirely_by_length_is_near_one_half_when_length_controlled():
    """x is longer in most pairs and the judge picks the longer response more often, nothing else: the raw
    win rate is well above 0.5 (its interval excludes it), the controlled one is near 0.5 (its interval
    includes it), and the length effect is positive."""
    d, outcomes = _longer_side_drawn(np.random.default_rng(7), 2000, effect=3.0)
    stats, _ = win_stats(_pairs_of(outcomes), list(range(2000)), length_differences=list(d), bootstrap_samples=300)
    lc = stats.length_control
    assert stats.win_rate > 0.65 and stats.ci_low > 0.6
    assert abs(lc.lc_win_rate - 0.5) < 0.05
    assert lc.lc_ci_low < 0.5 < lc.lc_ci_high and lc.lc_ci_method == "bootstrap"
    assert lc.length_effect_ci_low > 0
    row = stats.to_dict()
    assert row["lc_win_rate"] == lc.lc_win_rate and row["length_effect"] == lc.length_effect


def test_a_win_rate_not_driven_by_length_stays_near_the_raw_one_when_length_controlled():
    """The same lengths, but x wins 70% of pairs whatever their lengths: the controlled rate stays near the
    raw one and the length effect's interval includes 0."""
    d, _ = _longer_side_drawn(np.random.default_rng(7), 2000, effect=0.0)
    outcomes = ["win" if u < 0.7 else "loss" for u in np.random.default_rng(8).random(2000)]
    stats, _ = win_stats(_pairs_of(outcomes), list(range(2000)), length_differences=list(d), bootstrap_samples=300)
    lc = stats.length_control
    assert abs(lc.lc_win_rate - stats.win_rate) < 0.05
    assert lc.length_effect_ci_low < 0 < lc.length_effect_ci_high
    assert lc.lc_ci_low < stats.win_rate < lc.lc_ci_high


def test_length_control_is_seeded_resamples_prompts_and_leaves_out_unparseable_pairs():
    d, outcomes = _longer_side_drawn(np.random.default_rng(3), 60, effect=2.0)
    groups = [i // 3 for i in range(60)]
    first = length_controlled(outcomes, d, groups, samples=300, seed=5)
    assert first == length_controlled(outcomes, d, groups, samples=300, seed=5)
    assert first != length_controlled(outcomes, d, groups, samples=300, seed=6)
    with_unreadable = length_controlled([*outcomes, "unparseable"], [*d, 1e6], [*groups, 99], samples=300, seed=5)
    assert with_unreadable == first  # the unreadable pair (and its prompt) changes nothing
    # Prompts resampled whole: 3 copies of each pair under one prompt give a wider interval than 60 prompts.
    per_pair = length_controlled(outcomes, d, range(60), samples=300, seed=5)
    assert per_pair.lc_win_rate == first.lc_win_rate
    assert first.lc_ci_high - first.lc_ci_low > per_pair.lc_ci_high - per_pair.lc_ci_low


def test_without_variation_in_the_outcomes_length_explains_nothing():
    """Every pair won: the controlled win rate is the raw 1 with the raw interval (Wilson on 48 prompts),
    the length effect 0 without an interval."""
    stats, _ = win_stats(_pairs_of(["win"] * 48), list(range(48)), length_differences=[float(i) for i in range(48)])
    lc = stats.length_control
    assert lc.lc_win_rate == 1.0 and (lc.lc_ci_low, lc.lc_ci_high, lc.lc_ci_method) == (stats.ci_low, 1.0, "wilson")
    assert lc.length_effect == 0.0 and stats.to_dict()["length_effect_ci_low"] is None
    plain, _ = win_stats(_pairs_of(["win"] * 48), list(range(48)))
    assert plain.length_control is None and "lc_win_rate" not in plain.to_dict()


def test_the_worked_examples_in_the_docstrings_hold():
    """The module's doctests: the length-controlled worked example (8 pairs, all won by the longer
    response: raw 0.75, controlled about 0.5) among them."""
    import doctest

    from dpokit.judges import stats

    result = doctest.testmod(stats)
    assert result.attempted >= 10 and result.failed == 0
