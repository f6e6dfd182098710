"""``llm:PATH`` -- a local causal LM as the judge, read from its next-token probabilities.

For each pair the judge is asked the template's question (:meth:`Template.label_prompt`: the question,
'State only "A" or "B".', then ``Preferred:``; through the tokenizer's chat template as a user turn
when it has one), and the verdict is read without parsing any free text:

    P(A better) = p(" A" | question) / (p(" A" | question) + p(" B" | question)),

each label's probability being the teacher-forced probability of its tokens (so multi-token labels
work too), computed in batches by :func:`dpokit.generation.completion_logps` -- the same code that
scores completions everywhere else. Pointwise, ``score`` is ``P(Yes) / (P(Yes) + P(No))`` for the
template's pointwise question. Options: ``template=NAME|FILE``, ``batch_size=N``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from dpokit.judges.base import Images, Judge, JudgeSpec, PairJudgment, Text, check_lengths, text_of
from dpokit.judges.templates import Template


class LLMJudge(Judge):
    """Verdicts from a causal LM's probabilities of two labels after the question."""

    def __init__(self, spec: str, model: Any, tokenizer: Any, template: Template, *, batch_size: int = 16) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.template_text = template.text
        self.batch_size = batch_size
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def _ids(self, questions: Sequence[str]) -> list[list[int]]:
        from dpokit.generation import encode_prompts

        prompts: list[Any] = [[{"role": "user", "content": q}] for q in questions] if self.chat else list(questions)
        return encode_prompts(self.tokenizer, prompts)[1]

    def _label_ids(self, label: str) -> list[int]:
        # After a chat template's assistant header the label starts a line; in plain text it follows "Preferred:".
        text = label if self.chat else f" {label}"
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            from dpokit.errors import ConfigError

            raise ConfigError(f"judge {self.spec}: the label {label!r} has no tokens")
        return ids

    def _two_label_probs(self, questions: Sequence[str], labels: tuple[str, str]) -> list[tuple[float, float, float]]:
        """(P(first label) normalised over the two, log p(first), log p(second)) per question."""
        from dpokit.generation import completion_logps
        from dpokit.models import pad_id_of

        if not questions:
            return []
        ids = self._ids(questions)
        first, second = self._label_ids(labels[0]), self._label_ids(labels[1])
        logps = completion_logps(
            self.model,
            ids + ids,
            [first] * len(ids) + [second] * len(ids),
            pad_token_id=pad_id_of(self.tokenizer),
            batch_size=self.batch_size,
        ).tolist()
        n = len(ids)
        out = []
        for la, lb in zip(logps[:n], logps[n:], strict=True):
            top = max(la, lb)
            pa = math.exp(la - top) / (math.exp(la - top) + math.exp(lb - top))
            out.append((pa, la, lb))
        return out

    def with_template(self, template: Template) -> Judge:
        other = copy.copy(self)
        other.template, other.template_text = template, template.text
        return other

    def judge_pairs(
        self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text], images: Images | None = None
    ) -> list[PairJudgment]:
        check_lengths(prompts, a, b)
        self.check_images(prompts, images)
        rows = zip(prompts, a, b, strict=True)
        questions = [self.template.label_prompt(text_of(p), text_of(x), text_of(y)) for p, x, y in rows]
        return [PairJudgment(pa, f"logp A={la:.4f} B={lb:.4f}") for pa, la, lb in self._two_label_probs(questions, ("A", "B"))]

    def score(self, prompts: Sequence[Text], responses: Sequence[Text], images: Images | None = None) -> list[float]:
        check_lengths(prompts, responses)
        self.check_images(prompts, images)
        rows = zip(prompts, responses, strict=True)
        questions = [self.template.pointwise_label_prompt(text_of(p), text_of(r)) for p, r in rows]
        return [p for p, _, _ in self._two_label_probs(questions, ("Yes", "No"))]


def llm_judge(spec: JudgeSpec, template: Template, load: Any = None) -> LLMJudge:
    from dpokit.models import LoadOptions, load_policy

    spec.check_options(["template", "batch_size"])
    load = load or LoadOptions()
    loaded = load_policy(spec.target, load)
    return LLMJudge(str(spec), loaded.model, loaded.tokenizer, template, batch_size=spec.option("batch_size", 16, int))
