"""The loading layer: every model and tokenizer dpokit uses is loaded here, one function per job.

* :func:`load_model_and_tokenizer` (:func:`load_model`, :func:`load_tokenizer`) -- the policy of a
  training run, from a :class:`~dpokit.config.ModelConfig` (dtype, attention kernel, quantization,
  device, dropout);
* :func:`load_policy` -- a model for inference (``dpokit eval/score/generate/frontier``, the
  experiments): a model directory or hub id, a LoRA adapter directory (the base model named in its
  ``adapter_config.json`` plus the adapter, kept as a peft model so the adapter can be switched off
  for reference log-probs), or a directory written by ``dpokit train`` (a checkpoint's ``model/``
  sub-directory and the run's ``config.yaml`` are found);
* :func:`load_sequence_classifier` -- a sequence-classification model (a reward model).

Shared rules: one device resolver (:func:`resolve_device`), one dtype table (:data:`DTYPES`), one
tokenizer loader with the pad-token rule (:func:`load_tokenizer`), remote code off unless asked,
and every ``from_pretrained`` runs under :func:`quiet_progress_bars` (no per-model "Loading
weights" bars). Also here: LoRA, dropout, gradient checkpointing and exporting the final model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn

from dpokit.compat import adapters_disabled
from dpokit.config import LoraConfig, ModelConfig
from dpokit.errors import ConfigError, TrainingError
from dpokit.locations import is_unreachable_hub_error, missing_local, missing_message

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The resolved config `dpokit train` writes into its run directory and beside the exported model.
RUN_CONFIG_FILES = ("config.yaml",)
# Sub-directories in which a checkpoint directory may keep the policy weights.
CHECKPOINT_MODEL_SUBDIRS = ("model", "policy", "adapter")


def resolve_device(name: str | None = "auto", *, setting: str = "model.device") -> torch.device:
    """``"auto"`` (or None) -> cuda when available, else cpu; anything else is passed to torch.device.

    ``setting`` names the option in error messages (``model.device`` in a config, ``--device`` on
    the command line).
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{setting} {name!r} is not a device torch knows: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} is {name!r} but CUDA is not available; use cpu or auto")
    return device


