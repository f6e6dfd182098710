"""Loading the policy (and a reference), LoRA, dropout, and the reference strategies.

A *reference strategy* answers one question per batch: what are the reference log-probs
``log pi_ref(y_k | x_b)``, shape (B, K)? It is chosen once from the config
(:func:`build_reference`) and the training loop just calls ``reference.logps(batch)``:

* :class:`CopyReference` -- a frozen second model (full fine-tuning; doubles model memory);
* :class:`AdapterDisabledReference` -- the LoRA policy itself with its adapters switched off: the
  frozen base *is* the reference, so no second copy is held;
* :class:`dpokit.training.reference.PrecomputedReference` -- log-probs computed once before training in
  large no-grad batches and cached on disk (no reference forward during training at all);
* :class:`NoReference` -- reference-free objectives (returns None).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from dpokit.config import LoraConfig, ModelConfig
from dpokit.data.batch import Batch
from dpokit.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"model.device {name!r} is not a device torch knows: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {name!r} but CUDA is not available; use model.device=cpu or auto")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ------------------------------------------------------------------------------------------------
# Tokenizer and model.
# ------------------------------------------------------------------------------------------------


def load_tokenizer(model_cfg: ModelConfig) -> Any:
    """The tokenizer, with a pad token guaranteed.

    A missing pad token is filled with an existing special token (eos, else unk, else bos) rather
    than a new one, so the embedding matrix need not be resized: padded positions are masked out of
    attention and never scored, so which id they hold does not matter.
    """
    from transformers import AutoTokenizer

    location = model_cfg.tokenizer_name_or_path or model_cfg.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {location!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        for candidate in ("eos_token", "unk_token", "bos_token"):
            token = getattr(tokenizer, candidate, None)
            if token is not None:
                tokenizer.pad_token = token
                logger.info("tokenizer has no pad token; padding with its %s %r (embeddings unchanged)", candidate, token)
                break
    return tokenizer


def _quantization_config(model_cfg: ModelConfig, dtype: torch.dtype) -> Any:
    if model_cfg.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(
            f"model.quantization={model_cfg.quantization} needs the 'bitsandbytes' package and a CUDA GPU: "
            "`pip install bitsandbytes`, or set model.quantization=none"
        ) from None
    if model_cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(model_cfg: ModelConfig, name_or_path: str | None = None, *, device: torch.device | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with the config's dtype, attention kernel and
    ``trust_remote_code`` (off unless asked), moved to ``device``. Returns the model in train mode
    with dropout disabled when ``model_cfg.disable_dropout``."""
    from transformers import AutoModelForCausalLM

    location = name_or_path or model_cfg.name_or_path
    dtype = resolve_dtype(model_cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    quantization = _quantization_config(model_cfg, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device.index or 0} if device is not None and device.type == "cuda" else {"": 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        hint = " (set model.trust_remote_code=true only if you trust that code)" if "trust_remote_code" in str(exc) else ""
        raise ConfigError(f"cannot load a causal language model from {location!r}: {exc}{hint}") from None
    if quantization is None and device is not None:
        model.to(device)
    if model_cfg.disable_dropout:
        disable_dropout(model)
    return model


def load_model_and_tokenizer(model_cfg: ModelConfig, *, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """The policy (before LoRA) and its tokenizer; the model's pad id is set from the tokenizer's."""
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, device=device if device is not None else resolve_device(model_cfg.device))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding matrix only "
            f"{model.get_input_embeddings().weight.shape[0]} rows; use the tokenizer that belongs to the model"
        )
    return model, tokenizer


def disable_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout probability in ``model`` (in place) and return it.

    Covers ``nn.Dropout`` modules and float attributes such as Llama's ``attention_dropout`` that
    attention code passes to the kernel. The model config is left alone so an exported model keeps
    its original settings. LoRA dropout is untouched when this runs before adapters are added.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name.lower() and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
    return model


def apply_lora(model: nn.Module, lora_cfg: LoraConfig, *, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (``peft``); the base weights are frozen.

    Adapters start as an exact no-op (B = 0), so the policy initially equals the base model, which
    is what makes "adapters disabled" a valid reference.
    """
    import peft

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    target = lora_cfg.target_modules
    peft_config = peft.LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ConfigError(f"cannot apply LoRA with target_modules={target!r}: {exc}") from None


def enable_gradient_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False


def is_peft_model(model: nn.Module) -> bool:
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, peft.PeftModel)


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the reference: eval mode, no grad, and (for a peft model) adapters off.

    Train/eval mode is restored on exit, so the policy can be used as its own reference mid-training.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if is_peft_model(model):
                with model.disable_adapter():
                    yield model
            else:
                yield model
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------
# Exporting the final model.
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' own "Writing model shards" bars (they would break the training bar)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_final_model(policy: nn.Module, tokenizer: Any, out_dir: str | Path, *, lora_export: str = "merged") -> Path:
    """Save the trained policy so ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it.

    Full fine-tuning: ``save_pretrained`` (safetensors). LoRA: ``lora_export="merged"`` folds the
    adapters into the base weights *in place* (no second copy in memory; the peft wrapper must not be
    used afterwards) and saves a plain model;
    ``"adapter"`` saves the peft adapter only (transformers loads it through its peft integration,
    pulling the base model from ``base_model_name_or_path``). The tokenizer is saved alongside.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_progress_bars():
        _save_policy(policy, out, lora_export)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _save_policy(policy: nn.Module, out: Path, lora_export: str) -> None:
    if is_peft_model(policy):
        if lora_export == "adapter":
            policy.save_pretrained(out, safe_serialization=True)
        elif lora_export == "merged":
            if getattr(policy, "is_loaded_in_4bit", False) or getattr(policy, "is_loaded_in_8bit", False):
                raise TrainingError(
                    "cannot merge adapters into quantized base weights; set model.lora.export=adapter"
                )
            policy.merge_and_unload().save_pretrained(out, safe_serialization=True)
        else:
            raise ConfigError(f"model.lora.export must be 'merged' or 'adapter', got {lora_export!r}")
    else:
        policy.save_pretrained(out, safe_serialization=True)
