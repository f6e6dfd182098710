"""Training on many processes and machines: torchrun + DDP or FSDP2, on CUDA (NCCL) or CPU (gloo).

Launch the ordinary ``dpokit train`` under PyTorch's own launcher::

    torchrun --nproc_per_node 8 -m dpokit train cfg.yaml distributed.strategy=fsdp

Every process (rank) runs :func:`dpokit.training.run`; this module holds what differs from a single
process. A run not started by torchrun (``WORLD_SIZE`` unset) never touches it.

**The model.** :func:`dpokit.logprobs.compute_logps` calls the decoder and applies the output layer
itself, so wrapping the causal LM in DDP / FSDP2 and calling its inner modules would bypass DDP's
forward (gradient-reduction bookkeeping) and FSDP2's root pre-forward (gathering the root's
parameters). :class:`LogpsModule` turns "log-probs of a batch" into an ``nn.Module.forward``; *that*
module is wrapped in ``DistributedDataParallel``, or becomes the FSDP2 root after every transformer
block was ``fully_shard``-ed. Tied input/output embeddings live in the root, so they stay tied.

**Batches.** With W processes, ``optim.batch_size`` is per process. The length-grouped sampler draws
*global* micro-batches of ``batch_size x W`` examples -- exactly the batches a single process with
``batch_size x W`` would draw -- and each is cut into W contiguous slices, one per rank. An optimizer
step takes ``grad_accumulation`` global micro-batches, so::

    examples per optimizer step = optim.batch_size x processes x optim.grad_accumulation

Each rank's micro-batch loss (a mean over its b_r examples) is scaled by ``b_r * W / n_step`` with
n_step the examples of the whole step: DDP and FSDP average gradients over ranks (divide by W), so the
step's gradient is exactly the gradient of the mean loss over all its examples, as in one process.
No example is duplicated or dropped: a final micro-batch of fewer than ``W`` examples leaves some
ranks empty; they run the forward/backward on a stand-in example with loss weight 0 (collectives
need every rank) and add nothing to the metrics.

**Metrics** are (sum, count) per metric, summed over ranks with one all-reduce per step, and only
rank 0 writes logs, plots, samples and exports.

**Checkpoints** use ``torch.distributed.checkpoint`` (DCP): ``checkpoint-N/dcp/`` holds the trainable
weights and the optimizer state, sharded, keyed by parameter name, so a checkpoint written by W ranks
loads on any number of ranks, and in a plain single process (DCP needs no process group to load).
Scheduler, RNG and trainer state are written by rank 0 as in a single-process checkpoint.

**Export**: the full state dict is gathered to rank 0 on CPU and saved with ``save_pretrained``
(LoRA merged or as an adapter, as configured), so ``transformers`` loads it as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dpokit.config import TrainConfig
from dpokit.data.batch import Batch
from dpokit.errors import ConfigError, DpokitError, TrainingError

logger = logging.getLogger(__name__)

DCP_DIR = "dcp"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------
# Setup.
# ------------------------------------------------------------------------------------------------


def launched_world_size() -> int | None:
    """The number of processes torchrun started (``WORLD_SIZE``), or None outside torchrun."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def apply_global_batch_size(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` with ``optim.grad_accumulation`` derived from ``distributed.global_batch_size``.

    global_batch_size = batch_size x world_size x grad_accumulation must hold in whole numbers;
    otherwise a ConfigError says which values would work. Unchanged when the key is null.
    """
    wanted = cfg.distributed.global_batch_size
    if wanted is None:
        return cfg
    per_micro_batch = cfg.optim.batch_size * world_size
    if wanted % per_micro_batch:
        lower = max(per_micro_batch, wanted // per_micro_batch * per_micro_batch)
        raise ConfigError(
            f"distributed.global_batch_size={wanted} is not a multiple of optim.batch_size ({cfg.optim.batch_size}) x "
            f"{world_size} process(es) = {per_micro_batch} examples per micro-batch; use a global batch size of "
            f"{lower} or {lower + per_micro_batch}, or change optim.batch_size / the number of processes"
        )
    optim = dataclasses.replace(cfg.optim, grad_accumulation=wanted // per_micro_batch)
    return dataclasses.replace(cfg, optim=optim)


def resolve_strategy(requested: str, world_size: int) -> str:
    """``auto`` -> ddp on more than one process, none on one."""
    if requested == "auto":
        return "ddp" if world_size > 1 else "none"
    if requested == "none" and world_size > 1:
        raise ConfigError(
            f"torchrun started {world_size} processes but distributed.strategy=none; set distributed.strategy=ddp or "
            "fsdp (or auto), or launch one process"
        )
    return requested


def resolve_backend(requested: str, model_device: str) -> str:
    """NCCL for GPUs, gloo for CPUs; NCCL without a GPU is a ConfigError."""
    cuda = torch.cuda.is_available()
    if requested == "nccl" and not cuda:
        raise ConfigError(
            "distributed.backend=nccl needs NVIDIA GPUs, but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use distributed.backend=gloo to train on CPUs, or auto"
        )
    if requested == "auto":
        return "nccl" if cuda and not model_device.startswith("cpu") else "gloo"
    return requested


@dataclass
class DistContext:
    """This process's place in the run and the collectives the trainer needs."""

    strategy: str  # "ddp" | "fsdp"
    backend: str  # "nccl" | "gloo"
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    cfg: TrainConfig

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for collectives live (NCCL: the GPU; gloo: CPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def rank_slice(self, positions: Sequence[int]) -> list[int]:
        """This rank's contiguous slice of a global micro-batch (sizes differ by at most one)."""
        count, extra = divmod(len(positions), self.world_size)
        start = self.rank * count + min(self.rank, extra)
        stop = start + count + (1 if self.rank < extra else 0)
        return list(positions[start:stop])

    @contextlib.contextmanager
    def running(self) -> Iterator["DistContext"]:
        """Around a whole run: record this rank's failure for torchrun's summary, end the process group."""
        try:
            yield self
        except BaseException as exc:
            self._record_failure(exc)
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    def _record_failure(self, exc: BaseException) -> None:
        if isinstance(exc, DpokitError) and not str(exc).startswith("rank "):
            # The CLI prints the message; with many ranks the reader needs to know whose it is.
            exc.args = (f"rank {self.rank}/{self.world_size}: {exc}",) + tuple(exc.args[1:])
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return
        with contextlib.suppress(Exception):
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(exc)  # torchrun shows it as the failure's cause

    def agree_on_stop(self, stop: Any) -> None:
        """Every rank stops at the same step when any rank was asked to stop."""
        wanted = self.all_reduce_sum([1.0 if stop.reason is not None else 0.0])[0]
        if wanted and stop.reason is None:
            stop.request("another rank")


def setup_distributed(cfg: TrainConfig) -> DistContext | None:
    """The process group for a torchrun launch; None for a single-process run.

    Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR / MASTER_PORT through the env://
    rendezvous). Errors a user can fix (NCCL without GPUs, more processes than GPUs, strategy=none on
    many processes, quantized FSDP) are ConfigErrors raised on every rank before any collective.
    """
    world_size = launched_world_size()
    strategy_cfg = cfg.distributed
    if world_size is None:
        if strategy_cfg.strategy in ("ddp", "fsdp"):
            print(
                f"note: distributed.strategy={strategy_cfg.strategy} but the run was not started by torchrun "
                "(WORLD_SIZE is unset): training in this one process",
                file=sys.stderr, flush=True,
            )
        return None
    strategy = resolve_strategy(strategy_cfg.strategy, world_size)
    if strategy == "none":
        return None
    backend = resolve_backend(strategy_cfg.backend, cfg.model.device)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this machine shows {visible} CUDA device(s); launch at most "
                f"--nproc_per_node {visible} processes per machine"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        if cfg.model.device not in ("auto", "cpu"):
            raise ConfigError(
                f"distributed.backend=gloo trains on CPU but model.device={cfg.model.device!r}; use "
                "distributed.backend=nccl (or auto) for GPUs, or model.device=cpu"
            )
        device = torch.device("cpu")
    if strategy == "fsdp" and cfg.model.quantization != "none":
        raise ConfigError("distributed.strategy=fsdp cannot shard quantized (bitsandbytes) weights; use ddp or model.quantization=none")
    if rank != 0:  # one set of transformers progress bars ("Loading weights"), from rank 0
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=strategy_cfg.timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return DistContext(strategy, backend, rank, local_rank, world_size, device, cfg)


# ------------------------------------------------------------------------------------------------
# The wrapped model.
# ------------------------------------------------------------------------------------------------


class LogpsModule(nn.Module):
    """``forward(batch) -> SequenceLogps``: the log-prob computation of a causal LM as one module call,
    so DDP / the FSDP2 root see (and hook) the whole computation.

    ``reference=True`` runs the model as the reference (eval mode, no grad, LoRA adapters off) --
    for a sharded policy this is the only way to reach its base weights.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: Batch, reference: bool = False) -> Any:
        from dpokit.logprobs import compute_logps
        from dpokit.training.reference import reference_mode

        if reference:
            with reference_mode(self.model) as model:
                return compute_logps(model, batch, chunk_size=self.chunk_size)
        out = compute_logps(self.model, batch, chunk_size=self.chunk_size)
        # (B, K) logps is a transposed view; FSDP2 hooks an output's backward, which in-place ops on a
        # view would bypass -- hand out a tensor of its own.
        return dataclasses.replace(out, logps=out.logps.clone())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: modules whose class is in a ``_no_split_modules`` list (the
    transformers convention), else the children of the largest ``nn.ModuleList``."""
    block_names: set[str] = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _shard(ctx: DistContext, module: nn.Module, inner: nn.Module) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block of ``inner``, then ``module`` as the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    d = ctx.cfg.distributed
    param_dtype = _DTYPES[d.fsdp_param_dtype] if d.fsdp_param_dtype else None
    reduce_dtype = _DTYPES[d.fsdp_reduce_dtype] if d.fsdp_reduce_dtype else param_dtype
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    options = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype))
    blocks = transformer_blocks(inner)
    if not blocks:
        raise ConfigError(f"distributed.strategy=fsdp found no transformer blocks in {type(inner).__name__}; use ddp")
    for block in blocks:
        fully_shard(block, reshard_after_forward=d.fsdp_reshard_after_forward, **options)
    fully_shard(module, **options)
    return module


