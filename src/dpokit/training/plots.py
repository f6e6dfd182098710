"""Training curves as a PNG: loss, reward accuracy, reward margin, chosen/rejected rewards.

Reads the run's ``metrics.jsonl`` (see :mod:`dpokit.training.tracking`) and draws one panel per quantity,
train as a line and eval as markers joined by a dashed line. A metric the run did not log (an SFT
run has no rewards) leaves its panel with a "not logged" note instead of failing. Steps are whole
numbers on the x axis. An accuracy carries the number of examples behind it (``rewards/accuracies_n``,
logged beside it): its legend entry gives its last value and that count, ``eval: 0.75 (n=8)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from dpokit.training.metrics import COUNTED_METRICS
from dpokit.training.tracking import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (panel title, [(metric name, label suffix)], y-axis label). Chosen and rejected share a panel so the
# gap between them -- the margin DPO widens -- is visible directly.
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    ("Loss", (("loss", ""),), "loss"),
    ("Reward accuracy", (("rewards/accuracies", ""),), "fraction r(chosen) > r(rejected)"),
    ("Reward margin", (("rewards/margins", ""),), "r(chosen) - r(rejected)"),
    ("Implicit rewards", (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")), "beta * log-ratio"),
)

SPLIT_STYLES: dict[str, dict[str, Any]] = {
    "train": {"linestyle": "-", "marker": None, "alpha": 0.9},
    "eval": {"linestyle": "--", "marker": "o", "markersize": 4, "alpha": 0.9},
}


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(records: list[dict[str, Any]], split: str, metric: str) -> tuple[list[int], list[float], list[int]]:
    """Steps, values and example counts (``<metric>_n``; empty when not logged) of ``metric`` in ``split``."""
    steps, values, counts = [], [], []
    for record in records:
        value = record.get(metric)
        if record.get("split") == split and _number(value):
            steps.append(int(record["step"]))
            values.append(float(value))
            if _number(record.get(f"{metric}_n")):
                counts.append(int(record[f"{metric}_n"]))
    return steps, values, counts


def count_label(counts: Sequence[int]) -> str:
    """``n=8`` for a series whose points all stand on 8 examples, ``n=8-16`` when they vary; ``""`` if unknown.

    >>> count_label([8, 8]), count_label([16, 8, 12]), count_label([])
    ('n=8', 'n=8-16', '')
    """
    if not counts:
        return ""
    low, high = min(counts), max(counts)
    return f"n={low}" if low == high else f"n={low}-{high}"


def last_value_label(name: str, value: float, count: int | None) -> str:
    """A fraction's legend entry: its name, last value and the examples behind that value.

    >>> last_value_label("eval", 0.8125, 8), last_value_label("train", 0.5, None)
    ('eval: 0.81 (n=8)', 'train: 0.50')
    """
    return f"{name}: {value:.2f}" + (f" (n={count})" if count is not None else "")


def label_panel(axis: Any, title: str, x_label: str, y_label: str, *, drawn: bool, missing: str = "not logged") -> None:
    """Title, axis labels and grid of one panel of a metrics figure, whose x axis counts steps or rounds
    (whole-number ticks); its legend when something was drawn on it, else the ``missing`` note in its middle."""
    from matplotlib.ticker import MaxNLocator

    axis.set_title(title)
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(True, alpha=0.3)
    if drawn:
        axis.legend(fontsize="small")
    else:
        axis.text(0.5, 0.5, missing, ha="center", va="center", transform=axis.transAxes, color="gray")


def curves_figure(records: list[dict[str, Any]], title: str) -> Figure:
    """The training-curves figure of metric ``records`` (as :func:`~dpokit.training.tracking.read_metrics`
    returns them): loss; rewards/accuracies; rewards/margins; rewards/chosen and rewards/rejected. Each
    panel has the train series (solid) and the eval series (dashed, dots) when logged."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7.5))
    axes = figure.subplots(2, 2)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (panel_title, metrics, y_label) in zip(axes.flat, PANELS, strict=True):
        drawn = 0
        for metric_index, (metric, suffix) in enumerate(metrics):
            color = colors[metric_index % len(colors)]
            for split, style in SPLIT_STYLES.items():
                steps, values, counts = _series(records, split, metric)
                if not steps:
                    continue
                label = " ".join(part for part in (suffix, split) if part)
                if metric in COUNTED_METRICS:
                    label = last_value_label(label, values[-1], counts[-1] if counts else None)
                axis.plot(steps, values, color=color, label=label, **style)
                drawn += 1
        names = ", ".join(metric for metric, _ in metrics)
        label_panel(axis, panel_title, "optimizer step", y_label, drawn=drawn > 0, missing=f"{names}\nnot logged")
        if panel_title == "Reward accuracy" and drawn:
            axis.set_ylim(-0.02, 1.02)
            axis.legend(fontsize="small", loc="lower right")  # accuracy climbs towards 1: keep the top clear
            axis.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
        if panel_title in ("Reward margin", "Implicit rewards") and drawn:
            axis.axhline(0.0, color="gray", linewidth=0.8, linestyle=":")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Draw the training curves (:func:`curves_figure`) of ``metrics_jsonl`` (or a run directory) into
    ``out_png``; return its path."""
    records = read_metrics(metrics_jsonl)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    source = Path(metrics_jsonl)
    run_name = source.name if source.is_dir() else source.parent.name
    curves_figure(records, title or f"Training curves: {run_name}").savefig(out_png, dpi=100)
    return out_png
