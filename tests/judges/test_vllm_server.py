"""The ``openai:`` judge end to end against a real vLLM server process on 127.0.0.1 (tests/vllm_server.py:
one per test session, with an API key). It serves ``judge``, a LoRA adapter that answers every judge
question with ``Preferred: A``, and ``noise``, the random base model whose answers never follow the format.

Server failures are real HTTP answers from a relay in front of vLLM: its first connections get a 503
(with the JSON error body an OpenAI-compatible server sends), the later ones are passed through to vLLM.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from dpokit.errors import ConfigError
from dpokit.judges import load_judge
from dpokit.judges.openai import JudgeServerError
from tests.vllm_server import API_KEY

pytestmark = pytest.mark.slow
KEY_ENV = "DPOKIT_TEST_VLLM_KEY"
FAILURE = b'{"error": {"message": "relay: the server is warming up", "type": "ServiceUnavailable", "code": 503}}'


class FailingRelay:
    """A TCP relay on 127.0.0.1 to ``port``: the first ``failures`` connections are answered with HTTP 503
    and closed; every later connection is piped to the server both ways."""

    def __init__(self, port: int, failures: int) -> None:
        self.port, self.failures, self.failed = port, failures, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.failed < self.failures:
                self.failed += 1
                threading.Thread(target=self._fail, args=(client,), daemon=True).start()
            else:
                upstream = socket.create_connection(("127.0.0.1", self.port))
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _fail(client: socket.socket) -> None:
        with client:
            client.recv(65536)  # the request (small: one judge question)
            head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(FAILURE)}\r\n"
            client.sendall(head.encode() + b"Connection: close\r\n\r\n" + FAILURE)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def _judge(url: str, model: str, **options: str):
    extra = "".join(f",{k}={v}" for k, v in {"api_key_env": KEY_ENV, "max_tokens": "40", **options}.items())
    return load_judge(f"openai:{model}@{url}{extra}")


def _answered(server, status: int) -> int:
    """Chat requests vLLM has answered with ``status`` so far (its access log)."""
    return server.log_text().count(f'"POST /v1/chat/completions HTTP/1.1" {status}')


def test_the_judge_retries_after_server_failures_and_reads_vllms_verdicts(vllm_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    relay = FailingRelay(int(vllm_server.url.rsplit(":", 1)[1]), failures=2)
    try:
        judge = _judge(relay.url, "judge", max_retries="3", concurrency="1", template="summarization")
        judgments = judge.judge_pairs(["a movie", "the plot"], ["good", "long"], ["bad", "short"])
    finally:
        relay.close()
    assert relay.failed == 2  # both failures were answered, then retried through to vLLM
    assert [j.verdict for j in judgments] == ["A", "A"], [j.raw for j in judgments]
    assert all("Preferred: A" in j.raw for j in judgments) and judge.unparseable == 0


def test_the_judge_reports_the_servers_message_when_failures_outlast_its_retries(vllm_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    relay = FailingRelay(int(vllm_server.url.rsplit(":", 1)[1]), failures=5)
    try:
        with pytest.raises(JudgeServerError, match=r"HTTP 503 after 2 attempt\(s\): relay: the server is warming up"):
            _judge(relay.url, "judge", max_retries="1").judge_pairs(["p"], ["a"], ["b"])
    finally:
        relay.close()


def test_an_answer_without_the_verdict_format_is_counted_unparseable(vllm_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    judge = _judge(vllm_server.url + "/v1", "noise")
    judgments = judge.judge_pairs(["a movie", "the plot"], ["good", "long"], ["bad", "short"])
    assert [j.parsed for j in judgments] == [False, False] and judge.unparseable == 2
    assert all(j.verdict is None and j.prob_a != j.prob_a for j in judgments)


def test_a_wrong_or_missing_api_key_is_a_clear_error_naming_the_variable(vllm_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(ConfigError, match=f"refused the API key \\(HTTP 401.*{KEY_ENV}"):
        _judge(vllm_server.url + "/v1", "judge").judge_pairs(["p"], ["a"], ["b"])
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=KEY_ENV):
        _judge(vllm_server.url + "/v1", "judge").judge_pairs(["p"], ["a"], ["b"])


def test_an_unreachable_server_and_a_time_out_are_reported_after_retries(vllm_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(JudgeServerError, match=rf"cannot reach http://127.0.0.1:{port}/v1 after 2 attempt\(s\)"):
        _judge(f"http://127.0.0.1:{port}/v1", "judge", max_retries="1").judge_pairs(["p"], ["a"], ["b"])
    started = time.perf_counter()
    with pytest.raises(JudgeServerError, match=r"after 2 attempt\(s\) \(Request timed out"):
        _judge(vllm_server.url + "/v1", "judge", max_retries="1", timeout="0.001").judge_pairs(["p"], ["a"], ["b"])
    assert time.perf_counter() - started < 10


def test_an_over_long_request_is_refused_with_vllms_message_and_not_retried(vllm_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    before = _answered(vllm_server, 400)
    judge = _judge(vllm_server.url + "/v1", "judge", max_tokens="100000", max_retries="3")
    with pytest.raises(ConfigError, match=r"HTTP 400: max_tokens=100000 cannot be greater than max_model_len=512") as failure:
        judge.judge_pairs(["a movie"], ["good"], ["bad"])
    assert "not retried" in str(failure.value) and "cannot reach" not in str(failure.value)
    deadline = time.time() + 5
    while _answered(vllm_server, 400) == before and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a retry's log line would have arrived by now
    assert _answered(vllm_server, 400) == before + 1  # asked once, with max_retries=3
