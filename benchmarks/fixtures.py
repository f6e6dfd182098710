"""Deterministic benchmark fixtures, generated on the spot (nothing is downloaded).

* :func:`english_like_text` -- sentences over a Zipf-distributed vocabulary of ~6,000 words (the
  most common English function words plus pseudo-words built from English syllables), with
  capitals, commas and full stops, so a byte-level BPE learns realistic merges;
* :func:`train_bpe_tokenizer` -- a byte-level BPE tokenizer (4,096 tokens by default) trained on it,
  with pad/bos/eos, as a ``PreTrainedTokenizerFast``;
* :func:`generate_pairs` -- preference pairs ``{"prompt", "chosen", "rejected"}`` with prompts of
  about 95 tokens and responses of 60-160 tokens (under the 4,096-token tokenizer) by default;
* :func:`generate_conversations` -- the same in the conversational format (a multi-turn message list
  as the prompt, one assistant message per response), for a tokenizer with :data:`CHATML_TEMPLATE`;
* :data:`FIXTURES` -- the training benchmark's named mixes (short responses, response-heavy,
  conversational); :func:`write_pairs` writes one as JSONL;
* :func:`llama_config` -- the Llama-architecture model of the training benchmark (hidden 256,
  intermediate 688, 4 layers, 4 heads, 2 KV heads) for a given vocabulary.

Everything is a pure function of its seed, so every run and every trainer sees the same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

FUNCTION_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "it",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "have",
    "or",
    "by",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
    "way",
    "find",
    "use",
    "may",
    "water",
    "long",
    "little",
    "very",
    "after",
    "words",
    "called",
    "just",
    "where",
    "most",
    "know",
    "get",
    "through",
    "back",
    "much",
    "before",
    "go",
    "good",
    "new",
    "write",
    "our",
    "used",
    "me",
    "man",
    "too",
    "any",
    "day",
    "same",
    "right",
    "look",
    "think",
    "also",
    "around",
    "another",
    "came",
    "come",
    "work",
    "three",
    "word",
    "must",
    "because",
    "does",
    "part",
    "even",
    "place",
    "well",
    "such",
    "here",
    "take",
    "why",
    "things",
    "help",
    "put",
    "years",
    "different",
    "away",
    "again",
    "off",
    "went",
    "old",
    "number",
    "great",
    "tell",
    "men",
    "say",
    "small",
    "every",
    "found",
    "still",
    "between",
    "name",
    "should",
    "home",
    "big",
    "give",
    "air",
    "line",
    "set",
    "own",
    "under",
    "read",
    "last",
    "never",
    "us",
    "left",
    "end",
    "along",
    "while",
    "might",
    "next",
    "sound",
    "below",
    "saw",
    "something",
    "thought",
    "both",
    "few",
    "those",
    "always",
    "looked",
    "show",
    "large",
    "often",
    "together",
    "asked",
    "house",
    "world",
]

ONSETS = (
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "st",
    "tr",
    "pl",
    "cr",
    "sh",
    "ch",
    "th",
    "br",
    "gr",
)
VOWELS = ("a", "e", "i", "o", "u", "ea", "ou", "ai", "io", "y")
CODAS = ("", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "m", "ct", "rt")
SUFFIXES = ("", "", "", "s", "ed", "ing", "er", "ly", "tion", "ment", "ness", "al", "ive", "able")


@lru_cache(maxsize=4)
def vocabulary(size: int = 6000, seed: int = 1234) -> tuple[str, ...]:
    """Function words first (most frequent), then distinct pseudo-words of 1-3 syllables."""
    rng = random.Random(seed)
    words = list(dict.fromkeys(FUNCTION_WORDS))
    seen = set(words)
    while len(words) < size:
        syllables = rng.choices((1, 2, 3), weights=(3, 5, 2))[0]
        stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        word = stem + rng.choice(SUFFIXES)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return tuple(words)


@lru_cache(maxsize=4)
def _zipf_weights(size: int, exponent: float = 1.07) -> tuple[float, ...]:
    return tuple(1.0 / (rank + 2.7) ** exponent for rank in range(size))


def _sentence(rng: random.Random, words: tuple[str, ...], weights: tuple[float, ...], low: int, high: int) -> list[str]:
    picked = rng.choices(words, weights=weights, k=rng.randint(low, high))
    picked[0] = picked[0].capitalize()
    if len(picked) > 8 and rng.random() < 0.5:
        cut = rng.randint(3, len(picked) - 3)
        picked[cut] += ","
    return picked


def english_like_words(rng: random.Random, num_words: int) -> str:
    """About ``num_words`` words of sentences (6-22 words each), the last one closed by a full stop."""
    words, weights = vocabulary(), _zipf_weights(len(vocabulary()))
    out: list[str] = []
    while len(out) < num_words:
        sentence = _sentence(rng, words, weights, 6, 22)
        sentence[-1] += "."
        out.extend(sentence)
    out = out[:num_words]
    if not out[-1].endswith("."):
        out[-1] = out[-1].rstrip(",") + "."
    return " ".join(out)


def english_like_text(num_lines: int = 8_000, seed: int = 0) -> list[str]:
    """Training text for the tokenizer: ``num_lines`` paragraphs of 20-80 words."""
    rng = random.Random(seed)
    return [english_like_words(rng, rng.randint(20, 80)) for _ in range(num_lines)]


# ChatML: the turn markers are special tokens of the chat variant of the tokenizer (``chat=True``).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int, seed: int, chat: bool = False) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"] + (CHAT_SPECIAL_TOKENS if chat else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(english_like_text(seed=seed), trainer=trainer)
    return backend.to_str()


def train_bpe_tokenizer(vocab_size: int = 4096, seed: int = 0, *, chat: bool = False):
    """A byte-level BPE ``PreTrainedTokenizerFast`` of ``vocab_size`` tokens (pad/bos/eos included).

    ``chat=True``: ``<|im_start|>``/``<|im_end|>`` are special tokens too (still ``vocab_size`` in all)
    and the tokenizer carries :data:`CHATML_TEMPLATE`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, seed, chat)),
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        **({"additional_special_tokens": CHAT_SPECIAL_TOKENS} if chat else {}),
    )
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# Words per token-target, measured for the 4,096-token tokenizer on this text (~1.3 tokens a word).
WORDS_PER_TOKEN = 0.63


