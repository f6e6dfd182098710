"""The word-level token cache (``dpokit.data.encode``) against the Rust tokenizer itself.

The cache is exact when a space after a non-whitespace character always starts a new pre-token piece
and a word is cut the same way on its own (module docstring of ``dpokit.data.encode``). These tests
check that premise for every supported pre-tokenizer on a wide sweep of Unicode characters, then
compare whole encodings on random texts built from the awkward cases (runs of whitespace, newlines,
tabs, no-break spaces, contractions, digit runs, combining marks, CJK, emoji, added tokens).
"""

from __future__ import annotations

import logging
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dpokit.data import encode
from dpokit.data.encode import Ragged, encode_texts, word_cache_unsupported
from tests.helpers import generated_text, tiny_tokenizer

PATTERNS = {"gpt2": encode._GPT2_PATTERN, "llama3": encode._LLAMA3_PATTERN, "qwen2": encode._QWEN2_PATTERN}


def split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


SUPPORTED_PRE_TOKENIZERS = {
    "byte_level": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "byte_level_prefix_space": lambda: pre_tokenizers.ByteLevel(add_prefix_space=True),
    "split_gpt2": lambda: split_then_bytes(encode._GPT2_PATTERN),
    "split_llama3": lambda: split_then_bytes(encode._LLAMA3_PATTERN),
    "split_qwen2": lambda: split_then_bytes(encode._QWEN2_PATTERN),
    "whitespace": pre_tokenizers.Whitespace,
    "whitespace_split": pre_tokenizers.WhitespaceSplit,
}

ATOMS = [
    "the", "The", "cat", "é", "e\u0301", "ß", "İ", "naïve", "'s", "'S", "'ll", "1", "12", "12345", ".", ",", "!?", "...",
    " ", " ", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\u2009", "中文", "日本", "🙂", "👍🏽", "\u0301",
    "x", "dog", "ran", "A", "<|eos|>", "new token",
]  # fmt: skip
texts_strategy = st.lists(st.lists(st.sampled_from(ATOMS), min_size=1, max_size=14).map("".join), min_size=1, max_size=12)


def probe_characters() -> list[str]:
    """Every non-whitespace code point of planes 0-2 (all scripts, symbols, emoji, CJK) and every
    97th code point above (unassigned and private-use ranges behave as a class)."""
    points = [*range(0x30000), *range(0x30000, 0x110000, 97)]
    return [chr(c) for c in points if not 0xD800 <= c < 0xE000 and not chr(c).isspace()]


@pytest.mark.parametrize("name", sorted(SUPPORTED_PRE_TOKENIZERS))
def test_a_space_after_any_non_whitespace_character_starts_a_piece(name):
    """The premise of the word cache, on the Rust pre-tokenizer itself: in ``"<c> x<d> x..."`` a
    piece boundary falls right before every space."""
    characters = probe_characters()
    text = "".join(c + " x" for c in characters)
    pieces = SUPPORTED_PRE_TOKENIZERS[name]().pre_tokenize_str(text)
    boundaries = {start for _, (start, _) in pieces} | {end for _, (_, end) in pieces}
    missing = [text[i - 1] for i in range(1, len(text), 3) if i not in boundaries]
    assert not missing, f"{name}: no boundary before the space after {[hex(ord(c)) for c in missing[:10]]}"


@given(
    st.lists(st.sampled_from(ATOMS), min_size=1, max_size=10).map("".join),
    st.lists(st.sampled_from(ATOMS), max_size=10).map("".join),
)
@settings(max_examples=300, deadline=None)
def test_nfc_and_lowercase_never_act_across_a_space(left, right):
    for normalizer in (normalizers.NFC(), normalizers.Lowercase()):
        assert normalizer.normalize_str(left + " " + right) == normalizer.normalize_str(left) + normalizer.normalize_str(
            " " + right
        )


@cache
def trained(kind: str, pre_tokenizer: str, normalizer: str | None = None) -> PreTrainedTokenizerFast:
    """A real fast tokenizer of the given model kind and pre-tokenizer, trained on the spot, with added
    tokens: special <|eos|>/<|bos|>, a plain one containing a space, and one matched after normalization."""
    corpus = generated_text(300) + ["it's 12345 naïve café 中文 🙂 The cat's. Ça va? İstanbul ß"] * 5
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    if kind == "bpe":
        backend = Tokenizer(models.BPE(unk_token=None))
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
    elif kind == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", *specials], show_progress=False)
    else:
        backend = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=["[UNK]", *specials], unk_token="[UNK]", show_progress=False
        )
    backend.pre_tokenizer = SUPPORTED_PRE_TOKENIZERS[pre_tokenizer]()
    if normalizer == "nfc":
        backend.normalizer = normalizers.NFC()
    elif normalizer == "nfc_lowercase":
        backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    tokenizer.add_tokens(["new token", "[X]"])
    return tokenizer


TOKENIZERS = [
    ("bpe", "byte_level", None),
    ("bpe", "byte_level_prefix_space", None),
    ("bpe", "split_gpt2", "nfc_lowercase"),
    ("bpe", "split_llama3", None),
    ("bpe", "split_qwen2", "nfc"),
    ("wordpiece", "whitespace", None),
    ("unigram", "whitespace_split", "nfc"),
]


