"""``dpokit eval``: arguments -> :class:`dpokit.analysis.evaluate.EvalJob`; prints and writes the report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpokit.commands.common import (
    Subcommand,
    add_length_arguments,
    add_model_arguments,
    field_default,
    load_options,
    positive_int,
)

EPILOG = """\
Reports preference accuracy (fraction of pairs with r(chosen) > r(rejected)), mean reward margin,
mean chosen/rejected rewards and the loss, with r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)).

examples:
  dpokit eval --model outputs/dpo --reference models/sft --data data/test.jsonl
  dpokit eval --model outputs/lora-adapter --data data/test.jsonl --beta 0.1
  dpokit eval --model runs/exp/checkpoint-200 --config examples/full.yaml --json
  dpokit eval --model outputs/ipo --reference models/sft --data data/test.jsonl --loss ipo --output eval.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.analysis.evaluate import EvalJob
    from dpokit.config import DataConfig, LossConfig

    add_model_arguments(parser, with_reference=True)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help="preference data (JSONL/JSON/CSV/Parquet file, directory, or hub dataset); default: the "
        "eval data of the run the model came from",
    )
    data.add_argument(
        "--split",
        default=None,
        help=f"dataset split for hub/saved datasets (default: the run's data.eval_split, else "
        f"{field_default(DataConfig, 'eval_split')})",
    )
    data.add_argument(
        "--format",
        default=None,
        help=f"data format, as in the training config's data.format (default: the run's, else "
        f"{field_default(DataConfig, 'format')})",
    )
    data.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N examples")
    data.add_argument(
        "--cache-dir",
        default=None,
        help=f"where tokenized data is cached (default: the run's data.cache_dir, else {field_default(DataConfig, 'cache_dir')})",
    )
    add_length_arguments(
        parser,
        EvalJob,
        max_length=field_default(DataConfig, "max_length"),
        max_prompt_length=field_default(DataConfig, "max_prompt_length"),
    )
    loss = parser.add_argument_group("objective")
    default_terms = ", ".join(term["name"] for term in field_default(LossConfig, "terms"))
    loss.add_argument(
        "--loss",
        default=None,
        metavar="NAME",
        help=f"loss to report (sigmoid, ipo, plackett_luce, ...; default: the run's, else {default_terms})",
    )
    loss.add_argument(
        "--config",
        metavar="CONFIG.yaml",
        default=None,
        help="take beta, loss terms, data and lengths from this training config (flags still win)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.json", default=None, help="also write the results as JSON here")
    out.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    out.add_argument(
        "--per-example", metavar="FILE.jsonl", default=None, help="write per-example rewards/margins/loss as JSON lines"
    )


def run(args: argparse.Namespace) -> int:
    from dpokit.analysis.evaluate import EvalJob, format_metrics_table, run_eval

    job = EvalJob(
        model=args.model,
        reference=args.reference,
        reference_free=args.reference_free,
        data=args.data,
        split=args.split,
        format=args.format,
        limit=args.limit,
        cache_dir=args.cache_dir,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
        loss=args.loss,
        beta=args.beta,
        config=args.config,
        load=load_options(args),
    )
    report = run_eval(job)
    summary = report.summary
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if args.per_example:
        Path(args.per_example).parent.mkdir(parents=True, exist_ok=True)
        with open(args.per_example, "w", encoding="utf-8") as handle:
            for record in report.result.per_example:
                handle.write(json.dumps(record) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        print(report.data_report.summary(), file=sys.stderr)  # skips and drops are never silent
        return 0
    print(f"model:     {summary['model']}")
    print(f"reference: {summary['reference']}")
    print(f"data:      {summary['data']} ({summary['num_examples']} examples)")
    for line in report.data_report.summary().splitlines():
        print(f"           {line}")
    print(f"beta:      {summary['beta']}   loss: {', '.join(term['name'] for term in summary['loss_terms'])}")
    print(format_metrics_table(summary["metrics"]))
    return 0


COMMAND = Subcommand(
    "eval",
    "preference accuracy, reward margin and loss of a model on a dataset",
    "Evaluate a model, LoRA adapter or checkpoint as an implicit reward model on preference data.",
    EPILOG,
    add_arguments,
    run,
)
