"""Per-round metrics of the online loop and the ``rounds.png`` plot.

From a round's files (so a resumed round reports what the original stages measured):

* ``judge/score_mean``, ``judge/score_std`` -- the judge's scores of the round's completions;
* ``kl`` -- the mean of ``log pi(y|x) - log pi_ref(y|x)`` over the round's samples (an unbiased estimate of
  the sequence-level KL(pi || pi_ref) of the policy that sampled them, the policy at the round's start);
  absent when the run has no reference model;
* ``completion/length_mean`` (tokens, stop token excluded) and ``completion/eos_rate`` (the fraction of
  completions that ended with a stop token rather than at ``max_new_tokens``): length exploitation
  shows as lengths growing and the EOS rate falling;
* ``distinct_1``, ``distinct_2`` -- unique word n-grams / all word n-grams over the round's completions;
* ``generation/tokens_per_s`` -- generated tokens per second of the generation stage (all processes);
* ``time/generation_s``, ``time/judging_s``, ``time/training_s`` -- where the round's time went;
* ``pairs``, ``pairs/dropped_*`` -- the training rows built and what pairing dropped (each reason of
  :data:`dpokit.online.pairs.DROP_REASONS`, 0 when none);
* ``heldout/...`` -- the trainer's evaluation on the held-out labelled pairs after the round's training
  (``heldout/rewards/accuracies`` is the held-out reward accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.training.tracking import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / total word n-grams over ``texts`` (0 when there are none).

    >>> distinct_n(["a b a b"], 1), distinct_n(["a b a b"], 2)
    (0.5, 0.6666666666666666)
    """
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def generation_metrics(completions: Sequence[dict[str, Any]], seconds: float) -> dict[str, float]:
    """Length, EOS rate, diversity, KL estimate and speed of one round's completion records."""
    tokens = [int(c["num_tokens"]) + (1 if c["stopped"] else 0) for c in completions]
    metrics = {
        "completion/length_mean": sum(int(c["num_tokens"]) for c in completions) / max(1, len(completions)),
        "completion/eos_rate": sum(1 for c in completions if c["stopped"]) / max(1, len(completions)),
        "distinct_1": distinct_n([c["completion"] for c in completions], 1),
        "distinct_2": distinct_n([c["completion"] for c in completions], 2),
        "generation/tokens": float(sum(tokens)),
        "generation/tokens_per_s": sum(tokens) / seconds if seconds > 0 else math.nan,
        "time/generation_s": seconds,
    }
    ratios = [c["policy_logp"] - c["reference_logp"] for c in completions if c.get("reference_logp") is not None]
    if ratios:
        metrics["kl"] = sum(ratios) / len(ratios)
    return metrics


def judge_metrics(scores: Sequence[float | None], seconds: float) -> dict[str, float]:
    finite = [float(s) for s in scores if s is not None and math.isfinite(s)]
    mean, std = _mean_std(finite)
    return {
        "judge/score_mean": mean,
        "judge/score_std": std,
        "judge/unscored": float(len(scores) - len(finite)),
        "time/judging_s": seconds,
    }


# (panel title, [(metric, label)], y label)
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    ("Judge score", (("judge/score_mean", "mean"),), "score (band: +/- std)"),
    ("KL to the reference", (("kl", "KL"),), "nats (sample estimate)"),
    ("Held-out reward accuracy", (("heldout/rewards/accuracies", "accuracy"),), "fraction"),
    ("Completion length", (("completion/length_mean", "mean length"),), "tokens"),
    (
        "EOS rate and diversity",
        (("completion/eos_rate", "EOS rate"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2")),
        "fraction (ended at EOS; unique / total n-grams)",
    ),
    (
        "Time per round",
        (("time/generation_s", "generation"), ("time/judging_s", "judging"), ("time/training_s", "training")),
        "seconds",
    ),
)


def rounds_figure(records: Sequence[dict[str, Any]], title: str) -> Figure:
    """The per-round panels (:data:`PANELS`) of round ``records``, by round (whole-number ticks); the held-out
    accuracy's legend entry gives its last value and number of pairs (``heldout/rewards/accuracies_n``)."""
    from matplotlib.figure import Figure

    from dpokit.training.plots import label_panel, last_value_label

    records = sorted(records, key=lambda r: r.get("round", 0))
    figure = Figure(figsize=(14, 7.5))
    for axis, (panel_title, metrics, y_label) in zip(figure.subplots(2, 3).flat, PANELS, strict=True):
        drawn = 0
        bottom = [0.0] * len(records)
        for metric, label in metrics:
            mine = [r for r in records if isinstance(r.get(metric), (int, float))]
            if not mine:
                continue
            xs, ys = [r["round"] for r in mine], [r[metric] for r in mine]
            if metric == "heldout/rewards/accuracies":
                count = mine[-1].get(f"{metric}_n")
                label = last_value_label(label, ys[-1], int(count) if isinstance(count, (int, float)) else None)
            if panel_title == "Time per round":  # stacked: the round's time split
                axis.bar(xs, ys, bottom=bottom[: len(ys)], label=label)
                bottom = [b + y for b, y in zip(bottom, ys, strict=False)]
            else:
                axis.plot(xs, ys, marker="o", label=label)
            if metric == "judge/score_mean":
                stds = [r.get("judge/score_std", 0.0) for r in mine]
                axis.fill_between(
                    xs, [y - s for y, s in zip(ys, stds, strict=True)], [y + s for y, s in zip(ys, stds, strict=True)], alpha=0.2
                )
            drawn += 1
        label_panel(axis, panel_title, "round", y_label, drawn=drawn > 0)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_rounds(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Draw the per-round records (``split == "round"``) of ``metrics_jsonl`` (:func:`rounds_figure`) into ``out_png``."""
    source = Path(metrics_jsonl)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    run_name = source.parent.name if source.is_file() else source.name
    rounds_figure(read_metrics(metrics_jsonl, split="round"), f"Online rounds: {run_name}").savefig(out_png, dpi=100)
    return out_png
