"""Resumable checkpoints, written atomically, in one of two formats, by any number of processes.

``<run_dir>/checkpoint-<step>/`` holds the weights and optimizer state -- ``model/`` (save_pretrained,
safetensors, loadable by transformers/peft) + ``optimizer.pt`` from a single process, or ``dcp/``
(torch.distributed.checkpoint shards, keyed by parameter name, loadable on any number of ranks)
under torchrun -- plus ``scheduler.pt``, ``rng.safetensors`` + ``rng.json`` and, written last,
``trainer_state.json``. Everything is written into a ``.tmp-`` directory and published with one
rename; see ``docs/engine.md`` for the guarantees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.compat import UnsafeCheckpointError, dcp_safe_reader_and_planner
from dpokit.errors import TrainingError
from dpokit.rundir import CHECKPOINT_PREFIX, RunPaths, checkpoint_step
from dpokit.training.model_card import RunSummary, write_model_card
from dpokit.training.parallel import ParallelContext

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
MODEL_DIR = "model"
DCP_DIR = "dcp"


# ------------------------------------------------------------------------------------------------
# Random number generator states.
# ------------------------------------------------------------------------------------------------


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json-able) snapshots of the torch (CPU + every CUDA device), python and numpy RNGs."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=True)  # the 5-tuple (the default, which numpy's stubs get wrong)
    assert isinstance(numpy_state, tuple)
    name, keys, pos, has_gauss, cached = numpy_state
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def restore_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------------
# Finding checkpoints.
# ------------------------------------------------------------------------------------------------


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first. Temporary (partial) directories are ignored."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((step, child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_path(resume: str | Path, run_dir: str | Path | None) -> Path:
    """``"latest"`` or a run directory -> its newest *intact* checkpoint (a damaged newer one is named in a
    warning and skipped); a checkpoint directory -> itself, which must be intact. Raises TrainingError
    when nothing resumable is found."""
    if str(resume) == "latest":
        if run_dir is None:
            raise TrainingError("--resume latest needs logging.run_dir (the run to continue)")
        return _newest_intact(Path(run_dir), "--resume latest")
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        problems = verify_checkpoint(path)
        if problems:
            raise TrainingError(
                f"checkpoint {str(path)!r} is damaged ({'; '.join(problems[:3])}); resume from another checkpoint "
                "(--resume latest picks the newest intact one)"
            )
        return path
    if path.is_dir() and list_checkpoints(path):
        return _newest_intact(path, f"--resume {str(resume)!r}")
    raise TrainingError(
        f"--resume {str(resume)!r}: not a checkpoint directory (checkpoint-N with {TRAINER_STATE}) "
        "nor a run directory containing one"
    )


def _newest_intact(run_dir: Path, what: str) -> Path:
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise TrainingError(
            f"{what}: no complete checkpoint in {str(run_dir)!r}, so there is nothing to continue: start the run afresh "
            "with --overwrite (without --resume)"
        )
    for checkpoint in reversed(checkpoints):
        problems = verify_checkpoint(checkpoint)
        if not problems:
            return checkpoint
        logger.warning("checkpoint %s is damaged (%s); falling back to an older one", checkpoint, "; ".join(problems[:3]))
    raise TrainingError(f"{what}: every checkpoint in {str(run_dir)!r} is damaged (see the warnings above); start a new run")


# ------------------------------------------------------------------------------------------------
# The manifest: sizes and checksums of every file, verified before a resume.
# ------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"


def _checksum(path: Path) -> str:
    """CRC-32 of the file's bytes (fast, catches truncation and flipped bits; safety against crafted files
    is the loaders' job, which read nothing executable)."""
    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """``manifest.json``: size and CRC-32 of every file of the checkpoint, written last."""
    entries = {str(f.relative_to(directory)): {"size": f.stat().st_size, "crc32": _checksum(f)} for f in _files(directory)}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": entries}, indent=1, sort_keys=True))


