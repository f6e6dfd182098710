"""Training curves as a PNG: loss, reward accuracy, reward margin, chosen/rejected rewards.

Reads the run's ``metrics.jsonl`` (see :mod:`dpokit.training.tracking`) and draws one panel per quantity,
train as a line and eval as markers joined by a dashed line. A metric the run did not log (an SFT
run has no rewards) leaves its panel with a "not logged" note instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpokit.training.tracking import read_metrics

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


def _series(records: list[dict[str, Any]], split: str, metric: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(metric)
        if record.get("split") == split and isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def label_panel(axis: Any, title: str, x_label: str, y_label: str, *, drawn: bool, missing: str = "not logged") -> None:
    """Title, axis labels and grid of one panel of a metrics figure; its legend when something was drawn
    on it, else the ``missing`` note in its middle."""
    axis.set_title(title)
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.grid(True, alpha=0.3)
    if drawn:
        axis.legend(fontsize="small")
    else:
        axis.text(0.5, 0.5, missing, ha="center", va="center", transform=axis.transAxes, color="gray")


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Draw the training curves of ``metrics_jsonl`` (or a run directory) into ``out_png``; return its path.

    Panels: loss; rewards/accuracies; rewards/margins; rewards/chosen and rewards/rejected. Each panel
    has the train series (solid) and the eval series (dashed, dots) when logged.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_jsonl)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)

    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (panel_title, metrics, y_label) in zip(axes.flat, PANELS, strict=True):
        drawn = 0
        for metric_index, (metric, suffix) in enumerate(metrics):
            color = colors[metric_index % len(colors)]
            for split, style in SPLIT_STYLES.items():
                steps, values = _series(records, split, metric)
                if not steps:
                    continue
                label = " ".join(part for part in (suffix, split) if part)
                axis.plot(steps, values, color=color, label=label, **style)
                drawn += 1
        names = ", ".join(metric for metric, _ in metrics)
        label_panel(axis, panel_title, "optimizer step", y_label, drawn=drawn > 0, missing=f"{names}\nnot logged")
        if panel_title == "Reward accuracy" and drawn:
            axis.set_ylim(-0.02, 1.02)
            axis.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
        if panel_title in ("Reward margin", "Implicit rewards") and drawn:
            axis.axhline(0.0, color="gray", linewidth=0.8, linestyle=":")
    source = Path(metrics_jsonl)
    run_name = source.name if source.is_dir() else source.parent.name
    figure.suptitle(title or f"Training curves: {run_name}")
    figure.tight_layout()
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png
