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
from dataclasses import dataclass
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


def _row_shape(item: dict[str, Any], *, one_row_per_response: bool) -> tuple[int, int]:
    """(token rows, row length) of ``item`` in a batch layout: one row per response (padded) or one
    ``[prompt | responses...]`` row (shared prompt; packed rows are filled up to about the same)."""
    prompt = len(item["prompt_ids"])
    responses = [len(r) for r in item["response_ids"]] or [0]
    if one_row_per_response:
        return len(responses), prompt + max(responses)
    return 1, prompt + sum(responses)


def reference_batches(
    items: Sequence[dict[str, Any]], *, max_examples: int, max_tokens: int | None, one_row_per_response: bool = False
) -> list[list[int]]:
    """Indices of ``items`` in batches for a no-grad pass: sorted by the layout's row length, longest
    first (an out-of-memory error shows on the first batch), each batch at most ``max_examples``
    items and at most ``max_tokens`` padded tokens (rows x its longest row; an item longer than the
    budget goes alone). Sorting by the row the layout builds keeps padding, and the attention over
    it, to a few percent; the token budget keeps long rows from making huge batches."""
    shapes = [_row_shape(item, one_row_per_response=one_row_per_response) for item in items]
    order = sorted(range(len(items)), key=lambda i: (-shapes[i][1], i))
    batches: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i in order:
        item_rows, length = shapes[i]
        longest = shapes[current[0]][1] if current else length
        over_budget = max_tokens is not None and (rows + item_rows) * longest > max_tokens
        if current and (len(current) >= max_examples or over_budget):
            batches.append(current)
            current, rows = [], 0
        current.append(i)
        rows += item_rows
    if current:
        batches.append(current)
    return batches


def response_rows(items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """One single-response item per (example i, response k) of ``items``, and each one's (i, k).

    A pass that forwards one row per response need not keep an example's responses together: sorted
    one by one, rows of about the same length share a batch, where an example's own chosen and
    rejected rows would be padded to the longer of the two."""
    rows: list[dict[str, Any]] = []
    places: list[tuple[int, int]] = []
    for i, item in enumerate(items):
        for k, response in enumerate(item["response_ids"]):
            row = {"example_id": len(rows), "prompt_ids": item["prompt_ids"], "response_ids": [response]}
            if "images" in item:
                row["images"] = item["images"]
            rows.append(row)
            places.append((i, k))
    return rows, places


def compute_reference_logps(
    model: nn.Module,
    items: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], Batch],
    *,
    batch_size: int = 32,
    batch_tokens: int | None = 8192,
    chunk_size: int = 1024,
    device: torch.device | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs for every item: ``(example_ids (N,) long, logps (N, K_max) float32)``.

    Runs ``model`` under :func:`dpokit.models.reference_mode` (eval, no grad, adapters off) and
    inference mode, in the batches of :func:`reference_batches` (at most ``batch_size`` items and
    ``batch_tokens`` padded tokens, sorted by the length of the rows ``collate`` builds). With the
    padded layout (one row per response) the pass sorts and batches the responses one by one
    (:func:`response_rows`), so it pads less than training batches do. Slots beyond an example's own
    K are 0.
    """
    from dpokit.data.collate import PaddedCollator
    from dpokit.logprobs import compute_logps

    n = len(items)
    if n == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 2)
    k_max = max(len(item["response_ids"]) for item in items)
    example_ids = torch.tensor([int(item["example_id"]) for item in items], dtype=torch.long)
    logps = torch.zeros(n, k_max, dtype=torch.float32)
    work, per_response = list(items), False
    places: list[tuple[int, int]] = []
    if isinstance(collate, PaddedCollator):  # one row per response: batch the responses one by one
        (work, places), per_response = response_rows(items), True
        collate = PaddedCollator(collate.pad_token_id, image_processor=collate.image_processor)  # no fixed K
        batch_size *= k_max
    batches = reference_batches(work, max_examples=batch_size, max_tokens=batch_tokens, one_row_per_response=per_response)
    device = device or next(model.parameters()).device
    bar = None
    if progress:
        from dpokit.training.tracking import progress_bar

        # Redrawn on a terminal; in a log, one line per quarter of the pass (the trainer's own rule:
        # a handful of plain lines, not one per batch).
        bar = progress_bar(len(work), enabled=True, desc="reference log-probs", line_every=-(-len(work) // 4))
    with reference_mode(model) as reference, torch.inference_mode():
        for rows in batches:
            batch = collate([work[j] for j in rows]).to(device)
            values = compute_logps(reference, batch, chunk_size=chunk_size).logps.float().cpu()
            values = values.masked_fill(~batch.response_mask.cpu(), 0.0)
            if per_response:
                where = torch.tensor([places[j] for j in rows], dtype=torch.long)
                logps[where[:, 0], where[:, 1]] = values[:, 0]
            else:
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
    batch_tokens: int | None = 8192,
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
    shard = list(items)[ctx.data_rank :: ctx.data_ranks]
    example_ids, logps = compute_reference_logps(
        model,
        shard,
        collate,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        chunk_size=chunk_size,
        progress=progress and ctx.is_main,
    )
    gathered = [part for part in ctx.gather_data_parts((example_ids, logps)) if part[0].numel()]
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


@dataclass(frozen=True)
class ReferenceWorkload:
    """What a run asks of its reference, for ``reference.strategy: auto`` to weigh.

    ``precomputed_examples``: the examples a precomputed pass forwards once (every training and
    evaluation example); ``live_examples``: the examples a live reference forwards (each trained
    example, steps x examples per step, and the evaluation examples at every evaluation). Per example
    both cost one no-grad forward of the same rows (the pass groups rows by length under a token
    budget). ``copy_bytes``: the weights a second copy of the model holds; ``free_bytes``: memory
    available on the training device (None when unknown); ``samples_reference``: the run writes the
    reference model's samples at evaluations (``eval.sample_prompts``), which needs a reference model."""

    precomputed_examples: int
    live_examples: int
    copy_bytes: int = 0
    free_bytes: int | None = None
    samples_reference: bool = False


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _auto_strategy(*, lora: bool, mismatched_pairs: bool, workload: ReferenceWorkload | None) -> tuple[str, str]:
    """``auto``'s choice and why, for a loss that needs reference log-probs."""
    live = "adapter_disabled" if lora else "copy"
    if mismatched_pairs:
        return live, "KTO's KL pairs change with every batch, so no table computed before training can hold them"
    if workload is None:
        return "precomputed", "one no-grad pass before training, no reference model kept in memory"
    if workload.samples_reference:
        return live, "eval.sample_prompts samples the reference model, which a precomputed table does not keep"
    pre, per_step = workload.precomputed_examples, workload.live_examples
    if pre <= per_step:
        return "precomputed", (
            f"one pass over {pre} examples costs no more than the {per_step} reference forwards of a live reference, "
            "and no reference model stays in memory"
        )
    if not lora and workload.free_bytes is not None and 2 * workload.copy_bytes > workload.free_bytes:
        return "precomputed", (
            f"a live copy would forward {per_step} examples against {pre} precomputed, but its "
            f"{_gib(workload.copy_bytes)} of weights do not fit comfortably in the {_gib(workload.free_bytes)} free"
        )
    how = "the base model with the adapters off" if lora else f"a frozen copy ({_gib(workload.copy_bytes)})"
    return live, f"the run forwards {per_step} examples, fewer than the {pre} a precomputed pass would; {how}"