def verify_checkpoint(directory: str | Path) -> list[str]:
    """What is wrong with a checkpoint, by its manifest: missing, resized or changed files (empty when
    intact; a checkpoint written before manifests existed is taken as it is)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return []
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST} is unreadable ({exc})"]
    problems = []
    for name, expected in entries.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected.get("size"):
            problems.append(f"{name} has {path.stat().st_size} bytes, {expected.get('size')} were written")
        elif _checksum(path) != expected.get("crc32"):
            problems.append(f"{name} has changed since it was written (checksum mismatch)")
    return problems


# ------------------------------------------------------------------------------------------------
# Saving.
# ------------------------------------------------------------------------------------------------


def _fsync_tree(path: Path) -> None:
    """Flush every file and directory under ``path`` to disk, so the rename publishes complete data."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_weights(
    ctx: ParallelContext, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer: Any | None
) -> None:
    """Weights and optimizer state: ``model/`` + ``optimizer.pt`` from a single process (the policy,
    or for a peft model its adapter, with save_pretrained; the tokenizer beside it), or DCP shards of
    the trainable weights and the optimizer state from every rank under torchrun."""
    if _format(ctx) == "dcp":
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
        dcp_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / DCP_DIR))
        return
    from dpokit.models import quiet_progress_bars

    with quiet_progress_bars():
        model.save_pretrained(directory / MODEL_DIR, safe_serialization=True)  # type: ignore[operator]  # transformers method via nn.Module.__getattr__
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / MODEL_DIR)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def _write_training_state(directory: Path, scheduler: Any, trainer_state: dict[str, Any]) -> None:
    """Scheduler, RNG states (this process's), then the trainer state (which marks the checkpoint complete)."""
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    rng_tensors, rng_plain = capture_rng_state()
    save_file(rng_tensors, str(directory / "rng.safetensors"))
    (directory / "rng.json").write_text(json.dumps(rng_plain))
    (directory / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))


def _format(ctx: ParallelContext) -> str:
    """``files`` for a single process, ``dcp`` (sharded, any-world-size) under torchrun."""
    return "files" if ctx.strategy == "none" else "dcp"


