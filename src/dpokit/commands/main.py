"""The ``dpokit`` command line: ``dpokit train | sft | eval | score | generate | demo | frontier | experiment``.

Each subcommand is one :class:`Subcommand` entry in :data:`SUBCOMMANDS` -- its help text, a function
that adds its arguments, and a function that runs it -- so a new command is one new entry. Heavy
imports (torch, transformers) happen inside the run functions, which keeps ``dpokit --help`` instant.

Errors a user can fix (:class:`dpokit.errors.DpokitError`) are printed as ``error: <message>`` with
exit code 2 and no traceback; set ``DPOKIT_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Sequence

from dpokit import __version__
from dpokit.errors import DpokitError

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Subcommand:
    """One ``dpokit <name>`` command."""

    name: str
    help: str  # one line, shown in ``dpokit --help``
    description: str  # shown at the top of ``dpokit <name> --help``
    epilog: str  # examples, shown at the bottom of ``dpokit <name> --help``
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------------------------- train


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="training configuration (see examples/*.yaml)")
    parser.add_argument(
        "overrides",
        metavar="section.key=value",
        nargs="*",
        help="override config values; values are parsed as YAML (loss.beta=0.2, optim.lr=1e-6, "
        "model.lora.enabled=true, 'loss.terms=[{name: ipo}]')",
    )
    parser.add_argument(
        "--resume",
        metavar="latest|PATH",
        default=None,
        help="continue a run: 'latest' picks the newest checkpoint in the run directory, or give a "
        "checkpoint directory. Model, optimizer, scheduler, data order and RNG state are restored.",
    )


def _run_train(args: argparse.Namespace) -> int:
    from dpokit.config import load_config
    from dpokit.training.trainer import run

    config = load_config(args.config, list(args.overrides))
    result = run(config, resume=args.resume)
    _print_run_result(result)
    return EXIT_OK


def _run_sft(args: argparse.Namespace) -> int:
    from dpokit.config import load_config
    from dpokit.training.trainer import run

    # SFT ("Preferred-FT" in the paper) is the same loop with the "sft" preset: one negative
    # log-likelihood term on the chosen responses and no reference model.
    config = load_config(args.config, list(args.overrides), preset="sft")
    result = run(config, resume=args.resume)
    _print_run_result(result)
    return EXIT_OK


def _print_run_result(result: object) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the summary is rank 0's to print
        return
    run_dir = getattr(result, "run_dir", None)
    output_dir = getattr(result, "output_dir", None)
    step = getattr(result, "global_step", None)
    lines = [f"finished after {step} optimizer steps" if step is not None else "finished"]
    for label, metrics in (("train", getattr(result, "train_metrics", None)), ("eval", getattr(result, "eval_metrics", None))):
        if metrics:
            shown = "  ".join(f"{name}={value:.4g}" for name, value in metrics.items() if isinstance(value, (int, float)))
            lines.append(f"{label}: {shown}")
    if run_dir is not None:
        lines.append(f"run directory (metrics.jsonl, TensorBoard, curves.png): {run_dir}")
    if output_dir is not None:
        lines.append(f"model: {output_dir}")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------- shared model args


def _add_model_arguments(parser: argparse.ArgumentParser, *, with_reference: bool) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="the policy: a model directory (or hub id), a LoRA adapter directory, or a checkpoint "
        "directory written by `dpokit train`",
    )
    if with_reference:
        group.add_argument(
            "--reference",
            metavar="PATH",
            default=None,
            help="the reference model pi_ref. Default: for a LoRA adapter, its base model with the adapter "
            "disabled; for a `dpokit train` output or checkpoint, the model the run started from",
        )
        group.add_argument(
            "--reference-free",
            action="store_true",
            help="use no reference model (pi_ref uniform): r(x, y) = beta * log pi(y|x)",
        )
        group.add_argument("--beta", type=float, default=None, help="the KL weight beta (default: the run's, else 0.1)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype (default: auto)")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model directory")


def _add_length_arguments(parser: argparse.ArgumentParser, *, max_length: int = 512, max_prompt_length: int = 256) -> None:
    group = parser.add_argument_group("tokenization")
    group.add_argument(
        "--max-length", type=int, default=None, help=f"max prompt+response tokens (default: the run's, else {max_length})"
    )
    group.add_argument(
        "--max-prompt-length", type=int, default=None, help=f"max prompt tokens (default: the run's, else {max_prompt_length})"
    )
    group.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: 8)")


# ---------------------------------------------------------------------------------------------- eval


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser, with_reference=True)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help="preference data (JSONL/JSON/CSV/Parquet file, directory, or hub dataset); default: the "
        "eval data of the run the model came from",
    )
    data.add_argument("--split", default=None, help="dataset split for hub/saved datasets (default: the run's data.eval_split, else test)")
    data.add_argument("--format", default="auto", help="data format, as in the training config's data.format (default: auto)")
    data.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    data.add_argument(
        "--cache-dir", default=None, help="where tokenized data is cached (default: the run's data.cache_dir, else .dpokit_cache)"
    )
    _add_length_arguments(parser)
    loss = parser.add_argument_group("objective")
    loss.add_argument(
        "--loss",
        default=None,
        metavar="NAME",
        help="loss to report (sigmoid, ipo, plackett_luce, ...; default: the run's, else sigmoid)",
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
    out.add_argument("--per-example", metavar="FILE.jsonl", default=None, help="write per-example rewards/margins/loss as JSON lines")


def _run_eval(args: argparse.Namespace) -> int:
    from dpokit.analysis.evaluate import run_eval_command

    return run_eval_command(args)


# --------------------------------------------------------------------------------------------- score


def _add_score_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser, with_reference=True)
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
    inputs.add_argument("--chat", action="store_true", help="treat --prompt/--response as a user turn and an assistant turn (chat template)")
    _add_length_arguments(parser, max_length=1024, max_prompt_length=512)
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.jsonl", default=None, help="write one JSON line per input row here")
    out.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def _run_score(args: argparse.Namespace) -> int:
    from dpokit.analysis.score import run_score_command

    return run_score_command(args)


# ------------------------------------------------------------------------------------------ generate


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser, with_reference=False)
    inputs = parser.add_argument_group("prompts")
    inputs.add_argument("--prompt", action="append", default=None, help="a prompt; repeat for several")
    inputs.add_argument(
        "--prompts-file",
        metavar="FILE",
        default=None,
        help="a .txt file (one prompt per line) or JSONL/JSON rows with a 'prompt' field (text or chat messages)",
    )
    inputs.add_argument(
        "--chat-template",
        choices=["auto", "always", "never"],
        default="auto",
        help="auto: chat-message prompts go through the tokenizer's chat template (with the generation "
        "prompt), text prompts are used as they are; always: text prompts become a user turn; never: "
        "messages are joined as plain text (default: auto)",
    )
    inputs.add_argument("--system", default=None, help="a system message prepended to chat prompts")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per sample (default: 64)")
    sampling.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 means greedy (default: 0.7)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    sampling.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0 = off)")
    sampling.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default: 1)")
    sampling.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same samples (default: 0)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.jsonl", default=None, help="write {prompt, sample, completion} JSON lines here")
    out.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def _run_generate(args: argparse.Namespace) -> int:
    from dpokit.generation import run_generate_command

    return run_generate_command(args)


# ---------------------------------------------------------------------------------------------- demo


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo",
                        help="where the demo writes its data, DPO run and samples (default: runs/demo)")
    parser.add_argument("--cache-dir", default=".dpokit_cache/sentiment",
                        help="where the small SFT model is cached between runs (default: .dpokit_cache/sentiment)")


def _run_demo(args: argparse.Namespace) -> int:
    from dpokit.experiments.sentiment import run_sentiment_demo

    run_sentiment_demo(args.run_dir, args.cache_dir)
    return EXIT_OK


# -------------------------------------------------------------------------------------- experiment


def _add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.experiments import sentiment

    parser.description = textwrap.fill(sentiment.EXPERIMENT_DESCRIPTION, width=100)
    parser.epilog = sentiment.EXPERIMENT_EPILOG
    sentiment.add_experiment_arguments(parser)


def _run_experiment(args: argparse.Namespace) -> int:
    from dpokit.experiments.sentiment import experiment_main

    return experiment_main(args)


# ------------------------------------------------------------------------------------------ frontier
# Its arguments, description and examples live in dpokit.analysis.frontier, which imports torch; they are only
# built when `dpokit frontier` itself is invoked (see build_parser's `only`).


def _add_frontier_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.analysis import frontier

    parser.description = textwrap.fill(frontier.FRONTIER_DESCRIPTION, width=100)
    parser.epilog = frontier.FRONTIER_EPILOG
    frontier.add_frontier_arguments(parser)


def _run_frontier(args: argparse.Namespace) -> int:
    from dpokit.analysis.frontier import frontier_main

    return frontier_main(args)


# ------------------------------------------------------------------------------------------- registry

_TRAIN_EPILOG = """\
examples:
  dpokit train examples/full.yaml
  dpokit train examples/lora.yaml loss.beta=0.2 optim.lr=5e-6 output_dir=outputs/lora-b02
  dpokit train examples/ipo.yaml optim.max_steps=200 logging.wandb=true
  dpokit train examples/full.yaml --resume latest

