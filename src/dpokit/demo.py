"""``dpokit demo``: the whole DPO pipeline on a model small enough to train in a minute on a CPU.

Everything is built on the spot -- nothing is downloaded:

1. **data**: short movie-review answers to questions about a film. Every preference pair has the
   same question, a *positive* review (chosen) and a *negative* one (rejected), so the preference is
   "be positive" -- learnable, and easy to see in samples;
2. **model**: a byte-level BPE tokenizer trained on that text and a 2-layer Llama-style model with
   random weights;
3. **SFT** (the paper's step 1, ``dpokit sft``): the model learns to write reviews from pairs whose
   "chosen" side is positive or negative at random, so the resulting reference model pi_ref writes
   both kinds about equally often;
4. **DPO** (step 2, ``dpokit train``): against that frozen reference, on the real preferences. The
   held-out reward accuracy and margins are printed as they rise, then samples of the SFT model and
   the DPO policy for the same held-out prompts, and how many of them are positive.

The run directory keeps the data, both models and, for the DPO run, ``metrics.jsonl``, TensorBoard
event files and ``curves.png``. Training goes through :func:`dpokit.train.run` with configs built
here, exactly as ``dpokit train`` would run them.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_MARKER = ".dpokit-demo"

NOUNS = ("movie", "film", "story", "plot", "acting", "music", "ending", "script", "cast", "dialogue", "camera work", "soundtrack")
POSITIVE = ("wonderful", "great", "brilliant", "charming", "moving", "delightful", "superb", "beautiful", "funny", "clever")
NEGATIVE = ("awful", "boring", "terrible", "dull", "weak", "clumsy", "tedious", "bland", "messy", "poor")
INTENSIFIERS = ("very", "really", "quite", "truly", "so", "rather")
POSITIVE_VERBS = ("i loved", "i enjoyed", "we liked", "everyone loved", "i admired")
NEGATIVE_VERBS = ("i hated", "i disliked", "we regretted", "everyone hated", "i could not stand")
QUESTIONS = (
    "What did you think of the {noun}?",
    "How was the {noun}?",
    "Tell me about the {noun}.",
    "Would you recommend the {noun}?",
    "Give me your opinion of the {noun}.",
)


# ------------------------------------------------------------------------------------------------- data


def _review(rng: random.Random, noun: str, positive: bool) -> str:
    """One short review of ``noun``: '<the noun> was <intensifier> <adjective> and <verb> the <noun2>.'"""
    adjectives, verbs = (POSITIVE, POSITIVE_VERBS) if positive else (NEGATIVE, NEGATIVE_VERBS)
    other = rng.choice([n for n in NOUNS if n != noun])
    first = f"the {noun} was {rng.choice(INTENSIFIERS)} {rng.choice(adjectives)}"
    second = rng.choice(
        (
            f"{rng.choice(verbs)} the {other}",
            f"the {other} was {rng.choice(adjectives)} too",
        )
    )
    return f" {first}, and {second}."


def _question(rng: random.Random) -> tuple[str, str]:
    noun = rng.choice(NOUNS)
    return f"Q: {rng.choice(QUESTIONS).format(noun=noun)}\nA:", noun


def make_preference_rows(num_pairs: int, seed: int, *, sentiment_labels: bool = True) -> list[dict[str, str]]:
    """Rows ``{"prompt", "chosen", "rejected"}``. With ``sentiment_labels`` the chosen review is
    positive and the rejected one negative; without, which side is positive is a coin flip (the
    SFT data: the reference model should not prefer either)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_pairs):
        prompt, noun = _question(rng)
        positive, negative = _review(rng, noun, True), _review(rng, noun, False)
        chosen_positive = True if sentiment_labels else rng.random() < 0.5
        chosen, rejected = (positive, negative) if chosen_positive else (negative, positive)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def is_positive(text: str) -> bool | None:
    """True/False when ``text`` uses more positive/negative sentiment words; None when it is a tie."""
    words = text.replace(",", " ").replace(".", " ").split()
    positive = sum(word in POSITIVE for word in words) + sum(verb in text for verb in POSITIVE_VERBS)
    negative = sum(word in NEGATIVE for word in words) + sum(verb in text for verb in NEGATIVE_VERBS)
    if positive == negative:
        return None
    return positive > negative


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


