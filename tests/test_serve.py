"""``dpokit serve`` as the real process on 127.0.0.1: every failure is an HTTP answer with a JSON body,
limits are enforced before any work, and the server stays up through malformed input.

One server per module serves two tiny models: ``ctx``, a GPT-2 with 64 positions (learned position
embeddings: a prompt beyond them used to crash the handler with an IndexError), and ``broken``, a Llama
whose embedding has 200 rows saved with a 384-token tokenizer -- a real misconfiguration whose requests
fail inside the model, which the server must answer with a 500. The API key comes from the environment
variable; the limits are set low (``--max-n 4``, ``--max-connections 4``, ``--timeout 2``) so that they
can be reached quickly. Requests are written on raw sockets, so malformed bytes reach the server as sent.
"""

from __future__ import annotations

import json
import random
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from dpokit.commands.main import main
from dpokit.errors import ConfigError
from dpokit.serve import API_KEY_ENV, resolve_api_key
from tests.helpers import tiny_llama, tiny_tokenizer
from tests.judges.test_openai_server import Server

pytestmark = pytest.mark.slow
KEY = "k3y-for-tests"
CONTEXT = 64
MAX_N = 4
MAX_CONNECTIONS = 4
TIMEOUT_S = 2
PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ctx = tmp_path_factory.mktemp("ctx")
    config = GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=4, n_positions=CONTEXT, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(ctx)
    tiny_tokenizer().save_pretrained(ctx)
    broken = tmp_path_factory.mktemp("broken")
    tiny_llama(vocab_size=200).save_pretrained(broken)
    tiny_tokenizer(vocab_size=384).save_pretrained(broken)
    running = Server(
        ["--model", f"ctx={ctx}", "--model", f"broken={broken}", "--max-n", str(MAX_N),
         "--max-connections", str(MAX_CONNECTIONS), "--timeout", str(TIMEOUT_S)],
        env={API_KEY_ENV: KEY},
    )  # fmt: skip
    yield running
    running.stop()


# ------------------------------------------------------------------------------------------ a client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_length(self) -> int:
        return int(self.headers.get("content-length", 0))

    def error(self) -> dict[str, Any]:
        """The OpenAI-shaped error object of the body (asserting its shape)."""
        assert self.headers.get("content-type") == "application/json", self
        error = json.loads(self.body)["error"]
        assert isinstance(error["message"], str) and error["message"] and "type" in error and "code" in error, error
        return error


