"""Prompts without responses: the one reader behind every command that samples (``generate``,
``winrate``, ``frontier``, ``online`` and the experiments).

A source is a ``.txt`` file (one prompt per non-empty line), or anything the preference reader reads
(JSONL / JSON / CSV / TSV / Parquet files, a ``save_to_disk`` directory, a hub id) whose rows carry a
``prompt``: text, or a list of ``{role, content}`` messages. Every bad row is a :class:`DataError`
naming its file and line; a prompt is never skipped silently.

A row may carry ``images`` (or ``image``) as training rows do (docs/vlm.md): paths relative to the
prompts file, bytes, ``datasets`` Image values or PIL images, each read and checked here (a missing or
unreadable image names the file, line, field and path). Chat prompts mark each image with a
``{"type": "image"}`` content part; messages without one get the images at the start of the first user
message; a plain-text prompt writes the processor's image token where each image goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.data.images import count_image_parts, insert_image_parts, read_images
from dpokit.data.reader import FILE_SUFFIXES, image_base_dir, raw_rows
from dpokit.data.schema import InvalidRowError, Text
from dpokit.errors import DataError

Prompt = Text  # plain text, or a list of {"role", "content"} messages


@dataclass(frozen=True)
class PromptRow:
    """One prompt, where it came from (``path:line N``) and its images (encoded files, in placeholder
    order, with ``image_names``: where each came from)."""

    prompt: Prompt
    where: str
    images: tuple[bytes, ...] = ()
    image_names: tuple[str, ...] = ()


def _content(value: object) -> Any:
    """A message's content as given when it is a string or a list of text / image parts, else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(part, dict)
        and (part.get("type") == "image" or (part.get("type") == "text" and isinstance(part.get("text"), str)))
        for part in value
    ):
        return [{"type": "image"} if part["type"] == "image" else {"type": "text", "text": part["text"]} for part in value]
    return None


def check_prompt(value: object, where: str) -> Prompt:
    """``value`` as a prompt, or a DataError naming ``where``: a non-empty string without lone surrogates,
    or a non-empty list of messages with a string ``role`` and a ``content`` that is a string or a list of
    ``{"type": "text", "text"}`` / ``{"type": "image"}`` parts."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise DataError(f"{where}: field 'prompt' holds a lone surrogate (e.g. \\ud800), not valid Unicode")
        return value
    if isinstance(value, list) and value:
        messages = []
        for index, message in enumerate(value):
            content = _content(message.get("content")) if isinstance(message, dict) else None
            if content is None or not isinstance(message.get("role"), str):
                raise DataError(
                    f"{where}: field 'prompt[{index}]' must be a {{role, content}} message with a string role and a string "
                    'content (or a list of {"type": "text", "text": ...} and {"type": "image"} parts)'
                )
            messages.append({"role": message["role"], "content": content})
        return messages
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


def read_prompt_rows(source: str | Path, split: str = "train", *, images: bool = False) -> list[PromptRow]:
    """Every prompt of ``source`` in file order (see the module docstring); a source without any prompt
    is an error too. ``images``: whether the caller samples image prompts; when not, a row with images
    is an error (its images are never dropped silently)."""
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
            prompt = prompt_with_images(row, check_prompt(row["prompt"], where), where, image_base_dir(source))
            if prompt.images and not images:
                raise DataError(
                    f"{where}: field 'images': this command does not sample prompts with images yet (dpokit generate "
                    "does); give prompts without images"
                )
            prompts.append(prompt)
    if not prompts:
        raise DataError(f"{source}: no prompts")
    return prompts


def prompt_with_images(row: dict[str, Any], prompt: Prompt, where: str, base_dir: Path | None) -> PromptRow:
    """The row's (checked) prompt with its ``images`` (or ``image``) read and checked against the prompt's
    image parts (paths relative to ``base_dir``); every problem is a :class:`DataError` naming ``where``."""
    field = "image" if "image" in row and "images" not in row else "images"
    parts = count_image_parts(prompt)
    value = row.get(field)
    if value is None:
        if parts:
            raise DataError(f"{where}: field 'prompt': the prompt has {parts} image placeholder(s) but the row has no 'images'")
        return PromptRow(prompt, where)

    def error(name: str | None, reason: str, problem: str) -> DataError:
        return DataError(f"{where}: field '{name}': {problem}")

    images, names = read_images(value if isinstance(value, list) else [value], field=field, base_dir=base_dir, error=error)
    if isinstance(prompt, list) and images:
        if parts == 0:
            prompt = insert_image_parts(prompt, len(images))
        elif parts != len(images):
            raise DataError(
                f"{where}: field '{field}': the row has {len(images)} image(s) but its prompt has {parts} image placeholder(s) "
                '({"type": "image"} parts); give one image per placeholder'
            )
    elif parts:
        raise DataError(f"{where}: field '{field}': is empty but the prompt has {parts} image placeholder(s)")
    return PromptRow(prompt, where, tuple(images), tuple(names))


def read_prompts(source: str | Path, split: str = "train") -> list[Prompt]:
    """The prompts of :func:`read_prompt_rows`, without their locations."""
    return [row.prompt for row in read_prompt_rows(source, split)]
