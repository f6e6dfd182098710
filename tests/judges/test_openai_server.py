"""The ``openai:`` judge end to end against a real OpenAI-compatible server process on 127.0.0.1.

The server is ``dpokit serve`` (see :mod:`dpokit.serve` for why not a third-party one) run as a child
process on a free port, serving two tiny models the test builds: ``judge``, trained for a few seconds to
answer every question in the paper's format with ``Preferred: A`` (a judge with a total position bias),
and ``noise``, a random model whose answers never follow the format. The server requires an API key and
answers its first two chat requests with 503, so the client library's retries are exercised for real.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from dpokit.errors import ConfigError
from dpokit.judges import load_judge
from dpokit.judges.stats import win_stats
from tests.helpers import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.slow
KEY_ENV = "DPOKIT_TEST_JUDGE_KEY"
REPLY = "Comparison: the first is better.\nPreferred: A"


def _train_always_a(directory) -> None:
    """A tiny Llama that answers any chat question with REPLY (loss on the reply tokens only)."""
    from dpokit.judges.templates import BUILTIN_TEMPLATES

    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=5, hidden_size=48)
    template = BUILTIN_TEMPLATES["summarization"]
    words = ["good", "bad", "movie", "plot", "the actor", "long story"]
    rows = []
    for i in range(6):
        question = template.chat_prompt(words[i], words[(i + 1) % 6], words[(i + 2) % 6])
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(REPLY + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, reply_ids))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        prompt_ids, reply_ids = rows[step % len(rows)]
        ids = torch.tensor([prompt_ids + reply_ids])
        labels = torch.tensor([[-100] * len(prompt_ids) + reply_ids])
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


class Server:
    """``python -m dpokit serve`` in a child process; its stderr lines collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dpokit", "serve", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            self._queue.put(line)

    def _wait_for_url(self, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise RuntimeError("dpokit serve exited:\n" + "".join(self.lines)) from None
                continue
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+/v1)", line)
            if found:
                return found.group(1)
        raise RuntimeError("dpokit serve did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    judge_dir = tmp_path_factory.mktemp("always-a")
    _train_always_a(judge_dir)
    noise_dir = tmp_path_factory.mktemp("noise")
    tiny_llama(seed=9).save_pretrained(noise_dir)
    tiny_tokenizer().save_pretrained(noise_dir)
    running = Server(
        ["--model", f"judge={judge_dir}", "--model", f"noise={noise_dir}", "--require-api-key", "s3cret", "--fail-first", "2"]
    )
    yield running
    running.stop()


def _judge(server, model: str, **options: str):
    extra = "".join(f",{k}={v}" for k, v in {"api_key_env": KEY_ENV, "max_tokens": "40", **options}.items())
    return load_judge(f"openai:{model}@{server.url}{extra}")


def test_the_judge_retries_after_server_failures_and_reads_the_verdict(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret")
    judge = _judge(server, "judge", max_retries="3", concurrency="2", template="summarization")
    prompts, a, b = ["a movie", "the plot", "an actor"], ["good", "long", "funny"], ["bad", "short", "sad"]
    judgments = judge.judge_pairs(prompts, a, b)
    assert any("injected failure: 503 (2 of 2)" in line for line in server.lines)  # both failures were served and retried
    assert [j.verdict for j in judgments] == ["A", "A", "A"], [j.raw for j in judgments]
    assert all("Preferred: A" in j.raw for j in judgments) and judge.unparseable == 0
    # Judged in both orders, this judge's position bias is total and its verdicts cancel.
    from dpokit.analysis.winrate import judge_both_orders

    stats, outcomes = win_stats(judge_both_orders(judge, prompts, a, b), [0, 1, 2])
    assert outcomes == ["tie"] * 3 and stats.position_bias == 0.5 and stats.position_consistency == 0.0
    scores = judge.score(prompts, a)  # the always-A model has no "Rating:" line: unparseable, NaN
    assert all(s != s for s in scores) and judge.unparseable == 3


def test_an_answer_without_the_verdict_format_is_counted_unparseable(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret")
    judge = _judge(server, "noise")
    judgments = judge.judge_pairs(["a movie", "the plot"], ["good", "long"], ["bad", "short"])
    assert [j.parsed for j in judgments] == [False, False] and judge.unparseable == 2
    assert all(j.verdict is None and j.prob_a != j.prob_a for j in judgments)
    stats, outcomes = win_stats([(judgments[0], judgments[1])], [0])
    assert outcomes == ["unparseable"] and stats.unparseable == 1 and stats.win_rate != stats.win_rate


def test_a_wrong_api_key_is_a_clear_error_naming_the_variable(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(ConfigError, match=f"refused the API key.*{KEY_ENV}"):
        _judge(server, "judge").judge_pairs(["p"], ["a"], ["b"])
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=KEY_ENV):
        _judge(server, "judge").judge_pairs(["p"], ["a"], ["b"])


def test_the_server_speaks_the_openai_api(server):
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["judge", "noise"]
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.post("/nowhere", cast_to=object, body={})
    reply = client.chat.completions.create(
        model="noise", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0.7, n=2, seed=1
    )
    assert len(reply.choices) == 2 and reply.usage.completion_tokens <= 6


def test_an_unreachable_server_is_reported_after_retries():
    from dpokit.judges.openai import JudgeServerError

    os.environ.pop("DPOKIT_UNUSED_KEY", None)
    judge = load_judge("openai:m@http://127.0.0.1:9/v1,max_retries=0,timeout=2,api_key_env=DPOKIT_UNUSED_KEY")
    with pytest.raises(JudgeServerError, match="cannot reach"):
        judge.judge_pairs(["p"], ["a"], ["b"])
    with pytest.raises(ConfigError, match="MODEL@URL"):
        load_judge("openai:no-url")


def _answered(server, status: int) -> int:
    """How many chat requests the server has answered with ``status`` so far (its request log)."""
    return sum(f'"POST /v1/chat/completions HTTP/1.1" {status}' in line for line in server.lines)


def test_a_request_the_server_refuses_is_reported_with_its_message_and_not_retried(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret")
    judge = _judge(server, "judge", max_tokens="100000", max_retries="3")  # far beyond the model's 512 positions
    before = _answered(server, 400)
    with pytest.raises(ConfigError, match=r"HTTP 400: model 'judge''s maximum context length is 512 tokens") as failure:
        judge.judge_pairs(["a movie"], ["good"], ["bad"])
    assert "not retried" in str(failure.value) and "cannot reach" not in str(failure.value)
    deadline = time.time() + 5
    while _answered(server, 400) == before and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a retry's log line would have arrived by now
    assert _answered(server, 400) == before + 1  # asked once, with max_retries=3
    with pytest.raises(ConfigError, match=r"HTTP 404: model 'missing' is not served"):
        _judge(server, "missing", max_retries="3").judge_pairs(["p"], ["a"], ["b"])


def test_retry_delays_honour_the_servers_header_and_otherwise_back_off():
    from dpokit.judges.openai import retry_delay, retryable

    assert retry_delay(0, {"retry-after-ms": "50"}) == pytest.approx(0.05)
    assert retry_delay(5, {"retry-after": "2"}) == 2.0
    assert 0.375 <= retry_delay(0, {"retry-after": "soon"}) <= 0.625
    assert 6.0 <= retry_delay(20) <= 10.0  # capped at 8 s, jittered by 25%
    assert [s for s in (400, 401, 404, 408, 409, 413, 429, 500, 503) if retryable(s)] == [408, 429, 500, 503]


def test_judge_check_with_a_judge_that_never_follows_the_format_exits_2_showing_its_answers(
    server, tmp_path, capsys, monkeypatch
):
    from dpokit.commands.main import main

    monkeypatch.setenv(KEY_ENV, "s3cret")
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"the movie {i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = f"openai:noise@{server.url},api_key_env={KEY_ENV},max_tokens=8"
    code = main(["judge-check", "--judge", spec, "--data", str(data), "--cache", str(tmp_path / "c.jsonl")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "not one of the 6 verdicts" in captured.err and "template dialogue" in captured.err
    assert "'More helpful: A' or 'More helpful: B'" in captured.err and "  1. '" in captured.err
    assert "judge-check: 3/3 (100%)" in captured.err and "\r" not in captured.err  # progress, as plain lines
