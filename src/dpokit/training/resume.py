"""The run directory and resuming: where a run writes, which checkpoint continues it, what must not change.

A run directory is held by one run at a time (a lock file naming the holder's pid, present only while
it is held), a fresh run never writes into one that already holds another run's records unless told to
overwrite it, and the run's ``config.yaml`` is the record of how it started: a resume writes its own
``config.resume-<step>.yaml`` beside it, only once the resume has been accepted. A run that fails
before it has anything to show (set-up files only) removes the directory again if it created it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

from dpokit.config import TrainConfig, config_to_dict, save_config
from dpokit.errors import ConfigError, TrainingError
from dpokit.rundir import RUN_RECORDS, SETUP_FILES, RunPaths, checkpoint_step
from dpokit.training.checkpoint import (
    list_checkpoints,
    remove_partial_checkpoints,
    resolve_resume_path,
    write_errors,
)
from dpokit.training.parallel import ParallelContext


class RunDirectory:
    """The directory one run owns for its lifetime (rank 0 holds the lock; every rank knows the path)."""

    def __init__(self, path: Path, resume_from: Path | None, lock: IO[str] | None, created: Path | None = None) -> None:
        self.path = path
        self.paths = RunPaths(path)  # every file and folder the run writes here
        self.resume_from = resume_from
        self._lock = lock
        self._created = created  # the outermost directory this run made (``path`` or an ancestor), or None

    @classmethod
    def open(cls, cfg: TrainConfig, ctx: ParallelContext, *, resume: str | None, overwrite: bool = False) -> RunDirectory:
        """Resolve, lock and prepare the run directory on rank 0; every rank gets the result or the same error."""
        outcome: tuple[str, str | None, str | None] | None = None
        lock = created = None
        if ctx.is_main:
            try:
                path, resume_from = resolve_run_dir(cfg, resume, overwrite=overwrite)
                refuse_model_overwrite(cfg, path)
                created = outermost_missing(path)
                lock = _lock(path)
                if resume_from is None and overwrite:
                    clear_run_records(path)
                outcome = ("ok", str(path), str(resume_from) if resume_from else None)
            except (TrainingError, ConfigError) as error:
                outcome = (type(error).__name__, str(error), None)
        kind, value, resume_value = ctx.broadcast_object(outcome)
        if kind != "ok":
            raise (ConfigError if kind == "ConfigError" else TrainingError)(value)
        return cls(Path(str(value)), Path(resume_value) if resume_value else None, lock, created)

    def write_config(self, cfg: TrainConfig, resumed_at: int | None) -> Path:
        """``config.yaml`` for a fresh run; ``config.resume-<step>.yaml`` for an accepted resume."""
        target = self.paths.config if resumed_at is None else self.paths.resume_config(resumed_at)
        with write_errors(f"the run's {target.name}", self.path):
            save_config(cfg, target)
        return target

    def continue_from(self, step: int) -> list[Path]:
        """Resuming at ``step``: drop metrics logged after it and set aside checkpoints of the abandoned
        branch (later steps), so ``--resume latest`` never picks them again; returns where they went."""
        trim_metrics_file(self.path, step)
        remove_partial_checkpoints(self.path)
        moved = []
        for checkpoint in list_checkpoints(self.path):
            later = checkpoint_step(checkpoint)
            if later is not None and later > step:
                target = self.paths.abandoned / f"{checkpoint.name}.{time.strftime('%Y%m%d-%H%M%S')}"
                target.parent.mkdir(exist_ok=True)
                os.rename(checkpoint, target)
                moved.append(target)
        return moved

    def close(self, *, failed: bool = False) -> None:
        """Release the directory: the lock file is removed (while still held) and the lock let go.

        ``failed``: the run ended in an error. If this run created the directory and it holds nothing
        but :data:`SETUP_FILES` and empty files, they and the directory (and the parents this run
        created, when empty) are removed, so a run that could not start leaves nothing behind. A
        directory that existed before, or holds checkpoints, metrics or anything else, is kept.
        """
        if self._lock is None:
            return
        discard = failed and self._created is not None and self.path.is_dir() and holds_only_setup_files(self.path)
        if discard:
            for child in self.path.iterdir():
                with contextlib.suppress(OSError):
                    if child.is_dir():
                        child.rmdir()
                    elif child != self.paths.lock:
                        child.unlink()
        with contextlib.suppress(OSError):
            self.paths.lock.unlink()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
        self._lock = None
        if discard and self._created is not None:
            _remove_empty_up_to(self.path, self._created)


def outermost_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its ancestors that does not exist yet (what ``mkdir(parents=True)``
    would create first), or None when ``path`` exists."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def holds_only_setup_files(run_dir: Path) -> bool:
    """Whether everything in ``run_dir`` is a :data:`SETUP_FILES` entry, an empty file or an empty directory."""
    for child in run_dir.iterdir():
        if child.is_symlink() or not (
            child.name in SETUP_FILES
            or (child.is_file() and child.stat().st_size == 0)
            or (child.is_dir() and not any(child.iterdir()))
        ):
            return False
    return True


def _remove_empty_up_to(path: Path, top: Path) -> None:
    """Remove ``path`` and its parents up to and including ``top`` while they are empty."""
    for directory in (path, *path.parents):
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (another run started in it, a user's file): kept
        if directory == top:
            return


def _lock(run_dir: Path) -> IO[str]:
    """An exclusive lock on ``run_dir`` for this process, or a TrainingError naming the holder.

    The lock file is removed by its holder on release, so a lock taken on a file that was unlinked
    meanwhile is worthless: the lock is retaken on the file now at that path."""
    while True:
        handle = _open_lock_file(run_dir)
        _take_lock(handle, run_dir)
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(RunPaths(run_dir).lock).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} (dpokit train, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    return handle


def _open_lock_file(run_dir: Path) -> IO[str]:
    """``run_dir`` (created if missing) and its lock file, opened for reading and appending."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return open(RunPaths(run_dir).lock, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
    except NotADirectoryError:
        raise ConfigError(f"logging.run_dir {str(run_dir)!r} is a file, not a directory; choose another run_dir") from None
    except PermissionError:
        raise ConfigError(
            f"logging.run_dir {str(run_dir)!r} is not writable; choose another run_dir or fix its permissions"
        ) from None


