"""The pairs a person labels: a prompt and two completions, ``a`` and ``b``, read from what dpokit writes.

Accepted inputs (JSONL / JSON / CSV / Parquet files are read by :func:`dpokit.data.reader.file_rows`):

* ``{prompt, response_a, response_b}`` -- a is ``response_a``;
* preference pairs ``{prompt, chosen, rejected}`` -- a is ``chosen`` (the page never says which is which);
* ranked rows ``{prompt, responses: [best, ..., worst]}``, as an online round's ``pairs.jsonl`` holds
  them -- a is the first response, b the last;
* a ``dpokit winrate`` output directory (it holds ``results.json``) -- for each model and temperature,
  a is the model's sample and b the baseline's sample (or reference) it was judged against, read from
  the newest stored sample file under ``samples/``; the prompts are read again from the run's
  ``--prompts`` / ``--references`` files, which must still be where ``results.json`` says.

Prompts and completions are text or lists of ``{role, content}`` messages. Each pair has an ``id``: a
digest of its prompt and both completions, by which the label file remembers what is done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.data.prompts import check_prompt
from dpokit.data.schema import Text
from dpokit.errors import DataError

FIELD_SHAPES = (("response_a", "response_b"), ("chosen", "rejected"))
SHAPES_HINT = "{prompt, response_a, response_b}, {prompt, chosen, rejected} or {prompt, responses: [...]}"


@dataclass(frozen=True)
class LabelPair:
    """One pair to label: ``a`` and ``b`` as the input names them (``a_field``, ``b_field``)."""

    prompt: Text
    a: Text
    b: Text
    source: str  # where it was read: file:line, or the winrate run's model/temperature/prompt
    a_field: str
    b_field: str

    @property
    def id(self) -> str:
        """A digest of the prompt and both completions (the same pair read from another file has the same id)."""
        payload = json.dumps([self.prompt, self.a, self.b], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def as_text(value: Text) -> str:
    """What the page shows: the text, or each message as ``role:`` and its content."""
    if isinstance(value, str):
        return value
    return "\n\n".join(f"{message['role']}:\n{message['content']}" for message in value)


def _completion(value: Any, where: str, name: str) -> Text:
    try:
        return check_prompt(value, where)
    except DataError as error:
        raise DataError(str(error).replace("field 'prompt'", f"field '{name}'")) from None


def _pair_from_row(row: dict[str, Any], where: str) -> LabelPair:
    if row.get("prompt") in (None, ""):
        raise DataError(f"{where}: missing field 'prompt' (expected {SHAPES_HINT})")
    prompt = check_prompt(row["prompt"], where)
    for a_name, b_name in FIELD_SHAPES:
        if a_name in row or b_name in row:
            if row.get(a_name) in (None, "") or row.get(b_name) in (None, ""):
                raise DataError(f"{where}: a pair needs both '{a_name}' and '{b_name}'")
            a, b = _completion(row[a_name], where, a_name), _completion(row[b_name], where, b_name)
            return LabelPair(prompt, a, b, where, a_name, b_name)
    responses = row.get("responses")
    if isinstance(responses, list):
        if len(responses) < 2:
            raise DataError(f"{where}: field 'responses' needs at least two responses to make a pair")
        last = len(responses) - 1
        a, b = _completion(responses[0], where, "responses[0]"), _completion(responses[last], where, f"responses[{last}]")
        return LabelPair(prompt, a, b, where, "responses[0]", f"responses[{last}]")
    raise DataError(f"{where}: no pair of completions: expected {SHAPES_HINT}")


def read_label_pairs(source: str | Path) -> list[LabelPair]:
    """The pairs of a file (or a winrate output directory); a :class:`DataError` naming ``file:line`` and
    the field for a row that is not a pair. Pairs whose two completions are equal are kept (a tie to record)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "results.json").is_file():
            raise DataError(f"{path}: a directory, but not a dpokit winrate output (no results.json): give a pairs file")
        return winrate_pairs(path)
    from dpokit.data.reader import file_rows

    pairs = [_pair_from_row(row, where) for where, row in file_rows(path)]
    if not pairs:
        raise DataError(f"{path}: no pairs to label")
    return pairs


# ------------------------------------------------------------------------------- a winrate output


def _newest_samples(directory: Path, name: str, temperature: float, num_prompts: int) -> list[list[str]]:
    """The completions of the newest stored sample file of model ``name`` at ``temperature``."""
    folder = directory / "samples" / name
    files = sorted(folder.glob(f"t{temperature:g}-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise DataError(f"{folder}: no stored samples at temperature {temperature:g} (t{temperature:g}-*.json)")
    try:
        completions = json.loads(files[-1].read_bytes().decode("utf-8"))["completions"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{files[-1]}: not a stored sample file ({type(error).__name__}: {error})") from None
    if not isinstance(completions, list) or len(completions) != num_prompts:
        raise DataError(f"{files[-1]}: not {num_prompts} prompts' completions (the run's prompts file has changed?)")
    return completions


def winrate_pairs(directory: Path) -> list[LabelPair]:
    """(prompt, model sample j, baseline sample j or reference) for every model, temperature, prompt and j."""
    from dpokit.analysis.winrate import WinrateJob, prompts_and_references

    results_path = directory / "results.json"
    try:
        job = json.loads(results_path.read_text(encoding="utf-8"))["job"]
        models = [(str(name), str(model)) for name, model in job["models"]]
        temperatures = [float(t) for t in job["temperatures"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{results_path}: not a dpokit winrate results file ({type(error).__name__}: {error})") from None
    fields = ("prompts", "baseline", "references", "max_prompts")
    run = WinrateJob(models=models, judge=str(job.get("judge", "")), **{k: job.get(k) for k in fields})
    prompts, references = prompts_and_references(run)
    pairs: list[LabelPair] = []
    for (name, _), temperature in ((m, t) for m in models for t in temperatures):
        samples = _newest_samples(directory, name, temperature, len(prompts))
        baseline = _newest_samples(directory, "baseline", temperature, len(prompts)) if references is None else None
        for index, prompt in enumerate(prompts):
            for j, completion in enumerate(samples[index]):
                other = references[index] if references is not None else baseline[index][j] if baseline else ""
                where = f"{directory}: model {name}, T={temperature:g}, prompt {index + 1}, sample {j + 1}"
                b_field = "reference" if references is not None else f"baseline@T={temperature:g}"
                pairs.append(LabelPair(prompt, completion, other, where, f"{name}@T={temperature:g}", b_field))
    if not pairs:
        raise DataError(f"{directory}: no samples to label")
    return pairs
