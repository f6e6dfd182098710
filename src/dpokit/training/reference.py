"""The reference: one protocol, four implementations, one constructor.

A reference answers one question per batch: the reference log-probs ``log pi_ref(y_k | x_b)``,
shape (B, K), without gradient (or None for reference-free objectives):

* :class:`NoReference` -- reference-free objectives;
* :class:`CopyReference` -- a frozen copy of the initial policy, or another model (sharded like
  the policy under FSDP);
* :class:`AdapterDisabledReference` -- the LoRA policy with its adapters off: the frozen base is the
  reference, no second copy is held;
* :class:`PrecomputedReference` -- computed once before training (each rank a shard under
  torchrun), cached on disk, looked up by example id; no reference forward while training.

:func:`build_references` makes them for ``dpokit train``; ``eval``, ``score`` and ``frontier``
construct the same classes. The cache key and fingerprints are described in ``docs/engine.md``.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.compat import architecture_config_dict, peft_base_parameter_name
from dpokit.config import TrainConfig
from dpokit.data.batch import Batch
from dpokit.errors import ConfigError, TrainingError
from dpokit.models import is_peft_model, load_model, reference_mode
from dpokit.training.parallel import ParallelContext, ParallelPolicy, shard_frozen

logger = logging.getLogger(__name__)

CACHE_FORMAT = "dpokit-reference-logps-v1 (summed response log-probs, float32)"


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
        config_dict = architecture_config_dict(config)
        hasher.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        key = peft_base_parameter_name(name)
        if key is not None and key not in tensors:
            tensors[key] = tensor
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.contiguous().reshape(-1)
        if flat.numel():
            # The buffer protocol, no extra copy (numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only).
            hasher.update(flat.view(torch.uint8).cpu().numpy())  # type: ignore[arg-type]
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

    def __init__(
        self, example_ids: torch.Tensor, logps: torch.Tensor, *, path: Path | None = None, from_cache: bool = False
    ) -> None:
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
    ctx: ParallelContext | None = None,
) -> PrecomputedReference:
    """The cached table for (model, dataset) when every rank finds it complete, else compute and cache it.

    ``model`` (unwrapped, used as the reference: eval, no grad, adapters off) computes the log-probs
    of this rank's strided shard of ``items``; the shards are gathered on every rank and rank 0
    writes the one cache file. ``model_fp`` may be passed when already known.
    """
    ctx = ctx or ParallelContext()
    model_fp = model_fp or model_fingerprint(model)
    path = reference_cache_path(cache_dir, model_fp, dataset_fingerprint)
    cached = load_cached_reference(path, items)
    if ctx.all_reduce_sum([0.0 if cached is not None else 1.0])[0] == 0:
        logger.info("reusing precomputed reference log-probs from %s", path)
        return cached  # type: ignore[return-value]  # not None on every rank
    shard = list(items)[ctx.rank :: ctx.world_size]
    example_ids, logps = compute_reference_logps(
        model,
        shard,
        collate,
        batch_size=batch_size,
        chunk_size=chunk_size,
        progress=progress and ctx.is_main,
    )
    gathered = [part for part in ctx.all_gather_object((example_ids, logps)) if part[0].numel()]
    k_max = max((part[1].shape[1] for part in gathered), default=2)
    all_ids = torch.cat([part[0] for part in gathered]) if gathered else example_ids
    all_logps = (
        torch.cat([torch.nn.functional.pad(part[1], (0, k_max - part[1].shape[1])) for part in gathered]) if gathered else logps
    )
    if ctx.is_main:
        save_reference_table(path, all_ids, all_logps, model_fp=model_fp, dataset_fingerprint=dataset_fingerprint)
        logger.info("cached reference log-probs for %d examples at %s", len(all_ids), path)
    ctx.barrier()
    return PrecomputedReference(all_ids, all_logps, path=path, from_cache=False)


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


def save_reference_table(
    path: Path, example_ids: torch.Tensor, logps: torch.Tensor, *, model_fp: str, dataset_fingerprint: str
) -> None:
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


class Reference(Protocol):
    """What the engine needs from a reference."""

    name: str

    def logps(self, batch: Batch) -> torch.Tensor | None:
        """Reference summed log-probs (B, K) for ``batch`` (no grad), or None if reference-free."""
        ...

    def sampling_model(self) -> contextlib.AbstractContextManager[nn.Module | None]:
        """A context giving a whole model to sample reference generations from (None when there is none)."""
        ...


class NoReference:
    """Reference-free objectives (sft, unlikelihood, reference_free=true)."""

    name = "none"

    def logps(self, batch: Batch) -> None:
        return None

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[None]:
        yield None


class CopyReference:
    """A frozen model: a copy of the initial policy, or a separate reference model.

    Under FSDP it is sharded like the policy and run as its own root (see
    :func:`dpokit.training.parallel.shard_frozen`); a sharded copy cannot generate.
    """

    name = "copy"

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024, ctx: ParallelContext | None = None) -> None:
        ctx = ctx or ParallelContext(device=next(model.parameters()).device)
        model.requires_grad_(False)
        self.model = model.eval()
        self.module = shard_frozen(ctx, model, chunk_size=chunk_size)
        self.whole = ctx.holds_whole_model

    @classmethod
    def from_policy(cls, policy: nn.Module, *, chunk_size: int = 1024, ctx: ParallelContext | None = None) -> CopyReference:
        return cls(copy.deepcopy(policy), chunk_size=chunk_size, ctx=ctx)

    def logps(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            values: torch.Tensor = self.module(batch, reference=True).logps.detach()
        reshard = getattr(self.module, "reshard", None)
        if reshard is not None:  # an FSDP2 root keeps its gathered parameters after forward; free them
            reshard()
        return values

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[nn.Module | None]:
        yield self.model if self.whole else None


class AdapterDisabledReference:
    """The LoRA policy with its adapters switched off: the frozen base model, no second copy.

    Runs through the wrapped policy (:meth:`ParallelPolicy.reference_logps`), which under FSDP is
    the only way to reach the sharded base weights.
    """

    name = "adapter_disabled"

    def __init__(self, policy: ParallelPolicy) -> None:
        if not is_peft_model(policy.model):
            raise ConfigError("reference.strategy=adapter_disabled needs a LoRA policy (model.lora.enabled=true)")
        self.policy = policy

    def logps(self, batch: Batch) -> torch.Tensor:
        return self.policy.reference_logps(batch)

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[nn.Module | None]:
        if not self.policy.ctx.holds_whole_model:
            yield None
            return
        with reference_mode(self.policy.model) as model:
            yield model


def resolve_reference_strategy(strategy: str, *, needs_reference: bool, lora: bool, mismatched_pairs: bool = False) -> str:
    """The concrete strategy for ``reference.strategy`` (``auto`` resolved), checked against the loss.

    ``mismatched_pairs``: the objective's KL reference point (KTO) scores prompt/completion pairs
    that change with every batch, so a table computed before training cannot hold them."""
    if strategy == "auto":
        if not needs_reference:
            return "none"
        return "adapter_disabled" if lora else "copy"
    if strategy == "none" and needs_reference:
        raise ConfigError(
            "reference.strategy=none but the loss needs reference log-probs; choose reference.strategy "
            "copy/adapter_disabled/precomputed/auto, or set loss.reference_free=true"
        )
    if strategy == "precomputed" and mismatched_pairs:
        raise ConfigError(
            "reference.strategy=precomputed cannot serve KTO's KL term: its mismatched prompt/completion pairs change "
            "with every batch; use reference.strategy copy or adapter_disabled (or auto)"
        )
    if strategy == "adapter_disabled" and not lora:
        raise ConfigError("reference.strategy=adapter_disabled needs model.lora.enabled=true")
    return strategy


def build_references(
    strategy: str,
    cfg: TrainConfig,
    ctx: ParallelContext,
    initial_policy: nn.Module,
    datasets: Sequence[Any],
    collate: Callable[[list[dict[str, Any]]], Batch],
) -> list[Reference | None]:
    """One reference per prepared dataset in ``datasets`` (training first, then evaluation).

    Called with the *initial* policy, before LoRA is applied, the policy is wrapped and checkpoint
    weights are loaded: the reference is the model the run starts from, unless
    ``reference.name_or_path`` names another. ``adapter_disabled`` needs the wrapped LoRA policy
    and is returned as None here: make it with :class:`AdapterDisabledReference` once it exists.
    A dataset that appears twice (a carved eval split) shares its reference.
    """
    chunk = cfg.optim.logps_chunk_size
    if strategy in ("none", "adapter_disabled"):
        return [NoReference() if strategy == "none" else None for _ in datasets]
    separate = load_model(cfg.model, cfg.reference.name_or_path, device=ctx.device) if cfg.reference.name_or_path else None
    if strategy == "copy":
        copy_reference = (
            CopyReference(separate, chunk_size=chunk, ctx=ctx)
            if separate is not None
            else CopyReference.from_policy(initial_policy, chunk_size=chunk, ctx=ctx)
        )
        return [copy_reference for _ in datasets]
    if strategy != "precomputed":
        raise ConfigError(f"unknown reference strategy {strategy!r}")
    model = separate if separate is not None else initial_policy
    model_fp = model_fingerprint(model)
    tables: dict[int, PrecomputedReference] = {}
    for dataset in datasets:
        if id(dataset) not in tables:
            tables[id(dataset)] = load_or_compute_reference(
                model,
                dataset.items,
                collate,
                dataset_fingerprint=dataset.fingerprint,
                cache_dir=cfg.data.cache_dir,
                batch_size=cfg.reference.batch_size,
                chunk_size=chunk,
                model_fp=model_fp,
                progress=cfg.logging.progress_bar,
                ctx=ctx,
            )
    return [tables[id(dataset)] for dataset in datasets]