The run directory gets metrics.jsonl, TensorBoard event files (tensorboard --logdir runs/),
checkpoints and curves.png. Ctrl-C saves a checkpoint you can --resume from."""

_SFT_EPILOG = """\
Same configuration file and overrides as `dpokit train`; the loss becomes the negative
log-likelihood of the chosen responses ("Preferred-FT", the paper's step 1) and no reference model
is used. Train DPO afterwards with model.name_or_path set to the SFT output.

examples:
  dpokit sft examples/full.yaml output_dir=outputs/sft
  dpokit train examples/full.yaml model.name_or_path=outputs/sft"""

_EVAL_EPILOG = """\
Reports preference accuracy (fraction of pairs with r(chosen) > r(rejected)), mean reward margin,
mean chosen/rejected rewards and the loss, with r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)).

examples:
  dpokit eval --model outputs/dpo --reference models/sft --data data/test.jsonl
  dpokit eval --model outputs/lora-adapter --data data/test.jsonl --beta 0.1
  dpokit eval --model runs/exp/checkpoints/step-200 --config examples/full.yaml --json
  dpokit eval --model outputs/ipo --reference models/sft --data data/test.jsonl --loss ipo --output eval.json"""

_SCORE_EPILOG = """\
The trained policy is a reward model: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) per response,
and for a pair P(first preferred) = sigmoid(r_first - r_second).

