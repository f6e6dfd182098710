"""The trainer: DPO (and every objective in :mod:`dpokit.losses`, SFT included), one loop for one
process or many.

Read :meth:`Trainer.fit` first; it is the whole loop::

    set up (model, data, objective, reference, wrapping, optimizer, resume)
    for each optimizer step:
        train step      # grad_accumulation micro-batches -> one gradient of the mean loss
        log / maybe evaluate / maybe checkpoint / stop on a signal
    export the model

A single process is a world of size one (:class:`~dpokit.training.parallel.ParallelContext`), so
the same code runs under torchrun with DDP or FSDP2. The data position is part of every checkpoint
and an epoch's order is a pure function of (seed, epoch), so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from dpokit.config import TrainConfig, config_to_dict, require_paths, save_config, validate_config
from dpokit.errors import ConfigError, TrainingError
from dpokit.models import apply_lora, enable_gradient_checkpointing, load_model_and_tokenizer, load_processor
from dpokit.rundir import RunPaths
from dpokit.training import step as steps
from dpokit.training.checkpoint import export_final_model, load_checkpoint, save_checkpoint
from dpokit.training.memory import apply_checkpointing_plan, checkpointing_mode, micro_batch_shape
from dpokit.training.metrics import MetricSums
from dpokit.training.model_card import RunSummary
from dpokit.training.optim import build_optimizer, build_scheduler, plan_steps, planned_steps
from dpokit.training.parallel import ParallelContext, ParallelPolicy, apply_global_batch_size, launched_world_size, setup_parallel
from dpokit.training.reference import (
    AdapterDisabledReference,
    PrecomputedReference,
    Reference,
    ReferenceWorkload,
    available_memory,
    build_references,
    plan_reference,
)
from dpokit.training.resume import RunDirectory, check_resume_compatible, invariants, weights_fingerprint
from dpokit.training.splits import Split, epoch_batches, load_data
from dpokit.training.stop import StopRequest
from dpokit.training.tracking import MetricsTracker, StartupClock, progress_bar

if TYPE_CHECKING:
    from dpokit.data import BatchLayout
    from dpokit.losses import Objective

logger = logging.getLogger(__name__)

OnStep = Callable[[int, dict[str, float]], "bool | None"]
# Builds the (train, eval) splits instead of reading data.train_path / data.eval_path: (tokenizer, unpaired).
DataSource = Callable[[Any, bool], "tuple[Split, Split | None]"]


@dataclass
class RunResult:
    """What a finished (or interrupted) run produced."""

    run_dir: Path
    output_dir: Path | None  # the exported model; None when the run was interrupted
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)  # the last logged training averages
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    interrupted: bool = False  # stopped by SIGINT/SIGTERM or on_step before the planned end
    stop_reason: str | None = None  # "SIGINT", "SIGTERM", "on_step" or "another rank" when interrupted
    last_checkpoint: Path | None = None


@dataclass
class Segment:
    """A stretch of training that a :class:`Loop` hands to :meth:`Trainer.fit`: optimizer steps up to
    ``end_step`` (a global step), drawing from ``split`` from the segment's start (None: the current
    training split). ``keep_position``: the run resumed inside this segment, so the data position in
    ``split`` is kept. ``state`` is recorded in every checkpoint taken inside the segment (and is what a
    resumed run reads back from ``Trainer.restored_state``)."""

    end_step: int
    split: Split | None = None
    keep_position: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    index: int = 0


class Loop(Protocol):
    """A client of :meth:`Trainer.fit`: where its segments come from, and what happens after each.

    ``segments`` is iterated inside the run's reporting and stop handling, so the work a segment needs
    first (sampling and judging an online round) happens there, with the trainer's metrics tracker open
    and a stop request honoured at the next optimizer step. ``after_segment`` runs after a segment
    trained to its end (not after an interrupted one)."""

    def segments(self, trainer: Trainer) -> Iterable[Segment]: ...

    def after_segment(self, trainer: Trainer, segment: Segment, seconds: float) -> None: ...


class WholeRun:
    """The offline run as a loop: one segment to the planned end, on the training data."""

    def segments(self, trainer: Trainer) -> Iterator[Segment]:
        yield Segment(end_step=trainer.parts.total_steps)

    def after_segment(self, trainer: Trainer, segment: Segment, seconds: float) -> None:
        return None


@dataclass
class Position:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    window: MetricSums = field(default_factory=MetricSums)  # training metrics since the last log
    best_eval: dict[str, float] = field(default_factory=dict)


@dataclass
class Components:
    """The run's parts, built once from its config by :meth:`Trainer.setup`: what every step uses and
    what a :class:`Loop` may read. Only the data changes during a run (``Trainer.train_split``)."""

    tokenizer: Any  # writes the prompts' token ids (a vision-language processor's own tokenizer)
    processor: Any | None  # a vision-language policy's processor; None for a causal language model
    objective: Objective
    layout: str  # the batch layout: padded, shared_prompt or packed
    collate: BatchLayout
    reference_strategy: str  # precomputed, copy, adapter_disabled or none
    runner: ParallelPolicy  # the policy, wrapped for the process group
    train_reference: Reference
    eval_reference: Reference
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int  # the planned optimizer steps
    micro_examples: int  # examples per micro-batch over all processes
    invariants: dict[str, Any]  # what a checkpoint records for a resume to check


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). The data order has its own seeded sampler."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: TrainConfig, *, resume: str | None = None, on_step: OnStep | None = None, overwrite: bool = False) -> RunResult:
    """Train according to ``cfg``; return where everything went and the final metrics.

    Args:
        cfg: the run configuration (see :mod:`dpokit.config`). SFT is the same call with the
            "sft" preset (loss terms [sft], no reference).
        resume: ``"latest"`` (the newest checkpoint in ``logging.run_dir``), a checkpoint directory,
            or a run directory; None starts fresh.
        overwrite: start afresh in a run directory that holds an earlier run's records (they are
            removed); without it such a directory is refused.
        on_step: called after every optimizer step with (global_step, that step's averaged metrics);
            returning True stops the run like a signal does (a checkpoint is saved first).

    Raises:
        ConfigError / DataError for unusable settings or data; TrainingError when training cannot go
        on (non-finite loss -- the message names the step and the last good checkpoint).

    Under torchrun (``WORLD_SIZE`` set) every process calls this with the same arguments.
    """

    def checked(config: TrainConfig) -> TrainConfig:
        validate_config(config)
        require_paths(config)
        return config

    return run_loop(cfg, check=checked, resume=resume, overwrite=overwrite, on_step=on_step)


def run_loop(
    cfg: TrainConfig,
    *,
    check: Callable[[TrainConfig], TrainConfig],
    loop: Callable[[Trainer], Loop] | None = None,
    data: DataSource | None = None,
    needs_whole_model: str | None = None,
    resume: str | None = None,
    overwrite: bool = False,
    on_step: OnStep | None = None,
) -> RunResult:
    """The set-up and teardown every run shares: ``check`` the config (returning the config to run),
    the global batch, the process group, a :class:`Trainer` (``data``: its data source) driving
    ``loop(trainer)`` (None: the offline run), and on the way out the run directory unlocked and the
    models released before the process group. ``needs_whole_model``: the message refusing a sharded
    (FSDP) policy, for loops that sample from it on every process."""
    clock = StartupClock()
    with clock.phase("config"):
        cfg = apply_global_batch_size(check(cfg), launched_world_size() or 1)
        ctx = setup_parallel(cfg)
    with ctx.running():
        if needs_whole_model is not None and not ctx.holds_whole_model:
            raise ConfigError(needs_whole_model)
        trainer = Trainer(cfg, ctx, resume=resume, overwrite=overwrite, data=data, clock=clock)
        try:
            return trainer.fit(loop(trainer) if loop is not None else None, on_step)
        except BaseException:
            trainer.run_directory.close(failed=True)  # a run with nothing to show leaves no directory behind
            raise
        finally:
            trainer.run_directory.close()
            # The wrapped models (DDP / FSDP2 state, sharded copies) go before the process group does:
            # torch aborts a process whose collective state outlives its group.
            del trainer
            gc.collect()


class Trainer:
    """One run: built from its config by :meth:`setup`, trained by :meth:`fit`."""

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: ParallelContext,
        *,
        resume: str | None = None,
        overwrite: bool = False,
        data: DataSource | None = None,
        clock: StartupClock | None = None,
    ) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.clock = clock or StartupClock()  # time to the first optimizer step, by phase (startup.json)
        self.data_source = data
        self.extra_state: dict[str, Any] = {}  # recorded in every checkpoint (the online loop's round)
        self.restored_state: dict[str, Any] = {}  # the trainer state of the checkpoint resumed from
        self.run_directory = RunDirectory.open(cfg, ctx, resume=resume, overwrite=overwrite)  # locked by rank 0
        self.resume_from = self.run_directory.resume_from
        self.position = Position()
        self.last_checkpoint: Path | None = None
        self.last_saved_step = self.last_eval_step = -1
        self.train_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self._batches: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its micro-batches)
        # The metrics tracker and progress bar are opened by fit (reporting); closed until then.
        self.tracker = MetricsTracker(self.run_dir, enabled=False)
        self.bar = progress_bar(None, enabled=False)
        try:
            self.train_split, self.eval_split, self.parts = self.setup()
            if self.resume_from is not None:
                self.restore(self.resume_from)
            if ctx.is_main:  # the record of the run (a resume's beside it), once the resume is accepted
                self.run_directory.write_config(cfg, resumed_at=self.position.step if self.resume_from is not None else None)
            self.clock.remainder("other_setup")  # wrapping, compilation, optimizer, resume
        except BaseException:
            self.run_directory.close(failed=True)  # nor its directory, unless it existed before or holds results
            raise

    @property
    def run_dir(self) -> Path:
        """The run directory (:attr:`run_directory`'s path)."""
        return self.run_directory.path

    @property
    def paths(self) -> RunPaths:
        """Every file and folder the run writes (:attr:`run_directory`'s)."""
        return self.run_directory.paths

    # -- the loop -----------------------------------------------------------------------------------

    def fit(self, loop: Loop | None = None, on_step: OnStep | None = None) -> RunResult:
        """Train ``loop``'s segments (the offline run: one, to the planned end) or until stopped;
        evaluate, checkpoint and export on the way. Signals, reporting, the last evaluation and
        checkpoint and the export are the trainer's, whatever the loop."""
        loop = loop or WholeRun()
        self.parts.runner.train(True)
        signals = (signal.SIGINT, signal.SIGTERM) if self.ctx.handles_signals else ()  # torchrun stops ranks itself
        with StopRequest(signals) as stop, self.reporting():
            for segment in loop.segments(self):
                if segment.split is not None:
                    self.use_train_split(segment.split, keep_position=segment.keep_position)
                self.extra_state = segment.state
                started = time.perf_counter()
                if self.train_until(segment.end_step, stop, on_step):
                    return self.result(stop, interrupted=True)
                loop.after_segment(self, segment, time.perf_counter() - started)
            self.finish()
        return self.result(stop, interrupted=False)

    def train_until(self, end_step: int, stop: StopRequest, on_step: OnStep | None = None) -> bool:
        """Optimizer steps up to ``end_step``, with logging, evaluation, checkpoints and the stop handling
        of every step; True when a stop request ended it early (a checkpoint is saved first)."""
        cfg, p = self.cfg, self.position
        while p.step < end_step:
            step_metrics = self.record_step(*self.train_step())
            if "first_step" not in self.clock.phases:
                self.report_startup()
            if self.eval_split is not None and cfg.eval.every_steps and p.step % cfg.eval.every_steps == 0:
                self.evaluate()
            if cfg.checkpoint.every_steps and p.step % cfg.checkpoint.every_steps == 0:
                self.checkpoint()
            if on_step is not None and on_step(p.step, step_metrics):
                stop.request("on_step")
            self.ctx.agree_on_stop(stop)
            if stop.reason is not None and p.step < self.parts.total_steps:
                self.interrupt(stop.reason)
                return True
        return False

    def result(self, stop: StopRequest, *, interrupted: bool) -> RunResult:
        """What the run produced; the final model is exported unless it was interrupted."""
        output_dir = None if interrupted else self.export()
        return RunResult(
            run_dir=self.run_dir,
            output_dir=output_dir,
            global_step=self.position.step,
            train_metrics=self.train_metrics,
            eval_metrics=self.eval_metrics,
            interrupted=interrupted,
            stop_reason=stop.reason if interrupted else None,
            last_checkpoint=self.last_checkpoint,
        )

    def use_train_split(self, split: Split, *, keep_position: bool = False) -> None:
        """Train on ``split`` from now on (an online round's pairs), keeping the policy, optimizer and
        schedule; the data position restarts at its first micro-batch unless ``keep_position`` (a resume
        inside the round it belongs to)."""
        if self.parts.layout != "padded":
            split.length_kind = "block"
        self.train_split = split
        self._batches = (-1, [])
        if not keep_position:
            self.position.epoch = self.position.batch_in_epoch = 0

    def train_step(self) -> tuple[MetricSums, float, float]:
        """One optimizer step over the next ``grad_accumulation`` micro-batches of this epoch."""
        p, o = self.position, self.cfg.optim
        batches = self.epoch_batches(p.epoch)
        micro_batches = batches[p.batch_in_epoch : p.batch_in_epoch + o.grad_accumulation]

        def check_loss(value: float, index: int) -> None:
            if not math.isfinite(value):
                raise self.non_finite("the loss", value, f"epoch {p.epoch}, micro-batch {p.batch_in_epoch + index}")

        self.parts.optimizer.zero_grad(set_to_none=True)
        step_sums, grad_norm = steps.train_step(
            self.parts.runner,
            micro_batches,
            self.train_split,
            self.parts.collate,
            self.parts.train_reference,
            self.parts.objective,
            max_grad_norm=o.max_grad_norm if o.max_grad_norm is not None else math.inf,
            check_loss=check_loss,
        )
        if not math.isfinite(grad_norm):
            raise self.non_finite("the gradient norm", grad_norm, f"epoch {p.epoch}")
        learning_rate = float(self.parts.scheduler.get_last_lr()[0])
        self.parts.optimizer.step()
        self.parts.scheduler.step()
        p.step += 1
        p.batch_in_epoch += len(micro_batches)
        if p.batch_in_epoch >= len(batches):
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        return step_sums, grad_norm, learning_rate

    def record_step(self, step_sums: MetricSums, grad_norm: float, learning_rate: float) -> dict[str, float]:
        """Add a step's metrics to the logging window; log it every ``logging.log_every`` steps."""
        p = self.position
        p.window.merge(step_sums)
        p.window.add("grad_norm", grad_norm, 1)
        p.window.add("lr", learning_rate, 1)
        step_metrics = step_sums.averages()
        self.bar.update(1)
        self.bar.set_metrics(step_metrics)
        if p.step % self.cfg.logging.log_every == 0 or p.step == self.parts.total_steps:
            epoch_fraction = p.batch_in_epoch / len(self.epoch_batches(p.epoch))
            self.train_metrics = {**p.window.logged(), "epoch": p.epoch + epoch_fraction}
            self.tracker.log(p.step, self.train_metrics, split="train")
            p.window = MetricSums()
        return step_metrics

    def finish(self) -> None:
        """At the planned end: a last evaluation and checkpoint unless this step already had them."""
        if self.eval_split is not None and self.last_eval_step != self.position.step:
            self.evaluate()
        if self.cfg.checkpoint.every_steps and self.last_saved_step != self.position.step and self.position.step > 0:
            self.checkpoint()

    def interrupt(self, reason: str) -> None:
        """Stopped early: save a checkpoint (unless this step has one) and say how to continue."""
        if self.last_saved_step != self.position.step:
            self.checkpoint()
        self.bar.write(
            f"stopped by {reason} at step {self.position.step}; checkpoint {self.last_checkpoint} (continue with --resume latest)"
        )

    # -- evaluation, checkpoints, export ------------------------------------------------------------

    def evaluation_at_this_step(self) -> dict[str, float]:
        """The held-out metrics at the current step: evaluated now unless this step already was ({} with
        no held-out data)."""
        if self.eval_split is None:
            return {}
        return self.evaluate() if self.last_eval_step != self.position.step else self.eval_metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and reward metrics (and samples, when asked); tracks the best evaluation."""
        cfg, p = self.cfg, self.position
        assert self.eval_split is not None
        # Evaluation must not move the training RNG streams (a resumed run evaluates at other times).
        device = self.ctx.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            metrics = steps.evaluate(
                self.parts.runner,
                self.eval_split,
                self.parts.eval_reference,
                self.parts.objective,
                self.parts.collate,
                batch_size=cfg.eval.batch_size,
            ).metrics
            if cfg.eval.sample_prompts and self.ctx.is_main and self.ctx.holds_whole_model:
                self.write_samples()
        self.tracker.log(p.step, metrics, split="eval")
        if not p.best_eval or metrics.get("loss", math.inf) < p.best_eval.get("loss", math.inf):
            p.best_eval = {"step": p.step, **metrics}
        self.last_eval_step = p.step
        self.eval_metrics = metrics
        return metrics

    def write_samples(self) -> None:
        """Greedy samples of the policy and the reference for the first eval prompts, to samples.jsonl."""
        from dpokit.generation import policy_and_reference_samples

        assert self.eval_split is not None
        cfg = self.cfg.eval
        items = self.eval_split.items(range(min(cfg.sample_prompts, len(self.eval_split))))
        samples = policy_and_reference_samples(
            self.parts.runner.model,
            self.parts.eval_reference,
            self.parts.tokenizer,
            [list(item["prompt_ids"]) for item in items],
            max_new_tokens=cfg.max_new_tokens,
            images=[list(item.get("images") or []) for item in items] if self.parts.processor is not None else None,
            image_processor=getattr(self.parts.processor, "image_processor", None),
        )
        with open(self.paths.samples, "a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": self.position.step, **sample}) + "\n")

    def checkpoint(self) -> Path:
        p = self.position
        state = {
            "global_step": p.step,
            "epoch": p.epoch,
            "batch_in_epoch": p.batch_in_epoch,
            "total_steps": self.parts.total_steps,
            "pending_metrics": p.window.state(),
            "best_eval": p.best_eval,
            "invariants": self.parts.invariants,
            "reference_strategy": self.parts.reference_strategy,
            "config": config_to_dict(self.cfg),
            **self.extra_state,
        }
        self.last_checkpoint = save_checkpoint(
            self.run_dir,
            p.step,
            model=self.parts.runner.model,
            optimizer=self.parts.optimizer,
            scheduler=self.parts.scheduler,
            trainer_state=state,
            tokenizer=self.parts.processor or self.parts.tokenizer,
            keep_last=self.cfg.checkpoint.keep_last,
            ctx=self.ctx,
        )
        self.last_saved_step = p.step
        return self.last_checkpoint

    def export(self) -> Path:
        """The trained model for ``from_pretrained``, with the run's config beside it (``dpokit eval`` /
        ``dpokit score`` read it to find the reference and beta, wherever output_dir is)."""
        output_dir = Path(self.cfg.output_dir) if self.cfg.output_dir else self.paths.final
        summary = RunSummary(
            self.cfg,
            repr(self.parts.objective),
            self.position.step,
            len(self.train_split),
            len(self.eval_split) if self.eval_split is not None else None,
            self.ctx.world_size,
            self.train_metrics,
            self.eval_metrics,
            online=self.data_source is not None,
            reference=self.parts.reference_strategy,
        )
        saved = self.parts.processor or self.parts.tokenizer  # a processor saves its tokenizer and image processor
        export_final_model(self.ctx, self.parts.runner.model, saved, output_dir, self.cfg.model, summary=summary)
        if self.ctx.is_main and output_dir.is_dir():
            save_config(self.cfg, RunPaths(output_dir).config)
        return output_dir

    def non_finite(self, what: str, value: float, where: str) -> TrainingError:
        kept = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint had been written yet"
        )
        return TrainingError(
            f"{what} is {value} at optimizer step {self.position.step + 1} ({where}); training stopped and {kept}. "
            "Try a lower optim.lr, gradient clipping (optim.max_grad_norm), model.dtype=float32 or bfloat16 "
            "instead of float16, and check the data around that step."
        )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global micro-batches of ``epoch`` (cached: the order is a pure function of seed and epoch)."""
        if self._batches[0] != epoch:
            self._batches = (
                epoch,
                epoch_batches(self.train_split, batch_size=self.parts.micro_examples, seed=self.cfg.optim.seed, epoch=epoch),
            )
        return self._batches[1]

    # -- set-up -------------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """A line for the person at the terminal (when the progress bar is on), else a log record; rank 0 only."""
        if not self.ctx.is_main:
            return
        if self.cfg.logging.progress_bar:
            print(message, file=sys.stderr, flush=True)
        else:
            logger.info(message)

    def warn(self, message: str) -> None:
        """A warning before training, rank 0 only: on stderr beside the progress bar, else a warning record
        (which reaches stderr even where logging is not configured)."""
        if not self.ctx.is_main:
            return
        if self.cfg.logging.progress_bar:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            logger.warning(message)

    def setup(self) -> tuple[Split, Split | None, Components]:
        """Model, data, objective, layout, reference, wrapping, optimizer and schedule, built once: the
        training and held-out data and the run's :class:`Components`."""
        from dpokit.data import make_collator
        from dpokit.training.layout import plan_layout

        cfg = self.cfg
        seed_everything(cfg.optim.seed)
        policy, tokenizer, processor, objective, train, held_out = self.load()
        layout, layout_why = plan_layout(
            cfg.data.layout, policy, self.layout_batches(train) if cfg.data.layout == "auto" else None
        )
        collate = make_collator(
            layout,
            tokenizer.pad_token_id,
            pack_tokens=cfg.data.pack_tokens if layout == "packed" else None,
            image_processor=getattr(processor, "image_processor", None),
        )
        if layout != "padded":  # group batches by the length of a whole [prompt | responses] block
            train.length_kind = "block"
        strategy, why = plan_reference(
            cfg.reference.strategy,
            needs_reference=objective.needs_reference,
            lora=cfg.model.lora.enabled,
            mismatched_pairs=objective.needs_kl,
            workload=self.reference_workload(policy, train, held_out),
        )
        self.say(
            f"objective {objective!r}; {len(train)} training examples"
            + (f", {len(held_out)} held out" if held_out is not None else "")
            + f"; layout: {layout} ({layout_why}); reference: {strategy} ({why})"
        )
        datasets = [s.dataset for s in (train, held_out) if s is not None]
        runner, train_reference, eval_reference = self.wrap_policy(policy, strategy, layout, collate, datasets)
        optimizer, scheduler, total_steps, micro_examples = self.plan_optimizer(runner, train)
        parts = Components(
            tokenizer=tokenizer,
            processor=processor,
            objective=objective,
            layout=layout,
            collate=collate,
            reference_strategy=strategy,
            runner=runner,
            train_reference=train_reference,
            eval_reference=eval_reference,
            optimizer=optimizer,
            scheduler=scheduler,
            total_steps=total_steps,
            micro_examples=micro_examples,
            invariants=invariants(
                cfg,
                num_train=len(train),
                micro_batch_examples=micro_examples,
                data_fingerprint=getattr(train.dataset, "fingerprint", None),
                weights_fingerprint=weights_fingerprint(cfg.model.name_or_path),
            ),
        )
        return train, held_out, parts

    def load(self) -> tuple[torch.nn.Module, Any, Any, Objective, Split, Split | None]:
        """The policy, its tokenizer and processor, the objective and the (training, held-out) data."""
        from dpokit.losses import build_objective

        cfg, ctx = self.cfg, self.ctx
        with self.clock.phase("model"):
            policy, tokenizer = load_model_and_tokenizer(cfg.model, device=ctx.device)
            processor = load_processor(cfg.model)  # a vision-language policy's (None for a causal LM)
            if processor is not None:  # the tokenizer that writes the processor's image tokens
                tokenizer = processor.tokenizer
        objective = build_objective(cfg.loss.terms, beta=cfg.loss.beta, reference_free=cfg.loss.reference_free)
        with ctx.main_first(), self.clock.phase("data"):  # one rank fills the tokenized-data cache
            if self.data_source is not None:
                train, held_out = self.data_source(tokenizer, objective.unpaired)
            else:
                train, held_out = load_data(
                    cfg, tokenizer, say=self.say, unpaired=objective.unpaired, run_dir=self.run_dir, processor=processor
                )
        return policy, tokenizer, processor, objective, train, held_out

    def layout_batches(self, train: Split) -> dict[str, list[list[dict[str, Any]]]] | None:
        """Epoch 0's micro-batches of training items as each layout's length grouping makes them, for
        ``data.layout: auto`` to estimate their cost (None before there is training data: an online
        run starts with none)."""
        if len(train) == 0 or not hasattr(train.dataset, "lengths"):
            return None
        micro = self.cfg.optim.batch_size * self.ctx.data_ranks
        batches = {}
        for layout, kind in (("padded", "row"), ("shared_prompt", "block")):
            split = replace(train, length_kind=kind)
            positions = epoch_batches(split, batch_size=micro, seed=self.cfg.optim.seed, epoch=0)
            batches[layout] = [split.items(batch) for batch in positions]
        return batches

    def reference_workload(self, policy: torch.nn.Module, train: Split, held_out: Split | None) -> ReferenceWorkload:
        """The examples a precomputed pass and a live reference would forward in this run, and whether a
        copy of ``policy`` fits, for ``reference.strategy: auto``."""
        cfg, o = self.cfg, self.cfg.optim
        micro = o.batch_size * self.ctx.data_ranks
        steps = planned_steps(o, num_examples=len(train), micro_examples=micro)
        datasets = {id(s.dataset): len(s.dataset.items) for s in (train, held_out) if s is not None}
        evaluations = (steps // cfg.eval.every_steps if cfg.eval.every_steps else 0) + 1 if held_out is not None else 0
        live = steps * micro * o.grad_accumulation + evaluations * (len(held_out) if held_out is not None else 0)
        tensors = [*policy.parameters(), *policy.buffers()]
        return ReferenceWorkload(
            precomputed_examples=sum(datasets.values()),
            live_examples=live,
            copy_bytes=sum(t.numel() * t.element_size() for t in tensors),
            free_bytes=available_memory(self.ctx.device),
            samples_reference=held_out is not None and cfg.eval.sample_prompts > 0,
        )

    def report_startup(self) -> None:
        """After the first optimizer step: where the seconds before it went, in one line and startup.json."""
        self.clock.remainder("first_step")  # the metrics tracker, the first batches and the step itself
        self.say(self.clock.summary())
        if self.ctx.is_main:
            with contextlib.suppress(OSError):
                self.clock.write(self.run_dir, reference_strategy=self.parts.reference_strategy)

    def wrap_policy(
        self, policy: torch.nn.Module, reference_strategy: str, layout: str, collate: BatchLayout, datasets: list[Any]
    ) -> tuple[ParallelPolicy, Reference, Reference]:
        """The references (fixed from the initial weights, before LoRA and any resumed weights), then
        gradient checkpointing, LoRA and compilation, then the DDP / FSDP2 wrapping: (the wrapped policy,
        the training reference, the held-out reference)."""
        cfg = self.cfg
        with self.clock.phase("reference"):
            references = build_references(reference_strategy, cfg, self.ctx, policy, datasets, collate)
        for reference in dict.fromkeys(references):
            if isinstance(reference, PrecomputedReference) and reference.path is not None:
                how = "reused from" if reference.from_cache else "computed and cached in"
                self.say(f"reference log-probs {how} {reference.path}")
        every_block = checkpointing_mode(cfg.model) == "on"
        if every_block:
            enable_gradient_checkpointing(policy)
        if cfg.model.lora.enabled:
            policy = apply_lora(
                policy, cfg.model.lora, gradient_checkpointing=every_block, vision_scope=cfg.model.vision.lora_modules
            )
        d = cfg.data
        _blocks, lines = apply_checkpointing_plan(
            policy,
            cfg.model,
            layout=layout,
            shape=micro_batch_shape(layout, cfg.optim.batch_size, d.max_length, d.pack_tokens),
            optimizer=cfg.optim.optimizer,
            chunk_size=cfg.optim.logps_chunk_size,
            free_bytes=available_memory(self.ctx.device),
        )
        for line in lines:
            self.say(line)
        if cfg.model.compile:
            from dpokit.training.speed import compile_decoder_layers

            compile_decoder_layers(policy, cache_dir=Path(cfg.data.cache_dir) / "compile")
        runner = ParallelPolicy(self.ctx, policy, chunk_size=cfg.optim.logps_chunk_size)
        # build_references leaves None only for adapter_disabled, made here from the wrapped policy.
        resolved: list[Reference] = (
            [AdapterDisabledReference(runner) for _ in references]
            if reference_strategy == "adapter_disabled"
            else [r for r in references if r is not None]
        )
        return runner, resolved[0], resolved[-1]

    def plan_optimizer(
        self, runner: ParallelPolicy, train: Split
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int, int]:
        """Optimizer over the (possibly sharded) trainable parameters, the schedule, the length of the run
        in optimizer steps and the examples per micro-batch (batch_size x processes: each rank gets a slice)."""
        o = self.cfg.optim
        micro_examples = o.batch_size * self.ctx.data_ranks
        plan = plan_steps(o, num_examples=len(train), micro_examples=micro_examples)
        for line in plan.notes:
            self.say(line)
        for line in plan.warnings:
            self.warn(line)
        optimizer = build_optimizer(o, [p for p in runner.model.parameters() if p.requires_grad])
        scheduler = build_scheduler(optimizer, o, plan.total_steps, plan.warmup_steps)
        return optimizer, scheduler, plan.total_steps, micro_examples

    def restore(self, checkpoint: Path) -> None:
        """Weights, optimizer, scheduler, RNG and data position from ``checkpoint``."""
        state = load_checkpoint(
            checkpoint,
            model=self.parts.runner.model,
            optimizer=self.parts.optimizer,
            scheduler=self.parts.scheduler,
            ctx=self.ctx,
        )
        applied = check_resume_compatible(state, self.cfg, self.parts.invariants)
        self.restored_state = state
        self.position = Position(
            state["global_step"],
            state["epoch"],
            state["batch_in_epoch"],
            MetricSums(state.get("pending_metrics")),
            state.get("best_eval", {}),
        )
        self.last_checkpoint = checkpoint
        p = self.position
        self.say(f"resumed from {checkpoint} at step {p.step} (epoch {p.epoch}, micro-batch {p.batch_in_epoch})")
        if applied:
            self.say("changed settings applied from now on: " + "; ".join(applied))
        if self.ctx.is_main:
            for abandoned in self.run_directory.continue_from(p.step):
                self.say(f"a checkpoint after step {p.step} belongs to the abandoned branch; moved to {abandoned}")

    @contextlib.contextmanager
    def reporting(self) -> Any:
        """The metrics tracker (metrics.jsonl, TensorBoard, W&B) and the progress bar, open for the loop;
        the curves are plotted when it ends, whatever the outcome."""
        from dpokit.training.plots import plot_training_curves
        from dpokit.training.tracking import MetricsTracker, progress_bar

        cfg, is_main = self.cfg, self.ctx.is_main
        self.tracker = MetricsTracker(
            self.run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            config_dict=config_to_dict(cfg),
            enabled=is_main,
        )
        self.bar = progress_bar(
            self.parts.total_steps,
            initial=self.position.step,
            enabled=cfg.logging.progress_bar and is_main,
            line_every=cfg.logging.log_every,
        )  # off a terminal: one line per log
        try:
            yield
        finally:
            self.bar.close()
            self.tracker.close()
            if cfg.logging.plot and is_main and self.paths.metrics.is_file():
                with contextlib.suppress(Exception):  # a plot must never hide the run's own outcome
                    plot_training_curves(self.paths.metrics, self.paths.curves)