def _take_lock(handle: IO[str], run_dir: Path) -> None:
    """``flock`` ``handle`` exclusively without waiting, or a TrainingError naming the holder."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise TrainingError(
            f"run directory {str(run_dir)!r} is in use by {holder}; wait for that run to finish, or choose another "
            "logging.run_dir"
        ) from None


def run_records(run_dir: Path) -> list[Path]:
    """The records of an earlier run in ``run_dir`` (metrics, checkpoints, event files, ...)."""
    return sorted(p for pattern in RUN_RECORDS for p in run_dir.glob(pattern)) if run_dir.is_dir() else []


def clear_run_records(run_dir: Path) -> None:
    """Remove an earlier run's records (``--overwrite``); anything else in the directory is kept."""
    for record in run_records(run_dir):
        if record.is_dir():
            shutil.rmtree(record)
        else:
            record.unlink()


def resolve_run_dir(cfg: TrainConfig, resume: str | None, *, overwrite: bool = False) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None). A fresh run refuses a directory holding an
    earlier run's records unless ``overwrite``."""
    configured = Path(cfg.logging.run_dir) if cfg.logging.run_dir else None
    if resume:
        if overwrite:
            raise ConfigError("--overwrite starts the run afresh and --resume continues it: give one of them")
        checkpoint = resolve_resume_path(resume, configured)
        return configured or checkpoint.parent, checkpoint
    run_dir = configured or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"logging.run_dir {str(run_dir)!r} is a file, not a directory; choose another run_dir")
    earlier = run_records(run_dir)
    if earlier and not overwrite:
        # Only a complete checkpoint can be continued: a run that left none can only be started afresh.
        can_resume = bool(list_checkpoints(run_dir))
        raise TrainingError(
            f"{str(run_dir)!r} already holds an earlier run ({', '.join(p.name for p in earlier[:4])}"
            f"{', ...' if len(earlier) > 4 else ''})"
            + (
                ": continue it with --resume latest, start it afresh with --overwrite"
                if can_resume
                else " that left no complete checkpoint, so there is nothing to continue: start it afresh with --overwrite"
            )
            + ", or choose another logging.run_dir"
        )
    return run_dir, None


def refuse_model_overwrite(cfg: TrainConfig, run_dir: Path) -> None:
    """The run's outputs must not land in (or over) the model it starts from."""
    model_dir = Path(cfg.model.name_or_path)
    if not model_dir.is_dir():
        return  # a hub id: nothing local to overwrite
    outputs = {"logging.run_dir": run_dir, "output_dir": Path(cfg.output_dir) if cfg.output_dir else RunPaths(run_dir).final}
    for key, output in outputs.items():
        resolved, model = output.resolve(), model_dir.resolve()
        if resolved == model or model in resolved.parents:
            raise ConfigError(
                f"{key} {str(output)!r} is inside the starting model's directory {str(model_dir)!r}: the run would write "
                "over the model it trains; choose a directory outside it"
            )


