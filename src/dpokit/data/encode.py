"""Texts -> token ids (no special tokens), as flat arrays, encoding each distinct *word* once.

:func:`encode_texts` returns the ids ``tokenizer(text, add_special_tokens=False)`` gives, for many
texts at once, as a :class:`Ragged` (one flat int32 array and row offsets). Three paths, all giving
those same ids:

1. **Word cache** (fast tokenizers whose pipeline cuts text at spaces; see below). Each text is split
   at its spaces (``"a b c" -> "a", " b", " c"``; the space goes with the word after it), each
   distinct word is encoded once by the Rust tokenizer, and every text is the concatenation of its
   words' ids, gathered in one Arrow ``take``. Splitting and de-duplication run in Arrow (C++), so a dataset of
   millions of words costs a few hundred milliseconds plus one encode per *distinct* word, instead of
   running the whole pipeline over every occurrence of every word.
2. **Batched Rust encoder** (``encode_batch_fast``) over the distinct texts, for any other fast
   tokenizer, and for the texts the word cache cannot prove it encodes exactly.
3. ``tokenizer(texts)`` for slow (Python) tokenizers, or a backend with truncation/padding switched on.

Why the word cache is exact
    A fast tokenizer runs: added-token extraction -> normalizer -> pre-tokenizer (cuts the text into
    pieces) -> model (each piece on its own) -> post-processor (adds nothing without special tokens).
    So ``encode(a + b) == encode(a) + encode(b)`` whenever (i) no added token occurs in the text,
    (ii) the normalizer maps ``a + b`` to ``norm(a) + norm(b)``, and (iii) the pre-tokenizer puts a
    piece boundary between ``a`` and ``b`` and cuts ``b`` on its own into the same pieces. The word
    cache cuts only before a space whose previous character is not whitespace, and uses itself only
    when all three hold:

    * normalizer: none, ``NFC`` (a space is a starter that composes with nothing, so NFC never acts
      across it) or ``Lowercase`` (per character), or a ``Sequence`` of these;
    * pre-tokenizer: ``ByteLevel`` with its GPT-2 regex, a ``Split`` with one of the GPT-2 / GPT-4
      (Llama-3) / Qwen2 regexes followed by ``ByteLevel(use_regex=False)``, ``Whitespace`` or
      ``WhitespaceSplit``. In each of those regexes a space can only be the *first* character of a
      piece or part of an all-whitespace piece, and every character is matched, so a space after a
      non-whitespace character always starts a piece; the only look-ahead, ``\\s+(?!\\S)``, acts on
      whitespace runs, and no word but a text's last ends in whitespace (see the glue, below).
      ``ByteLevel``'s ``add_prefix_space`` only acts on a piece that does not start with a space,
      i.e. on the text's first word, which is encoded exactly as in the whole text;
    * model: ``BPE`` without dropout, ``WordPiece``, ``WordLevel`` or ``Unigram`` (deterministic, per piece);
    * no truncation or padding set on the backend.

    Where a space follows whitespace or another space (``"a\\n b"``, double spaces, indented code) the
    pieces are glued back into one word (``"x\\n    y z" -> "x\\n    y", " z"``); texts in which an
    added token's content occurs (raw, or after the normalizer) are encoded whole by path 2. Finally
    a sample of the texts is encoded both ways and compared; any difference switches the whole call to
    path 2 with a warning.
    ``tests/data/test_encode.py`` checks the rules against the Rust tokenizer for every supported
    pre-tokenizer, on every character of Unicode planes 0-2 (and a sweep of the rest) before a space,
    and on random texts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from dpokit.compat import tokenizer_backend, tokenizer_component_state

logger = logging.getLogger(__name__)

_ENCODE_BATCH = 4096
_SELF_CHECK_TEXTS = 64
_WORD_CACHE_BLOCK = 262_144

# The pre-tokenizer regexes whose pieces never hold a space except as their first character or in an
# all-whitespace piece (see the module docstring): GPT-2, GPT-4 cl100k / Llama-3, Qwen2.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPACE_SAFE_PATTERNS = frozenset({_GPT2_PATTERN, _LLAMA3_PATTERN, _QWEN2_PATTERN})
_SAFE_NORMALIZERS = frozenset({"NFC", "Lowercase"})
_SAFE_MODELS = frozenset({"BPE", "WordPiece", "WordLevel", "Unigram"})


@dataclass
class Ragged:
    """Rows of token ids back to back: row ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (rows + 1,) int64, offsets[0] == 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def tolist(self) -> list[list[int]]:
        flat = self.tokens.tolist()
        bounds = self.offsets.tolist()
        return [flat[bounds[i] : bounds[i + 1]] for i in range(len(self))]

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
        return cls(tokens, offsets)

    @classmethod
    def concat(cls, parts: Sequence[Ragged]) -> Ragged:
        """The rows of ``parts[0]``, then of ``parts[1]``, ..."""
        if not parts:
            return cls(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64))
        tokens = np.concatenate([p.tokens for p in parts]).astype(np.int32, copy=False)
        offsets = np.zeros(sum(len(p) for p in parts) + 1, dtype=np.int64)
        np.cumsum(np.concatenate([p.lengths() for p in parts]), out=offsets[1:])
        return cls(tokens, offsets)

    def take(self, index: np.ndarray) -> Ragged:
        """The rows ``index[0], index[1], ...`` (repeats allowed). One pass in Arrow, whose memory
        pool reuses its buffers: numpy's repeat/arange/gather would allocate (and fault in) several
        token-sized temporaries."""
        import pyarrow as pa
        import pyarrow.compute as pc

        rows = pa.LargeListArray.from_arrays(pa.array(self.offsets), pa.array(self.tokens))
        index = np.asarray(index)
        taken = pc.take(rows, pa.array(index if index.dtype in (np.int32, np.int64) else index.astype(np.int64)))
        tokens = taken.flatten().to_numpy()
        offsets = taken.offsets.to_numpy()
        return Ragged(tokens.astype(np.int32, copy=False), offsets - offsets[0] if len(offsets) and offsets[0] else offsets)

    def join_rows(self, group_offsets: np.ndarray) -> Ragged:
        """Merge consecutive rows: new row ``j`` = rows ``group_offsets[j]:group_offsets[j + 1]`` back to back."""
        return Ragged(self.tokens, self.offsets[np.asarray(group_offsets, dtype=np.int64)])

    def splice(self, pieces: Ragged, rows: np.ndarray, groups: np.ndarray) -> Ragged:
        """New rows made of old rows and extra ``pieces``: row ``j`` is the rows ``rows[groups[j]:groups[j + 1]]``
        back to back, where ``rows`` index this ragged's rows first, then ``pieces``' (one pass)."""
        return Ragged.concat([self, pieces]).take(rows).join_rows(groups)