@overload
def resolve_dtype(name: str, *, setting: str = ..., allow_auto: Literal[False] = ...) -> torch.dtype: ...
@overload
def resolve_dtype(name: str, *, setting: str = ..., allow_auto: bool) -> torch.dtype | str: ...
def resolve_dtype(name: str, *, setting: str = "model.dtype", allow_auto: bool = False) -> torch.dtype | str:
    """The torch dtype named ``name`` (a key of :data:`DTYPES`); ``"auto"`` (kept as the string
    transformers understands: the checkpoint's own dtype) only when ``allow_auto``."""
    if allow_auto and name == "auto":
        return "auto"
    if name not in DTYPES:
        choices = (["auto"] if allow_auto else []) + list(DTYPES)
        raise ConfigError(f"{setting} must be one of {', '.join(choices)}, got {name!r}")
    return DTYPES[name]


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights", "Writing model shards") inside
    the block, restoring the previous setting after it."""
    from dpokit.compat import set_transformers_progress_bars, transformers_progress_bars_enabled

    was_enabled = transformers_progress_bars_enabled()
    set_transformers_progress_bars(False)
    try:
        yield
    finally:
        if was_enabled:
            set_transformers_progress_bars(True)


# ------------------------------------------------------------------------------------------------
# Tokenizer and from_pretrained.
# ------------------------------------------------------------------------------------------------


def load_tokenizer(*locations: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer at the first of ``locations`` that has one, with a pad token guaranteed.

    A missing pad token is filled with an existing special token (eos, else unk, else bos) rather
    than a new one, so the embedding matrix need not be resized: padded positions are masked out of
    attention and never scored, so which id they hold does not matter.
    """
    from transformers import AutoTokenizer

    if not locations:
        raise ValueError("load_tokenizer needs at least one location")
    errors = []
    for location in locations:
        if missing_local(location):
            errors.append(f"{str(location)!r} (no such file or directory)")
            continue
        try:
            with quiet_progress_bars():
                tokenizer = AutoTokenizer.from_pretrained(str(location), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            unreachable = not Path(location).exists() and is_unreachable_hub_error(exc)
            errors.append(f"{str(location)!r} ({missing_message(location, error=exc) if unreachable else exc})")
            continue
        _ensure_pad_token(tokenizer)
        return tokenizer
    raise ConfigError("cannot load a tokenizer from " + "; ".join(errors))


def _ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is not None:
        return
    for candidate in ("eos_token", "unk_token", "bos_token"):
        token = getattr(tokenizer, candidate, None)
        if token is not None:
            tokenizer.pad_token = token
            logger.info("tokenizer has no pad token; padding with its %s %r (embeddings unchanged)", candidate, token)
            return


def pad_id_of(tokenizer: Any) -> int:
    """The id padded positions hold (masked out, never scored): the pad token, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@contextlib.contextmanager
def _quiet_peft_deprecation() -> Iterator[None]:
    """peft wraps a model by asking it ``is_gradient_checkpointing``, which transformers 5.x
    deprecates with a FutureWarning on every call; peft's business, nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _from_pretrained(auto_class: Any, location: str | Path, *, what: str, hint: str = "", **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(location, **kwargs)`` without progress bars; a load that fails
    is a :class:`ConfigError` naming ``location`` (``hint`` is appended to the message)."""
    if missing_local(location):
        raise ConfigError(f"cannot load {what}: {location}: no such file or directory{hint}")
    try:
        with quiet_progress_bars():
            return auto_class.from_pretrained(str(location), **kwargs)
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refused a pickled weights file
        pickled = sorted(p.name for p in Path(location).glob("*.bin")) or ["its .bin weights"]
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line]
        reason = f" ({lines[0][:160]})" if lines else ""
        raise ConfigError(
            f"cannot load {what} from {str(location)!r}: {', '.join(pickled)} is not loaded because it asks to run code "
            f"when unpickled{reason}; it was not written by save_pretrained or has been tampered with. Use "
            "safetensors weights (model.safetensors) from a source you trust"
        ) from None
    except (OSError, ValueError) as exc:
        if not Path(location).exists() and is_unreachable_hub_error(exc):
            raise ConfigError(f"cannot load {what}: {missing_message(location, error=exc)}") from None
        if "trust_remote_code" in str(exc):
            hint = (
                " (allow the repository's own code -- model.trust_remote_code=true, --trust-remote-code -- only if you trust it)"
            )
        raise ConfigError(f"cannot load {what} from {str(location)!r}: {exc}{hint}") from None


# ------------------------------------------------------------------------------------------------
# The policy of a training run.
# ------------------------------------------------------------------------------------------------


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
    # BitsAndBytesConfig.__init__ is unannotated in transformers 5.24.
    if model_cfg.quantization == "4bit":
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]


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
    model: nn.Module = _from_pretrained(AutoModelForCausalLM, location, what="a causal language model", **kwargs)
    if quantization is None and device is not None:
        model.to(device)
    if model_cfg.disable_dropout:
        disable_dropout(model)
    return model


def load_model_and_tokenizer(model_cfg: ModelConfig, *, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """The policy (before LoRA) and its tokenizer; the model's pad id is set from the tokenizer's."""
    for key, location in (
        ("model.name_or_path", model_cfg.name_or_path),
        ("model.tokenizer_name_or_path", model_cfg.tokenizer_name_or_path),
    ):
        if location and missing_local(location):
            raise ConfigError(f"{key}: {location}: no such file or directory")
    tokenizer = load_tokenizer(
        model_cfg.tokenizer_name_or_path or model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code
    )
    model = load_model(model_cfg, device=device if device is not None else resolve_device(model_cfg.device))
    # A transformers model: its config and get_input_embeddings are typed Tensor | Module through nn.Module.__getattr__.
    hf_model: Any = model
    if getattr(hf_model.config, "pad_token_id", None) is None:
        hf_model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    embedding_rows = hf_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding matrix only "
            f"{embedding_rows} rows; use the tokenizer that belongs to the model"
        )
    return model, tokenizer


# ------------------------------------------------------------------------------------------------
# Models for inference: a model directory, a LoRA adapter, a `dpokit train` run or checkpoint.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded for inference; the defaults of every command's ``--dtype``,
    ``--device`` and ``--trust-remote-code``. ``dtype="auto"`` keeps the checkpoint's own dtype;
    ``device="auto"`` is cuda when available, else cpu."""

    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass
class LoadedPolicy:
    """A policy ready for inference (eval mode, on its device).

    ``kind`` is ``"model"`` (full weights) or ``"adapter"`` (a peft LoRA model over ``base_path``).
    ``run_config`` is the training configuration found next to the weights (the plain dict
    ``dpokit train`` saved), or None.
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
    """The directory holding the weights (or adapter) inside ``path``: itself, or a checkpoint's sub-directory."""
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    for name in CHECKPOINT_MODEL_SUBDIRS:
        sub = path / name
        if (sub / "config.json").is_file() or (sub / "adapter_config.json").is_file():
            return sub
    return path


_POLICY_HINT = (
    ". Give a model directory with config.json, a LoRA adapter directory with adapter_config.json, "
    "or a checkpoint directory from `dpokit train`"
)


def load_policy(
    path: str | Path,
    *,
    dtype: str = LoadOptions.dtype,
    device: str | None = LoadOptions.device,
    trust_remote_code: bool = LoadOptions.trust_remote_code,
) -> LoadedPolicy:
    """Load a model directory / hub id, a LoRA adapter directory, or a ``dpokit train`` checkpoint.

    The model is put in eval mode on ``device`` (``"auto"``/None: cuda when available). A LoRA
    adapter is loaded on top of the base model named in its ``adapter_config.json`` and kept as a
    peft model, so its adapter can be disabled for the reference log-probs.
    """
    from transformers import AutoModelForCausalLM

    given = Path(path).expanduser()
    if missing_local(path):
        raise ConfigError(f"{path}: no such file or directory (a model, adapter or checkpoint directory)")
    model_dir = _model_directory(given) if given.exists() else given
    run_config = _read_run_config(given) if given.exists() else None
    torch_dtype = resolve_dtype(dtype, setting="dtype", allow_auto=True)
    target = resolve_device(device, setting="device")
    base_path: str | None = None
    if (model_dir / "adapter_config.json").is_file():
        model, base_path = _load_adapter(model_dir, torch_dtype, trust_remote_code)
        tokenizer = load_tokenizer(model_dir, base_path, trust_remote_code=trust_remote_code)
    else:
        model = _from_pretrained(
            AutoModelForCausalLM,
            model_dir,
            what="a causal language model",
            hint=_POLICY_HINT,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
        )
        tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model.to(target)
    model.eval()
    return LoadedPolicy(
        model=model,
        tokenizer=tokenizer,
        path=str(path),
        kind="adapter" if base_path else "model",
        base_path=base_path,
        run_config=run_config,
    )


def _load_adapter(adapter_dir: Path, dtype: torch.dtype | str, trust_remote_code: bool) -> tuple[nn.Module, str]:
    """A peft model: the base named in ``adapter_config.json`` with the adapter on top; and that base's location."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config_file = adapter_dir / "adapter_config.json"
    base_path = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_path:
        raise ConfigError(f"{config_file}: no base_model_name_or_path; cannot find the base model")
    base = _from_pretrained(
        AutoModelForCausalLM,
        base_path,
        what=f"the base model of the adapter {str(adapter_dir)!r}",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    with quiet_progress_bars(), _quiet_peft_deprecation():
        return PeftModel.from_pretrained(base, str(adapter_dir)), str(base_path)


def load_sequence_classifier(
    path: str | Path,
    *,
    device: str | None = LoadOptions.device,
    trust_remote_code: bool = LoadOptions.trust_remote_code,
) -> tuple[nn.Module, Any]:
    """A sequence-classification model (e.g. a reward model) in eval mode on ``device``, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(
        AutoModelForSequenceClassification,
        path,
        what="a sequence-classification model",
        trust_remote_code=trust_remote_code,
    )
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # batched scoring finds each row's last token by it
    return model.to(resolve_device(device, setting="device")).eval(), tokenizer


# ------------------------------------------------------------------------------------------------
# LoRA, dropout, gradient checkpointing.
# ------------------------------------------------------------------------------------------------


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
        # Unannotated in peft.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)  # type: ignore[no-untyped-call]
    target = lora_cfg.target_modules
    peft_config = peft.LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; the scale alpha / r takes a float
        lora_dropout=lora_cfg.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet_peft_deprecation():
            return peft.get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ConfigError(f"cannot apply LoRA with target_modules={target!r}: {exc}") from None


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (and switch the KV cache off).

    Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
    Recent transformers 5.x call it "activation checkpointing" (the old method name warns).
    """
    kwargs = {"use_reentrant": False}
    hf_model: Any = model  # transformers methods, typed Tensor | Module through nn.Module.__getattr__
    if hasattr(model, "activation_checkpointing_enable"):
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config"):
        hf_model.config.use_cache = False


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model; checked without importing peft (seconds of start-up): a
    peft model can only exist once peft has been imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


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
                with adapters_disabled(model):
                    yield model
            else:
                yield model
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------
# Exporting the final model.
# ------------------------------------------------------------------------------------------------


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
    hf_policy: Any = policy  # transformers / peft methods, typed Tensor | Module through nn.Module.__getattr__
    if is_peft_model(policy):
        if lora_export == "adapter":
            hf_policy.save_pretrained(out, safe_serialization=True)
        elif lora_export == "merged":
            if getattr(policy, "is_loaded_in_4bit", False) or getattr(policy, "is_loaded_in_8bit", False):
                raise TrainingError("cannot merge adapters into quantized base weights; set model.lora.export=adapter")
            hf_policy.merge_and_unload().save_pretrained(out, safe_serialization=True)
        else:
            raise ConfigError(f"model.lora.export must be 'merged' or 'adapter', got {lora_export!r}")
    else:
        hf_policy.save_pretrained(out, safe_serialization=True)
