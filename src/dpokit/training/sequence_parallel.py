"""Sequence parallelism: every row of a batch split along its positions over C ranks.

A sequence-parallel group of C ranks trains the same micro-batch. Rank r holds the contiguous
positions ``[r t, (r + 1) t)`` of every row, ``t = ceil(T / C)`` (the rows are right-padded to
``C t`` first), and runs the decoder on that slice alone, with the true position ids (RoPE sees
positions ``r t ...``). Everything in a block except attention is per position, so it needs
nothing from the other ranks. Attention is exact:

- keys and values of the slice are all-gathered over the group with autograd
  (:class:`_GatherEarlier`; its backward reduce-scatters, sending each rank the gradient its
  keys and values received from every rank's queries);
- rank r's queries attend, causally, to the keys of positions ``[0, (r + 1) t)``: the earlier
  ranks' keys in full, its own under the causal mask. On CPU this is two calls of PyTorch's fused
  CPU attention kernel (no mask materialised) merged by their log-sum-exp, with the backward
  the kernel's own, given the merged output and log-sum-exp (:class:`_ShardAttention`). Other
  devices run SDPA with a (t, (r + 1) t) boolean mask instead (exact, not memory-lean; not yet
  run on a GPU).

The attention is registered with transformers' ``AttentionInterface`` under
:data:`dpokit.compat.SEQUENCE_PARALLEL_ATTENTION` and set as the model's attention implementation
(:func:`prepare_model`); it splits only in a forward given ``sequence_group=`` (which
transformers hands down to every attention call, and which activation checkpointing's recompute
sees again), and is transformers' SDPA otherwise.

**Log-probs.** The collator already put every scored position's target (the *next* token) in
``score_target`` from the whole row, so a position at the end of a slice is scored with a target
that lives in the next slice and no label crosses ranks. Each rank projects the scored positions it
holds (:func:`dpokit.logprobs.head_token_logps`, chunked as usual) into a zero (M,) vector; one
all-reduce over the group (:class:`_SumOverGroup`) gives every rank all M token log-probs, and
the (B, K) sequence sums are formed from them as in one process. Every rank of the group then
computes the same loss.

**Gradients.** The all-reduce's backward is the identity: every rank of the group back-propagates
the same loss, so each rank's own token log-probs receive exactly dL/d(token), as in the one
computation graph split over the ranks; keys and values receive the sum over all ranks' queries
through the all-gather's backward. The sum of the group's local parameter gradients is therefore
the gradient of the group's loss. DDP (or FSDP) then *averages* over all W ranks: with the
engine's loss weight ``b_g W / n`` for the group's b_g examples (:func:`dpokit.training.step.train_step`
uses the world size W, not the number of data-parallel groups), the average is
``sum_g b_g / n dL_g`` -- the gradient of the mean loss over the step's n examples, the same as
one process. (An all-reduce that summed gradients in backward would multiply them by C and need
the weight ``b_g W / (n C)`` instead.)

**Memory.** Per rank, every activation the decoder keeps for backward covers t = T / C positions:
hidden states, MLP activations, queries and attention outputs, and the output layer's chunks. The
exception is the gathered keys and values: rank r keeps ``(r + 1) t`` positions of them per layer
(the last rank all T), i.e. 2 x kv_heads x head_dim x T numbers per layer, which under grouped-query
attention is a fraction of one hidden state of the whole row.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dpokit.compat import SEQUENCE_PARALLEL_ATTENTION, attention_implementation
from dpokit.data.batch import Batch
from dpokit.errors import ConfigError, TrainingError
from dpokit.logprobs import SequenceLogps, checked_output_head, compute_logps, head_token_logps


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence-parallel group: ``size`` ranks splitting every row, this one at ``rank``."""

    group: Any  # torch.distributed ProcessGroup
    rank: int
    size: int

    def slice_length(self, width: int) -> int:
        """Positions per rank for rows of ``width`` tokens: ceil(width / size)."""
        return -(-width // self.size)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) over the group in forward; identity in backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GatherEarlier(torch.autograd.Function):
    """(N, heads, t, D) slices of ranks 0..r of the group, concatenated along positions. Forward:
    all-gather; backward: reduce-scatter (sum), so each rank's slice receives the gradient every
    rank's queries sent it (zero from the ranks before it, which do not attend to it)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sequence: SequenceGroup) -> Tensor:
        gathered = torch.empty((sequence.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(gathered, tensor.contiguous(), group=sequence.group)
        ctx.sequence = sequence
        return torch.cat(gathered.view(sequence.size, *tensor.shape)[: sequence.rank + 1].unbind(0), dim=2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        sequence: SequenceGroup = ctx.sequence
        n, heads, length, dim = grad.shape
        local = length // (sequence.rank + 1)
        parts = torch.zeros((sequence.size, n, heads, local, dim), dtype=grad.dtype, device=grad.device)
        parts[: sequence.rank + 1] = grad.view(n, heads, sequence.rank + 1, local, dim).permute(2, 0, 1, 3, 4)
        own = torch.empty((n, heads, local, dim), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(
            own, parts.view(sequence.size * n, heads, local, dim), op=dist.ReduceOp.SUM, group=sequence.group
        )
        return own, None


def _gather_earlier(tensor: Tensor, sequence: SequenceGroup) -> Tensor:
    gathered: Tensor = _GatherEarlier.apply(tensor, sequence)  # type: ignore[no-untyped-call]
    return gathered


def _expand_heads(tensor: Tensor, groups: int) -> Tensor:
    """(N, kv_heads, S, D) -> (N, kv_heads x groups, S, D): each key/value head repeated for its query heads."""
    if groups == 1:
        return tensor
    n, heads, length, dim = tensor.shape
    return tensor[:, :, None].expand(n, heads, groups, length, dim).reshape(n, heads * groups, length, dim)


def _fold_heads(grad: Tensor, groups: int) -> Tensor:
    """The gradient of :func:`_expand_heads`: the query heads' gradients summed per key/value head."""
    if groups == 1:
        return grad
    n, heads, length, dim = grad.shape
    return grad.view(n, heads // groups, groups, length, dim).sum(dim=2)


class _ShardAttention(torch.autograd.Function):
    """Causal attention of a rank's t queries (the last t of S positions) to keys/values of positions
    [0, S): the first S - t in full, the last t causally. Two calls of the fused CPU kernel merged by
    log-sum-exp; backward calls the kernel's backward on each part with the merged output and
    log-sum-exp, which makes each part's gradients those of the whole softmax."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        groups = query.shape[1] // key.shape[1]
        keys, values = _expand_heads(key, groups), _expand_heads(value, groups)
        local = query.shape[2]
        prefix = keys.shape[2] - local
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(query, keys[:, :, prefix:], values[:, :, prefix:], 0.0, True, scale=scale)
        if prefix:
            out_prefix, lse_prefix = flash(query, keys[:, :, :prefix], values[:, :, :prefix], 0.0, False, scale=scale)
            merged = torch.logaddexp(lse, lse_prefix)
            out = (
                out.float() * (lse - merged).exp().unsqueeze(-1) + out_prefix.float() * (lse_prefix - merged).exp().unsqueeze(-1)
            ).to(query.dtype)
            lse = merged
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale = scale
        result: Tensor = out
        return result

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        query, key, value, out, lse = ctx.saved_tensors
        groups = query.shape[1] // key.shape[1]
        keys, values = _expand_heads(key, groups), _expand_heads(value, groups)
        local = query.shape[2]
        prefix = keys.shape[2] - local
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_out = grad_out.contiguous()
        dq, dk, dv = backward(grad_out, query, keys[:, :, prefix:], values[:, :, prefix:], out, lse, 0.0, True, scale=ctx.scale)
        if prefix:
            dq_p, dk_p, dv_p = backward(
                grad_out, query, keys[:, :, :prefix], values[:, :, :prefix], out, lse, 0.0, False, scale=ctx.scale
            )
            dq = dq + dq_p
            dk, dv = torch.cat([dk_p, dk], dim=2), torch.cat([dv_p, dv], dim=2)
        return dq, _fold_heads(dk, groups), _fold_heads(dv, groups), None


def shard_attention(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    """(N, H, t, D) attention output of the last t of S positions, causal, with keys/values (N, H_kv, S, D)."""
    if query.device.type == "cpu":
        out: Tensor = _ShardAttention.apply(query, key, value, float(scale))  # type: ignore[no-untyped-call]
        return out
    local, total = query.shape[2], key.shape[2]
    rows = torch.arange(total - local, total, device=query.device)[:, None]
    mask = torch.arange(total, device=query.device)[None, :] <= rows
    groups = query.shape[1] // key.shape[1]
    return F.scaled_dot_product_attention(
        query, _expand_heads(key, groups), _expand_heads(value, groups), attn_mask=mask, scale=scale
    )


def sequence_parallel_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sequence_group: SequenceGroup | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: this rank's queries against the group's keys/values when
    given ``sequence_group``, transformers' SDPA otherwise. Returns (N, t, H, D) as SDPA's does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if sequence_group is None:
        output: tuple[Tensor, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return output
    unsupported = [name for name in ("sliding_window", "softcap") if kwargs.get(name)]
    if dropout or attention_mask is not None or unsupported:
        raise TrainingError(
            "sequence parallelism runs plain causal attention only; this model's attention has "
            + (", ".join(unsupported) or ("dropout" if dropout else "a mask"))
            + ": set distributed.sequence_parallel=1 (or attention_dropout=0 in the model config)"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    keys, values = _gather_earlier(key, sequence_group), _gather_earlier(value, sequence_group)
    return shard_attention(query, keys, values, scale).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register :func:`sequence_parallel_attention` (and SDPA's mask builder) under
    :data:`dpokit.compat.SEQUENCE_PARALLEL_ATTENTION` with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEQUENCE_PARALLEL_ATTENTION, sequence_parallel_attention)
    AttentionMaskInterface.register(SEQUENCE_PARALLEL_ATTENTION, sdpa_mask)


def prepare_model(model: nn.Module) -> nn.Module:
    """``model`` with its attention set to the sequence-parallel one (SDPA outside a split forward).

    Refused (ConfigError) unless it runs SDPA and is a plain causal decoder (leaving out a
    right-padding mask changes none of its hidden states, :func:`dpokit.logprobs.causal_mask_suffices`)."""
    from dpokit.logprobs import causal_mask_suffices

    implementation = attention_implementation(model)
    if implementation != "sdpa":
        raise ConfigError(
            f"distributed.sequence_parallel needs model.attn_implementation=sdpa; the model runs '{implementation}'"
        )
    if not causal_mask_suffices(model):
        raise ConfigError(
            f"distributed.sequence_parallel needs a plain causal decoder, and {type(model).__name__} "
            "attends otherwise (its hidden states change without the padding mask); set distributed.sequence_parallel=1"
        )
    register_attention()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = SEQUENCE_PARALLEL_ATTENTION
    return model


def _right_padded_rows(batch: Batch) -> bool:
    mask = batch.attention_mask
    return mask.dim() == 2 and (mask.shape[1] < 2 or bool((mask[:, 1:] <= mask[:, :-1]).all()))


def sharded_logps(model: nn.Module, batch: Batch, sequence: SequenceGroup, *, chunk_size: int = 1024) -> SequenceLogps:
    """:func:`dpokit.logprobs.compute_logps` with every row split over ``sequence``'s ranks (see the
    module docstring); every rank of the group gets the same result and passes the same ``batch``."""
    if not _right_padded_rows(batch) or batch.position_ids is not None or batch.image_inputs:
        raise TrainingError(
            "sequence parallelism takes the padded layout only (one right-padded row per response, text only); "
            "set data.layout=padded"
        )
    head = checked_output_head(model, batch.input_ids)
    rows, width = batch.input_ids.shape
    local = sequence.slice_length(width)
    start = sequence.rank * local
    input_ids = F.pad(batch.input_ids, (0, local * sequence.size - width))[:, start : start + local]
    positions = torch.arange(start, start + local, device=input_ids.device).expand(rows, local)
    decoder = model.get_decoder()  # type: ignore[operator]  # transformers method via nn.Module.__getattr__
    outputs = decoder(input_ids=input_ids, position_ids=positions, use_cache=False, sequence_group=sequence)
    hidden: Tensor = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    row, column = batch.score_index // width, batch.score_index % width
    mine = (column >= start) & (column < start + local)
    index = (row * local + column - start)[mine]
    scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    own = head_token_logps(head, scored, batch.score_target[mine], chunk_size)
    token_logps = torch.zeros(batch.score_index.shape[0], dtype=own.dtype, device=own.device)
    token_logps = _SumOverGroup.apply(token_logps.index_put((mine.nonzero().squeeze(1),), own), sequence.group)  # type: ignore[no-untyped-call]
    sequence_logps = torch.zeros(batch.num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    sequence_logps = sequence_logps.index_add(0, batch.score_seq, token_logps)
    logps = sequence_logps.view(batch.num_responses, batch.batch_size).t()
    return SequenceLogps(logps=logps, lengths=batch.response_lengths, token_logps=token_logps)


# Models checked once to give the same log-probs split over their group as whole.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def verify_split(model: nn.Module, sequence: SequenceGroup, device: torch.device) -> None:
    """Once per model (on every rank of the group together): a small batch whose rows the slices cut
    mid-prompt and mid-response must give the same log-probs split as whole, so a model whose
    attention does not pass ``sequence_group`` down (and would attend to its own slice only)
    fails loudly instead of training on wrong log-probs."""
    if model in _VERIFIED:
        return
    from dpokit.data.collate import PaddedCollator

    vocab = int(getattr(model.get_input_embeddings(), "num_embeddings", 0) or 16)  # type: ignore[operator]
    tokens = [(7 * i + 3) % vocab for i in range(4 * sequence.size + 3)]
    items = [{"example_id": 0, "prompt_ids": tokens[:3], "response_ids": [tokens[3:], tokens[5:9]]}]
    batch = PaddedCollator(0)(items).to(device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            split = sharded_logps(model, batch, sequence).logps.float()
            whole = compute_logps(model, batch).logps.float()
    finally:
        for module, training in modes:
            module.training = training
    if not torch.allclose(split, whole, rtol=1e-3, atol=1e-3 * (1.0 + whole.abs().max().item())):
        raise ConfigError(
            f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) gives different log-probs with its rows "
            "split over the sequence-parallel group than whole: its attention does not take dpokit's sequence-parallel "
            "attention; set distributed.sequence_parallel=1 for this model"
        )
    _VERIFIED[model] = True
