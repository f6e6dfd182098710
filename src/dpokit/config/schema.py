"""The run configuration's schema: one dataclass per section, every field with its help text, and the presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


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
