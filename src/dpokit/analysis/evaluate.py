"""``dpokit eval``: a policy as an implicit reward model, measured on preference data.

With r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (summed response log-probs), a preference pair
is *ranked correctly* when r(x, y_w) > r(x, y_l). ``dpokit eval`` reports, over a dataset,

* ``rewards/accuracies`` -- the fraction of pairs ranked correctly (preference accuracy),
* ``rewards/margins`` -- the mean r(x, y_w) - r(x, y_l),
* ``rewards/chosen`` / ``rewards/rejected`` -- the mean rewards,
* ``loss`` -- the mean of the configured objective (DPO's -log sigmoid(margin) by default),

using the same log-prob code and objective as training, so the numbers match the run's eval metrics.

This module also holds the loading shared by ``eval``, ``score`` and ``generate``: a plain model
directory, a LoRA adapter directory (policy = base + adapter; reference = base with the adapter
switched off), or a directory written by ``dpokit train``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from dpokit.errors import ConfigError

# ------------------------------------------------------------------------------------------- loading

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The resolved config `dpokit train` writes into its run directory and beside the exported model.
RUN_CONFIG_FILES = ("config.yaml",)
# Subdirectories in which a checkpoint directory may keep the policy weights.
CHECKPOINT_MODEL_SUBDIRS = ("model", "policy", "adapter")


@dataclass
class LoadedPolicy:
    """A policy ready for inference.

    ``kind`` is ``"model"`` (full weights), ``"adapter"`` (a peft LoRA model over ``base_path``), or the
    same inside a ``dpokit train`` checkpoint. ``run_config`` is the training configuration found next
    to the weights (a plain dict), or None.
    """

    model: Any
    tokenizer: Any
    path: str
    kind: str
    base_path: str | None = None
    run_config: dict[str, Any] | None = None

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"


def quiet_loading_bars() -> None:
    """Hide transformers' per-file loading bars when stderr is not a terminal (logs, pipes)."""
    import sys

    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_dtype(dtype: str) -> Any:
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _read_run_config(directory: Path) -> dict[str, Any] | None:
    """The training configuration saved with a model or checkpoint (looked up in it and its parents)."""
    import yaml

    for candidate_dir in (directory, directory.parent, directory.parent.parent):
        for name in RUN_CONFIG_FILES:
            candidate = candidate_dir / name
            if candidate.is_file():
                text = candidate.read_text(encoding="utf-8")
                loaded = json.loads(text) if candidate.suffix == ".json" else yaml.safe_load(text)
                if isinstance(loaded, dict) and ("model" in loaded or "loss" in loaded):
                    return loaded
    return None


def _model_directory(path: Path) -> Path:
    """The directory holding the weights (or adapter) inside ``path``."""
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    for name in CHECKPOINT_MODEL_SUBDIRS:
        sub = path / name
        if (sub / "config.json").is_file() or (sub / "adapter_config.json").is_file():
            return sub
    return path


