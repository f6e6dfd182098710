"""How much memory one training step needs, and how many decoder blocks to checkpoint to fit it.

:func:`estimate_step_memory` adds up, for the policy as it will train:

* weights (every parameter and buffer), gradients (trainable parameters) and optimizer state (AdamW
  keeps two tensors per trainable parameter, RMSprop one);
* activations the backward pass keeps, per decoder block and token: the inputs of both norms and
  their outputs, q/k/v before and after the rotary embedding, the attention output, and the MLP's
  gate, up, activation and product (``7 h + 4 kv + 5 i`` elements for a Llama-shaped block; ``kv`` the
  key/value width, ``i`` the MLP width), plus the attention matrix (``heads x seq`` elements per
  token) where attention runs on the matrix path (eager attention, or sdpa with a dense mask);
* outside the blocks: the embedding output and the final norm (``3 h`` per token), and the chunked
  log-prob buffers (:mod:`dpokit.logprobs`: three chunks of float32 logits, a chunk being at most
  64 MiB).

A checkpointed block keeps only its input (``h`` per token) and recomputes the rest in the backward
pass, one block at a time, so checkpointing ``k`` of ``L`` blocks saves ``k`` blocks' activations less
their inputs and costs one block's activations while it is recomputed.
:func:`plan_checkpointing` picks the fewest blocks that bring the estimate within the budget
(``model.memory_budget_gib``, or what the device has free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dpokit.config import ModelConfig
from dpokit.logprobs import effective_chunk_size

GIB = 2**30
CheckpointingMode = Literal["auto", "on", "off"]


def checkpointing_mode(model_cfg: ModelConfig) -> CheckpointingMode:
    """``model.activation_checkpointing`` (true/false -- YAML reads a bare on/off so -- are on/off),
    with the older ``model.gradient_checkpointing`` bool deciding when the former is left at ``auto``."""
    mode = model_cfg.activation_checkpointing
    if mode == "auto" and model_cfg.gradient_checkpointing is not None:
        return "on" if model_cfg.gradient_checkpointing else "off"
    if isinstance(mode, bool):
        return "on" if mode else "off"
    return mode


@dataclass(frozen=True)
class StepMemory:
    """The parts of one training step's peak memory, in bytes; ``blocks`` decoder blocks keep
    ``block_activations`` each, or ``checkpointed_block`` each when checkpointed."""

    weights: int
    gradients: int
    optimizer: int
    block_activations: int
    checkpointed_block: int
    blocks: int
    other_activations: int
    logprob_buffers: int
    tokens: int

    def total(self, checkpointed: int = 0) -> int:
        """The step's estimated peak with ``checkpointed`` of the blocks checkpointed."""
        kept = (self.blocks - checkpointed) * self.block_activations + checkpointed * self.checkpointed_block
        recompute = self.block_activations if checkpointed else 0
        activations = kept + recompute + self.other_activations + self.logprob_buffers
        # Gradients are set to None after each step and grow while the backward pass frees activations.
        return self.weights + self.optimizer + max(activations, self.gradients)

    def describe(self) -> str:
        """One line: the total and its parts in GiB."""
        return (
            f"step memory estimate {self.total() / GIB:.2f} GiB for micro-batches of up to {self.tokens} tokens "
            f"(weights {self.weights / GIB:.2f}, gradients {self.gradients / GIB:.2f}, optimizer {self.optimizer / GIB:.2f}, "
            f"activations {self.blocks} blocks x {self.block_activations / GIB:.3f} + {self.other_activations / GIB:.3f}, "
            f"log-prob buffers {self.logprob_buffers / GIB:.3f})"
        )