@pytest.mark.parametrize("spec", TOKENIZERS, ids=["-".join(filter(None, spec)) for spec in TOKENIZERS])
@given(texts=texts_strategy)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_word_cache_gives_the_tokenizers_own_ids(spec, texts):
    tokenizer = trained(*spec)
    assert word_cache_unsupported(tokenizer) is None
    cached = encode._encode_by_words(tokenizer, texts)
    assert cached is not None, "the self-check found a difference"
    assert cached.tolist() == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_word_cache_equals_batched_encoder_on_a_realistic_corpus():
    tokenizer = tiny_tokenizer(vocab_size=512)
    texts = generated_text(2000, seed=3) + [" leading", "trailing ", "a  b", "x\n y", "<|eos|> z", "", " "]
    cached = encode._encode_by_words(tokenizer, texts)
    whole = encode._encode_whole(tokenizer, texts)
    assert cached is not None
    np.testing.assert_array_equal(cached.offsets, whole.offsets)
    np.testing.assert_array_equal(cached.tokens, whole.tokens)


def test_tokenizers_the_word_cache_cannot_prove_exact_are_named_and_encoded_whole():
    metaspace = Tokenizer(models.BPE())
    metaspace.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])  # Llama-2 shape
    assert "normalizer" in word_cache_unsupported(PreTrainedTokenizerFast(tokenizer_object=metaspace))

    dropout = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    dropout.model.dropout = 0.1
    assert "dropout" in word_cache_unsupported(PreTrainedTokenizerFast(tokenizer_object=dropout))

    no_regex = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    no_regex.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # BPE over the whole text
    assert "pre-tokenizer" in word_cache_unsupported(PreTrainedTokenizerFast(tokenizer_object=no_regex))

    other_split = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    other_split.pre_tokenizer = split_then_bytes(r"\S+ \S+|\s+")  # pieces span spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=other_split)
    assert "pre-tokenizer" in word_cache_unsupported(tokenizer)
    texts = ["one two three four", "five six"]
    assert encode_texts(tokenizer, texts).tolist() == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    truncating = tiny_tokenizer()
    truncating.backend_tokenizer.enable_truncation(4)
    assert "truncation" in word_cache_unsupported(truncating)
    long_text = "the same words again and again and again"
    assert len(encode_texts(truncating, [long_text]).row(0)) > 4  # the backend's truncation does not leak in


def test_a_wrong_premise_is_caught_by_the_self_check_and_falls_back(monkeypatch, caplog):
    """If a pattern were wrongly listed as space-safe, the sample check would find it and every text
    would be encoded whole (with a warning) -- never wrong ids."""
    pattern = r" ?\S+ \S+|\s+"  # pairs of words: a piece holds a space in its middle
    backend = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    backend.pre_tokenizer = split_then_bytes(pattern)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eos|>")
    monkeypatch.setattr(encode, "SPACE_SAFE_PATTERNS", encode.SPACE_SAFE_PATTERNS | {pattern})
    assert word_cache_unsupported(tokenizer) is None
    texts = generated_text(50)
    with caplog.at_level(logging.WARNING, logger="dpokit.data.encode"):
        ids = encode_texts(tokenizer, texts)
    assert "disagrees" in caplog.text
    assert ids.tolist() == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_python_tokenizers_go_through_their_own_call():
    from transformers import ByT5Tokenizer  # a Python (slow) tokenizer that needs no vocabulary file

    tokenizer = ByT5Tokenizer()
    assert word_cache_unsupported(tokenizer) == "not a fast tokenizer"
    texts = ["a b c", "naïve 🙂", "a b c"]
    assert encode_texts(tokenizer, texts).tolist() == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@given(st.lists(st.lists(st.integers(0, 50), max_size=5), max_size=8), st.data())
@settings(max_examples=100, deadline=None)
def test_ragged_take_splice_and_join_match_list_operations(rows, data):
    ragged = Ragged.from_lists(rows)
    assert ragged.tolist() == rows
    if rows:
        index = data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=10))
        assert ragged.take(np.asarray(index, dtype=np.int64)).tolist() == [rows[i] for i in index]
        pieces = [[99], [7, 7]]
        all_rows = rows + pieces
        groups = data.draw(st.lists(st.lists(st.integers(0, len(all_rows) - 1), max_size=3), max_size=6))
        flat = np.asarray([i for g in groups for i in g], dtype=np.int64)
        bounds = np.concatenate(([0], np.cumsum([len(g) for g in groups]))).astype(np.int64)
        spliced = ragged.splice(Ragged.from_lists(pieces), flat, bounds)
        assert spliced.tolist() == [[t for i in g for t in all_rows[i]] for g in groups]
    assert Ragged.concat([ragged, ragged]).tolist() == rows + rows


def test_blocks_of_texts_join_seamlessly(monkeypatch):
    tokenizer = tiny_tokenizer()
    texts = generated_text(40, seed=5) + [" leading space", "x\n  indented"]
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    monkeypatch.setattr(encode, "_WORD_CACHE_BLOCK", 7)
    assert encode_texts(tokenizer, texts).tolist() == expected
