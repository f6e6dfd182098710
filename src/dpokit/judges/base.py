"""The judge interface: two questions, asked in batches.

* **pairwise** -- ``judge_pairs(prompts, a, b)``: for each prompt, the probability that response A is
  better than response B, with the raw judgment it was read from (:class:`PairJudgment`);
* **pointwise** -- ``score(prompts, responses)``: one number per response (higher is better).

Every judge is named by a short *spec*, the same on the command line and in YAML::

    reward:MODULE:FUNCTION          a Python callable scoring (prompts=, completions=) -> floats
    reward_model:PATH               a Hugging Face sequence-classification reward model
    implicit:POLICY                 a DPO policy as its own reward model, beta * log(pi / pi_ref)
    llm:PATH                        a local causal LM; the verdict from the next-token probabilities of "A"/"B"
    openai:MODEL@URL                any OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp, TGI, OpenAI)

Options follow the spec after commas, ``key=value`` each: ``reward:pkg.mod:fn,temperature=0.1``,
``implicit:runs/dpo/final,reference=models/sft``, ``openai:gpt-4o@https://api.openai.com/v1,concurrency=4``.
In YAML a judge is either that string or a mapping ``{spec: ..., <option>: <value>, ...}``.

Prompts with images (a vision-language task): both questions take ``images=``, per prompt its images
(encoded files, in placeholder order). A judge sees them only when it can (``sees_images``): a
``reward:`` function that takes an ``images`` argument, or ``implicit:`` of a vision-language policy;
the text-only judges (``reward_model:``, ``llm:``, ``openai:``) refuse prompts with images
(:meth:`Judge.check_images`) instead of judging their text alone.

A judgment never defaults silently: a verdict that cannot be read (an LLM's free text that does not
follow the template's format) is a :class:`PairJudgment` with ``parsed=False`` and ``prob_a`` NaN,
counted as *unparseable* by the statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpokit.data.schema import Text as Text  # the one prompt-or-response type, re-exported for the judges
from dpokit.errors import ConfigError

JUDGE_KINDS = ("reward", "reward_model", "implicit", "llm", "openai")
Images = Sequence[Sequence[bytes]]  # per prompt, its images (encoded files), in placeholder order


@dataclass(frozen=True)
class PairJudgment:
    """P(response A is better than response B), the raw judgment, and whether a verdict was read."""

    prob_a: float
    raw: str
    parsed: bool = True

    @property
    def verdict(self) -> str | None:
        """``"A"``, ``"B"``, ``"tie"`` (exactly 0.5), or None when unparseable."""
        if not self.parsed or math.isnan(self.prob_a):
            return None
        if self.prob_a > 0.5:
            return "A"
        return "B" if self.prob_a < 0.5 else "tie"

    def to_dict(self) -> dict[str, Any]:
        return {"prob_a": None if math.isnan(self.prob_a) else self.prob_a, "raw": self.raw, "parsed": self.parsed}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> PairJudgment:
        prob = row.get("prob_a")
        return cls(float("nan") if prob is None else float(prob), str(row.get("raw", "")), bool(row.get("parsed", True)))


def unparseable(raw: str) -> PairJudgment:
    """A judgment whose verdict could not be read."""
    return PairJudgment(float("nan"), raw, parsed=False)


def text_of(value: Text) -> str:
    """Plain text of a prompt or response (chat messages joined as ``role: content`` lines)."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value)


