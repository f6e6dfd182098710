"""Turn one raw row (a dict from JSONL/CSV/Parquet/datasets) into a validated :class:`PreferenceExample`.

Accepted shapes (after column mapping), detected per row when ``format="auto"``:

* ``standard``: ``prompt``, ``chosen``, ``rejected`` strings.
* ``conversational``: ``chosen``/``rejected`` lists of ``{"role", "content"}`` messages, with a
  ``prompt`` message list (or string, taken as one user message). Without a ``prompt`` the two
  conversations are split at their last common message (the shared prefix is the prompt). If
  ``chosen``/``rejected`` repeat the explicit prompt as their first messages, it is removed.
* ``hh``: Anthropic HH-RLHF text, ``chosen``/``rejected`` strings holding the whole dialogue
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt is everything up to and including the last
  ``"\\n\\nAssistant:"`` of ``chosen`` (as in the DPO paper's code) and must also start ``rejected``.
* ``ranked``: ``prompt`` and ``responses``, a list of K >= 2 responses best first, or with
  ``scores`` (one number per response; higher is better) -- or responses given as objects with a
  text key (``response``/``text``/``completion``) and a score key
  (``score``/``overall_score``/``rating``), as in UltraFeedback-style data. A score may be a JSON
  number or a numeric string (``"2.5"``, read as 2.5); anything else is refused.
* every paired/ranked shape may mark responses that were cut off before they ended (e.g. sampled
  completions that hit the token limit): ``chosen_truncated``/``rejected_truncated`` booleans, or
  ``truncated``, one boolean per entry of ``responses`` (reordered with the scores). Tokenization appends
  no EOS to such a response. Absent means complete.
* ``unpaired``: ``prompt`` and one ``completion`` (string or messages) with a ``label`` (true =
  desirable, false = undesirable; "true"/"false" in CSV), or a numeric ``score`` that the reader
  turns into a label with a threshold -- the data KTO learns from.

Mixed text/chat rows are normalised: a string prompt with message-list responses becomes one user
message; string responses to a message-list prompt become single assistant messages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpokit.data.images import count_image_parts, insert_image_parts, message_text, read_images
from dpokit.data.schema import Conversation, InvalidRowError, PreferenceExample, Text, type_name
from dpokit.errors import ConfigError

CANONICAL_FIELDS = ("prompt", "chosen", "rejected", "responses", "scores", "completion", "label", "score", "images")
FORMATS = ("auto", "standard", "conversational", "hh", "ranked", "unpaired")
HH_ASSISTANT = "\n\nAssistant:"
RESPONSE_TEXT_KEYS = ("response", "text", "completion")
# Roles a chat message may have (what chat templates know); any other role is refused.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
RESPONSE_SCORE_KEYS = ("score", "overall_score", "rating")


def check_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """Validate a ``{source column: canonical field}`` mapping and return canonical -> source."""
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise ConfigError(f"columns must be a mapping {{source column: field}}, got {type(columns).__name__}")
    inverse: dict[str, str] = {}
    for source_name, target in columns.items():
        if target not in CANONICAL_FIELDS:
            raise ConfigError(
                f"columns maps '{source_name}' to unknown field '{target}'; valid fields: {', '.join(CANONICAL_FIELDS)}"
            )
        if target in inverse:
            raise ConfigError(f"columns maps both '{inverse[target]}' and '{source_name}' to '{target}'")
        inverse[target] = str(source_name)
    return inverse


class _Row:
    """A raw row seen through the column mapping; remembers user-facing field names for errors."""

    def __init__(self, raw: Mapping[str, Any], source: str, inverse_columns: dict[str, str], text_table: bool):
        self.raw = raw
        self.source = source
        self.inverse = inverse_columns
        self.text_table = text_table

    def name(self, field: str) -> str:
        """The user's column name for a canonical field (``responses[2]`` maps through ``responses``)."""
        base, bracket, rest = field.partition("[")
        return self.inverse.get(base, base) + bracket + rest

    def has(self, field: str) -> bool:
        value = self.raw.get(self.inverse.get(field, field))
        return value is not None

    def get(self, field: str) -> Any:
        value = self.raw.get(self.inverse.get(field, field))
        if self.text_table and isinstance(value, str):
            value = _maybe_json_cell(value, field)
        return value

    def error(self, field: str | None, reason: str, problem: str) -> InvalidRowError:
        return InvalidRowError(self.source, self.name(field) if field else None, reason, problem, alias=field)