def trim_metrics_file(run_dir: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    path = RunPaths(run_dir).metrics
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


# ------------------------------------------------------------------------------------------------
# What a resume may change.
# ------------------------------------------------------------------------------------------------

# Settings that fix the model, the data order, the objective or the meaning of the optimizer state: a
# resume refuses a change. The reference strategy may change (copy, adapters-off and precomputed all
# give the starting model's log-probs). Everything else (evaluation, logging, checkpoint cadence,
# max_steps / epochs, output_dir, the process layout within the invariants) is applied and reported.
_REFUSED_PREFIXES = (
    "model.",
    "data.train_path",
    "data.train_split",
    "data.format",
    "data.columns",
    "data.ranked_mode",
    "data.max_length",
    "data.max_prompt_length",
    "data.truncation_mode",
    "data.eval_split_fraction",
    "loss.",
    "reference.name_or_path",
    "optim.optimizer",
    "optim.lr",
    "optim.weight_decay",
    "optim.adam_betas",
    "optim.eps",
    "optim.warmup_steps",
    "optim.warmup_ratio",
    "optim.schedule",
    "optim.min_lr_ratio",
    "optim.grad_accumulation",
    "optim.seed",
    "optim.logps_chunk_size",
    "distributed.global_batch_size",
    "online.",  # the prompts, samples, pairs and step plan of every round
)
_NOT_SETTINGS = (
    "model.device",
    "model.compile",
    "model.gradient_checkpointing",
    "model.activation_checkpointing",
    "model.memory_budget_gib",
    "model.attn_implementation",
    "data.cache_dir",
    "data.layout",
    "data.pack_tokens",
    # An online run may be extended (more rounds) and its judge moved or retried differently.
    "online.rounds",
    "online.judge",
    "online.sampling.batch_size",
)


def check_resume_compatible(state: dict[str, Any], cfg: TrainConfig, invariant_values: dict[str, Any]) -> list[str]:
    """Refuse a resume that changes what fixes the model, the data and its order, or the optimizer
    state's meaning (named, with old and new values); return the other changed settings (applied)."""
    saved = state.get("invariants", {})
    changed = [k for k in invariant_values if k in saved and saved[k] != invariant_values[k]]
    old_config = _flatten(state.get("config") or {})
    new_config = _flatten(config_to_dict(cfg))
    differing = sorted(k for k in old_config.keys() & new_config.keys() if _json(old_config[k]) != _json(new_config[k]))
    refused = [k for k in differing if k.startswith(_REFUSED_PREFIXES) and not k.startswith(_NOT_SETTINGS)]
    if changed or refused:
        details = [f"{k}: {saved[k]!r} -> {invariant_values[k]!r}" for k in changed]
        details += [f"{k}: {old_config[k]!r} -> {new_config[k]!r}" for k in refused if k not in changed]
        raise TrainingError(
            "cannot resume: settings that fix the model, the data and its order, or the optimizer state changed since "
            f"the checkpoint ({'; '.join(details)}); restore them, or start a new run from the checkpoint's weights "
            "(model.name_or_path=<checkpoint>/model)"
        )
    return [f"{k}: {old_config[k]!r} -> {new_config[k]!r}" for k in differing if k not in refused]


def invariants(
    cfg: TrainConfig, *, num_train: int, micro_batch_examples: int, data_fingerprint: str | None, weights_fingerprint: str | None
) -> dict[str, Any]:
    """What a checkpoint records so that a resume can prove it continues the same run."""
    return {
        "model.name_or_path": cfg.model.name_or_path,
        "data.train_path": cfg.data.train_path,
        "num_train_examples": num_train,
        # The sampler's batch size: optim.batch_size x processes (a resume may change how it is split).
        "micro_batch_examples (optim.batch_size x processes)": micro_batch_examples,
        "training data fingerprint (file contents, tokenizer, tokenization)": data_fingerprint,
        "starting weights fingerprint": weights_fingerprint,
    }


def weights_fingerprint(name_or_path: str) -> str | None:
    """A cheap content fingerprint of a local model directory: every file's name and size, and the
    first and last MiB of each (None for a hub id). Different weights at the same path change it."""
    root = Path(name_or_path)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root)}|{size}|".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "columns":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
