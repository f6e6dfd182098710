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
import difflib
import itertools
import json
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn

from dpokit.compat import adapters_disabled
from dpokit.config import LoraConfig, ModelConfig
from dpokit.errors import ConfigError, TrainingError
from dpokit.locations import hub_offline, is_unreachable_hub_error, looks_local, missing_message
from dpokit.rundir import RunPaths

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The resolved config `dpokit train` writes into its run directory and beside the exported model.
# Sub-directories in which a checkpoint directory may keep the policy weights.
CHECKPOINT_MODEL_SUBDIRS = ("model", "policy", "adapter")


class _NoKernelHubAdvice(logging.Filter):
    """Drops bitsandbytes' advice, logged whenever peft imports it on a CPU with AVX512-BF16, to install
    ``kernels`` and fetch a bfloat16 kernel from a hub: that kernel serves only the bfloat16 path
    dpokit keeps its 4-bit layers off (:func:`_one_cpu_4bit_path`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelHubAdvice())


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
# Where a model is: a local path, or a hub id the hub (or its local cache) can serve.
# ------------------------------------------------------------------------------------------------

# Seconds the one look-up of a hub id waits for the hub when HF_HUB_ETAG_TIMEOUT is not set.
HUB_LOOKUP_TIMEOUT_S = 5.0
# Files whose presence in the local hub cache means a hub id was downloaded before.
_HUB_MARKER_FILES = ("config.json", "tokenizer_config.json", "adapter_config.json")
# (endpoint, hub id) pairs the hub has answered for in this process: looked up once.
_FOUND_ON_HUB: set[tuple[str, str]] = set()


def location_problem(location: str | Path) -> str | None:
    """Why ``location`` cannot be loaded, found at once; None when it can be tried.

    An existing path is fine. A name that is not a plausible hub id (``name`` or ``org/name`` in the
    hub's characters, see :func:`is_hub_id`) is a missing local path: ``"<name>: no such file or
    directory"``, with the nearest existing path when one is a typo away. A hub id already in the
    local hub cache is fine. Any other hub id is looked up with one request of at most
    ``HF_HUB_ETAG_TIMEOUT`` (default :data:`HUB_LOOKUP_TIMEOUT_S`) seconds and no retries, so an
    unreachable hub (no network, no DNS, HF_HUB_OFFLINE) or an unknown id is named in one line
    instead of after the hub library's minute of retries.
    """
    text = str(location)
    if Path(text).expanduser().exists():
        return None
    near = near_local_path(text)
    missing = f"{text}: no such file or directory" + (f" (did you mean {near!r}?)" if near else "")
    if not is_hub_id(text):
        return missing
    if _in_hub_cache(text):
        return None
    if hub_offline():
        return (
            f"{missing}, and HF_HUB_OFFLINE is set, so the hub is not asked and {text!r} is not in the local hub cache; "
            "check the name, or unset HF_HUB_OFFLINE to download it"
        )
    problem = hub_lookup(text)
    return None if problem is None else f"{missing}, and {problem}"


def is_hub_id(name: str, suffixes: Iterable[str] = ()) -> bool:
    """Whether ``name`` can be a hub id: not a local-looking path (:func:`dpokit.locations.looks_local`;
    ``suffixes``: file suffixes that make a name local) and valid by the hub's repo-id rules (``name``
    or ``org/name``; letters, digits, ``-_.``; no ``--`` or ``..``; not starting or ending with ``-``
    or ``.``; at most 96 characters)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # documented; not in __all__

    if looks_local(name, suffixes):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def near_local_path(name: str) -> str | None:
    """An existing path one typo per component away from ``name`` (each missing component replaced by
    the closest entry of its directory, by difflib), or None. Lists at most 1,000 entries a directory."""
    path = Path(name).expanduser()
    base = Path(path.anchor) if path.is_absolute() else Path()
    for part in path.parts[1:] if path.is_absolute() else path.parts:
        candidate = base / part
        if not candidate.exists():
            try:
                entries = [entry.name for entry in itertools.islice(base.iterdir(), 1000)]
            except OSError:
                return None
            close = difflib.get_close_matches(part, entries, n=1, cutoff=0.75)
            if not close:
                return None
            candidate = base / close[0]
        base = candidate
    if not base.exists():
        return None
    return f"./{base}" if name.startswith("./") and not str(base).startswith(("/", ".")) else str(base)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in _HUB_MARKER_FILES)