def plan_reference(
    strategy: str,
    *,
    needs_reference: bool,
    lora: bool,
    mismatched_pairs: bool = False,
    workload: ReferenceWorkload | None = None,
) -> tuple[str, str]:
    """The concrete strategy for ``reference.strategy`` and a one-line reason, checked against the loss.

    ``auto``: ``none`` when the loss needs no reference; ``adapter_disabled`` (LoRA) or ``copy`` when
    the loss has KTO's mismatched KL pairs (``mismatched_pairs``), which change with every batch, or
    the run samples the reference model at evaluations; otherwise ``precomputed``, unless ``workload``
    shows the run forwards fewer examples than a precomputed pass would (a run shorter than an epoch)
    and, for ``copy``, a second copy fits in half the free memory. Without ``workload`` ``auto``
    takes ``precomputed`` whenever it can.
    """
    if strategy == "auto":
        if not needs_reference:
            return "none", "the loss needs no reference"
        return _auto_strategy(lora=lora, mismatched_pairs=mismatched_pairs, workload=workload)
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
    return strategy, "set by reference.strategy"


def resolve_reference_strategy(strategy: str, *, needs_reference: bool, lora: bool, mismatched_pairs: bool = False) -> str:
    """The concrete strategy for ``reference.strategy`` (``auto`` resolved as :func:`plan_reference`
    does without a workload), checked against the loss.

    ``mismatched_pairs``: the objective's KL reference point (KTO) scores prompt/completion pairs
    that change with every batch, so a table computed before training cannot hold them."""
    return plan_reference(strategy, needs_reference=needs_reference, lora=lora, mismatched_pairs=mismatched_pairs)[0]


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the system's MemAvailable
    (Linux); None when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
                batch_tokens=cfg.reference.batch_tokens,
                chunk_size=chunk,
                model_fp=model_fp,
                progress=cfg.logging.progress_bar,
                ctx=ctx,
            )
    return [tables[id(dataset)] for dataset in datasets]