def _state_dict_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA base) come from the model files, not the checkpoint.
    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete leftovers of interrupted saves (``checkpoint-*.tmp-*``)."""
    for child in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*.tmp-*"):
        shutil.rmtree(child, ignore_errors=True)


def publish_checkpoint(tmp: Path, final: Path) -> None:
    """Make the fully written ``tmp`` directory the checkpoint ``final`` with one atomic rename.

    Everything in ``tmp`` is flushed to disk first. A checkpoint already at ``final`` (saved at this
    step before, e.g. a periodic save then an interruption) is moved aside first and removed only
    after the new one is in place, so some complete checkpoint exists at every instant.
    """
    _fsync_tree(tmp)
    if final.exists():
        stale = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-old-", dir=final.parent))
        os.rename(final, stale / "old")
        os.rename(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def _save_into(
    ctx: ParallelContext,
    tmp_dir: Path,
    final: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    tokenizer: Any | None,
) -> None:
    """Every file of the checkpoint into ``tmp_dir`` (weights by every rank, the rest by rank 0), then publish."""
    _write_weights(ctx, tmp_dir, model, optimizer, tokenizer)
    ctx.barrier()
    if ctx.is_main:
        state = {
            **trainer_state,
            "global_step": step,
            "checkpoint_format": _format(ctx),
            "world_size": ctx.world_size,
            "strategy": ctx.strategy,
        }
        _write_training_state(tmp_dir, scheduler, state)
        write_manifest(tmp_dir)
        publish_checkpoint(tmp_dir, final)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def write_errors(what: str, where: Path, checkpoints_in: Path | None = None) -> Iterator[None]:
    """A full disk or a write refused while writing ``what`` into ``where`` becomes a TrainingError
    naming the path and what to do (and the newest checkpoint in ``checkpoints_in``, which stays intact;
    looked up only when a write failed)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL + _DENIED:
            raise
        intact = latest_checkpoint(checkpoints_in) if checkpoints_in is not None else None
        kept = f"; the last checkpoint, {intact}, is intact" if intact is not None else ""
        if exc.errno in _FULL:
            advice = "free some space there (or lower checkpoint.keep_last), then continue with --resume latest"
        else:
            advice = "make it writable or choose another logging.run_dir / output_dir, then continue with --resume latest"
        raise TrainingError(
            f"could not write {what} into {str(where)!r}: {exc.strerror or exc} ({exc.filename or where}){kept}. {advice}"
        ) from None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    trainer_state: dict[str, Any],
    tokenizer: Any | None = None,
    keep_last: int = 2,
    ctx: ParallelContext | None = None,
) -> Path:
    """Write ``<run_dir>/checkpoint-<step>`` atomically and prune to the newest ``keep_last``.

    Called by every rank with the same arguments (``ctx``: a world of one when None). Rank 0 makes
    the temporary directory, writes scheduler, RNG and ``trainer_state`` (JSON-serialisable: step,
    data position, ...), publishes and prunes. Returns the final path.
    """
    ctx = ctx or ParallelContext()
    run_dir = Path(run_dir)
    final = RunPaths(run_dir).checkpoint(step)
    tmp = None
    if ctx.is_main:
        with write_errors(f"the checkpoint of step {step}", run_dir, checkpoints_in=run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(run_dir)
            tmp = tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=run_dir)
    tmp_dir = Path(ctx.broadcast_object(tmp))
    try:
        with write_errors(f"the checkpoint of step {step}", run_dir, checkpoints_in=run_dir):
            _save_into(ctx, tmp_dir, final, step, model, optimizer, scheduler, trainer_state, tokenizer)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if ctx.is_main:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((Path(path) / TRAINER_STATE).read_text())
        return state
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"checkpoint {str(path)!r} has no readable {TRAINER_STATE}: {exc}") from None


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load the checkpoint's weights into ``model`` in place (adapter only for a peft model)."""
    from dpokit.models import is_peft_model

    model_dir = Path(path) / MODEL_DIR
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        adapter_file = model_dir / "adapter_model.safetensors"
        if not adapter_file.is_file():
            raise TrainingError(f"checkpoint {str(path)!r} holds no LoRA adapter but the policy uses LoRA")
        result = set_peft_model_state_dict(model, load_file(str(adapter_file)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TrainingError(f"checkpoint adapter does not fit the policy (unexpected keys {unexpected[:3]}...)")
        return
    files = sorted(model_dir.glob("*.safetensors"))
    if not files or (model_dir / "adapter_model.safetensors").is_file():
        raise TrainingError(f"checkpoint {str(path)!r} holds no full-model safetensors weights (was it a LoRA run?)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise TrainingError(f"checkpoint {str(path)!r} does not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    if result.unexpected_keys:
        raise TrainingError(
            f"checkpoint weights do not fit the model (unexpected keys {result.unexpected_keys[:3]}...); "
            "was it saved from another model?"
        )
    # Tied weights (lm_head = embeddings) are saved once; any other missing key is a real mismatch.
    loaded = {p.data_ptr() for name, p in model.named_parameters() if name in state}
    params = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in loaded]
    if missing:
        raise TrainingError(f"checkpoint {str(path)!r} lacks weights for {missing[:3]}...")


def is_dcp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def _load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Restore DCP shards into ``model`` / ``optimizer`` -- sharded (FSDP2), replicated (DDP) or plain
    (a single process: DCP needs no process group to load); the number of ranks may differ."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    if optimizer is None:
        raise TrainingError(f"checkpoint {str(path)!r} is a torchrun (DCP) checkpoint; load it with its optimizer")
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
    loaded: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*load in a single process.*")
            reader, planner = dcp_safe_reader_and_planner(path / DCP_DIR)
            dcp_load(loaded, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as exc:  # a different model / LoRA setting: keys or shapes do not match
        if _refused_as_unsafe(exc):  # DCP wraps the reader's errors; the reason is in the text
            raise TrainingError(
                f"checkpoint {str(path)!r} is unsafe to load ({_unsafe_reason(exc)}); it was not written by dpokit or "
                "has been tampered with. Resume from another checkpoint or start a new run."
            ) from None
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"checkpoint {str(path)!r} does not fit this model and optimizer: {message}") from None
    set_state_dict(
        model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"], options=_state_dict_options()
    )


_UNSAFE_MARKERS = ("refusing to load", "Weights only load failed")


def _refused_as_unsafe(exc: BaseException) -> bool:
    """Whether loading stopped because the safe reader refused a pickle (see :mod:`dpokit.compat`)."""
    return isinstance(exc, (UnsafeCheckpointError, pickle.UnpicklingError)) or any(m in str(exc) for m in _UNSAFE_MARKERS)


def _unsafe_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in _UNSAFE_MARKERS:
        if marker in text:
            return text[text.index(marker) :].split(";")[0].splitlines()[0].strip()
    return type(exc).__name__


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    ctx: ParallelContext | None = None,
) -> dict[str, Any]:
    """Restore weights (adapter only for a peft model), optimizer, scheduler and RNG states from
    ``path``, in either format; return the trainer state. Everything is read with safetensors or
    ``torch.load(weights_only=True)``. A single-process checkpoint resumes in one process or under
    DDP (every rank holds the whole model), not under FSDP."""
    ctx = ctx or ParallelContext()
    path = Path(path)
    state = read_trainer_state(path)
    if is_dcp_checkpoint(path):
        _load_dcp(path, model, optimizer)
    elif ctx.strategy == "fsdp":
        raise TrainingError(
            f"checkpoint {str(path)!r} was written by a single-process run; distributed.strategy=fsdp resumes only "
            "torchrun checkpoints (checkpoint-N/dcp). Resume it once with distributed.strategy=ddp or in one process."
        )
    else:
        with _unreadable_as_error(path, "the model weights"):
            load_model_weights(path, model)
        if optimizer is not None:
            with _unreadable_as_error(path, "optimizer.pt"):
                optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        with _unreadable_as_error(path, "scheduler.pt"):
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if restore_rng:
        with _unreadable_as_error(path, "the RNG state (rng.safetensors, rng.json)"):
            restore_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return state


@contextlib.contextmanager
def _unreadable_as_error(path: Path, what: str) -> Iterator[None]:
    """A file of the checkpoint that cannot be read or does not fit becomes a located TrainingError."""
    try:
        yield
    except TrainingError:
        raise
    except Exception as exc:  # truncated / corrupt files: safetensors, pickle, JSON or shape errors
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TrainingError(
            f"checkpoint {str(path)!r}: {what} cannot be read ({detail}); the checkpoint is damaged, resume from another "
            "one (--resume latest picks the newest intact one)"
        ) from None


# ------------------------------------------------------------------------------------------------
# The final export.
# ------------------------------------------------------------------------------------------------


def export_final_model(
    ctx: ParallelContext,
    policy: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    model_cfg: Any,
    *,
    summary: RunSummary | None = None,
) -> Path:
    """Save the trained policy for ``from_pretrained`` from rank 0 (LoRA merged or as an adapter, per
    ``model_cfg.lora.export``), with a model card (``README.md``, :mod:`dpokit.training.model_card`)
    describing ``summary``'s run when given.

    A whole model on rank 0 (one process, DDP) is saved as it is. FSDP: every rank sends its shards
    to rank 0's CPU (``full_state_dict=True, cpu_offload=True``); rank 0 loads them into an unsharded
    copy built from ``model_cfg`` (plus the same LoRA adapters) and saves that.
    """
    from dpokit.models import apply_lora, load_model, save_final_model

    out = Path(out_dir)
    adapter = bool(model_cfg.lora.enabled) and model_cfg.lora.export == "adapter"
    if ctx.holds_whole_model:
        if ctx.is_main:
            with write_errors("the final model", out):
                save_final_model(policy, tokenizer, out, lora_export=model_cfg.lora.export)
                if summary is not None:
                    write_model_card(out, summary, adapter=adapter)
        ctx.barrier()
        return out
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        plain = load_model(model_cfg, device=torch.device("cpu"))
        if model_cfg.lora.enabled:
            plain = apply_lora(plain, model_cfg.lora)
        result = plain.load_state_dict(full_state, strict=False)
        if result.unexpected_keys:
            raise TrainingError(f"the gathered weights do not fit the exported model (unexpected {result.unexpected_keys[:3]})")
        with write_errors("the final model", out):
            save_final_model(plain, tokenizer, out, lora_export=model_cfg.lora.export)
            if summary is not None:
                write_model_card(out, summary, adapter=adapter)
    ctx.barrier()
    return out