def hub_lookup(repo_id: str, *, endpoint: str | None = None) -> str | None:
    """One metadata request for ``repo_id``'s config.json at ``endpoint`` (default: the hub library's,
    ``HF_ENDPOINT``), without retries and waiting at most ``HF_HUB_ETAG_TIMEOUT`` seconds (default
    :data:`HUB_LOOKUP_TIMEOUT_S`): None when the hub answers for the repository (remembered for the
    process); otherwise why not, as the end of a sentence ("the hub (URL) cannot be reached ...:
    connection refused; ..." or "the hub (URL) has no model ...")."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if (endpoint, repo_id) in _FOUND_ON_HUB:
        return None
    timeout = _hub_timeout()
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", endpoint=endpoint), timeout=timeout, endpoint=endpoint)
    except (GatedRepoError, RemoteEntryNotFoundError):
        pass  # the repository exists (gated: from_pretrained says how to get access)
    except RepositoryNotFoundError:
        return f"the hub ({endpoint}) has no model {repo_id!r} (a private one needs `hf auth login` first); check the name"
    except HfHubHTTPError:
        pass  # the hub answered with another error: from_pretrained reports it
    except Exception as error:
        if not _is_transport_error(error):
            raise
        return (
            f"the hub ({endpoint}) cannot be reached to look it up as a hub id: {_unreachable_cause(error, timeout)}; "
            "check the name, or pass the local directory of a downloaded copy"
        )
    _FOUND_ON_HUB.add((endpoint, repo_id))
    return None


def _hub_timeout() -> float:
    """``HF_HUB_ETAG_TIMEOUT`` seconds when set (the hub library's own metadata timeout), else :data:`HUB_LOOKUP_TIMEOUT_S`."""
    try:
        return float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    except (KeyError, ValueError):
        return HUB_LOOKUP_TIMEOUT_S


def _error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from (``__cause__`` / ``__context__``), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# Words in the names of HTTP clients' transport errors (httpx's ConnectError, ReadTimeout, NetworkError, ...).
_TRANSPORT_WORDS = ("connect", "timeout", "network", "transport", "protocol", "proxy")


def _is_transport_error(error: BaseException) -> bool:
    """Whether a request failed in transport (socket, DNS, TLS, timeout) rather than by a bug."""
    return any(
        isinstance(e, OSError) or any(word in type(e).__name__.lower() for word in _TRANSPORT_WORDS) for e in _error_chain(error)
    )


def _unreachable_cause(error: BaseException, timeout: float) -> str:
    """What stopped a request, in words: the innermost error of its chain, named by kind."""
    import socket

    chain = _error_chain(error)
    root = chain[-1]
    if any(isinstance(e, socket.gaierror) for e in chain):
        return f"the host name does not resolve (no network or DNS: {root})"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    if any(isinstance(e, TimeoutError) or "timeout" in type(e).__name__.lower() for e in chain):
        return f"no answer within {timeout:g} s (HF_HUB_ETAG_TIMEOUT)"
    return f"{type(root).__name__}: {root}" if str(root) else type(root).__name__


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
        problem = location_problem(location)
        if problem is not None:
            errors.append(f"{str(location)!r} ({problem})")
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
    problem = location_problem(location)
    if problem is not None:
        raise ConfigError(f"cannot load {what}: {problem}{hint}")
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
    """The ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``none``): NF4 with double
    quantization and ``dtype`` compute for ``4bit`` (QLoRA), int8 for ``8bit``. bitsandbytes runs these
    on CUDA and, from 0.50, on the CPU."""
    if model_cfg.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(
            f"model.quantization={model_cfg.quantization} needs the 'bitsandbytes' package: "
            "`pip install 'dpokit[qlora]'` (bitsandbytes>=0.50, which also runs on the CPU), or set model.quantization=none"
        ) from None
    # BitsAndBytesConfig.__init__ is unannotated in transformers 5.24.
    if model_cfg.quantization == "4bit":
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]


