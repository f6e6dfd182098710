"""Examples -> token ids: one prompt and K responses per example, with the exact prompt/response boundary.

Plain text
    ``prompt_ids = tokenizer(prompt)`` keeping only the special tokens the tokenizer puts *before*
    the text (e.g. BOS; not added twice if the text already starts with it; an EOS the tokenizer
    would append after the prompt is left out). ``response_ids = tokenizer(response,
    add_special_tokens=False) + [eos]``, the EOS appended exactly once (not when the text already ends
    with it). Prompt and response are tokenized separately, as in the DPO paper's code, so no token
    ever straddles the boundary. A response marked truncated (``PreferenceExample.truncated``: cut off
    before it ended, e.g. a sample that hit the token limit) gets no EOS: the model is not taught to
    stop where the text was cut.

Conversations
    ``prompt_ids`` = the chat template over the prompt messages with ``add_generation_prompt=True``;
    ``full_ids`` = the template over prompt + response messages; ``response_ids = full_ids[len(prompt_ids):]``
    (the assistant turn(s), with whatever end markers the template writes). Templates carry their own
    special tokens, so rendered text is tokenized with ``add_special_tokens=False`` -- the same ids as
    ``apply_chat_template(tokenize=True)`` and no doubled BOS. ``prompt_ids`` must be an exact prefix of
    ``full_ids``; templates that render the prompt differently on its own raise a :class:`DataError`.
    A truncated response (one assistant message) is its content's tokens after ``prompt_ids``, without
    the end-of-turn marker the template would close the turn with -- what a sampler cut off there produced.

Truncation (only when ``prompt + longest response > max_length``)
    1. the prompt is cut to ``max_prompt_length`` tokens: ``keep_end`` (default) keeps its last tokens,
       which is where a dialogue's latest turn is (a leading BOS is kept); ``keep_start`` keeps its first;
    2. responses are cut to ``max_length - len(prompt)`` tokens (their start is kept);
    3. an example whose responses would get no token at all is dropped.
    Each case is counted in :class:`TokenizeReport`.

Images (examples with ``images``; :mod:`dpokit.data.images`)
    The prompt is tokenized as above with each image placeholder as one token; each placeholder is
    then replaced by the tokens the model's processor writes for its image. Their number must equal
    the number of images. Truncation removes only prompt text around image tokens; an example whose
    image tokens alone exceed ``max_prompt_length`` is dropped (``image_tokens_exceed_max_prompt_length``).

Texts are encoded by :func:`dpokit.data.encode.encode_texts`: the tokenizer's own ids, with each distinct
word encoded once where that is provably exact, into flat arrays; only examples that need truncation
pass through Python lists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from dpokit.data.encode import Ragged, encode_texts
from dpokit.data.images import ImageTokens, decode_image
from dpokit.data.schema import SKIP_REASONS, Conversation, InvalidRowError, PreferenceExample
from dpokit.errors import ConfigError, DataError

TRUNCATION_MODES = ("keep_end", "keep_start")
# Examples tokenization drops (counted in TokenizeReport.dropped), and why.
DROP_REASONS = {
    "prompt_fills_max_length": "the prompt leaves no room for a response within max_length",
    "identical_after_truncation": "two responses have the same tokens after truncation (or tokenization), so the pair "
    "teaches nothing; raise data.max_length or shorten the prompts",
    "image_tokens_exceed_max_prompt_length": "the prompt must be cut to max_prompt_length but its image tokens alone "
    "are longer, and image tokens are never cut; raise data.max_prompt_length (and max_length) or use smaller images",
}
_MESSAGES_KEPT = 3


@dataclass
class TokenizeReport:
    """Counts from tokenization and truncation.

    Attributes:
        examples_in / examples_out: examples before / after drops and skips.
        prompt_truncated: examples whose prompt was cut to ``max_prompt_length``.
        responses_truncated: examples with at least one response cut to fit ``max_length``.
        dropped: examples dropped per reason (``prompt_fills_max_length``: no room left for any
            response token after the prompt was cut).
        skipped: examples skipped as invalid (``skip_invalid=True``) per reason, with
            ``skipped_messages`` the first few messages per reason.
    """

    examples_in: int = 0
    examples_out: int = 0
    prompt_truncated: int = 0
    responses_truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_messages: dict[str, list[str]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_messages: dict[str, list[str]] = field(default_factory=dict)
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"

    def summary(self) -> str:
        lines = [f"tokenized {self.examples_in} examples -> {self.examples_out} kept"]
        if self.prompt_truncated:
            lines.append(
                f"  {self.prompt_truncated} prompts cut to max_prompt_length={self.max_prompt_length} ({self.truncation_mode})"
            )
        if self.responses_truncated:
            lines.append(f"  {self.responses_truncated} examples had responses cut to fit max_length={self.max_length}")
        for reason, count in self.dropped.most_common():
            lines.append(f"  dropped {count}: {reason} ({DROP_REASONS.get(reason, reason)})")
            for message in self.dropped_messages.get(reason, []):
                lines.append(f"       e.g. {message}")
        for reason, count in self.skipped.most_common():
            lines.append(f"  skipped {count} invalid: {reason}: {SKIP_REASONS.get(reason, reason)}")
            for message in self.skipped_messages.get(reason, []):
                lines.append(f"       e.g. {message}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["dropped"] = dict(self.dropped)
        data["skipped"] = dict(self.skipped)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizeReport:
        data = dict(data)
        data["dropped"] = Counter(data.get("dropped", {}))
        data["skipped"] = Counter(data.get("skipped", {}))
        return cls(**data)

    def record_drop(self, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        kept = self.dropped_messages.setdefault(reason, [])
        if len(kept) < _MESSAGES_KEPT:
            kept.append(message)


@dataclass
class TokenizedColumns:
    """Token ids of E examples in flat arrays (cheap to cache and to load).

    ``tokens`` (total,) int32: every segment's ids back to back; a segment is a prompt or a response.
    ``segment_offsets`` (S+1,) int64: segment ``i`` is ``tokens[segment_offsets[i]:segment_offsets[i+1]]``.
    ``example_segments`` (E+1,) int64: example ``e`` owns segments ``example_segments[e]`` (its prompt)
    to ``example_segments[e+1]`` (exclusive; its K responses, best first).
    """

    tokens: np.ndarray
    segment_offsets: np.ndarray
    example_segments: np.ndarray

    def __len__(self) -> int:
        return len(self.example_segments) - 1

    @property
    def segments(self) -> Ragged:
        return Ragged(self.tokens, self.segment_offsets)

    def example(self, e: int) -> tuple[list[int], list[list[int]]]:
        first, end = int(self.example_segments[e]), int(self.example_segments[e + 1])
        segments = self.segments
        return segments.row(first).tolist(), [segments.row(s).tolist() for s in range(first + 1, end)]

    def lengths(self) -> np.ndarray:
        """(E,) int64: prompt length + longest response, the row length a padded batch needs."""
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        segment_lengths = np.diff(self.segment_offsets)
        prompts = self.example_segments[:-1]
        response_lengths = segment_lengths.copy()
        response_lengths[prompts] = 0
        # numpy types ufunc methods (reduceat) as returning Any.
        row_lengths: np.ndarray = segment_lengths[prompts] + np.maximum.reduceat(response_lengths, prompts)
        return row_lengths

    def block_lengths(self) -> np.ndarray:
        """(E,) int64: prompt + every response, the length of a shared-prompt block."""
        segment_lengths = np.diff(self.segment_offsets)
        totals = np.add.reduceat(segment_lengths, self.example_segments[:-1]) if len(self) else np.zeros(0, dtype=np.int64)
        return totals.astype(np.int64)

    def take(self, examples: np.ndarray) -> TokenizedColumns:
        """The examples ``examples[0], examples[1], ...``."""
        examples = np.asarray(examples, dtype=np.int64)
        counts = np.diff(self.example_segments)[examples]
        example_segments = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(counts, out=example_segments[1:])
        segments = np.repeat(self.example_segments[:-1][examples] - example_segments[:-1], counts) + np.arange(
            example_segments[-1]
        )
        taken = self.segments.take(segments)
        return TokenizedColumns(taken.tokens, taken.offsets, example_segments)

    @classmethod
    def concat(cls, parts: Sequence[TokenizedColumns]) -> TokenizedColumns:
        segments = Ragged.concat([p.segments for p in parts])
        counts = np.concatenate([np.diff(p.example_segments) for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        example_segments = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=example_segments[1:])
        return cls(segments.tokens, segments.offsets, example_segments)

    @classmethod
    def from_lists(cls, examples: Sequence[tuple[list[int], list[list[int]]]]) -> TokenizedColumns:
        segments: list[list[int]] = []
        example_segments = [0]
        for prompt, responses in examples:
            segments.append(prompt)
            segments.extend(responses)
            example_segments.append(len(segments))
        ragged = Ragged.from_lists(segments)
        return cls(ragged.tokens, ragged.offsets, np.asarray(example_segments, dtype=np.int64))


def check_truncation_settings(max_length: int | None, max_prompt_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"unknown truncation_mode '{truncation_mode}'; valid: {', '.join(TRUNCATION_MODES)}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length must be at least 2 (a prompt token and a response token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ConfigError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ConfigError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text by itself (e.g. ``[bos]``); ``[]`` for most BPE tokenizers."""
    probe = "probe text"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    with_specials = tokenizer(probe)["input_ids"]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return list(with_specials[:start])
    return []


