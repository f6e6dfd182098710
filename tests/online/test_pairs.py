"""Preference rows from judged completions: the counts each pair mode promises, ties and unusable completions dropped."""

from __future__ import annotations

import math

import pytest

from dpokit.online.pairs import build_rows


def test_best_vs_worst_gives_one_pair_per_prompt_best_first():
    rows, report = build_rows(
        ["p", "q"], [["a", "b", "c"], ["x", "y", "z"]], [[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]], mode="best_vs_worst"
    )
    assert [(r["responses"], r["scores"], r["sample_indices"]) for r in rows] == [
        (["b", "a"], [3.0, 1.0], [1, 0]),
        (["x", "y"], [0.5, -1.0], [0, 1]),
    ]
    assert report.rows == 2 and report.prompts == 2 and not report.dropped


def test_all_pairs_gives_k_choose_2_pairs_minus_ties():
    # K = 4 -> 6 pairs; scores 2, 2, 1, 0 tie once (the two 2s).
    rows, report = build_rows(["p"], [["a", "b", "c", "d"]], [[2.0, 2.0, 1.0, 0.0]], mode="all_pairs")
    assert len(rows) == 4 * 3 // 2 - 1
    assert report.dropped["tie"] == 1
    assert all(r["scores"][0] > r["scores"][1] for r in rows)


def test_ranking_gives_one_ranked_row_per_prompt():
    rows, _ = build_rows(["p"], [["a", "b", "c"]], [[0.0, 2.0, 1.0]], mode="ranking")
    assert len(rows) == 1
    assert rows[0]["responses"] == ["b", "c", "a"] and rows[0]["scores"] == [2.0, 1.0, 0.0]


def test_min_margin_ties_empty_unscored_and_repeated_completions_are_dropped_and_counted():
    rows, report = build_rows(
        ["p", "q"],
        [["a", "a", " ", "b", "c"], ["x", "y", "z", "w", "v"]],
        [[1.0, 0.0, 5.0, math.nan, 1.05], [1.0, 1.0, 1.0, 1.0, 1.0]],
        mode="best_vs_worst",
        min_margin=0.1,
    )
    assert rows == []  # p: a (1.0) vs c (1.05) is within the margin; q: all tie
    assert report.dropped == {"duplicate": 1, "empty": 1, "unscored": 1, "tie": 2}


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown pair mode"):
        build_rows(["p"], [["a", "b"]], [[1.0, 0.0]], mode="best_vs_rest")