def _load_tokenizer(candidates: Sequence[str | Path], trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    errors = []
    for candidate in candidates:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(candidate), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as error:
            errors.append(f"{candidate}: {error}")
            continue
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    raise ConfigError("cannot load a tokenizer from " + "; ".join(errors))


def load_policy(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedPolicy:
    """Load a model directory / hub id, a LoRA adapter directory, or a ``dpokit train`` checkpoint.

    The model is put in eval mode on ``device``. A LoRA adapter is loaded on top of the base model named
    in its ``adapter_config.json`` (kept as a peft model so its adapter can be disabled for the
    reference log-probs).
    """
    from transformers import AutoModelForCausalLM

    given = Path(path)
    if not given.exists() and (str(path).startswith((".", "/")) or given.suffix):
        raise ConfigError(f"{path}: no such model directory")
    model_dir = _model_directory(given) if given.exists() else given
    run_config = _read_run_config(given) if given.exists() else None
    torch_dtype = _torch_dtype(dtype)
    target = pick_device(device)
    try:
        if (model_dir / "adapter_config.json").is_file():
            from peft import PeftModel

            adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
            base_path = adapter_config.get("base_model_name_or_path")
            if not base_path:
                raise ConfigError(f"{model_dir / 'adapter_config.json'}: no base_model_name_or_path; cannot find the base model")
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
            model = PeftModel.from_pretrained(base, str(model_dir))
            tokenizer = _load_tokenizer([model_dir, base_path], trust_remote_code)
            kind = "adapter"
        else:
            base_path = None
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, trust_remote_code=trust_remote_code)
            tokenizer = _load_tokenizer([model_dir], trust_remote_code)
            kind = "model"
    except OSError as error:
        raise ConfigError(
            f"{path}: cannot load a model from here ({error}). Give a model directory with config.json, "
            "a LoRA adapter directory with adapter_config.json, or a checkpoint directory from `dpokit train`"
        ) from None
    model.to(target)
    model.eval()
    return LoadedPolicy(model=model, tokenizer=tokenizer, path=str(path), kind=kind, base_path=base_path, run_config=run_config)


@dataclass
class ReferenceChoice:
    """How reference log-probs are obtained: a separate model, the policy with its adapter disabled, or none."""

    mode: str  # "model" | "adapter_disabled" | "none"
    model: Any = None
    path: str | None = None

    def describe(self) -> str:
        if self.mode == "model":
            return f"reference model {self.path}"
        if self.mode == "adapter_disabled":
            return "base model with the adapter disabled"
        return "no reference (reference-free)"


def resolve_reference(
    policy: LoadedPolicy,
    reference_path: str | None,
    *,
    reference_free: bool = False,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> ReferenceChoice:
    """Pick pi_ref: ``--reference``, else the adapter's base, else the model the run started from."""
    if reference_free:
        if reference_path:
            raise ConfigError("give either --reference or --reference-free, not both")
        return ReferenceChoice("none")
    if reference_path:
        reference = load_policy(reference_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return ReferenceChoice("model", reference.model, reference_path)
    if policy.is_adapter:
        return ReferenceChoice("adapter_disabled", path=policy.base_path)
    run_config = policy.run_config or {}
    # The run's reference: reference.name_or_path when it set one, else the model it started from.
    start_model = (run_config.get("reference") or {}).get("name_or_path") or (run_config.get("model") or {}).get("name_or_path")
    if start_model and Path(str(start_model)).resolve() != Path(policy.path).resolve():
        reference = load_policy(start_model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return ReferenceChoice("model", reference.model, str(start_model))
    raise ConfigError(
        f"{policy.path} is a full model with no record of its reference model: pass --reference PATH "
        "(usually the SFT model training started from) or --reference-free"
    )


def run_defaults(policy: LoadedPolicy, config_path: str | None) -> dict[str, Any]:
    """Training-config defaults for eval/score: from ``--config`` if given, else the run's saved config."""
    if config_path:
        from dpokit.config import config_to_dict, load_config

        return config_to_dict(load_config(config_path, []))
    return policy.run_config or {}


# ---------------------------------------------------------------------------------------- log-probs


def reference_logps(reference: ReferenceChoice, policy_model: Any, batch: Any) -> torch.Tensor | None:
    """Summed reference log-probs ``(B, K)`` for ``batch``, or None for reference-free."""
    from dpokit.logprobs import compute_logps

    if reference.mode == "none":
        return None
    if reference.mode == "adapter_disabled":
        with policy_model.disable_adapter():
            return compute_logps(policy_model, batch).logps
    return compute_logps(reference.model, batch).logps


def iterate_batches(items: Any, batch_size: int, pad_token_id: int) -> Iterator[Any]:
    """Batches of ``batch_size`` consecutive prepared items, in dataset order."""
    from dpokit.data import PaddedCollator

    collate = PaddedCollator(pad_token_id)
    for start in range(0, len(items), batch_size):
        yield collate([items[index] for index in range(start, min(start + batch_size, len(items)))])


# --------------------------------------------------------------------------------------------- eval


@dataclass
class EvalResult:
    """Dataset means of the objective's metrics and per-example values (in dataset order)."""

    metrics: dict[str, float]
    num_examples: int
    per_example: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def evaluate_preferences(
    policy_model: Any,
    reference: ReferenceChoice,
    items: Any,
    objective: Any,
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> EvalResult:
    """Mean loss and reward metrics of ``objective`` over prepared ``items``.

    Each batch: policy log-probs ``(B, K)`` and reference log-probs ``(B, K)`` from the same
    ``compute_logps`` the trainer uses, then ``objective(LossInputs(...))``. Metrics are per-example
    ``(B,)`` tensors, so dataset means weight every example equally whatever the batch sizes.
    """
    from dpokit.logprobs import compute_logps
    from dpokit.losses import LossInputs

    if len(items) == 0:
        raise ConfigError("the evaluation dataset is empty")
    device = next(policy_model.parameters()).device
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    per_example: list[dict[str, Any]] = []
    for batch in iterate_batches(items, batch_size, pad_token_id):
        batch = batch.to(device)
        policy = compute_logps(policy_model, batch)
        inputs = LossInputs(
            policy_logps=policy.logps,
            reference_logps=reference_logps(reference, policy_model, batch),
            lengths=policy.lengths,
            response_mask=batch.response_mask,
            policy_token_logps=policy.token_logps,
            token_seq=batch.score_seq,
        )
        output = objective(inputs)
        columns = {"loss": output.per_example, **output.metrics}
        for name, values in columns.items():
            values = values.detach().float().reshape(-1).cpu()
            finite = values[torch.isfinite(values)]
            sums[name] = sums.get(name, 0.0) + float(finite.sum())
            counts[name] = counts.get(name, 0) + int(finite.numel())
        example_ids = batch.extras.get("example_id")
        for row in range(batch.batch_size):
            record: dict[str, Any] = {"example_id": int(example_ids[row]) if example_ids is not None else len(per_example)}
            for name, values in columns.items():
                value = float(values.reshape(-1)[row]) if values.numel() == batch.batch_size else None
                record[name] = value if value is None or math.isfinite(value) else None
            per_example.append(record)
    metrics = {name: sums[name] / counts[name] for name in sums if counts[name] > 0}
    return EvalResult(metrics=metrics, num_examples=len(per_example), per_example=per_example)


# Shown first, in this order, in the printed table.
HEADLINE_METRICS = ("rewards/accuracies", "rewards/margins", "loss", "rewards/chosen", "rewards/rejected")


def format_metrics_table(metrics: dict[str, float]) -> str:
    names = [name for name in HEADLINE_METRICS if name in metrics] + sorted(set(metrics) - set(HEADLINE_METRICS))
    width = max(len(name) for name in names)
    return "\n".join(f"  {name:<{width}}  {metrics[name]:.4f}" for name in names)


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def run_eval_command(args: argparse.Namespace) -> int:
    """``dpokit eval``: load, prepare the data, evaluate, print and write."""
    from dpokit.data import prepare_dataset
    from dpokit.losses import build_objective

    quiet_loading_bars()
    policy = load_policy(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    defaults = run_defaults(policy, args.config)
    loss_defaults = defaults.get("loss") or {}
    data_defaults = defaults.get("data") or {}
    beta = float(_first(args.beta, loss_defaults.get("beta"), 0.1))
    reference_free = bool(args.reference_free or loss_defaults.get("reference_free", False))
    terms = [{"name": args.loss}] if args.loss else (loss_defaults.get("terms") or [{"name": "sigmoid"}])
    data_path = _first(args.data, data_defaults.get("eval_path"))
    if not data_path:
        raise ConfigError("no evaluation data: pass --data PATH (or --config with data.eval_path set)")
    reference = resolve_reference(
        policy,
        args.reference,
        reference_free=reference_free,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    objective = build_objective(terms, beta=beta, reference_free=reference.mode == "none")
    dataset = prepare_dataset(
        data_path,
        policy.tokenizer,
        format=args.format if args.format != "auto" else data_defaults.get("format", "auto"),
        split=_first(args.split, data_defaults.get("eval_split"), "test"),
        columns=data_defaults.get("columns"),
        skip_invalid=bool(data_defaults.get("skip_invalid", False)),
        ranked_mode=data_defaults.get("ranked_mode", "listwise"),
        max_length=int(_first(args.max_length, data_defaults.get("max_length"), 512)),
        max_prompt_length=int(_first(args.max_prompt_length, data_defaults.get("max_prompt_length"), 256)),
        truncation_mode=data_defaults.get("truncation_mode", "keep_end"),
        cache_dir=_first(args.cache_dir, data_defaults.get("cache_dir")),
    )
    items = dataset.items
    if args.limit is not None:
        items = [items[index] for index in range(min(args.limit, len(items)))]
    pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else 0
    result = evaluate_preferences(policy.model, reference, items, objective, batch_size=args.batch_size, pad_token_id=pad_id)
    summary = {
        "model": str(args.model),
        "reference": reference.describe(),
        "data": str(data_path),
        "num_examples": result.num_examples,
        "beta": beta,
        "loss_terms": terms,
        "metrics": result.metrics,
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if args.per_example:
        Path(args.per_example).parent.mkdir(parents=True, exist_ok=True)
        with open(args.per_example, "w", encoding="utf-8") as handle:
            for record in result.per_example:
                handle.write(json.dumps(record) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"model:     {args.model}")
        print(f"reference: {reference.describe()}")
        print(f"data:      {data_path} ({result.num_examples} examples)")
        for line in dataset.report.summary().splitlines():
            print(f"           {line}")
        print(f"beta:      {beta}   loss: {', '.join(term['name'] for term in terms)}")
        print(format_metrics_table(result.metrics))
    return 0
