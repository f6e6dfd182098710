"""Prompts and preference pairs for the sentiment experiment, as in the paper's section 6.1.

* Prompts are prefixes of held-out reviews (a corpus drawn with a different seed than the one the
  SFT model was trained on), 2-8 tokens long, the length drawn uniformly per review; with
  ``domain="news"``, prefixes of the shifted domain's reports (:data:`dpokit.experiments.corpus.DOMAINS`),
  2-8 whole words long, at most as many tokens as the trainer's prompts may have (the review tokenizer
  splits the news words into pieces).
* For every training prompt, ``completions_per_prompt`` completions are sampled from the SFT model
  (temperature 1, no truncation of the distribution) and scored with the ground-truth reward.
  Every pair of completions with different rewards becomes one preference, the higher-reward
  completion chosen. With ``label_temperature > 0`` the label is instead drawn from a
  Bradley-Terry model, ``P(a preferred) = sigmoid((r_a - r_b) / label_temperature)``, which adds
  the kind of noise human labels have; 0 (the default) labels by the reward itself, as the paper
  does with its sentiment classifier.
* Completions that hit the length limit without EOS are dropped from the pairs: the trainer appends
  EOS to every response, which would teach the model to stop where it was merely cut off.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dpokit.errors import ConfigError
from dpokit.experiments.corpus import DOMAINS
from dpokit.generation import decode_completions, encode_prompts, sample_completions, stop_token_ids
from dpokit.models import pad_id_of


def make_prompts(
    tokenizer: Any,
    num_prompts: int,
    seed: int,
    min_tokens: int = 2,
    max_tokens: int = 8,
    *,
    domain: str = "reviews",
    whole_words_within: int | None = None,
) -> list[str]:
    """Prefixes of ``min_tokens``-``max_tokens`` tokens of fresh texts of ``domain`` (corpus seed ``seed``),
    as strings. With ``whole_words_within``, prefixes of as many whole words instead, words dropped from
    the end (down to one) until the prefix has at most that many tokens: for a domain whose words the
    tokenizer splits into pieces, where a token prefix would often end inside the first word."""
    if domain not in DOMAINS:
        raise ConfigError(f"unknown text domain {domain!r}; choose from {sorted(DOMAINS)}")
    rng = random.Random(seed)
    texts = DOMAINS[domain](num_prompts, seed)
    prompts = []
    for text in texts:
        if whole_words_within is not None:
            words = text.split()[: rng.randint(min_tokens, max_tokens)]
            while len(words) > 1 and len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > whole_words_within:
                words.pop()
            prompts.append(" ".join(words))
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        k = min(len(ids), rng.randint(min_tokens, max_tokens))
        prompts.append(tokenizer.decode(ids[:k]))
    return prompts


def make_preference_pairs(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: Callable[..., Sequence[float]],
    *,
    completions_per_prompt: int = 4,
    max_new_tokens: int = 48,
    label_temperature: float = 0.0,
    require_eos: bool = True,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample, score and pair completions; returns (rows, stats).

    Each row is ``{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}`` -- the
    format ``dpokit train`` reads. ``stats`` has the number of samples, pairs, dropped
    (unterminated, when ``require_eos``) completions, tied pairs skipped and the SFT model's mean reward.
    """
    _, prompt_ids = encode_prompts(tokenizer, prompts)
    completions = sample_completions(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer),
        pad_token_id=pad_id_of(tokenizer),
        seed=seed,
        num_samples=completions_per_prompt,
        batch_size=256,
    )
    prompt_texts = [prompts[c.prompt_index] for c in completions]
    texts = decode_completions(tokenizer, completions)
    rewards = [float(r) for r in reward_fn(prompts=prompt_texts, completions=texts)]
    terminated = [c.stopped or not require_eos for c in completions]
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    ties = 0
    for p_index, prompt in enumerate(prompts):
        group = [
            i
            for i in range(p_index * completions_per_prompt, (p_index + 1) * completions_per_prompt)
            if terminated[i] and texts[i].strip()
        ]
        for a, b in itertools.combinations(group, 2):
            if rewards[a] == rewards[b] or texts[a] == texts[b]:
                ties += 1
                continue
            if label_temperature > 0:
                p_a = 1.0 / (1.0 + math.exp(-(rewards[a] - rewards[b]) / label_temperature))
                a_wins = rng.random() < p_a
            else:
                a_wins = rewards[a] > rewards[b]
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": texts[chosen],
                    "rejected": texts[rejected],
                    "chosen_reward": rewards[chosen],
                    "rejected_reward": rewards[rejected],
                }
            )
    rng.shuffle(rows)
    stats = {
        "samples": len(texts),
        "pairs": len(rows),
        "unterminated_dropped": terminated.count(False),
        "ties_skipped": ties,
        "sft_reward_mean": sum(rewards) / max(1, len(rewards)),
        "label_accuracy": sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / max(1, len(rows)),
    }
    return rows, stats


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path