# ----------------------------------------------------------------------------------------------
# Which tokenizers the word cache is exact for


def _normalizer_ok(state: dict[str, Any] | None) -> bool:
    if state is None:
        return True
    if state.get("type") == "Sequence":
        return all(_normalizer_ok(s) for s in state.get("normalizers", []))
    return state.get("type") in _SAFE_NORMALIZERS


def _pre_tokenizer_ok(state: dict[str, Any] | None) -> bool:
    if state is None:
        return False
    kind = state.get("type")
    if kind == "ByteLevel":
        return bool(state.get("use_regex", True))
    if kind in ("Whitespace", "WhitespaceSplit"):
        return True
    if kind == "Sequence":
        steps = state.get("pretokenizers", [])
        if len(steps) == 1:
            return _pre_tokenizer_ok(steps[0])
        if len(steps) == 2:
            split, byte_level = steps
            return (
                split.get("type") == "Split"
                and split.get("pattern", {}).get("Regex") in SPACE_SAFE_PATTERNS
                and split.get("behavior") == "Isolated"
                and not split.get("invert", False)
                and byte_level.get("type") == "ByteLevel"
                and not byte_level.get("use_regex", True)
            )
    return False


def word_cache_unsupported(tokenizer: Any) -> str | None:
    """Why :func:`encode_texts` cannot use the word cache for ``tokenizer`` (None: it can)."""
    backend = tokenizer_backend(tokenizer)
    if backend is None:
        return "not a fast tokenizer"
    if backend.truncation is not None or backend.padding is not None:
        return "truncation or padding is set on the backend tokenizer"
    model = backend.model
    if type(model).__name__ not in _SAFE_MODELS:
        return f"model {type(model).__name__}"
    if getattr(model, "dropout", None):
        return "BPE dropout makes encodings random"
    if not _normalizer_ok(tokenizer_component_state(backend.normalizer)):
        return f"normalizer {tokenizer_component_state(backend.normalizer)}"
    if not _pre_tokenizer_ok(tokenizer_component_state(backend.pre_tokenizer)):
        return f"pre-tokenizer {tokenizer_component_state(backend.pre_tokenizer)}"
    return None


