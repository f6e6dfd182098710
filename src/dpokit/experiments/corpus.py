"""A deterministic corpus of short, review-like texts with varied sentiment.

This stands in for IMDb in the miniature of the paper's controlled-sentiment experiment. Nothing
is downloaded: every review is produced by a small templated grammar from a seeded
``random.Random``, so the same ``(num_texts, seed)`` always gives the same texts.

How a review is made:

1. Draw the review's latent *mood* ``m`` in [-1, 1] (uniform), as a reader's overall opinion.
2. Draw 2-4 sentences from the templates in :data:`TEMPLATES` (e.g. ``"the {noun} was {adj}."``,
   ``"i {verb} the {noun}."``, ``"the {noun} was {adj} but the {noun} was {adj}."``).
3. Fill every sentiment-bearing slot independently: positive with probability
   ``0.8 * (1 + m) / 2``, negative with ``0.8 * (1 - m) / 2``, neutral otherwise, from the word
   lists below. So sentences within a review agree more often than not (a prefix says something
   about the continuation, as in real reviews), yet most reviews mix polarities.

Every word in the positive/negative lists is in VADER's lexicon with the expected sign and every
neutral word is absent from it (checked by the tests), so the ground-truth reward of the experiment
(VADER compound score) sees the sentiment the grammar put in, including VADER's own handling of
``not``, ``but`` and intensifiers like ``very``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

POSITIVE_ADJECTIVES = [
    "good",
    "great",
    "wonderful",
    "excellent",
    "brilliant",
    "beautiful",
    "fun",
    "funny",
    "charming",
    "lovely",
    "amazing",
    "perfect",
    "clever",
    "fantastic",
    "enjoyable",
    "superb",
    "delightful",
]
NEGATIVE_ADJECTIVES = [
    "bad",
    "terrible",
    "awful",
    "boring",
    "dull",
    "horrible",
    "stupid",
    "weak",
    "poor",
    "painful",
    "ugly",
    "disappointing",
    "lame",
    "dreadful",
    "annoying",
]
NEUTRAL_ADJECTIVES = [
    "long",
    "short",
    "slow",
    "quiet",
    "simple",
    "typical",
    "old",
    "new",
    "dark",
    "loud",
    "predictable",
    "plain",
    "familiar",
]
POSITIVE_VERBS = ["loved", "enjoyed", "liked", "adored"]
NEGATIVE_VERBS = ["hated", "disliked"]
NEUTRAL_VERBS = ["watched", "saw", "expected", "remember"]
NOUNS = [
    "movie",
    "film",
    "story",
    "plot",
    "acting",
    "cast",
    "ending",
    "script",
    "music",
    "soundtrack",
    "dialogue",
    "director",
    "characters",
    "pacing",
    "effects",
    "scenes",
    "camera",
    "work",
]
FILMS = ["movie", "film", "picture", "show"]
INTENSIFIERS = ("very", "really", "quite", "so", "rather", "")

# Slots: {adj}/{adj2} sentiment adjectives, {verb} sentiment verb, {noun}/{noun2}, {film}, {int} intensifier.
TEMPLATES = (
    "the {noun} was {int} {adj}.",
    "i {verb} the {noun}.",
    "i {verb} this {film}.",
    "the {noun} was {adj} but the {noun2} was {adj2}.",
    "the {noun} is {adj} and the {noun2} is {adj2}.",
    "a {int} {adj} {film} with {adj2} {noun}.",
    "this {film} is {int} {adj}.",
    "it was {int} {adj} and {adj2}.",
    "i thought the {noun} was {adj}.",
    "overall a {adj} {film}.",
    "the {noun} felt {int} {adj}.",
    "what a {adj} {film}.",
    "i would {rec} it.",
)


def _sentiment_word(
    rng: random.Random, mood: float, positive: Sequence[str], negative: Sequence[str], neutral: Sequence[str]
) -> str:
    """A word whose polarity follows the review's mood: P(pos) = 0.8(1+m)/2, P(neg) = 0.8(1-m)/2."""
    u = rng.random()
    if u < 0.8 * (1 + mood) / 2:
        return rng.choice(positive)
    if u < 0.8:
        return rng.choice(negative)
    return rng.choice(neutral)


def make_review(rng: random.Random) -> str:
    """One review: a latent mood, then 2-4 templated sentences filled according to it."""
    mood = rng.uniform(-1.0, 1.0)
    sentences = []
    for _ in range(rng.randint(2, 4)):
        template = rng.choice(TEMPLATES)

        def adj() -> str:
            return _sentiment_word(rng, mood, POSITIVE_ADJECTIVES, NEGATIVE_ADJECTIVES, NEUTRAL_ADJECTIVES)

        rec_positive = rng.random() < (1 + mood) / 2
        sentence = template.format(
            noun=rng.choice(NOUNS),
            noun2=rng.choice(NOUNS),
            film=rng.choice(FILMS),
            int=rng.choice(INTENSIFIERS),
            adj=adj(),
            adj2=adj(),
            verb=_sentiment_word(rng, mood, POSITIVE_VERBS, NEGATIVE_VERBS, NEUTRAL_VERBS),
            rec="recommend" if rec_positive else "not recommend",
        )
        sentence = " ".join(sentence.split())  # an empty intensifier leaves a double space
        sentences.append(re.sub(r"\ba (?=[aeiou])", "an ", sentence))
    return " ".join(sentences)


def make_corpus(num_texts: int, seed: int = 0) -> list[str]:
    """``num_texts`` reviews, deterministic in ``(num_texts, seed)``."""
    rng = random.Random(seed)
    return [make_review(rng) for _ in range(num_texts)]
