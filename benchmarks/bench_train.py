"""DPO training throughput and memory: dpokit vs TRL 1.16 ``DPOTrainer``, side by side on CPU.

Fixture (generated deterministically, see ``benchmarks/fixtures.py``): a Llama-architecture model
from config (hidden 256, intermediate 688, 4 layers, 4 heads, 2 KV heads, vocabulary 4,096, random
init, float32) saved with ``save_pretrained``, a 4,096-token byte-level BPE tokenizer trained on
English-like text, and 512 pairs (prompts ~95 tokens, responses ~60-160). Batch 8 pairs, sigmoid
loss, beta 0.1, AdamW lr 1e-6, gradient clipping 1.0, one epoch, 2 threads.

Systems, each run in a fresh subprocess (so peak RSS is its own), alternated, ``--repeats`` times:

* ``dpokit``       -- ``dpokit.training.run``: cold data cache, layout auto (shared prompt on SDPA),
                      precomputed reference log-probs (same layout), chunked output layer;
* ``dpokit_compile``-- the same with ``model.compile=true`` (decoder layers compiled; the compile
                      time is inside the epoch wall time);
* ``trl_default``  -- ``DPOTrainer`` with its defaults: a separate reference model, gradient
                      checkpointing on;
* ``trl_fast``     -- ``precompute_ref_log_probs=True``, gradient checkpointing off.

End-to-end wall time runs from loading the model and data (the file on disk) to the saved final
model: data preparation and reference log-probs included. Steady-state pairs/s excludes the first
``WARMUP_STEPS`` optimizer steps. Peak RSS is the process's high-water mark.

Model-FLOPs utilisation: useful work / time / measured matmul rate, where useful work
= 6 N (P + C + R) + 2 N (P + C + R) summed over pairs (N = parameters without the input embedding;
the prompt counted once; the policy trains on every token, the reference scores every token once),
and the matmul rate is float32 2048 x 2048 x 2048 matmuls on the same threads, timed between runs.

Memory fixture (``--memory``): vocabulary 32,000, prompt + response up to 1,024 tokens, batch 4
pairs; peak RSS of training steps 2-4 above the RSS between steps (the "idle" trainer), each
system's own configuration.

    python benchmarks/bench_train.py                  # full comparison (~15-25 min on 2 cores)
    python benchmarks/bench_train.py --repeats 1 --systems dpokit trl_fast
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SYSTEMS = ("dpokit", "dpokit_compile", "trl_default", "trl_fast")
WARMUP_STEPS = 3
BATCH_PAIRS = 8
LR = 1e-6
BETA = 0.1
MAX_LENGTH = 1024
MAX_PROMPT_LENGTH = 512


# ------------------------------------------------------------------------------------------------
# Fixture and measurements shared by parent and workers.
# ------------------------------------------------------------------------------------------------


def build_fixture(root: Path, *, pairs: int, vocab_size: int, prompt_tokens=(85, 105), response_tokens=(60, 160)) -> Path:
    """Model (random init, seed 0) + tokenizer saved in ``root/model``, pairs in ``root/pairs.jsonl``."""
    import torch
    from transformers import LlamaForCausalLM

    import fixtures

    tokenizer = fixtures.train_bpe_tokenizer(4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(fixtures.llama_config(vocab_size, attn_implementation="sdpa"))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = fixtures.generate_pairs(pairs, seed=0, prompt_tokens=prompt_tokens, response_tokens=response_tokens)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def matmul_flops_per_second(threads: int, size: int = 2048, repeats: int = 8) -> float:
    """float32 (size x size) @ (size x size) on ``threads`` threads: the median of ``repeats`` timings."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        timings.append(time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 2 * size**3 / statistics.median(timings)


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ``clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def rss_now_and_peak() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _unit = line.split()
                values[key[:-1]] = int(amount) * 1024
    return values["VmRSS"], values["VmHWM"]


