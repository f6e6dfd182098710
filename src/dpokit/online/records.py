"""The files of an online run, one directory per round, written before the round trains on them::

    <run_dir>/rounds/round-0003/
        prompts.jsonl       the round's prompts: {prompt_index, source_index, where, prompt}
        completions.jsonl   K samples per prompt: {prompt_index, sample_index, rank, completion, num_tokens,
                            stopped, policy_logp, reference_logp}
        judgments.jsonl     one score per completion: {prompt_index, sample_index, score}
        pairs.jsonl         the training rows built from them (reader's ranked format, best first)
        offline.jsonl       labelled rows mixed in from data.train_path (only when online.offline_fraction > 0)
        round.json          counts and timings of each stage, ``stages`` listing the stages done

Every file is written to a temporary name and renamed into place, so a file that exists was complete: a
resumed run reuses every stage whose file is there (nothing is sampled or judged twice) and redoes only
the missing ones. ``round.json`` is rewritten (atomically) after each stage and records each stage's
row count (``rows``). A file damaged since (cut short, a line lost, bytes overwritten) is found when it
is read back -- :class:`DamagedRoundFile` names ``file:line`` -- and the online loop redoes the stage or
stops with that message (:meth:`dpokit.online.rounds.OnlineLoop.stage`); it never trains on part of a file.
A damaged file is moved to the round's ``damaged/`` directory, not deleted.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dpokit.errors import TrainingError
from dpokit.rundir import RunPaths
from dpokit.training.checkpoint import write_errors

STAGES = ("prompts", "completions", "judgments", "pairs")


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


class DamagedRoundFile(TrainingError):
    """A round's file that cannot be what was written: unreadable, cut short, or a row count that differs
    from ``round.json``'s. The message names the file (and line)."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-empty line; :class:`DamagedRoundFile` naming
    ``path:line`` for a line that is not UTF-8, not JSON, or not an object."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise DamagedRoundFile(f"{path}:{number}: not valid UTF-8") from None
        except (json.JSONDecodeError, RecursionError) as error:
            raise DamagedRoundFile(f"{path}:{number}: not valid JSON (cut short or overwritten?): {error}") from None
        if not isinstance(row, dict):
            raise DamagedRoundFile(f"{path}:{number}: not a JSON object")
        rows.append(row)
    return rows


class RoundFiles:
    """The files of one round: which stages are done, reading and writing them."""

    def __init__(self, run_dir: Path, round_index: int) -> None:
        self.round_index = round_index
        self.path = RunPaths.of(run_dir).round(round_index)

    def file(self, stage: str) -> Path:
        return self.path / f"{stage}.jsonl"

    def has(self, stage: str) -> bool:
        return self.file(stage).is_file()

    def read(self, stage: str) -> list[dict[str, Any]]:
        return read_jsonl(self.file(stage))

    def read_checked(self, stage: str) -> list[dict[str, Any]]:
        """A stage's rows, checked against the row count ``round.json`` records for it."""
        rows = self.read(stage)
        recorded = self.summary().get(stage, {}).get("rows")
        if isinstance(recorded, int) and recorded != len(rows):
            raise DamagedRoundFile(
                f"{self.file(stage)}: {len(rows)} rows, but {self.path / 'round.json'} records {recorded} (a row was lost)"
            )
        return rows

    def write(self, stage: str, rows: Iterable[dict[str, Any]], info: dict[str, Any] | None = None) -> None:
        """Write a stage's rows, then record the stage, its row count (and ``info``) in ``round.json``."""
        rows = list(rows)
        write_jsonl(self.file(stage), rows)
        summary = self.summary()
        summary.setdefault("round", self.round_index)
        summary.setdefault("stages", [])
        if stage not in summary["stages"]:
            summary["stages"].append(stage)
        summary[stage] = {**(info or {}), "rows": len(rows), "written": round(time.time(), 3)}
        self.write_summary(summary)

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    @property
    def summary_path(self) -> Path:
        return self.path / "round.json"

    def summary(self) -> dict[str, Any]:
        """``round.json`` ({} before the first stage); :class:`DamagedRoundFile` when it is unreadable."""
        path = self.summary_path
        if not path.is_file():
            return {}
        try:
            loaded = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise DamagedRoundFile(f"{path}: not valid JSON (cut short or overwritten?): {error}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, dict) for k, v in loaded.items() if k in (*STAGES, "offline")):
            raise DamagedRoundFile(f"{path}: not the round's record (an object with one object per stage)")
        return loaded

    def set_aside(self, name: str) -> Path | None:
        """Move the round's file ``name`` (``pairs.jsonl``, ``round.json``, ...) into ``damaged/``, keeping it
        for inspection, and forget its stage in ``round.json``; returns where it went (None: no such file)."""
        path = self.path / name
        if not path.is_file():
            return None
        target = self.path / "damaged" / f"{name}.{time.strftime('%Y%m%d-%H%M%S')}.{time.time_ns() % 10**9}"
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
        stage = name.removesuffix(".jsonl")
        if name != "round.json" and self.summary_path.is_file():
            summary = self.summary()
            summary["stages"] = [s for s in summary.get("stages", []) if s != stage]
            summary.pop(stage, None)
            self.write_summary(summary)
        return target

    @property
    def complete(self) -> bool:
        """Every stage written: the round's training data is on disk."""
        return all(self.has(stage) for stage in STAGES)


def set_aside_rounds_after(run_dir: Path, round_index: int) -> list[Path]:
    """Resuming at ``round_index``: the directories of later rounds belong to an abandoned branch and are
    moved to ``<run_dir>/abandoned/`` (a resume never reuses samples of weights it did not keep)."""
    root = RunPaths.of(run_dir).rounds
    moved: list[Path] = []
    if not root.is_dir():
        return moved
    for directory in sorted(root.glob("round-*")):
        try:
            later = int(directory.name.split("-")[1]) > round_index
        except (IndexError, ValueError):
            continue
        if later:
            target = RunPaths.of(run_dir).abandoned / f"{directory.name}.{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            directory.rename(target)
            moved.append(target)
    return moved
