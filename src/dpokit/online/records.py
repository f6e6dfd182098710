"""The files of an online run, one directory per round, written before the round trains on them::

    <run_dir>/rounds/round-0003/
        prompts.jsonl       the round's prompts: {prompt_index, source_index, where, prompt}
        completions.jsonl   K samples per prompt: {prompt_index, sample_index, rank, completion, num_tokens,
                            stopped, policy_logp, reference_logp}
        judgments.jsonl     one score per completion: {prompt_index, sample_index, score}
        pairs.jsonl         the training rows built from them (reader's ranked format, best first)
        offline.jsonl       labelled rows mixed in from data.train_path (only when online.offline_fraction > 0)
        round.json          counts and timings of each stage, ``stages`` listing the stages done

Every file is written to a temporary name and renamed into place, so a file that exists is complete: a
resumed run reuses every stage whose file is there (nothing is sampled or judged twice) and redoes only
the missing ones. ``round.json`` is rewritten after each stage.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dpokit.training.checkpoint import write_errors

ROUNDS_DIRNAME = "rounds"
STAGES = ("prompts", "completions", "judgments", "pairs")


def round_dir(run_dir: Path, round_index: int) -> Path:
    return Path(run_dir) / ROUNDS_DIRNAME / f"round-{round_index:04d}"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_errors(f"the round file {path.name}", path.parent):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """``rows`` as JSON lines at ``path``, atomically."""
    _atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class RoundFiles:
    """The files of one round: which stages are done, reading and writing them."""

    def __init__(self, run_dir: Path, round_index: int) -> None:
        self.round_index = round_index
        self.path = round_dir(run_dir, round_index)

    def file(self, stage: str) -> Path:
        return self.path / f"{stage}.jsonl"

    def has(self, stage: str) -> bool:
        return self.file(stage).is_file()

    def read(self, stage: str) -> list[dict[str, Any]]:
        return read_jsonl(self.file(stage))

    def write(self, stage: str, rows: Iterable[dict[str, Any]], info: dict[str, Any] | None = None) -> None:
        """Write a stage's rows, then record the stage (and ``info``) in ``round.json``."""
        write_jsonl(self.file(stage), rows)
        summary = self.summary()
        summary.setdefault("round", self.round_index)
        summary.setdefault("stages", [])
        if stage not in summary["stages"]:
            summary["stages"].append(stage)
        summary[stage] = {**(info or {}), "written": round(time.time(), 3)}
        _atomic_write(self.path / "round.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    def summary(self) -> dict[str, Any]:
        path = self.path / "round.json"
        loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        return loaded

    @property
    def complete(self) -> bool:
        """Every stage written: the round's training data is on disk."""
        return all(self.has(stage) for stage in STAGES)


def set_aside_rounds_after(run_dir: Path, round_index: int) -> list[Path]:
    """Resuming at ``round_index``: the directories of later rounds belong to an abandoned branch and are
    moved to ``<run_dir>/abandoned/`` (a resume never reuses samples of weights it did not keep)."""
    root = Path(run_dir) / ROUNDS_DIRNAME
    moved: list[Path] = []
    if not root.is_dir():
        return moved
    for directory in sorted(root.glob("round-*")):
        try:
            later = int(directory.name.split("-")[1]) > round_index
        except (IndexError, ValueError):
            continue
        if later:
            target = Path(run_dir) / "abandoned" / f"{directory.name}.{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            directory.rename(target)
            moved.append(target)
    return moved