def _tokenize_text(examples: list[PreferenceExample], tokenizer: Any) -> TokenizedColumns:
    """Plain-text examples -> columns: all prompts and responses in one :func:`encode_texts` call, then
    the BOS-style prefix and the EOS added in one splice (module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token; set tokenizer.eos_token so responses can be terminated")
    prefix = special_prefix(tokenizer)
    num_responses = np.fromiter((ex.num_responses for ex in examples), dtype=np.int64, count=len(examples))
    # Plain-text examples: the prompt and every response are strings.
    texts = [cast(str, ex.prompt) for ex in examples]
    texts.extend(cast(str, r) for ex in examples for r in ex.responses)
    ids = encode_texts(tokenizer, texts)  # rows: E prompts, then every response in order
    num_examples, lengths = len(examples), ids.lengths()

    # Segment s of the output (a prompt, then its responses) is base row segment_rows[s].
    example_segments = np.zeros(num_examples + 1, dtype=np.int64)
    np.cumsum(num_responses + 1, out=example_segments[1:])
    is_prompt = np.zeros(example_segments[-1], dtype=bool)
    is_prompt[example_segments[:-1]] = True
    segment_rows = np.empty(example_segments[-1], dtype=np.int64)
    segment_rows[is_prompt] = np.arange(num_examples)
    segment_rows[~is_prompt] = num_examples + np.arange(len(texts) - num_examples)

    # EOS after a response unless it already ends with it; the prefix before a prompt unless it starts with it.
    ends = ids.offsets[1:]
    ends_with_eos = (
        (lengths > 0) & (ids.tokens[np.maximum(ends - 1, 0)] == eos) if len(ids.tokens) else np.zeros(len(ids), dtype=bool)
    )
    add_tail = ~is_prompt & ~ends_with_eos[segment_rows] & ~_truncated_segments(examples, len(is_prompt))
    starts_with_prefix = lengths >= len(prefix)
    for j, token in enumerate(prefix):
        starts_with_prefix &= ids.tokens[np.minimum(ids.offsets[:-1] + j, max(len(ids.tokens) - 1, 0))] == token
    add_head = is_prompt & ~starts_with_prefix[segment_rows] if prefix else np.zeros(len(is_prompt), dtype=bool)

    pieces = Ragged.from_lists([prefix, [eos]])  # rows len(texts) (prefix) and len(texts) + 1 (eos)
    sizes = 1 + add_head + add_tail
    groups = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=groups[1:])
    rows = np.empty(groups[-1], dtype=np.int64)
    body = groups[:-1] + add_head
    rows[body] = segment_rows
    rows[groups[:-1][add_head]] = len(texts)
    rows[body[add_tail] + 1] = len(texts) + 1
    segments = ids.splice(pieces, rows, groups)
    return TokenizedColumns(segments.tokens, segments.offsets, example_segments)


def _truncated_segments(examples: list[PreferenceExample], num_segments: int) -> np.ndarray:
    """(S,) bool over the segments (each example's prompt, then its responses): the truncated responses."""
    flags = np.zeros(num_segments, dtype=bool)
    segment = 0
    for ex in examples:
        if ex.truncated is not None:
            flags[segment + 1 : segment + 1 + ex.num_responses] = ex.truncated
        segment += 1 + ex.num_responses
    return flags


def _truncated_chat_responses(
    examples: list[PreferenceExample], tokenizer: Any, failed: set[int], on_invalid: Any
) -> tuple[dict[tuple[int, int], list[int]], set[int]]:
    """``{(example, response): ids}`` of the truncated chat responses: the message content's tokens, no
    end-of-turn marker (module docstring); and the examples refused (a truncated response of several messages)."""
    where: list[tuple[int, int]] = []
    texts: list[str] = []
    refused: set[int] = set()
    for e, ex in enumerate(examples):
        for k in range(ex.num_responses) if ex.truncated is not None and e not in failed else ():
            response = ex.responses[k]
            if not ex.is_truncated(k):
                continue
            if len(response) != 1:
                refused.add(e)
                on_invalid(
                    InvalidRowError(
                        ex.source,
                        None,
                        "wrong_type",
                        f"response {k} is marked truncated but has {len(response)} messages; only a single "
                        "assistant message can be cut off",
                    )
                )
                break
            where.append((e, k))
            texts.append(cast(Conversation, response)[0]["content"])
    ids = encode_texts(tokenizer, texts).tolist() if texts else []
    return {at: x for at, x in zip(where, ids, strict=True) if at[0] not in refused}, refused


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # a and b may differ in length
        if x != y:
            return i
    return min(len(a), len(b))


def _tokenize_chat(
    examples: list[PreferenceExample], tokenizer: Any, on_invalid: Any
) -> list[tuple[list[int], list[list[int]]] | None]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            "the data is conversational (lists of {role, content} messages) but the tokenizer has no chat template; "
            "set tokenizer.chat_template or use plain-text data"
        )
    prompt_texts: list[str] = []
    full_texts: list[str] = []
    failed: set[int] = set()
    for e, ex in enumerate(examples):
        try:
            prompt_text = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
            # Chat examples: the prompt and every response are message lists (Text does not say which).
            conversations = [ex.prompt + response for response in ex.responses]  # type: ignore[operator]
            texts = [tokenizer.apply_chat_template(conversation, tokenize=False) for conversation in conversations]
        except Exception as error:  # jinja raises its own types (e.g. a template enforcing role order)
            on_invalid(
                InvalidRowError(
                    ex.source, None, "chat_template_error", f"the chat template failed: {type(error).__name__}: {error}"
                )
            )
            failed.add(e)
            continue
        prompt_texts.append(prompt_text)
        full_texts.extend(texts)
    prompt_ids = encode_texts(tokenizer, prompt_texts).tolist()
    full_ids = encode_texts(tokenizer, full_texts).tolist()
    cut, refused = _truncated_chat_responses(examples, tokenizer, failed, on_invalid)
    out: list[tuple[list[int], list[list[int]]] | None] = []
    p_cursor = f_cursor = 0
    for e, ex in enumerate(examples):
        if e in failed:
            out.append(None)
            continue
        prompt = prompt_ids[p_cursor]
        p_cursor += 1
        if e in refused:
            f_cursor += ex.num_responses
            out.append(None)
            continue
        responses = []
        bad: InvalidRowError | None = None
        for k, full in enumerate(full_ids[f_cursor : f_cursor + ex.num_responses]):
            if full[: len(prompt)] != prompt:
                at = _first_difference(prompt, full)
                bad = InvalidRowError(
                    ex.source,
                    None,
                    "chat_template_prefix",
                    f"the chat template renders the prompt (with add_generation_prompt=True) differently from the start of "
                    f"the conversation with response {k}: "
                    f"token {at} is {tokenizer.decode(prompt[at : at + 8])!r} in the prompt but "
                    f"{tokenizer.decode(full[at : at + 8])!r} in the conversation, so the response boundary is unknown. "
                    "Use a chat template whose generation prompt is a prefix of the rendered conversation",
                )
                break
            response = cut[(e, k)] if (e, k) in cut else full[len(prompt) :]
            if not response:
                bad = InvalidRowError(ex.source, None, "empty_response", f"response {k} renders to no tokens after the prompt")
                break
            responses.append(response)
        f_cursor += ex.num_responses
        if bad is not None:
            on_invalid(bad)
            out.append(None)
        else:
            out.append((prompt, responses))
    return out