examples:
  dpokit score --model outputs/dpo --reference models/sft --prompt "Review:" \\
      --response "a wonderful film" --response "a boring film"
  dpokit score --model outputs/lora-adapter --input pairs.jsonl --output scores.jsonl
  dpokit score --model outputs/dpo --reference models/sft --input responses.csv --json"""

_GENERATE_EPILOG = """\
examples:
  dpokit generate --model outputs/dpo --prompt "Tell me about the film." --num-samples 3
  dpokit generate --model outputs/lora-adapter --prompts-file prompts.jsonl --temperature 0 --output samples.jsonl
  dpokit generate --model runs/exp/checkpoints/step-200 --prompt "Hi" --chat-template always --seed 7"""

_DEMO_EPILOG = """\
The quick mode of the paper's controlled-sentiment experiment (see `dpokit experiment --help`): a
small GPT-2 trained from scratch on generated movie reviews plays the SFT model (cached after the
first run), pairs of its own completions are labelled by VADER's sentiment score, and DPO teaches it
to write positive continuations. Prints the ground-truth reward and KL(pi || pi_sft) before and after,
with samples of both models for the same prompts, and leaves the DPO run directory with
metrics.jsonl, TensorBoard events and curves.png. About 35 seconds on 2 CPU cores from a cold cache.

