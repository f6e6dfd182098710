"""Every read of another library's internals, in one place.

dpokit relies on a few things transformers, peft, tokenizers and datasets do not promise to keep:
private attributes (``config._attn_implementation``, ``_no_split_modules``, ``Dataset._fingerprint``),
naming conventions (peft's parameter names), serialization details (a tokenizers component's pickled
state) and per-architecture knowledge of modelling code (which models scale or soft-cap their logits).
Each is read by one small function here, whose docstring names the library, what it reads and the
versions it was checked against (:data:`CHECKED_VERSIONS`); ``tests/test_compat.py`` pins each one's
behaviour against the installed libraries. When an upgrade removes or changes one of them, the
function raises :class:`LibraryCompatibilityError` naming the library, its installed version and what to
do -- instead of an ``AttributeError`` deep in a training step, or, worse, a silently different
cache key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import os
import pickle
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dpokit.errors import DpokitError

if TYPE_CHECKING:  # only for annotations: importing this module stays cheap
    import torch.nn as nn

__all__ = [
    "CHECKED_VERSIONS",
    "LibraryCompatibilityError",
    "adapters_disabled",
    "architecture_config_dict",
    "attention_implementation",
    "dataset_fingerprint",
    "final_logit_softcap",
    "inductor_default_cache_dir",
    "installed_version",
    "logit_scale",
    "no_split_module_class_names",
    "peft_base_parameter_name",
    "serialized_tokenizer",
    "set_transformers_progress_bars",
    "text_config",
    "tokenizer_backend",
    "tokenizer_component_state",
    "transformers_progress_bars_enabled",
]

# The versions every function below was checked against (the major version, "x" for any minor; for
# 0.y libraries the minor). tests/test_compat.py asserts the installed ones are in these ranges, so an
# upgrade shows up there first.
CHECKED_VERSIONS: dict[str, str] = {
    "transformers": "5.x",  # checked with 5.24.0
    "peft": "0.21.x",  # checked with 0.21.2
    "tokenizers": "0.23.x",  # checked with 0.23.3
    "datasets": "5.x",  # checked with 5.2.0
}


class LibraryCompatibilityError(DpokitError):
    """An installed library no longer offers something dpokit reads (it was probably upgraded)."""


def installed_version(library: str) -> str:
    """The installed version of ``library`` (a distribution name), or ``"not installed"``."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _incompatible(library: str, what: str) -> LibraryCompatibilityError:
    checked = CHECKED_VERSIONS[library]
    return LibraryCompatibilityError(
        f"{library} {installed_version(library)}: {what}. dpokit was checked against {library} {checked}; "
        f"install a checked version (pip install '{library}=={checked.replace('x', '*')}') or report this to "
        f"dpokit with the {library} version"
    )


# ----------------------------------------------------------------------------------------------
# transformers: model configs and modelling conventions


def _is_transformers_config(config: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(config, PretrainedConfig)


def text_config(model: nn.Module) -> Any:
    """The config of ``model``'s language part: ``model.config.get_text_config()`` (multimodal configs
    keep it apart), the config itself when it has no such method, None when the model has none.

    transformers ``PretrainedConfig.get_text_config`` (public); checked with transformers 5.24."""
    config = getattr(model, "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


# The attention implementation name of a model prepared for sequence parallelism
# (dpokit.training.sequence_parallel): SDPA except in a forward split over ranks.
SEQUENCE_PARALLEL_ATTENTION = "dpokit_sequence_parallel"


def attention_implementation(model: nn.Module) -> str:
    """The attention implementation ``model`` runs (``"sdpa"``, ``"eager"``, ``"flex_attention"``,
    ``"flash_attention_2"``, ...); ``"eager"`` when the config does not say (or there is no config).
    A model prepared for sequence parallelism (:data:`SEQUENCE_PARALLEL_ATTENTION`) reports
    ``"sdpa"``: outside a forward split over ranks it runs transformers' SDPA attention.

    transformers ``PretrainedConfig._attn_implementation`` (private), read on the text config;
    checked with transformers 5.24. A transformers config without it is a LibraryCompatibilityError
    (dpokit would otherwise send custom 4-D masks to a kernel that ignores them)."""
    config = text_config(model)
    if config is None:
        return "eager"
    if _is_transformers_config(config) and not hasattr(config, "_attn_implementation"):
        raise _incompatible("transformers", "model configs no longer have `_attn_implementation`")
    name = str(getattr(config, "_attn_implementation", None) or "eager")
    return "sdpa" if name == SEQUENCE_PARALLEL_ATTENTION else name


def no_split_module_class_names(model: nn.Module) -> set[str]:
    """Class names of the modules transformers never splits across devices -- the repeated
    transformer blocks (``LlamaDecoderLayer``, ``GPT2Block``, ...): the union of every submodule's
    ``_no_split_modules`` list. Empty for models that declare none.

    transformers ``PreTrainedModel._no_split_modules`` (private class attribute, a list of class
    names or None); checked with transformers 5.24."""
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None) or []
        if isinstance(declared, str) or not all(isinstance(name, str) for name in declared):
            what = f"{type(module).__name__}._no_split_modules is not a list of class names ({declared!r})"
            raise _incompatible("transformers", what)
        names.update(declared)
    return names


def architecture_config_dict(config: Any) -> dict[str, Any]:
    """``config.to_dict()`` without the entries that do not change the computation: the local path
    (``_name_or_path``), ``transformers_version``, ``use_cache`` and the load dtype (``torch_dtype`` /
    ``dtype``) -- what a model fingerprint hashes.

    transformers ``PretrainedConfig.to_dict`` and its private ``_name_or_path`` key; checked with
    transformers 5.24."""
    config_dict: dict[str, Any] = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "use_cache", "torch_dtype", "dtype"):
        config_dict.pop(volatile, None)
    return config_dict


