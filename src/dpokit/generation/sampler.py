"""dpokit's own generator: the batched sampler behind the `dpokit` sampling engine.

One batched generator, :func:`generate`, serves the ``dpokit`` sampling engine
(:class:`dpokit.generation.engines.DpokitEngine`, behind ``dpokit generate``, ``dpokit winrate`` and
the online rounds), the trainer's evaluation samples (:func:`policy_and_reference_samples`), the reward-KL frontier
(:func:`sample_with_kl`) and the experiments (:func:`sample_completions`). For N prompt rows
(``len(prompt_ids) * num_samples``, prompt-major) it

* left-pads each batch of rows to a common width P (position ids restart at 0 at each row's first
  real token, so a padded row computes what it would alone), runs the prompt once and then one token
  per step against the model's KV cache (a module that returns no cache gets the whole prefix again);
* picks each next token greedily (``temperature == 0``) or by sampling from
  ``softmax(logits / temperature)`` restricted to the top-k tokens and the top-p nucleus;
* stops a row at its first stop token (EOS, and a chat template's end-of-turn token, see
  :func:`stop_token_ids`) -- kept as the completion's last token -- or after ``max_new_tokens``;
* optionally scores every completion by teacher forcing (:func:`completion_logps`):
  ``log pi(y|x) = sum_t log softmax(logits)[y_t]`` under the policy and under a reference model.

Sampling is reproducible and independent of the batch: the row for sample ``j`` of prompt ``i``
draws its uniforms ``u[j, t]`` (float64, on the CPU) from a generator seeded with ``seed + i`` and
picks token ``min{v : F_t(v) > u[j, t]}`` (inverse CDF of the step's distribution ``F_t``). So a
prompt's samples do not depend on which prompts share its batch, the batch size or the device the
model runs on (beyond the model's own floating-point differences).

Prompts are plain text or chat messages (``[{"role": "user", "content": ...}]``); chat prompts go
through the tokenizer's chat template with the generation prompt appended (``<|im_start|>assistant\\n``
for ChatML), exactly as the data pipeline formats them for training (:func:`format_prompt`).

Prompts with images (a vision-language model): each image placeholder of the tokenized prompt becomes
the image's tokens as the model's processor expands it (:class:`~dpokit.data.images.ImageTokens`, as in
training), and the image processor's tensors go with the prompt's rows into the forward pass that reads
the prompt (and, for a model without a KV cache, into every pass); decoding steps need no images.
Models that place or attend to image tokens unlike text get what their processor would give them
(:func:`_row_inputs`, from :func:`dpokit.logprobs.image_token_types`, as in training): Gemma 3 its
``token_type_ids`` in the pass that reads the prompt; the Qwen2-VL family its ``mm_token_type_ids`` and
3-D rotary positions from its own ``get_rope_index`` (left padding masked out), each decoding step
continuing at its row's largest prompt position + 1 + step on all three axes. Teacher forcing
(:func:`completion_logps`) gives them the same. A model whose image inputs dpokit cannot build is refused
with a ConfigError naming its type.
A vision-language model never samples its image tokens (:func:`image_token_ids`; their logits are set to -inf
before each choice, greedy or sampled): a completion holding one could not be scored or trained on (the
model would look for an image to put there), and no text answer needs one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpokit.compat import kv_cache_keyword
from dpokit.data.images import ImageTokens, decode_image, image_inputs
from dpokit.data.prompts import Prompt
from dpokit.errors import ConfigError, DataError
from dpokit.logprobs import forward_parameters, image_token_types, multimodal_body
from dpokit.models import pad_id_of

# Rows (prompt x sample) per forward pass when a caller does not say.
DEFAULT_BATCH_SIZE = 64
# End-of-turn markers of common chat templates; generation stops at them as at EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class SamplingConfig:
    """How completions are drawn. The defaults are ``dpokit generate``'s.

    ``temperature == 0`` is greedy decoding (``top_p``/``top_k``/``seed`` then do not matter);
    ``top_k == 0`` and ``top_p == 1`` switch those filters off; ``seed`` seeds prompt ``i`` with
    ``seed + i``.
    """

    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for settings no sampler can use."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be at least 1, got {self.num_samples}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Completion:
    """One generated completion, as token ids.

    ``token_ids`` end with the stop token when one ended the completion (``stopped``);
    ``sampling_logp`` is ``sum_t log q_t(y_t)`` under the distributions the tokens were drawn from
    (tempered and truncated; the model's own softmax for greedy decoding), accumulated while
    generating. ``policy_logp`` / ``reference_logp`` are the teacher-forced ``log pi(y|x)`` /
    ``log pi_ref(y|x)`` when they were asked for.
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    stopped: bool
    sampling_logp: float
    policy_logp: float | None = None
    reference_logp: float | None = None

    @property
    def content_ids(self) -> list[int]:
        """The completion without its stop token."""
        return self.token_ids[:-1] if self.stopped else self.token_ids


# --------------------------------------------------------------------------------------------------
# Padding, positions, the KV cache
# --------------------------------------------------------------------------------------------------


def _left_padded(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) ids and 0/1 mask, rows aligned to the right edge (so generation appends at column T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding gets position 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _forward(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: Any,
    extra: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Last-position logits (N, V) and the updated KV cache (None when the model keeps none); ``extra``: the
    image processor's tensors for the prompts' images and the model's token types (:func:`_row_inputs`),
    when ``ids`` holds their tokens."""
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
    kwargs.update(extra or {})
    if cache is not None:
        kwargs[kv_cache_keyword()] = cache
    out = model(**kwargs)
    return out.logits[:, -1, :], getattr(out, kv_cache_keyword(), None)


def _row_inputs(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, images: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Position ids, the inputs beyond the token rows, and each row's rotary offset for rows ``ids`` (N, T)
    with 0/1 ``mask`` whose prompts hold the images of ``images`` (the image processor's tensors).

    Without images, and for models that place image tokens like text (LLaVA, Idefics3): 1-D positions from
    0 at each row's first real token, and ``images`` as they are; offset None. Gemma 3 also gets
    ``token_type_ids`` (1 on image tokens; it lets each image's tokens attend to each other). The Qwen2-VL
    family gets ``mm_token_type_ids`` and (3, N, T) positions from its own ``get_rope_index`` given the rows,
    the mask and the images' grids, and the offset (N, 1) ``delta``: the token at 1-D position ``P`` after
    the rows sits at ``P + delta`` on all three axes (a row's largest position + 1 + step, as transformers'
    ``rope_deltas``). Token types dpokit does not know how to give are a ConfigError naming the model type
    (:func:`dpokit.logprobs.image_token_types` writes them as for training)."""
    if not images:
        return _positions(mask), {}, None
    body = multimodal_body(model)
    token_types = image_token_types(body, ids)
    extra = {**images, **token_types}
    model_type = getattr(body.config, "model_type", "?")
    if "mm_token_type_ids" not in token_types:
        if "token_type_ids" not in token_types and "token_type_ids" in forward_parameters(body):
            raise ConfigError(
                f"the '{model_type}' model takes token types with its images, which dpokit's sampler does not know how to "
                "give it; sampling it with images is not supported"
            )
        return _positions(mask), extra, None
    get_rope_index = getattr(body, "get_rope_index", None)
    if get_rope_index is None:
        raise ConfigError(
            f"the '{model_type}' model takes 3-D rotary positions (mm_token_type_ids) but has no get_rope_index to compute "
            "them from; dpokit's sampler cannot sample it with images"
        )
    grids = {name: value for name, value in images.items() if name.endswith("grid_thw")}
    positions, deltas = get_rope_index(
        input_ids=ids, mm_token_type_ids=token_types["mm_token_type_ids"], attention_mask=mask, **grids
    )
    return positions, extra, deltas.to(mask.device).reshape(-1, 1)


def _next_positions(mask: torch.Tensor, deltas: torch.Tensor | None) -> torch.Tensor:
    """The position ids (N, 1) -- (3, N, 1) with rotary offsets ``deltas`` (see :func:`_row_inputs`) -- of
    the token each row appends at its mask's last column."""
    position = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
    return position if deltas is None else (position + deltas)[None].expand(3, -1, -1)


def image_token_ids(model: torch.nn.Module) -> list[int]:
    """The ids a vision-language model replaces with image (or video) features -- its config's
    ``image_token_id`` / ``image_token_index`` / ``video_token_id`` -- which a sampler must never emit;
    empty for a text model."""
    config = getattr(model, "config", None)
    found = {getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")}
    return sorted(int(token) for token in found if isinstance(token, int) and not isinstance(token, bool) and token >= 0)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _image_batch(
    model: torch.nn.Module, image_processor: Any, images: Sequence[Sequence[bytes]] | None, rows: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The image processor's tensors for the images of prompts ``rows`` (one entry per batch row, in row
    order), on the model's device and, for floating-point ones, in its dtype; empty without images."""
    if images is None:
        return {}
    out = image_inputs(image_processor, [images[p] for p in rows])
    device = _device_of(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in out.items()}


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Eval mode for ``models`` inside the block; each model's train/eval mode is restored after it."""
    present = [m for m in dict.fromkeys(models) if m is not None]
    modes = [m.training for m in present]
    for model in present:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(present, modes, strict=True):
            model.train(mode)


# --------------------------------------------------------------------------------------------------
# Choosing the next token
# --------------------------------------------------------------------------------------------------


def _truncated(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (N, V) with every token outside the top-k and outside the top-p nucleus set to -inf.

    The nucleus is the smallest set of likeliest tokens whose probability reaches ``top_p``: a token
    stays when the mass of the tokens ranked above it is still below ``top_p`` (so the first always stays).
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_tokens(
    logits: torch.Tensor, sampling: SamplingConfig, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row (N,) and its log-prob (N,) under the distribution it came from.

    Greedy: ``argmax(logits)``. Sampling: the inverse CDF of ``q = softmax(truncated(logits / T))``
    at the row's uniform ``u``: the first token ``v`` with ``sum_{w <= v} q_w > u * sum_w q_w``
    (computed in float64; tokens with ``q_v = 0`` can never be that first token).
    """
    logits = logits.float()
    if sampling.greedy or uniforms is None:
        log_probs = logits.log_softmax(-1)
        tokens = logits.argmax(-1)
    else:
        log_probs = _truncated(logits / sampling.temperature, sampling.top_k, sampling.top_p).log_softmax(-1)
        cdf = log_probs.double().exp().cumsum(-1)
        targets = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)
    return tokens, log_probs.gather(1, tokens[:, None]).squeeze(1)


def _row_uniforms(num_prompts: int, sampling: SamplingConfig) -> torch.Tensor:
    """(num_prompts * num_samples, max_new_tokens) float64 uniforms; prompt i's rows from seed + i."""
    blocks = []
    for prompt_index in range(num_prompts):
        generator = torch.Generator().manual_seed(sampling.seed + prompt_index)
        blocks.append(torch.rand((sampling.num_samples, sampling.max_new_tokens), dtype=torch.float64, generator=generator))
    return torch.cat(blocks) if blocks else torch.zeros((0, sampling.max_new_tokens), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# The batched generator
# --------------------------------------------------------------------------------------------------


def _decode_batch(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    uniforms: torch.Tensor | None,
    stop_ids: torch.Tensor,
    pad_token_id: int,
    images: dict[str, torch.Tensor] | None = None,
) -> tuple[list[list[int]], list[bool], list[float]]:
    """Complete one batch of prompt rows: (completion ids, stopped, summed sampling log-probs) per row.

    ``uniforms`` (N, max_new_tokens) drive the sampler (None for greedy). A row that has stopped
    keeps receiving pad tokens with mask 0 until every row has stopped or the length limit is hit.
    ``images``: the image tensors of the rows' prompts (see :func:`_image_batch`). A vision-language
    model's image tokens are never chosen (:func:`image_token_ids`).
    """
    device = _device_of(model)
    ids, mask = _left_padded(rows, pad_token_id)
    ids, mask, stop_ids = ids.to(device), mask.to(device), stop_ids.to(device)
    n, steps = ids.shape[0], sampling.max_new_tokens
    generated = torch.full((n, steps), pad_token_id, dtype=torch.long, device=device)
    logp_sum = torch.zeros(n, dtype=torch.float64, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    images = images or {}
    positions, extra, deltas = _row_inputs(model, ids, mask, images)
    logits, cache = _forward(model, ids, mask, positions, None, extra)
    banned = torch.tensor([t for t in image_token_ids(model) if t < logits.shape[-1]], dtype=torch.long, device=device)
    for t in range(steps):
        if len(banned):
            logits = logits.index_fill(1, banned, float("-inf"))
        next_tokens, logps = _next_tokens(logits, sampling, None if uniforms is None else uniforms[:, t])
        alive = ~done
        next_tokens = torch.where(alive, next_tokens, torch.full_like(next_tokens, pad_token_id))
        logp_sum += torch.where(alive, logps.double(), 0.0)
        generated[:, t] = next_tokens
        lengths += alive.long()
        done = done | (alive & torch.isin(next_tokens, stop_ids))
        if t == steps - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        if cache is not None:
            logits, cache = _forward(model, next_tokens[:, None], mask, _next_positions(mask, deltas), cache)
        else:
            ids = torch.cat([ids, next_tokens[:, None]], dim=1)
            positions, extra, _ = _row_inputs(model, ids, mask, images)
            logits, _ = _forward(model, ids, mask, positions, None, extra)
    completions = [generated[i, : int(lengths[i])].tolist() for i in range(n)]
    return completions, done.tolist(), logp_sum.tolist()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    score: bool = False,
    reference: torch.nn.Module | None = None,
    images: Sequence[Sequence[bytes]] | None = None,
    image_processor: Any = None,
) -> list[Completion]:
    """``sampling.num_samples`` completions of every tokenized prompt, prompt-major.

    ``images``: per prompt, its images (encoded files) when ``prompt_ids`` hold their image tokens
    (:func:`encode_prompts` with a processor); ``image_processor`` turns them into the model's inputs.

    Rows go through the model ``batch_size`` at a time (left-padded, KV-cached; see the module
    docstring). ``score=True`` adds each completion's teacher-forced ``policy_logp``; a
    ``reference`` model adds ``reference_logp`` as well (and implies ``score``). When ``reference
    is model`` the two are the same numbers, so ``policy_logp - reference_logp`` is exactly 0. Both
    models are in eval mode meanwhile and get their previous mode back.
    """
    sampling.validate()
    if any(len(ids) == 0 for ids in prompt_ids):
        raise DataError(f"prompt {next(i for i, ids in enumerate(prompt_ids) if len(ids) == 0)} has no tokens")
    rows = [(p, s) for p in range(len(prompt_ids)) for s in range(sampling.num_samples)]
    uniforms = None if sampling.greedy else _row_uniforms(len(prompt_ids), sampling)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
    completions: list[Completion] = []
    with eval_mode(model, reference):
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            ids, stopped, logps = _decode_batch(
                model,
                [prompt_ids[p] for p, _ in batch],
                sampling,
                None if uniforms is None else uniforms[start : start + len(batch)],
                stops,
                pad_token_id,
                _image_batch(model, image_processor, images, [p for p, _ in batch]),
            )
            completions += [Completion(p, s, c, d, lp) for (p, s), c, d, lp in zip(batch, ids, stopped, logps, strict=True)]
        if score or reference is not None:
            scoring = {"images": images, "image_processor": image_processor}
            _score(completions, model, reference, prompt_ids, pad_token_id=pad_token_id, batch_size=batch_size, **scoring)
    return completions


def _score(
    completions: list[Completion],
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int,
    images: Sequence[Sequence[bytes]] | None = None,
    image_processor: Any = None,
) -> None:
    """Fill in ``policy_logp`` (and ``reference_logp`` when there is a reference) by teacher forcing."""
    prompts = [prompt_ids[c.prompt_index] for c in completions]
    outputs = [c.token_ids for c in completions]
    row_images = None if images is None else [images[c.prompt_index] for c in completions]
    common = {"pad_token_id": pad_token_id, "batch_size": batch_size, "images": row_images, "image_processor": image_processor}
    policy = completion_logps(model, prompts, outputs, **common)
    if reference is None:
        ref = None
    elif reference is model:
        ref = policy
    else:
        ref = completion_logps(reference, prompts, outputs, **common)
    for index, completion in enumerate(completions):
        completion.policy_logp = float(policy[index])
        completion.reference_logp = None if ref is None else float(ref[index])


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 128,
    images: Sequence[Sequence[bytes]] | None = None,
    image_processor: Any = None,
) -> torch.Tensor:
    """``log pi(y|x) = sum_t log softmax(logits)[y_t]`` over completion tokens, shape (N,), float64.

    Rows are ``[pad ... prompt | completion ... pad]`` (prompt left-padded to a common width P,
    completion right-padded), so the logit at column ``P - 1 + t`` predicts completion token ``t``
    in every row. An empty completion has log-prob 0. ``images``: per row, the images whose tokens
    its prompt holds (see :func:`generate`).
    """
    device = _device_of(model)
    results = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        completions = completion_ids[start : start + batch_size]
        prompt_block, prompt_mask = _left_padded(prompts, pad_token_id)
        width = max(1, max(len(c) for c in completions))
        completion_block = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, c in enumerate(completions):
            completion_block[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
            completion_mask[i, : len(c)] = 1
        ids = torch.cat([prompt_block, completion_block], dim=1).to(device)
        mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
        pictures = _image_batch(model, image_processor, images, range(start, start + len(prompts)))
        positions, extra, _ = _row_inputs(model, ids, mask, pictures)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra).logits
        p = prompt_block.shape[1]
        predicting = logits[:, p - 1 : p - 1 + width, :].float().log_softmax(-1)  # (N, C, V)
        token_logps = predicting.gather(2, completion_block.to(device)[:, :, None]).squeeze(2)
        results.append((token_logps.double() * completion_mask.to(device)).sum(-1).cpu())
    return torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)


def sample_completions(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    seed: int = 0,
    num_samples: int = 1,
    temperature: float = 1.0,
    batch_size: int = 128,
) -> list[Completion]:
    """Ancestral sampling ``y ~ pi(.|x)``: every token from the full ``softmax(logits / temperature)``
    (no top-k, no top-p), ``num_samples`` per prompt, prompt-major. At temperature 1 each
    completion's ``sampling_logp`` is ``log pi(y|x)`` as computed while sampling."""
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0, num_samples=num_samples, seed=seed
    )
    return generate(model, prompt_ids, sampling, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, batch_size=batch_size)


def sample_with_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    seed: int = 0,
    num_samples: int = 1,
    batch_size: int = 128,
    images: Sequence[Sequence[bytes]] | None = None,
    image_processor: Any = None,
) -> tuple[list[Completion], torch.Tensor]:
    """Sample ``y_i ~ pi(.|x_i)`` (temperature 1, full softmax) and return the completions and
    ``log pi(y_i|x_i) - log pi_ref(y_i|x_i)`` (N,), float64.

    Both log-probs are recomputed by one teacher-forced forward each over the same padded rows, so
    the two terms differ only by the model. The mean of the returned vector estimates the
    sequence-level KL(pi || pi_ref); when ``reference is policy`` every term is exactly 0.
    ``images`` / ``image_processor``: as :func:`generate` takes them (sampled and teacher-forced with them).
    """
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=num_samples, seed=seed
    )
    completions = generate(
        policy,
        prompt_ids,
        sampling,
        stop_token_ids=stop_token_ids,
        pad_token_id=pad_token_id,
        batch_size=batch_size,
        reference=reference,
        images=images,
        image_processor=image_processor,
    )
    # With a reference, generate fills both log-probs of every completion (they are None otherwise).
    kl = torch.tensor([c.policy_logp - c.reference_logp for c in completions], dtype=torch.float64)  # type: ignore[operator]
    return completions, kl


# --------------------------------------------------------------------------------------------------
# Text: prompts in, decoded completions out
# --------------------------------------------------------------------------------------------------


def format_prompt(tokenizer: Any, prompt: Prompt, *, chat_template: str = "auto", system: str | None = None) -> str:
    """The text the model is conditioned on for ``prompt``.

    ``chat_template``: ``"auto"`` -- chat messages go through the tokenizer's template with the
    generation prompt, plain text stays as it is; ``"always"`` -- plain text becomes a user turn first;
    ``"never"`` -- messages are joined as ``role: content`` lines and no template is used.
    """
    if chat_template not in ("auto", "always", "never"):
        raise ConfigError(f"chat_template must be auto, always or never, not {chat_template!r}")
    messages: list[dict[str, str]] | None
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}] if chat_template == "always" else None
    else:
        messages = list(prompt)
    if messages is None:
        return prompt  # type: ignore[return-value]  # messages is None only for a text prompt
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    if chat_template == "never":
        return "\n".join(f"{message['role']}: {message['content']}" for message in messages) + "\nassistant:"
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the prompt is a chat conversation but the tokenizer has no chat template: use text prompts, "
            "pass --chat-template never, or add a chat_template to the tokenizer"
        )
    try:
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja's sandbox (SecurityError), a template's raise_exception, a bad template
        raise ConfigError(
            f"the tokenizer's chat template failed on the prompt {_preview(messages)}: {type(error).__name__}: {error}; "
            "fix the template, or pass --chat-template never to join the messages as plain text"
        ) from None
    return text


