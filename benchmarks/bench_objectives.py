"""Per-step cost of the reference-free and unpaired objectives against DPO, on the benchmark fixture.

The fixture of ``benchmarks/bench_train.py`` (a 4-layer Llama-architecture model from config, the
4,096-token BPE tokenizer, prompts ~95 tokens, responses ~60-160; here ``--pairs`` of them, default 128),
trained by ``dpokit.training.run`` with batch 8, AdamW and one thread, with each objective:

* ``sigmoid`` -- DPO, with the reference log-probs precomputed before training (``reference.strategy=precomputed``);
* ``orpo``    -- ORPO, no reference (``reference.strategy=none``);
* ``simpo``   -- SimPO, no reference;
* ``kto``     -- KTO on the same pairs read as unpaired (each pair becomes a desirable and an undesirable
                 example, so a batch of 8 holds 8 single completions, not 8 pairs), with a live
                 reference copy (its KL reference point comes from mismatched prompt/completion pairs
                 of each batch, so it cannot be precomputed).

Each objective runs in a fresh subprocess, the objectives alternated, ``--repeats`` times; the figure
is the median optimizer-step time (the first ``WARMUP_STEPS`` steps left out) over all repeats, and its
ratio to DPO's. Data preparation and DPO's reference precomputation are outside the step time.

    python benchmarks/bench_objectives.py                      # 3 repeats, ~5 minutes on 2 cores
    python benchmarks/bench_objectives.py --repeats 1 --objectives sigmoid kto
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

OBJECTIVES = ("sigmoid", "orpo", "simpo", "kto")
LABELS = {"sigmoid": "DPO (sigmoid, precomputed reference)", "orpo": "ORPO", "simpo": "SimPO", "kto": "KTO (unpaired)"}
REFERENCE = {"sigmoid": "precomputed", "orpo": "none", "simpo": "none", "kto": "auto"}
BETA = {"sigmoid": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
WARMUP_STEPS = 2
BATCH = 8


def overrides(objective: str, fixture: Path, work: Path, max_steps: int) -> list[str]:
    """``dpokit train`` overrides for one objective on the fixture (bench_train.py's settings otherwise)."""
    return [
        f"model.name_or_path={fixture / 'model'}",
        "model.device=cpu",
        f"data.train_path={fixture / 'pairs.jsonl'}",
        f"data.cache_dir={work / 'cache'}",
        "data.max_length=1024",
        "data.max_prompt_length=512",
        f"logging.run_dir={work / 'run'}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "logging.log_every=1000000",
        "optim.optimizer=adamw",
        "optim.lr=1e-6",
        "optim.warmup_steps=0",
        f"optim.batch_size={BATCH}",
        "optim.grad_accumulation=1",
        "optim.max_grad_norm=1.0",
        "optim.epochs=1",
        f"optim.max_steps={max_steps}",
        f"loss.beta={BETA[objective]}",
        f"loss.terms=[{{name: {objective}}}]",
        f"reference.strategy={REFERENCE[objective]}",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
    ]


def worker(objective: str, fixture: Path, threads: int, max_steps: int) -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from dpokit.config import load_config
    from dpokit.training import run

    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, overrides(objective, fixture, Path(tmp), max_steps))
        run(cfg, on_step=lambda step, metrics: times.append(time.perf_counter()))
    steps = [b - a for a, b in itertools.pairwise(times)][WARMUP_STEPS - 1 :]
    print("RESULT " + json.dumps({"objective": objective, "steps": len(times), "step_s": steps}), flush=True)


def launch(objective: str, fixture: Path, threads: int, max_steps: int) -> list[float]:
    command = [sys.executable, __file__, "--worker", objective, "--fixture", str(fixture)]
    command += ["--threads", str(threads), "--max-steps", str(max_steps)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{objective} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    step_s: list[float] = json.loads(lines[-1][len("RESULT ") :])["step_s"]
    return step_s


def parent(options: argparse.Namespace) -> None:
    import dataclasses

    from bench_train import build_fixture, load_average, machine
    from fixtures import FIXTURES

    steps: dict[str, list[float]] = {o: [] for o in options.objectives}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fixture = build_fixture(Path(tmp), dataclasses.replace(FIXTURES["short"], pairs=options.pairs))
        for repeat in range(options.repeats):
            for objective in options.objectives:
                times = launch(objective, fixture, options.threads, options.max_steps)
                steps[objective] += times
                print(f"repeat {repeat + 1} {objective:8s} median step {statistics.median(times):.3f} s", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}, {options.threads} torch thread(s), load average {load_average()}")
    print(f"fixture: {options.pairs} pairs, batch {BATCH}, {options.max_steps} steps per run, {options.repeats} repeats\n")
    dpo = statistics.median(steps["sigmoid"]) if steps.get("sigmoid") else None
    print("| objective | reference | median step (s) | vs DPO |")
    print("|---|---|---|---|")
    for objective, values in steps.items():
        median = statistics.median(values)
        ratio = f"{median / dpo:.2f}x" if dpo else "–"
        print(f"| {LABELS[objective]} | {REFERENCE[objective]} | {median:.3f} | {ratio} |")
    print(f"\ntotal {time.time() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=OBJECTIVES)
    parser.add_argument("--fixture")
    options = parser.parse_args()
    if options.worker:
        worker(options.worker, Path(options.fixture), options.threads, options.max_steps)
    else:
        parent(options)


if __name__ == "__main__":
    main()
