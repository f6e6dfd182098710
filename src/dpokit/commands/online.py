"""``dpokit online``: rounds of sample -> judge -> pairs -> train on the current policy."""

from __future__ import annotations

import argparse
import math
import os

from dpokit.commands.common import Subcommand
from dpokit.commands.train import add_arguments, exit_code

EPILOG = """\
examples:
  dpokit online examples/online.yaml
  dpokit online examples/online.yaml online.judge=self reference.name_or_path=outputs/sft
  dpokit online examples/online.yaml online.rounds=8 --resume latest

Each round writes <run_dir>/rounds/round-NNNN/{prompts,completions,judgments,pairs}.jsonl before training
on them; metrics.jsonl gets one record per round (split "round") and rounds.png plots them. --resume latest
continues inside a round without sampling or judging again."""


def run_online_command(args: argparse.Namespace) -> int:
    from dpokit.config import load_config
    from dpokit.online import run_online

    result = run_online(load_config(args.config, list(args.overrides)), resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        lines = []
        for record in result.rounds:
            accuracy = record.get("heldout/rewards/accuracies")
            lines.append(
                f"round {record['round']}: judge score {record.get('judge/score_mean', math.nan):.4g}, {record.get('pairs', 0)} "
                f"pairs, KL {record.get('kl', math.nan):.4g}"
                + (f", held-out accuracy {accuracy:.3f}" if accuracy is not None else "")
            )
        if result.interrupted:
            lines.append(
                f"interrupted at step {result.global_step}; checkpoint {result.last_checkpoint} (continue with --resume latest)"
            )
        else:
            lines.append(f"finished after {result.global_step} optimizer steps")
        lines.append(f"run directory (rounds/, metrics.jsonl, rounds.png): {result.run_dir}")
        if result.output_dir is not None:
            lines.append(f"model: {result.output_dir}")
        print("\n".join(lines))
    return exit_code(result)


COMMAND = Subcommand(
    "online",
    "online / self-labelling DPO: the policy samples, a judge labels, it trains, in rounds",
    "Online DPO: rounds of sampling K completions per prompt from the current policy, labelling them with a judge "
    "(a reward function or model, an LLM judge, an OpenAI-compatible endpoint, or the policy's own implicit reward), "
    "building preference pairs and training on them. The same YAML config as `dpokit train`, with an online: section.",
    EPILOG,
    add_arguments,
    run_online_command,
)