# ------------------------------------------------------------------------------------- model + tokenizer

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (pad/bos/eos specials, a ChatML chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_tiny_llama(tokenizer: Any, *, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Any:
    """A Llama-architecture causal LM with random weights sized for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------------------------- training


@dataclass
class DemoSettings:
    """Sizes and optimizer settings, tuned so the demo runs in about a minute on two CPU cores."""

    train_pairs: int = 1200
    eval_pairs: int = 64
    sft_steps: int = 400
    sft_lr: float = 3e-3
    dpo_steps: int = 100
    dpo_lr: float = 1.5e-4
    beta: float = 0.1
    batch_size: int = 16
    log_every: int = 10
    eval_every: int = 10
    sample_prompts: int = 4
    samples_per_prompt: int = 4


def _train_config(
    model_dir: Path, train_path: Path, eval_path: Path | None, run_dir: Path, *, sft: bool, steps: int, lr: float,
    settings: DemoSettings, seed: int, progress: bool, cache_dir: Path,
) -> Any:
    from dpokit.config import config_from_dict

    return config_from_dict(
        {
            "model": {"name_or_path": str(model_dir), "dtype": "float32", "device": "cpu"},
            "data": {
                "train_path": str(train_path),
                "eval_path": str(eval_path) if eval_path else None,
                "max_length": 64,
                "max_prompt_length": 32,
                "cache_dir": str(cache_dir),
            },
            "loss": {"beta": settings.beta, "terms": [{"name": "sft"}] if sft else [{"name": "sigmoid"}]},
            "reference": {"strategy": "none" if sft else "copy"},
            "optim": {
                "optimizer": "adamw",
                "lr": lr,
                "warmup_steps": 10,
                "schedule": "cosine" if sft else "constant",
                "max_steps": steps,
                "batch_size": settings.batch_size,
                "grad_accumulation": 1,
                "max_grad_norm": 1.0,
                "seed": seed,
            },
            "eval": {"every_steps": 0 if sft else settings.eval_every, "batch_size": 32},
            "logging": {"run_dir": str(run_dir), "log_every": settings.log_every if not sft else 25, "progress_bar": progress},
            "checkpoint": {"every_steps": 0},
            "output_dir": str(run_dir / "final"),
        }
    )


TABLE_HEADER = f"  {'step':>4}  {'split':<5}  {'loss':>7}  {'reward acc':>10}  {'margin':>7}  {'r(chosen)':>9}  {'r(rejected)':>11}"

START_ROW = (
    f"  {0:>4}  {'start':<5}  {0.6931:>7.3f}  {'(ties)':>10}  {0.0:>7.3f}  {0.0:>9.3f}  {0.0:>11.3f}"
    "   <- policy = reference: every reward is 0, loss = log 2"
)


def format_table_row(record: dict[str, Any]) -> str:
    def number(name: str, width: int, digits: int = 3) -> str:
        value = record.get(name)
        return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

    return (
        f"  {record['step']:>4}  {record['split']:<5}  {number('loss', 7)}  {number('rewards/accuracies', 10)}  "
        f"{number('rewards/margins', 7)}  {number('rewards/chosen', 9)}  {number('rewards/rejected', 11)}"
    )


class _LiveTable:
    """Prints each new metrics.jsonl record as a table row while training runs (above the progress bar)."""

    def __init__(self, metrics_path: Path, show_train: bool = True) -> None:
        self.metrics_path = metrics_path
        self.seen = 0
        self.show_train = show_train
        self.rows: list[dict[str, Any]] = []
        self.header_shown = False

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        self.flush()
        return False

    def flush(self) -> None:
        from tqdm import tqdm

        from dpokit.tracking import read_metrics

        if not self.metrics_path.exists():
            return
        if not self.header_shown:  # printed here, so the trainer's own start-up lines come before it
            tqdm.write(TABLE_HEADER)
            tqdm.write(START_ROW)
            self.header_shown = True
        records = read_metrics(self.metrics_path)
        for record in records[self.seen:]:
            if record["split"] == "eval" or self.show_train:
                tqdm.write(format_table_row(record))
            self.rows.append(record)
        self.seen = len(records)


def _prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir``, or clear an earlier demo's outputs from it -- never anything else."""
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / DEMO_MARKER).exists():
        from dpokit.errors import ConfigError

        raise ConfigError(f"{run_dir} exists and was not made by `dpokit demo`; choose another --run-dir")
    for name in ("base", "data", "sft", "dpo", "cache"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DEMO_MARKER).write_text("written by `dpokit demo`; the demo clears this directory when it runs again\n")


def run_demo(
    run_dir: str | Path = "runs/demo",
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Build data, tokenizer and model; SFT then DPO; print the rising rewards and samples.

    Returns a summary: the DPO run directory, the metric records, eval accuracy before/after and the
    positive fraction of SFT vs DPO samples.
    """
    import torch
    import transformers

    progress = progress and sys.stderr.isatty()  # a progress bar in a log file is noise
    settings = settings or DemoSettings()
    if steps is not None:
        settings.dpo_steps = steps
    started = time.time()
    run_dir = Path(run_dir)
    _prepare_run_dir(run_dir)
    # One thread: matrices this small gain nothing from intra-op parallelism, and on a busy machine
    # threads waiting on each other made a step over ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would bury the table
    try:
        return _run_demo(run_dir, settings, seed=seed, progress=progress, started=started)
    finally:
        torch.set_num_threads(threads)
        transformers.utils.logging.enable_progress_bar()


def _run_demo(run_dir: Path, settings: DemoSettings, *, seed: int, progress: bool, started: float) -> dict[str, Any]:
    from dpokit.evaluate import load_policy
    from dpokit.generate import generate_samples
    from dpokit.train import run


    print(f"dpokit demo: SFT then DPO on a tiny model, everything built here ({run_dir})")
    data_dir = run_dir / "data"
    train_rows = make_preference_rows(settings.train_pairs, seed)
    eval_rows = make_preference_rows(settings.eval_pairs, seed + 1)
    sft_rows = make_preference_rows(settings.train_pairs, seed + 2, sentiment_labels=False)
    train_path = _write_jsonl(data_dir / "train.jsonl", train_rows)
    eval_path = _write_jsonl(data_dir / "eval.jsonl", eval_rows)
    sft_path = _write_jsonl(data_dir / "sft.jsonl", sft_rows)
    print(
        f"[1/4] data: {len(train_rows)} preference pairs + {len(eval_rows)} held out ({data_dir}); chosen = the "
        "positive review, rejected = the negative one"
    )
    print(f"      e.g. {train_rows[0]['prompt']!r}\n           chosen:  {train_rows[0]['chosen']!r}\n           rejected: {train_rows[0]['rejected']!r}")

    tokenizer = train_tokenizer([r["prompt"] + r["chosen"] for r in sft_rows] + [r["prompt"] + r["rejected"] for r in sft_rows])
    model = build_tiny_llama(tokenizer, seed=seed)
    base_dir = run_dir / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"[2/4] model: Llama-style, 2 layers, hidden 64, {num_parameters / 1e3:.0f}k parameters, random init; "
          f"byte-level BPE tokenizer with {len(tokenizer)} tokens ({base_dir})")

    cache_dir = run_dir / "cache"
    sft_started = time.time()
    print(f"[3/4] SFT ({settings.sft_steps} steps) on reviews whose sentiment is a coin flip: the reference model pi_ref")
    sft_result = run(
        _train_config(base_dir, sft_path, None, run_dir / "sft", sft=True, steps=settings.sft_steps, lr=settings.sft_lr,
                      settings=settings, seed=seed, progress=progress, cache_dir=cache_dir)
    )
    print(f"      SFT loss (mean negative log-likelihood per token) {sft_result.train_metrics.get('loss', float('nan')):.2f} after "
          f"{sft_result.global_step} steps, {time.time() - sft_started:.0f}s")

    print(f"[4/4] DPO (beta {settings.beta}, {settings.dpo_steps} steps) against the SFT model; "
          f"train rows every {settings.log_every} steps, eval = {len(eval_rows)} held-out pairs")
    dpo_dir = run_dir / "dpo"
    table = _LiveTable(dpo_dir / "metrics.jsonl")
    dpo_result = run(
        _train_config(sft_result.output_dir, train_path, eval_path, dpo_dir, sft=False, steps=settings.dpo_steps,
                      lr=settings.dpo_lr, settings=settings, seed=seed, progress=progress, cache_dir=cache_dir),
        on_step=table,
    )
    table.flush()
    eval_records = [record for record in table.rows if record["split"] == "eval"]

    # Samples: the same held-out prompts, same seed, from pi_ref (SFT) and the DPO policy.
    prompts = [row["prompt"] for row in eval_rows[: settings.sample_prompts]]
    sampled: dict[str, list[Any]] = {}
    for label, model_dir in (("SFT", sft_result.output_dir), ("DPO", dpo_result.output_dir)):
        loaded = load_policy(model_dir, device="cpu")
        sampled[label] = generate_samples(
            loaded.model, loaded.tokenizer, prompts, max_new_tokens=24, temperature=0.8,
            num_samples=settings.samples_per_prompt, seed=seed,
        )
    print(f"\nsamples for held-out prompts (temperature 0.8, {settings.samples_per_prompt} per prompt; first shown):")
    for index, prompt in enumerate(prompts):
        print(f"  {prompt.splitlines()[0]}")
        for label in ("SFT", "DPO"):
            first = sampled[label][index * settings.samples_per_prompt]
            print(f"    {label}: {first.completion.strip()}")
    positive_counts = {label: sum(is_positive(s.completion) is True for s in samples) for label, samples in sampled.items()}
    negative_counts = {label: sum(is_positive(s.completion) is False for s in samples) for label, samples in sampled.items()}
    total = len(prompts) * settings.samples_per_prompt
    print(
        f"\npositive / negative samples: SFT {positive_counts['SFT']}/{negative_counts['SFT']}, "
        f"DPO {positive_counts['DPO']}/{negative_counts['DPO']} (of {total})"
    )
    first_eval, last_eval = (eval_records[0], eval_records[-1]) if eval_records else ({}, {})
    if eval_records:
        print(
            f"held-out reward accuracy (step {first_eval['step']} -> {last_eval['step']}) {first_eval.get('rewards/accuracies', 0):.2f} -> {last_eval.get('rewards/accuracies', 0):.2f}, "
            f"margin {first_eval.get('rewards/margins', 0):.2f} -> {last_eval.get('rewards/margins', 0):.2f}"
        )
    print(f"\nrun directory {dpo_dir}: metrics.jsonl, tensorboard/ (tensorboard --logdir {run_dir}), curves.png")
    print(f"models: {sft_result.output_dir} (SFT, the reference), {dpo_result.output_dir} (DPO)")
    print(f"try:   dpokit eval --model {dpo_result.output_dir} --reference {sft_result.output_dir} --data {eval_path}")
    print(f"       dpokit score --model {dpo_result.output_dir} --reference {sft_result.output_dir} --input {eval_path} --output scores.jsonl")
    print(f"done in {time.time() - started:.0f}s")
    return {
        "run_dir": dpo_dir,
        "records": table.rows,
        "eval_first": first_eval,
        "eval_last": last_eval,
        "positive": positive_counts,
        "negative": negative_counts,
        "num_samples": total,
        "sft_output": sft_result.output_dir,
        "dpo_output": dpo_result.output_dir,
    }
