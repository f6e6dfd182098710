"""Batching: prepared items -> :class:`~dpokit.data.batch.Batch`, and a length-grouped batch sampler.

A *layout* is any callable ``items -> Batch``. Callers (the trainer, the log-prob code) only use the
``Batch`` contract -- ``model_inputs()``, ``score_index``/``score_target``/``score_seq``,
``response_mask``, ``response_lengths`` -- so every layout gives the same log-probs and the code
that consumes batches never changes. Three layouts, chosen by name in :func:`make_collator`:

* ``padded`` (:class:`PaddedCollator`): one right-padded row per (prompt, response); a 2-D mask;
  works with every model and attention kernel;
* ``shared_prompt`` (:class:`SharedPromptCollator`): one row ``[prompt | chosen | rejected]`` per
  example -- the prompt is computed once instead of K times -- with a 4-D mask that hides the
  responses from each other and position ids that restart after the prompt;
* ``packed`` (:class:`PackedCollator`): shared-prompt blocks packed several per row up to a token
  budget, block-diagonal mask. With a dense mask the attention cost grows with the row width
  squared, so on CPU ``shared_prompt`` is faster; packing pays with a sparse-mask kernel
  (FlexAttention on GPU, which skips masked tiles).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler

from dpokit.data.batch import Batch
from dpokit.data.images import image_inputs
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
        image_processor: the model's image processor, for items with ``"images"``: every row repeats its
            prompt, so each row gets its example's images (``Batch.image_inputs``).
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        pad_to_multiple_of: int | None = None,
        num_responses: int | None = None,
        image_processor: Any = None,
    ):
        if pad_token_id is None:
            raise ConfigError("PaddedCollator needs a pad_token_id; set tokenizer.pad_token (e.g. to the eos token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_responses = num_responses
        self.image_processor = image_processor

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
            desirable=desirable_labels(items),
            image_inputs=image_inputs(self.image_processor, [item_images(items[s % batch_size]) for s in range(num_rows)]),
        )


class SharedPromptCollator:
    """One block per example laid out ``[prompt | response 0 | response 1 | ...]``: the prompt is
    computed once for all K responses instead of K times.

    Within a block, token i may attend token j (j <= i, same example) when j is a prompt token or
    j is in the same response as i -- so response k sees the prompt and its own earlier tokens,
    never another response, and its log-probs equal those of a separate ``prompt + response k``
    row. Position ids restart after the prompt for every response (``P, P+1, ...``), so rotary and
    learned position embeddings see the same positions as in the padded layout.

    With ``pack_tokens`` set, blocks are packed first-fit-decreasing into rows of at most
    ``pack_tokens`` tokens (a longer block gets a row of its own); blocks in one row never attend
    to each other (block-diagonal mask), so no compute goes to padding beyond each row's tail.
    Without it, every block is its own row (right-padded to the longest).

    Output :class:`Batch` (B examples, K responses, N rows of width T):
        input_ids (N, T) long;
        attention_mask (N, 1, T, T) bool, True = may attend (padding attends to itself only, so no
        softmax row is empty); see :func:`block_attention_mask`;
        position_ids (N, T) long;
        score_index/score_target/score_seq (M,): response ``k`` token ``t`` of example ``b`` sits at
        column ``c``; it is predicted by column ``c - 1``, except the first token (t = 0) of every
        response, which is predicted by the last prompt token (so that position appears K times);
        response_mask (B, K), response_lengths (B, K) as in :class:`PaddedCollator`;
        extras["example_id"] (B,); extras["block_id"] (N, T) long -- the example index b of each
        token, -1 on padding; extras["segment_id"] (N, T) long -- 0 prompt, k + 1 response k, -1
        padding. (block_id/segment_id let attention kernels with their own mask format, such as
        FlexAttention block masks, rebuild the same mask.)

    Args:
        pad_token_id: id written into padding.
        pack_tokens: row budget in tokens for packing several examples per row; None: one per row.
        pad_to_multiple_of: round T up to a multiple of this.
        num_responses: force K; by default the most responses in the batch.
        image_processor: the model's image processor, for items with ``"images"``: each block's prompt,
            and so its images, appears once (``Batch.image_inputs``, in the order the blocks are written).
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        pack_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        num_responses: int | None = None,
        image_processor: Any = None,
    ):
        if pad_token_id is None:
            raise ConfigError("the collator needs a pad_token_id; set tokenizer.pad_token (e.g. to the eos token)")
        if pack_tokens is not None and pack_tokens < 2:
            raise ConfigError(f"pack_tokens must be at least 2, got {pack_tokens}")
        self.pad_token_id = int(pad_token_id)
        self.pack_tokens = pack_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_responses = num_responses
        self.image_processor = image_processor

    def _rows(self, block_lengths: list[int]) -> list[list[int]]:
        """Which blocks go in which row (first-fit decreasing when packing)."""
        if self.pack_tokens is None:
            return [[b] for b in range(len(block_lengths))]
        rows: list[list[int]] = []
        room: list[int] = []
        for b in sorted(range(len(block_lengths)), key=lambda i: -block_lengths[i]):
            for r, free in enumerate(room):
                if block_lengths[b] <= free:
                    rows[r].append(b)
                    room[r] -= block_lengths[b]
                    break
            else:
                rows.append([b])
                room.append(self.pack_tokens - block_lengths[b])
        return rows

    def _token_arrays(self, items: Sequence[Mapping[str, Any]]) -> tuple[list[np.ndarray], list[list[np.ndarray]], int]:
        """(prompts, responses per item, K): the items' token ids as arrays, K checked against the collator's."""
        if len(items) == 0:
            raise ValueError("cannot collate an empty list of items")
        prompts = [np.asarray(item["prompt_ids"], dtype=np.int64) for item in items]
        responses = [[np.asarray(r, dtype=np.int64) for r in item["response_ids"]] for item in items]
        most = max(len(r) for r in responses)
        num_responses = self.num_responses or most
        if most > num_responses:
            raise ConfigError(f"an item has {most} responses but the collator was built with num_responses={num_responses}")
        return prompts, responses, num_responses

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        batch_size = len(items)
        prompts, responses, num_responses = self._token_arrays(items)
        block_lengths = [len(p) + sum(len(r) for r in rs) for p, rs in zip(prompts, responses, strict=True)]
        rows = self._rows(block_lengths)
        width = max(sum(block_lengths[b] for b in row) for row in rows)
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        num_rows = len(rows)

        input_ids = np.full((num_rows, width), self.pad_token_id, dtype=np.int64)
        position_ids = np.zeros((num_rows, width), dtype=np.int64)
        block_id = np.full((num_rows, width), -1, dtype=np.int64)
        segment_id = np.full((num_rows, width), -1, dtype=np.int64)
        response_lengths = np.zeros((batch_size, num_responses), dtype=np.int64)
        response_mask = np.zeros((batch_size, num_responses), dtype=bool)
        # Scored tokens, gathered per sequence s = k * B + b and concatenated in s order.
        score_index: list[list[np.ndarray]] = [[] for _ in range(num_responses * batch_size)]
        score_target: list[list[np.ndarray]] = [[] for _ in range(num_responses * batch_size)]
        # The mask is filled block by block with slices of one lower-triangular matrix (the same
        # pattern as block_attention_mask's elementwise rule, at a fraction of the cost).
        mask = np.zeros((num_rows, width, width), dtype=bool)
        lower = np.tri(width, dtype=bool)
        for n, row in enumerate(rows):
            cursor = 0
            for b in row:
                prompt = prompts[b]
                p = len(prompt)
                mask[n, cursor : cursor + p, cursor : cursor + p] = lower[:p, :p]
                input_ids[n, cursor : cursor + p] = prompt
                position_ids[n, cursor : cursor + p] = np.arange(p)
                block_id[n, cursor : cursor + block_lengths[b]] = b
                segment_id[n, cursor : cursor + p] = 0
                column = cursor + p
                for k, response in enumerate(responses[b]):
                    r = len(response)
                    input_ids[n, column : column + r] = response
                    position_ids[n, column : column + r] = np.arange(p, p + r)
                    segment_id[n, column : column + r] = k + 1
                    mask[n, column : column + r, cursor : cursor + p] = True  # the whole prompt
                    mask[n, column : column + r, column : column + r] = lower[:r, :r]  # itself, causally
                    # Token t at column+t is predicted by column+t-1; token 0 by the last prompt token.
                    predictors = np.arange(column - 1, column + r - 1)
                    if p > 0:
                        predictors[0] = cursor + p - 1
                        first = 0
                    else:  # no prompt: the first response token has nothing before it
                        first = 1
                    s = k * batch_size + b
                    score_index[s].append(n * width + predictors[first:])
                    score_target[s].append(response[first:])
                    response_lengths[b, k] = r - first
                    response_mask[b, k] = True
                    column += r
                cursor += block_lengths[b]
            padding = np.arange(cursor, width)
            mask[n, padding, padding] = True  # padding attends to itself only: no empty softmax row
        flat_index = [np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64) for parts in score_index]
        flat_target = [np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64) for parts in score_target]
        score_seq = np.repeat(np.arange(len(flat_index), dtype=np.int64), [len(x) for x in flat_index])
        block = torch.from_numpy(block_id)
        segment = torch.from_numpy(segment_id)
        example_ids = [int(item.get("example_id", i)) for i, item in enumerate(items)]
        return Batch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(mask)[:, None],
            position_ids=torch.from_numpy(position_ids),
            score_index=torch.from_numpy(np.concatenate(flat_index).astype(np.int64)),
            score_target=torch.from_numpy(np.concatenate(flat_target).astype(np.int64)),
            score_seq=torch.from_numpy(score_seq),
            response_mask=torch.from_numpy(response_mask),
            response_lengths=torch.from_numpy(response_lengths),
            extras={"example_id": torch.tensor(example_ids, dtype=torch.long), "block_id": block, "segment_id": segment},
            desirable=desirable_labels(items),
            image_inputs=image_inputs(self.image_processor, [item_images(items[b]) for row in rows for b in row]),
        )


