"""``dpokit experiment`` and ``dpokit demo``: the controlled-sentiment experiment (dpokit.experiments.sentiment)."""

from __future__ import annotations

import argparse
import sys

from dpokit.commands.common import Subcommand

EXPERIMENT_DESCRIPTION = (
    "The DPO paper's IMDb sentiment experiment in miniature: a small GPT-2 trained on generated reviews, "
    "VADER as the ground-truth reward, DPO (beta sweep), Preferred-FT, Unlikelihood, ORPO, SimPO, KTO, Best-of-N "
    "and RLOO, each evaluated on the reward-KL frontier; then win rates against the SFT model across temperatures. "
    "'online': the same task with online DPO (labelled by VADER) and self-labelled DPO (a policy trained on 10% of the "
    "pairs labels its own samples with its implicit reward) against offline DPO and the 10% baseline, at equal steps."
)
EXPERIMENT_EPILOG = """examples:
  dpokit experiment sentiment --mode quick           # the paper's methods, smaller, about 2 minutes
  dpokit experiment sentiment --mode full             # the reproduction with ORPO, SimPO, KTO and win rates, about 30 minutes
  dpokit experiment sentiment --methods dpo,best-of-n
  dpokit experiment online --mode quick              # online and self-labelling DPO, smaller: about 7 minutes
  dpokit experiment online --mode full               # the reported comparison (docs/online/)"""

DEMO_EPILOG = """\
The quick mode of the paper's controlled-sentiment experiment (see `dpokit experiment --help`): a
small GPT-2 trained from scratch on generated movie reviews plays the SFT model (cached after the
first run), pairs of its own completions are labelled by VADER's sentiment score, and DPO teaches it
to write positive continuations. Prints the ground-truth reward and KL(pi || pi_sft) before and after,
with samples of both models for the same prompts, and leaves the DPO run directory with
metrics.jsonl, TensorBoard events and curves.png. About 55 seconds on 2 CPU cores from a cold cache.

examples:
  dpokit demo
  dpokit demo --run-dir /tmp/dpokit-demo"""


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.experiments import sentiment

    parser.add_argument(
        "name",
        choices=["sentiment", "online"],
        help="which experiment: the paper's controlled sentiment, or online and self-labelling DPO on the same task",
    )
    parser.add_argument(
        "--mode",
        choices=["full", "quick"],
        default="full",
        help="sentiment: full (about 30 min on 2 CPU cores, win rates included) or quick (about 2 min: the paper's methods, "
        "smaller); online: full (the reported comparison, about 30 minutes) or quick (about 7 minutes)",
    )
    parser.add_argument("--out", default=None, help="output directory (default runs/<name>-<mode>)")
    parser.add_argument(
        "--cache-dir",
        default=sentiment.DEFAULT_CACHE_DIR,
        help=f"where the SFT model is cached (default {sentiment.DEFAULT_CACHE_DIR})",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"sentiment only: comma-separated subset of {','.join(sentiment.ALL_METHODS)} (default: the mode's)",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep run checkpoints after evaluating them")
    parser.add_argument(
        "--threads",
        type=int,
        default=sentiment.DEFAULT_THREADS,
        help=f"torch intra-op threads (default {sentiment.DEFAULT_THREADS}: fastest for these tiny models)",
    )


def run_experiment(args: argparse.Namespace) -> int:
    import dataclasses

    from dpokit.analysis.frontier import results_markdown
    from dpokit.experiments.sentiment import MODES
    from dpokit.experiments.sentiment import run_experiment as run_sentiment_experiment

    if args.name == "online":
        return run_online_experiment(args)
    settings = MODES[args.mode]
    if args.methods is not None:
        settings = dataclasses.replace(settings, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    out_dir = args.out or f"runs/sentiment-{args.mode}"
    result = run_sentiment_experiment(
        settings,
        out_dir,
        args.cache_dir,
        keep_checkpoints=args.keep_checkpoints,
        threads=args.threads,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(results_markdown([{k: v for k, v in p.items() if k != "samples"} for p in result["points"]]))
    print(f"wrote {out_dir}/frontier.png, results.json, results.md")
    return 0


def run_online_experiment(args: argparse.Namespace) -> int:
    from dpokit.errors import ConfigError
    from dpokit.experiments.online import run_online_experiment as run_online
    from dpokit.experiments.online import summary_markdown

    if args.methods is not None:
        raise ConfigError("--methods applies to the sentiment experiment; the online experiment always runs its four arms")
    out_dir = args.out or f"runs/online-{args.mode}"
    result = run_online(
        args.mode,
        out_dir,
        args.cache_dir,
        keep_checkpoints=args.keep_checkpoints,
        threads=args.threads,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(summary_markdown(result))
    print(f"wrote {out_dir}/frontier.png, results.json, results.md")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.experiments import sentiment

    parser.add_argument(
        "--run-dir",
        default=sentiment.DEMO_RUN_DIR,
        help=f"where the demo writes its data, DPO run and samples (default: {sentiment.DEMO_RUN_DIR})",
    )
    parser.add_argument(
        "--cache-dir",
        default=sentiment.DEFAULT_CACHE_DIR,
        help=f"where the small SFT model is cached between runs (default: {sentiment.DEFAULT_CACHE_DIR})",
    )


def run_demo(args: argparse.Namespace) -> int:
    from dpokit.experiments.sentiment import run_sentiment_demo

    run_sentiment_demo(args.run_dir, args.cache_dir)
    return 0


EXPERIMENT = Subcommand(
    "experiment",
    "reproduce the paper's controlled-sentiment reward-KL frontier (miniature, CPU)",
    EXPERIMENT_DESCRIPTION,
    EXPERIMENT_EPILOG,
    add_experiment_arguments,
    run_experiment,
)
DEMO = Subcommand(
    "demo",
    "DPO teaches a tiny self-built review model to write positive continuations (under a minute on a CPU)",
    "A self-contained DPO run on the paper's sentiment task in miniature: model, data and reward built on the spot.",
    DEMO_EPILOG,
    add_demo_arguments,
    run_demo,
)
