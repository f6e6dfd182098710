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

**A shifted domain** for out-of-distribution evaluation (:func:`make_news_corpus`): short news reports
from a second grammar with the same latent-mood mechanism but a different vocabulary and structure --
3-5 sentences of reported events and reactions ("officials welcomed the harbour upgrade on tuesday.",
"the budget remains uncertain, analysts said.", "according to the unions, the election had ended in
crisis."), about councils, budgets and transport rather than films, with its own positive, negative and
neutral words (the same VADER checks). It shares no noun with the reviews and almost no sentiment word
(only the intensifiers), so a model trained on reviews meets it as a text domain it never saw.
:data:`DOMAINS` names both generators.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

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


# ------------------------------------------------------------------------------------------------
# The shifted domain: news reports
# ------------------------------------------------------------------------------------------------

POSITIVE_NEWS_ADJECTIVES = ["strong", "successful", "promising", "encouraging", "secure", "safe", "stable", "robust"]
NEGATIVE_NEWS_ADJECTIVES = ["unstable", "uncertain", "troubled", "chaotic", "struggling", "delayed", "suspended"]
NEUTRAL_NEWS_ADJECTIVES = ["local", "regional", "annual", "early", "official", "national", "unchanged"]
POSITIVE_NEWS_NOUNS = ["success", "progress", "growth", "relief", "improvement", "agreement", "gains"]
NEGATIVE_NEWS_NOUNS = ["crisis", "collapse", "losses", "damage", "scandal", "failure", "disruption", "tensions"]
NEUTRAL_NEWS_NOUNS = ["changes", "talks", "results", "measures", "figures", "a review"]
POSITIVE_NEWS_VERBS = ["welcomed", "praised", "approved", "supported", "applauded"]
NEGATIVE_NEWS_VERBS = ["criticised", "rejected", "blamed", "condemned"]
NEUTRAL_NEWS_VERBS = ["discussed", "announced", "described", "confirmed", "outlined"]
NEWS_SUBJECTS = [
    "officials",
    "the council",
    "the minister",
    "residents",
    "analysts",
    "the mayor",
    "a spokesperson",
    "the unions",
    "local traders",
    "the ministry",
]
NEWS_TOPICS = [
    "budget",
    "harbour upgrade",
    "transport plan",
    "hospital funding",
    "election",
    "school reform",
    "water supply",
    "quarterly report",
    "bridge project",
    "tourism season",
]
NEWS_PLACES = ["the northern district", "the capital", "the coastal towns", "the region", "the city centre"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]

# Slots: {subject}, {topic}, {place}, {day}, {int} intensifier, {adj} sentiment adjective, {noun}
# sentiment noun, {verb} reaction verb.
NEWS_TEMPLATES = (
    "{subject} {verb} the {topic} on {day}.",
    "{subject} said the {topic} was {int} {adj}.",
    "the {topic} remains {adj}, {subject} said.",
    "according to {subject}, the {topic} had ended in {noun}.",
    "in {place}, {subject} reported {noun} after the {topic}.",
    "{subject} described the {topic} as {int} {adj}.",
    "the {topic} brought {noun} to {place}.",
    "analysts expect {noun} in {place} in the coming months.",
    "{subject} {verb} the decision on {day}, citing {noun}.",
)


def make_news_report(rng: random.Random) -> str:
    """One news report: a latent mood, then 3-5 templated sentences filled according to it."""
    mood = rng.uniform(-1.0, 1.0)
    sentences = []
    for _ in range(rng.randint(3, 5)):
        template = rng.choice(NEWS_TEMPLATES)
        noun = _sentiment_word(rng, mood, POSITIVE_NEWS_NOUNS, NEGATIVE_NEWS_NOUNS, NEUTRAL_NEWS_NOUNS)
        sentence = template.format(
            subject=rng.choice(NEWS_SUBJECTS),
            topic=rng.choice(NEWS_TOPICS),
            place=rng.choice(NEWS_PLACES),
            day=rng.choice(DAYS),
            int=rng.choice(INTENSIFIERS),
            adj=_sentiment_word(rng, mood, POSITIVE_NEWS_ADJECTIVES, NEGATIVE_NEWS_ADJECTIVES, NEUTRAL_NEWS_ADJECTIVES),
            noun=noun,
            verb=_sentiment_word(rng, mood, POSITIVE_NEWS_VERBS, NEGATIVE_NEWS_VERBS, NEUTRAL_NEWS_VERBS),
        )
        sentences.append(" ".join(sentence.split()))  # an empty intensifier leaves a double space
    return " ".join(sentences)


def make_news_corpus(num_texts: int, seed: int = 0) -> list[str]:
    """``num_texts`` news reports, deterministic in ``(num_texts, seed)``."""
    rng = random.Random(seed)
    return [make_news_report(rng) for _ in range(num_texts)]


DOMAINS: dict[str, Callable[[int, int], list[str]]] = {"reviews": make_corpus, "news": make_news_corpus}
"""The text domains by name: ``reviews`` (the SFT model's domain) and ``news`` (the shifted one)."""
