"""An OpenAI-compatible judge endpoint that fails and then recovers, in an online round: a real ``dpokit
serve --fail-first 2`` process on 127.0.0.1 serving a tiny model trained to answer every rating question
with ``Rating: N``. The client library's own retries are off (``max_retries=0``): every failure reaches
the loop's ``online.judge_retries``.

The server samples every request with seed 0 and the tiny policy never stops within 10 tokens, so this
rater gives every completion the same rating and the round has no pair to train on: the recovering judge's
test pins that judging completed after the retries (every completion rated, ``judgments.jsonl`` written)
and that the run then stops for the ties, not for the judge."""

from __future__ import annotations

import random
import re

import pytest
import torch

from dpokit.errors import TrainingError
from dpokit.online import run_online
from dpokit.online.records import RoundFiles
from tests.helpers import tiny_llama, tiny_tokenizer
from tests.judges.test_openai_server import Server
from tests.online.test_rounds import assets, make_config  # noqa: F401  (assets: the module fixture)

pytestmark = pytest.mark.slow
FAILURES = 2


def _train_rater(directory) -> None:
    """A tiny Llama answering any chat question with ``Rating: N`` (loss on the answer tokens only)."""
    from dpokit.judges.templates import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE

    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=5, hidden_size=48)
    template = BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
    words = ["good", "bad", "movie", "plot", "the actor", "long story", "the end", "a song"]
    draw = random.Random(0)
    rows = []
    for i in range(16):
        question = template.pointwise_chat_prompt(words[i % 8], f"{words[(i + 3) % 8]} {words[(i * 5) % 8]}")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        answer = f"Rating: {draw.randint(1, 9)}<|im_end|>"
        rows.append(
            (tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer(answer, add_special_tokens=False)["input_ids"])
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        prompt_ids, answer_ids = rows[step % len(rows)]
        loss = model(
            input_ids=torch.tensor([prompt_ids + answer_ids]), labels=torch.tensor([[-100] * len(prompt_ids) + answer_ids])
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def rater(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rater")
    _train_rater(directory)
    return directory


@pytest.fixture
def server(rater):
    running = Server(["--model", f"rater={rater}", "--fail-first", str(FAILURES)])
    yield running
    running.stop()


def _judge(server: Server) -> str:
    return f"openai:rater@{server.url},max_retries=0,concurrency=1,temperature=1,max_tokens=12"


def _failures_served(server: Server) -> list[str]:
    return [line for line in server.lines if "injected failure: 503" in line]


def test_a_judge_that_recovers_within_the_retries_rates_every_completion(assets, tmp_path, server):  # noqa: F811
    cfg = make_config(
        assets, tmp_path / "run", f"online.judge={_judge(server)}", f"online.judge_retries={FAILURES}", "online.rounds=1"
    )
    with pytest.raises(TrainingError, match="online round 0: no preference pairs"):
        run_online(cfg)
    assert any(f"injected failure: 503 ({FAILURES} of {FAILURES})" in line for line in _failures_served(server))
    files = RoundFiles(tmp_path / "run", 0)
    scores = [j["score"] for j in files.read("judgments")]
    assert len(scores) == 12 and all(s is not None for s in scores)  # every answer was a rating, read after the retries
    assert files.summary()["stages"] == ["prompts", "completions", "judgments", "pairs"]


def test_a_judge_still_failing_after_fewer_retries_stops_with_a_checkpoint_naming_it_and_the_round(assets, tmp_path, server):  # noqa: F811
    judge = _judge(server)
    cfg = make_config(assets, tmp_path / "run", f"online.judge={judge}", "online.judge_retries=0")
    with pytest.raises(TrainingError) as failure:
        run_online(cfg)
    message = str(failure.value)
    # The judge is named as its spec (options in canonical order), with the round.
    assert re.search(
        rf"online round 0: judge openai:rater@{re.escape(server.url)},\S*max_retries=0\S* failed 1 time\(s\)", message
    )
    assert "HTTP 503" in message and "injected failure (--fail-first)" in message  # the server's own message
    assert "checkpoint-0" in message and "--resume latest" in message
    assert len(_failures_served(server)) >= 1
    files = RoundFiles(tmp_path / "run", 0)
    assert files.has("completions") and not files.has("judgments")