def generate_pairs(
    n: int,
    seed: int = 0,
    *,
    prompt_tokens: tuple[int, int] = (85, 105),
    response_tokens: tuple[int, int] = (60, 160),
) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}``: a prompt (a question ending in '?') and two
    responses, each starting with a space. Lengths are drawn in tokens and converted to words."""
    rng = random.Random(seed)

    def words_for(tokens: int) -> int:
        return max(3, round(tokens * WORDS_PER_TOKEN))

    rows = []
    for _ in range(n):
        prompt = english_like_words(rng, words_for(rng.randint(*prompt_tokens)))[:-1] + "?"
        chosen = " " + english_like_words(rng, words_for(rng.randint(*response_tokens)))
        rejected = " " + english_like_words(rng, words_for(rng.randint(*response_tokens)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def generate_conversations(
    n: int,
    seed: int = 0,
    *,
    prompt_tokens: tuple[int, int] = (60, 140),
    response_tokens: tuple[int, int] = (60, 200),
    turns: tuple[int, int] = (1, 3),
) -> list[dict[str, list[dict[str, str]]]]:
    """``n`` conversational rows: ``prompt`` is ``turns`` user messages with an assistant reply between
    consecutive ones (``prompt_tokens`` of content in all, split evenly), ``chosen``/``rejected`` one
    assistant message each. This is the format both dpokit's reader and TRL take as is."""
    rng = random.Random(seed)

    def words_for(tokens: int) -> int:
        return max(3, round(tokens * WORDS_PER_TOKEN))

    rows = []
    for _ in range(n):
        user_turns = rng.randint(*turns)
        messages = 2 * user_turns - 1
        budget = rng.randint(*prompt_tokens)
        prompt = []
        for index in range(messages):
            text = english_like_words(rng, words_for(budget // messages))
            if index % 2 == 0:
                prompt.append({"role": "user", "content": text[:-1] + "?"})
            else:
                prompt.append({"role": "assistant", "content": text})
        chosen, rejected = (english_like_words(rng, words_for(rng.randint(*response_tokens))) for _ in range(2))
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


@dataclass(frozen=True)
class FixtureSpec:
    """One length mix of the training benchmark; every field can be changed from the command line."""

    name: str
    description: str
    pairs: int
    prompt_tokens: tuple[int, int]
    response_tokens: tuple[int, int]
    conversational: bool = False
    seed: int = 0


FIXTURES = {
    "short": FixtureSpec("short", "short responses: prompts ~95 tokens, responses 60-160", 512, (85, 105), (60, 160)),
    "response_heavy": FixtureSpec(
        "response_heavy", "response-heavy: prompts ~40 tokens, responses 150-350", 256, (35, 45), (150, 350)
    ),
    "conversational": FixtureSpec(
        "conversational",
        "conversational: 1-3 user turns (~60-140 tokens of content) through ChatML, responses 60-200",
        256,
        (60, 140),
        (60, 200),
        conversational=True,
    ),
}


def fixture_rows(spec: FixtureSpec) -> list[dict]:
    """The rows of ``spec`` (plain or conversational), a pure function of its fields."""
    make = generate_conversations if spec.conversational else generate_pairs
    return make(spec.pairs, spec.seed, prompt_tokens=spec.prompt_tokens, response_tokens=spec.response_tokens)


def write_pairs(spec: FixtureSpec, path) -> None:
    """Write the rows of ``spec`` to ``path`` as JSONL."""
    import json
    from pathlib import Path

    Path(path).write_text("".join(json.dumps(row) + "\n" for row in fixture_rows(spec)), encoding="utf-8")


def llama_config(vocab_size: int = 4096, *, max_positions: int = 2048, **overrides):
    """The benchmark model: Llama architecture, hidden 256, intermediate 688, 4 layers, 4 heads, 2 KV heads."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def token_stats(rows: list[dict[str, str]], tokenizer) -> dict[str, float]:
    """Mean prompt tokens and min/mean/max response tokens of ``rows`` under ``tokenizer``."""
    prompts = [len(ids) for ids in tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]]
    responses = [
        len(ids) for ids in tokenizer([r[k] for r in rows for k in ("chosen", "rejected")], add_special_tokens=False)["input_ids"]
    ]
    return {
        "prompt_mean": sum(prompts) / len(prompts),
        "response_min": min(responses),
        "response_mean": sum(responses) / len(responses),
        "response_max": max(responses),
    }