def _parse(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Reply(status, headers, body[: int(headers.get("content-length", len(body)))])


def _connect(server: Server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return data


def _read_reply(sock: socket.socket, first: bytes = b"") -> Reply:
    """One whole answer from an open connection (its head, then Content-Length bytes)."""
    data = first
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _parse(data).content_length:
        chunk = sock.recv(1 << 16)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    return _parse(data)


def _exchange(server: Server, raw: bytes) -> Reply:
    """Send ``raw``, end the sending side, read the answer until the server closes."""
    with _connect(server) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        data = _read_all(sock)
    assert data, f"no answer to {raw[:120]!r}"
    return _parse(data)


def _request(body: bytes, *, key: str | None = KEY, headers: dict[str, str] | None = None, method: str = "POST") -> bytes:
    lines = [f"{method} {PATH} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"Authorization: Bearer {key}"] if key is not None else []
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": "ctx", "messages": [{"role": "user", "content": "the movie"}], **fields}).encode()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _answers_valid_requests(server: Server) -> None:
    reply = _exchange(server, _request(_chat(max_tokens=2)))
    assert reply.status == 200, reply
    assert json.loads(reply.body)["choices"][0]["message"]["role"] == "assistant"


# ------------------------------------------------------------------------------------------ the tests


def test_a_prompt_beyond_the_models_context_is_a_400_naming_both_lengths(server):
    long_prompt = json.dumps({"model": "ctx", "messages": [{"role": "user", "content": "the movie " * 60}], "max_tokens": 8})
    reply = _exchange(server, _request(long_prompt.encode()))
    error = reply.error()
    assert reply.status == 400 and error["code"] == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    assert "in the messages, 8 max_tokens" in error["message"]
    reply = _exchange(server, _request(_chat(max_tokens=CONTEXT)))  # a short prompt, but no room for 64 new tokens
    assert reply.status == 400 and reply.error()["param"] == "max_tokens"
    _answers_valid_requests(server)


def test_an_unexpected_failure_in_the_handler_is_a_500_json_answer_and_the_server_stays_up(server):
    body = json.dumps({"model": "broken", "messages": [{"role": "user", "content": "wonderful wonderful"}], "max_tokens": 2})
    reply = _exchange(server, _request(body.encode()))
    error = reply.error()
    assert reply.status == 500 and error["type"] == "server_error" and "IndexError" in error["message"]
    assert any("Traceback" in line for line in server.lines)  # the traceback is in the server's log, not the answer
    _answers_valid_requests(server)


def test_the_api_key_is_checked_before_the_body_is_read(server):
    with _connect(server, timeout=TIMEOUT_S / 2) as sock:  # announces a body it never sends: answered at once
        sock.sendall(f"POST {PATH} HTTP/1.1\r\nAuthorization: Bearer wrong\r\nContent-Length: 1000\r\n\r\n".encode())
        reply = _read_reply(sock)
    assert reply.status == 401 and reply.error()["code"] == "invalid_api_key"
    for key in (None, "wrong", KEY + "x", "ünïcödé"):
        assert _exchange(server, _request(_chat(), key=key)).status == 401
    with _connect(server) as sock:  # Expect: 100-continue -- refused before the client sends its body
        sock.sendall(f"POST {PATH} HTTP/1.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n".encode())
        assert _read_reply(sock).status == 401
    reply = _exchange(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 401
    reply = _exchange(server, f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
    assert reply.status == 200 and [m["id"] for m in json.loads(reply.body)["data"]] == ["ctx", "broken"]


def test_a_50_mb_body_is_refused_with_413_without_the_server_holding_it(server):
    before = _rss_kib(server.process.pid)
    size = 50 * 1024 * 1024
    head = f"POST {PATH} HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {size}\r\n\r\n".encode()
    chunk = b"x" * (1 << 20)
    with _connect(server) as sock:  # a client sending its whole body, watching for an early answer as curl does
        sock.sendall(head)
        answer = b""
        for _ in range(size // len(chunk)):
            if select.select([sock], [], [], 0)[0]:
                answer = sock.recv(1 << 16)
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = _read_reply(sock, answer)
    assert reply.status == 413 and str(1 << 20) in reply.error()["message"] and "--max-body-bytes" in reply.error()["message"]
    assert _rss_kib(server.process.pid) - before < 50 * 1024
    with _connect(server) as sock:  # with Expect: 100-continue the body is never sent
        sock.sendall(head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
        assert _read_reply(sock).status == 413
    _answers_valid_requests(server)


@pytest.mark.parametrize(
    ("header", "status"),
    [(None, 411), ("-5", 400), ("ten", 400), ("1e3", 400), ("", 400), ("5, 6", 400), ("99999999999999999999999999", 413)],
)
def test_a_missing_or_malformed_content_length_is_refused(server, header, status):
    lines = [f"POST {PATH} HTTP/1.1", f"Authorization: Bearer {KEY}"] + ([] if header is None else [f"Content-Length: {header}"])
    reply = _exchange(server, ("\r\n".join(lines) + "\r\n\r\n").encode() + _chat())
    assert reply.status == status and reply.error()


def test_a_chunked_body_is_refused_with_411(server):
    body = _chat()
    raw = f"POST {PATH} HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    reply = _exchange(server, raw + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    assert reply.status == 411 and "Content-Length" in reply.error()["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": MAX_N + 1}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"seed": 2**64}, "seed"),
        ({"stream": True}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": "the movie"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": 7}, "model"),
    ],
)
def test_request_fields_are_validated_never_replaced(server, fields, param):
    reply = _exchange(server, _request(_chat(**fields)))
    error = reply.error()
    assert reply.status == 400 and error["param"] == param and f"'{param}'" in error["message"], error


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"model": "ctx", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e999}',
            "'max_tokens' must be an integer",
        ),
        (b'{"model": "ctx", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', "'temperature' must be in"),
        (b'{"model": "ctx", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "not valid JSON"),
        (b'{"model": "ctx", "messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'"a string"', "must be a JSON object, got a string"),
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"model": "\xff"}', "not UTF-8"),
        (b"", "empty"),
    ],
)
def test_bodies_that_are_not_a_json_object_are_refused_with_400(server, body, message):
    reply = _exchange(server, _request(body))
    assert reply.status == 400 and message in reply.error()["message"], reply.error()


def test_an_unknown_model_is_a_404(server):
    reply = _exchange(server, _request(_chat(model="missing")))
    assert reply.status == 404 and reply.error()["code"] == "model_not_found" and "ctx" in reply.error()["message"]


def test_a_body_that_stops_arriving_gets_408_after_the_timeout_and_a_silent_connection_is_closed(server):
    started = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(_request(_chat())[:-10])  # ten bytes short, and the connection left open
        reply = _parse(_read_all(sock))
    assert reply.status == 408 and reply.error()["code"] == "timeout"
    assert TIMEOUT_S - 0.5 < time.monotonic() - started < TIMEOUT_S + 5
    with _connect(server) as sock:  # says nothing at all: closed after the time-out, a worker freed
        assert _read_all(sock) == b""
    assert time.monotonic() - started < 2 * TIMEOUT_S + 10


def test_connections_beyond_the_limit_are_answered_503_and_service_resumes(server):
    idle = [_connect(server) for _ in range(MAX_CONNECTIONS)]  # each holds a worker, waiting for a request line
    try:
        time.sleep(0.2)
        reply = _exchange(server, _request(_chat(max_tokens=2)))
        assert reply.status == 503 and reply.error()["code"] == "server_overloaded" and reply.headers["retry-after"] == "1"
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while (reply := _exchange(server, _request(_chat(max_tokens=2)))).status == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reply.status == 200


def _fuzz_requests(rng: random.Random) -> list[bytes]:
    """Malformed requests: wrong field types and values, broken JSON, bad headers, truncated bodies."""
    valid = {"model": "ctx", "messages": [{"role": "user", "content": "the movie"}], "max_tokens": 2}
    wrong: dict[str, list[Any]] = {
        "model": [None, 5, "", [], {}, True, "missing"],
        "messages": [None, "hi", [], [1], [{}], [{"role": "user"}], [{"role": 3, "content": "x"}], {"role": "user"},
                     [{"role": "user", "content": [{"type": "image_url"}]}], [[{"role": "user", "content": "x"}]]],
        "max_tokens": [0, -1, 1.5, "5", True, 10**30, [], {}, 10_000, "1e999"],
        "max_completion_tokens": [0, -7, 2.0, "x", 2**63],
        "temperature": [-0.1, 2.5, "hot", True, [], "1e999", "-1e999"],
        "top_p": [0, -1, 1.5, "x", False, {}],
        "n": [0, -3, MAX_N + 1, 1.0, "2", 10**20, []],
        "seed": [2**63, -(2**63) - 1, 1.5, "s", 10**40, {}],
        "stream": [True, "yes", 1, [1]],
    }  # fmt: skip
    requests = []
    for name, values in wrong.items():
        for value in values:
            body = {**valid, name: value} if value is not None else {k: v for k, v in valid.items() if k != name}
            text = json.dumps(body)
            if value in ("1e999", "-1e999"):
                text = text.replace(f'"{value}"', value)  # a number too large for a float
            requests.append(_request(text.encode()))
    good = json.dumps(valid).encode()
    for _ in range(60):  # valid JSON cut short, announced at its cut length
        requests.append(_request(good[: rng.randrange(0, len(good) - 1)]))
    for _ in range(40):
        requests.append(_request(rng.randbytes(rng.randrange(1, 300))))
    for _ in range(20):  # a body shorter than its Content-Length
        requests.append(_request(good)[: -rng.randrange(1, len(good))])
    requests += [_request(b) for b in (b"null", b"true", b"12", b'"x"', b"[]", b"{}", b'{"model": "ctx"}', b"{" * 5000)]
    requests += [_request(b'{"max_tokens": ' + b"9" * 5000 + b"}")]
    requests += [_request(good, key=k) for k in (None, "", "wrong", "Basic abc", "ünï")]
    requests += [
        _request(good, headers={"Content-Length": "7"}),  # two different lengths
        _request(good, headers={"Transfer-Encoding": "chunked"}),
        _request(good, headers={"X-Long": "y" * 70_000}),
        _request(good, headers={f"X-{i}": "1" for i in range(120)}),
        _request(good, method="PUT"),
        _request(good, method="DELETE"),
        _request(good).replace(PATH.encode(), b"/v1/models"),
        _request(good).replace(PATH.encode(), b"/" + b"a" * 70_000),
        _request(good).replace(b"HTTP/1.1", b"HTTP/9.9", 1),
        _request(good).replace(b" HTTP/1.1", b"", 1),
        b"GARBAGE\r\n\r\n",
        b"\r\n\r\n",
        b"POST\r\n\r\n",
        b"GET /v1/chat/completions HTTP/1.1\r\n\r\n",
        _request(good).replace(b"Content-Length:", b"Content-Length"),
        _request(good).replace(b"Content-Length: ", b"Content-Length: +"),
        _request(good).replace(b"Content-Length: ", b"Content-Length: -"),
        _request(good).replace(b"Content-Length: ", b"Content-Length: 0x"),
        _request(good).replace(b"Content-Length: ", b"Content-Length: 999999999"),
    ]
    return requests


def test_fuzz_every_malformed_request_gets_a_json_answer_and_the_server_stays_up(server):
    requests = _fuzz_requests(random.Random(1234))
    assert len(requests) >= 200
    started = time.monotonic()
    statuses: dict[int, int] = {}
    for raw in requests:
        reply = _exchange(server, raw)
        reply.error()
        assert 400 <= reply.status < 500 or reply.status in (501, 505), (reply, raw[:200])
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
    assert time.monotonic() - started < 20
    assert server.process.poll() is None
    assert {400, 401, 404, 411, 413} <= set(statuses), statuses
    _answers_valid_requests(server)


def test_the_api_key_comes_from_the_flag_a_file_or_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key("flag", None, {API_KEY_ENV: "env"}) == ("flag", "--require-api-key")
    assert resolve_api_key(None, str(key_file), {API_KEY_ENV: "env"})[0] == "from-file"
    assert resolve_api_key(None, None, {API_KEY_ENV: " env "}) == ("env", f"${API_KEY_ENV}")
    assert resolve_api_key(None, None, {}) == (None, "none")
    with pytest.raises(ConfigError, match="not both"):
        resolve_api_key("flag", str(key_file), {})
    (tmp_path / "empty").write_text("\n")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError, match=f"--api-key-file {path}"):
            resolve_api_key(None, str(path), {})


@pytest.mark.parametrize(
    ("option", "value"), [("--max-n", "0"), ("--max-body-bytes", "0"), ("--max-connections", "0"), ("--timeout", "0")]
)
def test_impossible_limits_are_refused_before_any_model_is_loaded(option, value, capsys, tmp_path):
    assert main(["serve", "--model", f"m={tmp_path / 'not-loaded'}", option, value]) == 2
    assert option in capsys.readouterr().err
