"""Preference data from judged completions: K completions of a prompt with one score each become
training rows in the reader's ranked format ``{"prompt", "responses" (best first), "scores"}``.

Before pairing, a prompt's completions lose the ones that cannot be trained on: empty ones (nothing
but whitespace), those the judge could not score (NaN), and repeats of an earlier completion (the
reader refuses identical responses). Then, for scores ``s``:

* ``best_vs_worst`` -- one pair (the highest score, the lowest); dropped as a tie when
  ``s_best - s_worst <= min_margin`` (or the scores are equal);
* ``all_pairs`` -- every pair ``i, j`` with ``|s_i - s_j| > min_margin`` and ``s_i != s_j``, better first:
  ``K (K - 1) / 2`` pairs minus the ties;
* ``ranking`` -- one row with every kept completion ranked by score (for a listwise / Plackett-Luce
  loss), dropped when all its scores lie within ``min_margin`` of each other.

**Length-aware choice** (``prefer_shorter_within = m``, best_vs_worst only): the chosen completion is the
shortest (fewest tokens, ``lengths``) of those scoring within ``m`` of the best -- ties in length go to
the higher score -- so a judge's slight preference for a longer completion does not teach the policy to
write more; the rejected one is still the lowest-scored, and the pair is kept only when the chosen one
beats it by more than ``min_margin``. Scores 5.0 (40 tokens), 4.8 (12 tokens), 1.0 (30 tokens) with
``m = 0.5``: the chosen is the 12-token completion (4.8 >= 5.0 - 0.5), the rejected the one scoring 1.0.

A completion that did not stop before the token limit (``stopped`` false) is kept but marked: its row
carries ``truncated`` (one flag per response, the reader's optional field), so tokenization appends no
EOS to it -- the policy is not taught to stop where sampling was cut. With ``missing_eos_penalty > 0``
its score is lowered by that much before pairing (TRL's online DPO does the same); the rows' ``scores``
are the penalized ones, ``judgments.jsonl`` keeps the judge's own.

Every dropped completion or pair is counted (:class:`PairReport`), so a round reports how much of its
sampling was wasted on ties.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PAIR_MODES = ("best_vs_worst", "all_pairs", "ranking")
DROP_REASONS = ("empty", "unscored", "duplicate", "tie")  # what pairing drops; every round's record counts each


@dataclass
class PairReport:
    """Counts of what pairing kept and dropped in one round."""

    prompts: int = 0
    rows: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # by reason, one of DROP_REASONS
    shorter_chosen: int = 0  # pairs whose chosen completion is a shorter one than the best-scored (length-aware choice)

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "rows": self.rows, "dropped": dict(self.dropped), "shorter_chosen": self.shorter_chosen}


def penalized(scores: Sequence[float], stopped: Sequence[bool], penalty: float) -> list[float]:
    """``scores`` with ``penalty`` subtracted from each completion that did not stop (no EOS)."""
    return [float(s) - (0.0 if done else penalty) for s, done in zip(scores, stopped, strict=True)]


def _usable(completions: Sequence[str], scores: Sequence[float], report: PairReport) -> list[tuple[int, str, float]]:
    """(sample index, text, score) of the completions that can be trained on, first occurrence of each text."""
    kept: list[tuple[int, str, float]] = []
    seen: set[str] = set()
    for index, (text, score) in enumerate(zip(completions, scores, strict=True)):
        if not text.strip():
            report.dropped["empty"] += 1
        elif score is None or not math.isfinite(score):
            report.dropped["unscored"] += 1
        elif text in seen:
            report.dropped["duplicate"] += 1
        else:
            seen.add(text)
            kept.append((index, text, float(score)))
    return kept


def _row(
    prompt: Any, ranked: Sequence[tuple[int, str, float]], prompt_index: int, stopped: Sequence[bool] | None
) -> dict[str, Any]:
    row = {
        "prompt": prompt,
        "responses": [text for _, text, _ in ranked],
        "scores": [score for _, _, score in ranked],
        "prompt_index": prompt_index,
        "sample_indices": [index for index, _, _ in ranked],
    }
    if stopped is not None:
        row["truncated"] = [not stopped[index] for index, _, _ in ranked]
    return row


def shorter_near_best(kept: Sequence[tuple[int, str, float]], lengths: Sequence[int], within: float) -> tuple[int, str, float]:
    """Of ``kept`` (best first), the shortest completion scoring within ``within`` of the best; equal
    lengths go to the higher score, then the earlier sample."""
    near = [item for item in kept if item[2] >= kept[0][2] - within]
    return min(near, key=lambda item: (lengths[item[0]], -item[2], item[0]))


def prompt_rows(
    prompt: Any,
    prompt_index: int,
    completions: Sequence[str],
    scores: Sequence[float],
    *,
    mode: str,
    min_margin: float,
    report: PairReport,
    stopped: Sequence[bool] | None = None,
    missing_eos_penalty: float = 0.0,
    lengths: Sequence[int] | None = None,
    prefer_shorter_within: float | None = None,
) -> list[dict[str, Any]]:
    """The training rows of one prompt's judged completions (see the module docstring); ``stopped[k]``:
    whether completion ``k`` ended with a stop token (None: all did, no ``truncated`` field written);
    ``lengths[k]``: its length in tokens, for the length-aware choice (``prefer_shorter_within``)."""
    if mode not in PAIR_MODES:
        raise ValueError(f"unknown pair mode {mode!r}; choose from {', '.join(PAIR_MODES)}")
    if prefer_shorter_within is not None and (mode != "best_vs_worst" or lengths is None):
        raise ValueError("prefer_shorter_within needs mode best_vs_worst and the completions' lengths")
    report.prompts += 1
    if stopped is not None and missing_eos_penalty:
        scores = penalized(scores, stopped, missing_eos_penalty)
    kept = sorted(_usable(completions, scores, report), key=lambda item: (-item[2], item[0]))  # best first, stable
    if len(kept) < 2:
        return []

    def separated(better: float, worse: float) -> bool:
        return better > worse and better - worse > min_margin

    rows: list[dict[str, Any]] = []
    if mode == "all_pairs":
        for i in range(len(kept)):
            for j in range(i + 1, len(kept)):
                if separated(kept[i][2], kept[j][2]):
                    rows.append(_row(prompt, [kept[i], kept[j]], prompt_index, stopped))
                else:
                    report.dropped["tie"] += 1
    elif prefer_shorter_within is not None and lengths is not None:
        chosen = shorter_near_best(kept, lengths, prefer_shorter_within)
        if chosen is not kept[-1] and separated(chosen[2], kept[-1][2]):
            rows.append(_row(prompt, [chosen, kept[-1]], prompt_index, stopped))
            report.shorter_chosen += chosen is not kept[0]
        else:
            report.dropped["tie"] += 1
    elif separated(kept[0][2], kept[-1][2]):
        rows.append(_row(prompt, kept if mode == "ranking" else [kept[0], kept[-1]], prompt_index, stopped))
    else:
        report.dropped["tie"] += 1
    report.rows += len(rows)
    return rows


def build_rows(
    prompts: Sequence[Any],
    completions: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    mode: str,
    min_margin: float = 0.0,
    stopped: Sequence[Sequence[bool]] | None = None,
    missing_eos_penalty: float = 0.0,
    lengths: Sequence[Sequence[int]] | None = None,
    prefer_shorter_within: float | None = None,
) -> tuple[list[dict[str, Any]], PairReport]:
    """Rows for every prompt (``completions[i]`` / ``scores[i]`` / ``stopped[i]`` / ``lengths[i]``: prompt i's
    K completions, scores, whether each ended with a stop token, and their lengths in tokens)."""
    report = PairReport()
    rows: list[dict[str, Any]] = []
    for index, (prompt, texts, values) in enumerate(zip(prompts, completions, scores, strict=True)):
        rows += prompt_rows(
            prompt,
            index,
            texts,
            values,
            mode=mode,
            min_margin=min_margin,
            report=report,
            stopped=None if stopped is None else stopped[index],
            missing_eos_penalty=missing_eos_penalty,
            lengths=None if lengths is None else lengths[index],
            prefer_shorter_within=prefer_shorter_within,
        )
    return rows, report