# ----------------------------------------------------------------------------------------------
# Encoding


def _encode_whole(tokenizer: Any, texts: list[str]) -> Ragged:
    """Paths 2 and 3: each distinct text encoded once, whole."""
    position: dict[str, int] = {}
    for text in texts:
        position.setdefault(text, len(position))
    unique = list(position)
    backend = tokenizer_backend(tokenizer)
    if backend is not None and backend.truncation is None and backend.padding is None:
        ids = _encode_list(backend, unique)
    else:
        ids = tokenizer(unique, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    rows = Ragged.from_lists(ids)
    if len(unique) == len(texts):
        return rows
    return rows.take(np.fromiter(map(position.__getitem__, texts), dtype=np.int64, count=len(texts)))


def _added_token_pattern(backend: Any) -> re.Pattern[str] | None:
    contents = sorted(
        {token.content for token in backend.get_added_tokens_decoder().values() if token.content}, key=len, reverse=True
    )
    return re.compile("|".join(map(re.escape, contents))) if contents else None


def _words_with_added_tokens(backend: Any, added: re.Pattern[str], words: list[str]) -> np.ndarray:
    """Which words, with their leading space (raw or normalized), hold an added token's content."""
    normalizer = backend.normalizer

    def holds_added(word: str) -> bool:
        spaced = " " + word
        return bool(added.search(spaced) or (normalizer is not None and added.search(normalizer.normalize_str(spaced))))

    return np.fromiter(map(holds_added, words), dtype=bool, count=len(words))


def _encode_list(backend: Any, texts: list[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_BATCH):
        ids.extend(
            encoding.ids for encoding in backend.encode_batch_fast(texts[start : start + _ENCODE_BATCH], add_special_tokens=False)
        )
    return ids


def _encode_by_words(tokenizer: Any, texts: list[str]) -> Ragged | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    backend = tokenizer_backend(tokenizer)
    column = pa.array(texts, type=pa.large_string() if sum(map(len, texts)) >= 2**29 else pa.string())
    # Cut every text at every space, in Arrow, and number the distinct words.
    parts = pc.split_pattern(column, pattern=" ")
    text_parts = parts.offsets.to_numpy().astype(np.int64)  # text t = parts text_parts[t]:text_parts[t + 1] (at least one)
    encoded = parts.flatten().dictionary_encode()
    word_of_part = encoded.indices.to_numpy()
    words: list[str] = encoded.dictionary.to_pylist()

    # Texts holding an added token's content are cut differently by the tokenizer: encoded whole.
    whole = np.zeros(len(texts), dtype=bool)
    added = _added_token_pattern(backend)
    if added is not None:
        has_added = _words_with_added_tokens(backend, added, words)
        if has_added.any():
            whole |= np.logical_or.reduceat(has_added[word_of_part], text_parts[:-1])
        if any(any(c.isspace() for c in t.content) for t in backend.get_added_tokens_decoder().values()):
            whole |= np.fromiter((added.search(t) is not None for t in texts), dtype=bool, count=len(texts))

    # A space right after whitespace or after another space ("a\n b", "a  b", indented code) is no
    # provable boundary: such a part is glued back onto the previous one. A text's leading space is the
    # exception: its empty first word encodes to nothing and the rest of the text starts at a boundary
    # (the empty text itself is encoded whole).
    open_end = np.fromiter((not w or w[-1].isspace() for w in words), dtype=bool, count=len(words))
    glue = np.zeros(len(word_of_part), dtype=bool)
    glue[1:] = open_end[word_of_part[:-1]]
    glue[text_parts[:-1]] = False
    empty_word = words.index("") if "" in words else -1
    leading_space = text_parts[:-1][word_of_part[text_parts[:-1]] == empty_word]
    single = np.diff(text_parts) == 1
    whole[single & (word_of_part[text_parts[:-1]] == empty_word)] = True
    glue[leading_space[leading_space + 1 < len(glue)] + 1] = False
    if glue.any():  # chunks = runs of glued parts, joined with their spaces and numbered again, in Arrow
        starts = np.flatnonzero(~glue)
        chunks = pa.LargeListArray.from_arrays(pa.array(np.append(starts, len(word_of_part))), parts.flatten())
        encoded = pc.binary_join(chunks, " ").dictionary_encode()
        word_of_part = encoded.indices.to_numpy()
        words = encoded.dictionary.to_pylist()
        text_parts = np.searchsorted(starts, text_parts)  # texts start at chunk starts
        empty_word = words.index("") if "" in words else -1

    # The word table: rows 0..F-1 hold the words that start a text, as they are; rows F.. hold " " +
    # every word. Each part (now: chunk) maps to one row.
    first_parts = text_parts[:-1]
    first_words = np.unique(word_of_part[first_parts])
    first_list = first_words.tolist()
    first_ids = _encode_list(backend, [words[w] for w in first_list])
    if empty_word in first_list:
        first_ids[first_list.index(empty_word)] = []  # (ByteLevel's add_prefix_space would make "" a space)
    table = Ragged.from_lists(first_ids + _encode_list(backend, [" " + w for w in words]))
    table_rows = np.add(word_of_part, len(first_words), dtype=np.int64 if len(table) >= 2**31 else np.int32)
    table_rows[first_parts] = np.searchsorted(first_words, word_of_part[first_parts])
    result = table.take(table_rows).join_rows(text_parts)
    if whole.any():
        by_whole = np.flatnonzero(whole)
        order = np.arange(len(texts), dtype=np.int64)
        order[by_whole] = len(texts) + np.arange(len(by_whole))
        result = Ragged.concat([result, _encode_whole(tokenizer, [texts[i] for i in by_whole])]).take(order)

    # Self-check on a spread of texts: the word cache must agree with the whole-text encoder.
    sample = np.unique(np.linspace(0, len(texts) - 1, num=min(_SELF_CHECK_TEXTS, len(texts))).astype(np.int64))
    expected = _encode_whole(tokenizer, [texts[i] for i in sample])
    for j, i in enumerate(sample.tolist()):
        if not np.array_equal(result.row(i), expected.row(j)):
            logger.warning(
                "the word-level token cache disagrees with the tokenizer on text %d (%r); encoding every text whole",
                i,
                texts[i][:60],
            )
            return None
    return result


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> Ragged:
    """Token ids of each text, without special tokens: ``tokenizer(text, add_special_tokens=False)``.

    The word cache works on blocks of ``_WORD_CACHE_BLOCK`` texts, so its Arrow buffers stay a few
    hundred megabytes however large the dataset is.
    """
    texts = list(texts)
    if not texts:
        return Ragged.concat([])
    if word_cache_unsupported(tokenizer) is not None:
        return _encode_whole(tokenizer, texts)
    blocks = []
    for start in range(0, len(texts), _WORD_CACHE_BLOCK):
        block = texts[start : start + _WORD_CACHE_BLOCK]
        result = _encode_by_words(tokenizer, block)
        blocks.append(result if result is not None else _encode_whole(tokenizer, block))
    return blocks[0] if len(blocks) == 1 else Ragged.concat(blocks)