def _cut_around(prompt: list[int], limit: int, truncation_mode: str, keep_first: int, protected: set[int]) -> list[int] | None:
    """``prompt`` cut to ``limit`` tokens by removing only tokens outside ``protected`` (image tokens):
    the earliest ones (after ``keep_first``) for ``keep_end``, the latest for ``keep_start``. None when
    the protected tokens (and ``keep_first``) alone exceed ``limit``."""
    keep_first = keep_first if truncation_mode == "keep_end" else 0
    removable = [j for j in range(keep_first, len(prompt)) if prompt[j] not in protected]
    excess = len(prompt) - limit
    if excess > len(removable):
        return None
    removed = set(removable[:excess] if truncation_mode == "keep_end" else removable[len(removable) - excess :])
    return [token for j, token in enumerate(prompt) if j not in removed]


def truncate(
    prompt: list[int],
    responses: list[list[int]],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str,
    keep_first: int = 0,
    protected: set[int] | frozenset[int] = frozenset(),
) -> tuple[list[int], list[list[int]], str | None]:
    """Apply the truncation rules (module docstring). Returns (prompt, responses, what happened):
    ``None`` (fits), ``"prompt"``, ``"responses"``, ``"both"``, ``"drop"`` or ``"drop_images"``.

    ``keep_first``: leading prompt tokens ``keep_end`` must keep (the BOS). ``protected``: token ids the
    prompt cut never removes (image tokens); a prompt holding any is cut around them, and when they
    alone exceed ``max_prompt_length`` the example is dropped (``"drop_images"``).
    """
    if max_length is None or len(prompt) + max(len(r) for r in responses) <= max_length:
        return prompt, responses, None
    prompt_cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if protected and any(token in protected for token in prompt):
            cut = _cut_around(prompt, max_prompt_length, truncation_mode, keep_first, set(protected))
            if cut is None:
                return prompt, responses, "drop_images"
            prompt = cut
        elif truncation_mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        else:
            keep = min(keep_first, max_prompt_length - 1)
            prompt = prompt[:keep] + prompt[len(prompt) - (max_prompt_length - keep) :]
        prompt_cut = True
    room = max_length - len(prompt)
    if room <= 0:
        return prompt, responses, "drop"
    responses_cut = any(len(r) > room for r in responses)
    responses = [r[:room] for r in responses]
    return (
        prompt,
        responses,
        ("both" if prompt_cut and responses_cut else "prompt" if prompt_cut else "responses" if responses_cut else None),
    )