examples:
  dpokit demo
  dpokit demo --run-dir /tmp/dpokit-demo"""

SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "train",
        "fine-tune a model on preference data (DPO and relatives)",
        "Train a policy on preference data with the loss, reference strategy and optimizer of a YAML config.",
        _TRAIN_EPILOG,
        _add_train_arguments,
        _run_train,
    ),
    Subcommand(
        "sft",
        "supervised fine-tuning on the chosen responses (the reference model for DPO)",
        "Supervised fine-tuning on the preferred responses of a preference dataset.",
        _SFT_EPILOG,
        _add_train_arguments,
        _run_sft,
    ),
    Subcommand(
        "eval",
        "preference accuracy, reward margin and loss of a model on a dataset",
        "Evaluate a model, LoRA adapter or checkpoint as an implicit reward model on preference data.",
        _EVAL_EPILOG,
        _add_eval_arguments,
        _run_eval,
    ),
    Subcommand(
        "score",
        "score responses with the policy's implicit reward r(x, y)",
        "Use a trained policy as a reward model: print or write r(x, y) per response and, for pairs, "
        "the preference probability.",
        _SCORE_EPILOG,
        _add_score_arguments,
        _run_score,
    ),
    Subcommand(
        "generate",
        "sample responses from a model or checkpoint",
        "Sample completions for prompts (chat-template aware) from a model, LoRA adapter or checkpoint.",
        _GENERATE_EPILOG,
        _add_generate_arguments,
        _run_generate,
    ),
    Subcommand(
        "demo",
        "DPO teaches a tiny self-built review model to write positive continuations (under a minute on a CPU)",
        "A self-contained DPO run on the paper's sentiment task in miniature: model, data and reward built on the spot.",
        _DEMO_EPILOG,
        _add_demo_arguments,
        _run_demo,
    ),
    Subcommand(
        "frontier",
        "reward vs KL(policy || reference) over the checkpoints of runs (frontier.png)",
        "",  # filled in from dpokit.analysis.frontier when the command is built
        "",
        _add_frontier_arguments,
        _run_frontier,
    ),
    Subcommand(
        "experiment",
        "reproduce the paper's controlled-sentiment reward-KL frontier (miniature, CPU)",
        "",  # filled in from dpokit.experiments.sentiment when the command is built
        "",
        _add_experiment_arguments,
        _run_experiment,
    ),
]

_MAIN_EPILOG = """\
quick start:
  dpokit demo                                    # DPO on a tiny self-built model: reward and KL before/after
  dpokit train examples/full.yaml                # DPO on your data (edit the paths first)
  dpokit eval --model outputs/full --reference MODEL --data test.jsonl
  dpokit score --model outputs/full --reference MODEL --prompt "..." --response "..." --response "..."

Run `dpokit <command> --help` for a command's arguments and examples."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``dpokit`` argument parser: one sub-parser per :data:`SUBCOMMANDS` entry.

    ``only``: add the arguments of that command alone (the others keep their one-line help for
    ``dpokit --help``), so running one command never imports what another needs. None adds all.
    """
    parser = argparse.ArgumentParser(
        prog="dpokit",
        description="Direct Preference Optimization (and relatives) for causal language models.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dpokit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in SUBCOMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=textwrap.fill(command.description, width=100),
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if only is None or only == command.name:
            command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dpokit`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {command.name for command in SUBCOMMANDS}
    parser = build_parser(only=next((token for token in argv if token in names), ""))
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args._run(args)
    except DpokitError as error:
        if os.environ.get("DPOKIT_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # The trainer saves its own interrupt checkpoint; here we only avoid a traceback.
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
