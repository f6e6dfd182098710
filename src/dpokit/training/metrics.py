"""Metrics as exact (sum, count) pairs: accumulated per example, reduced over ranks, averaged for logs.

Averages are exact over uneven batches and over ranks because nothing is averaged until the end:
each metric is a running sum and a count of the examples that had a finite value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dpokit.training.parallel import ParallelContext

# Fractions logged with the number of examples behind them, as ``<name>_n``: an accuracy of 0.75 on
# 8 pairs is not one on 800.
COUNTED_METRICS = ("rewards/accuracies",)


class MetricSums:
    """Per-example metrics accumulated as (sum, count) until they are averaged for logging."""

    def __init__(self, state: dict[str, list[float]] | None = None) -> None:
        self.sums: dict[str, float] = {k: float(v[0]) for k, v in (state or {}).items()}
        self.counts: dict[str, float] = {k: float(v[1]) for k, v in (state or {}).items()}

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def merge(self, other: MetricSums) -> None:
        for name in other.sums:
            self.add(name, other.sums[name], other.counts[name])

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
        for name, total, count in zip(names, totals.tolist(), counts.tolist(), strict=True):
            self.add(name, total, count)

    def reduced(self, ctx: ParallelContext, names: Sequence[str]) -> MetricSums:
        """The sums and counts of ``names`` over all ranks (one all-reduce; every rank passes the same names;
        a sequence-parallel group's examples counted once)."""
        values = [self.sums.get(n, 0.0) for n in names] + [self.counts.get(n, 0.0) for n in names]
        totals = ctx.all_reduce_data_sum(values) if values else []
        merged = MetricSums()
        for i, name in enumerate(names):
            merged.add(name, totals[i], totals[len(names) + i])
        return merged

    def averages(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}

    def logged(self) -> dict[str, float]:
        """The averages, with ``<name>_n`` (how many examples it averages) beside each of :data:`COUNTED_METRICS`."""
        averages = self.averages()
        for name in COUNTED_METRICS:
            if name in averages:
                averages[f"{name}_n"] = round(self.counts[name])
        return averages

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
        for (index, _), value in zip(self.losses, torch.cat([loss for _, loss in self.losses]).tolist(), strict=True):
            check_loss(value, index)
        sums.add_per_example({name: torch.cat([m[name].reshape(-1) for m in self.per_example]) for name in self.per_example[0]})
        return sums
