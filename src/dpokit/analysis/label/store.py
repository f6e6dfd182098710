"""The label file: one JSON line per decision, appended whole and fsync'd, read back to resume.

A line holds everything needed without the input file::

    {"id": "...", "index": 3, "source": "pairs.jsonl:line 4", "prompt": ..., "a": ..., "b": ...,
     "a_field": "chosen", "b_field": "rejected", "left": "b", "choice": "a", "seed": 0, "time": "..."}

``choice`` is ``a``, ``b``, ``tie`` or ``skip`` -- always in terms of the input's ``a`` and ``b``, not of
the side the page showed them on; ``left`` records which one was shown on the left (drawn from ``seed``
and the pair's id, so a reload shows the same order).

Each line is written by a single ``os.write`` of the whole line on a file opened for appending, then
``fsync``'d. A line cut short by a crash (no newline, not JSON) is passed over with a warning naming
``file:line`` and its pair is shown again; the next append first ends that fragment with a newline, so
a torn line never swallows a whole one. Any other bad line (JSON, but not a label) is a
:class:`DataError` naming ``file:line`` and the field.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.analysis.label.pairs import LabelPair
from dpokit.data.schema import Text
from dpokit.errors import DataError

CHOICES = ("a", "b", "tie", "skip")
LABEL_FIELDS = ("id", "prompt", "a", "b", "choice", "left")
FIRST_LINE_LIMIT = 1 << 24  # bytes of a file's first line read to tell whether it is a label file
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HumanLabel:
    """One decision read back from a label file."""

    id: str
    prompt: Text
    a: Text
    b: Text
    choice: str  # a | b | tie | skip
    where: str  # file:line


def left_side(pair_id: str, seed: int) -> str:
    """Which of ``a`` / ``b`` the page shows on the left: a coin drawn from the seed and the pair's id."""
    return "a" if random.Random(f"{seed}:{pair_id}").random() < 0.5 else "b"


def _check_label(row: Any, where: str) -> HumanLabel:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object (a label written by dpokit label)")
    missing = [name for name in LABEL_FIELDS if name not in row]
    if missing:
        raise DataError(f"{where}: missing field '{missing[0]}': not a label line written by dpokit label")
    if row["choice"] not in CHOICES:
        raise DataError(f"{where}: field 'choice' is {row['choice']!r}; expected one of {', '.join(CHOICES)}")
    if row["left"] not in ("a", "b"):
        raise DataError(f"{where}: field 'left' is {row['left']!r}; expected 'a' or 'b'")
    for name in ("id", "prompt", "a", "b"):
        value = row[name]
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value))):
            raise DataError(f"{where}: field '{name}' must be text (or a list of messages), got {type(value).__name__}")
    return HumanLabel(row["id"], row["prompt"], row["a"], row["b"], row["choice"], where)


def read_labels(path: str | Path) -> tuple[list[HumanLabel], list[str]]:
    """The labels of a label file (none when it does not exist) and a warning per torn line passed over.
    A pair labelled twice keeps its first label (the later ones are counted in a warning)."""
    path = Path(path)
    if not path.exists():
        return [], []
    labels: list[HumanLabel] = []
    warnings: list[str] = []
    seen: set[str] = set()
    repeats = 0
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            warnings.append(f"{where}: a line cut short (not JSON) was passed over; its pair will be asked again")
            continue
        label = _check_label(row, where)
        if label.id in seen:
            repeats += 1
            continue
        seen.add(label.id)
        labels.append(label)
    if repeats:
        warnings.append(f"{path}: {repeats} pair(s) labelled more than once; the first label of each is used")
    return labels, warnings


class LabelFile:
    """Appends decisions to ``path`` (whole lines, fsync'd) and knows which pairs are done."""

    def __init__(self, path: str | Path, seed: int) -> None:
        self.path = Path(path)
        self.seed = seed
        self.lock = threading.Lock()
        labels, self.warnings = read_labels(self.path)
        for warning in self.warnings:
            logger.warning(warning)
        self.done: dict[str, str] = {label.id: label.choice for label in labels}

    def _needs_newline(self) -> bool:
        """The file ends inside a line (a torn write): the next line must start on a new one."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"

    def record(self, index: int, pair: LabelPair, choice: str) -> bool:
        """Append ``pair``'s decision; False (nothing written) when the pair is already labelled."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, not {choice!r}")
        row = {
            "id": pair.id,
            "index": index,
            "source": pair.source,
            "prompt": pair.prompt,
            "a": pair.a,
            "b": pair.b,
            "a_field": pair.a_field,
            "b_field": pair.b_field,
            "left": left_side(pair.id, self.seed),
            "choice": choice,
            "seed": self.seed,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with self.lock:
            if pair.id in self.done:
                return False
            data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            if self._needs_newline():
                data = b"\n" + data
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                while written < len(data):  # a short write (rare, on some file systems): finish the line
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            self.done[pair.id] = choice
            return True


def is_label_file(path: str | Path) -> bool:
    """Whether ``path`` is a label file written by ``dpokit label``: its first line is a label."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    with path.open("rb") as handle:  # a line at a time, each read bounded (a binary file may hold no newline)
        for line in iter(lambda: handle.readline(FIRST_LINE_LIMIT), b""):
            if line.strip():
                try:
                    row = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    return False
                return isinstance(row, dict) and all(name in row for name in LABEL_FIELDS)
    return False
