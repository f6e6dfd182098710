"""The training loop: DPO (and every objective in :mod:`dpokit.losses`, SFT included) in one place.

Read it top to bottom. :func:`run` builds every component from the config, then loops::

    for each optimizer step:
        for each of grad_accumulation micro-batches (indices from a seeded, length-grouped order):
            batch   = collate(items)                    # chosen + rejected stacked: one forward
            policy  = compute_logps(policy, batch)      # (B, K) summed response log-probs
            ref     = reference.logps(batch)            # (B, K), no grad -- or None
            out     = objective(LossInputs(...))        # loss, per-example metrics
            backward(out.loss * B_micro / B_step)       # = mean over the step's examples
        clip gradients, optimizer.step(), scheduler.step()
        log / evaluate / checkpoint / stop on a signal

The data position (epoch, micro-batch within the epoch) is part of every checkpoint and the order
of an epoch is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted run would have seen; with the optimizer, scheduler and RNG states restored, its loss
curve is the same.

Metrics are kept as (sum, count) over examples until they are logged, so averages are exact over
uneven batches (and can later be all-reduced across processes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from dpokit.training import parallel as distributed
from dpokit.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    resolve_resume_path,
    save_checkpoint,
)
from dpokit.config import CONFIG_FILENAME, TrainConfig, config_to_dict, require_paths, save_config, validate_config
from dpokit.data.batch import Batch
from dpokit.errors import ConfigError, TrainingError
from dpokit.models import (
    apply_lora,
    enable_gradient_checkpointing,
    load_model,
    load_model_and_tokenizer,
    resolve_device,
    save_final_model,
)
from dpokit.training.reference import (
    AdapterDisabledReference,
    CopyReference,
    NoReference,
    ReferenceStrategy,
    resolve_reference_strategy,
)

logger = logging.getLogger(__name__)

CURVES_FILENAME = "curves.png"
SAMPLES_FILENAME = "samples.jsonl"


@dataclass
class RunResult:
    """What a finished (or interrupted) run produced."""

    run_dir: Path
    output_dir: Path | None  # the exported model; None when the run was interrupted
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)  # the last logged training averages
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    interrupted: bool = False  # stopped by SIGINT/SIGTERM or on_step before the planned end
    last_checkpoint: Path | None = None


# ------------------------------------------------------------------------------------------------
# Small components.
# ------------------------------------------------------------------------------------------------


def _say(cfg: TrainConfig, message: str) -> None:
    """A line for the person at the terminal (when the progress bar is on), else a log record."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 talks
        return
    if cfg.logging.progress_bar:
        print(message, file=sys.stderr, flush=True)
    else:
        logger.info(message)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). The data order has its own seeded sampler."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class MetricSums:
    """Per-example metrics accumulated as (sum, count) until they are averaged for logging."""

    def __init__(self, state: dict[str, list[float]] | None = None) -> None:
        self.sums: dict[str, float] = {k: float(v[0]) for k, v in (state or {}).items()}
        self.counts: dict[str, float] = {k: float(v[1]) for k, v in (state or {}).items()}

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def add_per_example(self, metrics: dict[str, torch.Tensor]) -> None:
        """Add (B,) per-example values; non-finite entries are left out of both sum and count."""
        if not metrics:
            return
        names = list(metrics)
        values = torch.stack([metrics[n].detach().float().reshape(-1) for n in names])  # (num_metrics, B)
        finite = torch.isfinite(values)
        totals = torch.where(finite, values, torch.zeros_like(values)).sum(dim=1)
        counts = finite.sum(dim=1)
        # One device-to-host transfer for all metrics, not one per metric.
        for name, total, count in zip(names, totals.tolist(), counts.tolist()):
            self.add(name, total, count)

    def averages(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}

    def state(self) -> dict[str, list[float]]:
        return {k: [self.sums[k], self.counts[k]] for k in self.sums}

    def __bool__(self) -> bool:
        return bool(self.sums)