def _quantized_device_map(device: torch.device | None) -> dict[str, int | str]:
    """Where ``from_pretrained`` puts a quantized model (it is quantized as it is placed, so it cannot
    be moved afterwards): the given CUDA device, the CPU, or CUDA 0 / the CPU when none is given."""
    if device is None:
        return {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    if device.type == "cuda":
        return {"": device.index or 0}
    return {"": device.type}


def is_vision_language(location: str | Path, *, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint at ``location`` is an image-text-to-text model: its config has a vision
    part (``vision_config``) and transformers maps it to ``AutoModelForImageTextToText``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(location), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return False  # from_pretrained reports what is wrong with the location
    return getattr(config, "vision_config", None) is not None and config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_processor(model_cfg: ModelConfig) -> Any:
    """The processor (tokenizer + image processor) of a vision-language policy; None for a causal LM."""
    location = model_cfg.tokenizer_name_or_path or model_cfg.name_or_path
    if not is_vision_language(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code):
        return None
    processor = _auto_processor(location, model_cfg.trust_remote_code)
    _ensure_pad_token(processor.tokenizer)
    return processor


def image_only_processor(processor_class: Any) -> Any:
    """``processor_class`` (a transformers processor that also takes a video processor, e.g.
    ``Qwen2VLProcessor``) without its video processor: built from an image processor and a tokenizer.
    transformers' video processors need torchvision; images alone do not. It is saved under
    ``processor_class``'s own name, so ``AutoProcessor`` loads the saved directory as that class where a
    video processor can be loaded, and dpokit falls back to this class where it cannot."""
    if "video_processor" not in processor_class.get_attributes():
        raise ConfigError(f"{processor_class.__name__} takes no video processor; use it as it is")

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **_: Any) -> None:
        # The parent passes its sub-processors on by position; the video processor, last, is dropped.
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template)

    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "__module__": __name__})


def _auto_processor(location: str | Path, trust_remote_code: bool) -> Any:
    """``AutoProcessor`` at ``location``; for a processor class that also takes a video processor which
    cannot be loaded (no torchvision, or no video processor saved), that class without it
    (:func:`image_only_processor`): dpokit reads images, never videos."""
    from transformers import AutoProcessor

    what = "the processor of a vision-language model"
    try:
        return _from_pretrained(AutoProcessor, location, what=what, trust_remote_code=trust_remote_code)
    except (ConfigError, ImportError) as error:  # ImportError: a video processor needs torchvision
        processor_class = _saved_processor_class(location)
        if processor_class is None or "video_processor" not in processor_class.get_attributes():
            raise
        try:
            processor = _from_pretrained(image_only_processor(processor_class), location, what=what)
        except (ConfigError, ImportError):
            raise error from None
        logger.info("%s: %s loaded without its video processor (%s)", location, processor_class.__name__, str(error)[:200])
    return processor


