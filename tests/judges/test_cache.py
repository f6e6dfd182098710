"""The judgment cache read back after damage: every row is checked (type, range, orientation, its own
digest), a bad row is dropped with a warning naming ``file:line`` and asked again, and an append after a
torn line never joins it. The cache files come from a real reward judge judging real pairs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dpokit.analysis.winrate import judge_both_orders
from dpokit.judges import CachedJudge, JudgmentCache, load_judge
from dpokit.judges.cache import row_check
from tests.judges.fakes import Oracle

LENGTH = "reward:tests.judges.fakes:length_reward"
PROMPTS = ["p1", "p2", "p3"]
X = ["one two three", "a", "x y"]
Y = ["one", "b c d e", "z w"]


def judged(path: Path) -> list[tuple[float, float]]:
    """Each pair judged in both orders through the cache at ``path``: ``[(forward prob_a, swapped prob_a)]``."""
    judge = CachedJudge(load_judge(LENGTH), JudgmentCache(path))
    return [(f.prob_a, s.prob_a) for f, s in judge_both_orders(judge, PROMPTS, X, Y)]


@pytest.fixture
def cache_file(tmp_path) -> tuple[Path, list[tuple[float, float]]]:
    path = tmp_path / "judgments.jsonl"
    return path, judged(path)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_rows(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in lines), encoding="utf-8")


def asks(path: Path) -> tuple[int, int]:
    """(hits, misses) of judging the same pairs again from ``path``."""
    judge = CachedJudge(load_judge(LENGTH), JudgmentCache(path))
    judge_both_orders(judge, PROMPTS, X, Y)
    return judge.hits, judge.misses


def test_a_probability_outside_0_1_is_dropped_with_its_file_line_and_asked_again(cache_file, caplog):
    path, original = cache_file
    lines = rows(path)
    lines[1]["value"]["prob_a"] = 7.5  # with a matching digest: only the range check can catch it
    lines[1]["check"] = row_check(lines[1]["key"], lines[1]["kind"], lines[1]["a"], lines[1]["value"])
    write_rows(path, lines)
    with caplog.at_level(logging.WARNING):
        cache = JudgmentCache(path)
    assert cache.dropped == [f"{path}:2: prob_a 7.5 is not a probability in [0, 1]"]
    assert "dropped 1 unusable cached judgment(s)" in caplog.text and f"{path}:2" in caplog.text
    assert asks(path) == (5, 1)
    assert judged(path) == original


@pytest.mark.parametrize(
    ("value", "why"),
    [("0.7", "not a probability"), (True, "not a probability"), (None, "prob_a is null in a parsed judgment")],
)
def test_a_pair_judgment_of_the_wrong_type_is_dropped(cache_file, value, why):
    path, original = cache_file
    lines = rows(path)
    lines[0]["value"]["prob_a"] = value
    lines[0]["check"] = row_check(lines[0]["key"], lines[0]["kind"], lines[0]["a"], lines[0]["value"])
    write_rows(path, lines)
    [dropped] = JudgmentCache(path).dropped
    assert dropped.startswith(f"{path}:1: ") and why in dropped
    assert judged(path) == original


def test_swapped_probabilities_of_the_two_orders_are_not_taken_for_each_other(cache_file):
    path, original = cache_file
    assert original[0][0] != original[0][1]  # the pair is not a tie: a swap would flip its verdict
    lines = rows(path)
    forward, swapped = lines[0], lines[3]  # pair 1 as (A=x, B=y) and as (A=y, B=x)
    forward["value"], swapped["value"] = swapped["value"], forward["value"]
    write_rows(path, lines)
    assert [d.split(": ", 1)[0] for d in JudgmentCache(path).dropped] == [f"{path}:1", f"{path}:4"]
    assert asks(path) == (4, 2)
    assert judged(path) == original


def test_a_row_stored_for_the_other_orientation_is_not_used(cache_file):
    path, original = cache_file
    lines = rows(path)
    lines[0]["a"], lines[3]["a"] = lines[3]["a"], lines[0]["a"]  # each row now says its A is the other response
    for line in (lines[0], lines[3]):
        line["check"] = row_check(line["key"], line["kind"], line["a"], line["value"])
    write_rows(path, lines)
    assert JudgmentCache(path).dropped == []  # well-formed rows, but for the other orientation
    assert asks(path) == (4, 2)
    assert judged(path) == original


def test_an_append_after_a_torn_line_starts_a_new_line_and_loses_no_judgment(tmp_path):
    path = tmp_path / "judgments.jsonl"
    oracle = Oracle()
    CachedJudge(oracle, JudgmentCache(path)).judge_pairs(["p"], ["long answer"], ["s"])
    text = path.read_text(encoding="utf-8")
    path.write_text(text + text[: len(text) // 2], encoding="utf-8")  # a crash in the middle of a second append
    CachedJudge(oracle, JudgmentCache(path)).judge_pairs(["q", "r"], ["x", "yy"], ["zz", "w"])
    reread = JudgmentCache(path)
    assert len(reread) == 3 and len(reread.dropped) == 1 and reread.dropped[0].startswith(f"{path}:2: ")
    again = CachedJudge(oracle, reread)
    again.judge_pairs(["p", "q", "r"], ["long answer", "x", "yy"], ["s", "zz", "w"])
    assert (again.hits, again.misses) == (3, 0)


def test_a_0xff_byte_makes_only_its_line_unreadable(cache_file):
    path, original = cache_file
    data = bytearray(path.read_bytes())
    data[data.index(b'"kind"', data.index(b"\n") + 1)] = 0xFF  # inside line 2
    path.write_bytes(bytes(data))
    cache = JudgmentCache(path)
    assert cache.dropped == [f"{path}:2: not valid UTF-8"] and len(cache) == 5
    assert asks(path) == (5, 1)
    assert judged(path) == original


def test_a_cached_score_that_is_not_a_number_is_asked_again(tmp_path):
    path = tmp_path / "judgments.jsonl"
    oracle = Oracle()
    assert CachedJudge(oracle, JudgmentCache(path)).score(["p", "p"], ["abc", "ab"]) == [3.0, 2.0]
    lines = rows(path)
    lines[0]["value"] = "three"
    lines[0]["check"] = row_check(lines[0]["key"], lines[0]["kind"], lines[0]["a"], lines[0]["value"])
    write_rows(path, lines)
    cache = JudgmentCache(path)
    assert cache.dropped == [f"{path}:1: score 'three' is not a number"]
    again = CachedJudge(oracle, cache)
    assert again.score(["p", "p"], ["abc", "ab"]) == [3.0, 2.0] and (again.hits, again.misses) == (1, 1)


def test_a_row_without_the_orientation_fields_is_asked_again(cache_file):
    path, original = cache_file
    lines = rows(path)
    write_rows(path, [{"key": line["key"], "kind": line["kind"], "value": line["value"]} for line in lines[:1]] + lines[1:])
    assert JudgmentCache(path).dropped == [f"{path}:1: written by an older dpokit, without the response-A digest and row check"]
    assert asks(path) == (5, 1)
    assert judged(path) == original
