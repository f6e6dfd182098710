"""MetricsTracker writes the same numbers to metrics.jsonl and to real TensorBoard event files."""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import pty
import re
import struct
import termios

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpokit.errors import ConfigError, DataError
from dpokit.training.tracking import MetricsTracker, StartupClock, progress_bar, read_metrics


def _logged_run(run_dir):
    with MetricsTracker(run_dir, config_dict={"loss": {"beta": 0.1}}) as tracker:
        tracker.log(1, {"loss": 0.69, "rewards/accuracies": 0.5})
        tracker.log(2, {"loss": torch.tensor(0.5), "rewards/accuracies": 0.75, "rewards/margins": 0.2})
        tracker.log(2, {"loss": 0.6, "rewards/accuracies": 0.625}, split="eval")
    return run_dir


def test_log_appends_one_json_line_per_call_with_step_split_and_metrics(tmp_path):
    run_dir = _logged_run(tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["step"] == 1 and first["split"] == "train" and first["loss"] == pytest.approx(0.69)
    assert isinstance(first["time"], float)
    assert second["loss"] == pytest.approx(0.5)  # a 0-d tensor becomes a plain number
    assert third["split"] == "eval" and third["rewards/accuracies"] == 0.625
    assert read_metrics(run_dir, split="eval") == [third]


def test_tensorboard_event_files_hold_the_logged_scalars_under_split_prefixed_tags(tmp_path):
    run_dir = _logged_run(tmp_path / "run")
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/rewards/accuracies", "train/rewards/margins", "eval/loss"} <= tags
    train_loss = [(event.step, event.value) for event in accumulator.Scalars("train/loss")]
    assert train_loss == [(1, pytest.approx(0.69)), (2, pytest.approx(0.5))]
    assert [(e.step, e.value) for e in accumulator.Scalars("eval/rewards/accuracies")] == [(2, 0.625)]


def test_non_finite_values_are_written_as_null_and_strings_kept_out_of_tensorboard(tmp_path):
    with MetricsTracker(tmp_path, tensorboard=False) as tracker:
        record = tracker.log(3, {"loss": math.nan, "sample": "the movie was good"})
    assert record["loss"] is None
    assert read_metrics(tmp_path) == [record]
    assert not (tmp_path / "tensorboard").exists()


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = MetricsTracker(tmp_path / "rank1", enabled=False)
    tracker.log(1, {"loss": 1.0})
    tracker.close()
    assert not (tmp_path / "rank1").exists()


def test_resumed_tracker_appends_to_the_existing_file(tmp_path):
    with MetricsTracker(tmp_path, tensorboard=False) as tracker:
        tracker.log(1, {"loss": 1.0})
    with MetricsTracker(tmp_path, tensorboard=False) as tracker:
        tracker.log(2, {"loss": 0.9})
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2]


def test_wandb_requested_without_the_package_is_a_config_error_saying_how_to_install(tmp_path):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"pip install dpokit\[wandb\]"):
        MetricsTracker(tmp_path, wandb=True)


def test_read_metrics_names_file_and_line_of_a_corrupt_record_but_tolerates_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
    assert [record["step"] for record in read_metrics(path)] == [1]
    with pytest.raises(DataError, match="no metrics file"):
        read_metrics(tmp_path / "missing")


def _trained(bar, steps: int, *, metrics: bool = True) -> None:
    """What the trainer does each step: advance one step, then show that step's metrics."""
    for step in range(bar.n + 1, bar.n + steps + 1):
        bar.update(1)
        if metrics:
            bar.set_metrics({"loss": 1.0 / step, "rewards/accuracies": 0.5, "other": 3.0})
    bar.close()


def test_progress_bar_off_a_terminal_writes_one_plain_line_every_n_steps_with_eta_and_metrics():
    stream = io.StringIO()
    _trained(progress_bar(total=10, line_every=3, file=stream), 10)
    output = stream.getvalue()
    assert "\r" not in output
    lines = output.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "train: 3/10 (30%)",
        "train: 6/10 (60%)",
        "train: 9/10 (90%)",
        "train: 10/10 (100%)",
    ]
    assert re.fullmatch(r"train: 3/10 \(30%\), elapsed 00:00, ETA 00:00, loss=0\.3333, acc=0\.5", lines[0])
    assert lines[-1].endswith("loss=0.1, acc=0.5")  # each line carries its own step's metrics
    assert all("other" not in line for line in lines)


