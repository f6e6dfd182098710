"""``dpokit winrate`` and ``dpokit judge-check``: arguments -> :class:`~dpokit.analysis.winrate.WinrateJob`
/ :class:`~dpokit.analysis.winrate.JudgeCheckJob`; prints the tables."""

from __future__ import annotations

import argparse
import json
import sys

from dpokit.commands.common import (
    Subcommand,
    add_engine_arguments,
    add_model_arguments,
    engine_options,
    field_default,
    load_options,
    positive_int,
)

JUDGE_HELP = (
    "the judge: reward:MODULE:FUNCTION | reward_model:PATH | implicit:POLICY | llm:PATH | openai:MODEL@URL, "
    "options after commas (e.g. reward:dpokit.experiments.reward:vader_reward,temperature=0.1; "
    "implicit:runs/dpo/final,reference=models/sft; openai:m@http://127.0.0.1:8000/v1,api_key_env=MY_KEY)"
)
TEMPLATES_HELP = (
    "judge templates (llm: and openai: judges): built-in summarization, summarization-simple, dialogue, or files "
    "with {prompt}, {a}, {b}; several measure prompt sensitivity (default: the judge's, dialogue)"
)

WINRATE_DESCRIPTION = (
    "Sample each model at several temperatures, judge every sample against the baseline's in both orders, and write "
    "winrate.png (win rate vs temperature with 95% confidence bands), results.json and results.md, with ties, "
    "unparseable judgments, position consistency and position bias. Samples and judgments are stored in --out, so a "
    "rerun or a resumed run costs only what is missing."
)
WINRATE_EPILOG = """examples:
  dpokit winrate --model dpo=runs/dpo/final --baseline models/sft --prompts prompts.txt \\
      --judge reward:dpokit.experiments.reward:vader_reward --temperatures 0.25 0.5 0.75 1.0 --out winrate/
  dpokit winrate --model runs/dpo/final --references tldr_test.jsonl --judge openai:judge@http://127.0.0.1:8000/v1 \\
      --templates summarization summarization-simple
  dpokit winrate --engine vllm --engine-url http://127.0.0.1:8000 --model dpo=policy-lora --baseline base-model \\
      --prompts prompts.txt --judge reward:dpokit.experiments.reward:vader_reward  # models the server serves"""


