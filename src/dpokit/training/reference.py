"""Precomputed reference log-probs: computed once, cached on disk, looked up by example id.

With a frozen reference, ``log pi_ref(y_k | x_b)`` is a constant per example, so it can be computed
before training in large no-grad batches (sorted by length, so little padding) and the training
loop then does no reference forward at all -- and holds no reference model. The table is cached as
safetensors under ``<data.cache_dir>/reference/<key>.safetensors`` where ``key`` hashes

* the reference model's fingerprint (:func:`model_fingerprint`: architecture config, dtype and the
  bytes of every base weight -- adapters excluded, since with adapters disabled the reference is
  the base);
* the prepared dataset's fingerprint (data file contents, tokenizer, tokenization settings);
* the cache format version (log-probs summed over response tokens, float32).

So a later run with another beta or loss reuses the table, while a change of model, data or
tokenization gives a new key and a fresh computation. The lookup is by ``extras["example_id"]``, so
shuffling, eval carving and batch size do not matter.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.data.batch import Batch

from dpokit.errors import ConfigError, TrainingError
from dpokit.models import is_peft_model

logger = logging.getLogger(__name__)

CACHE_FORMAT = "dpokit-reference-logps-v1 (summed response log-probs, float32)"
_PEFT_PREFIX = "base_model.model."


def _normalized_parameter_name(name: str) -> str | None:
    """The plain-model name of a (possibly peft-wrapped) parameter; None for adapter weights."""
    if "lora_" in name or "modules_to_save" in name:
        return None
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of the model *as the reference sees it*.

    Hashes the architecture config (without its local path), and, in name order, every base
    parameter and buffer's name, dtype, shape and bytes. LoRA adapter weights are skipped and
    peft's name prefixes removed, so a LoRA policy (adapters off) and the plain base model share a
    fingerprint. Cost: one read of the weights (seconds for a 7B model).
    """
    hasher = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        config_dict = config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "use_cache", "torch_dtype", "dtype"):
            config_dict.pop(volatile, None)
        hasher.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        key = _normalized_parameter_name(name)
        if key is not None and key not in tensors:
            tensors[key] = tensor
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.contiguous().reshape(-1)
        if flat.numel():
            hasher.update(flat.view(torch.uint8).cpu().numpy())  # buffer protocol, no extra copy
    return hasher.hexdigest()


def cache_key(model_fp: str, dataset_fp: str) -> str:
    return hashlib.sha256(f"{CACHE_FORMAT}|{model_fp}|{dataset_fp}".encode()).hexdigest()[:32]


def _item_length(item: dict[str, Any]) -> int:
    return len(item["prompt_ids"]) + max((len(r) for r in item["response_ids"]), default=0)


def compute_reference_logps(
    model: nn.Module,
    items: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], Batch],
    *,
    batch_size: int = 32,
    chunk_size: int = 1024,
    device: torch.device | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs for every item: ``(example_ids (N,) long, logps (N, K_max) float32)``.

    Runs ``model`` under :func:`dpokit.models.reference_mode` (eval, no grad, adapters off) in
    batches of ``batch_size`` items taken longest first, so the padding per batch is small and an
    out-of-memory error shows on the first batch. Slots beyond an example's own K are 0.
    """
    from dpokit.logprobs import compute_logps

    n = len(items)
    if n == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 2)
    order = sorted(range(n), key=lambda i: -_item_length(items[i]))
    k_max = max(len(items[i]["response_ids"]) for i in range(n))
    example_ids = torch.tensor([int(items[i]["example_id"]) for i in range(n)], dtype=torch.long)
    logps = torch.zeros(n, k_max, dtype=torch.float32)
    device = device or next(model.parameters()).device
    bar = None
    if progress:
        from dpokit.training.tracking import progress_bar

        bar = progress_bar(n, enabled=True, desc="reference log-probs")
    with reference_mode(model) as reference:
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            batch = collate([items[i] for i in rows]).to(device)
            values = compute_logps(reference, batch, chunk_size=chunk_size).logps.float().cpu()
            values = values.masked_fill(~batch.response_mask.cpu(), 0.0)
            logps[rows, : values.shape[1]] = values
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    if not torch.isfinite(logps).all():
        raise TrainingError("the reference model produced non-finite log-probs; check the model weights and dtype")
    return example_ids, logps


class PrecomputedReference:
    """Reference log-probs looked up by ``batch.extras["example_id"]`` from a precomputed table."""

    name = "precomputed"

    def __init__(self, example_ids: torch.Tensor, logps: torch.Tensor, *, path: Path | None = None, from_cache: bool = False) -> None:
        self.logps_table = logps.float()
        self.row_of = {int(e): row for row, e in enumerate(example_ids.tolist())}
        self.path = path
        self.from_cache = from_cache

    def __len__(self) -> int:
        return len(self.row_of)

    def logps(self, batch: Batch) -> torch.Tensor:
        ids = batch.extras.get("example_id")
        if ids is None:
            raise TrainingError("precomputed reference log-probs need batch.extras['example_id']")
        try:
            rows = torch.tensor([self.row_of[int(e)] for e in ids.tolist()], dtype=torch.long)
        except KeyError as exc:
            raise TrainingError(
                f"example {exc.args[0]} has no precomputed reference log-probs; delete {self.path} and rerun"
            ) from None
        k = batch.num_responses
        values = self.logps_table[rows, :k]
        return values.to(batch.response_lengths.device)

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[None]:
        yield None  # no reference model is kept in memory


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_or_compute_reference(
    model: nn.Module,
    items: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], Batch],
    *,
    dataset_fingerprint: str,
    cache_dir: str | Path,
    batch_size: int = 32,
    chunk_size: int = 1024,
    model_fp: str | None = None,
    progress: bool = False,
) -> PrecomputedReference:
    """The cached table for (model, dataset) if present and complete, else compute and cache it.

    ``model`` is used as the reference (eval, no grad, adapters off); ``model_fp`` may be passed when
    already known (it is :func:`model_fingerprint` of ``model``).
    """
    model_fp = model_fp or model_fingerprint(model)
    path = reference_cache_path(cache_dir, model_fp, dataset_fingerprint)
    cached = load_cached_reference(path, items)
    if cached is not None:
        logger.info("reusing precomputed reference log-probs from %s", path)
        return cached
    example_ids, logps = compute_reference_logps(
        model, items, collate, batch_size=batch_size, chunk_size=chunk_size, progress=progress
    )
    save_reference_table(path, example_ids, logps, model_fp=model_fp, dataset_fingerprint=dataset_fingerprint)
    logger.info("cached reference log-probs for %d examples at %s", len(items), path)
    return PrecomputedReference(example_ids, logps, path=path, from_cache=False)


def reference_cache_path(cache_dir: str | Path, model_fp: str, dataset_fingerprint: str) -> Path:
    """Where the table for (model, dataset) lives: ``<cache_dir>/reference/<key>.safetensors``."""
    return Path(cache_dir) / "reference" / f"{cache_key(model_fp, dataset_fingerprint)}.safetensors"


def load_cached_reference(path: Path, items: Sequence[dict[str, Any]]) -> PrecomputedReference | None:
    """The table at ``path`` if it is readable and covers every example of ``items``, else None
    (a damaged cache file is recomputed, never trusted)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        cached = PrecomputedReference(tensors["example_id"], tensors["logps"], path=path, from_cache=True)
    except Exception as exc:
        logger.warning("ignoring unreadable reference cache %s (%s)", path, exc)
        return None
    wanted = {int(item["example_id"]) for item in items}
    return cached if wanted <= set(cached.row_of) else None