class Judge:
    """Base class of every judge. Subclasses set ``spec`` and implement the two questions."""

    spec: str = ""
    template_text: str = ""  # the prompt template the judge asks with ("" for reward judges); part of the cache key
    sees_images: bool = False  # whether the judge reads the prompts' images (images=) or only their text

    def judge_pairs(
        self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text], images: Images | None = None
    ) -> list[PairJudgment]:
        raise NotImplementedError

    def score(self, prompts: Sequence[Text], responses: Sequence[Text], images: Images | None = None) -> list[float]:
        raise NotImplementedError

    def check_images(self, prompts: Sequence[Any], images: Images | None) -> None:
        """Refuse prompts with images when this judge reads text only (the images are never ignored); with
        images, one list per prompt."""
        if images is None or not any(images):
            return
        if len(images) != len(prompts):
            raise ConfigError(f"judge {self.spec}: {len(images)} image lists for {len(prompts)} prompts")
        if not self.sees_images:
            raise ConfigError(
                f"judge {self.spec} reads text only and the prompts have images: judge them with a reward:MODULE:FUNCTION "
                "whose function takes images= (each prompt's encoded image files), or implicit: of a vision-language policy"
            )

    @property
    def identity(self) -> str:
        """What a cached judgment is keyed by besides its texts: the spec and the template."""
        return self.spec

    def with_template(self, template: Any) -> Judge:
        """The same judge asking with another template (judges that ask questions only)."""
        raise ConfigError(f"judge {self.spec} asks no question, so it takes no template")


def check_lengths(prompts: Sequence[Any], *others: Sequence[Any]) -> None:
    if any(len(other) != len(prompts) for other in others):
        raise ConfigError(f"a judge needs one response per prompt: got {len(prompts)} prompts and {[len(o) for o in others]}")


def bradley_terry(score_a: float, score_b: float, temperature: float = 1.0) -> float:
    """P(A > B) = sigmoid((s_A - s_B) / temperature); exactly 0.5 when the scores are equal (a tie).

    >>> round(bradley_terry(1.0, 0.0), 4), bradley_terry(0.3, 0.3), round(bradley_terry(0.2, 0.0, 0.1), 4)
    (0.7311, 0.5, 0.8808)
    """
    if score_a == score_b:
        return 0.5
    z = (score_a - score_b) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass(frozen=True)
class JudgeSpec:
    """A parsed judge spec: ``kind``, ``target`` and ``options`` (see the module docstring)."""

    kind: str
    target: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.target}{extra}"

    def option(self, name: str, default: Any, cast: Any = str) -> Any:
        if name not in self.options:
            return default
        value = self.options[name]
        try:
            return cast(value) if cast is not bool else value.lower() in ("1", "true", "yes", "on")
        except ValueError:
            raise ConfigError(f"judge {self}: option {name}={value!r} is not a valid {cast.__name__}") from None

    def check_options(self, allowed: Sequence[str]) -> None:
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ConfigError(f"judge {self}: unknown option(s) {unknown}; {self.kind} judges take {sorted(allowed)}")


def parse_judge_spec(value: str | dict[str, Any]) -> JudgeSpec:
    """``"kind:target[,key=value...]"`` or a YAML mapping ``{spec: ..., key: value}`` -> :class:`JudgeSpec`.

    >>> parse_judge_spec("reward:pkg.mod:fn,temperature=0.5")
    JudgeSpec(kind='reward', target='pkg.mod:fn', options={'temperature': '0.5'})
    """
    extra: dict[str, str] = {}
    if isinstance(value, dict):
        if "spec" not in value:
            raise ConfigError(f"judge {value!r}: a judge mapping needs a 'spec' key (e.g. spec: reward:module:function)")
        extra = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items() if k != "spec"}
        value = str(value["spec"])
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"judge {value!r}: expected KIND:TARGET with KIND one of {', '.join(JUDGE_KINDS)}")
    kind, rest = value.split(":", 1)
    parts = rest.split(",")
    target, options = parts[0], {}
    for part in parts[1:]:
        key, sep, option = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"judge {value!r}: option {part!r} is not key=value")
        options[key.strip()] = option.strip()
    options.update(extra)
    if kind not in JUDGE_KINDS:
        raise ConfigError(f"judge {value!r}: unknown kind {kind!r}; choose from {', '.join(JUDGE_KINDS)}")
    if not target:
        raise ConfigError(f"judge {value!r}: nothing after '{kind}:'")
    return JudgeSpec(kind, target, options)
