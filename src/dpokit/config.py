"""The run configuration: typed dataclasses, read from YAML, overridden from the command line.

One :class:`TrainConfig` describes a whole run (model, data, loss, reference strategy, optimizer,
evaluation, logging, checkpoints). It is built in three layers, later layers winning::

    defaults (the dataclasses below)  <  optional preset (e.g. "sft")  <  YAML file  <  overrides

Overrides use the ``section.key=value`` convention, values parsed as YAML (so ``loss.beta=0.2``,
``model.lora.enabled=true``, ``model.lora.target_modules=[q_proj,v_proj]``,
``loss.terms=[{name: ipo}]``)::

    dpokit train cfg.yaml loss.beta=0.2 optim.lr=1e-6

Every key is checked against the dataclass fields: a mistyped key is a :class:`ConfigError` that
suggests the nearest valid key, a value of the wrong type names the key, the file and line. Every
field carries ``metadata={"help": ...}`` so :func:`config_reference_markdown` can render the full
key reference for the README -- generated from the code, so it cannot drift.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml

from dpokit.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


_Section = TypeVar("_Section", bound="DataclassInstance")


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation in ``metadata["help"]``."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ------------------------------------------------------------------------------------------------
# The schema.
# ------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """Low-rank adapters (`peft`) on the policy; the base weights stay frozen."""

    enabled: bool = _f(False, "Train LoRA adapters instead of all weights.")
    r: int = _f(16, "Adapter rank.")
    alpha: float = _f(32.0, "LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = _f(0.0, "Dropout on the adapter input (kept even when model dropout is disabled).")
    target_modules: list[str] | str = _f(
        "all-linear", "Modules to adapt: a list of module-name suffixes (e.g. [q_proj, v_proj]) or 'all-linear'."
    )
    export: Literal["merged", "adapter"] = _f(
        "merged",
        "How the final model is saved: 'merged' (adapters folded into full weights) or 'adapter' (peft adapter "
        "only; transformers loads it when peft is installed and the base model is reachable).",
    )


@dataclass
class VisionConfig:
    """Vision-language models (loaded with AutoModelForImageTextToText when the checkpoint is one)."""

    train_vision_tower: bool = _f(
        False, "Train the vision tower (image encoder) too; by default it stays frozen (the projector trains with the LM)."
    )
    lora_modules: Literal["language_model", "all"] = _f(
        "language_model",
        "With lora.enabled: adapt lora.target_modules in the language model only, or in the vision tower and "
        "projector as well ('all').",
    )


@dataclass
class ModelConfig:
    """The policy model and its tokenizer."""

    name_or_path: str = _f("", "Local directory or hub id of a transformers causal LM or image-text-to-text model (required).")
    tokenizer_name_or_path: str | None = _f(None, "Tokenizer location when it differs from name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "Weight dtype the model is loaded and trained in.")
    attn_implementation: str | None = _f(
        None, "Attention kernel passed to transformers ('eager', 'sdpa', 'flash_attention_2'); null = its default."
    )
    trust_remote_code: bool = _f(False, "Allow model code from the checkpoint's repository to run. Off unless asked.")
    quantization: Literal["none", "4bit", "8bit"] = _f(
        "none",
        "Load the frozen base weights quantized with bitsandbytes: '4bit' is QLoRA's NF4 (double-quantized, computed in "
        "model.dtype; runs on CUDA and on the CPU), '8bit' int8. Needs lora.enabled and `pip install 'dpokit[qlora]'`; "
        "lora.export=merged writes the dequantized base plus the adapters in full precision (4bit).",
    )
    activation_checkpointing: Literal["auto", "on", "off"] | bool = _f(
        "auto",
        "Recompute decoder blocks' activations in the backward pass to save memory: on/true (every block), off/false, or auto "
        "(the fewest blocks that bring the estimated step memory within model.memory_budget_gib; none when it fits). "
        "The estimate and the choice are on the run's first lines.",
    )
    gradient_checkpointing: bool | None = _f(
        None, "Older name: true = activation_checkpointing on, false = off; null = unset. Both set differently is an error."
    )
    memory_budget_gib: float | None = _f(
        None, "Memory one training step may use, for activation_checkpointing=auto; null = what the device has free."
    )
    compile: bool = _f(
        False, "torch.compile each decoder layer (fuses element-wise kernels; pays a one-off compile time, so for long runs)."
    )
    disable_dropout: bool = _f(True, "Set every dropout probability in the policy to 0 (as the DPO reference code does).")
    device: str = _f("auto", "Device to train on: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    lora: LoraConfig = _f(factory=LoraConfig, help="LoRA adapters.")
    vision: VisionConfig = _f(factory=VisionConfig, help="Vision-language models: which parts train.")


@dataclass
class DataConfig:
    """Where the preference data comes from and how it is tokenized."""

    train_path: str = _f("", "Training preferences: a JSON/JSONL/CSV/Parquet file, a directory, or a datasets hub id (required).")
    eval_path: str | None = _f(None, "Held-out preferences for evaluation; null = carve eval_split_fraction from training data.")
    eval_split_fraction: float = _f(0.0, "Fraction of the training examples held out for evaluation when eval_path is null.")
    train_split: str = _f("train", "Split to read from a hub dataset / dataset directory for training.")
    eval_split: str = _f("test", "Split to read from eval_path when it is a hub dataset / dataset directory.")
    format: Literal["auto", "standard", "conversational", "hh", "ranked", "unpaired"] = _f(
        "auto", "Row format: 'auto' (detected per file) or one of the reader's formats."
    )
    columns: dict[str, str] | None = _f(
        None, "Column renames {source column: field}, e.g. {question: prompt, good: chosen, bad: rejected}."
    )
    skip_invalid: bool = _f(False, "Skip malformed rows (counted in the data report) instead of failing on the first.")
    ranked_mode: Literal["listwise", "all_pairs", "best_vs_rest", "best_vs_worst"] = _f(
        "listwise", "How rankings of more than two responses become training examples."
    )
    score_threshold: float | None = _f(
        None,
        "Unpaired rows {prompt, completion, score}: desirable when score >= this (unpaired losses such as kto). "
        "Paired data trains an unpaired loss as unpaired examples: chosen desirable, rejected undesirable.",
    )
    max_length: int = _f(512, "Maximum tokens of prompt + response.")
    max_prompt_length: int = _f(256, "Maximum prompt tokens (the prompt is truncated first).")
    truncation_mode: Literal["keep_end", "keep_start"] = _f("keep_end", "Which end of an over-long prompt is kept.")
    cache_dir: str = _f(".dpokit_cache", "Cache for tokenized data and precomputed reference log-probs.")
    layout: Literal["auto", "padded", "shared_prompt", "packed"] = _f(
        "auto",
        "How a batch is laid out in token rows: 'padded' (one row per prompt + response), 'shared_prompt' (one row "
        "[prompt | chosen | rejected] per example, the prompt computed once), 'packed' (shared-prompt examples packed "
        "several per row up to pack_tokens). All give the same loss; 'auto' = the cheaper of shared_prompt and padded by "
        "the decoder FLOPs estimated on the training batches (shared_prompt saves the repeated prompt, padded rows "
        "skip attention between responses and, with sdpa, need no dense mask: long responses favour padded), or "
        "padded when the model's attention takes no custom 4-D masks; the run's log says which and why.",
    )
    pack_tokens: int = _f(2048, "Row budget in tokens for layout=packed.")


@dataclass
class LossConfig:
    """The training objective: a weighted sum of registered losses."""

    beta: float = _f(0.1, "Strength of the KL penalty towards the reference (the paper's beta, 0.1-0.5).")
    reference_free: bool = _f(False, "Use an implicit uniform reference (reference log-probs = 0).")
    terms: list[dict[str, Any]] = _f(
        factory=lambda: [{"name": "sigmoid"}],
        help="Loss terms, each {name: <loss>, weight: 1.0, <loss params>}; e.g. [{name: sigmoid, label_smoothing: 0.1}]. "
        "See `dpokit.losses.available_losses()`.",
    )


@dataclass
class ReferenceConfig:
    """Where the reference log-probs come from."""

    strategy: Literal["auto", "copy", "adapter_disabled", "precomputed", "none"] = _f(
        "auto",
        "'copy': a frozen second model; 'adapter_disabled': the LoRA policy with adapters off (no second copy); "
        "'precomputed': computed once before training, cached on disk; 'none': reference-free losses. "
        "'auto' = none if the loss needs no reference; adapter_disabled with LoRA, else copy, for KTO's KL term, "
        "when eval.sample_prompts samples the reference, or when the run forwards fewer examples than one pass over "
        "the data (a run shorter than an epoch) and a copy fits in memory; else precomputed. The log says which and why.",
    )
    name_or_path: str | None = _f(None, "Reference model location when it differs from model.name_or_path.")
    batch_size: int = _f(32, "Most examples per no-grad batch when precomputing reference log-probs.")
    batch_tokens: int = _f(
        8192,
        "Most padded tokens (rows x longest row) per no-grad batch when precomputing reference log-probs; "
        "examples are sorted by the length of the rows the layout builds, so padding stays small.",
    )


@dataclass
class OptimConfig:
    """Optimizer, schedule and batching."""

    optimizer: Literal["adamw", "rmsprop"] = _f("rmsprop", "Optimizer ('rmsprop' is the paper's).")
    lr: float = _f(5e-7, "Peak learning rate (the paper: 5e-7 for full fine-tuning; LoRA typically needs ~1e-5 to 1e-4).")
    weight_decay: float = _f(0.0, "Decoupled weight decay (adamw) / L2 penalty (rmsprop).")
    adam_betas: list[float] = _f(factory=lambda: [0.9, 0.999], help="AdamW betas.")
    eps: float = _f(1e-8, "Optimizer epsilon.")
    warmup_steps: int = _f(
        150,
        "Optimizer steps of linear warm-up from 0 to lr, at most 10% of the run's planned steps (a short run reaches "
        "its peak lr; the log says when the warm-up was shortened).",
    )
    warmup_ratio: float | None = _f(
        None, "Warm-up as a fraction of the planned optimizer steps, e.g. 0.1; when set, it replaces warmup_steps and its cap."
    )
    schedule: Literal["constant", "cosine", "linear"] = _f("constant", "Learning rate after warm-up.")
    min_lr_ratio: float = _f(0.0, "Final learning rate of the cosine/linear decay, as a fraction of lr.")
    epochs: int = _f(1, "Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = _f(8, "Examples per forward/backward (micro-batch).")
    grad_accumulation: int = _f(8, "Micro-batches per optimizer step (examples per step = batch_size * grad_accumulation).")
    max_grad_norm: float | None = _f(10.0, "Clip the global gradient norm to this value; null = no clipping.")
    seed: int = _f(0, "Seed for python, numpy, torch, adapter init and the data order.")
    logps_chunk_size: int = _f(
        1024, "Scored tokens per chunk of the memory-lean output layer (capped so one chunk's float32 logits stay within 64 MiB)."
    )


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    every_steps: int = _f(100, "Evaluate every N optimizer steps (0 = only at the end). Needs eval data.")
    batch_size: int = _f(16, "Examples per evaluation batch.")
    max_examples: int | None = _f(None, "Evaluate on at most this many held-out examples.")
    sample_prompts: int = _f(0, "Greedy samples from policy and reference for this many eval prompts at each evaluation.")
    max_new_tokens: int = _f(64, "Tokens generated per sample.")


@dataclass
class LoggingConfig:
    """Where metrics go."""

    run_dir: str | None = _f(None, "Run directory (config, metrics, checkpoints, plots); null = runs/<time stamp>.")
    log_every: int = _f(10, "Log training metrics (averaged since the last log) every N optimizer steps.")
    tensorboard: bool = _f(True, "Write TensorBoard event files under run_dir/tensorboard.")
    wandb: bool = _f(False, "Also log to Weights & Biases (needs `pip install wandb`).")
    wandb_project: str | None = _f(None, "W&B project name (default 'dpokit').")
    progress_bar: bool = _f(True, "Show a progress bar with ETA, loss and reward accuracy.")
    plot: bool = _f(True, "Write run_dir/curves.png (loss, accuracy, margins, rewards) at the end.")


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (model/adapter, optimizer, scheduler, RNG states, data position)."""

    every_steps: int = _f(500, "Save a checkpoint every N optimizer steps (0 = only on interruption).")
    keep_last: int = _f(2, "Keep the newest K checkpoints and delete older ones.")