def _preview(messages: Sequence[dict[str, str]]) -> str:
    text = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in messages)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    chat_template: str = "auto",
    system: str | None = None,
    images: Sequence[Sequence[bytes]] | None = None,
    processor: Any = None,
    where: Sequence[str] | None = None,
) -> tuple[list[str], list[list[int]]]:
    """The formatted text (:func:`format_prompt`) and token ids of every prompt.

    A chat template writes its own special tokens (BOS included where it wants one), so templated
    text is tokenized without adding them again; plain text gets the tokenizer's usual special tokens.
    ``images`` (per prompt) with the model's ``processor``: each image placeholder becomes its image's
    tokens, as in training; a prompt whose placeholders do not match its images is a :class:`DataError`
    naming it (``where[i]``, else ``prompt i``).
    """
    texts, ids = [], []
    image_tokens = _image_tokens(processor, images)
    for index, prompt in enumerate(prompts):
        name = where[index] if where is not None else f"prompt {index}"
        text = format_prompt(tokenizer, prompt, chat_template=chat_template, system=system)
        templated = (not isinstance(prompt, str) or chat_template == "always") and chat_template != "never"
        token_ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        if not token_ids:
            raise DataError(f"{name} is empty after tokenization")
        if image_tokens is not None:
            token_ids = _expand_images(image_tokens, text, token_ids, images[index] if images else (), name)
        texts.append(text)
        ids.append(token_ids)
    return texts, ids