def item_images(item: Mapping[str, Any]) -> list[bytes]:
    """The encoded images of an item's prompt (none for text-only items)."""
    images: list[bytes] = item.get("images") or []
    return images


def desirable_labels(items: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
    """(B,) bool labels of unpaired items (``item["desirable"]``), or None for paired data."""
    if "desirable" not in items[0]:
        return None
    return torch.tensor([bool(item["desirable"]) for item in items], dtype=torch.bool)


def mismatched_items(items: Sequence[Mapping[str, Any]], partners: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Item b's prompt with ``partners[b]``'s responses: the mismatched pairs of KTO's KL estimate
    (TRL pairs prompt i with the completion of example i - 1 of the batch; the caller chooses partners)."""
    return [{**item, "response_ids": partner["response_ids"]} for item, partner in zip(items, partners, strict=True)]


def may_attend(
    block_q: torch.Tensor,
    segment_q: torch.Tensor,
    column_q: torch.Tensor,
    block_kv: torch.Tensor,
    segment_kv: torch.Tensor,
    column_kv: torch.Tensor,
) -> torch.Tensor:
    """The shared-prompt attention rule, elementwise (broadcasting): query token q may attend key
    token j iff both are in the same example block, j is not after q, and j is a prompt token or
    in q's own response; a padding token (block -1) attends only to itself.

    Written with plain tensor ops so the same function serves the dense 4-D mask and a
    FlexAttention ``mask_mod``.
    """
    same_block = (block_q == block_kv) & (block_q >= 0)
    visible = same_block & (column_kv <= column_q) & ((segment_kv == 0) | (segment_kv == segment_q))
    return visible | ((block_q < 0) & (column_q == column_kv))


def block_attention_mask(block_id: torch.Tensor, segment_id: torch.Tensor) -> torch.Tensor:
    """(N, 1, T, T) bool mask from (N, T) block and segment ids (see :func:`may_attend`)."""
    width = block_id.shape[1]
    columns = torch.arange(width)
    mask = may_attend(
        block_id[:, :, None],
        segment_id[:, :, None],
        columns[None, :, None],
        block_id[:, None, :],
        segment_id[:, None, :],
        columns[None, None, :],
    )
    return mask[:, None]


class PackedCollator(SharedPromptCollator):
    """:class:`SharedPromptCollator` with several examples per row, up to ``pack_tokens`` tokens."""

    def __init__(self, pad_token_id: int, *, pack_tokens: int = 2048, **options: Any):
        super().__init__(pad_token_id, pack_tokens=pack_tokens, **options)


LAYOUTS: dict[str, Callable[..., BatchLayout]] = {
    "padded": PaddedCollator,
    "shared_prompt": SharedPromptCollator,
    "packed": PackedCollator,
}


def make_collator(layout: str, pad_token_id: int, **options: Any) -> BatchLayout:
    """Build a batch layout by name.

    * ``"padded"`` -- one right-padded row per scored sequence (:class:`PaddedCollator`); works with
      every model and attention implementation;
    * ``"shared_prompt"`` -- one row per example, ``[prompt | chosen | rejected]``, the prompt
      computed once (:class:`SharedPromptCollator`);
    * ``"packed"`` -- shared-prompt blocks packed several per row up to ``pack_tokens``
      (:class:`PackedCollator`).

    All three give the same log-probs, loss and gradients (up to float rounding); the last two need
    a model whose attention accepts a custom 4-D mask and position ids (checked by
    :func:`dpokit.logprobs.compute_logps`). Options a layout does not take are dropped with None
    values ignored, so callers can pass one option set (``pack_tokens=None`` to padded is fine).
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown batch layout '{layout}'; available: {', '.join(LAYOUTS)}")
    options = {k: v for k, v in options.items() if v is not None}
    if layout == "padded" and "pack_tokens" in options:
        raise ConfigError("pack_tokens applies to the 'packed' layout only; use layout='packed' or drop pack_tokens")
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