@dataclass
class DistributedConfig:
    """Many processes / machines under torchrun (ignored by a plain single-process run)."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = _f(
        "auto",
        "Under torchrun: 'ddp' (a full replica per process, gradients all-reduced), 'fsdp' (FSDP2: parameters, "
        "gradients and optimizer state sharded per transformer block, then the root), 'none' (refuse to run on "
        "more than one process), 'auto' = ddp when torchrun starts more than one process. Without torchrun "
        "(WORLD_SIZE unset) the run is single-process whatever this says.",
    )
    backend: Literal["auto", "gloo", "nccl"] = _f(
        "auto",
        "Collective backend: 'nccl' (one CUDA GPU per process, cuda:LOCAL_RANK), 'gloo' (CPU), 'auto' = nccl "
        "when CUDA is available and model.device is not cpu, else gloo.",
    )
    global_batch_size: int | None = _f(
        None,
        "Examples per optimizer step over all processes; when set, optim.grad_accumulation is derived as "
        "global_batch_size / (optim.batch_size x processes), which must be a whole number. null = "
        "optim.batch_size x processes x optim.grad_accumulation.",
    )
    fsdp_param_dtype: Literal["float32", "bfloat16", "float16"] | None = _f(
        None,
        "FSDP mixed precision: dtype parameters are all-gathered and computed in (sharded master weights keep "
        "model.dtype); null = model.dtype.",
    )
    fsdp_reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = _f(
        None,
        "FSDP mixed precision: dtype gradients are reduce-scattered in; null = fsdp_param_dtype.",
    )
    fsdp_reshard_after_forward: bool = _f(
        True,
        "FSDP: free each block's gathered parameters after its forward (less memory, one more all-gather in "
        "backward). Activation checkpointing is model.activation_checkpointing, applied per block.",
    )
    sequence_parallel: int = _f(
        1,
        "Sequence parallelism: every row of a micro-batch split along its positions over this many processes "
        "(consecutive ranks form a group that trains the same examples; 1 = off). Padded layout and SDPA only; the "
        "number of processes must be a multiple of it. See docs/sequence-parallel.md.",
    )
    timeout_s: int = _f(1800, "Seconds a collective may wait for the other processes before the run fails.")


@dataclass
class OnlineSamplingConfig:
    """How `dpokit online` samples completions from the current policy (the shared generator)."""

    max_new_tokens: int = _f(64, "Tokens generated per completion at most.")
    temperature: float = _f(1.0, "Sampling temperature (0 = greedy, which gives K identical samples: use > 0).")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1 = off).")
    top_k: int = _f(0, "Top-k filter (0 = off).")
    batch_size: int = _f(64, "Rows (prompt x sample) per generation forward pass.")
    engine: Literal["dpokit", "vllm"] = _f(
        "dpokit",
        "Who samples: 'dpokit' (its own generator, in the training process) or 'vllm' (a running vLLM server at "
        "online.sampling.url, given the current policy after every round; see docs/vllm.md).",
    )
    url: str | None = _f(None, "engine=vllm: the vLLM server's address, e.g. http://127.0.0.1:8000.")
    api_key_env: str = _f("VLLM_API_KEY", "engine=vllm: environment variable holding the server's API key (if it wants one).")


@dataclass
class OnlineConfig:
    """Online and self-labelling DPO (`dpokit online`): rounds of sample -> judge -> pairs -> train."""

    prompts_path: str = _f(
        "",
        "Unlabelled prompts: a JSONL/JSON/CSV/Parquet file, a directory or a datasets hub id whose rows have a 'prompt' "
        "(text or chat messages); required by `dpokit online`.",
    )
    prompt_split: str = _f("train", "Split to read from a hub dataset / dataset directory of prompts.")
    rounds: int = _f(4, "Rounds of generate -> judge -> pairs -> train.")
    prompts_per_round: int = _f(32, "Prompts sampled per round (round-robin over the prompt file, reshuffled per pass).")
    samples_per_prompt: int = _f(4, "Completions K sampled per prompt (>= 2).")
    steps_per_round: int = _f(8, "Optimizer steps trained on each round's pairs (1 = one generate-judge-update cycle per step).")
    pairs: Literal["best_vs_worst", "all_pairs", "ranking"] = _f(
        "best_vs_worst",
        "Preference data from the K judged completions of a prompt: 'best_vs_worst' (one pair), 'all_pairs' (every "
        "pair whose scores differ by more than min_margin), 'ranking' (the whole ranking, for a listwise loss).",
    )
    judge: str | dict[str, Any] | None = _f(
        None,
        "Who labels the completions: a judge spec as `dpokit winrate --judge` takes (reward:MODULE:FUNCTION, "
        "reward_model:PATH, implicit:POLICY[,reference=PATH], llm:PATH, openai:MODEL@URL) or a mapping {spec: ..., "
        "option: value}; 'self' = the policy's own implicit reward beta * log(pi / pi_ref) against the run's reference.",
    )
    reference: Literal["fixed", "refresh"] = _f(
        "fixed",
        "'fixed': the reference stays the start model (or reference.name_or_path); 'refresh': the policy at the start "
        "of each round becomes the reference (iterative DPO; needs reference.strategy copy without LoRA).",
    )
    offline_fraction: float = _f(
        0.0, "Fraction of each round's training examples drawn from the labelled pairs of data.train_path (0 = none)."
    )
    min_margin: float = _f(0.0, "Drop pairs whose judge scores differ by this much or less (ties are always dropped).")
    missing_eos_penalty: float = _f(
        0.0,
        "Subtracted from the judge score of a completion cut off at sampling.max_new_tokens (no EOS) before pairing "
        "(0 = off), so truncated completions lose to finished ones of similar score.",
    )
    self_reward: Literal["implicit", "length_regularized", "length_normalized"] = _f(
        "implicit",
        "online.judge=self: the form of the policy's own label, with |y| the completion's tokens (its stop token "
        "included): 'implicit' = beta * log(pi / pi_ref) (the paper's); 'length_regularized' = beta * log(pi / pi_ref) "
        "- length_penalty * |y| (DICE's length-regularized reward shaping); 'length_normalized' = beta * log(pi / pi_ref) "
        "/ |y| (per token). The implicit reward is a sum over tokens, so the plain form tends to prefer longer completions.",
    )
    length_penalty: float = _f(
        0.0, "self_reward=length_regularized: alpha, the reward taken off per token of the completion (> 0 there, 0 otherwise)."
    )
    prefer_shorter_within: float | None = _f(
        None,
        "Length-aware pair choice (pairs=best_vs_worst): among the completions whose scores lie within this much of the "
        "best, the shortest (fewest tokens) is the chosen one; the worst stays the rejected one. null = off (the best is "
        "chosen).",
    )
    judge_retries: int = _f(2, "Retries of a failing judge call before the run stops with a checkpoint.")
    judge_retry_wait_s: float = _f(5.0, "Seconds between judge retries (doubled after each).")
    heldout_path: str | None = _f(
        None, "Labelled pairs for the held-out reward accuracy of every round; null = data.eval_path (if any)."
    )
    sampling: OnlineSamplingConfig = _f(factory=OnlineSamplingConfig, help="Sampling.")


@dataclass
class TrainConfig:
    """A whole run."""

    model: ModelConfig = _f(factory=ModelConfig, help="The policy model.")
    data: DataConfig = _f(factory=DataConfig, help="Preference data.")
    loss: LossConfig = _f(factory=LossConfig, help="The objective.")
    reference: ReferenceConfig = _f(factory=ReferenceConfig, help="The reference model strategy.")
    optim: OptimConfig = _f(factory=OptimConfig, help="Optimization.")
    eval: EvalConfig = _f(factory=EvalConfig, help="Evaluation.")
    logging: LoggingConfig = _f(factory=LoggingConfig, help="Logging.")
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig, help="Checkpoints.")
    distributed: DistributedConfig = _f(factory=DistributedConfig, help="Multi-process training (torchrun).")
    online: OnlineConfig = _f(factory=OnlineConfig, help="Online and self-labelling DPO (`dpokit online`).")
    output_dir: str | None = _f(None, "Where the final model is saved (save_pretrained); null = <run_dir>/final.")


# Presets are partial configs applied over the YAML file and under command-line overrides.
PRESETS: dict[str, dict[str, Any]] = {
    # Supervised fine-tuning on the preferred responses (the paper's first stage / Preferred-FT).
    "sft": {"loss": {"terms": [{"name": "sft"}], "reference_free": False}, "reference": {"strategy": "none"}},
}


# ------------------------------------------------------------------------------------------------
# Building a config from dicts, with type checks and helpful errors.
# ------------------------------------------------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included (``["model", "model.name_or_path", ...]``)."""
    keys: list[str] = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], key + "."))
    return keys


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # a typo in the last part only: compare leaf names within the same section
        leaf = key.rsplit(".", 1)[-1]
        leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
        match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[match[0]]] if match else []
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{_type_name(k)}, {_type_name(v)}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` checked (and losslessly converted) against the annotation ``tp``; raises _Mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _Mismatch
        return [_coerce(v, item_type) for v in value]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _Mismatch
        return {_coerce(k, key_type): _coerce(v, value_type) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-7" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise _Mismatch


def _build(cls: type[_Section], data: Any, prefix: str, where: dict[str, str]) -> _Section:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types."""
    section = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{section}{where.get(prefix.rstrip('.'), '')} must be a mapping of keys, got {data!r}")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}{where.get(dotted, '')}{_suggest(dotted, all_keys())}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, dotted + ".", where)
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise ConfigError(f"config key {dotted!r}{where.get(dotted, '')} must be {_type_name(tp)}, got {value!r}") from None
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update; sections merge, leaves (including lists and free-form dicts) replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and _is_section(key, merged[key]):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _is_section(key: str, value: dict[str, Any]) -> bool:
    # Only schema sections merge; a free-form dict field (data.columns) is replaced as a whole.
    return key in {f.name for f in dataclasses.fields(TrainConfig)} or key in ("lora", "sampling")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain nested dicts/lists/scalars (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], *, where: dict[str, str] | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from nested dicts (unknown keys and wrong types are ConfigErrors)."""
    cfg = _build(TrainConfig, data or {}, "", where or {})
    validate_config(cfg)
    return cfg


def _yaml_key_lines(text: str, filename: str) -> dict[str, str]:
    """Dotted key -> " (cfg.yaml line 7)" for every mapping key in a YAML document."""
    where: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    dotted = prefix + str(key_node.value)
                    where[dotted] = f" ({filename} line {key_node.start_mark.line + 1})"
                    walk(value_node, dotted + ".")

    with contextlib.suppress(yaml.YAMLError):  # a file that does not parse has no locations to add
        walk(yaml.compose(text), "")
    return where


def _parse_override(override: str) -> tuple[list[str], Any]:
    if "=" not in override:
        raise ConfigError(f"cannot read override {override!r}: write it as section.key=value, e.g. loss.beta=0.2")
    key, _, raw = override.partition("=")
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"cannot read override {override!r}: the key {key!r} is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse the value of override {override!r} as YAML: {exc}") from None
    return key.split("."), value


def _check_override_key(parts: list[str], override: str) -> None:
    """Overrides may name a schema key, or a sub-key inside a free-form dict field (data.columns.prompt)."""
    keys = set(all_keys())
    dotted = ".".join(parts)
    if dotted in keys:
        return
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent in keys and _field_type(parent) is not None and typing.get_origin(_strip_optional(_field_type(parent))) is dict:
            return
    raise ConfigError(f"unknown config key {dotted!r} in override {override!r}{_suggest(dotted, sorted(keys))}")


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _field_type(dotted: str) -> Any:
    cls: Any = TrainConfig
    tp: Any = None
    for part in dotted.split("."):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
        tp = _type_hints(cls).get(part)
        cls = tp
    return tp


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, preset: str | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig`: defaults < YAML file at ``path`` < ``preset`` < ``overrides``.

    The preset is applied over the file on purpose: ``dpokit sft cfg.yaml`` must train the SFT
    objective even when ``cfg.yaml`` names DPO losses (the same file serves both stages).

    ``overrides`` are ``"section.key=value"`` strings (``"loss.beta=0.2"``,
    ``"model.lora.enabled=true"``); values are parsed as YAML. Raises :class:`ConfigError` for a
    missing/unreadable file, unknown keys (with the nearest valid key), wrong types and
    inconsistent settings.
    """
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
        where = _yaml_key_lines(text, str(path))
    if preset is not None:
        data = _merge(data, PRESETS[preset])
    for override in overrides:
        parts, value = _parse_override(override)
        _check_override_key(parts, override)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
        where[".".join(parts)] = f" (override {override!r})"
    return config_from_dict(data, where=where)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (loadable again with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Cross-field checks (also run by dpokit.training.run for configs built in code).
# ------------------------------------------------------------------------------------------------


def validate_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for values no run can use."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    _validate_optim(cfg.optim, need)
    _validate_model(cfg.model, cfg.reference, need)
    d = cfg.data
    need(0 <= d.eval_split_fraction < 1, f"data.eval_split_fraction must be in [0, 1), got {d.eval_split_fraction}")
    need(d.pack_tokens >= 2, f"data.pack_tokens must be >= 2, got {d.pack_tokens}")
    need(d.max_length >= 2, f"data.max_length must be >= 2, got {d.max_length}")
    need(
        0 < d.max_prompt_length < d.max_length,
        f"data.max_prompt_length must be in [1, data.max_length), got {d.max_prompt_length} with max_length {d.max_length}",
    )
    need(cfg.reference.batch_size >= 1, f"reference.batch_size must be >= 1, got {cfg.reference.batch_size}")
    need(cfg.reference.batch_tokens >= 1, f"reference.batch_tokens must be >= 1, got {cfg.reference.batch_tokens}")
    need(cfg.eval.every_steps >= 0, f"eval.every_steps must be >= 0, got {cfg.eval.every_steps}")
    need(cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    need(cfg.eval.sample_prompts >= 0, f"eval.sample_prompts must be >= 0, got {cfg.eval.sample_prompts}")
    need(cfg.eval.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {cfg.eval.max_new_tokens}")
    need(cfg.logging.log_every >= 1, f"logging.log_every must be >= 1, got {cfg.logging.log_every}")
    need(cfg.checkpoint.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {cfg.checkpoint.every_steps}")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    need(math.isfinite(cfg.loss.beta) and cfg.loss.beta > 0, f"loss.beta must be a positive number, got {cfg.loss.beta}")
    need(bool(cfg.loss.terms), "loss.terms must list at least one loss, e.g. [{name: sigmoid}]")
    for position, term in enumerate(cfg.loss.terms or []):
        weight = term.get("weight", 1.0) if isinstance(term, dict) else 1.0
        need(
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight >= 0,
            f"loss.terms[{position}].weight must be >= 0, got {weight!r} (a negative weight would train away from the "
            "preferred responses)",
        )
    _validate_online(cfg.online, need)
    dd = cfg.distributed
    need(dd.timeout_s >= 1, f"distributed.timeout_s must be >= 1, got {dd.timeout_s}")
    need(dd.sequence_parallel >= 1, f"distributed.sequence_parallel must be >= 1, got {dd.sequence_parallel}")
    need(
        dd.sequence_parallel == 1 or cfg.data.layout == "padded",
        f"distributed.sequence_parallel={dd.sequence_parallel} splits the rows of the padded layout only, but "
        f"data.layout={cfg.data.layout}; set data.layout=padded",
    )
    need(
        dd.global_batch_size is None or dd.global_batch_size >= 1,
        f"distributed.global_batch_size must be >= 1 or null, got {dd.global_batch_size}",
    )
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _validate_optim(o: OptimConfig, need: Any) -> None:
    need(math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be a positive number, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(
        len(o.adam_betas) == 2 and all(0 <= b < 1 for b in o.adam_betas),
        f"optim.adam_betas must be two numbers in [0, 1), got {o.adam_betas}",
    )
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(
        o.warmup_ratio is None or (math.isfinite(o.warmup_ratio) and 0 <= o.warmup_ratio < 1),
        f"optim.warmup_ratio must be in [0, 1) or null, got {o.warmup_ratio}",
    )
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    need(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
    need(o.max_steps is None or o.max_steps >= 1, f"optim.max_steps must be >= 1 or null, got {o.max_steps}")
    need(o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}")
    need(
        0 <= o.seed < 2**32,
        f"optim.seed must be a whole number in [0, 2**32) (numpy and torch take no other), got {o.seed}",
    )
    need(o.grad_accumulation >= 1, f"optim.grad_accumulation must be >= 1, got {o.grad_accumulation}")
    need(o.max_grad_norm is None or o.max_grad_norm > 0, f"optim.max_grad_norm must be > 0 or null, got {o.max_grad_norm}")
    need(o.logps_chunk_size >= 1, f"optim.logps_chunk_size must be >= 1, got {o.logps_chunk_size}")


def _validate_model(m: ModelConfig, reference: ReferenceConfig, need: Any) -> None:
    need(
        m.activation_checkpointing in ("auto", "on", "off", True, False),
        f"model.activation_checkpointing must be auto, on or off, got {m.activation_checkpointing!r}",
    )
    need(
        m.gradient_checkpointing is None
        or m.activation_checkpointing == "auto"
        or m.gradient_checkpointing == (m.activation_checkpointing in ("on", True)),
        f"model.gradient_checkpointing={m.gradient_checkpointing} contradicts model.activation_checkpointing="
        f"{'on' if m.activation_checkpointing in ('on', True) else 'off'}; set only model.activation_checkpointing",
    )
    need(
        m.memory_budget_gib is None or (math.isfinite(m.memory_budget_gib) and m.memory_budget_gib > 0),
        f"model.memory_budget_gib must be a positive number of GiB or null, got {m.memory_budget_gib}",
    )
    need(m.lora.r >= 1, f"model.lora.r must be >= 1, got {m.lora.r}")
    need(0 <= m.lora.dropout < 1, f"model.lora.dropout must be in [0, 1), got {m.lora.dropout}")
    need(
        not (m.quantization != "none" and not m.lora.enabled),
        "model.quantization needs model.lora.enabled=true (quantized base weights cannot be trained directly)",
    )
    need(
        reference.strategy != "adapter_disabled" or m.lora.enabled,
        "reference.strategy=adapter_disabled needs model.lora.enabled=true; use 'copy' or 'precomputed' for full fine-tuning",
    )
    need(
        not (reference.strategy == "adapter_disabled" and reference.name_or_path),
        "reference.name_or_path cannot be used with reference.strategy=adapter_disabled (the reference is the policy's base)",
    )


def _validate_online(on: OnlineConfig, need: Any) -> None:
    need(on.rounds >= 1, f"online.rounds must be >= 1, got {on.rounds}")
    need(on.prompts_per_round >= 1, f"online.prompts_per_round must be >= 1, got {on.prompts_per_round}")
    need(on.samples_per_prompt >= 2, f"online.samples_per_prompt must be >= 2 got {on.samples_per_prompt}")
    need(on.steps_per_round >= 1, f"online.steps_per_round must be >= 1, got {on.steps_per_round}")
    need(0 <= on.offline_fraction < 1, f"online.offline_fraction must be in [0, 1), got {on.offline_fraction}")
    need(on.min_margin >= 0, f"online.min_margin must be >= 0, got {on.min_margin}")
    need(on.missing_eos_penalty >= 0, f"online.missing_eos_penalty must be >= 0, got {on.missing_eos_penalty}")
    _validate_length_control(on, need)
    need(on.judge_retries >= 0, f"online.judge_retries must be >= 0, got {on.judge_retries}")
    need(on.judge_retry_wait_s >= 0, f"online.judge_retry_wait_s must be >= 0, got {on.judge_retry_wait_s}")
    s = on.sampling
    need(s.max_new_tokens >= 1, f"online.sampling.max_new_tokens must be >= 1, got {s.max_new_tokens}")
    need(s.temperature > 0, f"online.sampling.temperature must be > 0 (greedy gives K identical samples), got {s.temperature}")
    need(0 < s.top_p <= 1, f"online.sampling.top_p must be in (0, 1], got {s.top_p}")
    need(s.top_k >= 0, f"online.sampling.top_k must be >= 0, got {s.top_k}")
    need(s.batch_size >= 1, f"online.sampling.batch_size must be >= 1, got {s.batch_size}")
    need(s.engine in ("dpokit", "vllm"), f"online.sampling.engine must be dpokit or vllm, got {s.engine!r}")
    need(s.engine != "vllm" or bool(s.url), "online.sampling.engine=vllm needs online.sampling.url (the vLLM server's address)")


def _validate_length_control(on: OnlineConfig, need: Any) -> None:
    """The self-label's form, its length penalty and the length-aware pair choice: each only where it applies."""
    forms = ("implicit", "length_regularized", "length_normalized")
    need(on.self_reward in forms, f"online.self_reward must be one of {', '.join(forms)}, got {on.self_reward!r}")
    need(
        on.self_reward == "implicit" or on.judge == "self",
        f"online.self_reward={on.self_reward} shapes the policy's own labels: it needs online.judge=self (got {on.judge!r})",
    )
    need(
        math.isfinite(on.length_penalty) and on.length_penalty >= 0,
        f"online.length_penalty must be >= 0, got {on.length_penalty}",
    )
    need(
        (on.length_penalty > 0) == (on.self_reward == "length_regularized"),
        "online.length_penalty (alpha, per token) is used by online.self_reward=length_regularized only, and that form needs "
        f"it > 0; got self_reward={on.self_reward}, length_penalty={on.length_penalty}",
    )
    shorter = on.prefer_shorter_within
    need(
        shorter is None or (math.isfinite(shorter) and shorter >= 0),
        f"online.prefer_shorter_within must be >= 0 or null, got {shorter}",
    )
    need(
        shorter is None or on.pairs == "best_vs_worst",
        f"online.prefer_shorter_within picks the chosen completion of online.pairs=best_vs_worst, not pairs={on.pairs}",
    )


