"""Judges: pairwise (P(A better than B)) and pointwise (a score) questions about responses.

:func:`load_judge` turns a spec (``reward:...``, ``reward_model:...``, ``implicit:...``, ``llm:...``,
``openai:...``; see :mod:`dpokit.judges.base`) and a template name into a judge; :class:`CachedJudge`
puts it behind the on-disk judgment cache. The batch API (``judge_pairs``, ``score``) is what the
win-rate evaluation and an online preference loop call.
"""

from __future__ import annotations

from typing import Any

from dpokit.judges.base import Judge, JudgeSpec, PairJudgment, bradley_terry, parse_judge_spec
from dpokit.judges.cache import DEFAULT_CACHE, CachedJudge, JudgmentCache
from dpokit.judges.templates import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE, Template, load_template

__all__ = [
    "BUILTIN_TEMPLATES",
    "DEFAULT_CACHE",
    "CachedJudge",
    "Judge",
    "JudgeSpec",
    "JudgmentCache",
    "PairJudgment",
    "Template",
    "bradley_terry",
    "load_judge",
    "load_template",
    "parse_judge_spec",
]


def load_judge(spec: str | dict[str, Any] | JudgeSpec, template: str | None = None, *, load: Any = None) -> Judge:
    """The judge a spec names. ``template`` (a built-in name or a file) is used by ``llm:`` and
    ``openai:`` judges (default: the spec's ``template=`` option, else ``dialogue``); reward judges
    have no template and refuse one. ``load``: :class:`dpokit.models.LoadOptions` for local models."""
    from dpokit.errors import ConfigError

    parsed = spec if isinstance(spec, JudgeSpec) else parse_judge_spec(spec)
    if parsed.kind in ("llm", "openai"):
        chosen = load_template(template or parsed.option("template", DEFAULT_TEMPLATE))
        if parsed.kind == "llm":
            from dpokit.judges.llm import llm_judge

            return llm_judge(parsed, chosen, load)
        from dpokit.judges.openai import openai_judge

        return openai_judge(parsed, chosen)
    if template is not None:
        raise ConfigError(f"judge {parsed}: a {parsed.kind} judge asks no question, so it takes no template")
    from dpokit.judges import reward

    if parsed.kind == "reward":
        return reward.function_judge(parsed)
    if parsed.kind == "reward_model":
        return reward.reward_model_judge(parsed, None if load is None else load.device)
    return reward.implicit_judge(parsed, load)
