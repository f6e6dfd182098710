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


def test_rows_mark_the_completions_that_were_cut_off():
    rows, _ = build_rows(["p"], [["a", "b", "c"]], [[1.0, 3.0, 2.0]], mode="ranking", stopped=[[True, False, True]])
    assert rows[0]["sample_indices"] == [1, 2, 0] and rows[0]["truncated"] == [True, False, False]
    (plain,), _ = build_rows(["p"], [["a", "b"]], [[1.0, 3.0]], mode="best_vs_worst")
    assert "truncated" not in plain  # without stop information nothing is claimed


def test_the_missing_eos_penalty_changes_which_completion_is_chosen():
    """Judge scores A = 5.0 (stopped), B = 5.6 (cut off at the token limit), C = 2.0 (stopped).

    Without a penalty the best is B (5.6) and the worst C (2.0): pair (B, C), scores [5.6, 2.0].
    With missing_eos_penalty = 1.0, B scores 5.6 - 1.0 = 4.6 < 5.0, so the best is A: pair (A, C),
    scores [5.0, 2.0]. A penalty of 0.5 leaves B at 5.1 > 5.0: still (B, C), scores [5.1, 2.0].
    """
    texts, scores, stopped = [["A", "B", "C"]], [[5.0, 5.6, 2.0]], [[True, False, True]]

    def pair(penalty: float) -> tuple[list[str], list[float], list[bool]]:
        (row,), _ = build_rows(["p"], texts, scores, mode="best_vs_worst", stopped=stopped, missing_eos_penalty=penalty)
        return row["responses"], row["scores"], row["truncated"]

    assert pair(0.0) == (["B", "C"], [5.6, 2.0], [True, False])
    assert pair(1.0) == (["A", "C"], [5.0, 2.0], [False, False])
    responses, values, _ = pair(0.5)
    assert responses == ["B", "C"] and values == pytest.approx([5.1, 2.0])


def test_the_length_aware_choice_takes_the_shortest_completion_near_the_best():
    """Scores A 5.0 (40 tokens), B 4.8 (12 tokens), C 1.0 (30 tokens). Within 0.5 of the best: A and B, so
    the chosen is B, the shorter (pair (B, C), scores [4.8, 1.0]). Within 0.1: A only, so (A, C) as
    without the option. Within 10: C too, and B is still the shortest."""
    texts, scores, lengths = [["A", "B", "C"]], [[5.0, 4.8, 1.0]], [[40, 12, 30]]

    def pair(within: float | None) -> tuple[list[str], list[float], int]:
        (row,), report = build_rows(["p"], texts, scores, mode="best_vs_worst", lengths=lengths, prefer_shorter_within=within)
        return row["responses"], row["scores"], report.shorter_chosen

    assert pair(0.5) == (["B", "C"], [4.8, 1.0], 1)
    assert pair(0.1) == (["A", "C"], [5.0, 1.0], 0)
    assert pair(10.0) == (["B", "C"], [4.8, 1.0], 1)
    assert pair(None)[:2] == (["A", "C"], [5.0, 1.0])


def test_the_length_aware_choice_still_needs_a_margin_over_the_rejected_completion():
    """The shortest near the best may be the worst itself, or too close to it: no pair, a tie counted."""
    rows, report = build_rows(
        ["p", "q"],
        [["A", "B", "C"], ["D", "E", "F"]],
        [[5.0, 4.8, 4.7], [5.0, 4.0, 1.0]],
        mode="best_vs_worst",
        min_margin=0.2,
        lengths=[[40, 30, 5], [40, 30, 20]],
        prefer_shorter_within=0.5,
    )
    assert [r["prompt_index"] for r in rows] == [1]
    assert rows[0]["responses"] == ["D", "F"]  # q: only D is within 0.5 of 5.0; p: the shortest (C) is the worst
    assert report.dropped == {"tie": 1} and report.shorter_chosen == 0


def test_the_length_aware_choice_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="prefer_shorter_within needs mode best_vs_worst"):
        build_rows(["p"], [["a", "b"]], [[1.0, 0.0]], mode="all_pairs", lengths=[[1, 2]], prefer_shorter_within=0.5)
    with pytest.raises(ValueError, match="lengths"):
        build_rows(["p"], [["a", "b"]], [[1.0, 0.0]], mode="best_vs_worst", prefer_shorter_within=0.5)
