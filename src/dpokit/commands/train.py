"""``dpokit train`` and ``dpokit sft``: a YAML config plus ``section.key=value`` overrides -> a run."""

from __future__ import annotations

import argparse
import os
import signal

from dpokit.commands.common import Subcommand

TRAIN_EPILOG = """\
examples:
  dpokit train examples/full.yaml
  dpokit train examples/lora.yaml loss.beta=0.2 optim.lr=5e-6 output_dir=outputs/lora-b02
  dpokit train examples/ipo.yaml optim.max_steps=200 logging.wandb=true
  dpokit train examples/full.yaml --resume latest

The run directory gets metrics.jsonl, TensorBoard event files (tensorboard --logdir runs/),
checkpoints and curves.png. Ctrl-C saves a checkpoint you can --resume from."""

SFT_EPILOG = """\
Same configuration file and overrides as `dpokit train`; the loss becomes the negative
log-likelihood of the chosen responses ("Preferred-FT", the paper's step 1) and no reference model
is used. Train DPO afterwards with model.name_or_path set to the SFT output.

examples:
  dpokit sft examples/full.yaml output_dir=outputs/sft
  dpokit train examples/full.yaml model.name_or_path=outputs/sft"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run directory that holds an earlier run (its metrics, checkpoints and event files "
        "are removed); without it such a directory is refused",
    )


def run_train(args: argparse.Namespace, *, preset: str | None = None) -> int:
    from dpokit.config import load_config
    from dpokit.training.trainer import run

    config = load_config(args.config, list(args.overrides), preset=preset)
    result = run(config, resume=args.resume, overwrite=args.overwrite)
    print_run_result(result)
    return exit_code(result)


def exit_code(result: object) -> int:
    """0 for a run that reached its end; 128 + the signal's number when a signal stopped it (130 for
    SIGINT, 143 for SIGTERM, as shells report), 3 when it was stopped otherwise."""
    if not getattr(result, "interrupted", False):
        return 0
    reason = str(getattr(result, "stop_reason", "") or "")
    return 128 + int(getattr(signal, reason)) if reason.startswith("SIG") and hasattr(signal, reason) else 3


def run_sft(args: argparse.Namespace) -> int:
    # SFT ("Preferred-FT" in the paper) is the same loop with the "sft" preset: one negative
    # log-likelihood term on the chosen responses and no reference model.
    return run_train(args, preset="sft")


def print_run_result(result: object) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the summary is rank 0's to print
        return
    run_dir = getattr(result, "run_dir", None)
    output_dir = getattr(result, "output_dir", None)
    step = getattr(result, "global_step", None)
    if getattr(result, "interrupted", False):
        checkpoint = getattr(result, "last_checkpoint", None)
        lines = [
            f"interrupted by {getattr(result, 'stop_reason', None) or 'a stop request'} after {step} optimizer steps; "
            f"checkpoint: {checkpoint} (continue with --resume latest)"
        ]
    else:
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


TRAIN = Subcommand(
    "train",
    "fine-tune a model on preference data (DPO and relatives)",
    "Train a policy on preference data with the loss, reference strategy and optimizer of a YAML config.",
    TRAIN_EPILOG,
    add_arguments,
    run_train,
)
SFT = Subcommand(
    "sft",
    "supervised fine-tuning on the chosen responses (the reference model for DPO)",
    "Supervised fine-tuning on the preferred responses of a preference dataset.",
    SFT_EPILOG,
    add_arguments,
    run_sft,
)