def _text_config(model: nn.Module) -> Any:
    config: Any = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _first_int(config: Any, names: tuple[str, ...], default: int) -> int:
    """The first of ``names`` that ``config`` sets (not None), as an int; else ``default``."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return default


def _dims(config: Any) -> tuple[int, int, int, int, int, int]:
    """(hidden, layers, heads, key/value width, MLP width, vocabulary) from a transformers config."""
    hidden = _first_int(config, ("hidden_size", "n_embd"), 0)
    layers = _first_int(config, ("num_hidden_layers", "n_layer"), 0)
    heads = _first_int(config, ("num_attention_heads", "n_head"), 1)
    kv_heads = _first_int(config, ("num_key_value_heads",), heads)
    head_dim = _first_int(config, ("head_dim",), hidden // max(1, heads))
    mlp = _first_int(config, ("intermediate_size", "n_inner"), 4 * hidden)
    vocab = _first_int(config, ("vocab_size",), 0)
    return hidden, layers, heads, kv_heads * head_dim, mlp, vocab


def estimate_step_memory(
    model: nn.Module,
    *,
    rows: int,
    seq_len: int,
    optimizer: str,
    attention_matrix: bool,
    chunk_size: int = 1024,
) -> StepMemory:
    """The peak memory of one forward + backward + optimizer step of ``model`` (as it will train:
    after LoRA, so its trainable parameters are the ones that get gradients) on ``rows`` token rows of
    ``seq_len`` tokens. ``attention_matrix``: attention materialises its ``seq x seq`` probabilities
    (eager, or sdpa given a dense mask)."""
    tensors = [*model.parameters(), *model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    states = 2 if optimizer == "adamw" else 1
    optimizer_bytes = states * sum(p.numel() * 4 for p in trainable)  # state kept in float32
    hidden, layers, heads, kv, mlp, vocab = _dims(_text_config(model))
    element = _activation_bytes(model)
    tokens = rows * seq_len
    per_token = 7 * hidden + 4 * kv + 5 * mlp + (heads * seq_len if attention_matrix else 0)
    chunk = min(effective_chunk_size(chunk_size, max(1, vocab)), tokens)
    return StepMemory(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer_bytes,
        block_activations=tokens * per_token * element,
        checkpointed_block=tokens * hidden * element,
        blocks=layers,
        other_activations=tokens * 3 * hidden * element,
        logprob_buffers=3 * chunk * vocab * 4,
        tokens=tokens,
    )


def _activation_bytes(model: nn.Module) -> int:
    """Bytes per activation element: the dtype the model computes in (its embedding's)."""
    hf_model: Any = model  # a transformers model: get_input_embeddings is typed Tensor | Module here
    embeddings: Any = hf_model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.element_size() if isinstance(weight, torch.Tensor) else 4


def plan_checkpointing(mode: CheckpointingMode, estimate: StepMemory, budget: int | None) -> tuple[int, str]:
    """How many decoder blocks to checkpoint, and why, in words. ``on``: all; ``off``: none; ``auto``:
    none when the estimate fits ``budget`` (or the budget is unknown), else the fewest that make it
    fit (all when even that does not fit, said so)."""
    if mode == "on":
        return estimate.blocks, "model.activation_checkpointing=on"
    if mode == "off":
        return 0, "model.activation_checkpointing=off"
    if budget is None:
        return 0, "auto: the free memory is unknown and model.memory_budget_gib is not set"
    need = estimate.total()
    if need <= budget:
        return 0, f"auto: the step fits the {budget / GIB:.2f} GiB budget"
    saved = estimate.block_activations - estimate.checkpointed_block
    for k in range(1, estimate.blocks + 1):
        if estimate.total(k) <= budget:
            fits = estimate.total(k) / GIB
            return k, f"auto: {need / GIB:.2f} GiB exceeds the {budget / GIB:.2f} GiB budget; {fits:.2f} GiB with {k}"
    fewest = estimate.total(estimate.blocks)
    hint = "; lower optim.batch_size or data.max_length" if saved > 0 else ""
    return estimate.blocks, (
        f"auto: {need / GIB:.2f} GiB exceeds the {budget / GIB:.2f} GiB budget and still {fewest / GIB:.2f} GiB with every "
        f"block checkpointed{hint}"
    )


def memory_budget(budget_gib: float | None, free_bytes: int | None, resident: int = 0) -> tuple[int | None, str]:
    """The budget in bytes and where it came from: ``model.memory_budget_gib``, else ``free_bytes``
    (measured with the policy loaded) plus ``resident``, the policy's weights it already holds."""
    if budget_gib is not None:
        return math.floor(budget_gib * GIB), "model.memory_budget_gib"
    if free_bytes is None:
        return None, "unknown"
    return free_bytes + resident, "free on the device + the loaded weights"


def micro_batch_shape(layout: str, batch_size: int, max_length: int, pack_tokens: int) -> tuple[int, int]:
    """(rows, tokens per row) of the largest micro-batch a layout makes from ``batch_size`` pairs of at
    most ``max_length`` tokens each: two rows per pair padded; one ``[prompt | chosen | rejected]`` row
    (under ``2 x max_length``) per pair shared_prompt; rows of ``pack_tokens`` packed."""
    if layout == "padded":
        return 2 * batch_size, max_length
    if layout == "packed":
        return max(1, math.ceil(batch_size * 2 * max_length / pack_tokens)), pack_tokens
    return batch_size, 2 * max_length


def apply_checkpointing_plan(
    model: nn.Module,
    model_cfg: ModelConfig,
    *,
    layout: str,
    shape: tuple[int, int],
    optimizer: str,
    chunk_size: int,
    free_bytes: int | None,
) -> tuple[int, list[str]]:
    """Estimate the step (``shape`` = rows, tokens per row of the largest micro-batch), choose the
    checkpointed blocks for ``model.activation_checkpointing`` and, for ``auto``, wrap them (``on`` is
    applied by the caller before LoRA). Returns the number of checkpointed blocks and the lines for the log."""
    from dpokit.models import checkpoint_blocks

    config = _text_config(model)
    attention = str(getattr(config, "_attn_implementation", None) or "eager")
    matrix = attention == "eager" or (attention == "sdpa" and layout != "padded")
    rows, seq_len = shape
    estimate = estimate_step_memory(
        model, rows=rows, seq_len=seq_len, optimizer=optimizer, attention_matrix=matrix, chunk_size=chunk_size
    )
    budget, source = memory_budget(model_cfg.memory_budget_gib, free_bytes, resident=estimate.weights)
    mode = checkpointing_mode(model_cfg)
    count, why = plan_checkpointing(mode, estimate, budget)
    if mode == "auto":
        count = checkpoint_blocks(model, count)
    budget_words = f"{budget / GIB:.2f} GiB ({source})" if budget is not None else "unknown"
    choice = f"on for {count} of {estimate.blocks} blocks" if count else "off"
    lines = [f"memory: {estimate.describe()}; budget {budget_words}", f"memory: activation checkpointing {choice} ({why})"]
    return count, lines
