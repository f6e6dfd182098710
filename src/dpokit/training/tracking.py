"""Where training metrics go: a JSON-lines file, TensorBoard, optionally Weights & Biases, and a
progress bar (redrawn on a terminal, one plain line every N steps in logs).

Every logged record becomes one line of ``run_dir/metrics.jsonl``::

    {"step": 20, "split": "train", "time": 1718000000.0, "loss": 0.66, "rewards/accuracies": 0.75, ...}

and one TensorBoard scalar per metric, tagged ``"{split}/{name}"`` (``train/loss``,
``eval/rewards/margins``), in ``run_dir/tensorboard/``. The JSON-lines file is the source of truth:
plots, the demo's table and tests read it back with :func:`read_metrics`.

Only the main process of a distributed run should write; the others build the tracker with
``enabled=False`` and every call becomes a no-op.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from dpokit.errors import ConfigError, DataError
from dpokit.rundir import RunPaths


def _as_number(value: Any) -> float | int | None:
    """A plain Python number for ``value`` (tensors and numpy scalars included), or None if it is not one."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    item = getattr(value, "item", None)  # torch.Tensor / numpy scalar with one element
    if callable(item):
        try:
            number = item()
        except (ValueError, RuntimeError):  # more than one element
            return None
        return number if isinstance(number, (int, float)) else None
    return None