def logit_scale(config: Any) -> float:
    """The factor some architectures multiply their logits by after the output layer (1.0 for most).

    Per-architecture knowledge of transformers' modelling code, checked with transformers 5.24 (and
    verified once per model against the model's own logits by :func:`dpokit.logprobs.compute_logps`):

    * Cohere (``cohere*`` model types): ``logits * config.logit_scale``;
    * Granite (``granite*``): ``logits / config.logits_scaling``;
    * MiniCPM3 (remote code): ``hidden / config.logits_scaling`` before a bias-free head;
    * HyperCLOVA X: ``logits * config.logits_scaling``;
    * Falcon-H1: ``logits * config.lm_head_multiplier``.
    """
    model_type = str(getattr(config, "model_type", ""))
    if model_type.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        return float(config.logit_scale)
    if model_type.startswith("granite") and getattr(config, "logits_scaling", None) is not None:
        return 1.0 / float(config.logits_scaling)
    if model_type == "minicpm3" and getattr(config, "logits_scaling", None) is not None:
        return 1.0 / float(config.logits_scaling)
    if model_type.startswith("hyperclovax") and getattr(config, "logits_scaling", None) is not None:
        return float(config.logits_scaling)
    if model_type == "falcon_h1" and getattr(config, "lm_head_multiplier", None) is not None:
        return float(config.lm_head_multiplier)
    return 1.0


def final_logit_softcap(config: Any) -> float | None:
    """``c`` of models that soft-cap their logits as ``c * tanh(z / c)`` (Gemma 2 / 3), else None.

    transformers config attribute ``final_logit_softcapping`` (Gemma 2 and 3 text configs); checked
    with transformers 5.24."""
    softcap = getattr(config, "final_logit_softcapping", None)
    return float(softcap) if softcap else None


def transformers_progress_bars_enabled() -> bool:
    """Whether transformers shows its own tqdm bars ("Loading weights", "Writing model shards").

    transformers ``transformers.utils.logging.is_progress_bar_enabled``; checked with transformers
    5.24."""
    from transformers.utils import logging as hf_logging

    return bool(hf_logging.is_progress_bar_enabled())


def set_transformers_progress_bars(enabled: bool) -> None:
    """Switch transformers' own tqdm bars on or off (process-wide).

    transformers ``transformers.utils.logging.enable_progress_bar`` / ``disable_progress_bar``;
    checked with transformers 5.24."""
    from transformers.utils import logging as hf_logging

    # Both are unannotated in transformers 5.24 (no return type), hence the narrow ignores.
    if enabled:
        hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    else:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=1)
def kv_cache_keyword() -> str:
    """The name transformers gives the KV cache in a causal LM's forward arguments and outputs:
    ``cache`` in recent 5.x releases (``past_key_values`` then warns as deprecated), else
    ``past_key_values``.

    transformers ``modeling_outputs.CausalLMOutputWithPast`` field names; checked with transformers 5.24."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    if "cache" in names:
        return "cache"
    if "past_key_values" in names:
        return "past_key_values"
    raise _incompatible("transformers", "CausalLMOutputWithPast has neither a 'cache' nor a 'past_key_values' field")


def inductor_default_cache_dir() -> str:
    """The directory torch inductor uses when ``TORCHINDUCTOR_CACHE_DIR`` is unset (and writes into
    that variable on first use), absolute.

    torch ``_inductor.runtime.cache_dir_utils.default_cache_dir``; checked with torch 2.13."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError as error:
        raise _incompatible("torch", f"torch._inductor.runtime.cache_dir_utils.default_cache_dir is missing ({error})") from error
    return os.path.abspath(default_cache_dir())


# ----------------------------------------------------------------------------------------------
# torch.distributed.checkpoint: loading without unpickling code


_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class UnsafeCheckpointError(DpokitError):
    """A checkpoint file asks to run or build something a checkpoint never needs."""


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only the checkpoint metadata classes, ``torch.Size`` and
    torch's dtype/layout/memory-format constants: a crafted file cannot call anything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch":
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise UnsafeCheckpointError(f"refusing to load {module}.{name}: checkpoint metadata never contains it")


