"""``dpokit label``'s local web page: one pair at a time, the person's choice appended to the label file.

Routes (standard-library :mod:`http.server`, a thread per connection):

* ``GET /`` -- the page (``dpokit/assets/label.html`` with ``label.js`` and ``label.css``);
* ``GET /api/next`` -- ``{"pair": {id, index, prompt, left, right} | null, "labelled", "total", "file", "warnings"}``:
  the first pair in input order that the label file does not hold yet, its completions on the sides
  :func:`~dpokit.analysis.label.store.left_side` drew;
* ``POST /api/label`` -- ``{"id", "choice": "left" | "right" | "tie" | "skip"}``: records the choice (as
  ``a``/``b``/``tie``/``skip``) and answers as ``/api/next`` does. A pair labelled already is not written
  again (a double click, a second tab), and the answer says ``"recorded": false``.

The page puts every text in with ``textContent`` (prompts are untrusted: nothing is parsed as HTML)
and a Content-Security-Policy allows only the page's own script and style. Request bodies must declare
a ``Content-Length`` of at most :data:`MAX_BODY_BYTES` (411 / 413 before anything is read) and be
``application/json`` (415 otherwise; a form posted by another site cannot send that type without the
browser asking first). Bound to a loopback address, the server answers only requests whose ``Host`` is
that address or ``localhost`` (so a DNS-rebinding page elsewhere cannot read the prompts).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from dpokit.analysis.label.pairs import LabelPair, as_text, read_label_pairs
from dpokit.analysis.label.store import LabelFile, left_side
from dpokit.errors import ConfigError

MAX_BODY_BYTES = 4096  # a label request is ~60 bytes
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ASSETS = {"/": ("label.html", "text/html"), "/label.js": ("label.js", "text/javascript"), "/label.css": ("label.css", "text/css")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
SIDES = {"left": 0, "right": 1}
Log = Callable[[str], None]
logger = logging.getLogger(__name__)


@dataclass
class LabelJob:
    """What ``dpokit label`` serves; every default lives here."""

    data: str
    out: str = "labels.jsonl"
    host: str = "127.0.0.1"
    port: int = 8765
    seed: int = 0
    limit: int | None = None

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0 (any free port) to 65535, got {self.port}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if Path(self.out).expanduser().resolve() == Path(self.data).expanduser().resolve():
            raise ConfigError(f"--out {self.out} is the input file: give another path for the labels")


class RequestError(Exception):
    """A refused request: its HTTP status and a message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LabelSession:
    """The pairs, the label file, and the next pair to show."""

    def __init__(self, job: LabelJob) -> None:
        pairs = read_label_pairs(job.data)
        self.pairs: list[LabelPair] = pairs[: job.limit] if job.limit is not None else pairs
        self.by_id = {pair.id: (index, pair) for index, pair in reversed(list(enumerate(self.pairs)))}
        self.labels = LabelFile(job.out, job.seed)
        self.seed = job.seed

    def state(self) -> dict[str, Any]:
        """The answer of ``/api/next``: the next unlabelled pair (None when all are done) and the counts."""
        done = self.labels.done
        upcoming = next(((i, p) for i, p in enumerate(self.pairs) if p.id not in done), None)
        shown = None
        if upcoming is not None:
            index, pair = upcoming
            sides = (pair.a, pair.b) if left_side(pair.id, self.seed) == "a" else (pair.b, pair.a)
            shown = {"id": pair.id, "index": index, "prompt": as_text(pair.prompt), "left": as_text(sides[0]),
                     "right": as_text(sides[1])}  # fmt: skip
        labelled = sum(1 for pair_id in self.by_id if pair_id in done)
        return {"pair": shown, "labelled": labelled, "total": len(self.by_id), "file": str(self.labels.path),
                "warnings": self.labels.warnings}  # fmt: skip

    def label(self, body: Any) -> dict[str, Any]:
        """Record ``{"id", "choice"}`` (choice: left, right, tie, skip); the next state, with ``recorded``."""
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not isinstance(body.get("choice"), str):
            raise RequestError(400, 'expected a JSON object {"id": string, "choice": "left"|"right"|"tie"|"skip"}')
        if body["id"] not in self.by_id:
            raise RequestError(400, f"no pair with id {body['id'][:40]!r} in this input")
        choice = body["choice"]
        if choice not in ("left", "right", "tie", "skip"):
            raise RequestError(400, f"choice must be left, right, tie or skip, not {choice[:20]!r}")
        index, pair = self.by_id[body["id"]]
        if choice in SIDES:
            left = left_side(pair.id, self.seed)
            choice = left if choice == "left" else ("b" if left == "a" else "a")
        recorded = self.labels.record(index, pair, choice)
        return {**self.state(), "recorded": recorded}