def add_winrate_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.analysis.winrate import WinrateJob

    def default(name: str) -> object:
        return field_default(WinrateJob, name)

    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH", help="a model to evaluate (repeatable)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--baseline", metavar="PATH", help="the baseline model, sampled at the same temperatures")
    source.add_argument("--references", metavar="FILE", help="baseline responses: rows with 'prompt' and 'reference'")
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts: .txt (one per line) or .jsonl/.json rows with 'prompt' (and 'images' for a vision-language model, "
        "judged by a judge that reads them)",
    )
    parser.add_argument("--judge", required=True, help=JUDGE_HELP)
    parser.add_argument("--templates", nargs="+", default=default("templates"), metavar="T", help=TEMPLATES_HELP)
    parser.add_argument(
        "--temperatures",
        nargs="+",
        type=float,
        default=default("temperatures"),
        help="temperatures (%(default)s)",
    )
    parser.add_argument("--samples-per-prompt", type=int, default=default("samples_per_prompt"), help="default: %(default)s")
    parser.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens"), help="default: %(default)s")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--seed", type=int, default=default("seed"), help="sampling and bootstrap seed (default: %(default)s)")
    parser.add_argument("--out", default=default("out"), help="output directory (default: %(default)s)")
    parser.add_argument(
        "--inconsistent",
        choices=["tie", "average"],
        default=default("inconsistent"),
        help="a pair whose two orders disagree: a tie, or decided by the mean probability (default: %(default)s)",
    )
    parser.add_argument("--ci", choices=["bootstrap", "wilson"], default=default("ci"), help="95%% interval (%(default)s)")
    parser.add_argument("--bootstrap-samples", type=int, default=default("bootstrap_samples"), help="default: %(default)s")
    parser.add_argument("--batch-size", type=positive_int, default=default("batch_size"), help="rows per forward (%(default)s)")
    parser.add_argument(
        "--chat-template", choices=["auto", "always", "never"], default=default("chat_template"), help="as dpokit generate's"
    )
    parser.add_argument("--title", default=None, help="title of winrate.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser, with_model=False)
    add_engine_arguments(parser)


def run_winrate_command(args: argparse.Namespace) -> int:
    from dpokit.analysis.winrate import WinrateJob, results_markdown, run_winrate
    from dpokit.commands.frontier import parse_run

    job = WinrateJob(
        models=[parse_run(spec) for spec in args.model],
        judge=args.judge,
        prompts=args.prompts,
        baseline=args.baseline,
        references=args.references,
        templates=list(args.templates),
        temperatures=list(args.temperatures),
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        max_prompts=args.max_prompts,
        seed=args.seed,
        out=args.out,
        inconsistent=args.inconsistent,
        ci=args.ci,
        bootstrap_samples=args.bootstrap_samples,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        title=args.title,
        progress=not args.no_progress,
        load=load_options(args),
        engine=engine_options(args),
    )
    results = run_winrate(job, log=lambda line: print(line, file=sys.stderr))
    print(results_markdown(results))
    print(f"wrote {args.out}/winrate.png, {args.out}/results.json, {args.out}/results.md")
    return 0


WINRATE = Subcommand(
    "winrate",
    "win rate against a baseline across temperatures, judged in both orders (winrate.png)",
    WINRATE_DESCRIPTION,
    WINRATE_EPILOG,
    add_winrate_arguments,
    run_winrate_command,
)

CHECK_DESCRIPTION = (
    "Judge labelled preference pairs (rows with prompt, chosen, rejected) in both orders and report how often the "
    "judge agrees with the labels, with a 95% interval, ties, unparseable judgments, position consistency and "
    "position bias -- per template, and the agreement between templates: the way to pick a judge before trusting it. "
    "When no verdict can be read it exits with status 2 and shows the first answers; under half readable is a warning."
)
CHECK_EPILOG = """examples:
  dpokit judge-check --judge reward:dpokit.experiments.reward:vader_reward --data heldout_pairs.jsonl
  dpokit judge-check --judge llm:models/judge --data human_labels.jsonl --templates dialogue my_template.txt"""


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.analysis.winrate import JudgeCheckJob

    parser.add_argument("--judge", required=True, help=JUDGE_HELP)
    parser.add_argument(
        "--data",
        required=True,
        help="labelled pairs: JSONL/JSON/CSV/Parquet with prompt, chosen, rejected; or a dpokit label file (human labels)",
    )
    parser.add_argument("--templates", nargs="+", default=[], metavar="T", help=TEMPLATES_HELP)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    parser.add_argument(
        "--inconsistent",
        choices=["tie", "average"],
        default=field_default(JudgeCheckJob, "inconsistent"),
        help="a pair whose orders disagree: a tie, or by the mean probability",
    )
    parser.add_argument("--cache", default=field_default(JudgeCheckJob, "cache"), help="judgment cache (%(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress on standard error")
    add_model_arguments(parser, with_model=False)


def run_check_command(args: argparse.Namespace) -> int:
    from dpokit.analysis.label import is_label_file
    from dpokit.analysis.label.check import human_check_markdown, human_judge_check
    from dpokit.analysis.winrate import JudgeCheckJob, judge_check_markdown, run_judge_check

    job = JudgeCheckJob(
        judge=args.judge,
        data=args.data,
        templates=list(args.templates),
        limit=args.limit,
        inconsistent=args.inconsistent,
        cache=args.cache,
        progress=not args.no_progress,
        load=load_options(args),
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if is_label_file(args.data):  # labels a person gave with dpokit label: agreement and kappa with them
        report = human_judge_check(job, log=log)
        table = human_check_markdown(report)
    else:
        report = run_judge_check(job, log=log)
        table = judge_check_markdown(report)
    print(json.dumps(report, indent=2) if args.json else table)
    return 0


JUDGE_CHECK = Subcommand(
    "judge-check",
    "a judge's agreement with labelled preferences, and its position bias",
    CHECK_DESCRIPTION,
    CHECK_EPILOG,
    add_check_arguments,
    run_check_command,
)
