"""The parallel context: one process is a world of size one.

Every run -- a plain ``dpokit train`` or one rank of ``torchrun`` -- gets a :class:`ParallelContext`.
Its collectives (barrier, broadcast, all-reduce, all-gather, this rank's slice of a batch) are
identities in a world of one, so the trainer, the evaluation loop, the precomputed reference and
the checkpoints are written once and never ask "distributed or not". DDP and FSDP2 are wrappings
chosen once at set-up by :class:`ParallelPolicy`. See ``docs/engine.md`` for the batch, loss-weight
and checkpoint conventions across ranks.

With ``distributed.sequence_parallel: C`` > 1, consecutive groups of C ranks split every row of the
same micro-batch along its positions (:mod:`dpokit.training.sequence_parallel`); the data is then cut
over ``world_size / C`` data-parallel ranks (:attr:`ParallelContext.data_rank`), and the policy's
log-prob module runs its forward split over the group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dpokit.compat import no_split_module_class_names, set_transformers_progress_bars
from dpokit.config import DistributedConfig, TrainConfig
from dpokit.data.batch import Batch
from dpokit.errors import ConfigError, DpokitError
from dpokit.models import DTYPES, reference_mode, resolve_device
from dpokit.training.sequence_parallel import SequenceGroup, prepare_model, sharded_logps, verify_split

# ------------------------------------------------------------------------------------------------
# Set-up.
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
    ranks = max(1, world_size // cfg.distributed.sequence_parallel)  # a sequence-parallel group trains one slice
    per_micro_batch = cfg.optim.batch_size * ranks
    if wanted % per_micro_batch:
        lower = max(per_micro_batch, wanted // per_micro_batch * per_micro_batch)
        raise ConfigError(
            f"distributed.global_batch_size={wanted} is not a multiple of optim.batch_size ({cfg.optim.batch_size}) x "
            f"{ranks} data-parallel rank(s) = {per_micro_batch} examples per micro-batch; use a global batch size of "
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
class ParallelContext:
    """This process's place in the run and the collectives the engine needs (identities in a world of one)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"  # "none" (one process) | "ddp" | "fsdp"
    backend: str | None = None  # "nccl" | "gloo" under torchrun
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    settings: DistributedConfig = field(default_factory=DistributedConfig)
    sequence: SequenceGroup | None = None  # this rank's sequence-parallel group (None: rows are not split)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sequence_size(self) -> int:
        """Ranks splitting each row (1 without sequence parallelism)."""
        return self.sequence.size if self.sequence is not None else 1

    @property
    def data_rank(self) -> int:
        """This rank's place among the ranks that train different examples (its sequence-parallel group's index)."""
        return self.rank // self.sequence_size

    @property
    def data_ranks(self) -> int:
        """How many ranks train different examples: ``world_size`` over the sequence-parallel group size."""
        return self.world_size // self.sequence_size

    @property
    def holds_whole_model(self) -> bool:
        """Whether this rank's policy is a whole model (it can generate): not under FSDP, nor with its
        attention split over a sequence-parallel group."""
        return self.strategy != "fsdp" and self.sequence is None

    @property
    def handles_signals(self) -> bool:
        """Whether SIGINT/SIGTERM ask for a checkpoint and a clean stop; torchrun instead stops all ranks."""
        return self.world_size == 1

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for collectives live (NCCL: the GPU; gloo: CPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_reduce_data_sum(self, values: Sequence[float]) -> list[float]:
        """Sums over the data-parallel ranks of per-example values (float64): the ranks of a
        sequence-parallel group hold the same examples, so only its first rank's values count."""
        counted = self.sequence is None or self.sequence.rank == 0
        return self.all_reduce_sum([float(v) if counted else 0.0 for v in values])

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather_data_parts(self, obj: Any) -> list[Any]:
        """Every data-parallel rank's ``obj`` in order (one per sequence-parallel group)."""
        return self.all_gather_object(obj)[:: self.sequence_size]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def rank_slice(self, positions: Sequence[int]) -> list[int]:
        """This rank's contiguous slice of a global micro-batch (sizes differ by at most one); the
        ranks of a sequence-parallel group get the same slice."""
        count, extra = divmod(len(positions), self.data_ranks)
        start = self.data_rank * count + min(self.data_rank, extra)
        stop = start + count + (1 if self.data_rank < extra else 0)
        return list(positions[start:stop])

    def agree_on_stop(self, stop: Any) -> None:
        """Every rank stops at the same step when any rank was asked to stop."""
        wanted = self.all_reduce_sum([1.0 if stop.reason is not None else 0.0])[0]
        if wanted and stop.reason is None:
            stop.request("another rank")

    @contextlib.contextmanager
    def running(self) -> Iterator[ParallelContext]:
        """Around a whole run: name this rank in a failure (for torchrun's summary), end the process group."""
        try:
            yield self
        except BaseException as exc:
            if self.world_size > 1:
                self._record_failure(exc)
            raise
        finally:
            if self.world_size > 1 and dist.is_initialized():
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


def setup_parallel(cfg: TrainConfig) -> ParallelContext:
    """The context of this process: a world of one, or this rank of a torchrun launch.

    Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR / MASTER_PORT through the env://
    rendezvous). Errors a user can fix (NCCL without GPUs, more processes than GPUs, strategy=none on
    many processes, quantized FSDP) are ConfigErrors raised on every rank before any collective.
    """
    world_size = launched_world_size()
    settings = cfg.distributed
    if world_size is None:
        if settings.strategy in ("ddp", "fsdp") or settings.sequence_parallel > 1:
            print(
                f"note: distributed.strategy={settings.strategy}, sequence_parallel={settings.sequence_parallel} but the "
                "run was not started by torchrun (WORLD_SIZE is unset): training in this one process",
                file=sys.stderr,
                flush=True,
            )
        return ParallelContext(device=resolve_device(cfg.model.device), settings=settings)
    strategy = resolve_strategy(settings.strategy, world_size)
    if strategy == "none":
        return ParallelContext(device=resolve_device(cfg.model.device), settings=settings)
    if world_size % settings.sequence_parallel:
        raise ConfigError(
            f"distributed.sequence_parallel={settings.sequence_parallel} does not divide the {world_size} processes "
            "torchrun started; launch a multiple of it (--nproc_per_node) or change distributed.sequence_parallel"
        )
    backend = resolve_backend(settings.backend, cfg.model.device)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _rank_device(backend, local_rank, cfg.model.device)
    if strategy == "fsdp" and cfg.model.quantization != "none":
        raise ConfigError(
            "distributed.strategy=fsdp cannot shard quantized (bitsandbytes) weights; use ddp or model.quantization=none"
        )
    if rank != 0:  # one set of transformers progress bars, from rank 0
        set_transformers_progress_bars(False)
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=settings.timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    sequence = _sequence_group(rank, world_size, settings.sequence_parallel)
    if sequence is not None and rank == 0:
        print(
            f"sequence parallelism: rows split over {sequence.size} ranks, {world_size // sequence.size} data-parallel group(s)",
            file=sys.stderr,
            flush=True,
        )
    return ParallelContext(device, strategy, backend, rank, local_rank, world_size, settings, sequence)


def _sequence_group(rank: int, world_size: int, size: int) -> SequenceGroup | None:
    """This rank's group of ``size`` consecutive ranks (every rank creates every group, as
    ``new_group`` asks), or None when ``size`` is 1."""
    if size == 1:
        return None
    mine = None
    for first in range(0, world_size, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = SequenceGroup(group, rank - first, size)
    return mine


def _rank_device(backend: str, local_rank: int, model_device: str) -> torch.device:
    """cuda:LOCAL_RANK for NCCL (checked against the GPUs present), the CPU for gloo."""
    if backend == "nccl":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this machine shows {visible} CUDA device(s); launch at most "
                f"--nproc_per_node {visible} processes per machine"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    if model_device not in ("auto", "cpu"):
        raise ConfigError(
            f"distributed.backend=gloo trains on CPU but model.device={model_device!r}; use "
            "distributed.backend=nccl (or auto) for GPUs, or model.device=cpu"
        )
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# The wrapped policy.
# ------------------------------------------------------------------------------------------------


class LogpsModule(nn.Module):
    """``forward(batch) -> SequenceLogps``: the log-prob computation of a causal LM as one module call,
    so DDP / the FSDP2 root see (and hook) the whole computation.

    ``reference=True`` runs the model as the reference (eval mode, no grad, LoRA adapters off) --
    for a sharded policy this is the only way to reach its base weights. With a ``sequence`` group,
    every row is split over the group's ranks (:func:`dpokit.training.sequence_parallel.sharded_logps`).
    """

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024, sequence: SequenceGroup | None = None) -> None:
        super().__init__()
        self.model = prepare_model(model) if sequence is not None else model
        self.chunk_size = chunk_size
        self.sequence = sequence

    def _logps(self, model: nn.Module, batch: Batch) -> Any:
        from dpokit.logprobs import compute_logps

        if self.sequence is None:
            return compute_logps(model, batch, chunk_size=self.chunk_size)
        verify_split(model, self.sequence, batch.input_ids.device)
        return sharded_logps(model, batch, self.sequence, chunk_size=self.chunk_size)

    def forward(self, batch: Batch, reference: bool = False) -> Any:
        if reference:
            with reference_mode(self.model) as model:
                return self._logps(model, batch)
        out = self._logps(self.model, batch)
        # (B, K) logps is a transposed view; FSDP2 hooks an output's backward, which in-place ops on a
        # view would bypass -- hand out a tensor of its own.
        return dataclasses.replace(out, logps=out.logps.clone())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: modules whose class is in a ``_no_split_modules`` list (the
    transformers convention), else the children of the largest ``nn.ModuleList``."""
    block_names = no_split_module_class_names(model)
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    largest = max(lists, key=len)
    return list(largest)


def shard(ctx: ParallelContext, module: nn.Module, inner: nn.Module) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block of ``inner``, then ``module`` as the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    d = ctx.settings
    param_dtype = DTYPES[d.fsdp_param_dtype] if d.fsdp_param_dtype else None
    reduce_dtype = DTYPES[d.fsdp_reduce_dtype] if d.fsdp_reduce_dtype else param_dtype
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = transformer_blocks(inner)
    if not blocks:
        raise ConfigError(f"distributed.strategy=fsdp found no transformer blocks in {type(inner).__name__}; use ddp")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=d.fsdp_reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=mp_policy)
    return module


class ParallelPolicy:
    """The policy as the engine runs it: plain in a world of one, else wrapped in DDP or FSDP2.

    ``logps(batch)`` is the differentiable forward; ``reference_logps(batch)`` the same model with
    adapters off and no grad; ``model`` the (possibly peft-wrapped) causal LM itself.
    """

    def __init__(self, ctx: ParallelContext, model: nn.Module, *, chunk_size: int = 1024) -> None:
        self.ctx = ctx
        self.model = model  # its parameters are DTensors under fsdp
        self.logps_module = LogpsModule(model, chunk_size=chunk_size, sequence=ctx.sequence)
        if ctx.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Buffers (rotary tables) are identical on every rank: no broadcast before each forward.
            self.module: nn.Module = DistributedDataParallel(self.logps_module, forward_sync_buffers=False)
        elif ctx.strategy == "fsdp":
            self.module = shard(ctx, self.logps_module, model)
        else:
            self.module = self.logps_module

    def logps(self, batch: Batch) -> Any:
        return self.module(batch)

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """Reference log-probs (B, K) from the policy itself with adapters off (LoRA)."""
        with torch.no_grad():
            module = self.module if self.ctx.strategy == "fsdp" else self.logps_module  # DDP needs no hook here
            logps: torch.Tensor = module(batch, reference=True).logps.detach()
            return logps

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Reduce gradients across ranks only on the last micro-batch of an optimizer step."""
        if self.ctx.strategy == "ddp" and not enabled:
            # DDP's and FSDP2's methods, typed Tensor | Module by nn.Module.__getattr__.
            with self.module.no_sync():  # type: ignore[operator]
                yield
            return
        if self.ctx.strategy == "fsdp":
            self.module.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        yield

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global gradient norm (over all shards) before clipping; gradients scaled to ``max_norm``."""
        parameters = [p for p in self.module.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], norm_type=2.0)
        if hasattr(total, "full_tensor"):  # a DTensor under FSDP2: the norm over every shard
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return float(total.item())

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


def shard_frozen(ctx: ParallelContext, model: nn.Module, *, chunk_size: int) -> LogpsModule | nn.Module:
    """A frozen model as a log-prob module: sharded like the policy (its own FSDP2 root) under FSDP,
    else as it is."""
    module = LogpsModule(model.eval(), chunk_size=chunk_size, sequence=ctx.sequence)
    return shard(ctx, module, model) if ctx.strategy == "fsdp" else module