# ------------------------------------------------------------------------------------------------
# Workers (one system per fresh process).
# ------------------------------------------------------------------------------------------------


class StepClock:
    """Per-optimizer-step timestamps, and step memory: after step ``memory_from`` the RSS is the
    idle baseline and the high-water mark is reset; afterwards the largest excess is kept."""

    def __init__(self, memory_from: int | None = None):
        self.times: list[float] = []
        self.memory_from = memory_from
        self.baseline = 0
        self.step_peak = 0

    def tick(self, step: int) -> None:
        self.times.append(time.perf_counter())
        if self.memory_from is None:
            return
        rss, peak = rss_now_and_peak()
        if step == self.memory_from:
            self.baseline = rss
            reset_peak_rss()
        elif step > self.memory_from:
            self.step_peak = max(self.step_peak, peak - self.baseline)


def run_dpokit(
    fixture: Path, work: Path, clock: StepClock, max_steps: int | None, batch_pairs: int, compile: bool = False
) -> None:
    from dpokit.config import load_config
    from dpokit.training import run

    overrides = [
        f"model.name_or_path={fixture / 'model'}",
        "model.device=cpu",
        f"data.train_path={fixture / 'pairs.jsonl'}",
        f"data.cache_dir={work / 'cache'}",
        f"data.max_length={MAX_LENGTH}",
        f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
        f"logging.run_dir={work / 'run'}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "logging.log_every=1000000",
        "optim.optimizer=adamw",
        f"optim.lr={LR}",
        "optim.warmup_steps=0",
        "optim.schedule=linear",
        f"optim.batch_size={batch_pairs}",
        "optim.grad_accumulation=1",
        "optim.max_grad_norm=1.0",
        "optim.epochs=1",
        f"loss.beta={BETA}",
        "reference.strategy=precomputed",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
    ]
    if max_steps:
        overrides.append(f"optim.max_steps={max_steps}")
    if compile:
        overrides.append("model.compile=true")
    cfg = load_config(None, overrides)
    run(cfg, on_step=lambda step, metrics: clock.tick(step))


def run_trl(fixture: Path, work: Path, clock: StepClock, max_steps: int | None, batch_pairs: int, fast: bool) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(state.global_step)

    tokenizer = AutoTokenizer.from_pretrained(fixture / "model")
    model = AutoModelForCausalLM.from_pretrained(fixture / "model")
    ref_model = None if fast else AutoModelForCausalLM.from_pretrained(fixture / "model")
    dataset = datasets.load_dataset("json", data_files=str(fixture / "pairs.jsonl"), split="train", cache_dir=str(work / "hf"))
    args = DPOConfig(
        output_dir=str(work / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=batch_pairs,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_steps=max_steps or -1,
        learning_rate=LR,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        max_grad_norm=1.0,
        warmup_steps=0,
        lr_scheduler_type="linear",
        logging_strategy="no",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        **({"precompute_ref_log_probs": True, "gradient_checkpointing": False} if fast else {}),
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()]
    )
    trainer.train()
    trainer.save_model(str(work / "trl" / "final"))