def _content_length(values: list[str], limit: int) -> int:
    """The declared body size, checked before the body is read."""
    if not values:
        raise RequestError(411, "Content-Length is missing")
    if len(set(values)) > 1 or not re.fullmatch(r"\d{1,12}", values[0].strip()):
        raise RequestError(400, "Content-Length must be one whole number")
    length = int(values[0])
    if length > limit:
        raise RequestError(413, f"the body is {length} bytes; at most {limit} are accepted")
    return length


class LabelHandler(BaseHTTPRequestHandler):
    """Serves the page and the two JSON routes of one :class:`LabelSession`."""

    server: LabelHTTPServer
    timeout = 30  # seconds a connection may stay silent

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json")

    def _guard(self, action: Callable[[], None]) -> None:
        try:
            self._check_host()
            action()
        except RequestError as error:
            self.close_connection = True
            self._json(error.status, {"error": str(error)})
        except Exception as error:  # a bug: the page gets one line, the log the traceback
            logger.exception("dpokit label: %s %s failed", self.command, self.path)
            self.close_connection = True
            self._json(500, {"error": f"{type(error).__name__}: {error}"})

    def _check_host(self) -> None:
        if self.server.loopback_only:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if host not in LOOPBACK:
                raise RequestError(403, f"Host {host[:60]!r} is not this machine: open http://127.0.0.1:PORT/")

    def _get(self) -> None:
        route = self.path.split("?", 1)[0]
        if route in ASSETS:
            name, content_type = ASSETS[route]
            self._send(200, resources.files("dpokit").joinpath("assets").joinpath(name).read_bytes(), content_type)
        elif route == "/api/next":
            self._json(200, self.server.session.state())
        else:
            raise RequestError(404, f"no page {route[:80]}")

    def _post(self) -> None:
        if self.path.split("?", 1)[0] != "/api/label":
            raise RequestError(404, f"no route POST {self.path[:80]}")
        length = _content_length(self.headers.get_all("Content-Length") or [], MAX_BODY_BYTES)
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "send the label as Content-Type: application/json")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestError(400, "the body is not JSON") from None
        self._json(200, self.server.session.label(body))

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_HEAD(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)


class LabelHTTPServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` holding the session its handlers serve."""

    daemon_threads = True

    def __init__(self, job: LabelJob, session: LabelSession) -> None:
        self.session = session
        self.loopback_only = job.host in LOOPBACK
        super().__init__((job.host, job.port), LabelHandler)


def make_label_server(job: LabelJob) -> LabelHTTPServer:
    """Read the pairs and the label file so far, and bind ``job.host:job.port`` (``serve_forever()`` runs it)."""
    job.validate()
    return LabelHTTPServer(job, LabelSession(job))


def server_lines(httpd: LabelHTTPServer, job: LabelJob) -> list[str]:
    """What ``dpokit label`` says when it starts: the address, the counts, the keys, who can reach it."""
    host, port = httpd.server_address[:2]
    state = httpd.session.state()
    lines = [
        f"labelling at http://{host!s}:{port}/",
        f"{state['total']} pairs from {job.data}, {state['labelled']} labelled already in {job.out}",
        "keys: 1 = left is better, 2 = right is better, t = tie, s = skip; Ctrl-C stops (every choice is saved at once)",
    ]
    if job.host in LOOPBACK:
        lines.append(f"bound to {job.host}: only this machine can open the page (--host to change)")
    else:
        lines.append(f"warning: bound to {job.host}: anyone who can reach this machine can read the prompts and write labels")
    return lines


def run_label(job: LabelJob, log: Log = print) -> None:
    """Serve the page until interrupted; the first line logged is ``labelling at http://HOST:PORT/``."""
    httpd = make_label_server(job)
    for line in server_lines(httpd, job):
        log(line)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