def _image_tokens(processor: Any, images: Sequence[Sequence[bytes]] | None) -> ImageTokens | None:
    if not images or not any(images):
        return None
    if processor is None:
        raise ConfigError(
            "the prompts have images but the model has no processor; sample them with a vision-language model "
            "(one transformers loads with AutoModelForImageTextToText, with its processor)"
        )
    return ImageTokens(processor)


def _expand_images(image_tokens: ImageTokens, text: str, token_ids: list[int], images: Sequence[bytes], name: str) -> list[int]:
    """``token_ids`` with each image placeholder replaced by its image's tokens (checked once against the processor)."""
    decoded = [decode_image(data) for data in images]
    expanded = image_tokens.expand(token_ids, decoded)
    if expanded is None:
        raise DataError(
            f"{name}: field 'images': the row has {len(images)} image(s) but its prompt has "
            f"{image_tokens.placeholders(token_ids)} {image_tokens.placeholder!r} placeholder(s); "
            f'write {image_tokens.placeholder} (or a {{"type": "image"}} part) where each image goes'
        )
    if images:
        image_tokens.check(text, decoded, expanded)
    return expanded


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and, when the vocabulary has one, a chat template's end-of-turn token (``<|im_end|>``, ...)."""
    stop = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_TOKENS:
        if marker in vocab and int(vocab[marker]) not in stop:
            stop.append(int(vocab[marker]))
    return stop


