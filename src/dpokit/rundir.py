"""The layout of a run directory: every file and folder a run writes there, named in one place.

::

    <run_dir>/
      config.yaml                 how the run started (config.resume-<step>.yaml for each accepted resume)
      data_report.json            what the data reader kept and skipped, and why
      metrics.jsonl               one JSON record per logged step and per evaluation
      tensorboard/                TensorBoard event files
      startup.json                where the seconds before the first optimizer step went
      samples.jsonl               the policy's and the reference's samples at evaluations
      curves.png                  the training curves
      rounds/round-NNNN/          an online run's rounds (prompts, samples, judgements, pairs)
      rounds.png                  an online run's per-round curves
      checkpoint-<step>/          a complete checkpoint (checkpoint-<step>.tmp-* while it is written)
      abandoned/                  checkpoints of a branch that a resume from an earlier step left
      final/                      the exported model, unless ``output_dir`` names another place
      .dpokit.lock                present while a run holds the directory

:class:`RunPaths` names each path; the modules that write them (the trainer, the checkpoints, the
metrics tracker, the online rounds) and the ones that read them (resume, the frontier, the commands)
take their paths from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILENAME = "config.yaml"  # also beside an exported model: how it was trained
LOCK_FILENAME = ".dpokit.lock"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
FINAL_DIRNAME = "final"


@dataclass(frozen=True)
class RunPaths:
    """The paths of one run directory (none of them need exist)."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> RunPaths:
        return cls(Path(run_dir))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILENAME

    def resume_config(self, step: int) -> Path:
        """The configuration of a resume accepted at ``step``."""
        return self.root / f"config.resume-{step}.yaml"

    @property
    def data_report(self) -> Path:
        return self.root / "data_report.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def startup(self) -> Path:
        return self.root / "startup.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def rounds(self) -> Path:
        return self.root / "rounds"

    def round(self, index: int) -> Path:
        """The records of an online run's round ``index``."""
        return self.rounds / f"round-{index:04d}"

    @property
    def rounds_plot(self) -> Path:
        return self.root / "rounds.png"

    def checkpoint(self, step: int) -> Path:
        return self.root / f"{CHECKPOINT_PREFIX}{step}"

    @property
    def abandoned(self) -> Path:
        return self.root / "abandoned"

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIRNAME

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILENAME


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a ``checkpoint-<step>`` directory (None for any other name)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


_NAMES = RunPaths(Path())
# What a run writes into its directory: a fresh run refuses a directory holding any of these (globs).
# (A run that failed in set-up leaves only its config and data report: it may simply be started again.)
RUN_RECORDS = (
    _NAMES.metrics.name,
    f"{CHECKPOINT_PREFIX}*",
    _NAMES.tensorboard.name,
    _NAMES.samples.name,
    _NAMES.curves.name,
    _NAMES.rounds.name,
    _NAMES.rounds_plot.name,
)
# What set-up writes before the first optimizer step (startup.json comes after it): a failed run whose
# directory holds only these (and empty files, such as a metrics.jsonl opened but never written) had
# nothing to show, and the directory goes if the run created it.
SETUP_FILES = (LOCK_FILENAME, CONFIG_FILENAME, _NAMES.data_report.name)
