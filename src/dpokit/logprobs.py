"""Response log-probabilities from a causal LM, without materialising the full logits.

For scored token m (see :mod:`dpokit.data.batch`) with final hidden state ``h_m`` (H,), output
weight ``W`` (V, H), optional bias ``b`` (V,) and target token ``y_m``:

    z_m = g(h_m W^T + b)                                   logits; g = the model's logit transform
    log p(y_m) = z_m[y_m] - logsumexp_v z_m[v]
    log pi(y_s | x) = sum_{m : score_seq[m] = s} log p(y_m)

``g`` is identity for most models, ``a * z`` for models that scale logits (Cohere ``logit_scale``,
Granite ``1 / logits_scaling``, ...) and ``c * tanh(z / c)`` for soft-capped ones (Gemma 2/3
``final_logit_softcapping``); the per-architecture table is :func:`dpokit.compat.logit_scale`.

Why chunked: the naive ``log_softmax(model(...).logits)`` holds a float32 (N, T, V) tensor (and
autograd keeps another for backward) -- 2 GiB for one 2k-token sequence with a 128k vocabulary.
Here only the M response positions are projected, ``chunk_size`` rows at a time, and the forward
keeps nothing beyond its inputs and the (M,) result. The backward recomputes each chunk's logits
and forms the exact gradient

    d log p(y_m) / d z_m = onehot(y_m) - softmax(z_m),

so peak memory for the output layer grows with ``chunk_size x V``, not with ``N x T x V``. The chunk
is also capped so one chunk's float32 logits stay within ``LOGITS_CHUNK_BYTES`` (64 MiB): 1,024 tokens
at a 4k-32k vocabulary's worth of budget shrink to 64 tokens at 256k, so memory does not grow with the
vocabulary beyond the output layer's own weights and gradient.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dpokit.compat import attention_implementation, final_logit_softcap, logit_scale, text_config
from dpokit.data.batch import Batch
from dpokit.errors import ConfigError, TrainingError

__all__ = [
    "SequenceLogps",
    "OutputHead",
    "attention_inputs",
    "multimodal_inputs",
    "image_token_types",
    "image_layout_problem",
    "causal_mask_suffices",
    "custom_mask_problem",
    "compute_logps",
    "checked_output_head",
    "chunked_token_logps",
    "find_output_head",
    "head_token_logps",
    "final_hidden_states",
]


@dataclass
class SequenceLogps:
    """Log-probs of every response in a batch.

    ``logps`` (B, K): summed log pi(y_k | x) per response (0 where ``response_mask`` is False);
    ``lengths`` (B, K): scored tokens per response; ``token_logps`` (M,): log p of each scored token,
    in the batch's ``score_*`` order (float32).
    """

    logps: Tensor
    lengths: Tensor
    token_logps: Tensor

    @property
    def mean_logps(self) -> Tensor:
        """(B, K) length-averaged log-probs, logps / max(lengths, 1)."""
        return self.logps / self.lengths.clamp(min=1).to(self.logps.dtype)


@dataclass
class OutputHead:
    """The output layer and what the model does to its logits: ``z = softcap(scale * (h W^T + b))``.

    ``module`` is the layer itself; ``weight``/``bias`` are set when it is a plain ``nn.Linear``
    (the fast, hand-written backward); otherwise the module is called per chunk under activation
    checkpointing (e.g. an output layer wrapped by LoRA).
    """

    module: nn.Module
    weight: Tensor | None
    bias: Tensor | None
    scale: float = 1.0
    softcap: float | None = None

    def transform(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def find_output_head(model: nn.Module) -> OutputHead:
    """The output layer (``model.get_output_embeddings()``, tied or not) and the logit transform
    from the model's config."""
    module = model.get_output_embeddings()  # type: ignore[operator]  # transformers method via nn.Module.__getattr__
    if module is None:
        raise TrainingError(
            f"{type(model).__name__} has no output layer (get_output_embeddings() is None); dpokit needs a causal language model"
        )
    config = text_config(model)
    plain_linear = type(module) is nn.Linear and module.weight.is_floating_point()
    return OutputHead(
        module=module,
        weight=module.weight if plain_linear else None,
        bias=module.bias if plain_linear else None,
        scale=logit_scale(config),
        softcap=final_logit_softcap(config),
    )