class ParallelPolicy:
    """The policy as the training loop uses it under DDP / FSDP2."""

    def __init__(self, ctx: DistContext, policy: nn.Module, *, chunk_size: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.ctx = ctx
        self.policy = policy  # the (possibly peft-wrapped) causal LM; its parameters are DTensors under fsdp
        self.logps_module = LogpsModule(policy, chunk_size=chunk_size)
        if ctx.strategy == "ddp":
            # Buffers (rotary tables) are identical on every rank: no broadcast before each forward.
            self.module: nn.Module = DistributedDataParallel(self.logps_module, forward_sync_buffers=False)
        elif ctx.strategy == "fsdp":
            self.module = _shard(ctx, self.logps_module, policy)
        else:  # pragma: no cover - resolve_strategy never returns anything else
            raise ConfigError(f"unknown distributed strategy {ctx.strategy!r}")

    def logps(self, batch: Batch) -> Any:
        return self.module(batch)

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """Reference log-probs (B, K) from the policy itself with adapters off (LoRA)."""
        with torch.no_grad():
            module = self.module if self.ctx.strategy == "fsdp" else self.logps_module  # DDP needs no hook here
            return module(batch, reference=True).logps.detach()

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Reduce gradients across ranks only on the last micro-batch of an optimizer step."""
        if self.ctx.strategy == "ddp":
            with contextlib.nullcontext() if enabled else self.module.no_sync():
                yield
        else:
            self.module.set_requires_gradient_sync(enabled)
            yield

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global gradient norm (over all shards) before clipping; gradients scaled to ``max_norm``."""
        from torch.distributed.tensor import DTensor

        parameters = [p for p in self.module.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in parameters], norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return float(total.item())

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


class ShardedCopyReference:
    """A frozen copy of the initial policy, sharded like the policy (FSDP2), run as its own root."""

    name = "copy"

    def __init__(self, ctx: DistContext, model: nn.Module, *, chunk_size: int) -> None:
        self.module = _shard(ctx, LogpsModule(model.eval(), chunk_size=chunk_size), model)

    def logps(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            values = self.module(batch, reference=True).logps.detach()
        self.module.reshard()  # a root keeps its gathered parameters after forward; free them
        return values

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[None]:
        yield None  # a sharded model cannot generate outside the root's forward


class PolicyReference:
    """The LoRA policy with adapters disabled, reached through the sharded root (FSDP2)."""

    name = "adapter_disabled"

    def __init__(self, runner: ParallelPolicy) -> None:
        self.runner = runner

    def logps(self, batch: Batch) -> torch.Tensor:
        return self.runner.reference_logps(batch)

    @contextlib.contextmanager
    def sampling_model(self) -> Iterator[None]:
        yield None


def wrap_for_training(ctx: DistContext, policy: nn.Module, references: tuple[Any, Any], *, chunk_size: int) -> tuple[ParallelPolicy, Any, Any]:
    """Wrap the policy (DDP / FSDP2) and adapt the (train, eval) references to it.

    DDP: a copy reference stays a local frozen replica and adapter-disabled calls the unwrapped module
    (no collectives in a no-grad forward). FSDP: a copy reference is sharded like the policy, and the
    adapter-disabled reference goes through the policy's sharded root. Precomputed and no reference
    need nothing.
    """
    from dpokit.training.reference import AdapterDisabledReference, CopyReference

    runner = ParallelPolicy(ctx, policy, chunk_size=chunk_size)
    adapted: dict[int, Any] = {}

    def adapt(reference: Any) -> Any:
        if id(reference) in adapted:
            return adapted[id(reference)]
        result = reference
        if ctx.strategy == "fsdp" and isinstance(reference, CopyReference):
            result = ShardedCopyReference(ctx, reference.model, chunk_size=reference.chunk_size)
        elif ctx.strategy == "fsdp" and isinstance(reference, AdapterDisabledReference):
            result = PolicyReference(runner)
        adapted[id(reference)] = result
        return result

    return runner, adapt(references[0]), adapt(references[1])


# ------------------------------------------------------------------------------------------------
# One optimizer step, evaluation.
# ------------------------------------------------------------------------------------------------


def _forward(runner: ParallelPolicy, batch: Batch, reference: Any, objective: Any) -> Any:
    from dpokit.losses import LossInputs

    reference_logps = reference.logps(batch) if objective.needs_reference else None
    policy_out = runner.logps(batch)
    return objective(
        LossInputs(
            policy_logps=policy_out.logps, reference_logps=reference_logps, lengths=batch.response_lengths,
            response_mask=batch.response_mask, policy_token_logps=policy_out.token_logps, token_seq=batch.score_seq,
        )
    )


def _reduce(ctx: DistContext, local: Any, names: list[str]) -> Any:
    """(sum, count) of every metric summed over ranks -> a MetricSums with the global totals."""
    from dpokit.training.trainer import MetricSums

    values = [local.sums.get(n, 0.0) for n in names] + [local.counts.get(n, 0.0) for n in names]
    totals = ctx.all_reduce_sum(values) if values else []
    merged = MetricSums()
    for i, name in enumerate(names):
        merged.add(name, totals[i], totals[len(names) + i])
    return merged


def train_step(
    ctx: DistContext,
    runner: ParallelPolicy,
    micro_batches: Sequence[Sequence[int]],
    split: Any,
    collate: Callable[[list[dict[str, Any]]], Batch],
    reference: Any,
    objective: Any,
    *,
    max_grad_norm: float,
    check_loss: Callable[[float, int], None],
) -> tuple[Any, float]:
    """Forward/backward this rank's slices of ``micro_batches`` (global micro-batches of positions
    into ``split``); return (metric sums over all ranks, global gradient norm before clipping).

    Loss weight of rank r's slice of b_r examples: ``b_r * W / n_step`` (n_step: examples in the
    step, all ranks) -- ranks average gradients, so the sum is the single-process step mean.
    """
    from dpokit.training.trainer import StepMetrics

    step_examples = sum(len(m) for m in micro_batches)
    pending = StepMetrics()
    names: list[str] = ["loss"]
    for index, positions in enumerate(micro_batches):
        mine = ctx.rank_slice(positions)
        # An empty slice (fewer examples than ranks) still joins the collectives, with weight 0.
        batch = collate(split.items(mine if mine else list(positions[:1]))).to(ctx.device)
        with runner.gradient_sync(index == len(micro_batches) - 1):
            out = _forward(runner, batch, reference, objective)
            weight = len(mine) * ctx.world_size / step_examples
            (out.loss * weight).backward()
        names = ["loss", *out.metrics]
        if mine:
            pending.add(index, out)
    local = pending.finish(check_loss)
    grad_norm = runner.clip_grad_norm_(max_grad_norm)
    return _reduce(ctx, local, names), grad_norm


def evaluate(
    ctx: DistContext,
    runner: ParallelPolicy,
    split: Any,
    reference: Any,
    objective: Any,
    collate: Callable[[list[dict[str, Any]]], Batch],
    *,
    batch_size: int,
) -> dict[str, float]:
    """Loss and reward metrics over every example of ``split``: each rank a contiguous shard, the same
    number of forwards on every rank (an exhausted rank runs a stand-in batch and discards it)."""
    from dpokit.training.trainer import MetricSums

    shard = ctx.rank_slice(range(len(split)))
    per_rank = -(-len(split) // ctx.world_size)
    local = MetricSums()
    names: list[str] = ["loss"]
    runner.train(False)
    try:
        with torch.no_grad():
            for start in range(0, per_rank, batch_size):
                mine = shard[start : start + batch_size]
                batch = collate(split.items(mine if mine else [0])).to(ctx.device)
                out = _forward(runner, batch, reference, objective)
                names = ["loss", *out.metrics]
                if mine:
                    local.add_per_example({"loss": out.per_example, **out.metrics})
    finally:
        runner.train(True)
    return _reduce(ctx, local, names).averages()


# ------------------------------------------------------------------------------------------------
# Precomputed reference log-probs, one shard of the data per rank.
# ------------------------------------------------------------------------------------------------


def load_or_compute_reference(
    ctx: DistContext,
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
) -> Any:
    """:func:`dpokit.training.reference.load_or_compute_reference` over ranks: when any rank lacks a complete
    cache, each rank computes the log-probs of its strided shard of ``items`` with its (unsharded,
    not yet wrapped) model, the shards are gathered on every rank, and rank 0 writes the one cache."""
    from dpokit.training.reference import (
        PrecomputedReference,
        compute_reference_logps,
        load_cached_reference,
        model_fingerprint,
        reference_cache_path,
        save_reference_table,
    )

    model_fp = model_fp or model_fingerprint(model)
    path = reference_cache_path(cache_dir, model_fp, dataset_fingerprint)
    cached = load_cached_reference(path, items)
    if ctx.all_reduce_sum([0.0 if cached is not None else 1.0])[0] == 0:
        return cached
    shard = list(items)[ctx.rank :: ctx.world_size]
    example_ids, logps = compute_reference_logps(
        model, shard, collate, batch_size=batch_size, chunk_size=chunk_size, progress=progress and ctx.is_main,
    )
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, (example_ids, logps))
    k_max = max(part[1].shape[1] for part in gathered if part[0].numel()) if any(p[0].numel() for p in gathered) else 2
    all_ids = torch.cat([part[0] for part in gathered])
    all_logps = torch.cat([torch.nn.functional.pad(part[1], (0, k_max - part[1].shape[1])) for part in gathered])
    if ctx.is_main:
        save_reference_table(path, all_ids, all_logps, model_fp=model_fp, dataset_fingerprint=dataset_fingerprint)
    ctx.barrier()
    return PrecomputedReference(all_ids, all_logps, path=path, from_cache=False)


# ------------------------------------------------------------------------------------------------
# Checkpoints (torch.distributed.checkpoint) and the final export.
# ------------------------------------------------------------------------------------------------


def is_dcp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def _state_dict_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA base) come from the model files, not the checkpoint.
    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def save_checkpoint(
    ctx: DistContext,
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``<run_dir>/checkpoint-<step>`` from every rank: DCP shards of the trainable weights and
    optimizer state under ``dcp/``; scheduler, RNG (rank 0's) and trainer state from rank 0. Atomic
    like :func:`dpokit.training.checkpoint.save_checkpoint`: written under a temporary name, renamed last."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dpokit.training.checkpoint import (
        TRAINER_STATE,
        capture_rng_state,
        list_checkpoints,
        publish_checkpoint,
        remove_partial_checkpoints,
    )

    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    tmp = None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(run_dir)
        tmp = tempfile.mkdtemp(prefix=f"checkpoint-{step}.tmp-", dir=run_dir)
    tmp = Path(ctx.broadcast_object(tmp))
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / DCP_DIR))
    ctx.barrier()
    if ctx.is_main:
        try:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            rng_tensors, rng_plain = capture_rng_state()
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            (tmp / "rng.json").write_text(json.dumps(rng_plain))
            state = {**trainer_state, "global_step": step, "checkpoint_format": "dcp", "world_size": ctx.world_size,
                     "strategy": ctx.strategy}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
            publish_checkpoint(tmp, final)
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    ctx.barrier()
    return final


