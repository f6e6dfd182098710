"""Reward functions the online tests judge with (``reward:tests.online.judges:...``).

``counting_length_reward`` appends one line per call to the file named by ``DPOKIT_TEST_JUDGE_LOG`` (when
set), so a test can count how often the loop asked the judge."""

from __future__ import annotations

import os


def counting_length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Longer completions score higher (number of words); each call logged."""
    log = os.environ.get("DPOKIT_TEST_JUDGE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{len(completions)}\n")
    return [float(len(text.split())) for text in completions]


def constant_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Every completion ties."""
    return [1.0 for _ in completions]
