"""Unlabelled prompts for the online loop: read once, then a deterministic selection per round.

Prompts come from any source the data reader reads (JSONL/JSON/CSV/Parquet file, a ``save_to_disk``
directory, a hub id); each row needs a ``prompt``: text, or a list of ``{role, content}`` messages.
A bad row is an error naming its file and line.

Round ``r`` takes positions ``r * P .. (r + 1) * P - 1`` of an endless stream over the N prompts:
pass ``q // N`` of the stream is a permutation of the prompts seeded by ``(seed, pass)``, so every
prompt is used once per pass and a round's prompts are a pure function of (seed, r, P, N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpokit.data.reader import raw_rows
from dpokit.data.schema import InvalidRowError
from dpokit.errors import DataError

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class PromptRow:
    """One unlabelled prompt and where it came from (``path:line N``)."""

    prompt: Prompt
    where: str


def _check_prompt(value: object, where: str) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise DataError(f"{where}: field 'prompt' holds a lone surrogate, not valid Unicode")
        return value
    if isinstance(value, list) and value:
        for index, message in enumerate(value):
            if not (
                isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
            ):
                raise DataError(f"{where}: field 'prompt[{index}]' must be a {{role, content}} message with string values")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: field 'prompt' must be a non-empty string or a list of {{role, content}} messages")


def read_prompt_rows(source: str, split: str = "train") -> list[PromptRow]:
    """Every prompt of ``source`` in file order; a row without a usable ``prompt`` is a DataError naming it."""
    rows, _ = raw_rows(source, split=split)
    prompts: list[PromptRow] = []
    for where, row in rows:
        if isinstance(row, InvalidRowError):
            raise row
        if not isinstance(row, dict):
            if type(row).__name__ == "_BlankLine":
                continue
            raise DataError(f"{where}: expected an object with a 'prompt' field, got {type(row).__name__}")
        if "prompt" not in row:
            raise DataError(f"{where}: missing field 'prompt' (found fields: {', '.join(map(str, row)) or 'none'})")
        prompts.append(PromptRow(_check_prompt(row["prompt"], where), where))
    if not prompts:
        raise DataError(f"{source}: no prompts")
    return prompts


def round_prompt_indices(num_prompts: int, per_round: int, *, seed: int, round_index: int) -> list[int]:
    """Indices (into the prompt file) of round ``round_index``'s prompts: see the module docstring."""
    start = round_index * per_round
    indices, permutations = [], {}
    for position in range(start, start + per_round):
        epoch, offset = divmod(position, num_prompts)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            permutations[epoch] = torch.randperm(num_prompts, generator=generator).tolist()
        indices.append(permutations[epoch][offset])
    return indices