def load_checkpoint(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a DCP checkpoint into ``model`` / ``optimizer`` -- sharded (FSDP2), replicated (DDP) or
    plain (a single process, no process group needed) -- plus scheduler and RNG; return the trainer
    state. The number of ranks may differ from the one that wrote it."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from dpokit.training.checkpoint import read_trainer_state, restore_rng_state

    path = Path(path)
    state = read_trainer_state(path)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
    loaded = {"model": model_state, "optimizer": optimizer_state}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*load in a single process.*")
            dcp.load(loaded, checkpoint_id=str(path / DCP_DIR), no_dist=not dist.is_initialized())
    except Exception as exc:  # a different model / LoRA setting: keys or shapes do not match
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"checkpoint {str(path)!r} does not fit this model and optimizer: {message}") from None
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                   options=_state_dict_options())
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if restore_rng:
        restore_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return state


def resume(ctx: DistContext, path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Resume a distributed run from a DCP checkpoint, or (DDP only) from a single-process one."""
    if is_dcp_checkpoint(path):
        return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    if ctx.strategy == "ddp":  # every rank holds the whole model and optimizer: the ordinary files fit
        from dpokit.training.checkpoint import load_checkpoint as load_single

        return load_single(path, model=model, optimizer=optimizer, scheduler=scheduler)
    raise TrainingError(
        f"checkpoint {str(path)!r} was written by a single-process run; distributed.strategy=fsdp resumes only "
        "torchrun checkpoints (checkpoint-N/dcp). Resume it once with distributed.strategy=ddp or in one process."
    )


def export_final_model(ctx: DistContext, policy: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save the trained policy for ``from_pretrained`` from rank 0.

    DDP: rank 0's replica is the model. FSDP: every rank sends its shards to rank 0's CPU
    (``full_state_dict=True, cpu_offload=True``); rank 0 loads them into an unsharded copy built from
    ``model.name_or_path`` (plus the same LoRA adapters) and saves it like a single-process run.
    """
    from dpokit.models import apply_lora, load_model, save_final_model

    cfg = ctx.cfg
    out = Path(out_dir)
    if ctx.strategy == "ddp":
        if ctx.is_main:
            save_final_model(policy, tokenizer, out, lora_export=cfg.model.lora.export)
        ctx.barrier()
        return out
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        plain = load_model(cfg.model, device=torch.device("cpu"))
        if cfg.model.lora.enabled:
            plain = apply_lora(plain, cfg.model.lora)
        result = plain.load_state_dict(full_state, strict=False)
        if result.unexpected_keys:
            raise TrainingError(f"the gathered weights do not fit the exported model (unexpected {result.unexpected_keys[:3]})")
        save_final_model(plain, tokenizer, out, lora_export=cfg.model.lora.export)
    ctx.barrier()
    return out
