"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dpokit.config import OptimConfig
from dpokit.errors import ConfigError


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


def build_optimizer(o: OptimConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (fused where the parameters allow) or RMSprop (the paper's) over ``parameters``."""
    if not parameters:
        raise ConfigError("the policy has no trainable parameters")
    if o.optimizer == "adamw":
        # The fused kernel (one pass per tensor) is ~5x faster than the per-op loop on CPU as well as GPU.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
        return torch.optim.AdamW(
            parameters, lr=o.lr, betas=(o.adam_betas[0], o.adam_betas[1]), eps=o.eps, weight_decay=o.weight_decay, fused=fused
        )
    if o.optimizer == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay)
    raise ConfigError(f"optim.optimizer must be adamw or rmsprop, got {o.optimizer!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, o: OptimConfig, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + constant/cosine/linear schedule of :func:`lr_factor`, stepped once per optimizer step
    (``warmup_steps`` as :func:`plan_steps` fitted it to the run)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio
        ),
    )


WARMUP_CAP = 0.1  # optim.warmup_steps never takes more than this fraction of the planned steps


@dataclass(frozen=True)
class StepPlan:
    """How long a run is and how it warms up, with what the person starting it should know.

    ``notes``: how the plan departs from the config as written (a shortened warm-up);
    ``warnings``: where the plan cannot do what the config seems to ask (less data than one step).
    """

    total_steps: int
    warmup_steps: int
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def planned_steps(o: OptimConfig, *, num_examples: int, micro_examples: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` x ceil(micro-batches per epoch /
    grad_accumulation) -- an epoch's last step takes what is left, so a step never spans two epochs."""
    batches_per_epoch = math.ceil(num_examples / micro_examples)
    return o.max_steps or o.epochs * math.ceil(batches_per_epoch / o.grad_accumulation)


def plan_steps(o: OptimConfig, *, num_examples: int, micro_examples: int) -> StepPlan:
    """The run's :class:`StepPlan` for ``num_examples`` training examples drawn ``micro_examples`` at a time
    (batch_size x processes).

    Warm-up: ``round(warmup_ratio * total)`` when ``warmup_ratio`` is set, else ``warmup_steps`` capped
    at ``floor(WARMUP_CAP * total)``. Worked example: 40 pairs, batch 8 x 8 = 64 per step, 1 epoch:
    total = ceil(ceil(40 / 8) / 8) = 1 step; warm-up 150 is capped at floor(0.1 * 1) = 0, so the one
    step runs at the peak lr (uncapped it would run at lr / 151), and a warning says the epoch is
    shorter than one step. The paper's recipe (150 warm-up steps) is untouched from 1,500 steps on.
    """
    total = planned_steps(o, num_examples=num_examples, micro_examples=micro_examples)
    notes: list[str] = []
    if o.warmup_ratio is not None:
        warmup = round(o.warmup_ratio * total)
    else:
        warmup = min(o.warmup_steps, math.floor(WARMUP_CAP * total))
        if warmup < o.warmup_steps:
            notes.append(
                f"warm-up: {warmup} of the {total} planned optimizer steps (optim.warmup_steps={o.warmup_steps} is capped "
                f"at {WARMUP_CAP:.0%} of the run; set optim.warmup_ratio to choose the fraction)"
            )
    warnings: list[str] = []
    step_examples = micro_examples * o.grad_accumulation
    if num_examples > 0 and step_examples > num_examples:
        per_epoch = math.ceil(num_examples / micro_examples)
        what = (
            f"optim.batch_size ({micro_examples} examples per micro-batch) is larger than the {num_examples} training examples"
            if micro_examples > num_examples
            else f"an epoch ({num_examples} examples, {per_epoch} micro-batches) is shorter than one optimizer step "
            f"({o.batch_size} x {o.grad_accumulation} accumulated = {step_examples} examples)"
        )
        warnings.append(
            f"{what}: each epoch is a single optimizer step on {num_examples} examples, {total} step(s) in all; "
            "for more steps lower optim.grad_accumulation or optim.batch_size, or raise optim.epochs"
        )
    if num_examples > 0 and total < 10 and not warnings:
        warnings.append(
            f"only {total} optimizer step(s) planned ({num_examples} examples, {step_examples} per step, "
            f"{o.epochs} epoch(s)); raise optim.epochs or lower the batch for a run that can move the model"
        )
    return StepPlan(total_steps=total, warmup_steps=warmup, notes=tuple(notes), warnings=tuple(warnings))
