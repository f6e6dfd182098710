"""The ground-truth reward of the sentiment experiment: VADER's compound sentiment score.

VADER (Hutto & Gilbert, 2014; PyPI ``vaderSentiment``) is a lexicon-and-rules sentiment analyser
this project did not write. Its *compound* score lies in [-1, 1] (most negative to most positive).
As the paper scores the review ``x + y`` with a classifier's p(positive | x, y), the reward here is
``compound(prompt + completion)``: the policy is judged on the whole review it completes, and a
negative prefix can still be turned around (VADER weighs a clause after "but" more).

``vader_reward(prompts=..., completions=...)`` has the signature TRL's online trainers and
``dpokit frontier --reward dpokit.experiments.reward:vader_reward`` both call.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _analyzer() -> Any:  # vaderSentiment has no type information
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_score(text: str) -> float:
    """VADER compound score of ``text`` in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


def vader_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """``compound(prompt + completion)`` for each pair; extra keyword arguments (TRL's) are ignored."""
    return [vader_score(_text(p) + _text(c)) for p, c in zip(prompts, completions, strict=True)]


def _text(value: Any) -> str:
    # TRL passes conversational prompts/completions as lists of messages; keep only their text.
    if isinstance(value, str):
        return value
    return " ".join(str(message.get("content", "")) for message in value)
