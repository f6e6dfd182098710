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

The package: :mod:`~dpokit.config.schema` (the dataclasses and presets), :mod:`~dpokit.config.loading`
(YAML, dicts and overrides to a config and back), :mod:`~dpokit.config.validation` (cross-field checks)
and :mod:`~dpokit.config.docs` (the generated reference).
"""

from dpokit.config.docs import config_reference_markdown
from dpokit.config.loading import all_keys, config_from_dict, config_to_dict, load_config, save_config
from dpokit.config.schema import (
    PRESETS,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OnlineConfig,
    OnlineSamplingConfig,
    OptimConfig,
    ReferenceConfig,
    TrainConfig,
    VisionConfig,
)
from dpokit.config.validation import require_paths, validate_config

__all__ = [
    "PRESETS",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OnlineConfig",
    "OnlineSamplingConfig",
    "OptimConfig",
    "ReferenceConfig",
    "TrainConfig",
    "VisionConfig",
    "all_keys",
    "config_from_dict",
    "config_reference_markdown",
    "config_to_dict",
    "load_config",
    "require_paths",
    "save_config",
    "validate_config",
]
