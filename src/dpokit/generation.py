"""``dpokit generate``: sample completions from a model, LoRA adapter or checkpoint.

Prompts are either plain text or chat messages (``[{"role": "user", "content": ...}]``). Chat prompts
go through the tokenizer's chat template with the generation prompt appended (``<|im_start|>assistant\\n``
for ChatML), exactly as the data pipeline formats them for training, so the policy continues where it
learned to answer. Sampling is reproducible: prompt ``i`` is sampled with seed ``seed + i``, so the
same prompt and seed give the same samples whatever else is in the batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dpokit.errors import ConfigError, DataError
from dpokit.analysis.evaluate import load_policy, quiet_loading_bars

Prompt = str | list[dict[str, str]]


@dataclass
class Sample:
    """One generated completion. ``prompt_text`` is the exact text the model was conditioned on."""

    prompt_index: int
    sample_index: int
    prompt: Prompt
    prompt_text: str
    completion: str
    num_tokens: int


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
        return prompt  # type: ignore[return-value]
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    if chat_template == "never":
        return "\n".join(f"{message['role']}: {message['content']}" for message in messages) + "\nassistant:"
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the prompt is a chat conversation but the tokenizer has no chat template: use text prompts, "
            "pass --chat-template never, or add a chat_template to the tokenizer"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _prompt_token_ids(tokenizer: Any, prompt_text: str, templated: bool) -> list[int]:
    # A chat template writes its own special tokens (BOS included where it wants one); adding them
    # again would double the BOS. Plain text gets the tokenizer's usual special tokens.
    return tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"]


@torch.no_grad()
def generate_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 1.0,
    top_k: int = 0,
    num_samples: int = 1,
    seed: int = 0,
    chat_template: str = "auto",
    system: str | None = None,
) -> list[Sample]:
    """Sample ``num_samples`` completions per prompt. ``temperature == 0`` means greedy decoding.

    Returns ``len(prompts) * num_samples`` samples, prompt-major. Generation stops at the tokenizer's
    EOS token (and the chat template's end-of-turn token when it is a single token) or after
    ``max_new_tokens``.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1, got {num_samples}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_ids = _stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    greedy = temperature == 0
    samples: list[Sample] = []
    for prompt_index, prompt in enumerate(prompts):
        templated = not isinstance(prompt, str) or chat_template == "always"
        prompt_text = format_prompt(tokenizer, prompt, chat_template=chat_template, system=system)
        prompt_ids = _prompt_token_ids(tokenizer, prompt_text, templated and chat_template != "never")
        if not prompt_ids:
            raise DataError(f"prompt {prompt_index} is empty after tokenization")
        input_ids = torch.tensor([prompt_ids], device=device)
        # Seed per prompt so a prompt's samples do not depend on which prompts came before it.
        torch.manual_seed(seed + prompt_index)
        sampling: dict[str, Any] = {"do_sample": False} if greedy else {
            "do_sample": True,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,  # 0 switches top-k off (None would fall back to the model's default, often 50)
        }
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            eos_token_id=stop_ids or None,
            pad_token_id=pad_id,
            **sampling,
        )
        for sample_index, sequence in enumerate(output[:, input_ids.shape[1]:].tolist()):
            completion_ids = _until_stop(sequence, stop_ids)
            samples.append(
                Sample(
                    prompt_index=prompt_index,
                    sample_index=sample_index,
                    prompt=prompt,
                    prompt_text=prompt_text,
                    completion=tokenizer.decode(completion_ids, skip_special_tokens=True),
                    num_tokens=len(completion_ids),
                )
            )
    model.train(was_training)
    return samples


def _stop_token_ids(tokenizer: Any) -> list[int]:
    stop = []
    if tokenizer.eos_token_id is not None:
        stop.append(int(tokenizer.eos_token_id))
    # ChatML-style templates end a turn with <|im_end|> rather than EOS.
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(marker) if marker in tokenizer.get_vocab() else None
        if token_id is not None and token_id not in stop:
            stop.append(int(token_id))
    return stop


def _until_stop(token_ids: list[int], stop_ids: list[int]) -> list[int]:
    for position, token_id in enumerate(token_ids):
        if token_id in stop_ids:
            return token_ids[:position]
    return token_ids


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a ``.txt`` file (one per non-empty line) or JSONL/JSON rows with a ``prompt`` field."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows with a 'prompt' field")
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not a JSON object ({error.msg})") from None
    prompts: list[Prompt] = []
    for line_number, row in numbered:
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
            prompts.append(prompt)
        else:
            raise DataError(
                f"{path}:{line_number}: field 'prompt' must be a string or a list of "
                "{'role', 'content'} messages"
            )
    return prompts


def run_generate_command(args: argparse.Namespace) -> int:
    """``dpokit generate``: load the model, sample, print and optionally write JSON lines."""
    prompts: list[Prompt] = list(args.prompt or [])
    if args.prompts_file:
        prompts.extend(read_prompts(args.prompts_file))
    if not prompts:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    quiet_loading_bars()
    loaded = load_policy(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    samples = generate_samples(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_samples=args.num_samples,
        seed=args.seed,
        chat_template=args.chat_template,
        system=args.system,
    )
    rows = [asdict(sample) for sample in samples]
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        for sample in samples:
            header = f"--- prompt {sample.prompt_index}" + (f", sample {sample.sample_index}" if args.num_samples > 1 else "")
            print(header)
            print(f"{sample.prompt_text}\033[1m{sample.completion}\033[0m" if sys.stdout.isatty() else f"{sample.prompt_text}{sample.completion}")
        if args.output:
            print(f"wrote {len(rows)} samples to {args.output}")
    return 0


@torch.no_grad()
def policy_and_reference_samples(
    policy: Any, reference: Any, tokenizer: Any, prompt_ids: list[list[int]], *, max_new_tokens: int,
) -> list[dict[str, str]]:
    """Greedy continuations of tokenized prompts from the policy and (when the reference keeps a
    model in memory: ``reference.sampling_model()`` yields one) the reference -- the samples the
    trainer writes at each evaluation."""
    device = next(policy.parameters()).device

    def greedy(model: Any, ids: list[int]) -> str:
        input_ids = torch.tensor([ids], device=device)
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )
        return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)

    samples = []
    was_training = policy.training
    policy.eval()
    try:
        for ids in prompt_ids:
            sample = {"prompt": tokenizer.decode(ids, skip_special_tokens=False), "policy": greedy(policy, ids)}
            with reference.sampling_model() as reference_model:
                if reference_model is not None:
                    sample["reference"] = greedy(reference_model, ids)
            samples.append(sample)
    finally:
        policy.train(was_training)
    return samples
