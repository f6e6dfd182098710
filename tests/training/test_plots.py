"""plot_training_curves draws a real PNG from metrics.jsonl, with or without every metric logged."""

from __future__ import annotations

import matplotlib.image

from dpokit.training.plots import plot_training_curves
from dpokit.training.tracking import MetricsTracker


def _write_dpo_run(run_dir, steps=20):
    with MetricsTracker(run_dir, tensorboard=False) as tracker:
        for step in range(1, steps + 1):
            progress = step / steps
            tracker.log(
                step,
                {
                    "loss": 0.69 - 0.4 * progress,
                    "rewards/accuracies": 0.5 + 0.4 * progress,
                    "rewards/margins": 1.5 * progress,
                    "rewards/chosen": 0.5 * progress,
                    "rewards/rejected": -1.0 * progress,
                },
            )
            if step % 5 == 0:
                tracker.log(step, {"loss": 0.7 - 0.3 * progress, "rewards/accuracies": 0.5 + 0.3 * progress}, split="eval")


def test_plot_is_a_readable_png_of_useful_size(tmp_path):
    _write_dpo_run(tmp_path)
    out = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(out)
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 600
    # Not a blank canvas: curves, axes and text give many distinct colours.
    assert pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0.05


def test_plot_of_a_run_without_reward_metrics_still_renders(tmp_path):
    """An SFT run logs only the loss; the reward panels say 'not logged' instead of failing."""
    with MetricsTracker(tmp_path, tensorboard=False) as tracker:
        for step in range(1, 6):
            tracker.log(step, {"loss": 2.0 / step})
    out = plot_training_curves(tmp_path, tmp_path / "plots" / "curves.png")
    assert matplotlib.image.imread(out).shape[0] > 100


def test_plot_of_an_empty_metrics_file_renders_placeholders(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    out = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert out.stat().st_size > 1000
