"""``dpokit serve``: arguments -> :class:`dpokit.serve.ServeJob`; serves until interrupted."""

from __future__ import annotations

import argparse
import os
import sys

from dpokit.commands.common import Subcommand, add_model_arguments, field_default, load_options

DESCRIPTION = (
    "Serve local causal LMs behind an OpenAI-compatible API (GET /v1/models, POST /v1/chat/completions), e.g. as a "
    "judge for `dpokit winrate --judge openai:NAME@http://127.0.0.1:PORT/v1`. Binds 127.0.0.1 unless --host says otherwise. "
    "Every failure is an HTTP answer with an OpenAI-shaped JSON error; the API key (from $DPOKIT_SERVE_API_KEY or "
    "--api-key-file), the body size, n and max_tokens against the model's context are checked before any work."
)
EPILOG = """examples:
  dpokit serve --model judge=models/judge --port 8000
  DPOKIT_SERVE_API_KEY=secret dpokit serve --model judge=models/judge --port 0   # key required; port 0: any free port
  dpokit serve --model judge=models/judge --api-key-file ~/.dpokit_key           # the key from a file's first line
  dpokit serve --model judge=models/judge --fail-first 2                         # test a client's retries"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.serve import API_KEY_ENV, ServeJob

    def default(name: str) -> object:
        return field_default(ServeJob, name)

    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH", help="a model to serve (repeatable)")
    parser.add_argument("--host", default=default("host"), help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=default("port"), help="port; 0: any free one (%(default)s)")
    parser.add_argument("--max-tokens", type=int, default=default("max_tokens"), help="a request's default max_tokens")
    parser.add_argument(
        "--require-api-key",
        default=None,
        metavar="KEY",
        help=f"answer 401 unless 'Authorization: Bearer KEY' (visible in the process list: prefer ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--api-key-file", default=None, metavar="FILE", help=f"the required key, from FILE's first line (or ${API_KEY_ENV})"
    )
    limits = parser.add_argument_group("limits (checked before any work)")
    limits.add_argument("--max-n", type=int, default=default("max_n"), help="most completions per request (%(default)s)")
    limits.add_argument(
        "--max-body-bytes", type=int, default=default("max_body_bytes"), help="larger request bodies get 413 (%(default)s)"
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=default("max_connections"),
        help="connections at once; more get 503 (%(default)s)",
    )
    limits.add_argument(
        "--timeout",
        type=float,
        default=default("timeout"),
        help="seconds a connection may stay silent (%(default)s)",
    )
    parser.add_argument(
        "--fail-first", type=int, default=0, metavar="N", help="for testing clients: answer the first N chat requests with 503"
    )
    add_model_arguments(parser, with_model=False)


def run(args: argparse.Namespace) -> int:
    from dpokit.commands.frontier import parse_run
    from dpokit.serve import ServeJob, resolve_api_key, run_serve

    api_key, key_source = resolve_api_key(args.require_api_key, args.api_key_file, os.environ)
    job = ServeJob(
        models=[parse_run(spec) for spec in args.model],
        host=args.host,
        port=args.port,
        api_key=api_key,
        fail_first=args.fail_first,
        max_tokens=args.max_tokens,
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        timeout=args.timeout,
        load=load_options(args),
    )
    job.validate()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if api_key is not None:
        log(f"API key required (from {key_source})")
    run_serve(job, log=log)
    return 0


COMMAND = Subcommand("serve", "serve local models behind an OpenAI-compatible API", DESCRIPTION, EPILOG, add_arguments, run)