class _ChunkedLinearLogProb(torch.autograd.Function):
    """log softmax(g(h W^T + b))[y] for M rows, chunk by chunk; saves only the inputs and recomputes
    each chunk's logits (and softmax) in backward. Logits are formed in the weight's dtype and raised to float32 (as a model's
    own ``.float()`` logits are); gradients are exact for that computation."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk_size: int,
        scale: float,
        softcap: float | None,
    ) -> Tensor:
        num_tokens = hidden.shape[0]
        token_logps = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            logits = _chunk_logits(hidden[start:stop], weight, bias, scale, softcap)[0]
            # log_softmax is one fused pass on CPU and GPU (about 3x faster than logsumexp on CPU).
            token_logps[start:stop] = torch.log_softmax(logits, dim=-1).gather(1, targets[start:stop, None]).squeeze(1)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size, ctx.scale, ctx.softcap = chunk_size, scale, softcap
        return token_logps

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulate over chunks in float32 whatever the parameter dtype.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        grad_out = grad_out.float()
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:stop]
            logits, tanh_value = _chunk_logits(hidden_chunk, weight, bias, ctx.scale, ctx.softcap)
            g = grad_out[start:stop, None]
            # d/dz [z_y - logsumexp z] = onehot(y) - softmax(z); built in place in the logits buffer.
            grad_logits = torch.softmax(logits, dim=-1).mul_(-g)
            del logits
            grad_logits.scatter_add_(1, targets[start:stop, None], g)
            if tanh_value is not None:  # soft-capped
                grad_logits.mul_(1.0 - tanh_value.square_())  # d/du c tanh(u / c) = 1 - tanh^2
            if ctx.scale != 1.0:
                grad_logits.mul_(ctx.scale)
            if grad_hidden is not None:
                grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden_chunk.float())
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(dim=0))
            del grad_logits, tanh_value
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def _chunk_logits(
    hidden_chunk: Tensor, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None
) -> tuple[Tensor, Tensor | None]:
    """float32 logits g(h W^T + b) of one chunk, and tanh(u / c) when soft-capped (for backward)."""
    logits = F.linear(hidden_chunk.to(weight.dtype), weight, bias).float()
    if scale != 1.0:
        logits.mul_(scale)
    tanh_value = None
    if softcap is not None:
        tanh_value = torch.tanh(logits / softcap)
        logits = tanh_value * softcap
    return logits, tanh_value


LOGITS_CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk: chunk tokens x V x 4 bytes at most


def effective_chunk_size(chunk_size: int, vocab_size: int) -> int:
    """``chunk_size`` capped so one chunk's float32 logits (tokens x ``vocab_size`` x 4 bytes) fit in
    :data:`LOGITS_CHUNK_BYTES`; at least one token. E.g. 1,024 at V = 4,096 (16 MiB), 512 at V = 32,768,
    64 at V = 262,144."""
    return max(1, min(int(chunk_size), LOGITS_CHUNK_BYTES // (4 * max(1, int(vocab_size)))))


def chunked_token_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """log softmax(g(hidden W^T + b))[targets] for ``hidden`` (M, H), ``weight`` (V, H),
    ``targets`` (M,) long; returns (M,) float32. Peak extra memory ~ a few ``chunk x V`` float32
    buffers, ``chunk`` = :func:`effective_chunk_size` of ``chunk_size``; gradients flow to ``hidden``,
    ``weight`` and ``bias`` exactly."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk_size = effective_chunk_size(chunk_size, weight.shape[0])
    # torch types Function.apply without annotations.
    token_logps: Tensor = _ChunkedLinearLogProb.apply(  # type: ignore[no-untyped-call]
        hidden, weight, bias, targets, int(chunk_size), float(scale), softcap
    )
    return token_logps


