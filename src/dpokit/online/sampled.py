"""A round's training rows as the token ids that were sampled.

The online loop's pair rows carry text (for the judge and the records) and, per row, the prompt and the
sample indices its responses came from. Decoding a sample and tokenizing the text again does not give
back the sampled ids in general (a BPE tokenizer merges differently, special tokens vanish), so the
policy would be trained on sequences it never produced. :func:`prepare_round` reads the rows as the
data path does (format, ranked_mode expansion, unpaired splitting: :func:`~dpokit.data.read_preferences`)
and then gives each online example

* ``prompt_ids``: the ids the policy was prompted with (:meth:`OnlineLoop.prompt_ids`);
* ``response_ids``: the sampled ids as given -- ending with the stop token when one ended the sample
  (EOS or a chat template's end-of-turn token), with nothing added when it was cut off at
  ``max_new_tokens`` (so the model is not taught to stop there), exactly the text path's EOS rule;

then the data path's truncation (:func:`~dpokit.data.tokenize.truncate`) and its drop of examples whose
responses became identical. Rows without sample indices (the offline pairs mixed in) and any example
whose responses cannot be matched to samples are tokenized from text as before (with the policy's processor
when they carry images). Rows with ``images`` (a vision-language round: the prompt ids hold the images' tokens;
offline rows whose data has images) keep them in the prepared round's image table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dpokit.config import DataConfig
from dpokit.data.images import ImageTable
from dpokit.data.prepare import PreparedDataset, PrepareReport
from dpokit.data.reader import read_preferences
from dpokit.data.schema import PreferenceExample
from dpokit.data.tokenize import TokenizedColumns, TokenizeReport, identical_responses, tokenize_examples, truncate
from dpokit.errors import DataError

_ROW = re.compile(r"^row (\d+)\b")


def _content(response: Any) -> str:
    """A response's text: the string itself, or its messages' contents joined."""
    return response if isinstance(response, str) else "".join(str(m.get("content", "")) for m in response)


def sampled_ids(
    example: PreferenceExample,
    rows: Sequence[Mapping[str, Any]],
    prompt_ids: Mapping[int, list[int]],
    token_ids: Mapping[tuple[int, int], list[int]],
) -> tuple[list[int], list[list[int]]] | None:
    """``(prompt ids, response ids)`` of an online example from what was sampled, or None when the example
    is not an online one (no row number, no sample indices) or a response matches no sample of its row."""
    found = _ROW.match(example.source)
    if found is None or not 1 <= int(found.group(1)) <= len(rows):
        return None
    row = rows[int(found.group(1)) - 1]
    samples, prompt_index = row.get("sample_indices"), row.get("prompt_index")
    if samples is None or not isinstance(prompt_index, int) or prompt_index not in prompt_ids:
        return None
    by_text = {_content(text): int(k) for text, k in zip(row["responses"], samples, strict=True)}
    responses = []
    for response in example.responses:
        k = by_text.get(_content(response))
        if k is None or (prompt_index, k) not in token_ids:
            return None
        responses.append(list(token_ids[(prompt_index, k)]))
    return list(prompt_ids[prompt_index]), responses


def prepare_round(
    rows: list[dict[str, Any]],
    prompt_ids: Mapping[int, list[int]],
    token_ids: Mapping[tuple[int, int], list[int]],
    tokenizer: Any,
    data: DataConfig,
    *,
    unpaired: bool,
    processor: Any = None,
) -> PreparedDataset:
    """The round's training examples: online ones from the sampled ids, the rest from text (module docstring).
    ``prompt_ids[p]``: prompt ``p``'s ids; ``token_ids[(p, k)]``: sample ``k`` of prompt ``p`` as sampled.
    ``processor``: the policy's processor, which tokenizes the text rows that carry images (offline rows)."""
    examples, read_report = read_preferences(
        rows, format="ranked", ranked_mode=data.ranked_mode, unpaired=unpaired, score_threshold=data.score_threshold
    )
    settings: dict[str, Any] = {
        "max_length": data.max_length,
        "max_prompt_length": data.max_prompt_length,
        "truncation_mode": data.truncation_mode,
    }
    report = TokenizeReport(examples_in=len(examples), **settings)
    given: list[tuple[list[int], list[list[int]]]] = []
    given_index: list[int] = []
    for index, example in enumerate(examples):
        ids = sampled_ids(example, rows, prompt_ids, token_ids)
        if ids is None:
            continue
        bos = tokenizer.bos_token_id
        keep_first = 1 if bos is not None and ids[0][:1] == [bos] else 0
        prompt, responses, what = truncate(ids[0], ids[1], keep_first=keep_first, **settings)
        if what == "drop":
            report.record_drop("prompt_fills_max_length", f"{example.source}: the prompt leaves no room for a response")
            continue
        report.prompt_truncated += what in ("prompt", "both")
        report.responses_truncated += what in ("responses", "both")
        given.append((prompt, responses))
        given_index.append(index)
    columns = TokenizedColumns.from_lists(given)
    kept = np.asarray(given_index, dtype=np.int64)
    same = identical_responses(columns)
    for j in np.flatnonzero(same).tolist():
        report.record_drop("identical_after_truncation", f"{examples[int(kept[j])].source}: the responses are the same tokens")
    columns, kept = columns.take(np.flatnonzero(~same)), kept[~same]
    taken = set(given_index)
    text = [i for i in range(len(examples)) if i not in taken]
    if text:
        text_examples = [examples[i] for i in text]
        text_columns, text_kept, text_report = tokenize_examples(text_examples, tokenizer, **settings, processor=processor)
        columns = TokenizedColumns.concat([columns, text_columns])
        kept = np.concatenate([kept, np.asarray([text[i] for i in text_kept], dtype=np.int64)])
        _add_counts(report, text_report)
    report.examples_out = len(columns)
    prepared_report = PrepareReport(read_report, report)
    if len(columns) == 0:
        raise DataError(f"no examples left after tokenization of the round's rows.\n{prepared_report.summary()}")
    desirable = None
    if any(ex.label is not None for ex in examples):
        desirable = np.fromiter((bool(examples[i].label) for i in kept.tolist()), dtype=bool, count=len(kept))
    fingerprint = f"online-sampled-{len(columns)}-{int(columns.tokens.sum()) if len(columns.tokens) else 0}"
    images = None
    if any(ex.has_images for ex in examples):  # a vision-language round: each example keeps its prompt's images
        images = ImageTable.from_lists([examples[i].images or [] for i in kept.tolist()])
    return PreparedDataset(
        columns, fingerprint, prepared_report, [examples[i].source for i in kept.tolist()], desirable=desirable, images=images
    )


def _add_counts(report: TokenizeReport, other: TokenizeReport) -> None:
    """Add ``other``'s truncation and drop counts to ``report``."""
    report.prompt_truncated += other.prompt_truncated
    report.responses_truncated += other.responses_truncated
    report.dropped.update(other.dropped)
    for reason, messages in other.dropped_messages.items():
        report.dropped_messages.setdefault(reason, []).extend(messages)
