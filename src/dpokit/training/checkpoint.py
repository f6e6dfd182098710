"""Resumable checkpoints, written atomically.

A checkpoint is a directory ``<run_dir>/checkpoint-<step>/`` holding

* ``model/`` -- the policy via ``save_pretrained`` (safetensors; for LoRA only the adapter), plus the
  tokenizer, so a checkpoint also loads as a model with ``transformers``/``peft``;
* ``optimizer.pt`` and ``scheduler.pt`` -- ``state_dict()``s (tensors and plain numbers), read back
  with ``torch.load(weights_only=True)``: nothing in a checkpoint can execute code when loaded;
* ``rng.safetensors`` + ``rng.json`` -- torch (CPU and CUDA), python and numpy random states;
* ``trainer_state.json`` -- step, data position (epoch, micro-batch within the epoch), partially
  accumulated metrics, best eval metrics. Written last.

Atomicity: everything is written into ``checkpoint-<step>.tmp-<random>/``, flushed to disk, then
renamed to ``checkpoint-<step>`` in one ``os.rename``. A crash or kill mid-save leaves only a
``.tmp-`` directory, which :func:`list_checkpoints` never returns and the next save deletes; the
previous checkpoint is untouched. Older checkpoints beyond ``keep_last`` are deleted only after the
new one is in place.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.errors import TrainingError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
MODEL_DIR = "model"


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
    name, keys, pos, has_gauss, cached = np.random.get_state()
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


def checkpoint_step(path: str | Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


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
    """``"latest"`` -> newest checkpoint of ``run_dir``; a run directory -> its newest checkpoint;
    a checkpoint directory -> itself. Raises TrainingError when nothing resumable is found."""
    if str(resume) == "latest":
        if run_dir is None:
            raise TrainingError("--resume latest needs logging.run_dir (the run to continue)")
        found = latest_checkpoint(run_dir)
        if found is None:
            raise TrainingError(f"--resume latest: no complete checkpoint in {str(run_dir)!r}")
        return found
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    raise TrainingError(
        f"--resume {str(resume)!r}: not a checkpoint directory (checkpoint-N with {TRAINER_STATE}) "
        "nor a run directory containing one"
    )


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


def _write_model(directory: Path, model: nn.Module, tokenizer: Any | None) -> None:
    """The policy (or, for a peft model, its adapter) with save_pretrained, in safetensors."""
    from dpokit.models import quiet_progress_bars

    with quiet_progress_bars():
        model.save_pretrained(directory / MODEL_DIR, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / MODEL_DIR)


def _write_training_state(
    directory: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> None:
    """Optimizer, scheduler, RNG states, then the trainer state (which marks the checkpoint complete)."""
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    rng_tensors, rng_plain = capture_rng_state()
    save_file(rng_tensors, str(directory / "rng.safetensors"))
    (directory / "rng.json").write_text(json.dumps(rng_plain))
    (directory / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete leftovers of interrupted saves (``checkpoint-*.tmp-*``)."""
    for child in Path(run_dir).glob("checkpoint-*.tmp-*"):
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
) -> Path:
    """Write ``<run_dir>/checkpoint-<step>`` atomically and prune to the newest ``keep_last``.

    ``trainer_state`` must be JSON-serialisable (step, data position, ...). Returns the final path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(run_dir)
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"checkpoint-{step}.tmp-", dir=run_dir))
    try:
        _write_model(tmp, model, tokenizer)
        _write_training_state(tmp, optimizer, scheduler, {**trainer_state, "global_step": step})
        publish_checkpoint(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / TRAINER_STATE).read_text())
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


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore model/adapter weights, optimizer, scheduler and RNG states from ``path``; return the
    trainer state. Everything is read with safetensors or ``torch.load(weights_only=True)``."""
    path = Path(path)
    state = read_trainer_state(path)
    load_model_weights(path, model)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if restore_rng:
        restore_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return state
