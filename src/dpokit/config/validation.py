"""Cross-field checks of a run configuration (also run by :func:`dpokit.training.run` for configs built in code)."""

from __future__ import annotations

import math
from typing import Any

from dpokit.config.schema import ModelConfig, OnlineConfig, OptimConfig, ReferenceConfig, TrainConfig
from dpokit.errors import ConfigError

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