def save_reference_table(path: Path, example_ids: torch.Tensor, logps: torch.Tensor, *, model_fp: str,
                         dataset_fingerprint: str) -> None:
    """Write a reference table atomically, with the fingerprints it was computed for."""
    metadata = {"format": CACHE_FORMAT, "model_fingerprint": model_fp, "dataset_fingerprint": dataset_fingerprint}
    _atomic_save({"example_id": example_ids, "logps": logps}, path, metadata)


def cached_reference_files(cache_dir: str | Path) -> list[Path]:
    """Reference tables present in ``cache_dir`` (for inspection and tests)."""
    folder = Path(cache_dir) / "reference"
    return sorted(p for p in folder.glob("*.safetensors") if re.fullmatch(r"[0-9a-f]{32}\.safetensors", p.name))


# ------------------------------------------------------------------------------------------------
# Live references.
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the reference: eval mode, no grad, and (for a peft model) adapters off.

    Train/eval mode is restored on exit, so the policy can be used as its own reference mid-training.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if is_peft_model(model):
                with model.disable_adapter():
                    yield model
            else:
                yield model
    finally:
        model.train(was_training)


class ReferenceStrategy(Protocol):
    """What the training loop needs from a reference."""

    name: str

    def logps(self, batch: Batch) -> torch.Tensor | None:
        """Reference summed log-probs (B, K) for ``batch`` (no grad), or None if reference-free."""
        ...

    def sampling_model(self) -> contextlib.AbstractContextManager[nn.Module | None]:
        """A context giving a model to sample reference generations from (None when there is none)."""
        ...


def _compute_logps(model: nn.Module, batch: Batch, chunk_size: int) -> Any:
    from dpokit.logprobs import compute_logps

    return compute_logps(model, batch, chunk_size=chunk_size)


class NoReference:
    """Reference-free objectives (sft, unlikelihood, reference_free=true)."""

    name = "none"

    def logps(self, batch: Batch) -> None:
        return None

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[None]:
        yield None


class CopyReference:
    """A frozen, separate copy of the initial policy (or of ``reference.name_or_path``)."""

    name = "copy"

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.chunk_size = chunk_size

    @classmethod
    def from_policy(cls, policy: nn.Module, *, chunk_size: int = 1024) -> "CopyReference":
        return cls(copy.deepcopy(policy), chunk_size=chunk_size)

    def logps(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return _compute_logps(self.model, batch, self.chunk_size).logps.detach()

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[nn.Module]:
        yield self.model


class AdapterDisabledReference:
    """The LoRA policy with its adapters switched off: the frozen base model, no second copy."""

    name = "adapter_disabled"

    def __init__(self, policy: nn.Module, *, chunk_size: int = 1024) -> None:
        if not is_peft_model(policy):
            raise ConfigError("reference.strategy=adapter_disabled needs a LoRA policy (model.lora.enabled=true)")
        self.policy = policy
        self.chunk_size = chunk_size

    def logps(self, batch: Batch) -> torch.Tensor:
        with reference_mode(self.policy) as model:
            return _compute_logps(model, batch, self.chunk_size).logps.detach()

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[nn.Module]:
        with reference_mode(self.policy) as model:
            yield model


def resolve_reference_strategy(strategy: str, *, needs_reference: bool, lora: bool) -> str:
    """The concrete strategy for ``reference.strategy`` (``auto`` resolved), checked against the loss."""
    if strategy == "auto":
        if not needs_reference:
            return "none"
        return "adapter_disabled" if lora else "copy"
    if strategy == "none" and needs_reference:
        raise ConfigError(
            "reference.strategy=none but the loss needs reference log-probs; choose reference.strategy "
            "copy/adapter_disabled/precomputed/auto, or set loss.reference_free=true"
        )
    if strategy == "adapter_disabled" and not lora:
        raise ConfigError("reference.strategy=adapter_disabled needs model.lora.enabled=true")
    return strategy