class StepMetrics:
    """One optimizer step's micro-batch losses and per-example metrics, kept on the device until the
    step's backward passes are done and then read in one go: two device-to-host transfers per step
    instead of two per micro-batch (on a GPU each is a sync that stalls the launch of the next kernels)."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, torch.Tensor]] = []
        self.per_example: list[dict[str, torch.Tensor]] = []

    def add(self, index: int, out: Any) -> None:
        """Keep micro-batch ``index``'s objective output (loss and per-example metrics, detached)."""
        self.losses.append((index, out.loss.detach().float().reshape(1)))
        self.per_example.append({"loss": out.per_example.detach(), **{k: v.detach() for k, v in out.metrics.items()}})

    def finish(self, check_loss: Callable[[float, int], None]) -> MetricSums:
        """``check_loss(value, index)`` on every micro-batch loss in order, then the summed metrics."""
        sums = MetricSums()
        if not self.losses:
            return sums
        for (index, _), value in zip(self.losses, torch.cat([loss for _, loss in self.losses]).tolist()):
            check_loss(value, index)
        sums.add_per_example({name: torch.cat([m[name].reshape(-1) for m in self.per_example]) for name in self.per_example[0]})
        return sums


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning-rate multiplier before optimizer step ``step + 1`` (``step`` completed steps).

    Warm-up: ``(step + 1) / (warmup_steps + 1)`` (the paper's code: never exactly 0); then
    constant 1, or a cosine / linear decay from 1 to ``min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ConfigError(f"optim.schedule must be constant, cosine or linear, got {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_optimizer(cfg: TrainConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if not parameters:
        raise ConfigError("the policy has no trainable parameters")
    if o.optimizer == "adamw":
        # The fused kernel (one pass per tensor) is ~5x faster than the per-op loop on CPU as well as GPU.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
        return torch.optim.AdamW(parameters, lr=o.lr, betas=tuple(o.adam_betas), eps=o.eps, weight_decay=o.weight_decay,
                                 fused=fused)
    if o.optimizer == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay)
    raise ConfigError(f"optim.optimizer must be adamw or rmsprop, got {o.optimizer!r}")


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checks it after each optimizer step, saves a checkpoint and
    returns. A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.reason: str | None = None
        self.signals = tuple(signals)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(
            f"\n{self.reason} received: saving a checkpoint after this optimizer step, then stopping "
            "(send it again to stop immediately)",
            file=sys.stderr,
            flush=True,
        )

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """A view of a prepared dataset: ``indices`` into ``dataset.items``."""

    dataset: Any
    indices: list[int]
    # What length-grouped batching sorts by: "row" = prompt + longest response (padded layout),
    # "block" = prompt + all responses (shared-prompt / packed layouts).
    length_kind: str = "row"

    def __len__(self) -> int:
        return len(self.indices)

    def items(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        return [self.dataset.items[self.indices[p]] for p in positions]

    def lengths(self) -> np.ndarray:
        if self.length_kind == "block" and hasattr(self.dataset, "block_lengths"):
            return np.asarray(self.dataset.block_lengths)[self.indices]
        return np.asarray(self.dataset.lengths)[self.indices]


def load_data(cfg: TrainConfig, tokenizer: Any) -> tuple[Split, Split | None]:
    """Tokenized train and eval splits. Eval is ``data.eval_path``, else a seeded carve-out of
    ``data.eval_split_fraction`` of the training examples, else None."""
    from dpokit.data import prepare_dataset

    d = cfg.data
    common = dict(
        format=d.format, columns=d.columns, skip_invalid=d.skip_invalid, ranked_mode=d.ranked_mode,
        max_length=d.max_length, max_prompt_length=d.max_prompt_length, truncation_mode=d.truncation_mode,
        cache_dir=d.cache_dir,
    )
    train_data = prepare_dataset(d.train_path, tokenizer, split=d.train_split, **common)
    _say(cfg, f"training data {d.train_path}: {train_data.report.summary()}")
    indices = list(range(len(train_data)))
    eval_split: Split | None = None
    if d.eval_path:
        eval_data = prepare_dataset(d.eval_path, tokenizer, split=d.eval_split, **common)
        eval_split = Split(eval_data, list(range(len(eval_data))))
    elif d.eval_split_fraction > 0:
        generator = torch.Generator().manual_seed(cfg.optim.seed)
        permutation = torch.randperm(len(indices), generator=generator).tolist()
        num_eval = max(1, round(d.eval_split_fraction * len(indices)))
        held_out = set(permutation[:num_eval])
        eval_split = Split(train_data, sorted(held_out))
        indices = [i for i in indices if i not in held_out]
    if not indices:
        raise TrainingError(f"no training examples left in {d.train_path!r} (see the data report above)")
    if eval_split is not None and cfg.eval.max_examples is not None:
        eval_split.indices = eval_split.indices[: cfg.eval.max_examples]
    return Split(train_data, indices), eval_split


def epoch_batches(split: Split, *, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches (positions into ``split``) of one epoch: a pure function of (seed, epoch).

    Examples are shuffled and grouped by length (less padding; the longest batch first, so an
    out-of-memory error shows at step one) by :class:`~dpokit.data.LengthGroupedSampler`.
    """
    from dpokit.data import LengthGroupedSampler

    sampler = LengthGroupedSampler(split.lengths(), batch_size, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


# ------------------------------------------------------------------------------------------------
# Forward and evaluation.
# ------------------------------------------------------------------------------------------------


def forward_batch(policy: nn.Module, batch: Batch, reference: ReferenceStrategy, objective: Any, chunk_size: int) -> Any:
    """Policy log-probs (one forward for all K responses), reference log-probs, objective output."""
    from dpokit.logprobs import compute_logps
    from dpokit.losses import LossInputs

    reference_logps = reference.logps(batch) if objective.needs_reference else None
    policy_out = compute_logps(policy, batch, chunk_size=chunk_size)
    return objective(
        LossInputs(
            policy_logps=policy_out.logps,
            reference_logps=reference_logps,
            lengths=batch.response_lengths,
            response_mask=batch.response_mask,
            policy_token_logps=policy_out.token_logps,
            token_seq=batch.score_seq,
        )
    )


def evaluate(
    policy: nn.Module,
    split: Split,
    reference: ReferenceStrategy,
    objective: Any,
    collate: Callable[[list[dict[str, Any]]], Batch],
    *,
    batch_size: int,
    device: torch.device,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Loss and reward metrics averaged over every example of ``split`` (eval mode, no grad)."""
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                batch = collate(split.items(range(start, min(start + batch_size, len(split))))).to(device)
                out = forward_batch(policy, batch, reference, objective, chunk_size)
                sums.add_per_example({"loss": out.per_example, **out.metrics})
    finally:
        policy.train(was_training)
    return sums.averages()


# ------------------------------------------------------------------------------------------------
# The reference.
# ------------------------------------------------------------------------------------------------


def build_references(
    strategy: str, cfg: TrainConfig, policy: nn.Module, train: Split, evaluation: Split | None,
    collate: Callable[[list[dict[str, Any]]], Batch], device: torch.device, dist_ctx: Any = None,
) -> tuple[ReferenceStrategy, ReferenceStrategy]:
    """(train reference, eval reference) for a resolved strategy. Called with the *initial* policy
    (before LoRA is applied and before checkpoint weights are loaded): the reference is the model
    the run starts from, unless ``reference.name_or_path`` names another."""
    chunk = cfg.optim.logps_chunk_size
    if strategy == "none":
        return NoReference(), NoReference()
    if strategy == "adapter_disabled":
        reference = AdapterDisabledReference(policy, chunk_size=chunk)
        return reference, reference
    separate = load_model(cfg.model, cfg.reference.name_or_path, device=device) if cfg.reference.name_or_path else None
    if strategy == "copy":
        reference = CopyReference(separate, chunk_size=chunk) if separate is not None else CopyReference.from_policy(policy, chunk_size=chunk)
        return reference, reference
    if strategy == "precomputed":
        from dpokit.training.reference import load_or_compute_reference, model_fingerprint

        model = separate if separate is not None else policy
        model_fp = model_fingerprint(model)
        tables = {}
        for split in [train] + ([evaluation] if evaluation is not None else []):
            dataset = split.dataset
            if id(dataset) not in tables:  # a carved eval split shares the training table
                # Under torchrun each rank computes a shard of the table; the shards are gathered.
                loader = load_or_compute_reference if dist_ctx is None else functools.partial(distributed.load_or_compute_reference, dist_ctx)
                tables[id(dataset)] = loader(
                    model, dataset.items, collate, dataset_fingerprint=dataset.fingerprint, cache_dir=cfg.data.cache_dir,
                    batch_size=cfg.reference.batch_size, chunk_size=chunk, model_fp=model_fp,
                    progress=cfg.logging.progress_bar,
                )
        del separate
        for table in tables.values():
            _say(cfg, f"reference log-probs {'reused from' if table.from_cache else 'computed and cached in'} {table.path}")
        train_reference = tables[id(train.dataset)]
        return train_reference, tables[id(evaluation.dataset)] if evaluation is not None else train_reference
    raise ConfigError(f"unknown reference strategy {strategy!r}")


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------


def _trim_metrics_file(run_dir: Path, step: int) -> None:
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


def _resolve_run_dir(cfg: TrainConfig, resume: str | None) -> tuple[Path, Path | None]:
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


def _check_resume_compatible(state: dict[str, Any], cfg: TrainConfig, num_train: int, micro_batch_examples: int | None = None) -> None:
    saved = state.get("invariants", {})
    current = _invariants(cfg, num_train, micro_batch_examples)
    changed = [k for k in current if k in saved and saved[k] != current[k]]
    if changed:
        details = "; ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise TrainingError(
            f"cannot resume: settings that fix the model and the data order changed since the checkpoint ({details}); "
            "restore them or start a new run"
        )


def _invariants(cfg: TrainConfig, num_train: int, micro_batch_examples: int | None = None) -> dict[str, Any]:
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


def run(
    cfg: TrainConfig,
    *,
    resume: str | None = None,
    on_step: Callable[[int, dict[str, float]], bool | None] | None = None,
) -> RunResult:
    """Train according to ``cfg``; return where everything went and the final metrics.

    Args:
        cfg: the run configuration (see :mod:`dpokit.config`). SFT is the same call with the
            "sft" preset (loss terms [sft], no reference).
        resume: ``"latest"`` (the newest checkpoint in ``logging.run_dir``), a checkpoint directory,
            or a run directory; None starts fresh (and refuses a run_dir that already has checkpoints).
        on_step: called after every optimizer step with (global_step, that step's averaged metrics);
            returning True stops the run like a signal does (a checkpoint is saved first).

    Raises:
        ConfigError / DataError for unusable settings or data; TrainingError when training cannot go
        on (non-finite loss -- the message names the step and the last good checkpoint).

    Under torchrun (``WORLD_SIZE`` set) every process calls this; see :mod:`dpokit.training.parallel`.
    """
    validate_config(cfg)
    require_paths(cfg)
    cfg = distributed.apply_global_batch_size(cfg, distributed.launched_world_size() or 1)
    dist_ctx = distributed.setup_distributed(cfg)
    if dist_ctx is None:
        return _run(cfg, resume=resume, on_step=on_step)
    with dist_ctx.running():
        return _run(cfg, resume=resume, on_step=on_step, dist_ctx=dist_ctx)


def _run(
    cfg: TrainConfig,
    *,
    resume: str | None,
    on_step: Callable[[int, dict[str, float]], bool | None] | None,
    dist_ctx: distributed.DistContext | None = None,
) -> RunResult:
    is_main = dist_ctx is None or dist_ctx.is_main
    run_dir, resume_from = _resolve_run_dir(cfg, resume)
    if dist_ctx is not None:  # a time-stamped default run_dir is rank 0's
        run_dir = Path(dist_ctx.broadcast_object(str(run_dir)))
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_config(cfg, run_dir / CONFIG_FILENAME)
    seed_everything(cfg.optim.seed)

    # Model, data, objective.
    device = resolve_device(cfg.model.device) if dist_ctx is None else dist_ctx.device
    policy, tokenizer = load_model_and_tokenizer(cfg.model, device=device)
    with dist_ctx.main_first() if dist_ctx is not None else contextlib.nullcontext():  # one rank fills the cache
        train_split, eval_split = load_data(cfg, tokenizer)
    from dpokit.data import make_collator
    from dpokit.logprobs import choose_layout
    from dpokit.losses import build_objective

    layout = choose_layout(cfg.data.layout, policy)
    collate = make_collator(layout, tokenizer.pad_token_id, pack_tokens=cfg.data.pack_tokens if layout == "packed" else None)
    if layout != "padded":  # group batches by the length of a whole [prompt | responses] block
        train_split.length_kind = "block"
    objective = build_objective(cfg.loss.terms, beta=cfg.loss.beta, reference_free=cfg.loss.reference_free)
    strategy = resolve_reference_strategy(cfg.reference.strategy, needs_reference=objective.needs_reference, lora=cfg.model.lora.enabled)
    _say(cfg, f"objective {objective!r}; reference: {strategy}; {len(train_split)} training examples"
              + (f", {len(eval_split)} held out" if eval_split is not None else ""))

    # The reference is fixed from the initial weights, before LoRA and before any resumed weights.
    if strategy in ("copy", "precomputed"):
        train_reference, eval_reference = build_references(strategy, cfg, policy, train_split, eval_split, collate, device, dist_ctx)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if cfg.model.lora.enabled:
        policy = apply_lora(policy, cfg.model.lora, gradient_checkpointing=cfg.model.gradient_checkpointing)
    if strategy not in ("copy", "precomputed"):
        train_reference, eval_reference = build_references(strategy, cfg, policy, train_split, eval_split, collate, device, dist_ctx)
    if cfg.model.compile:
        from dpokit.training.speed import compile_decoder_layers

        compile_decoder_layers(policy)

    runner = None
    if dist_ctx is not None:  # DDP / FSDP2 wrapping; the optimizer must see the (sharded) parameters
        runner, train_reference, eval_reference = distributed.wrap_for_training(
            dist_ctx, policy, (train_reference, eval_reference), chunk_size=cfg.optim.logps_chunk_size)

    # Optimizer and schedule.
    o = cfg.optim
    # The sampler draws micro-batches of batch_size x processes examples; each rank gets a slice.
    micro_examples = o.batch_size * (dist_ctx.world_size if dist_ctx is not None else 1)
    batches_per_epoch = math.ceil(len(train_split) / micro_examples)
    steps_per_epoch = math.ceil(batches_per_epoch / o.grad_accumulation)
    total_steps = o.max_steps or o.epochs * steps_per_epoch
    optimizer = build_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=o.warmup_steps, total_steps=total_steps, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio),
    )

    # Where we are: fresh, or restored from a checkpoint (weights, optimizer, scheduler, RNG, data position).
    step, epoch, batch_in_epoch = 0, 0, 0
    window = MetricSums()
    best_eval: dict[str, float] = {}
    last_checkpoint: Path | None = None
    invariants = _invariants(cfg, len(train_split), micro_examples)
    if resume_from is not None:
        if dist_ctx is not None:
            state = distributed.resume(dist_ctx, resume_from, model=policy, optimizer=optimizer, scheduler=scheduler)
        elif distributed.is_dcp_checkpoint(resume_from):  # written by torchrun ranks; loads without them
            state = distributed.load_checkpoint(resume_from, model=policy, optimizer=optimizer, scheduler=scheduler)
        else:
            state = load_checkpoint(resume_from, model=policy, optimizer=optimizer, scheduler=scheduler)
        _check_resume_compatible(state, cfg, len(train_split), micro_examples)
        step, epoch, batch_in_epoch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        window = MetricSums(state.get("pending_metrics"))
        best_eval = state.get("best_eval", {})
        last_checkpoint = resume_from
        if is_main:
            _trim_metrics_file(run_dir, step)
            remove_partial_checkpoints(run_dir)
        _say(cfg, f"resumed from {resume_from} at step {step} (epoch {epoch}, micro-batch {batch_in_epoch})")

    from dpokit.training.plots import plot_training_curves
    from dpokit.training.tracking import MetricsTracker, progress_bar

    tracker = MetricsTracker(
        run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
        config_dict=config_to_dict(cfg), enabled=is_main,
    )
    bar = progress_bar(total_steps, initial=step, enabled=cfg.logging.progress_bar and is_main)
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    last_eval_step = last_saved_step = -1
    interrupted = False

    def trainer_state() -> dict[str, Any]:
        return {
            "global_step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "total_steps": total_steps,
            "pending_metrics": window.state(), "best_eval": best_eval, "invariants": invariants,
            "reference_strategy": strategy,
        }

    def checkpoint_now() -> Path:
        nonlocal last_checkpoint, last_saved_step
        if dist_ctx is not None:
            last_checkpoint = distributed.save_checkpoint(
                dist_ctx, run_dir, step, model=policy, optimizer=optimizer, scheduler=scheduler,
                trainer_state=trainer_state(), keep_last=cfg.checkpoint.keep_last,
            )
            last_saved_step = step
            return last_checkpoint
        last_checkpoint = save_checkpoint(
            run_dir, step, model=policy, optimizer=optimizer, scheduler=scheduler, trainer_state=trainer_state(),
            tokenizer=tokenizer, keep_last=cfg.checkpoint.keep_last,
        )
        last_saved_step = step
        return last_checkpoint

    def evaluate_now() -> dict[str, float]:
        nonlocal last_eval_step, best_eval
        assert eval_split is not None
        # Evaluation must not move the training RNG streams (a resumed run evaluates at other times).
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            if dist_ctx is None:
                metrics = evaluate(policy, eval_split, eval_reference, objective, collate, batch_size=cfg.eval.batch_size,
                                   device=device, chunk_size=o.logps_chunk_size)
            else:
                metrics = distributed.evaluate(dist_ctx, runner, eval_split, eval_reference, objective, collate,
                                               batch_size=cfg.eval.batch_size)
            # Samples come from rank 0's whole model: not available when the weights are sharded.
            if cfg.eval.sample_prompts and is_main and (dist_ctx is None or dist_ctx.strategy == "ddp"):
                from dpokit.generation import policy_and_reference_samples

                prompt_ids = [list(item["prompt_ids"]) for item in eval_split.items(range(min(cfg.eval.sample_prompts, len(eval_split))))]
                samples = policy_and_reference_samples(policy, eval_reference, tokenizer, prompt_ids,
                                                       max_new_tokens=cfg.eval.max_new_tokens)
                with open(run_dir / SAMPLES_FILENAME, "a", encoding="utf-8") as handle:
                    for sample in samples:
                        handle.write(json.dumps({"step": step, **sample}) + "\n")
        tracker.log(step, metrics, split="eval")
        if not best_eval or metrics.get("loss", math.inf) < best_eval.get("loss", math.inf):
            best_eval = {"step": step, **metrics}
        last_eval_step = step
        return metrics

    def non_finite(what: str, value: float, where: str) -> TrainingError:
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint had been written yet"
        return TrainingError(
            f"{what} is {value} at optimizer step {step + 1} ({where}); training stopped and {kept}. "
            "Try a lower optim.lr, gradient clipping (optim.max_grad_norm), model.dtype=float32 or bfloat16 "
            "instead of float16, and check the data around that step."
        )

    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    try:
        # Under torchrun, signals end the processes at once (torchrun stops all ranks with SIGTERM).
        with StopRequest(signals=() if dist_ctx is not None else (signal.SIGINT, signal.SIGTERM)) as stop:
            while step < total_steps and not interrupted:
                batches = epoch_batches(train_split, batch_size=micro_examples, seed=o.seed, epoch=epoch)
                while batch_in_epoch < len(batches) and step < total_steps:
                    # One optimizer step over the next grad_accumulation micro-batches of this epoch.
                    micro_batches = batches[batch_in_epoch : batch_in_epoch + o.grad_accumulation]
                    step_examples = sum(len(m) for m in micro_batches)
                    optimizer.zero_grad(set_to_none=True)

                    def check_loss(value: float, index: int) -> None:
                        if not math.isfinite(value):
                            raise non_finite("the loss", value, f"epoch {epoch}, micro-batch {batch_in_epoch + index}")

                    pending = StepMetrics()
                    for index, positions in enumerate(micro_batches if dist_ctx is None else []):
                        batch = collate(train_split.items(positions)).to(device)
                        out = forward_batch(policy, batch, train_reference, objective, o.logps_chunk_size)
                        # Weighting by the micro-batch's share of examples makes the step's gradient
                        # that of the mean loss over all its examples, whatever the batch sizes.
                        (out.loss * (batch.batch_size / step_examples)).backward()
                        pending.add(index, out)
                    max_norm = o.max_grad_norm if o.max_grad_norm is not None else math.inf
                    if dist_ctx is None:
                        step_sums = pending.finish(check_loss)  # a non-finite loss stops before the optimizer step
                        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm).item()
                    else:  # this rank's slices of the micro-batches, gradients reduced over ranks
                        step_sums, grad_norm = distributed.train_step(
                            dist_ctx, runner, micro_batches, train_split, collate, train_reference, objective,
                            max_grad_norm=max_norm, check_loss=check_loss)
                    if not math.isfinite(grad_norm):
                        raise non_finite("the gradient norm", grad_norm, f"epoch {epoch}")
                    learning_rate = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    batch_in_epoch += len(micro_batches)
                    if batch_in_epoch >= len(batches):
                        epoch, batch_in_epoch = epoch + 1, 0
                        batches = epoch_batches(train_split, batch_size=micro_examples, seed=o.seed, epoch=epoch)

                    for name in step_sums.sums:
                        window.add(name, step_sums.sums[name], step_sums.counts[name])
                    window.add("grad_norm", grad_norm, 1)
                    window.add("lr", learning_rate, 1)
                    step_metrics = step_sums.averages()
                    bar.update(1)
                    bar.set_metrics(step_metrics)
                    if step % cfg.logging.log_every == 0 or step == total_steps:
                        train_metrics = {**window.averages(), "epoch": epoch + batch_in_epoch / len(batches)}
                        tracker.log(step, train_metrics, split="train")
                        window = MetricSums()
                    if eval_split is not None and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                        eval_metrics = evaluate_now()
                    if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                        checkpoint_now()
                    if on_step is not None and on_step(step, step_metrics):
                        stop.request("on_step")
                    if dist_ctx is not None:
                        dist_ctx.agree_on_stop(stop)
                    if stop.reason is not None and step < total_steps:
                        interrupted = True
                        if last_saved_step != step:
                            checkpoint_now()
                        bar.write(f"stopped by {stop.reason} at step {step}; checkpoint {last_checkpoint} "
                                  f"(continue with --resume latest)")
                        break

            if not interrupted:
                if eval_split is not None and last_eval_step != step:
                    eval_metrics = evaluate_now()
                if cfg.checkpoint.every_steps and last_saved_step != step and step > 0:
                    checkpoint_now()
    finally:
        bar.close()
        tracker.close()
        if cfg.logging.plot and is_main and (run_dir / "metrics.jsonl").is_file():
            with contextlib.suppress(Exception):  # a plot must never hide the run's own outcome
                plot_training_curves(run_dir / "metrics.jsonl", run_dir / CURVES_FILENAME)

    output_dir = None
    if not interrupted:
        output_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir / "final"
        if dist_ctx is None:
            save_final_model(policy, tokenizer, output_dir, lora_export=cfg.model.lora.export)
        else:
            distributed.export_final_model(dist_ctx, policy, tokenizer, output_dir)
        if is_main and output_dir.is_dir():
            # The run's config beside the exported model: `dpokit eval` / `dpokit score` read it to find
            # the reference (the model the run started from) and beta, wherever output_dir is.
            save_config(cfg, output_dir / CONFIG_FILENAME)
    return RunResult(
        run_dir=run_dir, output_dir=output_dir, global_step=step, train_metrics=train_metrics,
        eval_metrics=eval_metrics, interrupted=interrupted, last_checkpoint=last_checkpoint,
    )