def decode_completions(tokenizer: Any, completions: Sequence[Completion]) -> list[str]:
    """Each completion's text without its stop token and without special tokens."""
    texts: list[str] = tokenizer.batch_decode([c.content_ids for c in completions], skip_special_tokens=True)
    return texts


def policy_and_reference_samples(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    images: Sequence[Sequence[bytes]] | None = None,
    image_processor: Any = None,
) -> list[dict[str, str]]:
    """Greedy continuations of tokenized prompts from the policy and (when the reference keeps a
    model in memory: ``reference.sampling_model()`` yields one) the reference -- the samples the
    trainer writes at each evaluation: ``[{"prompt", "policy"[, "reference"]}]``. ``images``: per
    prompt, the images whose tokens it holds (a vision-language run; see :func:`generate`)."""
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    stops, pad = stop_token_ids(tokenizer), pad_id_of(tokenizer)

    def continuations(model: Any) -> list[str]:
        completions = generate(
            model, prompt_ids, greedy, stop_token_ids=stops, pad_token_id=pad, images=images, image_processor=image_processor
        )
        return decode_completions(tokenizer, completions)

    samples = [
        {"prompt": tokenizer.decode(ids, skip_special_tokens=False), "policy": text}
        for ids, text in zip(prompt_ids, continuations(policy), strict=True)
    ]
    with reference.sampling_model() as reference_model:
        if reference_model is not None:
            for sample, text in zip(samples, continuations(reference_model), strict=True):
                sample["reference"] = text
    return samples
