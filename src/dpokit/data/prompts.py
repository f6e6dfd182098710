"""Prompts without responses: the one reader behind every command that samples (``generate``,
``winrate``, ``frontier``, ``online`` and the experiments).

A source is a ``.txt`` file (one prompt per non-empty line), or anything the preference reader reads
(JSONL / JSON / CSV / TSV / Parquet files, a ``save_to_disk`` directory, a hub id) whose rows carry a
``prompt``: text, or a list of ``{role, content}`` messages. Every bad row is a :class:`DataError`
naming its file and line; a prompt is never skipped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpokit.data.reader import FILE_SUFFIXES, raw_rows
from dpokit.data.schema import InvalidRowError, Text
from dpokit.errors import DataError

Prompt = Text  # plain text, or a list of {"role", "content"} messages


@dataclass(frozen=True)
class PromptRow:
    """One prompt and where it came from (``path:line N``)."""

    prompt: Prompt
    where: str


def check_prompt(value: object, where: str) -> Prompt:
    """``value`` as a prompt, or a DataError naming ``where``: a non-empty string without lone surrogates,
    or a non-empty list of messages with string ``role`` and ``content``."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise DataError(f"{where}: field 'prompt' holds a lone surrogate (e.g. \\ud800), not valid Unicode")
        return value
    if isinstance(value, list) and value:
        for index, message in enumerate(value):
            if not (
                isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
            ):
                raise DataError(f"{where}: field 'prompt[{index}]' must be a {{role, content}} message with string values")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: field 'prompt' must be a non-empty string or a list of {{role, content}} messages")


def _text_file_rows(path: Path) -> list[PromptRow]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        where = f"{path}:line {line}"
        raise DataError(f"{where}: not valid UTF-8 (byte {error.start + 1} of the file); re-save it as UTF-8") from None
    return [
        PromptRow(check_prompt(line, f"{path}:line {number}"), f"{path}:line {number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def read_prompt_rows(source: str | Path, split: str = "train") -> list[PromptRow]:
    """Every prompt of ``source`` in file order (see the module docstring); a source without any prompt
    is an error too."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix not in (".txt", *FILE_SUFFIXES):
        choices = ", ".join(FILE_SUFFIXES)
        raise DataError(f"{path}: unsupported file type '{suffix}' for prompts; use .txt (one per line), {choices}")
    if suffix == ".txt" and path.is_file():
        prompts = _text_file_rows(path)
    else:
        rows, _ = raw_rows(str(source), split=split)
        prompts = []
        for where, row in rows:
            if isinstance(row, InvalidRowError):
                raise row
            if not isinstance(row, dict):
                if type(row).__name__ == "_BlankLine":
                    continue
                raise DataError(f"{where}: expected an object with a 'prompt' field, got {type(row).__name__}")
            if "prompt" not in row:
                raise DataError(f"{where}: missing field 'prompt' (found fields: {', '.join(map(str, row)) or 'none'})")
            prompts.append(PromptRow(check_prompt(row["prompt"], where), where))
    if not prompts:
        raise DataError(f"{source}: no prompts")
    return prompts


def read_prompts(source: str | Path, split: str = "train") -> list[Prompt]:
    """The prompts of :func:`read_prompt_rows`, without their locations."""
    return [row.prompt for row in read_prompt_rows(source, split)]