def worker(options: argparse.Namespace) -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    fixture = Path(options.fixture)
    clock = StepClock(memory_from=1 if options.memory else None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        if options.worker.startswith("dpokit"):
            run_dpokit(fixture, work, clock, options.max_steps, options.batch_pairs, compile=options.worker == "dpokit_compile")
        else:
            run_trl(fixture, work, clock, options.max_steps, options.batch_pairs, fast=options.worker == "trl_fast")
        wall = time.perf_counter() - start
    steady = clock.times[WARMUP_STEPS - 1 :] if len(clock.times) > WARMUP_STEPS + 1 else clock.times
    pairs_per_second = (len(steady) - 1) * options.batch_pairs / (steady[-1] - steady[0]) if len(steady) > 1 else float("nan")
    step_seconds = [b - a for a, b in itertools.pairwise(clock.times)]
    print(
        "RESULT "
        + json.dumps(
            {
                "system": options.worker,
                "wall_s": wall,
                "steps": len(clock.times),
                "pairs_per_s": pairs_per_second,
                "median_step_s": statistics.median(step_seconds) if step_seconds else float("nan"),
                "peak_rss": rss_now_and_peak()[1] if not options.memory else None,
                "step_peak_above_idle": clock.step_peak if options.memory else None,
                "first_step_at_s": clock.times[0] - start if clock.times else None,
            }
        ),
        flush=True,
    )


# ------------------------------------------------------------------------------------------------
# Parent: fixture, alternating runs, tables.
# ------------------------------------------------------------------------------------------------


def launch(
    system: str,
    fixture: Path,
    options: argparse.Namespace,
    *,
    memory: bool = False,
    max_steps: int | None = None,
    batch_pairs: int = BATCH_PAIRS,
) -> dict:
    import resource

    command = [
        sys.executable,
        __file__,
        "--worker",
        system,
        "--fixture",
        str(fixture),
        "--threads",
        str(options.threads),
        "--batch-pairs",
        str(batch_pairs),
    ]
    if memory:
        command.append("--memory")
    if max_steps:
        command += ["--max-steps", str(max_steps)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(options.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{system} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def useful_flops(fixture: Path) -> tuple[float, int, int]:
    """(6N + 2N) x tokens with the prompt counted once; returns (flops, N, tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.data import prepare_dataset

    tokenizer = AutoTokenizer.from_pretrained(fixture / "model")
    model = AutoModelForCausalLM.from_pretrained(fixture / "model")
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_dataset(
            fixture / "pairs.jsonl", tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, cache_dir=tmp
        )
        tokens = sum(len(item["prompt_ids"]) + sum(len(r) for r in item["response_ids"]) for item in data.items)
    return (6 + 2) * n_params * tokens, n_params, tokens


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def parent(options: argparse.Namespace) -> None:
    import torch

    print(
        f"# DPO training benchmark -- {time.strftime('%Y-%m-%d %H:%M %Z')} -- {machine()}, torch {torch.__version__}, "
        f"{options.threads} threads per run; load average before: {load_average()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fixture = build_fixture(root / "main", pairs=options.pairs, vocab_size=4096)
        flops, n_params, tokens = useful_flops(fixture)
        print(
            f"fixture: {options.pairs} pairs, {tokens:,} tokens (prompt once), N = {n_params:,} parameters without the "
            f"input embedding; useful work {flops / 1e12:.2f} TFLOP",
            flush=True,
        )
        results: dict[str, list[dict]] = {s: [] for s in options.systems}
        matmul_rates: list[float] = []
        loads: list[str] = []
        for repeat in range(options.repeats):
            order = options.systems if repeat % 2 == 0 else list(reversed(options.systems))
            for system in order:
                matmul_rates.append(matmul_flops_per_second(options.threads))
                try:
                    result = launch(system, fixture, options, max_steps=options.max_steps)
                except SystemExit as failure:  # report it, keep the other systems' numbers
                    print(f"  repeat {repeat + 1} {system}: FAILED\n{failure}", flush=True)
                    continue
                results[system].append(result)
                loads.append(load_average().split()[0])
                print(
                    f"  repeat {repeat + 1} {system:<12} wall {result['wall_s']:7.1f} s  "
                    f"steady {result['pairs_per_s']:5.2f} pairs/s  "
                    f"step {result['median_step_s']:.2f} s  peak RSS {result['peak_rss'] / 2**20:6.0f} MiB  "
                    f"(cpu {result['cpu_s']:.0f} s, load {loads[-1]})",
                    flush=True,
                )
        matmul_rates.append(matmul_flops_per_second(options.threads))
        matmul = statistics.median(matmul_rates)

        memory: dict[str, list[int]] = {}
        if options.memory:
            memory_fixture = build_fixture(
                root / "memory", pairs=4 * 4, vocab_size=32000, prompt_tokens=(200, 256), response_tokens=(600, 760)
            )
            for _repeat in range(max(1, options.memory_repeats)):
                for system in [s for s in ("dpokit", "trl_default") if s in options.systems]:
                    result = launch(system, memory_fixture, options, memory=True, max_steps=4, batch_pairs=4)
                    memory.setdefault(system, []).append(result["step_peak_above_idle"])
                    print(
                        f"  memory {system:<12} step peak above idle {result['step_peak_above_idle'] / 2**20:7.0f} MiB",
                        flush=True,
                    )

    print_tables(options, results, matmul, flops, memory, loads)


def print_tables(options, results, matmul, flops, memory, loads) -> None:
    med = {
        s: {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "pairs_per_s", "peak_rss", "median_step_s")}
        for s, runs in results.items()
        if runs
    }
    print()
    print(
        f"Medians of {options.repeats} alternating runs; matmul rate {matmul / 1e9:.1f} GFLOP/s "
        f"(float32 2048^3, {options.threads} threads); load average during runs {', '.join(loads)} (now {load_average()})"
    )
    print()
    baselines = [s for s in ("trl_default", "trl_fast") if s in med]
    header = (
        "| system | epoch wall (s) | steady pairs/s | step (s) | peak RSS (MiB) | MFU | "
        + " | ".join(f"wall / speed / RSS vs {b}" for b in baselines)
        + " |"
    )
    print(header)
    print("|" + "---|" * (6 + len(baselines)))
    names = {
        "dpokit": "dpokit (shared prompt, precomputed ref)",
        "dpokit_compile": "dpokit + model.compile",
        "trl_default": "TRL 1.16 defaults",
        "trl_fast": "TRL 1.16 precompute, no GC",
    }
    for system, m in med.items():
        mfu = flops / m["wall_s"] / matmul
        cells = [
            f"{names[system]}",
            f"{m['wall_s']:.1f}",
            f"{m['pairs_per_s']:.2f}",
            f"{m['median_step_s']:.2f}",
            f"{m['peak_rss'] / 2**20:.0f}",
            f"{mfu:.0%}",
        ]
        for b in baselines:
            cells.append(
                f"{med[b]['wall_s'] / m['wall_s']:.2f}x faster / {m['pairs_per_s'] / med[b]['pairs_per_s']:.2f}x / "
                f"{m['peak_rss'] / med[b]['peak_rss']:.2f}x"
            )
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        "MFU = (6N + 2N) x tokens (prompt once) / epoch wall time / matmul rate; epoch wall includes loading, data "
        "preparation, reference log-probs and saving."
    )
    if memory:
        print()
        print(
            "Large-vocabulary fixture (vocab 32,000, up to 1,024 tokens, batch 4 pairs): "
            "peak RSS of a training step above the idle trainer"
        )
        print()
        print("| system | step peak above idle (MiB) | vs TRL defaults |")
        print("|---|---|---|")
        trl = statistics.median(memory["trl_default"]) if "trl_default" in memory else None
        for system, values in memory.items():
            value = statistics.median(values)
            print(f"| {names[system]} | {value / 2**20:.0f} | {f'{value / trl:.2f}x' if trl else 'n/a'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=SYSTEMS)
    parser.add_argument("--fixture")
    parser.add_argument("--memory", action="store_true", help="worker: measure step memory; parent: run the 32k-vocab fixture")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.set_defaults(memory=None)
    parser.add_argument("--memory-repeats", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-pairs", type=int, default=BATCH_PAIRS)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    options = parser.parse_args()
    if options.worker:
        options.memory = bool(options.memory)
        worker(options)
    else:
        options.memory = True if options.memory is None else options.memory
        parent(options)


if __name__ == "__main__":
    main()
