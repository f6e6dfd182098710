"""``dpokit score``: arguments -> rows and a :class:`dpokit.analysis.score.ScoreJob`; prints and writes the scores."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpokit.commands.common import Subcommand, add_length_arguments, add_model_arguments, load_options

EPILOG = """\
The trained policy is a reward model: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) per response,
and for a pair P(first preferred) = sigmoid(r_first - r_second).

examples:
  dpokit score --model outputs/dpo --reference models/sft --prompt "Review:" \\
      --response "a wonderful film" --response "a boring film"
  dpokit score --model outputs/lora-adapter --input pairs.jsonl --output scores.jsonl
  dpokit score --model outputs/dpo --reference models/sft --input responses.csv --json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit import scoring
    from dpokit.analysis import score

    add_model_arguments(parser, with_reference=True)
    inputs = parser.add_argument_group("input (a file, or --prompt with --response)")
    inputs.add_argument(
        "--input",
        metavar="FILE",
        default=None,
        help="JSONL/JSON/CSV rows with 'prompt' and either 'response', 'responses' (a list) or "
        "'chosen' + 'rejected'; prompts and responses may be strings or chat messages",
    )
    inputs.add_argument("--prompt", default=None, help="a single prompt (plain text)")
    inputs.add_argument(
        "--response",
        action="append",
        default=None,
        help="a response to --prompt; repeat for several (two make a pair: the first is scored against the second)",
    )
    inputs.add_argument(
        "--chat", action="store_true", help="treat --prompt/--response as a user turn and an assistant turn (chat template)"
    )
    add_length_arguments(
        parser, score.ScoreJob, max_length=scoring.DEFAULT_MAX_LENGTH, max_prompt_length=scoring.DEFAULT_MAX_PROMPT_LENGTH
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.jsonl", default=None, help="write one JSON line per input row here")
    out.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def run(args: argparse.Namespace) -> int:
    from dpokit.analysis.score import ScoreJob, format_scores, read_score_rows, run_score, text_rows
    from dpokit.errors import ConfigError

    if args.input and (args.prompt is not None or args.response):
        raise ConfigError("give either --input FILE or --prompt with --response, not both")
    if args.input:
        rows = read_score_rows(args.input)
    elif args.prompt is not None and args.response:
        rows = text_rows(args.prompt, args.response, chat=args.chat)
    else:
        raise ConfigError("nothing to score: give --input FILE, or --prompt TEXT with one or more --response TEXT")
    job = ScoreJob(
        model=args.model,
        reference=args.reference,
        reference_free=args.reference_free,
        beta=args.beta,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
        load=load_options(args),
    )
    report = run_score(job, rows)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            for row in report.rows:
                handle.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
    if args.json:
        for row in report.rows:
            print(json.dumps(row.to_dict(), ensure_ascii=False))
        return 0
    print(f"r(x, y) = {report.beta} * (log pi - log pi_ref); reference: {report.reference}")
    print(format_scores(report.rows))
    if args.output:
        print(f"wrote {len(report.rows)} rows to {args.output}")
    return 0


COMMAND = Subcommand(
    "score",
    "score responses with the policy's implicit reward r(x, y)",
    "Use a trained policy as a reward model: print or write r(x, y) per response and, for pairs, the preference probability.",
    EPILOG,
    add_arguments,
    run,
)