def _module_token_logps(head: OutputHead, hidden: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """Fallback for output layers that are not a plain ``nn.Linear``: call the module per chunk under
    non-reentrant activation checkpointing, so only one chunk's logits live at a time in backward."""

    def chunk_logps(hidden_chunk: Tensor, target_chunk: Tensor) -> Tensor:
        logits = head.transform(head.module(hidden_chunk).float())
        return logits.gather(1, target_chunk[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        pieces.append(checkpoint(chunk_logps, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk_logps(h, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


# Attention implementations known to apply a custom (N, 1, T, T) mask exactly.
_DENSE_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")


def attention_inputs(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """``batch.model_inputs()`` adapted to the model's attention implementation.

    A 2-D padding mask with padding on the right only is left out for SDPA (see
    :func:`causal_mask_suffices`); any other 2-D mask goes through unchanged. A 4-D boolean mask
    (shared-prompt / packed layouts, True = may attend) is given as is to SDPA; eager attention
    *adds* its mask to the scores, so it
    gets the additive form (0 where allowed, the dtype's minimum elsewhere) in the model's dtype.
    FlexAttention on CUDA gets a ``BlockMask`` built from ``extras["block_id"]``/``["segment_id"]``
    (so fully masked 128x128 tiles are skipped); elsewhere FlexAttention falls back to the additive
    dense mask. Implementations that ignore custom masks (flash-attention kernels) raise ConfigError.
    """
    inputs: dict[str, Any] = {**batch.model_inputs(), **multimodal_inputs(model, batch)}
    mask = batch.attention_mask
    implementation = attention_implementation(model)
    if mask.dim() != 4:
        if implementation == "sdpa" and mask.dim() == 2 and causal_mask_suffices(model) and _right_padded(mask):
            del inputs["attention_mask"]
        return inputs
    if implementation not in _DENSE_MASK_ATTENTION:
        raise ConfigError(
            f"the '{getattr(model.config, 'model_type', '?')}' model uses attn_implementation='{implementation}', which does "
            "not apply the custom 4-D attention mask of the shared_prompt/packed layouts; set model.attn_implementation=sdpa "
            "(or eager / flex_attention), or data.layout=padded"
        )
    if implementation == "sdpa":
        inputs["attention_mask"] = mask if mask.dtype == torch.bool else mask.bool()
        return inputs
    if implementation == "flex_attention" and mask.device.type == "cuda" and "block_id" in batch.extras:
        inputs["attention_mask"] = flex_block_mask(batch.extras["block_id"], batch.extras["segment_id"])
        return inputs
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    inputs["attention_mask"] = additive.masked_fill_(~mask.bool(), torch.finfo(dtype).min)
    return inputs


def flex_block_mask(block_id: Tensor, segment_id: Tensor) -> Any:
    """A FlexAttention ``BlockMask`` for the shared-prompt rule (:func:`dpokit.data.collate.may_attend`)
    from (N, T) block and segment ids. CUDA only in practice (untested on GPU in this release);
    on CPU the dense mask is used instead."""
    from torch.nn.attention.flex_attention import create_block_mask

    from dpokit.data.collate import may_attend

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return may_attend(block_id[b, q_idx], segment_id[b, q_idx], q_idx, block_id[b, kv_idx], segment_id[b, kv_idx], kv_idx)

    rows, width = block_id.shape
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=block_id.device)


def _right_padded(mask: Tensor) -> bool:
    """Whether every row of a (N, T) 0/1 mask is ones followed by zeros (padding on the right only)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all()) if mask.shape[1] > 1 else True


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) without gradients, each module's mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


# Models checked once for whether leaving out a right-padding mask changes their hidden states.
_CAUSAL_SUFFICES: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


class _MaskLeftOutOnPurpose(logging.Filter):
    """Drops transformers' "We strongly recommend passing in an `attention_mask`" warning (GPT-2 and
    others print it when the last or first column holds the pad id and no mask is given). dpokit leaves
    the mask out only for right-padded rows of a model checked to give the same hidden states without
    it (:func:`causal_mask_suffices`), where the advice does not apply; every other forward has its mask."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


def _silence_mask_advice() -> None:
    """Install :class:`_MaskLeftOutOnPurpose` on transformers' modelling logger (once)."""
    target = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _MaskLeftOutOnPurpose) for f in target.filters):
        target.addFilter(_MaskLeftOutOnPurpose())


def causal_mask_suffices(model: nn.Module) -> bool:
    """Whether ``model`` gives the same hidden states at real tokens of right-padded rows without
    their 2-D padding mask.

    In a causal decoder a real token attends only to earlier positions, and in a right-padded row
    those are never padding, so the padding mask changes nothing that is scored. Left out, SDPA runs
    its causal kernel (the upper triangle skipped) and transformers builds no (N, 1, T, T) mask, so
    attention memory grows linearly with the row length instead of quadratically. Checked once per
    model on a two-row batch with the padding mask and without; a model whose attention is not
    purely causal (a bidirectional prefix, say) fails the check and keeps its mask."""
    verdict = _CAUSAL_SUFFICES.get(model)
    if verdict is not None:
        return verdict
    from dpokit.data.collate import PaddedCollator

    _silence_mask_advice()

    device = next(model.parameters()).device
    items = [{"example_id": 0, "prompt_ids": [3, 4, 5], "response_ids": [[6, 7, 8, 9, 10]]}]
    items.append({"example_id": 1, "prompt_ids": [5, 4], "response_ids": [[3]]})
    batch = PaddedCollator(0)(items).to(device)
    inputs = batch.model_inputs()
    real = batch.attention_mask.bool()
    with _eval_mode(model):
        masked = final_hidden_states(model, inputs)[real].float()
        causal = final_hidden_states(model, {k: v for k, v in inputs.items() if k != "attention_mask"})[real].float()
    verdict = bool(torch.allclose(masked, causal, rtol=1e-2, atol=1e-2 * (1.0 + masked.abs().max().item())))
    _CAUSAL_SUFFICES[model] = verdict
    return verdict


# Models whose attention was checked to honour a custom 4-D mask and restarted position ids.
_MASK_VERIFIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _verify_custom_mask(model: nn.Module, input_ids: Tensor) -> None:
    """Once per model: a two-example batch in the shared-prompt layout must give the same log-probs
    as the padded layout, so a model whose attention silently ignores 4-D masks or position ids
    fails loudly (ConfigError) instead of training on responses that see each other."""
    if model in _MASK_VERIFIED:
        return
    from dpokit.data.collate import PaddedCollator, SharedPromptCollator

    ids = input_ids.reshape(-1)[:1].tolist() or [0]
    vocab = int(getattr(model.get_input_embeddings(), "num_embeddings", 0) or 0)  # type: ignore[operator]  # transformers method via nn.Module.__getattr__
    tokens = [(ids[0] + i) % vocab if vocab else ids[0] for i in range(1, 9)]
    items = [
        {"example_id": 0, "prompt_ids": tokens[:3], "response_ids": [tokens[3:6], tokens[6:8]]},
        {"example_id": 1, "prompt_ids": tokens[5:7], "response_ids": [tokens[0:2], tokens[2:5]]},
    ]
    device = input_ids.device
    with _eval_mode(model):
        padded = _sequence_logps(model, PaddedCollator(0)(items).to(device), 1024).logps
        shared = _sequence_logps(model, SharedPromptCollator(0)(items).to(device), 1024).logps
    if not torch.allclose(padded.float(), shared.float(), rtol=1e-2, atol=1e-2 * (1.0 + padded.abs().max().item())):
        raise ConfigError(
            f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}, attn_implementation="
            f"'{attention_implementation(model)}') gives different log-probs in the shared-prompt layout than in the padded "
            "one: its attention ignores custom 4-D masks or position ids. Use data.layout=padded for this model."
        )
    _MASK_VERIFIED[model] = True


def custom_mask_problem(model: nn.Module) -> str | None:
    """Why the model cannot take the shared-prompt and packed layouts' custom 4-D masks (its attention
    implementation takes none, or it ignores them: checked once on a tiny batch), or None when it can."""
    implementation = attention_implementation(model)
    if implementation not in _DENSE_MASK_ATTENTION:
        return f"attn_implementation '{implementation}' takes no custom 4-D masks"
    try:
        _verify_custom_mask(model, torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    except ConfigError:
        return "the model's attention ignores custom 4-D masks"
    return None


TEXT_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids"})


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def forward_parameters(module: nn.Module) -> frozenset[str]:
    """The parameter names of ``module``'s ``forward`` (read once per module class)."""
    cls = type(module)
    if cls not in _FORWARD_PARAMETERS:
        import inspect

        _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _FORWARD_PARAMETERS[cls]


# Image-text models whose language model attends both ways among each image's tokens, marked by
# token_type_ids = 1 (built into the model's own mask; the shared-prompt layouts' 4-D mask has no such rule).
BIDIRECTIONAL_IMAGE_MODELS = frozenset({"gemma3"})


def image_layout_problem(model: nn.Module) -> str | None:
    """Why prompts with images must stay in the ``padded`` layout for ``model`` (its attention over image
    tokens is not causal, which the shared-prompt layouts' mask does not express), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in BIDIRECTIONAL_IMAGE_MODELS:
        return (
            f"the '{model_type}' model attends both ways among each image's tokens (token_type_ids), which the "
            "shared_prompt and packed layouts' attention mask does not express"
        )
    return None


def multimodal_inputs(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """What a batch with images also needs beyond the token rows and the image processor's tensors, as
    the model's processor would write it: :func:`image_token_types`, and for the Qwen2-VL family in a layout
    that writes position ids (``shared_prompt``, ``packed``) the (3, N, T) positions themselves
    (:func:`rope_positions`; in ``padded`` the model computes them from the token types). Gemma 3
    (:data:`BIDIRECTIONAL_IMAGE_MODELS`) takes ``padded`` only (a 4-D mask layout is a ConfigError). Empty for
    other models and for batches without images."""
    if not batch.image_inputs:
        return {}
    body = multimodal_body(model)
    extra = image_token_types(body, batch.input_ids)
    if "token_type_ids" in extra and batch.attention_mask.dim() == 4:
        raise ConfigError(f"{image_layout_problem(body)}; use data.layout=padded (layout: auto picks it for this model)")
    if "mm_token_type_ids" in extra and batch.position_ids is not None:
        extra["position_ids"] = rope_positions(body, batch, extra["mm_token_type_ids"])
    return extra


def image_token_types(body: nn.Module, input_ids: Tensor) -> dict[str, Tensor]:
    """The token types a multimodal ``body`` reads beside rows ``input_ids`` that hold image tokens, as its
    processor writes them: the Qwen2-VL family (``mm_token_type_ids`` in the body's ``forward``) 1 on image
    tokens, 2 on video tokens, 0 on text, from which it computes its 3-D rotary positions; Gemma 3
    (:data:`BIDIRECTIONAL_IMAGE_MODELS`) ``token_type_ids`` 1 on image tokens, from which it lets each image's
    tokens attend to each other. Empty for other models."""
    config: Any = body.config  # the whole model's configuration: its image and video token ids
    if config.model_type in BIDIRECTIONAL_IMAGE_MODELS:
        return {"token_type_ids": (input_ids == config.image_token_id).long()}
    if "mm_token_type_ids" not in forward_parameters(body):
        return {}
    types = torch.zeros_like(input_ids)
    for value, name in ((1, "image_token_id"), (2, "video_token_id")):
        token = getattr(config, name, None)
        if isinstance(token, int):
            types = types.masked_fill(input_ids == token, value)
    return {"mm_token_type_ids": types}


def rope_positions(body: nn.Module, batch: Batch, token_types: Tensor) -> Tensor:
    """(3, N, T) rotary positions (time, height, width) of a layout that writes each prompt once
    (``extras["block_id"]``/``["segment_id"]``): each prompt's from the model's own ``get_rope_index``
    (images get their grid positions, text the next position on all three axes), and each response's
    continuing from its prompt's largest position + 1 on all three axes -- the positions the padded row
    ``prompt + response`` gets. Padding gets 0."""
    get_rope_index = getattr(body, "get_rope_index", None)
    if get_rope_index is None or "block_id" not in batch.extras or batch.position_ids is None:
        raise ConfigError(
            f"the '{getattr(body.config, 'model_type', '?')}' model takes 3-D rotary positions that dpokit cannot compute "
            "for a layout that shares the prompt; use data.layout=padded"
        )
    block, segment = batch.extras["block_id"], batch.extras["segment_id"]
    # The prompts in the order the layout wrote them (row by row, left to right): the images' order.
    spans: list[tuple[int, Tensor]] = []
    for n in range(block.shape[0]):
        prompt_columns = ((segment[n] == 0) & (block[n] >= 0)).nonzero().squeeze(1)
        for b in dict.fromkeys(block[n, prompt_columns].tolist()):
            spans.append((n, prompt_columns[block[n, prompt_columns] == b]))
    width = max((len(columns) for _, columns in spans), default=0)
    prompts = torch.zeros(len(spans), width, dtype=batch.input_ids.dtype, device=block.device)
    types = torch.zeros_like(prompts)
    mask = torch.zeros_like(prompts)
    for j, (n, columns) in enumerate(spans):
        prompts[j, : len(columns)] = batch.input_ids[n, columns]
        types[j, : len(columns)] = token_types[n, columns]
        mask[j, : len(columns)] = 1
    grids = {k: v for k, v in batch.image_inputs.items() if k.endswith("grid_thw")}
    prompt_positions, deltas = get_rope_index(input_ids=prompts, mm_token_type_ids=types, attention_mask=mask, **grids)
    # Response tokens: 1-D position P + t becomes P + t + delta, delta = (prompt's largest position + 1) - P.
    positions = batch.position_ids.to(prompt_positions.dtype)[None].repeat(3, 1, 1)
    for j, (n, columns) in enumerate(spans):
        responses = (block[n] == block[n, columns[0]]) & (segment[n] > 0)
        positions[:, n, responses] += deltas[j].to(positions.dtype)
        positions[:, n, columns] = prompt_positions[:, j, : len(columns)]
    positions[:, block < 0] = 0
    return positions


def multimodal_body(model: nn.Module) -> nn.Module:
    """The network of an image-text-to-text model without its output layer (``LlavaModel``,
    ``Idefics3Model``, ...: vision tower, projector and language model), through a peft wrapper: the
    transformers ``base_model`` (the module named by ``base_model_prefix``) of the wrapped model."""
    inner: Any = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    body = getattr(inner, "base_model", None)
    if not isinstance(body, nn.Module) or body is inner:
        raise TrainingError(
            f"{type(inner).__name__} takes no images: the batch has image inputs but the model has no multimodal body; "
            "train an image-text-to-text model (AutoModelForImageTextToText) on data with images"
        )
    return body


def final_hidden_states(model: nn.Module, model_inputs: dict[str, Tensor]) -> Tensor:
    """(N, T, H) hidden states after the final norm, from the model's decoder (the network without
    its output layer). Works through peft wrappers: LoRA layers live inside the decoder, so they
    apply, and ``with model.disable_adapter():`` switches them off. Inputs beyond the token rows
    (``pixel_values`` and the like) go to the :func:`multimodal_body`, which places each image's
    features at its image tokens."""
    # With images, the multimodal body merges the image features into the token embeddings.
    text_only = TEXT_INPUTS.issuperset(model_inputs)
    decoder = model.get_decoder() if text_only else multimodal_body(model)  # type: ignore[operator]  # transformers method
    outputs = decoder(**model_inputs, use_cache=False)
    hidden: Tensor = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden


# Models whose decoder + output-head decomposition was checked against their own logits.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _verify_decomposition(model: nn.Module, head: OutputHead, input_ids: Tensor) -> None:
    """Once per model: the logits dpokit rebuilds from the decoder and :class:`OutputHead` must equal
    the model's own on a few tokens, so an architecture with an unknown logit transform fails loudly
    instead of training on wrong log-probs. Runs in eval mode (no dropout), without gradients."""
    if model in _VERIFIED:
        return
    _silence_mask_advice()  # both sides see the same unmasked tokens
    with _eval_mode(model):
        ids = input_ids[:1, : min(8, input_ids.shape[1])]
        expected = model(input_ids=ids, use_cache=False).logits.float()
        hidden = final_hidden_states(model, {"input_ids": ids})
        rebuilt = head.transform(head.module(hidden).float())
    tolerance = 1e-3 * (1.0 + expected.abs().max().item())
    if expected.shape != rebuilt.shape or (expected - rebuilt).abs().max().item() > tolerance:
        raise TrainingError(
            f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}): its logits differ from "
            "output_layer(decoder hidden states); the model transforms logits in a way dpokit does not know. "
            "Please report the model type."
        )
    _VERIFIED[model] = True


def checked_output_head(model: nn.Module, input_ids: Tensor) -> OutputHead:
    """:func:`find_output_head`, checked once per model against the model's own logits on a few of
    ``input_ids``' tokens (TrainingError for a logit transform dpokit does not know)."""
    head = find_output_head(model)
    _verify_decomposition(model, head, input_ids)
    return head


def head_token_logps(head: OutputHead, hidden: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """(M,) float32 log p(target) of hidden states (M, H) through the output layer, ``chunk_size`` rows
    at a time: the hand-written backward of :func:`chunked_token_logps` for a plain ``nn.Linear``,
    else the module per chunk under activation checkpointing."""
    if head.weight is None:
        return _module_token_logps(head, hidden, targets, chunk_size)
    return chunked_token_logps(
        hidden, head.weight, targets, bias=head.bias, chunk_size=chunk_size, scale=head.scale, softcap=head.softcap
    )


def compute_logps(model: nn.Module, batch: Batch, *, chunk_size: int = 1024) -> SequenceLogps:
    """Summed and per-token log-probs of every scored response token in ``batch``.

    One decoder forward over the batch's model inputs (adapted to the attention implementation by
    :func:`attention_inputs`) gives hidden states (N, T, H); the rows at ``score_index`` (M, H) go
    through the output layer in chunks of ``chunk_size`` tokens (:func:`chunked_token_logps`);
    per-token values are summed per scored sequence s = k * B + b and returned as (B, K). The row
    layout is never inspected; a 4-D mask layout is checked once per model against the padded one.
    """
    head = checked_output_head(model, batch.input_ids)
    if batch.attention_mask.dim() == 4:
        _verify_custom_mask(model, batch.input_ids)
    return _sequence_logps(model, batch, chunk_size, head)


def _sequence_logps(model: nn.Module, batch: Batch, chunk_size: int, head: OutputHead | None = None) -> SequenceLogps:
    head = head or find_output_head(model)
    hidden = final_hidden_states(model, attention_inputs(model, batch))
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    scored_hidden = flat_hidden.index_select(0, batch.score_index)
    token_logps = head_token_logps(head, scored_hidden, batch.score_target, chunk_size)
    num_sequences = batch.num_sequences
    sequence_logps = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    sequence_logps = sequence_logps.index_add(0, batch.score_seq, token_logps)
    logps = sequence_logps.view(batch.num_responses, batch.batch_size).t()
    return SequenceLogps(logps=logps, lengths=batch.response_lengths, token_logps=token_logps)