def tokenize_examples(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int | None = 512,
    max_prompt_length: int | None = 256,
    truncation_mode: str = "keep_end",
    skip_invalid: bool = False,
    drop_identical: bool = True,
    processor: Any = None,
) -> tuple[TokenizedColumns, list[int], TokenizeReport]:
    """Tokenize and truncate. Returns (columns, kept example indices into ``examples``, report).

    ``drop_identical``: drop (and count) examples whose responses have the same token ids, which no
    preference loss can learn from; False keeps them (scoring responses one by one).
    ``processor``: the model's image-text-to-text processor, needed when examples carry images: each
    image placeholder of the prompt becomes the image's tokens (:class:`~dpokit.data.images.ImageTokens`),
    which truncation never cuts."""
    check_truncation_settings(max_length, max_prompt_length, truncation_mode)
    report = TokenizeReport(
        examples_in=len(examples), max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode
    )

    def on_invalid(error: InvalidRowError) -> None:
        if not skip_invalid:
            raise DataError(
                f"{error}. Set data.skip_invalid=true (skip_invalid=True in Python) to skip such rows "
                "(they are counted and reported)."
            )
        report.skipped[error.reason] += 1
        kept = report.skipped_messages.setdefault(error.reason, [])
        if len(kept) < _MESSAGES_KEPT:
            kept.append(str(error))

    vision_index = [i for i, ex in enumerate(examples) if ex.has_images]
    text_index = [i for i, ex in enumerate(examples) if not ex.is_conversational and not ex.has_images]
    chat_index = [i for i, ex in enumerate(examples) if ex.is_conversational and not ex.has_images]
    parts: list[TokenizedColumns] = []
    indices: list[np.ndarray] = []
    image_tokens = _image_tokens(processor, examples, vision_index)
    if vision_index and image_tokens is not None:
        vision = _tokenize_vision([examples[i] for i in vision_index], tokenizer, image_tokens, on_invalid)
        parts.append(TokenizedColumns.from_lists([ids for ids in vision if ids is not None]))
        indices.append(np.asarray([i for i, ids in zip(vision_index, vision, strict=True) if ids is not None], dtype=np.int64))
    if text_index:
        parts.append(_tokenize_text([examples[i] for i in text_index], tokenizer))
        indices.append(np.asarray(text_index, dtype=np.int64))
    if chat_index:
        chat = _tokenize_chat([examples[i] for i in chat_index], tokenizer, on_invalid)
        parts.append(TokenizedColumns.from_lists([ids for ids in chat if ids is not None]))
        indices.append(np.asarray([i for i, ids in zip(chat_index, chat, strict=True) if ids is not None], dtype=np.int64))
    columns = TokenizedColumns.concat(parts)
    kept = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    order: np.ndarray | None = None
    if len(parts) > 1:  # back to the input order
        order = np.argsort(kept, kind="stable")
        kept = kept[order]

    protected = image_tokens.protected if image_tokens is not None else set()
    columns, kept = _truncate_long(columns, kept, order, tokenizer, report, protected, examples)
    if drop_identical:
        columns, kept = _drop_identical_responses(columns, kept, examples, report)
    report.examples_out = len(columns)
    return columns, kept.tolist(), report


