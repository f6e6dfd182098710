"""Choosing the batch layout of a run (``data.layout``): ``auto`` estimates each layout's decoder FLOPs over
the epoch's micro-batches and takes the cheaper, unless the model's attention cannot take the custom masks
the shared-prompt layout needs (:func:`dpokit.logprobs.custom_mask_problem`) or its image tokens' attention
does not fit them (:func:`dpokit.logprobs.image_layout_problem`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn

from dpokit.compat import attention_implementation, text_config
from dpokit.logprobs import causal_mask_suffices, custom_mask_problem, find_output_head, image_layout_problem


def _attention_cost(model: nn.Module) -> tuple[float, float]:
    """(forward FLOPs per token in the decoder's layers, attention FLOPs per query-key pair)."""
    config = text_config(model)
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or (hidden // heads if hidden else 64))
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}  # type: ignore[operator]  # transformers method via nn.Module.__getattr__
    embeddings |= {id(p) for p in find_output_head(model).module.parameters()}
    weights = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    return 2.0 * weights, 4.0 * heads * head_dim * layers  # QK^T and AV: 2 x 2 x head_dim per head and layer


def layout_costs(model: nn.Module, batches: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> dict[str, float]:
    """Estimated forward FLOPs of the decoder over micro-batches of items, for each layout in
    ``batches`` (``"padded"`` / ``"shared_prompt"``: the micro-batches as that layout's length
    grouping makes them). The output layer scores the same tokens in both and is left out.

    With a forward cost f per token and a per query-key pair, a micro-batch of B examples (prompt
    P_b, responses R_b1..R_bK) costs

        shared_prompt: B W (f + a W),      W = max_b (P_b + sum_k R_bk)   (one row per example,
                       dense mask; FlexAttention on CUDA skips the masked tiles, so its area is
                       sum_b P_b^2/2 + sum_k R_bk (P_b + R_bk/2) per row instead of W^2);
        padded:        K B W (f + a W / c), W = max_b,k (P_b + R_bk)       (one row per response),

    with c = 2 where the causal kernel runs (SDPA, :func:`causal_mask_suffices`) and 1 otherwise.
    The prompt computed once saves f (K-1) P; the dense mask costs attention over the responses'
    cross terms and the upper triangle, and memory quadratic in the row, so a long prompt with short
    responses favours ``shared_prompt`` and long responses favour ``padded``.
    """
    per_token, per_pair = _attention_cost(model)
    implementation = attention_implementation(model)
    sparse = implementation == "flex_attention" and next(model.parameters()).device.type == "cuda"
    causal = 2.0 if implementation == "sdpa" and causal_mask_suffices(model) else 1.0
    costs: dict[str, float] = {}
    for layout, micro_batches in batches.items():
        total = 0.0
        for batch in micro_batches:
            prompts = [len(item["prompt_ids"]) for item in batch]
            responses = [[len(r) for r in item["response_ids"]] or [0] for item in batch]
            if layout == "padded":
                width = max(p + max(rs) for p, rs in zip(prompts, responses, strict=True))
                rows = len(batch) * max(len(rs) for rs in responses)
                total += rows * width * (per_token + per_pair * width / causal)
                continue
            width = max(p + sum(rs) for p, rs in zip(prompts, responses, strict=True))
            areas = (
                [p * p / 2 + sum(r * (p + r / 2) for r in rs) for p, rs in zip(prompts, responses, strict=True)]
                if sparse
                else [width * width] * len(batch)
            )
            total += len(batch) * width * per_token + per_pair * sum(areas)
        costs[layout] = total
    return costs


def plan_layout(
    layout: str, model: nn.Module, batches: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]] | None = None
) -> tuple[str, str]:
    """The concrete batch layout for ``data.layout`` and a one-line reason.

    ``auto``: ``padded`` when the model's attention does not apply custom 4-D masks (checked once on
    a tiny batch) or attends to image tokens in a way they do not express
    (:func:`dpokit.logprobs.image_layout_problem`); otherwise the cheaper of ``shared_prompt`` and
    ``padded`` by :func:`layout_costs` over ``batches`` (each layout's micro-batches of the training
    data; ``shared_prompt`` without them). Any other name is returned unchanged (and checked on the first batch)."""
    if layout != "auto":
        return layout, "set by data.layout"
    problem = custom_mask_problem(model) or image_layout_problem(model)
    if problem is not None:
        return "padded", problem
    if not batches or not all(batches.get(name) for name in ("padded", "shared_prompt")):
        return "shared_prompt", "the prompt computed once per example"
    costs = layout_costs(model, {name: batches[name] for name in ("padded", "shared_prompt")})
    ratio = costs["shared_prompt"] / max(costs["padded"], 1.0)
    choice = "shared_prompt" if ratio <= 1.0 else "padded"
    return choice, f"estimated decoder FLOPs per epoch, shared_prompt / padded = {ratio:.2f}"