def dcp_safe_reader_and_planner(checkpoint_dir: str | os.PathLike[str]) -> tuple[Any, Any]:
    """A ``torch.distributed.checkpoint`` storage reader and load planner for ``dcp.load`` that unpickle
    nothing but data: the metadata file through an allow-list unpickler, and non-tensor entries (the
    optimizer's param_groups: numbers, tuples, strings) with ``torch.load(weights_only=True)``.
    Either raises :class:`UnsafeCheckpointError` (metadata) or ``pickle.UnpicklingError`` (entries)
    on a crafted checkpoint instead of running its code.

    torch ``FileSystemReader.read_metadata`` (plain ``pickle.load``; re-implemented here with the
    reader's private ``_get_metadata_path``, ``fs`` and ``load_id``) and ``DefaultLoadPlanner.load_bytes``
    (``torch.load(weights_only=False)``); checked with torch 2.13."""
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            get_path = getattr(self, "_get_metadata_path", None)
            if get_path is None or not hasattr(self, "fs"):
                raise _incompatible("torch", "FileSystemReader has no _get_metadata_path / fs")
            with self.fs.create_stream(get_path(kwargs.get("rank")), "rb") as stream:
                metadata = _DcpMetadataUnpickler(stream).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeReader(checkpoint_dir), SafePlanner()


# ----------------------------------------------------------------------------------------------
# peft: parameter names and adapters


_PEFT_PREFIX = "base_model.model."


def peft_base_parameter_name(name: str) -> str | None:
    """The plain-model name of a (possibly peft-wrapped) parameter or buffer; None for adapter weights.

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``; ``...q_proj.lora_A.default.weight`` and
    ``...modules_to_save...`` -> None; a plain model's names are unchanged.

    peft naming conventions (``base_model.model.`` prefix of ``PeftModel``, ``.base_layer.`` of a
    tuner layer's wrapped module, ``lora_`` adapter weights, ``modules_to_save`` copies); checked with
    peft 0.21.2."""
    if "lora_" in name or "modules_to_save" in name:
        return None
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, a peft model computes as its base model (every adapter off).

    peft ``PeftModel.disable_adapter()`` (a context manager); checked with peft 0.21.2."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise _incompatible("peft", f"{type(model).__name__} has no disable_adapter()")
    with disable():
        yield model


# ----------------------------------------------------------------------------------------------
# tokenizers (through transformers' fast tokenizers)


def tokenizer_backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a fast (Rust) tokenizer; None for slow (Python) ones.

    transformers ``TokenizersBackend.backend_tokenizer`` (``PreTrainedTokenizerFast`` in 5.x);
    checked with transformers 5.24. A tokenizer that says it is fast (``is_fast``) but has no backend is a
    LibraryCompatibilityError: falling back to the slow path would silently change the
    tokenized-data cache keys."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and getattr(tokenizer, "is_fast", False) is True:
        raise _incompatible("transformers", f"fast tokenizer {type(tokenizer).__name__} has no `backend_tokenizer`")
    return backend


def serialized_tokenizer(backend: Any) -> str:
    """The whole tokenization pipeline as JSON text (``tokenizer.json``): model, vocabulary, merges,
    normalizer, pre-tokenizer, added tokens, post-processor -- what decides the token ids.

    tokenizers ``Tokenizer.to_str()``; checked with tokenizers 0.23.3."""
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        raise _incompatible("tokenizers", f"{type(backend).__name__} has no to_str()")
    serialized: str = to_str()
    return serialized


def tokenizer_component_state(component: Any) -> dict[str, Any] | None:
    """The settings of a tokenizers normalizer or pre-tokenizer as a dict (``{"type": "ByteLevel",
    "use_regex": true, ...}``, nested ``Sequence`` steps included); None when there is none.

    tokenizers: a component's pickled state, ``component.__getstate__()``, which is its JSON
    serialization (not a documented API); checked with tokenizers 0.23.3."""
    if component is None:
        return None
    try:
        state = json.loads(component.__getstate__())
    except (AttributeError, TypeError, ValueError) as error:
        raise _incompatible("tokenizers", f"the state of {type(component).__name__} is no longer JSON ({error})") from None
    if not isinstance(state, dict) or "type" not in state:
        raise _incompatible("tokenizers", f"the state of {type(component).__name__} has no 'type' ({state!r:.80})")
    return state


# ----------------------------------------------------------------------------------------------
# datasets


def dataset_fingerprint(dataset: Any) -> str:
    """The content fingerprint datasets keeps for a ``Dataset`` (changes with its data and every
    transform applied to it; what its own cache is keyed by).

    datasets ``Dataset._fingerprint`` (private attribute, a hex string); checked with datasets 5.2.0."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise _incompatible("datasets", f"{type(dataset).__name__} has no `_fingerprint` string ({fingerprint!r})")
    return fingerprint