def _image_tokens(processor: Any, examples: Sequence[PreferenceExample], vision_index: list[int]) -> ImageTokens | None:
    """The processor's image-token rule when some examples carry images (an error without a processor)."""
    if not vision_index:
        return None
    if processor is None:
        raise ConfigError(
            f"{examples[vision_index[0]].source}: the data has images ({len(vision_index)} examples) but no image processor "
            "was given; train a vision-language model (one transformers loads with AutoModelForImageTextToText, with its "
            "processor) or drop the images column"
        )
    return ImageTokens(processor)


def _tokenize_vision(
    examples: list[PreferenceExample], tokenizer: Any, image_tokens: ImageTokens, on_invalid: Any
) -> list[tuple[list[int], list[list[int]]] | None]:
    """Examples with images: tokenized as text or chat (each image placeholder one token), then every
    placeholder replaced by its image's tokens. The number of placeholders must equal the number of images."""
    ids: list[tuple[list[int], list[list[int]]] | None] = [None] * len(examples)
    chat = [i for i, ex in enumerate(examples) if ex.is_conversational]
    text = [i for i, ex in enumerate(examples) if not ex.is_conversational]
    if chat:
        for i, pair in zip(chat, _tokenize_chat([examples[i] for i in chat], tokenizer, on_invalid), strict=True):
            ids[i] = pair
    if text:
        columns = _tokenize_text([examples[i] for i in text], tokenizer)
        for j, i in enumerate(text):
            ids[i] = columns.example(j)
    out: list[tuple[list[int], list[list[int]]] | None] = []
    for ex, pair in zip(examples, ids, strict=True):
        expanded = None if pair is None else _expand_prompt(ex, pair[0], tokenizer, image_tokens, on_invalid)
        out.append(None if pair is None or expanded is None else (expanded, pair[1]))
    return out


