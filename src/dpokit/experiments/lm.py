"""The miniature's "SFT model": a small GPT-2 and its tokenizer, trained from scratch on the review corpus.

In the paper the reference policy is GPT-2-large fine-tuned on IMDb reviews. Here a
``GPT2LMHeadModel`` built from a config (about two million parameters) and a byte-level BPE
tokenizer are trained on :func:`dpokit.experiments.corpus.make_corpus` with a plain causal-LM loop.
The result is cached in a directory keyed by every setting that shapes it, so later runs load it.

Layout of a training text: ``review tokens + <|endoftext|>`` (no BOS). One review per row, right
padded, loss on every real token (the first token has no context and is never predicted -- prompts
always give at least two tokens). Sampling from the model therefore continues a review prefix and
stops at ``<|endoftext|>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from dpokit.experiments.corpus import make_corpus
from dpokit.models import quiet_progress_bars

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Bumped whenever the recipe below changes in a way the settings do not capture.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class LMSettings:
    """Everything that determines the pretrained model (and hence its cache key)."""

    num_texts: int = 6000
    corpus_seed: int = 0
    vocab_size: int = 1024
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 64
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0

    def cache_key(self) -> str:
        payload = json.dumps({**asdict(self), "recipe": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as EOS/BOS and a separate pad token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # PreTrainedTokenizerFast.__init__ is unannotated in transformers 5.24.
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    fast.model_max_length = 1024
    return fast


def build_model(settings: LMSettings, vocab_size: int, pad_token_id: int, eos_token_id: int) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 from config. Dropout is off so train and eval forwards agree."""
    torch.manual_seed(settings.seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return GPT2LMHeadModel(config)


def _encode_rows(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_len: int) -> list[list[int]]:
    rows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        rows.append((ids + [tokenizer.eos_token_id])[:max_len])
    return rows


def pretrain(
    settings: LMSettings, texts: list[str], log: Callable[[str], None] | None = None
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """Train tokenizer and model on ``texts``; returns them and a small summary (final loss, time)."""
    start = time.time()
    tokenizer = train_tokenizer(texts, settings.vocab_size)
    rows = _encode_rows(tokenizer, texts, settings.n_positions)
    model = build_model(settings, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps)),
    )
    generator = torch.Generator().manual_seed(settings.seed)
    recent: list[float] = []
    for step in range(settings.steps):
        picks = torch.randint(len(rows), (settings.batch_size,), generator=generator).tolist()
        batch = [rows[i] for i in picks]
        width = max(len(r) for r in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        # Next-token cross-entropy, mean over the real tokens that have a predecessor (no loss on padding).
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-20:]
        if log and (step + 1) % max(1, settings.steps // 10) == 0:
            log(f"  pretrain step {step + 1}/{settings.steps}  loss {sum(recent) / len(recent):.3f}")
    model.eval()  # type: ignore[no-untyped-call]  # GPT2LMHeadModel.eval is unannotated in transformers
    summary = {
        "final_loss": sum(recent) / max(1, len(recent)),
        "seconds": time.time() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": asdict(settings),
    }
    return model, tokenizer, summary


def load_or_pretrain(
    settings: LMSettings, cache_dir: str | Path, log: Callable[[str], None] | None = None
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, Path]:
    """The cached SFT model for ``settings`` (trained and saved on first use). Returns (model, tokenizer, dir)."""
    model_dir = Path(cache_dir) / f"sft-{settings.cache_key()}"
    if (model_dir / "pretrain.json").exists():
        if log:
            log(f"SFT model: cached at {model_dir}")
        return *_load(model_dir), model_dir
    if log:
        log(f"SFT model: pretraining a GPT-2 on {settings.num_texts} reviews (cached afterwards in {model_dir})")
    texts = make_corpus(settings.num_texts, settings.corpus_seed)
    model, tokenizer, summary = pretrain(settings, texts, log=log)
    tmp_dir = model_dir.with_name(model_dir.name + ".tmp")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with quiet_progress_bars():  # no 'Writing model shards' bar in the experiment's log
        model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "pretrain.json").write_text(json.dumps(summary, indent=2))
    if model_dir.exists():  # a concurrent run finished first; keep theirs
        import shutil

        shutil.rmtree(tmp_dir)
    else:
        tmp_dir.rename(model_dir)
    if log:
        log(
            f"SFT model: {summary['parameters'] / 1e6:.2f}M parameters, loss {summary['final_loss']:.3f}, "
            f"{summary['seconds']:.0f}s"
        )
    return *_load(model_dir), model_dir


def _load(model_dir: Path) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """The saved SFT model (eval mode, float32, on the CPU: the experiment is sized for it) and tokenizer."""
    from dpokit.models import LoadOptions, load_policy

    loaded = load_policy(model_dir, LoadOptions(dtype="float32", device="cpu"))
    return loaded.model, loaded.tokenizer
