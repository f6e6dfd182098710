"""The batch contract between data layouts and the forward pass.

A batch holds ``B`` examples, each with a prompt and ``K`` responses ranked best first (``K = 2``
for a chosen/rejected pair: response 0 is chosen, response 1 rejected). Every response is one
*scored sequence*; sequence ``s = k * B + b`` is response ``k`` of example ``b``, so a flat vector of
``S = K * B`` per-sequence values reshapes to ``(K, B)`` and, transposed, to ``(B, K)``.

How the token rows are laid out is the layout's business (one padded row per sequence, one row per
pair with the prompt shared, several pairs packed per row, ...). Callers only rely on:

* ``input_ids`` ``(N, T)`` and whatever attention inputs the layout needs (``attention_mask`` as a
  2-D ``(N, T)`` padding mask or a 4-D ``(N, 1, T, T)`` additive/boolean mask, optional
  ``position_ids`` ``(N, T)``), passed straight to the model;
* three flat index vectors of length ``M`` (the number of scored tokens in the batch):
  ``score_index`` -- the flat position ``n * T + t`` whose final hidden state predicts a response
  token; ``score_target`` -- that token's id; ``score_seq`` -- the scored sequence ``s`` it belongs
  to. A position may appear more than once (with a shared prompt the last prompt token predicts the
  first token of every response).

So ``log pi(y_s | x_b) = sum over m with score_seq[m] == s of log softmax(h[score_index[m]] W^T)[score_target[m]]``
whatever the layout, and the log-prob code never looks at how rows were built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    """Tensors for one forward pass over ``B`` examples with ``K`` responses each.

    Shapes: ``input_ids`` (N, T); ``attention_mask`` (N, T) or (N, 1, T, T);
    ``position_ids`` (N, T) or None; ``score_index``/``score_target``/``score_seq`` (M,);
    ``response_mask`` (B, K) bool -- False where a ranking has fewer than K responses (those
    sequences have no scored tokens); ``response_lengths`` (B, K) long -- scored tokens per response.

    Prompts with images add ``image_inputs``: the image processor's tensors for the images of every
    prompt the rows hold, in the order the prompts appear (row by row), passed to the model beside the
    token ids. Unpaired data (K = 1) adds ``desirable`` (B,) bool, the label of each completion. ``mismatched``
    is a second batch in the same layout, for objectives with a KL reference point (KTO): example b's
    prompt with another example's completion; it is only ever run without gradient.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    score_index: torch.Tensor
    score_target: torch.Tensor
    score_seq: torch.Tensor
    response_mask: torch.Tensor
    response_lengths: torch.Tensor
    position_ids: torch.Tensor | None = None
    # Free-form extras a layout may carry (e.g. example ids for precomputed reference log-probs).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    desirable: torch.Tensor | None = None
    mismatched: Batch | None = None
    # What the model's image processor made of the prompts' images (pixel_values, and e.g.
    # pixel_attention_mask or image_grid_thw), one set per prompt written in the rows, in row-major order.
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.response_mask.shape[0])

    @property
    def num_responses(self) -> int:
        return int(self.response_mask.shape[1])

    @property
    def num_sequences(self) -> int:
        return self.batch_size * self.num_responses

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(**batch.model_inputs())``."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        inputs.update(self.image_inputs)
        return inputs

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, dict):
                value = {k: v.to(device, non_blocking=non_blocking) for k, v in value.items()}
            elif isinstance(value, Batch):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return Batch(**moved)
