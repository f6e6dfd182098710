"""One optimizer step and one evaluation pass, for any number of processes.

Both work on *global* micro-batches (positions into a split) and take this rank's slice of each
(:meth:`ParallelContext.rank_slice`; all of it in a world of one). A rank whose slice is empty (a
last micro-batch smaller than the world) runs a stand-in example with loss weight 0, since the
collectives inside DDP/FSDP need every rank, and adds nothing to the metrics.

Objectives with a KL reference point (KTO; ``objective.needs_kl``) get a second, mismatched batch:
global example j's prompt with the completion of global example j - 1 of the same micro-batch (TRL
pairs within each device's batch; pairing across the global micro-batch is what makes W processes
equal one). Its log-ratios are computed without gradient through the same log-prob path and layout,
summed over ranks, and their mean is the objective's ``kl`` (clamped at zero by the loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpokit.data.batch import Batch
from dpokit.data.collate import mismatched_items
from dpokit.training.metrics import MetricSums, StepMetrics
from dpokit.training.parallel import ParallelPolicy
from dpokit.training.reference import Reference

Collate = Callable[[list[dict[str, Any]]], Batch]


def rotated(positions: Sequence[int]) -> list[int]:
    """Each position's partner in a mismatched pair: the previous one (the first takes the last)."""
    return [positions[-1], *positions[:-1]] if positions else []


def collate_examples(collate: Collate, split: Any, positions: Sequence[int], partners: Sequence[int], objective: Any) -> Batch:
    """The batch of ``positions``; with ``objective.needs_kl`` also its mismatched batch (each
    position's prompt with the responses of the same-index position of ``partners``)."""
    items = split.items(list(positions))
    batch = collate(items)
    if objective.needs_kl:
        batch.mismatched = collate(mismatched_items(items, split.items(list(partners))))
    return batch


def kl_reference_point(policy: ParallelPolicy, reference: Reference, mismatched: Batch, *, counted: bool) -> torch.Tensor:
    """KTO's reference point before the clamp: the mean of policy - reference log-probs over the
    mismatched pairs of every rank (no gradient; a rank whose slice is a stand-in counts nothing)."""
    with torch.no_grad():
        policy_logps = policy.logps(mismatched).logps
        reference_logps = reference.logps(mismatched)
        if reference_logps is None:
            raise TypeError("the KL reference point needs a reference model")
        logratios = (policy_logps.double() - reference_logps.double())[mismatched.response_mask]
        local = torch.stack([logratios.sum(), torch.tensor(float(logratios.numel()), dtype=torch.float64)]) * float(counted)
    total, count = policy.ctx.all_reduce_sum(local.tolist())
    return torch.tensor(total / max(count, 1.0), dtype=torch.float64, device=policy_logps.device)


def forward_batch(policy: ParallelPolicy, batch: Batch, reference: Reference, objective: Any, *, counted: bool = True) -> Any:
    """Reference log-probs (no grad), the KL reference point when the batch has a mismatched batch,
    policy log-probs (one forward for all K responses), objective output. ``counted``: False on a
    stand-in batch (its KL pairs add nothing)."""
    from dpokit.losses import LossInputs

    reference_logps = reference.logps(batch) if objective.needs_reference else None
    kl = None
    if batch.mismatched is not None:
        kl = kl_reference_point(policy, reference, batch.mismatched, counted=counted)
    policy_out = policy.logps(batch)
    return objective(
        LossInputs(
            policy_logps=policy_out.logps,
            reference_logps=reference_logps,
            lengths=batch.response_lengths,
            response_mask=batch.response_mask,
            policy_token_logps=policy_out.token_logps,
            token_seq=batch.score_seq,
            labels=batch.desirable,
            kl=kl,
        )
    )