def _json_safe(value: float | int) -> float | int | None:
    # JSON has no NaN/inf; writing them would make the file unreadable by strict parsers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsTracker:
    """Writes metrics to ``run_dir/metrics.jsonl``, TensorBoard event files and (when asked) W&B.

    Args:
        run_dir: directory of the run; created if missing.
        tensorboard: also write TensorBoard event files under ``run_dir/tensorboard``.
        wandb: also log to Weights & Biases. Requires the ``wandb`` package
            (``pip install dpokit[wandb]``); asking for it without the package is a ConfigError.
        wandb_project: W&B project name (default ``"dpokit"``).
        config_dict: the run's configuration, recorded as W&B config and TensorBoard text.
        enabled: False on non-main ranks: nothing is written anywhere.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        config_dict: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = RunPaths(self.run_dir).metrics
        self._tb_writer = None
        self._wandb_run = None
        self._file = None
        if not enabled:
            return
        if wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "logging.wandb is true but the 'wandb' package is not installed: "
                "run `pip install dpokit[wandb]` (or `pip install wandb`), or set logging.wandb=false"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: a crash or Ctrl-C leaves every completed record on disk, and a
        # resumed run keeps adding to the same file.
        self._file = open(self.metrics_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (open for the run; close() closes it)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it pulls in tensorboard

            self._tb_writer = SummaryWriter(log_dir=str(RunPaths(self.run_dir).tensorboard))
            if config_dict is not None:
                text = "```\n" + json.dumps(config_dict, indent=2, default=str) + "\n```"
                self._tb_writer.add_text("config", text, global_step=0)
        if wandb:
            import wandb as wandb_module

            self._wandb_run = wandb_module.init(
                project=wandb_project or "dpokit",
                name=self.run_dir.name,
                dir=str(self.run_dir),
                config=dict(config_dict) if config_dict is not None else None,
                resume="allow",
            )

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict[str, Any]:
        """Record ``metrics`` (name -> number) at optimizer step ``step`` for ``split`` ("train"/"eval").

        Non-numeric values (e.g. a generated sample) go to the JSON line only. Returns the record written.
        """
        record: dict[str, Any] = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        numeric: dict[str, float | int] = {}
        for name, value in metrics.items():
            number = _as_number(value)
            if number is None:
                record[name] = value if isinstance(value, (str, list, dict)) or value is None else str(value)
            else:
                numeric[name] = number
                record[name] = _json_safe(number)
        if not self.enabled:
            return record
        assert self._file is not None, "log() after close()"
        self._file.write(json.dumps(record, default=str) + "\n")
        if self._tb_writer is not None:
            for name, number in numeric.items():
                self._tb_writer.add_scalar(f"{split}/{name}", float(number), global_step=int(step))
        if self._wandb_run is not None:
            self._wandb_run.log({f"{split}/{name}": number for name, number in numeric.items()}, step=int(step))
        return record

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb_writer is not None:
            self._tb_writer.flush()

    def close(self) -> None:
        """Flush and close every sink. Safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsTracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or a run directory holding one), oldest first.

    ``split`` keeps only that split's records. Raises DataError naming the file and line when a line is
    not JSON. A record interrupted mid-write (a crash) on the *last* line is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = RunPaths(path).metrics
    if not path.exists():
        raise DataError(f"{path}: no metrics file here (a run directory holds {RunPaths(Path()).metrics})")
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if line_number == len(lines):
                break
            raise DataError(f"{path}:{line_number}: not a JSON record ({error.msg})") from None
        if split is None or record.get("split") == split:
            records.append(record)
    return records


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` redraws in place: a TTY, or a notebook (tqdm.auto draws a widget there)."""
    from tqdm.autonotebook import tqdm as chosen_tqdm  # the notebook bar inside Jupyter, else tqdm.std's
    from tqdm.std import tqdm as std_tqdm

    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return chosen_tqdm is not std_tqdm and stream in (sys.stdout, sys.stderr)


class _LineProgress:
    """Progress for logs, CI and nohup: one plain line every ``every`` steps (and at the last),
    never a carriage return, e.g. ``train: 20/100 (20%), elapsed 00:12, ETA 00:48, loss=0.6412, acc=0.625``.

    A step's line waits for the metrics set right after its ``update`` (the trainer updates, then
    sets the step's metrics) and is written at the next ``set_postfix``, ``update``, ``write`` or ``close``;
    its elapsed time and ETA are taken at the ``update``.
    """

    def __init__(self, total: int | None, initial: int, desc: str, every: int, file: IO[str]) -> None:
        self.n = initial
        self._initial = initial
        self._total = total
        self._desc = desc
        self._every = every
        self._file = file
        self._start = time.monotonic()
        self._postfix: dict[str, str] = {}
        self._due: tuple[int, float] | None = None  # (n, elapsed seconds) of the line not written yet

    def update(self, n: int) -> None:
        self._write_due()
        previous, self.n = self.n, self.n + n
        crossed = self.n // self._every > previous // self._every
        finished = self._total is not None and previous < self._total <= self.n
        if crossed or finished:
            self._due = (self.n, time.monotonic() - self._start)

    def set_postfix(self, values: dict[str, str]) -> None:
        self._postfix = values
        self._write_due()

    def write(self, message: str) -> None:
        self._write_due()
        self._print(message)

    def close(self) -> None:
        self._write_due()

    def line(self, n: int, elapsed: float) -> str:
        """The progress line at step ``n`` after ``elapsed`` seconds."""
        from tqdm import tqdm

        parts = [f"{self._desc}: {n}/{self._total if self._total is not None else '?'}"]
        if self._total:
            parts[0] += f" ({100 * n // self._total}%)"
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        done = n - self._initial
        if self._total is not None and done > 0:
            parts.append(f"ETA {tqdm.format_interval(elapsed / done * max(self._total - n, 0))}")
        parts.extend(f"{name}={value}" for name, value in self._postfix.items())
        return ", ".join(parts)

    def _write_due(self) -> None:
        if self._due is not None:
            n, elapsed = self._due
            self._due = None
            self._print(self.line(n, elapsed))

    def _print(self, text: str) -> None:
        self._file.write(text + "\n")
        self._file.flush()


class ProgressBar:
    """Progress over optimizer steps showing elapsed time, ETA and the latest metrics.

    On a terminal it is a tqdm bar redrawn in place; on anything else (a log file, CI, nohup, a pipe)
    it writes one plain line every ``line_every`` steps and at the last step (:class:`_LineProgress`),
    so logs hold no carriage-return redraws.

    ``update(n)`` advances ``n`` steps; ``set_metrics(metrics)`` shows the loss and reward accuracy
    (``loss=0.6412 acc=0.625``); ``set_postfix(**values)`` shows anything else. Disabled bars
    (non-main ranks, ``enabled=False``) print nothing. ``file`` is the stream (default: standard error).
    """

    # Which metric names the bar shows, and the short label it shows them under.
    SHOWN_METRICS = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"))

    def __init__(
        self,
        total: int | None,
        initial: int = 0,
        enabled: bool = True,
        desc: str = "train",
        *,
        line_every: int = 1,
        file: IO[str] | None = None,
    ) -> None:
        if line_every < 1:
            raise ValueError(f"line_every must be >= 1, got {line_every}")
        stream = file if file is not None else sys.stderr
        self._lines: _LineProgress | None = None
        self._bar: Any = None
        if enabled and not _is_terminal(stream):
            self._lines = _LineProgress(total, initial, desc, line_every, stream)
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            disable=not enabled,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            file=stream,
            # elapsed<remaining is tqdm's ETA; the postfix carries loss and accuracy.
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}",
        )

    @property
    def n(self) -> int:
        return self._lines.n if self._lines is not None else int(self._bar.n)

    def update(self, n: int = 1) -> None:
        if self._lines is not None:
            self._lines.update(n)
        else:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        shown = {name: _format_value(value) for name, value in values.items()}
        if self._lines is not None:
            self._lines.set_postfix(shown)
        else:
            self._bar.set_postfix(shown, refresh=True)

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        shown = {}
        for name, label in self.SHOWN_METRICS:
            number = _as_number(metrics.get(name))
            if number is not None:
                shown[label] = float(number)
        if shown:
            self.set_postfix(**shown)

    def write(self, message: str) -> None:
        """Print a line above the bar without breaking it."""
        if self._lines is not None:
            self._lines.write(message)
        else:
            self._bar.write(message)

    def close(self) -> None:
        if self._lines is not None:
            self._lines.close()
        else:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress_bar(
    total: int | None,
    initial: int = 0,
    enabled: bool = True,
    desc: str = "train",
    *,
    line_every: int = 1,
    file: IO[str] | None = None,
) -> ProgressBar:
    """A :class:`ProgressBar` over ``total`` optimizer steps, starting at ``initial`` (resumed runs).

    ``line_every``: when ``file`` (default standard error) is not a terminal, one line every that many
    steps (the trainer passes ``logging.log_every``); on a terminal the bar redraws at every update."""
    return ProgressBar(total, initial=initial, enabled=enabled, desc=desc, line_every=line_every, file=file)


# ------------------------------------------------------------------------------------------------
# Time to the first optimizer step.
# ------------------------------------------------------------------------------------------------


def seconds_since_process_start() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where that is not known."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])
        import os

        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime, in ticks
    except (OSError, IndexError, ValueError):
        return None


class StartupClock:
    """Where the seconds before the first optimizer step go: named phases, timed in order.

    ``process_to_run`` is the time from the process start to the clock's creation (interpreter
    start, imports, whatever the caller did first); each :meth:`phase` adds its wall time; the
    record is written as ``startup.json`` by :meth:`write`."""

    def __init__(self) -> None:
        self.process_to_run = seconds_since_process_start()
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def remainder(self, name: str) -> None:
        """Record as ``name`` the time since the clock started that no phase has covered yet."""
        self.phases[name] = max(0.0, time.perf_counter() - self.started - sum(self.phases.values()))

    def record(self, **extra: Any) -> dict[str, Any]:
        run_to_first_step = sum(self.phases.values())
        total = None if self.process_to_run is None else self.process_to_run + run_to_first_step
        return {
            "process_to_run_s": None if self.process_to_run is None else round(self.process_to_run, 3),
            "phases_s": {name: round(seconds, 3) for name, seconds in self.phases.items()},
            "run_to_first_step_s": round(run_to_first_step, 3),
            "process_to_first_step_s": None if total is None else round(total, 3),
            **extra,
        }

    def summary(self) -> str:
        record = self.record()
        first = record["process_to_first_step_s"] or record["run_to_first_step_s"]
        parts = ([f"process start to run {record['process_to_run_s']:.1f}"] if record["process_to_run_s"] is not None else []) + [
            f"{name} {seconds:.1f}" for name, seconds in record["phases_s"].items()
        ]
        return f"first optimizer step after {first:.1f} s: " + ", ".join(parts)

    def write(self, run_dir: str | Path, **extra: Any) -> Path:
        path = RunPaths.of(run_dir).startup
        path.write_text(json.dumps(self.record(**extra), indent=2) + "\n", encoding="utf-8")
        return path


class _Phase:
    def __init__(self, clock: StartupClock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.clock.phases[self.name] = self.clock.phases.get(self.name, 0.0) + time.perf_counter() - self.start
