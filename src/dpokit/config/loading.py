"""Building a :class:`~dpokit.config.schema.TrainConfig` from YAML, dicts and ``section.key=value`` overrides,
with type checks and located errors (the key, the file and line, the nearest valid key)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml

from dpokit.config.schema import PRESETS, TrainConfig
from dpokit.config.validation import validate_config
from dpokit.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


_Section = TypeVar("_Section", bound="DataclassInstance")


# ------------------------------------------------------------------------------------------------
# Building a config from dicts, with type checks and helpful errors.
# ------------------------------------------------------------------------------------------------


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included (``["model", "model.name_or_path", ...]``)."""
    keys: list[str] = []
    hints = type_hints(cls)
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


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{type_name(k)}, {type_name(v)}]"
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
    hints = type_hints(cls)
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
            raise ConfigError(f"config key {dotted!r}{where.get(dotted, '')} must be {type_name(tp)}, got {value!r}") from None
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
        tp = type_hints(cls).get(part)
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