def train_step(
    policy: ParallelPolicy,
    micro_batches: Sequence[Sequence[int]],
    split: Any,
    collate: Collate,
    reference: Reference,
    objective: Any,
    *,
    max_grad_norm: float,
    check_loss: Callable[[float, int], None],
) -> tuple[MetricSums, float]:
    """Forward/backward this rank's slices of ``micro_batches`` (global micro-batches of positions
    into ``split``); return (metric sums over all ranks, global gradient norm before clipping).

    Rank r's slice of b_r examples has loss weight ``b_r * W / n_step`` (n_step: examples in the
    step, all ranks; W ranks). DDP/FSDP average gradients over ranks, so the step's gradient is
    exactly that of the mean loss over its examples -- with W = 1, ``b / n_step``, whatever the
    micro-batch sizes. Under sequence parallelism W still counts every rank: the C ranks of a group
    share one slice and their gradients add up to that slice's (see
    :mod:`dpokit.training.sequence_parallel`). ``check_loss`` sees every micro-batch loss before the
    optimizer may step.
    """
    ctx = policy.ctx
    step_examples = sum(len(m) for m in micro_batches)
    pending = StepMetrics()
    names: list[str] = ["loss"]
    for index, positions in enumerate(micro_batches):
        mine, partners = ctx.rank_slice(positions), ctx.rank_slice(rotated(positions))
        stand_in = list(positions[:1])
        batch = collate_examples(collate, split, mine or stand_in, partners or stand_in, objective).to(ctx.device)
        with policy.gradient_sync(index == len(micro_batches) - 1):
            out = forward_batch(policy, batch, reference, objective, counted=bool(mine))
            (out.loss * (len(mine) * ctx.world_size / step_examples)).backward()
        names = ["loss", *out.metrics]
        if mine:
            pending.add(index, out)
    local = pending.finish(check_loss)
    grad_norm = policy.clip_grad_norm_(max_grad_norm)
    return local.reduced(ctx, names), grad_norm


@dataclass
class EvalResult:
    """Means of the objective's metrics over every example, and (optionally) this rank's per-example values."""

    metrics: dict[str, float]
    num_examples: int
    per_example: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    policy: ParallelPolicy,
    split: Any,
    reference: Reference,
    objective: Any,
    collate: Collate,
    *,
    batch_size: int,
    keep_per_example: bool = False,
) -> EvalResult:
    """Loss and reward metrics over every example of ``split`` (eval mode, no grad).

    Each rank takes a contiguous shard, in order; every rank runs the same number of forwards (an
    exhausted rank runs a stand-in batch and discards it). Metrics are per-example (B,) tensors, so
    the means weight every example equally whatever the batch sizes and the number of ranks.
    ``keep_per_example`` keeps ``{"example_id", "loss", <metric>: value}`` records of this rank's shard.
    """
    ctx = policy.ctx
    shard = ctx.rank_slice(range(len(split)))
    per_rank = -(-len(split) // ctx.data_ranks)
    local = MetricSums()
    names: list[str] = ["loss"]
    records: list[dict[str, Any]] = []
    was_training = policy.module.training
    policy.train(False)
    try:
        with torch.no_grad():
            for start in range(0, per_rank, batch_size):
                mine = shard[start : start + batch_size]
                chosen = mine if mine else [0]
                batch = collate_examples(collate, split, chosen, rotated(chosen), objective).to(ctx.device)
                out = forward_batch(policy, batch, reference, objective, counted=bool(mine))
                columns = {"loss": out.per_example, **out.metrics}
                names = list(columns)
                if mine:
                    local.add_per_example(columns)
                    if keep_per_example:
                        records.extend(_per_example_records(batch, columns, mine))
    finally:
        policy.train(was_training)
    totals = local.reduced(ctx, names)
    return EvalResult(totals.logged(), len(split), records)


def _per_example_records(batch: Batch, columns: dict[str, torch.Tensor], positions: Sequence[int]) -> list[dict[str, Any]]:
    """One ``{"example_id", <column>: float or None}`` dict per example (non-finite values become None);
    the example id is the batch's ``example_id`` extra, else the example's position in the split."""
    ids = batch.extras.get("example_id")
    values = {
        name: tensor.detach().float().reshape(-1).cpu().tolist()
        for name, tensor in columns.items()
        if tensor.numel() == batch.batch_size
    }
    records = []
    for row in range(batch.batch_size):
        record: dict[str, Any] = {"example_id": int(ids[row]) if ids is not None else int(positions[row])}
        for name, column in values.items():
            record[name] = column[row] if math.isfinite(column[row]) else None
        records.append(record)
    return records
