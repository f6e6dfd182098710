"""``dpokit label``: arguments -> :class:`~dpokit.analysis.label.LabelJob`; serves the page until interrupted."""

from __future__ import annotations

import argparse
import sys

from dpokit.commands.common import Subcommand, field_default

DESCRIPTION = (
    "Serve a local page that shows a prompt and two completions, in a seeded random order, and appends the "
    "choice (1: left, 2: right, t: tie, s: skip) to a JSONL label file, one fsync'd line each; run it again and "
    "it resumes at the first unlabelled pair. Input: rows {prompt, response_a, response_b}, preference pairs "
    "{prompt, chosen, rejected}, ranked rows {prompt, responses} (first vs last), or a dpokit winrate output "
    "directory (each model sample against its baseline). Binds 127.0.0.1 (this machine only) unless --host says "
    "otherwise. Then `dpokit judge-check --judge J --data LABELS` reports a judge's agreement with the labels."
)
EPILOG = """examples:
  dpokit label --data pairs.jsonl --out labels.jsonl                # then open http://127.0.0.1:8765/
  dpokit label --data winrate/ --out winrate/labels.jsonl --port 0  # port 0: any free port
  dpokit judge-check --judge openai:judge@http://127.0.0.1:8000/v1 --data labels.jsonl"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.analysis.label import LabelJob

    def default(name: str) -> object:
        return field_default(LabelJob, name)

    parser.add_argument("--data", required=True, help="pairs: JSONL/JSON/CSV/Parquet rows, or a dpokit winrate output directory")
    parser.add_argument("--out", default=default("out"), help="the label file, appended to and resumed (%(default)s)")
    parser.add_argument(
        "--host",
        default=default("host"),
        help="address to bind (default: %(default)s, this machine only; 0.0.0.0 lets anyone who can reach it label)",
    )
    parser.add_argument("--port", type=int, default=default("port"), help="port; 0: any free one (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=default("seed"), help="seed of the left/right order (%(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="label only the first N pairs")


def run(args: argparse.Namespace) -> int:
    from dpokit.analysis.label import LabelJob, run_label

    job = LabelJob(data=args.data, out=args.out, host=args.host, port=args.port, seed=args.seed, limit=args.limit)
    run_label(job, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


HELP = "label pairs in the browser (human judgments for judge-check)"
COMMAND = Subcommand("label", HELP, DESCRIPTION, EPILOG, add_arguments, run)
