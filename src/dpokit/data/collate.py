"""Batching: prepared items -> :class:`~dpokit.data.batch.Batch`, and a length-grouped batch sampler.

A *layout* is any callable ``items -> Batch``. Callers (the trainer, the log-prob code) only use the
``Batch`` contract -- ``model_inputs()``, ``score_index``/``score_target``/``score_seq``,
``response_mask``, ``response_lengths`` -- so a packed layout (prompt shared by both responses,
several pairs per row) is added as another :class:`BatchLayout` and chosen by name in
:func:`make_collator`, with no change to the code that consumes batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler

from dpokit.data.batch import Batch
from dpokit.errors import ConfigError

IGNORE_INDEX = -100


class BatchLayout(Protocol):
    """Anything that turns a list of prepared items into a :class:`Batch`."""

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch: ...


class PaddedCollator:
    """One right-padded row per scored sequence: row ``s = k * B + b`` is prompt ``b`` + response ``k``.

    For B items with at most K responses, ``N = K * B`` rows of width ``T`` (the longest prompt +
    response, rounded up to ``pad_to_multiple_of``). Chosen and rejected (all K ranks) are stacked
    so the policy runs one concatenated forward.

    Output :class:`Batch`:
        input_ids (N, T) long, padded with ``pad_token_id``;
        attention_mask (N, T) long, 1 on prompt + response tokens, 0 on padding;
        score_index/score_target/score_seq (M,): response token ``t`` of row ``s`` sits at column
        ``c = P + t`` (P = prompt length) and is predicted by column ``c - 1``, so
        ``score_index = s * T + c - 1``, ``score_target = input_ids[s, c]``;
        response_mask (B, K) bool: False where example b has fewer than K responses (its row k is
        then the prompt alone and has no scored tokens);
        response_lengths (B, K) long: scored tokens per response;
        extras["example_id"] (B,) long; extras["labels"] (N, T) long, Hugging Face style labels
        (``input_ids`` on response tokens, -100 on prompt and padding).

    Args:
        pad_token_id: id written into padding (never attended, never scored).
        pad_to_multiple_of: round T up to a multiple of this (e.g. 8 for tensor cores); None: exact.
        num_responses: force K (e.g. 2); by default K = the most responses in the batch.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None, num_responses: int | None = None):
        if pad_token_id is None:
            raise ConfigError("PaddedCollator needs a pad_token_id; set tokenizer.pad_token (e.g. to the eos token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_responses = num_responses

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        batch_size = len(items)
        if batch_size == 0:
            raise ValueError("cannot collate an empty list of items")
        prompts = [list(item["prompt_ids"]) for item in items]
        responses = [[list(r) for r in item["response_ids"]] for item in items]
        most = max(len(r) for r in responses)
        num_responses = self.num_responses or most
        if most > num_responses:
            raise ConfigError(f"an item has {most} responses but the collator was built with num_responses={num_responses}")

        rows: list[tuple[list[int], list[int]]] = []  # (prompt, response) for s = k * B + b
        for k in range(num_responses):
            for b in range(batch_size):
                rows.append((prompts[b], responses[b][k] if k < len(responses[b]) else []))
        width = max(len(p) + len(r) for p, r in rows)
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)

        num_rows = len(rows)
        input_ids = np.full((num_rows, width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((num_rows, width), dtype=np.int64)
        labels = np.full((num_rows, width), IGNORE_INDEX, dtype=np.int64)
        score_index, score_target, score_seq = [], [], []
        response_lengths = np.zeros((batch_size, num_responses), dtype=np.int64)
        response_mask = np.zeros((batch_size, num_responses), dtype=bool)
        for s, (prompt, response) in enumerate(rows):
            k, b = divmod(s, batch_size)
            p, r = len(prompt), len(response)
            input_ids[s, :p] = prompt
            input_ids[s, p : p + r] = response
            attention_mask[s, : p + r] = 1
            labels[s, p : p + r] = response
            # The first response token needs a preceding position; with an empty prompt it cannot be scored.
            first = p if p > 0 else 1
            columns = np.arange(first, p + r)
            score_index.append(s * width + columns - 1)
            score_target.append(input_ids[s, columns])
            score_seq.append(np.full(len(columns), s, dtype=np.int64))
            response_lengths[b, k] = len(columns)
            response_mask[b, k] = k < len(responses[b])
        example_ids = [int(item.get("example_id", i)) for i, item in enumerate(items)]
        return Batch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            score_index=torch.from_numpy(np.concatenate(score_index).astype(np.int64)),
            score_target=torch.from_numpy(np.concatenate(score_target).astype(np.int64)),
            score_seq=torch.from_numpy(np.concatenate(score_seq)),
            response_mask=torch.from_numpy(response_mask),
            response_lengths=torch.from_numpy(response_lengths),
            extras={"example_id": torch.tensor(example_ids, dtype=torch.long), "labels": torch.from_numpy(labels)},
        )


LAYOUTS = {"padded": PaddedCollator}


def make_collator(layout: str, pad_token_id: int, **options: Any) -> BatchLayout:
    """Build a batch layout by name (``"padded"``); later layouts register in :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown batch layout '{layout}'; available: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](pad_token_id, **options)


class LengthGroupedSampler(Sampler[list[int]]):
    """A *batch* sampler that puts examples of similar length in the same batch to cut padding.

    Use as ``DataLoader(dataset, batch_sampler=LengthGroupedSampler(dataset.lengths, batch_size),
    collate_fn=collator)``. Each epoch: shuffle all indices (seeded by ``seed + epoch``), cut them into
    mega-batches of ``batch_size * mega_batch_factor``, sort each mega-batch by length (longest
    first) and cut it into batches, then shuffle the order of the batches -- except that the batch
    holding the longest example comes first, so an out-of-memory shows up at step one.

    Args:
        lengths: (E,) row length per example (``PreparedDataset.lengths``).
        batch_size: examples per batch (per process).
        shuffle: False gives a deterministic order (sorted within mega-batches of the input order).
        seed: base seed; call :meth:`set_epoch` each epoch for a new, reproducible order.
        mega_batch_factor: how many batches are length-sorted together (larger: less padding, less randomness).
        drop_last: drop a final batch smaller than ``batch_size``.
        num_replicas, rank: for data-parallel runs, batches are dealt round-robin to ranks (so ranks
            get similar lengths at the same step); every rank gets the same number of batches (the
            list is wrapped around when needed).
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        mega_batch_factor: int = 50,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        mega = self.batch_size * self.mega_batch_factor
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle and len(batches) > 1:
            longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max())
            first = batches.pop(longest)
            batches = [first] + [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        per_rank = len(self)
        if self.num_replicas > 1 and batches:
            needed = per_rank * self.num_replicas
            batches = (batches * math.ceil(needed / len(batches)))[:needed] if not self.drop_last else batches[:needed]
            batches = batches[self.rank :: self.num_replicas]
        yield from batches

    def __len__(self) -> int:
        n = len(self.lengths)
        total = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        if self.num_replicas == 1:
            return total
        return total // self.num_replicas if self.drop_last else math.ceil(total / self.num_replicas)