def _saved_processor_class(location: str | Path) -> Any:
    """The transformers processor class a local model directory names (``processor_class`` in its
    processor or tokenizer config), or None."""
    import transformers

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = Path(location) / name
        if path.is_file():
            class_name = json.loads(path.read_text(encoding="utf-8")).get("processor_class")
            if isinstance(class_name, str) and hasattr(transformers, class_name):
                return getattr(transformers, class_name)
    return None


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The image encoder of a vision-language model (``vision_tower``, ``vision_model``, ``visual``), or None."""
    for module_name, module in model.named_modules():
        if module_name.rsplit(".", 1)[-1] in ("vision_tower", "vision_model", "visual"):
            found: nn.Module = module
            return found
    return None


def language_model(model: nn.Module) -> nn.Module:
    """The language model of a vision-language model (its decoder), the model itself for a causal LM."""
    inner: Any = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    decoder: nn.Module = inner.get_decoder() if hasattr(inner, "get_decoder") else inner
    return decoder


def freeze_vision_tower(model: nn.Module) -> int:
    """Stop gradients to the vision tower's weights; returns how many parameters were frozen."""
    tower = vision_tower(model)
    if tower is None:
        return 0
    count = 0
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
        count += parameter.numel()
    return count


def load_model(model_cfg: ModelConfig, name_or_path: str | None = None, *, device: torch.device | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` (``AutoModelForImageTextToText`` for a vision-language
    checkpoint, :func:`is_vision_language`) with the config's dtype, attention kernel and
    ``trust_remote_code`` (off unless asked), moved to ``device``. Returns the model in train mode
    with dropout disabled when ``model_cfg.disable_dropout``; a vision tower is frozen unless
    ``model_cfg.vision.train_vision_tower``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    location = name_or_path or model_cfg.name_or_path
    vision = is_vision_language(location, trust_remote_code=model_cfg.trust_remote_code)
    dtype = resolve_dtype(model_cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    quantization = _quantization_config(model_cfg, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = _quantized_device_map(device)
    auto_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    what = "an image-text-to-text model" if vision else "a causal language model"
    model: nn.Module = _from_pretrained(auto_class, location, what=what, **kwargs)
    if vision and not model_cfg.vision.train_vision_tower:
        freeze_vision_tower(model)
    if quantization is None and device is not None:
        model.to(device)
    if quantization is not None:
        _one_cpu_4bit_path(model)
    if model_cfg.disable_dropout:
        disable_dropout(model)
    return model


def _one_cpu_4bit_path(model: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on one arithmetic path. On CPUs with AVX512-BF16 they otherwise
    repack their weights for a bfloat16 kernel whenever they run in eval mode without gradients, so the
    reference (the same base, adapters off, no grad) would differ from the policy at step 0 by bfloat16
    rounding, and the exported model would no longer be the trained one."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010  # an nn.Module attribute


def load_model_and_tokenizer(model_cfg: ModelConfig, *, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """The policy (before LoRA) and its tokenizer; the model's pad id is set from the tokenizer's."""
    for key, location in (
        ("model.name_or_path", model_cfg.name_or_path),
        ("model.tokenizer_name_or_path", model_cfg.tokenizer_name_or_path),
    ):
        problem = location_problem(location) if location else None
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")
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
    ``device="auto"`` (or None) is cuda when available, else cpu."""

    dtype: str = "auto"
    device: str | None = "auto"
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
    processor: Any = None  # a vision-language model's processor (tokenizer + image processor); None for a causal LM

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"


def _read_run_config(directory: Path) -> dict[str, Any] | None:
    """The training configuration saved with a model or checkpoint (looked up in it and its parents)."""
    import yaml

    for candidate_dir in (directory, directory.parent, directory.parent.parent):
        candidate = RunPaths(candidate_dir).config
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


def load_policy(path: str | Path, load: LoadOptions | None = None) -> LoadedPolicy:
    """Load a model directory / hub id, a LoRA adapter directory, or a ``dpokit train`` checkpoint, with
    ``load``'s dtype, device and trust in remote code (None: :class:`LoadOptions`' defaults).

    The model is put in eval mode on the device (``"auto"``: cuda when available). A LoRA
    adapter is loaded on top of the base model named in its ``adapter_config.json`` and kept as a
    peft model, so its adapter can be disabled for the reference log-probs. A vision-language
    checkpoint (:func:`is_vision_language`) loads with ``AutoModelForImageTextToText`` and its processor.
    """
    load = load or LoadOptions()
    dtype, device, trust_remote_code = load.dtype, load.device, load.trust_remote_code
    given = Path(path).expanduser()
    problem = location_problem(path)
    if problem is not None:
        raise ConfigError(f"{problem} (a model, adapter or checkpoint directory)")
    model_dir = _model_directory(given) if given.exists() else given
    run_config = _read_run_config(given) if given.exists() else None
    torch_dtype = resolve_dtype(dtype, setting="dtype", allow_auto=True)
    target = resolve_device(device, setting="device")
    base_path: str | None = None
    if (model_dir / "adapter_config.json").is_file():
        model, base_path = _load_adapter(model_dir, torch_dtype, trust_remote_code)
        locations: tuple[str | Path, ...] = (model_dir, base_path)
    else:
        auto_class, what = _policy_class(model_dir, trust_remote_code)
        model = _from_pretrained(
            auto_class, model_dir, what=what, hint=_POLICY_HINT, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        locations = (model_dir,)
    processor = _policy_processor(locations, trust_remote_code) if _is_vision_model(model) else None
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(*locations, trust_remote_code=trust_remote_code)
    model.to(target)
    model.eval()
    return LoadedPolicy(
        model=model,
        tokenizer=tokenizer,
        path=str(path),
        kind="adapter" if base_path else "model",
        base_path=base_path,
        run_config=run_config,
        processor=processor,
    )


def _policy_class(location: str | Path, trust_remote_code: bool) -> tuple[Any, str]:
    """The auto class a policy at ``location`` loads with, and what to call it in errors."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if is_vision_language(location, trust_remote_code=trust_remote_code):
        return AutoModelForImageTextToText, "an image-text-to-text model"
    return AutoModelForCausalLM, "a causal language model"


def _is_vision_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def _policy_processor(locations: Sequence[str | Path], trust_remote_code: bool) -> Any:
    """The processor of a vision-language policy: from the first of ``locations`` that has one."""
    for location in locations[:-1]:
        if (Path(location) / "preprocessor_config.json").is_file() or (Path(location) / "processor_config.json").is_file():
            break
    else:
        location = locations[-1]
    processor = _auto_processor(location, trust_remote_code)
    _ensure_pad_token(processor.tokenizer)
    return processor


def _load_adapter(adapter_dir: Path, dtype: torch.dtype | str, trust_remote_code: bool) -> tuple[nn.Module, str]:
    """A peft model: the base named in ``adapter_config.json`` with the adapter on top; and that base's location."""
    from peft import PeftModel

    config_file = adapter_dir / "adapter_config.json"
    base_path = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_path:
        raise ConfigError(f"{config_file}: no base_model_name_or_path; cannot find the base model")
    auto_class, _ = _policy_class(base_path, trust_remote_code)
    base = _from_pretrained(
        auto_class,
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


def lora_targets(model: nn.Module, target: list[str] | str, scope: str) -> list[str] | str:
    """The modules LoRA adapts in a vision-language model: the linear layers named by ``target``
    (suffixes, or ``all-linear``) inside the language model (``scope="language_model"``), or anywhere
    but the output layer (``"all"``); full module names, so peft adapts exactly those. A causal LM
    keeps ``target`` as given."""
    if vision_tower(model) is None:
        return target
    if scope == "all" and target != "all-linear":
        return target
    inside = {id(m) for m in (language_model(model) if scope == "language_model" else model).modules()}
    head: Any = model
    output = head.get_output_embeddings()
    suffixes = None if target == "all-linear" else ([target] if isinstance(target, str) else list(target))
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and id(module) in inside
        and module is not output
        and (suffixes is None or any(name == s or name.endswith("." + s) for s in suffixes))
    ]
    if not names:
        raise ConfigError(f"model.lora.target_modules={target!r} matches no linear layer in the {scope.replace('_', ' ')}")
    return names


def apply_lora(
    model: nn.Module, lora_cfg: LoraConfig, *, gradient_checkpointing: bool = False, vision_scope: str = "language_model"
) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (``peft``); the base weights are frozen.

    Adapters start as an exact no-op (B = 0), so the policy initially equals the base model, which
    is what makes "adapters disabled" a valid reference. In a vision-language model the adapters go
    where ``vision_scope`` says (:func:`lora_targets`).
    """
    import peft

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Unannotated in peft.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)  # type: ignore[no-untyped-call]
    target = lora_targets(model, lora_cfg.target_modules, vision_scope)
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


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks transformers can checkpoint one by one (its ``GradientCheckpointingLayer``s), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def checkpoint_blocks(model: nn.Module, count: int) -> int:
    """Recompute the activations of the last ``count`` decoder blocks in the backward pass (non-reentrant
    ``torch.utils.checkpoint``, so frozen inputs need no ``requires_grad``) and switch the KV cache off;
    the other blocks keep theirs (which ``count`` blocks makes no difference to the saving). Returns how
    many blocks were wrapped."""
    import functools

    from torch.utils.checkpoint import checkpoint

    blocks = decoder_blocks(model)
    chosen = blocks[len(blocks) - min(count, len(blocks)) :] if count > 0 else []
    for block in chosen:
        setattr(block, "gradient_checkpointing", True)  # noqa: B010  # transformers' switch, read per call
        setattr(block, "_gradient_checkpointing_func", functools.partial(checkpoint, use_reentrant=False))  # noqa: B010
    config: Any = getattr(model, "config", None)
    if chosen and config is not None:
        config.use_cache = False
    return len(chosen)


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
            if getattr(policy, "is_loaded_in_8bit", False):
                raise TrainingError("cannot merge adapters into 8-bit base weights; set model.lora.export=adapter")
            merged = _merge_dequantized(policy) if getattr(policy, "is_loaded_in_4bit", False) else hf_policy.merge_and_unload()
            merged.save_pretrained(out, safe_serialization=True)
        else:
            raise ConfigError(f"model.lora.export must be 'merged' or 'adapter', got {lora_export!r}")
    else:
        hf_policy.save_pretrained(out, safe_serialization=True)


def _merge_dequantized(policy: nn.Module) -> Any:
    """A 4-bit (QLoRA) peft model as a plain full-precision model: each quantized base weight is
    dequantized (to the dtype it was loaded in) and its adapters' delta added in that precision, so the
    saved model computes what the trained policy computed. (peft's own merge would quantize the sum to 4
    bits again.) Modifies ``policy`` in place; it must not be used afterwards."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn.modules import Linear4bit
    from peft.tuners.lora import LoraLayer

    hf_policy: Any = policy
    deltas: dict[str, torch.Tensor] = {}
    for name, module in hf_policy.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            layer: Any = module  # peft's layer classes define get_delta_weight; LoraLayer does not declare it
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            if active:
                deltas[name] = sum((layer.get_delta_weight(a) for a in active), torch.zeros(()))
    base: Any = hf_policy.unload()
    with torch.no_grad():
        for name, module in list(base.named_modules()):
            if isinstance(module, Linear4bit):
                weight = dequantize_4bit(module.weight.data, getattr(module.weight, "quant_state", None))
                if name in deltas:
                    weight = weight + deltas[name].to(device=weight.device, dtype=weight.dtype)
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device)
                linear.weight = nn.Parameter(weight, requires_grad=False)
                if module.bias is not None:
                    linear.bias = nn.Parameter(module.bias.data.to(weight.dtype), requires_grad=False)
                parent, _, child = name.rpartition(".")
                setattr(base.get_submodule(parent) if parent else base, child, linear)
    for flag in ("is_loaded_in_4bit", "is_quantized"):
        if hasattr(base, flag):
            with contextlib.suppress(AttributeError):
                setattr(base, flag, False)
    for holder in (base, base.config):
        if hasattr(holder, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(holder, "quantization_config")
    base.hf_quantizer = None
    return base
