"""Judge prompt templates. The built-ins follow the DPO paper's appendix C.2 prompts.

A template asks one pairwise question about ``{prompt}``, ``{a}`` and ``{b}`` and names the line its
verdict goes on (``Preferred`` or ``More helpful``). How the verdict is asked for depends on the judge:

* a **local LM** (``llm:``) answers right after ``<verdict>:`` and the verdict is read from its
  next-token probabilities of the two labels (:meth:`Template.label_prompt`);
* a **chat endpoint** (``openai:``) is asked, as in the paper, for a one-sentence comparison and then the
  verdict on its own line, which is parsed strictly (:meth:`Template.chat_prompt`, :func:`parse_verdict`).

A pointwise question (``{prompt}``, ``{response}``, answered ``Yes``/``No`` or a 1-10 rating) comes
with each template for the judges' ``score``.

Built-ins: ``summarization`` (the paper's GPT-4 (C) prompt: "which summary is more concise and
precise"), ``summarization-simple`` (its GPT-4 (S) prompt), ``dialogue`` ("which response is more
helpful"). Any other name is read as a file: the question text with ``{prompt}``, ``{a}``, ``{b}``
(verdict line ``Preferred``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dpokit.errors import ConfigError

LABELS = ("A", "B")


@dataclass(frozen=True)
class Template:
    name: str
    question: str  # with {prompt}, {a}, {b}
    verdict: str = "Preferred"  # the name of the verdict line
    pointwise: str = "Query: {prompt}\n\nResponse:\n{response}\n\nIs this a good response to the query?"

    @property
    def text(self) -> str:
        """Everything that shapes a judgment: part of the cache key."""
        return f"{self.question}\n--verdict: {self.verdict}\n--pointwise: {self.pointwise}"

    def render(self, prompt: str, a: str, b: str) -> str:
        return self.question.replace("{prompt}", prompt).replace("{a}", a).replace("{b}", b)

    def label_prompt(self, prompt: str, a: str, b: str) -> str:
        """The question for a local LM; its next token after this text is the verdict label."""
        return f'{self.render(prompt, a, b)}\n\nState only "A" or "B".\n{self.verdict}:'

    def chat_prompt(self, prompt: str, a: str, b: str) -> str:
        """The paper's request for a comparison sentence, then the verdict on its own line."""
        return (
            f"{self.render(prompt, a, b)}\n\nFIRST provide a one-sentence comparison of the two, explaining which you "
            f'prefer and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. '
            f"Your response should use the format:\nComparison: <one-sentence comparison and explanation>\n"
            f'{self.verdict}: <"A" or "B">'
        )

    def pointwise_label_prompt(self, prompt: str, response: str) -> str:
        return self.pointwise.replace("{prompt}", prompt).replace("{response}", response) + '\nAnswer "Yes" or "No".\nAnswer:'

    def pointwise_chat_prompt(self, prompt: str, response: str) -> str:
        body = self.pointwise.replace("{prompt}", prompt).replace("{response}", response)
        return f"{body}\n\nRate the response from 1 (worst) to 10 (best). Answer on one line in the format:\nRating: <1-10>"


SUMMARIZATION = Template(
    "summarization",
    "Which of the following summaries does a better job of summarizing the most important points in the given forum "
    "post, without including unimportant or irrelevant details? A good summary is both precise and concise.\n\n"
    "Post:\n{prompt}\n\nSummary A:\n{a}\n\nSummary B:\n{b}",
    pointwise="Post:\n{prompt}\n\nSummary:\n{response}\n\nIs this a precise and concise summary of the post?",
)
SUMMARIZATION_SIMPLE = Template(
    "summarization-simple",
    "Which of the following summaries does a better job of summarizing the most important points in the given forum post?"
    "\n\nPost:\n{prompt}\n\nSummary A:\n{a}\n\nSummary B:\n{b}",
    pointwise="Post:\n{prompt}\n\nSummary:\n{response}\n\nDoes this summary give the most important points of the post?",
)
DIALOGUE = Template(
    "dialogue",
    "For the following query to a chatbot, which response is more helpful?\n\n"
    "Query: {prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}",
    verdict="More helpful",
    pointwise="Query: {prompt}\n\nResponse:\n{response}\n\nIs this a helpful response to the query?",
)
BUILTIN_TEMPLATES = {t.name: t for t in (SUMMARIZATION, SUMMARIZATION_SIMPLE, DIALOGUE)}
DEFAULT_TEMPLATE = "dialogue"


def load_template(name: str) -> Template:
    """A built-in template by name, or a template file (question text with ``{prompt}``, ``{a}``, ``{b}``)."""
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"template {name!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file")
    question = path.read_text(encoding="utf-8").strip()
    missing = [p for p in ("{prompt}", "{a}", "{b}") if p not in question]
    if missing:
        raise ConfigError(f"{path}: a judge template needs the placeholders {missing}")
    return Template(path.stem, question)


def parse_verdict(text: str, verdict: str) -> str | None:
    """The label on the last ``<verdict>: A`` / ``<verdict>: B`` line of ``text`` (quotes and ** allowed),
    or None when there is no such line -- never a guess.

    >>> parse_verdict('Comparison: B is shorter.\\nPreferred: "B"', "Preferred"), parse_verdict("I like A", "Preferred")
    ('B', None)
    """
    pattern = re.compile(rf"^\W*{re.escape(verdict)}\W*:[ \t\"'*]*([AB])[ \t\"'*.]*$", re.IGNORECASE | re.MULTILINE)
    found = pattern.findall(text)
    return found[-1].upper() if found else None


def parse_rating(text: str) -> float | None:
    """The number on the last ``Rating: N`` line (1-10), or None."""
    found = re.findall(r"^\W*Rating\W*:\s*(\d+(?:\.\d+)?)\s*$", text, re.IGNORECASE | re.MULTILINE)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None
