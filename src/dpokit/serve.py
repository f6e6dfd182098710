"""``dpokit serve``: local causal LMs behind an OpenAI-compatible HTTP API.

Serves ``GET /v1/models`` and ``POST /v1/chat/completions`` (non-streaming; ``messages``,
``temperature``, ``top_p``, ``max_tokens`` / ``max_completion_tokens``, ``seed``, ``n``) for one or more
models loaded by :func:`dpokit.models.load_policy` (``--model NAME=PATH``, repeatable; the request's
``model`` field picks one). Completions come from :func:`dpokit.generation.generate_samples`, the one
generator of dpokit (chat template when the tokenizer has one, else ``role: content`` lines). Requests
are handled by a :class:`~http.server.ThreadingHTTPServer`; generation itself is serialised by a lock,
one request at a time per server. Use it to run a local judge for ``--judge openai:NAME@URL``.

Two options exist for testing clients, documented as such: ``fail_first=N`` answers the first N chat
requests with HTTP 503 (a client must retry), and ``api_key=KEY`` answers 401 to any request without
``Authorization: Bearer KEY``.

**Why dpokit has its own server.** The judge of ``openai:`` must be tested against a real
OpenAI-compatible server process. The well-kept third-party servers that could run on a CPU here were
checked first: llama-cpp-python has no prebuilt wheel on PyPI (``pip download --only-binary :all:
llama-cpp-python`` finds none), so it would be a many-minute C++ source build in every fresh CI
environment; vLLM, SGLang and TGI need GPUs or large installs. A small standard-library server that
serves dpokit's own models is both a user feature (serve a local judge) and a real process the client
library talks HTTP to. Only 127.0.0.1 is bound by default.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dpokit.errors import ConfigError
from dpokit.models import LoadOptions

MAX_TOKENS_LIMIT = 4096


@dataclass
class ServeJob:
    """What ``dpokit serve`` serves: ``models`` as ``(name, path)``, on ``host:port`` (0 = any free port)."""

    models: list[tuple[str, str]]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    fail_first: int = 0
    max_tokens: int = 256  # the default when a request gives none
    load: LoadOptions = field(default_factory=LoadOptions)


class ModelServer:
    """The loaded models and the request logic, independent of HTTP."""

    def __init__(self, job: ServeJob, log: Callable[[str], None] = print) -> None:
        from dpokit.models import load_policy

        if not job.models:
            raise ConfigError("nothing to serve: give --model NAME=PATH (repeatable)")
        self.job = job
        self.log = log
        self.models = {
            name: load_policy(path, dtype=job.load.dtype, device=job.load.device, trust_remote_code=job.load.trust_remote_code)
            for name, path in job.models
        }
        self.lock = threading.Lock()
        self.failures_left = job.fail_first
        self.created = int(time.time())

    def authorized(self, header: str | None) -> bool:
        return self.job.api_key is None or header == f"Bearer {self.job.api_key}"

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

    def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        """A chat completion for ``request`` (raises ConfigError for a bad request)."""
        from dpokit.generation import SamplingConfig, generate_samples

        name = request.get("model")
        if name not in self.models:
            raise ConfigError(f"model {name!r} is not served; served: {sorted(self.models)}")
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ConfigError("'messages' must be a non-empty list of {role, content} objects")
        messages = [{"role": str(m.get("role", "user")), "content": str(m.get("content") or "")} for m in messages]
        max_tokens = int(request.get("max_completion_tokens") or request.get("max_tokens") or self.job.max_tokens)
        sampling = SamplingConfig(
            max_new_tokens=min(max_tokens, MAX_TOKENS_LIMIT),
            temperature=float(request.get("temperature", 1.0) if request.get("temperature") is not None else 1.0),
            top_p=float(request.get("top_p") or 1.0),
            num_samples=int(request.get("n") or 1),
            seed=int(request.get("seed") or 0),
        )
        sampling.validate()
        loaded = self.models[name]
        template = "auto" if getattr(loaded.tokenizer, "chat_template", None) else "never"
        with self.lock:
            samples = generate_samples(loaded.model, loaded.tokenizer, [messages], sampling, chat_template=template)
        choices = [
            {
                "index": s.sample_index,
                "message": {"role": "assistant", "content": s.completion},
                "finish_reason": "length" if s.num_tokens >= sampling.max_new_tokens else "stop",
            }
            for s in samples
        ]
        prompt_tokens = len(loaded.tokenizer(samples[0].prompt_text, add_special_tokens=False)["input_ids"])
        completion_tokens = sum(s.num_tokens for s in samples)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            server.log(f"{self.address_string()} {format % args}")

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

        def _check_auth(self) -> bool:
            if server.authorized(self.headers.get("Authorization")):
                return True
            self._error(401, "invalid or missing API key", "authentication_error")
            return False

        def do_GET(self) -> None:
            if not self._check_auth():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, server.list_models())
            else:
                self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not self._check_auth():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}", "not_found")
                return
            if server.take_injected_failure():
                self._error(503, "injected failure (--fail-first)", "server_error", {"retry-after-ms": "50"})
                return
            try:
                request = json.loads(raw or b"{}")
                self._send(200, server.chat(request))
            except (json.JSONDecodeError, ConfigError, ValueError, TypeError) as error:
                self._error(400, str(error), "invalid_request_error")

    return Handler


def make_server(job: ServeJob, log: Callable[[str], None] = print) -> ThreadingHTTPServer:
    """Load the models and bind ``job.host:job.port``; ``serve_forever()`` runs it."""
    models = ModelServer(job, log)
    httpd = ThreadingHTTPServer((job.host, job.port), _handler(models))
    httpd.daemon_threads = True
    return httpd


def run_serve(job: ServeJob, log: Callable[[str], None] = print) -> None:
    """Serve until interrupted. The first line logged is ``serving on http://HOST:PORT/v1``."""
    httpd = make_server(job, log)
    host, port = httpd.server_address[:2]
    log(f"serving on http://{host!s}:{port}/v1 (models: {', '.join(name for name, _ in job.models)})")
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
