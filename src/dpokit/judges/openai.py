"""``openai:MODEL@URL`` -- any OpenAI-compatible chat endpoint as the judge.

vLLM, SGLang, llama.cpp's server, TGI, OpenAI itself, or ``dpokit serve``. The HTTP side is the official
``openai`` client library: it retries 408/409/429/5xx answers and time-outs with exponential backoff
(honouring ``Retry-After``) up to ``max_retries`` times. On top of it this judge

* reads the API key from an environment variable (option ``api_key_env``, default ``OPENAI_API_KEY``;
  a server that needs no key gets a placeholder), and turns a 401/403 into one clear error naming it;
* asks at most ``concurrency`` questions at once (a thread pool; default 8);
* asks the template's question in the paper's format (a one-sentence comparison, then
  ``Preferred: A|B`` on its own line) at temperature 0, and reads the verdict strictly
  (:func:`~dpokit.judges.templates.parse_verdict`): an answer without a well-formed verdict line is an
  *unparseable* judgment, counted as such, never a default.

Options: ``template=``, ``api_key_env=``, ``concurrency=``, ``max_retries=`` (default 4), ``timeout=``
seconds (default 60), ``max_tokens=`` (default 256), ``temperature=`` (default 0).

Tests run this judge against a real server process on 127.0.0.1: ``dpokit serve`` (see
:mod:`dpokit.serve` for why it is dpokit's own server rather than a third-party one).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dpokit.errors import ConfigError, DpokitError
from dpokit.judges.base import Judge, JudgeSpec, PairJudgment, Text, check_lengths, text_of, unparseable
from dpokit.judges.templates import Template, parse_rating, parse_verdict

OPENAI_OPTIONS = ("template", "api_key_env", "concurrency", "max_retries", "timeout", "max_tokens", "temperature")


class JudgeServerError(DpokitError):
    """The endpoint kept failing after every retry."""


class OpenAIJudge(Judge):
    def __init__(self, spec: JudgeSpec, template: Template) -> None:
        import openai

        spec.check_options(OPENAI_OPTIONS)
        model, sep, url = spec.target.partition("@")
        if not sep or not model or not url:
            raise ConfigError(f"judge {spec}: expected openai:MODEL@URL (e.g. openai:my-model@http://127.0.0.1:8000/v1)")
        self.spec = str(spec)
        self.model = model
        self.url = url
        self.template = template
        self.template_text = template.text
        self.key_env = spec.option("api_key_env", "OPENAI_API_KEY")
        self.concurrency = max(1, spec.option("concurrency", 8, int))
        self.max_tokens = spec.option("max_tokens", 256, int)
        self.temperature = spec.option("temperature", 0.0, float)
        self.client = openai.OpenAI(
            base_url=url,
            api_key=os.environ.get(self.key_env) or "no-key",
            max_retries=spec.option("max_retries", 4, int),
            timeout=spec.option("timeout", 60.0, float),
        )
        self.unparseable = 0

    @property
    def identity(self) -> str:
        return f"openai:{self.model}@{self.url}|T={self.temperature!r}|max_tokens={self.max_tokens}"

    def _ask(self, question: str) -> str:
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": question}],
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                seed=0,
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise ConfigError(
                f"judge {self.spec}: {self.url} refused the API key (HTTP {error.status_code}); "
                f"set the environment variable {self.key_env} to a valid key"
            ) from None
        except openai.APIStatusError as error:
            status = error.status_code
            raise JudgeServerError(f"judge {self.spec}: {self.url} answered HTTP {status} after retries: {error}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as error:
            raise JudgeServerError(f"judge {self.spec}: cannot reach {self.url} after retries ({error})") from None
        return response.choices[0].message.content or ""

    def _ask_all(self, questions: Sequence[str]) -> list[str]:
        if not questions:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(questions))) as pool:
            return list(pool.map(self._ask, questions))

    def with_template(self, template: Template) -> Judge:
        other = copy.copy(self)
        other.template, other.template_text = template, template.text
        return other

    def judge_pairs(self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text]) -> list[PairJudgment]:
        check_lengths(prompts, a, b)
        questions = [self.template.chat_prompt(text_of(p), text_of(x), text_of(y)) for p, x, y in zip(prompts, a, b, strict=True)]
        judgments = []
        for answer in self._ask_all(questions):
            label = parse_verdict(answer, self.template.verdict)
            if label is None:
                self.unparseable += 1
                judgments.append(unparseable(answer))
            else:
                judgments.append(PairJudgment(1.0 if label == "A" else 0.0, answer))
        return judgments

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        """A 1-10 rating per response; NaN (and one more ``unparseable``) when the answer has no rating line."""
        check_lengths(prompts, responses)
        questions = [self.template.pointwise_chat_prompt(text_of(p), text_of(r)) for p, r in zip(prompts, responses, strict=True)]
        scores = []
        for answer in self._ask_all(questions):
            rating = parse_rating(answer)
            if rating is None:
                self.unparseable += 1
            scores.append(float("nan") if rating is None else rating)
        return scores


def openai_judge(spec: JudgeSpec, template: Template) -> OpenAIJudge:
    return OpenAIJudge(spec, template)


def describe(judge: Any) -> str:
    return str(getattr(judge, "description", judge.spec))