def _expand_prompt(
    ex: PreferenceExample, prompt: list[int], tokenizer: Any, image_tokens: ImageTokens, on_invalid: Any
) -> list[int] | None:
    """``prompt`` with its placeholders replaced by the images' tokens; None (reported) on a bad row."""
    images = ex.images or []
    try:
        decoded = [decode_image(data) for data in images]
    except Exception as error:  # PIL raises several types for damaged files
        on_invalid(InvalidRowError(ex.source, "images", "bad_image", f"an image cannot be decoded ({error})"))
        return None
    expanded = image_tokens.expand(prompt, decoded)
    if expanded is None:
        found = image_tokens.placeholders(prompt)
        how = (
            "the chat template wrote"
            if ex.is_conversational
            else f"write {image_tokens.placeholder} where each image goes; the prompt has"
        )
        on_invalid(
            InvalidRowError(
                ex.source,
                "images",
                "image_count",
                f"the row has {len(images)} image(s) but {how} {found} {image_tokens.placeholder!r} placeholder(s)",
            )
        )
        return None
    if ex.is_conversational:
        text = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = str(ex.prompt)
    image_tokens.check(text, decoded, expanded)
    return expanded


def _truncate_long(
    columns: TokenizedColumns,
    kept: np.ndarray,
    order: np.ndarray | None,
    tokenizer: Any,
    report: TokenizeReport,
    protected: set[int],
    examples: Sequence[PreferenceExample],
) -> tuple[TokenizedColumns, np.ndarray]:
    """Truncate (or drop) the examples longer than ``report.max_length`` and put the rows in input order
    (``order``: the permutation that does); only the long examples go through Python lists."""
    replaced: list[tuple[list[int], list[list[int]]]] = []
    keep = np.ones(len(kept), dtype=bool)
    replacement = np.full(len(kept), -1, dtype=np.int64)
    max_length = report.max_length
    if max_length is not None and len(kept):
        row_of = order if order is not None else np.arange(len(kept))  # example kept[j] is row row_of[j] of `columns`
        bos = tokenizer.bos_token_id
        for j in np.flatnonzero(columns.lengths()[row_of] > max_length).tolist():
            prompt, responses = columns.example(int(row_of[j]))
            keep_first = 1 if bos is not None and prompt and prompt[0] == bos else 0
            prompt, responses, what = truncate(
                prompt,
                responses,
                max_length=report.max_length,
                max_prompt_length=report.max_prompt_length,
                truncation_mode=report.truncation_mode,
                keep_first=keep_first,
                protected=protected,
            )
            if what == "drop":
                report.dropped["prompt_fills_max_length"] += 1
                keep[j] = False
                continue
            if what == "drop_images":
                images = sum(token in protected for token in prompt)
                report.record_drop(
                    "image_tokens_exceed_max_prompt_length",
                    f"{examples[int(kept[j])].source}: {images} image tokens, max_prompt_length={report.max_prompt_length}",
                )
                keep[j] = False
                continue
            if what in ("prompt", "both"):
                report.prompt_truncated += 1
            if what in ("responses", "both"):
                report.responses_truncated += 1
            replacement[j] = len(replaced)
            replaced.append((prompt, responses))
    if replaced or order is not None or not keep.all():
        rows = order if order is not None else np.arange(len(kept))
        rows = np.where(replacement >= 0, len(columns) + replacement, rows)[keep]
        columns = TokenizedColumns.concat([columns, TokenizedColumns.from_lists(replaced)]).take(rows)
        kept = kept[keep]
    return columns, kept


