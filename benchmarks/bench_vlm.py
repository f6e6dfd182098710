"""Vision-language DPO end to end: dpokit vs TRL 1.16 ``DPOTrainer`` on a tiny LLaVA and the shapes task.

The fixture: ``dpokit.experiments.shapes`` -- a tiny LLaVA built from config (CLIP vision tower, MLP
projector, Llama language model; random init, a tokenizer trained on the spot), sized here by
``--hidden-size``, ``--layers``, ``--image-size`` and ``--patch-size`` (default 128 / 2 / 96 / 6: 256
image tokens per image, the prompt ~270 tokens, each response ~6), and ``--pairs`` rows of the
coloured-shapes task (one image per prompt, images drawn at ``--image-size``).

One setting for both: LoRA (r 8, alpha 16) on the language model's linear layers only, the vision
tower frozen -- ``examples/vlm.yaml``'s setting -- batch 8 pairs, ``--steps`` optimizer steps, sigmoid
loss, beta 0.1, AdamW lr 5e-3, ``max_length`` 1024 (nothing is truncated), 2 threads, each tool's
defaults otherwise:

* ``dpokit``      -- ``examples/vlm.yaml`` loaded as ``dpokit train`` loads it, with the paths, steps and
                     batch above as overrides (``data.layout: auto``, ``reference.strategy: auto``);
* ``trl_default`` -- ``DPOTrainer`` with the model's processor, the rows with PIL images (TRL's
                     ``images`` column) and a peft ``LoraConfig`` on the same modules; its defaults
                     otherwise (the reference is the policy with its adapters disabled, forwarded in
                     every step; gradient checkpointing).

Each run is a fresh process (``bench_train.launch``: wall time from spawn to exit -- interpreter,
imports, loading, data preparation, reference pass, training, saving), the systems alternated,
``--repeats`` times, medians reported (``bench_train.medians``).

The work each does is counted in the run itself: every forward of the language model (positions,
padding included) and of the vision tower (images), with and without gradients, reference passes
included. dpokit writes each prompt -- its image tokens included -- once per pair and encodes its
image once; TRL concatenates chosen and rejected, so each prompt, and its image, goes through twice.
The estimated FLOPs are 2 N (forward) per position (an image: the tower's patches and class token),
x3 with gradients (forward and backward), x4 for the language model when gradient checkpointing
recomputes its forward; the frozen vision tower forward only.

    python benchmarks/bench_vlm.py                     # 2 repeats, ~1 minute on 2 idle cores
    python benchmarks/bench_vlm.py --repeats 3 --image-size 64 --patch-size 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SYSTEMS = ("dpokit", "trl_default")
EXAMPLE = HERE.parent / "examples" / "vlm.yaml"
BATCH_PAIRS = 8
LR = 5e-3
BETA = 0.1
MAX_LENGTH = 1024
MAX_PROMPT_LENGTH = 512
LORA_R, LORA_ALPHA = 8, 16
LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build_vlm_fixture(root: Path, options: argparse.Namespace) -> Path:
    """The tiny LLaVA in ``root/model``, ``--pairs`` shapes rows in ``root/train.jsonl``."""
    from dpokit.experiments.shapes import build_tiny_vlm, write_shapes_data

    build_tiny_vlm(
        root / "model",
        "llava",
        hidden_size=options.hidden_size,
        layers=options.layers,
        image_size=options.image_size,
        patch_size=options.patch_size,
    )
    write_shapes_data(root, options.pairs, seed=0, name="train.jsonl", size=options.image_size)
    return root


# ------------------------------------------------------------------------------------------------
# Workers (one system per fresh process).
# ------------------------------------------------------------------------------------------------


class WorkCounter:
    """Positions through the language model and images through the vision tower, per forward call,
    split by whether gradients were on (counted by wrapping the two classes' ``forward``)."""

    def __init__(self) -> None:
        self.counts = {"lm_grad": 0, "lm_nograd": 0, "vision_grad": 0, "vision_nograd": 0, "lm_calls": 0}

    def install(self) -> None:
        from transformers import CLIPVisionModel, LlamaModel

        self._wrap(LlamaModel, "lm")
        self._wrap(CLIPVisionModel, "vision")

    def _wrap(self, cls, kind: str) -> None:
        import torch

        original = cls.forward
        counts = self.counts

        def forward(module, *args, **kwargs):
            if kind == "lm":
                tensor = kwargs.get("inputs_embeds")
                tensor = kwargs.get("input_ids") if tensor is None else tensor
                tensor = args[0] if tensor is None and args else tensor
                units = tensor.shape[0] * tensor.shape[1]
                counts["lm_calls"] += 1
            else:
                pixels = kwargs.get("pixel_values", args[0] if args else None)
                units = pixels.shape[0]
            counts[f"{kind}_{'grad' if torch.is_grad_enabled() else 'nograd'}"] += units
            return original(module, *args, **kwargs)

        cls.forward = forward


def parameter_counts(model_dir: Path) -> dict[str, int]:
    """Parameters of the language model body (no input embedding, no output layer) and the vision tower."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    lm = model.model.language_model
    body = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    vision = model.config.vision_config
    return {
        "lm_body": body,
        "vision": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "vision_positions": (vision.image_size // vision.patch_size) ** 2 + 1,  # patches + the class token
    }


def run_dpokit(fixture: Path, work: Path, options, on_step) -> dict:
    import logging

    from bench_train import RecordHandler
    from dpokit.config import load_config
    from dpokit.training import run

    records = RecordHandler()
    logging.getLogger("dpokit").addHandler(records.handler)
    logging.getLogger("dpokit").setLevel(logging.INFO)

    overrides = [
        f"model.name_or_path={fixture / 'model'}",
        "model.device=cpu",
        f"model.lora.r={LORA_R}",
        f"model.lora.alpha={LORA_ALPHA}",
        f"data.train_path={fixture / 'train.jsonl'}",
        "data.eval_path=null",
        f"data.cache_dir={work / 'cache'}",
        f"data.max_length={MAX_LENGTH}",
        f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
        f"logging.run_dir={work / 'run'}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "logging.log_every=1000000",
        f"optim.lr={LR}",
        f"optim.batch_size={options.batch_pairs}",
        "optim.epochs=1",
        f"optim.max_steps={options.max_steps}",
        f"loss.beta={BETA}",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
    ]
    cfg = load_config(EXAMPLE, overrides)
    result = run(cfg, on_step=lambda step, metrics: on_step(step))
    startup_file = Path(result.run_dir) / "startup.json"
    startup = json.loads(startup_file.read_text()) if startup_file.exists() else {}
    plan = next((m for m in records.messages if "layout:" in m), "")
    layout = plan.split("layout:", 1)[1].split()[0] if plan else cfg.data.layout
    return {"startup": startup, "reference_live": "precomputed" not in json.dumps(startup), "layout": layout, "plan": plan}


def run_trl(fixture: Path, work: Path, clock, options, on_step) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock.mark("imports")

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.mark("train_begin")

        def on_step_end(self, args, state, control, **kwargs):
            on_step(state.global_step)

    processor = AutoProcessor.from_pretrained(fixture / "model")
    model = AutoModelForImageTextToText.from_pretrained(fixture / "model")
    clock.mark("model_load")
    rows = [json.loads(line) for line in (fixture / "train.jsonl").read_text().splitlines()]
    for row in rows:
        row["images"] = [Image.open(fixture / name).convert("RGB") for name in row["images"]]
        del row["colour"]
    dataset = Dataset.from_list(rows)
    clock.mark("data_load")
    args = DPOConfig(
        output_dir=str(work / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=options.batch_pairs,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_steps=options.max_steps,
        learning_rate=LR,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        warmup_steps=0,
        logging_strategy="no",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LM_LINEARS)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=peft_config)
    trainer.add_callback(Clock())
    clock.mark("trainer_init")
    trainer.train()
    trainer.save_model(str(work / "trl" / "final"))
    return {"reference_live": True, "gradient_checkpointing": bool(args.gradient_checkpointing)}


def worker(options: argparse.Namespace) -> None:
    import logging
    import warnings

    import torch

    from bench_train import StepClock, peak_rss

    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    clock = StepClock()
    clock.mark("torch")
    counter = WorkCounter()
    counter.install()
    fixture, work = Path(options.fixture), Path(options.work)
    if options.worker == "dpokit":
        extra = run_dpokit(fixture, work, options, clock.tick)
    else:
        extra = run_trl(fixture, work, clock, options, clock.tick)
    steady = clock.steps[1:] if len(clock.steps) > 2 else clock.steps
    step_seconds = [b - a for a, b in itertools.pairwise(clock.steps)]
    result = {
        "system": options.worker,
        "steps": len(clock.steps),
        "pairs_per_s": (len(steady) - 1) * options.batch_pairs / (steady[-1] - steady[0]) if len(steady) > 1 else float("nan"),
        "median_step_s": statistics.median(step_seconds) if step_seconds else float("nan"),
        "peak_rss": peak_rss(),
        "first_step": clock.steps[0] if clock.steps else None,
        "marks": clock.marks,
        "work": counter.counts,
        **extra,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent: fixture, alternating runs, tables.
# ------------------------------------------------------------------------------------------------


def estimated_flops(work: dict, params: dict, gradient_checkpointing: bool) -> float:
    """2 N per position forwarded (an image: the vision tower's patches and class token), x3 with
    gradients (x4 for the language model with gradient checkpointing: its forward runs again in the
    backward); the vision tower is frozen, so forward only."""
    lm_grad = 4 if gradient_checkpointing else 3
    lm = params["lm_body"] * (lm_grad * work["lm_grad"] + work["lm_nograd"])
    vision = params["vision"] * params["vision_positions"] * (work["vision_grad"] + work["vision_nograd"])
    return 2.0 * (lm + vision)


def parent(options: argparse.Namespace) -> None:
    import torch

    from bench_train import launch, load_average, machine

    script = str(Path(__file__).resolve())
    print(
        f"# VLM DPO benchmark -- {time.strftime('%Y-%m-%d %H:%M %Z')} -- {machine()}, torch {torch.__version__}, "
        f"{options.threads} threads per run; load average before: {load_average()}",
        flush=True,
    )
    results: dict[str, list[dict]] = {s: [] for s in options.systems}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fixture = build_vlm_fixture(root / "fixture", options)
        params = parameter_counts(fixture / "model")
        print(
            f"fixture: tiny LLaVA, hidden {options.hidden_size}, {options.layers} layers, image {options.image_size} px / "
            f"patch {options.patch_size}; language-model body {params['lm_body']:,} / vision tower {params['vision']:,} "
            f"parameters; {options.pairs} pairs, batch {options.batch_pairs}, {options.max_steps} steps",
            flush=True,
        )
        for repeat in range(options.repeats):
            order = options.systems if repeat % 2 == 0 else list(reversed(options.systems))
            for system in order:
                work = root / "work" / f"{system}-{repeat}"
                work.mkdir(parents=True)
                result = launch(system, fixture, work, options, script=script)
                result["load"] = load_average().split()[0]
                results[system].append(result)
                print(
                    f"  repeat {repeat + 1} {system:<12} wall {result['wall_s']:6.1f} s  "
                    f"first step {result['first_step_s']:5.1f} s  step {result['median_step_s']:5.2f} s  "
                    f"peak RSS {result['peak_rss'] / 2**20:5.0f} MiB  (load {result['load']})",
                    flush=True,
                )
    print_report(options, results, params)


def print_report(options: argparse.Namespace, results: dict[str, list[dict]], params: dict) -> None:
    from bench_train import load_average, medians, print_startup_table, ratio

    pairs = options.max_steps * options.batch_pairs
    print(f"\nMedians of {options.repeats} alternating runs; load average after: {load_average()}\n")
    print("| system | wall (s), per run | wall median (s) | step median (s) | peak RSS (MiB) | vs TRL: wall / step |")
    print("|---|---|---|---|---|---|")
    med = {s: medians(runs) for s, runs in results.items() if runs}
    for system, m in med.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in results[system])
        base = med.get("trl_default")
        versus = f"{ratio(base['wall_s'], m['wall_s'])} / {ratio(base['median_step_s'], m['median_step_s'])}" if base else "n/a"
        print(f"| {system} | {walls} | {m['wall_s']:.1f} | {m['median_step_s']:.2f} | {m['peak_rss'] / 2**20:.0f} | {versus} |")
    print_startup_table(med)
    print(f"\nWork per trained pair ({pairs} pairs), all forward passes, reference passes included:\n")
    print("| system | LM positions with grad | LM positions no grad | LM forward calls | images (vision tower) | est. GFLOP |")
    print("|---|---|---|---|---|---|")
    flops = {}
    for system, runs in results.items():
        if not runs:
            continue
        work, gc = runs[0]["work"], runs[0].get("gradient_checkpointing", False)
        flops[system] = estimated_flops(work, params, gc) / pairs
        print(
            f"| {system} | {work['lm_grad'] / pairs:.0f} | {work['lm_nograd'] / pairs:.0f} | {work['lm_calls']} | "
            f"{(work['vision_grad'] + work['vision_nograd']) / pairs:.1f} | {flops[system] / 1e9:.3f} |"
        )
    if "dpokit" in med and "trl_default" in med:
        wall = med["trl_default"]["wall_s"] / med["dpokit"]["wall_s"]
        step = med["trl_default"]["median_step_s"] / med["dpokit"]["median_step_s"]
        print(
            f"\nTRL / dpokit: wall {wall:.2f}x (target 2x: {'met' if wall >= 2 else 'MISSED'}), step {step:.2f}x, "
            f"estimated FLOPs {flops['trl_default'] / flops['dpokit']:.2f}x "
            f"(dpokit layout {results['dpokit'][0].get('layout')}, reference "
            f"{'live' if results['dpokit'][0]['reference_live'] else 'precomputed'}; TRL gradient checkpointing "
            f"{results['trl_default'][0].get('gradient_checkpointing')})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=SYSTEMS)
    parser.add_argument("--fixture")
    parser.add_argument("--work")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-pairs", type=int, default=BATCH_PAIRS)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--patch-size", type=int, default=6)
    options = parser.parse_args()
    if options.worker:
        worker(options)
    else:
        parent(options)


if __name__ == "__main__":
    main()
