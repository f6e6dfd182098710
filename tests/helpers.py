"""Tiny real components for tests: a byte-level BPE tokenizer trained on the spot and small
random-init transformers models built from config. Nothing is downloaded."""

from __future__ import annotations

import random
from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [
    "the",
    "a",
    "good",
    "bad",
    "great",
    "movie",
    "film",
    "story",
    "actor",
    "plot",
    "scene",
    "music",
    "was",
    "is",
    "very",
    "not",
    "really",
    "quite",
    "i",
    "you",
    "we",
    "they",
    "liked",
    "loved",
    "hated",
    "enjoyed",
    "boring",
    "wonderful",
    "awful",
    "funny",
    "sad",
    "long",
    "short",
    "best",
    "worst",
    "and",
    "but",
    "so",
    "because",
    "then",
    "it",
    "this",
    "that",
    "what",
    "why",
    "how",
    "when",
    "answer",
    "question",
    "please",
    "explain",
    "tell",
    "me",
]

# A ChatML-shaped template: special markers around every turn, no BOS.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A Llama-2-shaped template: BOS at the start, [INST] markers, EOS after every assistant turn.
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'system' %}<<SYS>>{{ message['content'] }}<</SYS>>"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def generated_text(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + "." for _ in range(n_lines)]


@lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generated_text(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 384, chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A real fast tokenizer (byte-level BPE, ``vocab_size`` tokens) with pad/bos/eos and a chat template."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(vocab_size: int = 384, hidden_size: int = 32, layers: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int = 384, hidden_size: int = 32, layers: int = 2, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=layers,
        n_head=4,
        n_positions=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    return GPT2LMHeadModel(config).eval()


# Synthetic, learnable preferences: the chosen response always uses a "positive" word and the
# rejected one a "negative" word, after the same prompt, so a policy can learn the preference quickly.
POSITIVE_WORDS = ("good", "great", "wonderful", "best")
NEGATIVE_WORDS = ("bad", "awful", "boring", "worst")


def preference_rows(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}`` where chosen praises and rejected pans."""
    rng = random.Random(seed)
    subjects = ("the movie", "the film", "the story", "the music", "the plot", "the actor")
    rows = []
    for _ in range(n):
        subject = rng.choice(subjects)
        prompt = f"{rng.choice(['tell me', 'explain', 'what', 'why'])} {subject} {rng.choice(['was', 'is'])}"
        rows.append(
            {
                "prompt": prompt,
                "chosen": f" it was {rng.choice(POSITIVE_WORDS)} and {rng.choice(POSITIVE_WORDS)}.",
                "rejected": f" it was {rng.choice(NEGATIVE_WORDS)} and {rng.choice(NEGATIVE_WORDS)}.",
            }
        )
    return rows


def write_preference_jsonl(path, n: int = 64, seed: int = 0):
    """Write :func:`preference_rows` as JSON lines to ``path``; return the path."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(n, seed)), encoding="utf-8")
    return path


def write_tiny_model_dir(
    path, *, vocab_size: int = 384, hidden_size: int = 32, layers: int = 2, seed: int = 0, pad_token: bool = True, **overrides
):
    """Save a tiny Llama and its tokenizer with ``save_pretrained`` into ``path`` (the real
    ``from_pretrained`` path is then exercised by whoever loads it); return the path."""
    from pathlib import Path

    path = Path(path)
    model = tiny_llama(vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, seed=seed, **overrides)
    tokenizer = tiny_tokenizer(vocab_size=vocab_size)
    if not pad_token:
        tokenizer.pad_token = None
        model.config.pad_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trl_dpo_config(output_dir: str, *, beta: float, batch_size: int) -> object:
    """TRL 1.16's ``DPOConfig`` for the parity tests: the sigmoid loss on CPU in float32, one batch of
    ``batch_size`` pairs, no truncation, logging, saving or dropout."""
    import trl

    return trl.DPOConfig(
        output_dir=output_dir,
        report_to=[],
        use_cpu=True,
        bf16=False,
        beta=beta,
        loss_type=["sigmoid"],
        per_device_train_batch_size=batch_size,
        max_length=None,
        logging_strategy="no",
        save_strategy="no",
        disable_dropout=True,
    )