def identical_responses(columns: TokenizedColumns) -> np.ndarray:
    """(E,) bool: the examples in which two responses have the same token ids (e.g. after truncation)."""
    lengths = np.diff(columns.segment_offsets)
    bounds = columns.example_segments
    counts = np.diff(bounds)
    out = np.zeros(len(columns), dtype=bool)
    segments = columns.segments
    pairs = np.flatnonzero(counts == 3)
    first = bounds[:-1][pairs] + 1
    same_length = lengths[first] == lengths[first + 1]
    for e, s in zip(pairs[same_length].tolist(), first[same_length].tolist(), strict=True):
        out[e] = np.array_equal(segments.row(s), segments.row(s + 1))
    for e in np.flatnonzero(counts > 3).tolist():  # rankings: any two responses of one length
        start, end = int(bounds[e]) + 1, int(bounds[e + 1])
        if len(set(lengths[start:end].tolist())) < end - start:
            rows = [segments.row(s).tobytes() for s in range(start, end)]
            out[e] = len(set(rows)) < len(rows)
    return out


def _drop_identical_responses(
    columns: TokenizedColumns, kept: np.ndarray, examples: Sequence[PreferenceExample], report: TokenizeReport
) -> tuple[TokenizedColumns, np.ndarray]:
    """Examples whose responses became identical (truncation cut off where they differ, or the tokenizer
    maps both texts to the same ids) teach nothing: dropped and counted, like chosen == rejected rows."""
    same = identical_responses(columns)
    if not same.any():
        return columns, kept
    row_lengths = columns.lengths()
    for j in np.flatnonzero(same).tolist():
        report.record_drop(
            "identical_after_truncation",
            f"{examples[int(kept[j])].source}: the responses are the same tokens once cut to max_length="
            f"{report.max_length} (prompt + response: {int(row_lengths[j])} tokens)",
        )
    keep = ~same
    return columns.take(np.flatnonzero(keep)), kept[keep]
