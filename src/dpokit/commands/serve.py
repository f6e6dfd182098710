"""``dpokit serve``: arguments -> :class:`dpokit.serve.ServeJob`; serves until interrupted."""

from __future__ import annotations

import argparse
import sys

from dpokit.commands.common import Subcommand, add_model_arguments, field_default, load_options

DESCRIPTION = (
    "Serve local causal LMs behind an OpenAI-compatible API (GET /v1/models, POST /v1/chat/completions), e.g. as a "
    "judge for `dpokit winrate --judge openai:NAME@http://127.0.0.1:PORT/v1`. Binds 127.0.0.1 unless --host says otherwise."
)
EPILOG = """examples:
  dpokit serve --model judge=models/judge --port 8000
  dpokit serve --model judge=models/judge --port 0 --require-api-key secret   # port 0: any free port (printed)
  dpokit serve --model judge=models/judge --fail-first 2                      # test a client's retries"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.serve import ServeJob

    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH", help="a model to serve (repeatable)")
    parser.add_argument("--host", default=field_default(ServeJob, "host"), help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=field_default(ServeJob, "port"), help="port; 0: any free one (%(default)s)")
    parser.add_argument(
        "--max-tokens", type=int, default=field_default(ServeJob, "max_tokens"), help="a request's default max_tokens"
    )
    parser.add_argument("--require-api-key", default=None, metavar="KEY", help="answer 401 unless 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--fail-first", type=int, default=0, metavar="N", help="for testing clients: answer the first N chat requests with 503"
    )
    add_model_arguments(parser, with_model=False)


def run(args: argparse.Namespace) -> int:
    from dpokit.commands.frontier import _parse_run
    from dpokit.serve import ServeJob, run_serve

    job = ServeJob(
        models=[_parse_run(spec) for spec in args.model],
        host=args.host,
        port=args.port,
        api_key=args.require_api_key,
        fail_first=args.fail_first,
        max_tokens=args.max_tokens,
        load=load_options(args),
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    run_serve(job, log=log)
    return 0


COMMAND = Subcommand("serve", "serve local models behind an OpenAI-compatible API", DESCRIPTION, EPILOG, add_arguments, run)
