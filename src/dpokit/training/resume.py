"""The run directory and resuming: where a run writes, which checkpoint continues it, and what must not change."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dpokit.config import TrainConfig, config_to_dict
from dpokit.errors import TrainingError
from dpokit.training.checkpoint import list_checkpoints, resolve_resume_path


def trim_metrics_file(run_dir: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def resolve_run_dir(cfg: TrainConfig, resume: str | None) -> tuple[Path, Path | None]:
    configured = Path(cfg.logging.run_dir) if cfg.logging.run_dir else None
    if resume:
        checkpoint = resolve_resume_path(resume, configured)
        return configured or checkpoint.parent, checkpoint
    run_dir = configured or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    if list_checkpoints(run_dir):
        raise TrainingError(
            f"{str(run_dir)!r} already holds checkpoints of an earlier run: continue it with --resume latest, "
            "or choose another logging.run_dir"
        )
    return run_dir, None


# The settings that fix the data order and the model; a resume must not change them.
_RESUME_INVARIANTS = ("model.name_or_path", "model.lora", "data.train_path", "optim.grad_accumulation", "optim.seed")


def check_resume_compatible(
    state: dict[str, Any], cfg: TrainConfig, num_train: int, micro_batch_examples: int | None = None
) -> None:
    saved = state.get("invariants", {})
    current = invariants(cfg, num_train, micro_batch_examples)
    changed = [k for k in current if k in saved and saved[k] != current[k]]
    if changed:
        details = "; ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise TrainingError(
            f"cannot resume: settings that fix the model and the data order changed since the checkpoint ({details}); "
            "restore them or start a new run"
        )


def invariants(cfg: TrainConfig, num_train: int, micro_batch_examples: int | None = None) -> dict[str, Any]:
    flat = config_to_dict(cfg)
    values: dict[str, Any] = {}
    for key in _RESUME_INVARIANTS:
        node: Any = flat
        for part in key.split("."):
            node = node[part]
        values[key] = node
    values["num_train_examples"] = num_train
    # The sampler's batch size: optim.batch_size x processes (a resume may change how it is split).
    values["micro_batch_examples (optim.batch_size x processes)"] = micro_batch_examples or cfg.optim.batch_size
    return values
