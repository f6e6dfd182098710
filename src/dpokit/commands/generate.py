"""``dpokit generate``: arguments -> :class:`dpokit.generation.GenerateJob`; prints and writes the samples."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from dpokit.commands.common import (
    Subcommand,
    add_engine_arguments,
    add_model_arguments,
    engine_options,
    field_default,
    load_options,
    non_negative_int,
    positive_int,
)

EPILOG = """\
examples:
  dpokit generate --model outputs/dpo --prompt "Tell me about the film." --num-samples 3
  dpokit generate --model outputs/lora-adapter --prompts-file prompts.jsonl --temperature 0 --output samples.jsonl
  dpokit generate --model runs/exp/checkpoint-200 --prompt "Hi" --chat-template always --seed 7
  dpokit generate --engine vllm --engine-url http://127.0.0.1:8000 --model my-model --prompt "Hi"  # a model the server serves"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.generation import GenerateJob, SamplingConfig

    add_model_arguments(parser)
    add_engine_arguments(parser)
    inputs = parser.add_argument_group("prompts")
    inputs.add_argument("--prompt", action="append", default=None, help="a prompt; repeat for several")
    inputs.add_argument(
        "--prompts-file",
        metavar="FILE",
        default=None,
        help="a .txt file (one prompt per line) or JSONL/JSON rows with a 'prompt' field (text or chat messages) and, "
        "for a vision-language model, 'images' (paths relative to the file; docs/vlm.md)",
    )
    chat_template = field_default(GenerateJob, "chat_template")
    inputs.add_argument(
        "--chat-template",
        choices=["auto", "always", "never"],
        default=chat_template,
        help="auto: chat-message prompts go through the tokenizer's chat template (with the generation "
        "prompt), text prompts are used as they are; always: text prompts become a user turn; never: "
        f"messages are joined as plain text (default: {chat_template})",
    )
    inputs.add_argument("--system", default=None, help="a system message prepended to chat prompts")
    sampling = parser.add_argument_group("sampling")
    helps = {
        "max_new_tokens": "tokens to generate per sample",
        "temperature": "sampling temperature; 0 means greedy",
        "top_p": "nucleus sampling mass (1.0 = off)",
        "top_k": "sample among the k likeliest tokens (0 = off)",
        "num_samples": "samples per prompt",
        "seed": "random seed; prompt i is sampled with seed + i, so the same seed gives the same samples (dpokit engine; "
        "vLLM samples as its server's --seed makes it)",
    }
    types = {"max_new_tokens": positive_int, "num_samples": positive_int, "top_k": non_negative_int}
    for name, text in helps.items():
        default = field_default(SamplingConfig, name)
        sampling.add_argument(
            f"--{name.replace('_', '-')}",
            type=types.get(name, type(default)),
            default=default,
            help=f"{text} (default: {default})",
        )
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.jsonl", default=None, help="write {prompt, sample, completion} JSON lines here")
    out.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def run(args: argparse.Namespace) -> int:
    from dpokit.generation import GenerateJob, SamplingConfig, run_generate

    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    job = GenerateJob(
        model=args.model,
        prompts=list(args.prompt or []),
        prompts_file=args.prompts_file,
        chat_template=args.chat_template,
        system=args.system,
        sampling=sampling,
        load=load_options(args),
        engine=engine_options(args),
    )
    samples = run_generate(job)
    rows = [asdict(sample) for sample in samples]
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    for sample in samples:
        print(f"--- prompt {sample.prompt_index}" + (f", sample {sample.sample_index}" if sampling.num_samples > 1 else ""))
        completion = f"\033[1m{sample.completion}\033[0m" if sys.stdout.isatty() else sample.completion
        print(f"{sample.prompt_text}{completion}")
    if args.output:
        print(f"wrote {len(rows)} samples to {args.output}")
    return 0


COMMAND = Subcommand(
    "generate",
    "sample responses from a model or checkpoint",
    "Sample completions for prompts (chat-template aware) from a model, LoRA adapter or checkpoint.",
    EPILOG,
    add_arguments,
    run,
)
