"""``dpokit score``: the trained policy as the reward model the DPO paper's title promises.

For a prompt x and a response y the implicit reward is

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))

(summed response-token log-probs; with no reference, r = beta * log pi(y|x)). Under the
Bradley-Terry model DPO was trained with, the probability that y_1 is preferred to y_2 is

    P(y_1 > y_2 | x) = sigmoid(r(x, y_1) - r(x, y_2)),

and for K responses the probability that each one is the best is softmax(r)_k (Plackett-Luce's
first choice). The partition function Z(x) cancels in both, which is why rewards are only comparable
between responses to the *same* prompt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.data.schema import Text
from dpokit.errors import DataError
from dpokit.models import LoadOptions, load_policy
from dpokit.scoring import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_PROMPT_LENGTH,
    ScoredRow,
    ScoreRow,
    check_batch_size,
    policy_runner,
    resolve_reference,
    score_rows,
    training_defaults,
    unify_row,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- reading


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _cell(value: Any) -> Any:
    # CSV cells holding JSON (a list of responses, chat messages) are decoded; plain text stays text.
    if isinstance(value, str) and value.strip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _check_unicode(text: Any, where: str, field: str) -> None:
    if isinstance(text, str) and any("\ud800" <= ch <= "\udfff" for ch in text):
        raise DataError(f"{where}: field '{field}' holds a lone surrogate (e.g. \\ud800), which is not valid Unicode text")


def _text(value: Any, where: str, field: str) -> Text:
    value = _cell(value)
    if isinstance(value, str) and value != "":
        _check_unicode(value, where, field)
        return value
    if _is_messages(value):
        messages: list[dict[str, str]] = value
        for message in messages:
            _check_unicode(message["content"], where, field)
            _check_unicode(message["role"], where, field)
        return messages
    raise DataError(f"{where}: field '{field}' must be a non-empty string or a list of {{'role', 'content'}} messages")


def _row_from_mapping(row: Any, where: str, base_dir: Path | None = None) -> ScoreRow:
    """One row to score; its ``images`` (paths relative to ``base_dir``) are read and checked as training rows' are."""
    from dpokit.data.prompts import prompt_with_images

    parsed = _parse_mapping(row, where)
    prompt, responses = unify_row(parsed.prompt, parsed.responses)
    with_images = prompt_with_images(row, prompt, where, base_dir)
    return ScoreRow(with_images.prompt, responses, where, list(with_images.images), list(with_images.image_names))


def _parse_mapping(row: Any, where: str) -> ScoreRow:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'response'/'responses'/'chosen'+'rejected'")
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt'")
    prompt = _text(row["prompt"], where, "prompt")
    if row.get("responses") not in (None, ""):
        responses = _cell(row["responses"])
        if not isinstance(responses, list) or not responses or _is_messages(responses):
            raise DataError(f"{where}: field 'responses' must be a non-empty list of responses")
        return ScoreRow(prompt, [_text(r, where, f"responses[{i}]") for i, r in enumerate(responses)], where)
    if row.get("chosen") not in (None, "") or row.get("rejected") not in (None, ""):
        if row.get("chosen") in (None, "") or row.get("rejected") in (None, ""):
            raise DataError(f"{where}: a pair needs both 'chosen' and 'rejected'")
        return ScoreRow(prompt, [_text(row["chosen"], where, "chosen"), _text(row["rejected"], where, "rejected")], where)
    if row.get("response") not in (None, ""):
        return ScoreRow(prompt, [_text(row["response"], where, "response")], where)
    raise DataError(f"{where}: no responses: give 'response', 'responses' (a list) or 'chosen' and 'rejected'")


def text_rows(prompt: str, responses: Sequence[str], *, chat: bool = False) -> list[ScoreRow]:
    """One row from a prompt and its responses given as text; ``chat`` makes them a user turn and
    assistant turns (scored through the chat template)."""
    if chat:
        return [
            ScoreRow(
                [{"role": "user", "content": prompt}], [[{"role": "assistant", "content": r}] for r in responses], "command line"
            )
        ]
    return [ScoreRow(prompt, list(responses), "command line")]


def read_score_rows(path: str | Path) -> list[ScoreRow]:
    """Rows from a JSONL, JSON (a list of objects), CSV or Parquet file, read by the data reader."""
    from dpokit.data.reader import file_rows, image_base_dir

    base_dir = image_base_dir(path)
    rows = [_row_from_mapping(row, where, base_dir) for where, row in file_rows(path)]
    if not rows:
        raise DataError(f"{path}: no rows to score")
    return rows


# ------------------------------------------------------------------------------------------- scoring


def _short(text: Text, width: int = 60) -> str:
    flat = text if isinstance(text, str) else " | ".join(f"{m['role']}: {m['content']}" for m in text)
    flat = flat.replace("\n", " ")
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def format_scores(scored: Sequence[ScoredRow]) -> str:
    lines = []
    for index, row in enumerate(scored):
        lines.append(f"[{index}] prompt: {_short(row.prompt)}")
        for response, reward in zip(row.responses, row.rewards, strict=True):
            lines.append(f"    r={reward:+.4f}  {_short(response)}")
        if row.preference_prob is not None:
            lines.append(f"    P(first preferred) = {row.preference_prob:.4f}")
        elif row.best_prob is not None and len(row.responses) > 2:
            lines.append("    P(best) = " + ", ".join(f"{p:.3f}" for p in row.best_prob))
    return "\n".join(lines)


@dataclass
class ScoreJob:
    """How ``dpokit score`` scores rows with ``model``.

    ``beta`` None: the run's ``loss.beta`` (:func:`dpokit.analysis.evaluate.training_defaults`);
    ``max_length`` / ``max_prompt_length`` None: the run's data settings when the model has a run
    configuration, else :data:`DEFAULT_MAX_LENGTH` / :data:`DEFAULT_MAX_PROMPT_LENGTH`.
    """

    model: str
    reference: str | None = None
    reference_free: bool = False
    beta: float | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None
    batch_size: int = 8
    load: LoadOptions = field(default_factory=LoadOptions)


@dataclass
class ScoreReport:
    """Scored rows, the beta used and a description of the reference."""

    rows: list[ScoredRow]
    beta: float
    reference: str


def run_score(job: ScoreJob, rows: Sequence[ScoreRow]) -> ScoreReport:
    """Load the policy and its reference and score ``rows``."""
    check_batch_size(job.batch_size)
    policy = load_policy(job.model, job.load)
    train = training_defaults(policy)
    beta = float(job.beta if job.beta is not None else train.loss.beta)
    has_run = policy.run_config is not None
    max_length = job.max_length or (train.data.max_length if has_run else DEFAULT_MAX_LENGTH)
    max_prompt_length = job.max_prompt_length or (train.data.max_prompt_length if has_run else DEFAULT_MAX_PROMPT_LENGTH)
    runner = policy_runner(policy)
    reference, described = resolve_reference(policy, runner, job.reference, reference_free=job.reference_free, load=job.load)
    scored = score_rows(
        runner,
        policy.tokenizer,
        reference,
        rows,
        beta=beta,
        max_length=int(max_length),
        max_prompt_length=int(max_prompt_length),
        batch_size=job.batch_size,
        processor=policy.processor,
    )
    return ScoreReport(rows=scored, beta=beta, reference=described)
