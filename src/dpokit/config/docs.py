"""The configuration reference, generated from the schema's fields and help texts."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from dpokit.config.loading import type_hints, type_name
from dpokit.config.schema import TrainConfig

# ------------------------------------------------------------------------------------------------
# Documentation generated from the schema.
# ------------------------------------------------------------------------------------------------


def _default_text(f: dataclasses.Field[Any]) -> str:
    value: Any
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return ""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    text = text.removesuffix("...").strip()
    return f"`{text}`"


def config_reference_markdown() -> str:
    """A Markdown reference of every config key (type, default, meaning), one table per section."""
    lines: list[str] = []

    def section(cls: type, prefix: str, title: str) -> None:
        hints = type_hints(cls)
        rows = []
        subsections = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                subsections.append((tp, prefix + f.name))
                continue
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | {type_name(tp).replace('|', '&#124;')} | {_default_text(f)} | {help_text} |")
        if rows:
            lines.append(f"### {title}")
            lines.append("")
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            if doc:
                lines.append(doc)
                lines.append("")
            lines.append("| key | type | default | meaning |")
            lines.append("| --- | --- | --- | --- |")
            lines.extend(rows)
            lines.append("")
        for sub_cls, sub_prefix in subsections:
            section(sub_cls, sub_prefix + ".", f"`{sub_prefix}`")

    section(TrainConfig, "", "top level")
    return "\n".join(lines).rstrip() + "\n"
