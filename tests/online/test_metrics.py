"""Per-round metrics computed from a round's completion records, and the rounds plot."""

from __future__ import annotations

import json

import pytest

from dpokit.online.metrics import distinct_n, generation_metrics, judge_metrics, plot_rounds, rounds_figure


def test_distinct_n_counts_unique_word_ngrams():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b", "c"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0


def test_generation_metrics_length_eos_rate_kl_and_speed():
    records = [
        {"completion": "a b", "num_tokens": 2, "stopped": True, "policy_logp": -1.0, "reference_logp": -2.0},
        {"completion": "a c d", "num_tokens": 4, "stopped": False, "policy_logp": -3.0, "reference_logp": -3.0},
    ]
    metrics = generation_metrics(records, seconds=2.0)
    assert metrics["completion/length_mean"] == 3.0
    assert metrics["completion/eos_rate"] == 0.5
    assert metrics["kl"] == 0.5
    assert metrics["generation/tokens_per_s"] == (3 + 4) / 2.0  # the stop token counts as generated
    assert metrics["distinct_1"] == 4 / 5  # a, b, a, c, d


def test_judge_metrics_skip_unscored():
    metrics = judge_metrics([1.0, 3.0, float("nan")], seconds=0.5)
    assert (metrics["judge/score_mean"], metrics["judge/score_std"], metrics["judge/unscored"]) == (2.0, 1.0, 1.0)


def test_rounds_png_is_drawn_from_round_records(tmp_path):
    lines = [
        {"step": 2 * r, "split": "round", "round": r, "judge/score_mean": r, "judge/score_std": 0.1, "kl": 0.1 * r}
        for r in range(3)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = plot_rounds(tmp_path / "metrics.jsonl", tmp_path / "rounds.png")
    assert out.stat().st_size > 10_000


def test_rounds_are_whole_numbers_and_the_heldout_accuracy_carries_its_pairs():
    """Rounds 0, 1, 2 (ticks at 0, 1, 2 -- not 0.25 steps); held-out accuracy 0.75 on 8 pairs in the
    last round reads 'accuracy: 0.75 (n=8)' in the legend."""
    records = [
        {"round": r, "heldout/rewards/accuracies": 0.5 + 0.125 * r, "heldout/rewards/accuracies_n": 8, "kl": 0.1 * r}
        for r in range(3)
    ]
    figure = rounds_figure(records, "run")
    for axis in figure.axes:
        low, high = axis.get_xlim()
        ticks = [t for t in axis.get_xticks() if low <= t <= high]
        assert all(float(t).is_integer() for t in ticks), (axis.get_title(), ticks)
    accuracy = next(axis for axis in figure.axes if axis.get_title() == "Held-out reward accuracy")
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["accuracy: 0.75 (n=8)"]