def _maybe_json_cell(value: str, field: str) -> Any:
    """CSV cells are strings: read JSON lists in list-valued fields (messages, responses, scores)."""
    stripped = value.strip()
    if not stripped.startswith("["):
        return value
    try:
        parsed = json.loads(stripped)
    except ValueError:
        return value
    if field in ("responses", "scores", "images"):
        return parsed if isinstance(parsed, list) else value
    # prompt/chosen/rejected: only a list of message objects counts as a conversation.
    if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
        return parsed
    return value


# ----------------------------------------------------------------------------------------------
# Field validation


def _check_unicode(row: _Row, field: str, value: str) -> str:
    """A lone surrogate (JSON ``"\\ud800"`` without its pair) is not text any tokenizer can encode."""
    bad = next((i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        raise row.error(
            field,
            "not_utf8",
            f"character {bad + 1} is a lone surrogate ({value[bad].encode('unicode_escape').decode()}), which is not "
            "valid Unicode text; fix the escape sequence",
        )
    return value


def _text(row: _Row, field: str, value: Any, *, what: str = "string") -> str:
    if not isinstance(value, str):
        raise row.error(field, "wrong_type", f"expected a {what}, got {type_name(value)}")
    return _check_unicode(row, field, value)


def _messages(row: _Row, field: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise row.error(field, "wrong_type", f"expected a list of {{role, content}} messages, got {type_name(value)}")
    if not value:
        raise row.error(field, "empty_response" if field != "prompt" else "empty_prompt", "the message list is empty")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise row.error(
                field, "wrong_type", f"message {i} must be an object with 'role' and 'content', got {type_name(message)}"
            )
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            missing = "role" if role is None else "content"
            raise row.error(field, "missing_field", f"message {i} has no '{missing}'")
        if not isinstance(role, str) or not role:
            raise row.error(field, "wrong_type", f"message {i}: 'role' must be a non-empty string, got {type_name(role)}")
        if isinstance(content, list):
            content = _content_parts(row, field, i, content)
        elif isinstance(content, str):
            content = _check_unicode(row, field, content)
        else:
            raise row.error(
                field, "wrong_type", f"message {i}: 'content' must be a string or a list of parts, got {type_name(content)}"
            )
        if role not in CHAT_ROLES:
            raise row.error(
                field, "bad_role", f"message {i} has the unknown role {role!r}; chat roles are {', '.join(CHAT_ROLES)}"
            )
        messages.append({"role": _check_unicode(row, field, role), "content": content})
    if field == "prompt":
        _check_prompt_roles(row, messages)
    return messages


def _content_parts(row: _Row, field: str, index: int, parts: list[Any]) -> list[dict[str, str]]:
    """A message's content as a list of parts: ``{"type": "text", "text": ...}`` and ``{"type": "image"}``
    (the image itself comes from the row's ``images``, in placeholder order). Responses may hold no image
    (:func:`_check_responses`)."""
    checked: list[dict[str, str]] = []
    for j, part in enumerate(parts):
        where = f"message {index} part {j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            checked.append({"type": "text", "text": _check_unicode(row, field, part["text"])})
        elif kind == "image":
            checked.append({"type": "image"})
        else:
            expected = '{"type": "text", "text": ...} or {"type": "image"}'
            raise row.error(field, "wrong_type", f"{where} must be {expected}, got {part!r}")
    return checked


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _text_or_messages(row: _Row, field: str, value: Any) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return _check_unicode(row, field, value)
    if isinstance(value, list):
        return _messages(row, field, value)
    raise row.error(field, "wrong_type", f"expected a string or a list of {{role, content}} messages, got {type_name(value)}")


def _score(row: _Row, field: str, value: Any) -> float:
    # A numeric string ("2.5", as CSV cells and some exported datasets hold scores) is read as its number
    # (documented in the README's data formats); any other string is refused below.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise row.error(field, "wrong_type", f"expected a number, got {type_name(value)}")
    try:
        score = float(value)
    except (ValueError, OverflowError):
        raise row.error(field, "wrong_type", f"expected a number, got {value!r}") from None
    if not math.isfinite(score):
        raise row.error(field, "wrong_type", f"expected a finite number, got {value!r}")
    return score


def _check_nonempty_prompt(row: _Row, prompt: Any) -> None:
    if isinstance(prompt, str) and not prompt.strip():
        raise row.error("prompt", "empty_prompt", "the prompt is empty")


def _response_is_empty(response: Any) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not any(message_text(m["content"]).strip() for m in response)


def _check_responses(row: _Row, responses: Sequence[Text], fields: list[str]) -> None:
    """Every response must be non-empty, start with an assistant turn (chat) and be distinct."""
    for response, field in zip(responses, fields, strict=True):
        if _response_is_empty(response):
            raise row.error(field, "empty_response", "the response is empty")
        if isinstance(response, list) and count_image_parts(response):
            raise row.error(field, "wrong_type", "has an image part; images are supported in the prompt only")
        if isinstance(response, list) and response[0]["role"] != "assistant":
            raise row.error(
                field, "bad_role", f"the response must start with an assistant message, got role '{response[0]['role']}'"
            )
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        key = response if isinstance(response, str) else json.dumps(response, sort_keys=True)
        if key in seen:
            j = seen[key]
            if fields[j] == "chosen" and fields[i] == "rejected":
                raise row.error(
                    "rejected", "identical_responses", "chosen and rejected are identical; a pair needs two different responses"
                )
            raise row.error(fields[i], "identical_responses", f"identical to {fields[j]}; ranked responses must differ")
        seen[key] = i


def _unify(prompt: Text, responses: list[Text]) -> tuple[Text, list[Text]]:
    """Make a row all-text or all-chat (see module docstring)."""
    if isinstance(prompt, list) or any(isinstance(r, list) for r in responses):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in responses]
    return prompt, responses


def _strip_repeated_prompt(
    row: _Row, prompt: Conversation, chosen: Conversation, rejected: Conversation
) -> tuple[Conversation, Conversation]:
    """Datasets often store full conversations next to the prompt; drop the repeated prompt turns."""
    n = len(prompt)
    chosen_repeats = len(chosen) > n and chosen[:n] == prompt
    rejected_repeats = len(rejected) > n and rejected[:n] == prompt
    if chosen_repeats and rejected_repeats:
        return chosen[n:], rejected[n:]
    if chosen_repeats != rejected_repeats:
        field = "rejected" if chosen_repeats else "chosen"
        raise row.error(field, "prompt_mismatch", "one of chosen/rejected repeats the prompt messages and the other does not")
    return chosen, rejected


# ----------------------------------------------------------------------------------------------
# The formats


def _check_mapped_columns(row: _Row) -> None:
    """A column ``data.columns`` names for a text field must be in the row (a typo would otherwise read as
    another format); optional fields (scores, label, score) may be absent from some rows."""
    for field, column in row.inverse.items():
        if field in ("prompt", "chosen", "rejected", "responses", "completion") and column not in row.raw:
            _require(row, field)


def _check_prompt_roles(row: _Row, prompt: Text) -> None:
    if isinstance(prompt, list) and all(m["role"] == "system" for m in prompt):
        raise row.error(
            "prompt", "bad_role", "the prompt has only system messages; it needs a user turn for the response to answer"
        )


def detect_format(row: _Row) -> str:
    _check_mapped_columns(row)
    if row.has("responses"):
        return "ranked"
    if row.has("completion"):
        return "unpaired"
    if row.has("chosen") or row.has("rejected"):
        chosen = row.get("chosen")
        if row.has("prompt"):
            return "conversational" if _is_conversation(chosen) or _is_conversation(row.get("prompt")) else "standard"
        if _is_conversation(chosen):
            return "conversational"
        return "hh"
    present = sorted(k for k in row.raw) if isinstance(row.raw, Mapping) else []
    raise row.error(
        "chosen",
        "missing_field",
        "missing; a row needs 'prompt' + 'chosen' + 'rejected', 'chosen' + 'rejected' dialogues, 'prompt' + "
        "'responses', or 'prompt' + 'completion' + 'label' "
        f"(found fields: {', '.join(map(str, present)) or 'none'}). Map other column names with columns={{...}}",
    )


def _require(row: _Row, field: str, hint: str = "") -> Any:
    if not row.has(field):
        if field in row.inverse:
            column = row.inverse[field]
            present = ", ".join(sorted(map(str, row.raw))) or "none"
            what = "is empty (null)" if column in row.raw else "is not in the row"
            hint = f"the column '{column}' that data.columns maps to '{field}' {what}; the row's columns: {present}"
        raise row.error(field, "missing_field", "missing" + (f"; {hint}" if hint else ""))
    return row.get(field)


def _flag(row: _Row, field: str) -> bool:
    value = row.get(field)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV cells
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise row.error(field, "wrong_type", f"expected true or false, got {type_name(value)}")
    return value


def _pair_truncation(row: _Row) -> list[bool] | None:
    """``chosen_truncated`` / ``rejected_truncated`` (each optional, default false); None when neither is true."""
    flags = [_flag(row, f) if row.has(f) else False for f in ("chosen_truncated", "rejected_truncated")]
    return flags if any(flags) else None


def _ranked_truncation(row: _Row, count: int) -> list[bool] | None:
    """``truncated``: one boolean per response (optional); None when none is true."""
    if not row.has("truncated"):
        return None
    raw = row.get("truncated")
    if not isinstance(raw, list):
        raise row.error("truncated", "wrong_type", f"expected a list of true/false, one per response, got {type_name(raw)}")
    if len(raw) != count:
        raise row.error("truncated", "wrong_type", f"has {len(raw)} flags for {count} responses")
    flags = []
    for i, value in enumerate(raw):
        if not isinstance(value, bool):
            raise row.error(f"truncated[{i}]", "wrong_type", f"expected true or false, got {type_name(value)}")
        flags.append(value)
    return flags if any(flags) else None


def parse_standard(row: _Row) -> PreferenceExample:
    prompt = _text(row, "prompt", _require(row, "prompt"))
    chosen = _text(row, "chosen", _require(row, "chosen"))
    rejected = _text(row, "rejected", _require(row, "rejected"))
    _check_nonempty_prompt(row, prompt)
    _check_responses(row, [chosen, rejected], ["chosen", "rejected"])
    return PreferenceExample(prompt, [chosen, rejected], None, row.source, truncated=_pair_truncation(row))


def parse_conversational(row: _Row) -> PreferenceExample:
    chosen = _text_or_messages(row, "chosen", _require(row, "chosen"))
    rejected = _text_or_messages(row, "rejected", _require(row, "rejected"))
    if row.has("prompt"):
        prompt = _text_or_messages(row, "prompt", row.get("prompt"))
        _check_nonempty_prompt(row, prompt)
        prompt, (chosen, rejected) = _unify(prompt, [chosen, rejected])
        # Repeated prompt turns are messages: an all-text row (format="conversational" forced) keeps its strings.
        if isinstance(prompt, list) and isinstance(chosen, list) and isinstance(rejected, list):
            chosen, rejected = _strip_repeated_prompt(row, prompt, chosen, rejected)
    else:
        if not isinstance(chosen, list):
            raise row.error("chosen", "wrong_type", f"expected a list of {{role, content}} messages, got {type_name(chosen)}")
        if not isinstance(rejected, list):
            raise row.error("rejected", "wrong_type", f"expected a list of {{role, content}} messages, got {type_name(rejected)}")
        prompt, chosen, rejected = split_conversations(row, chosen, rejected)
        _check_prompt_roles(row, prompt)
    _check_responses(row, [chosen, rejected], ["chosen", "rejected"])
    return PreferenceExample(prompt, [chosen, rejected], None, row.source, truncated=_pair_truncation(row))


def split_conversations(
    row: _Row, chosen: Conversation, rejected: Conversation
) -> tuple[Conversation, Conversation, Conversation]:
    """Implicit prompt: the longest common prefix of whole messages; the split is after the last common one."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise row.error(
            "rejected", "identical_responses", "chosen and rejected are identical; a pair needs two different responses"
        )
    if shared == 0:
        raise row.error(
            "chosen",
            "no_shared_prompt",
            "chosen and rejected share no leading message, so the prompt cannot be inferred; add a 'prompt' field",
        )
    if shared == len(chosen) or shared == len(rejected):
        field = "chosen" if shared == len(chosen) else "rejected"
        raise row.error(field, "empty_response", "the conversation has no messages after the shared prompt")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def parse_hh(row: _Row) -> PreferenceExample:
    """Anthropic HH-RLHF: prompt = chosen up to and including its last ``"\\n\\nAssistant:"``."""
    chosen = _text(row, "chosen", _require(row, "chosen"))
    rejected = _text(row, "rejected", _require(row, "rejected"))
    cut = chosen.rfind(HH_ASSISTANT)
    if cut == -1:
        raise row.error(
            "prompt",
            "missing_field",
            "missing, and 'chosen' has no '\\n\\nAssistant:' turn to infer it from (Anthropic HH format); add a 'prompt' field",
        )
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise row.error(
            "rejected", "prompt_mismatch", "does not start with the same dialogue as 'chosen' (up to the last '\\n\\nAssistant:')"
        )
    responses: list[Text] = [chosen[len(prompt) :], rejected[len(prompt) :]]
    _check_nonempty_prompt(row, prompt)
    _check_responses(row, responses, ["chosen", "rejected"])
    return PreferenceExample(prompt, responses, None, row.source, truncated=_pair_truncation(row))


def parse_ranked(row: _Row) -> PreferenceExample:
    """``prompt`` + ``responses`` (best first, or ordered here by ``scores``, highest first; ties keep input order)."""
    prompt = _text_or_messages(row, "prompt", _require(row, "prompt"))
    _check_nonempty_prompt(row, prompt)
    raw_responses = _require(row, "responses")
    if not isinstance(raw_responses, list):
        raise row.error("responses", "wrong_type", f"expected a list of responses, got {type_name(raw_responses)}")
    if len(raw_responses) < 2:
        raise row.error("responses", "too_few_responses", f"a ranking needs at least 2 responses, got {len(raw_responses)}")
    responses: list[Text] = []
    item_scores: list[float | None] = []
    for i, item in enumerate(raw_responses):
        field = f"responses[{i}]"
        score = None
        if isinstance(item, dict):
            text_key = next((k for k in RESPONSE_TEXT_KEYS if k in item), None)
            if text_key is None:
                raise row.error(
                    field, "missing_field", f"a response object needs one of the keys {', '.join(RESPONSE_TEXT_KEYS)}"
                )
            score_key = next((k for k in RESPONSE_SCORE_KEYS if k in item), None)
            if score_key is not None:
                score = _score(row, f"{field}.{score_key}", item[score_key])
            item = item[text_key]
        responses.append(_text_or_messages(row, field, item))
        item_scores.append(score)

    scores: list[float] | None = None
    if row.has("scores"):
        raw_scores = row.get("scores")
        if not isinstance(raw_scores, list):
            raise row.error("scores", "wrong_type", f"expected a list of numbers, got {type_name(raw_scores)}")
        if len(raw_scores) != len(responses):
            raise row.error("scores", "wrong_type", f"has {len(raw_scores)} scores for {len(responses)} responses")
        scores = [_score(row, f"scores[{i}]", s) for i, s in enumerate(raw_scores)]
    elif any(s is not None for s in item_scores):
        if any(s is None for s in item_scores):
            missing = item_scores.index(None)
            raise row.error(f"responses[{missing}]", "missing_field", "has no score while other responses do")
        scores = [s for s in item_scores if s is not None]  # all present here

    truncated = _ranked_truncation(row, len(responses))
    prompt, responses = _unify(prompt, responses)
    fields = [f"responses[{i}]" for i in range(len(responses))]
    _check_responses(row, responses, fields)
    if scores is not None:
        if len(set(scores)) == 1:
            raise row.error(
                "scores", "tied_scores", f"all {len(scores)} responses score {scores[0]:g}, so there is no preference"
            )
        order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # stable: ties keep input order
        responses = [responses[i] for i in order]
        scores = [scores[i] for i in order]
        truncated = None if truncated is None else [truncated[i] for i in order]
    return PreferenceExample(prompt, responses, scores, row.source, truncated=truncated)


def _label(row: _Row) -> bool:
    value = row.get("label")
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise row.error("label", "wrong_type", f"expected true (desirable) or false (undesirable), got {type_name(value)}")
    return value


def parse_unpaired(row: _Row) -> PreferenceExample:
    """``prompt`` + one ``completion`` + ``label`` (bool) or ``score`` (labelled later by a threshold)."""
    prompt = _text_or_messages(row, "prompt", _require(row, "prompt"))
    completion = _text_or_messages(row, "completion", _require(row, "completion"))
    _check_nonempty_prompt(row, prompt)
    if _response_is_empty(completion):
        raise row.error("completion", "empty_response", "is empty")
    prompt, (completion,) = _unify(prompt, [completion])
    if row.has("label"):
        return PreferenceExample(prompt, [completion], None, row.source, label=_label(row))
    if row.has("score"):
        return PreferenceExample(prompt, [completion], [_score(row, "score", row.get("score"))], row.source)
    raise row.error("label", "missing_field", "missing; an unpaired row needs 'label' (true/false) or a numeric 'score'")


PARSERS = {
    "standard": parse_standard,
    "conversational": parse_conversational,
    "hh": parse_hh,
    "ranked": parse_ranked,
    "unpaired": parse_unpaired,
}


def _attach_images(row: _Row, example: PreferenceExample, base_dir: Path | None) -> None:
    """The row's ``images`` (or ``image``), read and checked, on the example. In chat rows their count
    must match the prompt's ``{"type": "image"}`` parts; a prompt with no such part gets them at the
    start of its first user message (TRL's rule). Plain-text prompts are checked against the
    processor's placeholder when tokenized (:mod:`dpokit.data.tokenize`)."""
    field = "image" if row.has("image") and not row.has("images") else "images"
    parts = count_image_parts(example.prompt) if isinstance(example.prompt, list) else 0
    if not row.has(field):
        if parts:
            problem = f"the prompt has {parts} image placeholder(s) but the row has no 'images'"
            raise row.error("prompt", "image_count", problem)
        return
    value = row.get(field)
    if not isinstance(value, list):
        value = [value]
    images, names = read_images(value, field=row.name(field), base_dir=base_dir, error=row.error)
    if not images:
        if parts:
            raise row.error(field, "image_count", f"is empty but the prompt has {parts} image placeholder(s)")
        return
    if isinstance(example.prompt, list):
        if parts == 0:
            example.prompt = insert_image_parts(example.prompt, len(images))
        elif parts != len(images):
            raise row.error(
                field,
                "image_count",
                f"the row has {len(images)} image(s) but its prompt has {parts} image placeholder(s) "
                '({"type": "image"} parts); give one image per placeholder',
            )
    example.images, example.image_names = images, names


def parse_row(
    raw: Any,
    source: str,
    *,
    format: str = "auto",
    inverse_columns: dict[str, str] | None = None,
    text_table: bool = False,
    base_dir: Path | None = None,
) -> tuple[PreferenceExample, str]:
    """Validate one raw row; return the example and the format it was read as.

    ``base_dir``: what image paths in the row are relative to (the data file's directory; None: the
    working directory).

    Raises :class:`InvalidRowError` naming ``source`` and the field for anything unusable.
    """
    if not isinstance(raw, Mapping):
        raise InvalidRowError(
            source, None, "malformed_row", f"expected an object with prompt/chosen/rejected fields, got {type_name(raw)}"
        )
    row = _Row(raw, source, inverse_columns or {}, text_table)
    fmt = detect_format(row) if format == "auto" else format
    example = PARSERS[fmt](row)
    _attach_images(row, example, base_dir)
    return example, fmt
