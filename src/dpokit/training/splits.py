"""The training and evaluation splits of prepared data, and the seeded order of an epoch's batches."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dpokit.config import DataConfig, TrainConfig
from dpokit.errors import TrainingError
from dpokit.rundir import RunPaths

if TYPE_CHECKING:
    from dpokit.data import PreparedDataset


@dataclass
class Split:
    """A view of a prepared dataset: ``indices`` into ``dataset.items``."""

    dataset: Any
    indices: list[int]
    # What length-grouped batching sorts by: "row" = prompt + longest response (padded layout),
    # "block" = prompt + all responses (shared-prompt / packed layouts).
    length_kind: str = "row"

    @classmethod
    def of_items(cls, items: Sequence[dict[str, Any]]) -> Split:
        """All of a plain list of prepared items, in order."""
        return cls(SimpleNamespace(items=list(items)), list(range(len(items))))

    def __len__(self) -> int:
        return len(self.indices)

    def items(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        return [self.dataset.items[self.indices[p]] for p in positions]

    def lengths(self) -> np.ndarray:
        if self.length_kind == "block" and hasattr(self.dataset, "block_lengths"):
            return np.asarray(self.dataset.block_lengths)[self.indices]
        return np.asarray(self.dataset.lengths)[self.indices]


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def report_data(reports: dict[str, tuple[str, Any]], run_dir: str | Path | None, say: Callable[[str], None]) -> Path | None:
    """The data reports (rows read, skipped per reason, truncated, dropped), on rank 0: always printed to
    stderr (whatever the progress bar) and written to ``<run_dir>/data_report.json``; ``reports`` maps
    ``"train"``/``"eval"`` to (path, :class:`~dpokit.data.PrepareReport`). Returns the file written."""
    if not _is_main_process():
        return None
    for name, (path, report) in reports.items():
        print(f"{'training' if name == 'train' else 'evaluation'} data {path}: {report.summary()}", file=sys.stderr, flush=True)
    if run_dir is None:
        return None
    target = RunPaths.of(run_dir).data_report
    document = {name: {"path": path, **report.to_dict()} for name, (path, report) in reports.items()}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    except OSError as error:
        say(f"could not write the data report {target}: {error}")
        return None
    return target


def prepare_with_config(
    data: DataConfig,
    source: Any,
    tokenizer: Any,
    *,
    unpaired: bool,
    processor: Any = None,
    use_cache: bool = True,
    **changes: Any,
) -> PreparedDataset:
    """:func:`dpokit.data.prepare_dataset` of ``source`` (a path, hub id or list of rows) with the ``data``
    section's reading and tokenization settings (:meth:`PrepareOptions.from_config`) and cache directory;
    ``changes`` replace any of the options (e.g. ``split``)."""
    from dpokit.data import PrepareOptions, prepare_dataset

    options = PrepareOptions.from_config(data, unpaired=unpaired, **changes)
    return prepare_dataset(source, tokenizer, options, cache_dir=data.cache_dir, use_cache=use_cache, processor=processor)


def load_data(
    cfg: TrainConfig,
    tokenizer: Any,
    say: Callable[[str], None] = print,
    *,
    unpaired: bool = False,
    run_dir: str | Path | None = None,
    processor: Any = None,
) -> tuple[Split, Split | None]:
    """Tokenized train and eval splits. Eval is ``data.eval_path``, else a seeded carve-out of
    ``data.eval_split_fraction`` of the training examples, else None. The data reports (skips,
    truncation, drops) are printed on rank 0 and written to ``<run_dir>/data_report.json``
    (``run_dir``: the run directory, default ``logging.run_dir``); ``say`` gets other notes.
    ``unpaired``: the objective trains on unpaired examples (labels; pairs split into two). ``processor``:
    a vision-language model's processor, for rows with images."""
    d = cfg.data

    def prepare(path: str, split: str) -> PreparedDataset:
        return prepare_with_config(d, path, tokenizer, split=split, unpaired=unpaired, processor=processor)

    train_data = prepare(d.train_path, d.train_split)
    reports: dict[str, tuple[str, Any]] = {"train": (d.train_path, train_data.report)}
    indices = list(range(len(train_data)))
    eval_split: Split | None = None
    if d.eval_path:
        eval_data = prepare(d.eval_path, d.eval_split)
        reports["eval"] = (d.eval_path, eval_data.report)
        eval_split = Split(eval_data, list(range(len(eval_data))))
    elif d.eval_split_fraction > 0:
        generator = torch.Generator().manual_seed(cfg.optim.seed)
        permutation = torch.randperm(len(indices), generator=generator).tolist()
        num_eval = max(1, round(d.eval_split_fraction * len(indices)))
        held_out = set(permutation[:num_eval])
        eval_split = Split(train_data, sorted(held_out))
        indices = [i for i in indices if i not in held_out]
    report_data(reports, run_dir if run_dir is not None else cfg.logging.run_dir, say)
    if not indices:
        raise TrainingError(f"no training examples left in {d.train_path!r} (see the data report above)")
    if eval_split is not None and cfg.eval.max_examples is not None:
        eval_split.indices = eval_split.indices[: cfg.eval.max_examples]
    return Split(train_data, indices), eval_split


def epoch_batches(split: Split, *, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches (positions into ``split``) of one epoch: a pure function of (seed, epoch).

    Examples are shuffled and grouped by length (less padding; the longest batch first, so an
    out-of-memory error shows at step one) by :class:`~dpokit.data.LengthGroupedSampler`.
    """
    from dpokit.data import LengthGroupedSampler

    sampler = LengthGroupedSampler(split.lengths(), batch_size, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]
