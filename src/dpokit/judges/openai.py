"""``openai:MODEL@URL`` -- any OpenAI-compatible chat endpoint as the judge.

vLLM, SGLang, llama.cpp's server, TGI, OpenAI itself, or ``dpokit serve``. The HTTP side is the official
``openai`` client library, with its own retries off: this judge retries what can heal by waiting -- a
connection error, a time-out, HTTP 408, 429 and 5xx -- up to ``max_retries`` times with exponential
backoff (0.5 s doubling, at most 8 s, jittered; a ``Retry-After`` / ``retry-after-ms`` header is honoured
up to a minute), and then raises :class:`JudgeServerError` with the server's own message. Any other 4xx
is the request's fault and is never retried: it is a :class:`~dpokit.errors.ConfigError` carrying the
status and the server's message (e.g. ``HTTP 400: model 'judge''s maximum context length is 512 tokens;
...``), which also tells the online loop not to retry it. Besides, this judge

* reads the API key from an environment variable (option ``api_key_env``, default ``OPENAI_API_KEY``;
  a server that needs no key gets a placeholder), and turns a 401/403 into one clear error naming it;
* asks at most ``concurrency`` questions at once (a thread pool; default 8);
* asks the template's question in the paper's format (a one-sentence comparison, then
  ``Preferred: A|B`` on its own line) at temperature 0, and reads the verdict strictly
  (:func:`~dpokit.judges.templates.parse_verdict`): an answer without a well-formed verdict line is an
  *unparseable* judgment, counted as such, never a default.

Options: ``template=``, ``api_key_env=``, ``concurrency=``, ``max_retries=`` (default 4), ``timeout=``
seconds (default 60), ``max_tokens=`` (default 256), ``temperature=`` (default 0).

Tests run this judge against real server processes on 127.0.0.1: ``dpokit serve`` and a vLLM server
(tests/judges/test_vllm_server.py).
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dpokit.errors import ConfigError, DpokitError
from dpokit.judges.base import Images, Judge, JudgeSpec, PairJudgment, Text, check_lengths, text_of, unparseable
from dpokit.judges.templates import Template, parse_rating, parse_verdict

OPENAI_OPTIONS = ("template", "api_key_env", "concurrency", "max_retries", "timeout", "max_tokens", "temperature")


RETRYABLE_STATUS = (408, 429)  # and every 5xx
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 60.0


class JudgeServerError(DpokitError):
    """The endpoint kept failing after every retry."""


def server_message(error: Any) -> str:
    """The message an OpenAI-compatible server put in its error body (``{"error": {"message": ...}}``),
    else the client library's description of the failure."""
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return str(body["message"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return str(getattr(error, "message", None) or error)


def retryable(status: int) -> bool:
    """Whether an HTTP status can heal by asking again: 408, 429 and 5xx."""
    return status in RETRYABLE_STATUS or status >= 500


def retry_delay(attempt: int, headers: Any = None) -> float:
    """Seconds before retry ``attempt + 1``: the server's ``retry-after-ms`` / ``Retry-After`` (seconds)
    when it sent one (at most a minute), else 0.5 s doubling per attempt up to 8 s, jittered by +-25%."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        try:
            seconds: float = float(value) * scale if value is not None else math.nan
        except ValueError:
            continue
        if 0 <= seconds <= MAX_RETRY_AFTER_S:
            return seconds
    return min(MAX_BACKOFF_S, 0.5 * 2.0**attempt) * random.uniform(0.75, 1.25)


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
        self.max_retries = max(0, spec.option("max_retries", 4, int))
        self.client = openai.OpenAI(
            base_url=url,
            api_key=os.environ.get(self.key_env) or "no-key",
            max_retries=0,  # retried in _ask, which knows which failures can heal
            timeout=spec.option("timeout", 60.0, float),
        )
        self.unparseable = 0

    @property
    def identity(self) -> str:
        return f"openai:{self.model}@{self.url}|T={self.temperature!r}|max_tokens={self.max_tokens}"

    def _ask(self, question: str) -> str:
        """The server's answer to one question; retried as the module docstring says."""
        import openai

        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if last is not None:
                time.sleep(retry_delay(attempt - 1, getattr(getattr(last, "response", None), "headers", None)))
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": question}],
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    seed=0,
                )
            except openai.APIStatusError as error:
                self._refuse_unless_retryable(error)
                last = error
                continue
            except openai.APIConnectionError as error:  # time-outs included
                last = error
                continue
            if not response.choices:
                raise JudgeServerError(f"judge {self.spec}: {self.url} answered without any choice")
            return response.choices[0].message.content or ""
        raise JudgeServerError(self._failure(last))

    def _failure(self, error: Exception | None) -> str:
        """What went wrong on the last attempt, with the server's own message."""
        tries = f"{self.max_retries + 1} attempt(s)"
        status = getattr(error, "status_code", None)
        if status is not None:
            return f"judge {self.spec}: {self.url} answered HTTP {status} after {tries}: {server_message(error)}"
        return f"judge {self.spec}: cannot reach {self.url} after {tries} ({error})"

    def _refuse_unless_retryable(self, error: Any) -> None:
        """A 401/403 names the key's variable; any other status that waiting cannot heal is a ConfigError."""
        status = error.status_code
        if status in (401, 403):
            raise ConfigError(
                f"judge {self.spec}: {self.url} refused the API key (HTTP {status}: {server_message(error)}); "
                f"set the environment variable {self.key_env} to a valid key"
            ) from None
        if not retryable(status):
            raise ConfigError(
                f"judge {self.spec}: {self.url} refused the request with HTTP {status}: {server_message(error)} "
                "(not retried: the same request would be refused again; check the judge's model name and options "
                "such as max_tokens=)"
            ) from None

    def _ask_all(self, questions: Sequence[str]) -> list[str]:
        if not questions:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(questions))) as pool:
            return list(pool.map(self._ask, questions))

    def with_template(self, template: Template) -> Judge:
        other = copy.copy(self)
        other.template, other.template_text = template, template.text
        return other

    def judge_pairs(
        self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text], images: Images | None = None
    ) -> list[PairJudgment]:
        check_lengths(prompts, a, b)
        self.check_images(prompts, images)
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

    def score(self, prompts: Sequence[Text], responses: Sequence[Text], images: Images | None = None) -> list[float]:
        """A 1-10 rating per response; NaN (and one more ``unparseable``) when the answer has no rating line."""
        check_lengths(prompts, responses)
        self.check_images(prompts, images)
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