def require_paths(cfg: TrainConfig) -> None:
    """The keys a training run cannot do without (not needed just to build/print a config)."""
    missing = [k for k, v in (("model.name_or_path", cfg.model.name_or_path), ("data.train_path", cfg.data.train_path)) if not v]
    if missing:
        raise ConfigError(
            f"missing required config key(s): {', '.join(missing)}; set them in the YAML file or as overrides, "
            f"e.g. {missing[0]}=path/to/it"
        )


# ------------------------------------------------------------------------------------------------
# Documentation generated from the schema.
# ------------------------------------------------------------------------------------------------


def _default_text(f: dataclasses.Field[Any]) -> str:
    value: Any
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return ""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    text = text.removesuffix("...").strip()
    return f"`{text}`"


def config_reference_markdown() -> str:
    """A Markdown reference of every config key (type, default, meaning), one table per section."""
    lines: list[str] = []

    def section(cls: type, prefix: str, title: str) -> None:
        hints = _type_hints(cls)
        rows = []
        subsections = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                subsections.append((tp, prefix + f.name))
                continue
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | {_type_name(tp).replace('|', '&#124;')} | {_default_text(f)} | {help_text} |")
        if rows:
            lines.append(f"### {title}")
            lines.append("")
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            if doc:
                lines.append(doc)
                lines.append("")
            lines.append("| key | type | default | meaning |")
            lines.append("| --- | --- | --- | --- |")
            lines.extend(rows)
            lines.append("")
        for sub_cls, sub_prefix in subsections:
            section(sub_cls, sub_prefix + ".", f"`{sub_prefix}`")

    section(TrainConfig, "", "top level")
    return "\n".join(lines).rstrip() + "\n"
