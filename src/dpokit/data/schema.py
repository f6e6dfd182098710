"""The validated preference example and the row-level error type.

Everything downstream of the reader (tokenization, batching, the losses) sees only
:class:`PreferenceExample`: one prompt and ``K >= 2`` responses ranked best first. A pair is the
``K = 2`` case, ``responses == [chosen, rejected]``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from dpokit.errors import DataError

# {"role": ..., "content": ...}; a prompt message's content may also be a list of parts,
# {"type": "text", "text": ...} and {"type": "image"} (the image itself is in PreferenceExample.images).
Message = dict[str, Any]
Conversation = list[Message]
Text = str | Conversation


@dataclass
class PreferenceExample:
    """One prompt with ``K >= 2`` responses ordered best to worst.

    Attributes:
        prompt: plain text, or a list of ``{"role", "content"}`` messages (conversational data).
        responses: ``K`` responses ranked best first; strings for plain text, message lists (the
            assistant turn(s) after the prompt) for conversational data. For a pair,
            ``responses[0]`` is chosen and ``responses[1]`` rejected.
        scores: the numeric scores the ranking came from (same order as ``responses``), or None
            when the data gave the order directly.
        source: provenance, ``"path:line N"`` / ``"path:row N"``, used in every error message.
        label: for *unpaired* data (one completion, ``responses == [completion]``): True when the
            completion is desirable, False when undesirable; None for paired and ranked data (and for an
            unpaired row with a ``score`` until the reader applies its threshold).
        truncated: per response (same order), True when the response was cut off before it ended (e.g. a
            sampled completion that hit the token limit): tokenization appends no EOS to it, so the model
            is not taught to stop there. None (the usual case) means every response is complete.
        images: the prompt's images as encoded image files (PNG, JPEG, ...), in the order of the
            prompt's image placeholders; None for a text-only prompt.
        image_names: where each image came from (a path, or ``images[i]`` for bytes), for messages.
    """

    prompt: Text
    responses: list[Text]
    scores: list[float] | None = None
    source: str = ""
    label: bool | None = None
    truncated: list[bool] | None = None
    images: list[bytes] | None = None
    image_names: list[str] | None = None

    @property
    def is_unpaired(self) -> bool:
        return len(self.responses) == 1

    @property
    def chosen(self) -> Text:
        return self.responses[0]

    @property
    def rejected(self) -> Text:
        """The worst response (for a pair, the rejected one)."""
        return self.responses[-1]

    @property
    def num_responses(self) -> int:
        return len(self.responses)

    @property
    def has_images(self) -> bool:
        return bool(self.images)

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "responses": self.responses, "scores": self.scores, "source": self.source}
        if self.label is not None:
            out["label"] = self.label
        if self.truncated is not None and any(self.truncated):
            out["truncated"] = self.truncated
        if self.images:
            out["images"] = [hashlib.sha256(image).hexdigest() for image in self.images]
        return out

    def is_truncated(self, k: int) -> bool:
        """Whether response ``k`` was cut off before it ended."""
        return self.truncated is not None and self.truncated[k]

    def truncation_of(self, indices: list[int]) -> list[bool] | None:
        """The ``truncated`` flags of the responses ``indices`` (None when no response is truncated)."""
        flags = [self.is_truncated(k) for k in indices]
        return flags if any(flags) else None


# Reasons an input row can be rejected. They key the skip counts in the read report.
SKIP_REASONS = {
    "not_utf8": "line is not valid UTF-8",
    "malformed_json": "malformed JSON",
    "malformed_row": "row is not an object / has the wrong number of cells",
    "missing_field": "a required field is missing",
    "wrong_type": "a field has the wrong type",
    "empty_prompt": "the prompt is empty",
    "empty_response": "a response is empty",
    "identical_responses": "chosen identical to rejected (or two ranked responses identical)",
    "too_few_responses": "a ranking has fewer than 2 responses",
    "tied_scores": "all scores tie, so there is no preference",
    "no_shared_prompt": "chosen/rejected conversations share no prompt",
    "prompt_mismatch": "chosen and rejected do not share the same prompt",
    "bad_role": "an unknown chat role, a response not starting with an assistant message, or a system-only prompt",
    "chat_template_error": "the chat template failed on the row",
    "chat_template_prefix": "the chat template's prompt is not a token prefix of the conversation",
    "bad_image": "an image is missing, unreadable or not an image file",
    "image_count": "the number of images does not match the prompt's image placeholders",
}


class InvalidRowError(DataError):
    """A single row is unusable. ``reason`` is a key of :data:`SKIP_REASONS`.

    The message reads ``"<file>:line <n>: field '<name>': <problem>"`` so a user can find and fix it.
    """

    def __init__(self, source: str, field: str | None, reason: str, problem: str, alias: str | None = None) -> None:
        self.source = source
        self.field = field
        self.reason = reason
        self.problem = problem
        where = f"{source}: field '{field}'" if field else source
        if field and alias and alias != field:
            where += f" (used as '{alias}')"
        super().__init__(f"{where}: {problem}")


def type_name(value: Any) -> str:
    """A short, user-facing name for the type of a JSON-ish value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
