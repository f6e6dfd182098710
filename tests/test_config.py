"""The typed config: YAML + section.key=value overrides, helpful errors, presets, docs from the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dpokit.config import (
    TrainConfig,
    all_keys,
    config_from_dict,
    config_reference_markdown,
    config_to_dict,
    load_config,
    require_paths,
    save_config,
)
from dpokit.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


YAML = """\
model:
  name_or_path: models/tiny
  lora:
    enabled: true
    target_modules: [q_proj, v_proj]
data:
  train_path: data/train.jsonl
loss:
  beta: 0.1
  terms:
    - {name: sigmoid, label_smoothing: 0.1}
optim:
  lr: 5e-6
"""


def test_yaml_then_overrides_win_and_values_parse_as_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path, YAML),
        [
            "loss.beta=0.2",
            "model.lora.r=4",
            "optim.max_steps=10",
            "loss.terms=[{name: ipo}, {name: sft, weight: 0.5}]",
            "output_dir=out",
        ],
    )
    assert cfg.model.name_or_path == "models/tiny"
    assert cfg.model.lora.enabled is True and cfg.model.lora.r == 4
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.loss.beta == 0.2
    assert cfg.loss.terms == [{"name": "ipo"}, {"name": "sft", "weight": 0.5}]
    assert cfg.optim.lr == 5e-6  # YAML 1.1 reads "5e-6" as a string; float fields accept it
    assert cfg.optim.max_steps == 10 and cfg.output_dir == "out"
    assert cfg.model.lora.alpha == 32.0  # untouched keys keep their defaults


def test_unknown_key_in_yaml_names_file_line_and_nearest_key(tmp_path):
    path = write(tmp_path, "loss:\n  bta: 0.2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.bta' \(.*cfg.yaml line 2\); did you mean 'loss.beta'\?"):
        load_config(path)


def test_unknown_key_in_override_suggests_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rat' .*; did you mean"):
        load_config(None, ["optim.learning_rat=1e-5"])
    with pytest.raises(ConfigError, match=r"did you mean 'model.lora.alpha'"):
        load_config(None, ["model.lora.alpah=8"])
    with pytest.raises(ConfigError, match=r"did you mean 'eval.every_steps'"):
        load_config(None, ["evl.every_steps=5"])


def test_wrong_types_name_the_key_and_the_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.lr' \(override 'optim.lr=fast'\) must be float, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'model.lora.enabled' .*must be bool"):
        load_config(None, ["model.lora.enabled=maybe"])
    with pytest.raises(ConfigError, match=r"'model.dtype' .*'float32' \| 'bfloat16' \| 'float16'"):
        load_config(None, ["model.dtype=float64"])
    with pytest.raises(ConfigError, match=r"'optim.batch_size' \(.*cfg.yaml line 2\) must be int"):
        load_config(write(tmp_path, "optim:\n  batch_size: 2.5\n"))


def test_malformed_overrides_and_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["loss.beta"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(None, ["model=3"])


def test_free_form_dict_fields_accept_sub_keys():
    cfg = load_config(None, ["data.columns.prompt=question", "data.columns.chosen=good"])
    assert cfg.data.columns == {"prompt": "question", "chosen": "good"}


def test_inconsistent_settings_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["reference.strategy=adapter_disabled", "optim.lr=-1", "data.max_prompt_length=600"])
    message = str(caught.value)
    assert "adapter_disabled needs model.lora.enabled=true" in message
    assert "optim.lr must be a positive number" in message
    assert "max_prompt_length" in message


def test_required_paths_are_checked_only_for_a_run():
    cfg = load_config()  # building and printing a config needs nothing
    with pytest.raises(ConfigError, match="model.name_or_path, data.train_path"):
        require_paths(cfg)


def test_sft_preset_sits_between_yaml_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, YAML), preset="sft")
    assert cfg.loss.terms == [{"name": "sft"}] and cfg.reference.strategy == "none"
    assert cfg.loss.beta == 0.1 and cfg.optim.lr == 5e-6  # the rest of the file still applies
    overridden = load_config(write(tmp_path, YAML), ["loss.terms=[{name: sft}, {name: unlikelihood, weight: 0.1}]"], preset="sft")
    assert overridden.loss.terms[1]["name"] == "unlikelihood"
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, preset="rlhf")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, YAML), ["data.columns.prompt=q"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert config_to_dict(cfg)["model"]["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_every_field_is_documented_and_in_the_reference_markdown():
    markdown = config_reference_markdown()
    keys = all_keys()
    leaves = [k for k in keys if not any(other.startswith(k + ".") for other in keys)]  # not a section
    assert len(leaves) > 50
    for key in leaves:
        assert f"| `{key}` |" in markdown, key

    def undocumented(cls, prefix=""):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{prefix}{f.name} has no help text"
            if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default):
                undocumented(type(f.default_factory()), prefix + f.name + ".")

    undocumented(TrainConfig)
    assert "| `loss.beta` | float | `0.1` |" in markdown
    assert "| `optim.optimizer` | 'adamw' &#124; 'rmsprop' | `rmsprop` |" in markdown