def test_plain_lines_of_a_resumed_run_fall_on_the_same_steps_as_the_metrics_log():
    stream = io.StringIO()
    bar = progress_bar(total=10, initial=4, line_every=3, file=stream)
    assert bar.n == 4
    _trained(bar, 6)
    assert [line.split(" ")[1].rstrip(",") for line in stream.getvalue().splitlines()] == ["6/10", "9/10", "10/10"]


def test_plain_lines_count_units_of_any_size_and_are_flushed_by_write_and_close():
    stream = io.StringIO()
    bar = progress_bar(total=7, desc="reference log-probs", file=stream)  # line_every=1: every update
    bar.update(3)
    bar.write("a message")
    bar.update(3)
    bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "reference log-probs: 3/7 (42%)",
        "a message",
        "reference log-probs: 6/7 (85%)",
        "reference log-probs: 7/7 (100%)",
    ]


def test_plain_lines_without_a_total_have_no_eta():
    stream = io.StringIO()
    _trained(progress_bar(total=None, line_every=2, file=stream), 2)
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("train: 2/?, elapsed ") and "ETA" not in line


def test_progress_bar_to_captured_stderr_is_plain_lines(capsys):
    bar = progress_bar(total=4, initial=1)
    bar.update(1)
    bar.set_metrics({"loss": 0.6412345, "rewards/accuracies": 0.625, "other": 3.0})
    bar.close()
    shown = capsys.readouterr().err
    assert shown.startswith("train: 2/4 (50%), elapsed ") and "ETA " in shown
    assert shown.endswith("loss=0.6412, acc=0.625\n") and "\r" not in shown


def test_progress_bar_on_a_terminal_redraws_in_place_with_eta_and_metrics():
    master, replica = pty.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with os.fdopen(replica, "w") as terminal:
        bar = progress_bar(total=4, initial=1, line_every=3, file=terminal)
        bar.update(1)
        bar.set_metrics({"loss": 0.6412345, "rewards/accuracies": 0.625})
        bar.close()
    shown = _read_all(master).decode()
    assert re.search("\r(?!\n)", shown)  # a carriage return that is not a newline: a redraw
    assert "2/4" in shown and "<" in shown  # elapsed<remaining: tqdm's ETA
    assert "loss=0.6412" in shown and "acc=0.625" in shown


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            if len(chunk) < 65536:
                break
    except OSError:  # EIO: the terminal side is closed and everything was read
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def test_line_every_must_be_positive():
    with pytest.raises(ValueError, match="line_every must be >= 1"):
        progress_bar(total=3, line_every=0, file=io.StringIO())


def test_disabled_progress_bar_prints_nothing(capsys):
    bar = progress_bar(total=3, enabled=False)
    bar.update(3)
    bar.set_metrics({"loss": 1.0})
    bar.close()
    assert capsys.readouterr().err == ""


def test_startup_clock_times_phases_in_order_and_writes_startup_json(tmp_path):
    """Phases add up; the remainder is the time no phase covered; the record names every phase and
    the process's time before the clock (known on Linux)."""
    clock = StartupClock()
    with clock.phase("model"):
        sum(range(1000))
    with clock.phase("model"):  # a phase entered twice adds up
        pass
    clock.remainder("first_step")
    record = json.loads(clock.write(tmp_path, reference_strategy="copy").read_text())
    assert list(record["phases_s"]) == ["model", "first_step"] and record["reference_strategy"] == "copy"
    assert record["run_to_first_step_s"] == pytest.approx(sum(record["phases_s"].values()), abs=0.002)
    assert record["process_to_run_s"] == pytest.approx(
        record["process_to_first_step_s"] - record["run_to_first_step_s"], abs=0.002
    )
    assert clock.summary().startswith("first optimizer step after ") and "model " in clock.summary()
    clock.process_to_run = None  # where /proc is not there
    assert clock.record()["process_to_first_step_s"] is None and "process start" not in clock.summary()
