"""``dpokit frontier``: arguments -> :class:`dpokit.analysis.frontier.FrontierJob`; prints the table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpokit.commands.common import (
    Subcommand,
    add_engine_arguments,
    add_model_arguments,
    engine_options,
    field_default,
    load_options,
)

DESCRIPTION = (
    "Sample completions from every checkpoint of each run, score them with a reward, estimate "
    "KL(policy || reference) from the same samples, and write frontier.png, results.json and results.md. "
    "With --engine vllm a vLLM server serving the reference samples: each checkpoint is loaded into it in turn "
    "(a LoRA adapter at run time, full weights in place) and both log-probs are computed here on the sampled "
    "tokens; the server gets the reference's weights back at the end. Prompts rows with images (a vision-language "
    "reference and checkpoints; the dpokit engine only) are sampled and teacher-forced with their images, and the "
    "reward function, which must name an 'images' parameter, gets them too."
)
EPILOG = """examples:
  dpokit frontier runs/dpo-b0.1 runs/dpo-b0.5 sft=runs/sft --reference models/sft --prompts prompts.txt \\
      --reward dpokit.experiments.reward:vader_reward --out frontier/
  dpokit frontier runs/dpo --reference models/sft --prompts eval.jsonl --reward models/sentiment-classifier
  dpokit frontier runs/shapes-full/runs/dpo-beta0.1 --reference runs/shapes-full/runs/sft/final \
      --prompts runs/shapes-full/data/eval.jsonl --reward dpokit.experiments.shapes:colour_reward   # image prompts
  dpokit frontier runs/dpo --reference models/sft --prompts prompts.txt --reward dpokit.experiments.reward:vader_reward \\
      --engine vllm --engine-url http://127.0.0.1:8000   # a server started on models/sft (docs/vllm.md)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.analysis.frontier import FrontierJob

    def default(name: str) -> object:
        return field_default(FrontierJob, name)

    parser.add_argument("runs", nargs="+", help="run or model directories; NAME=DIR sets the series name")
    parser.add_argument("--reference", required=True, help="reference model directory (pi_ref)")
    parser.add_argument(
        "--prompts",
        required=True,
        help="prompts: .txt (one per line) or .jsonl with 'prompt' (and 'images', for a vision-language model)",
    )
    parser.add_argument(
        "--reward",
        required=True,
        help="'module:function' (prompts=, completions= [, images= for image prompts] -> list of floats) or a "
        "sequence-classification model dir",
    )
    parser.add_argument("--out", default=default("out"), help=f"output directory (default: ./{default('out')})")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=default("num_samples"),
        help=f"completions per prompt (default {default('num_samples')})",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=default("max_new_tokens"),
        help=f"longest completion sampled per prompt, in tokens (default {default('max_new_tokens')})",
    )
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument(
        "--seed",
        type=int,
        default=default("seed"),
        help=f"sampling seed; every model samples the same prompts with it (dpokit engine; default {default('seed')})",
    )
    parser.add_argument(
        "--beta", action="append", default=[], metavar="NAME=BETA", help="annotate a series with its beta (repeatable)"
    )
    parser.add_argument("--title", default=None, help="title of frontier.png (default: reward vs KL)")
    add_model_arguments(parser, with_model=False)
    add_engine_arguments(
        parser,
        vllm="the server must serve the reference (its served name, or the directory it loaded it from) and see "
        "the runs' directories; each checkpoint is loaded into it in turn, which needs VLLM_SERVER_DEV_MODE=1 for full "
        "weights and --enable-lora with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True for adapters; the log-probs are computed "
        "here with --dtype/--device",
    )


def parse_run(spec: str) -> tuple[str, str]:
    """``NAME=DIR`` -> (NAME, DIR); a plain directory is named after itself."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    return Path(spec).name, spec


def _parse_betas(items: list[str]) -> dict[str, float]:
    from dpokit.errors import ConfigError

    betas = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            betas[name] = float(value)
        except ValueError:
            raise ConfigError(f"--beta {item!r}: expected NAME=NUMBER") from None
    return betas


def run(args: argparse.Namespace) -> int:
    from dpokit.analysis.frontier import FrontierJob, results_markdown, run_frontier

    job = FrontierJob(
        runs=[parse_run(spec) for spec in args.runs],
        reference=args.reference,
        prompts=args.prompts,
        reward=args.reward,
        out=args.out,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        max_prompts=args.max_prompts,
        seed=args.seed,
        betas=_parse_betas(args.beta),
        title=args.title,
        load=load_options(args),
        engine=engine_options(args),
    )
    points, paths = run_frontier(job, log=lambda line: print(line, file=sys.stderr))
    print(results_markdown(points))
    print(f"wrote {paths['png']}, {paths['json']}, {paths['md']}")
    return 0


COMMAND = Subcommand(
    "frontier",
    "reward vs KL(policy || reference) over the checkpoints of runs (frontier.png)",
    DESCRIPTION,
    EPILOG,
    add_arguments,
    run,
)
