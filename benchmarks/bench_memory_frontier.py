"""The memory frontier: the longest preference pair (prompt + chosen + rejected tokens) whose DPO training
step completes within a fixed memory cap, dpokit vs TRL 1.16, on the same model and data, at batch 1.

Tools (each attempt is a fresh child process; the parent polls its RSS, children included, every 0.1 s
and kills it above ``--cap-gib``, default 4 GiB -- the watchdog of ``bench_scaling.py``):

* ``dpokit``         -- ``dpokit.training.run`` with its defaults (``data.layout: auto``, ``reference.strategy:
                        auto``, and whatever the checkpointing default decides);
* ``dpokit_gc``      -- the same with ``model.gradient_checkpointing=true``;
* ``trl_default``    -- ``DPOTrainer`` with ``DPOConfig`` defaults (gradient checkpointing on, a live reference
                        copy), float32 (``bf16=False``, so both tools train in the same precision);
* ``trl_memory``     -- TRL's memory options that exist in 1.16 on top: ``precompute_ref_log_probs=True``
                        (no reference model during training). ``padding_free=True`` is accepted by 1.16 but
                        warns and falls back to padding ("temporarily unavailable"), and 1.16 has no
                        ``use_logits_to_keep``; gradient checkpointing is already its default.

The model is the one of ``benchmarks/fixtures.py`` (Llama, hidden 256, 4 layers, float32, random init,
seed 0) with a 32,000-entry vocabulary and ``--max-length`` positions, the same weights at every length,
and the 4,096-token fixture tokenizer. A pair of L tokens is a prompt of L/4 and two responses of 3L/8
(``bench_scaling.py``'s shape); both tools get ``max_length`` = 5L/8 per sequence, so neither truncates.
Each attempt trains 2 optimizer steps on 2 identical-length pairs, 2 threads; the second step is timed.

The search doubles L from ``--start`` while the step fits (up to ``--max-length``), then bisects
``--refine`` times between the last length that fit and the first that did not (lengths are multiples
of 256). An attempt that runs past ``--attempt-timeout`` seconds ends the search for that tool ("timed
out", not a memory failure). Reported per tool: the longest pair that fit, the whole-process RSS peak
there, step 2's time per token there, and the first length that did not fit and why.

    python benchmarks/bench_memory_frontier.py                       # cap 4 GiB, all four tools
    python benchmarks/bench_memory_frontier.py --quick               # cap 1.5 GiB, 2 tools, small lengths
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_scaling import StepMemory, exact_text, watch  # noqa: E402

TOOLS = ("dpokit", "dpokit_gc", "trl_default", "trl_memory")
NAMES = {
    "dpokit": "dpokit defaults (auto)",
    "dpokit_gc": "dpokit + gradient checkpointing",
    "trl_default": "TRL 1.16 defaults",
    "trl_memory": "TRL 1.16 + precompute_ref_log_probs",
}
STEPS = 2
PAIRS = 2
LR = 1e-6
BETA = 0.1
VOCAB = 32000
GRAIN = 256


def build_model(root: Path, max_positions: int) -> Path:
    """The fixture Llama (vocabulary 32,000, ``max_positions`` positions) and tokenizer in ``root``."""
    import torch
    from transformers import LlamaForCausalLM

    import fixtures

    torch.manual_seed(0)
    model = LlamaForCausalLM(fixtures.llama_config(VOCAB, max_positions=max_positions, attn_implementation="sdpa"))
    model.save_pretrained(root)
    fixtures.train_bpe_tokenizer(4096).save_pretrained(root)
    return root


def write_pairs(path: Path, tokenizer, length: int) -> Path:
    """``PAIRS`` rows of exactly ``length`` tokens (prompt L/4, responses 3L/8 each with their EOS)."""
    import random

    rng = random.Random(0)
    prompt, response = length // 4, 3 * length // 8
    rows = [
        {
            "prompt": exact_text(tokenizer, rng, prompt),
            "chosen": " " + exact_text(tokenizer, rng, response - 1),
            "rejected": " " + exact_text(tokenizer, rng, response - 1),
        }
        for _ in range(PAIRS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Worker: one tool, one length, in its own process.
# ------------------------------------------------------------------------------------------------


def run_dpokit(model: Path, pairs: Path, work: Path, length: int, tool: str, on_step) -> None:
    from dpokit.config import load_config
    from dpokit.training import run

    overrides = [
        f"model.name_or_path={model}",
        "model.device=cpu",
        f"data.train_path={pairs}",
        f"data.cache_dir={work / 'cache'}",
        f"data.max_length={5 * length // 8}",
        f"data.max_prompt_length={length // 4}",
        f"logging.run_dir={work / 'run'}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        f"optim.lr={LR}",
        "optim.batch_size=1",
        "optim.grad_accumulation=1",
        f"optim.max_steps={STEPS}",
        f"loss.beta={BETA}",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
    ]
    if tool == "dpokit_gc":
        overrides.append("model.gradient_checkpointing=true")
    run(load_config(None, overrides), on_step=lambda step, metrics: on_step(step))


def run_trl(model: Path, pairs: Path, work: Path, length: int, tool: str, on_step) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on_step(state.global_step)

    memory = tool == "trl_memory"
    args = DPOConfig(
        output_dir=str(work / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=LR,
        beta=BETA,
        max_length=5 * length // 8,
        precompute_ref_log_probs=memory,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        ref_model=None if memory else AutoModelForCausalLM.from_pretrained(model),
        args=args,
        train_dataset=datasets.load_dataset("json", data_files=str(pairs), split="train", cache_dir=str(work / "hf")),
        processing_class=AutoTokenizer.from_pretrained(model),
        callbacks=[Clock()],
    )
    trainer.train()


def worker(options) -> None:
    import logging
    import warnings

    import torch

    signal.alarm(options.attempt_timeout)  # SIGALRM's default action ends the process: the parent reads "timed out"
    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    memory = StepMemory()
    with tempfile.TemporaryDirectory() as tmp:
        runner = run_dpokit if options.worker.startswith("dpokit") else run_trl
        runner(Path(options.model), Path(options.pairs), Path(tmp), options.length, options.worker, memory)
    step_s = memory.times[1] - memory.times[0]
    result = {"process_peak": memory.process_peak, "step_s": step_s, "s_per_token": step_s / options.length}
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent: the search per tool, the table.
# ------------------------------------------------------------------------------------------------


def attempt(tool: str, model: Path, pairs: Path, length: int, options) -> dict:
    """One child process for (tool, length) under the memory watchdog and the attempt time-out."""
    command = [sys.executable, __file__, "--worker", tool, "--model", str(model), "--pairs", str(pairs)]
    command += ["--length", str(length), "--threads", str(options.threads)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(options.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    command += ["--attempt-timeout", str(options.attempt_timeout)]
    code, output, largest, killed = watch(command, env, int(options.cap_gib * 2**30))
    wall = time.perf_counter() - start
    if killed:
        return {"fits": False, "why": f"killed above {options.cap_gib:g} GiB", "largest_rss": largest, "wall_s": wall}
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if code == -signal.SIGALRM:
        return {"fits": False, "why": f"timed out after {options.attempt_timeout} s", "timed_out": True, "wall_s": wall}
    if code != 0 or not lines:
        last = output.strip().splitlines()[-1:] or ["no output"]
        why = "out of memory" if "MemoryError" in output or code in (-9, 137) else f"exit {code}: {last[0][:200]}"
        return {"fits": False, "why": why, "largest_rss": largest, "wall_s": wall}
    return {"fits": True, "largest_rss": largest, "wall_s": wall, **json.loads(lines[-1][len("RESULT ") :])}


def search(tool: str, model: Path, pairs_for, options) -> dict[int, dict]:
    """Double from ``--start`` while the step fits, then bisect ``--refine`` times; {length: result}."""
    tried: dict[int, dict] = {}

    def run_one(length: int) -> dict:
        result = attempt(tool, model, pairs_for(length), length, options)
        tried[length] = result
        print(f"  {NAMES[tool]:<38} L={length:>6}  {describe(result)}  (load {os.getloadavg()[0]:.2f})", flush=True)
        return result

    length = options.start
    while length <= options.max_length:
        result = run_one(length)
        if not result["fits"]:
            break
        length *= 2
    fits = [n for n, r in tried.items() if r["fits"]]
    fails = [n for n, r in tried.items() if not r["fits"] and not r.get("timed_out")]
    low, high = (max(fits) if fits else 0), (min(fails) if fails else None)
    for _ in range(options.refine):
        if high is None or high - low <= GRAIN:
            break
        middle = (low + high) // 2 // GRAIN * GRAIN
        if middle in (low, high) or middle == 0:
            break
        result = run_one(middle)
        if result.get("timed_out"):
            break
        low, high = (middle, high) if result["fits"] else (low, middle)
    return tried


def describe(result: dict) -> str:
    if not result["fits"]:
        return f"does not fit ({result['why']}; largest RSS seen {result.get('largest_rss', 0) / 2**30:.2f} GiB)"
    return (
        f"fits: process peak {result['process_peak'] / 2**30:.2f} GiB, step {result['step_s']:.2f} s, "
        f"{result['s_per_token'] * 1e3:.3f} ms/token"
    )


def frontier(tried: dict[int, dict]) -> dict:
    """The longest length that fit (with its result) and the shortest that did not."""
    fits = {n: r for n, r in tried.items() if r["fits"]}
    longest = max(fits) if fits else None
    beyond = [n for n, r in tried.items() if not r["fits"] and (longest is None or n > longest)]
    first_fail = min(beyond) if beyond else None
    return {
        "longest": longest,
        "result": fits.get(longest) if longest else None,
        "first_fail": first_fail,
        "why": tried[first_fail]["why"] if first_fail else None,
    }


def print_table(options, results: dict) -> None:
    print(f"\nLongest pair whose training step fits in {options.cap_gib:g} GiB (process RSS), batch 1, float32\n")
    print("| tool | longest pair (tokens) | process peak there | step time per token there | first that did not fit |")
    print("|---|---|---|---|---|")
    for tool, found in results.items():
        f = frontier(found)
        if f["longest"] is None:
            print(f"| {NAMES[tool]} | none from {options.start:,} | - | - | {options.start:,}: {f['why']} |")
            continue
        r = f["result"]
        beyond = f"{f['first_fail']:,}: {f['why']}" if f["first_fail"] else f"none up to {options.max_length:,} tried"
        print(
            f"| {NAMES[tool]} | {f['longest']:,} | {r['process_peak'] / 2**30:.2f} GiB | "
            f"{r['s_per_token'] * 1e3:.3f} ms | {beyond} |"
        )
    print_verdict(results)


def print_verdict(results: dict) -> None:
    """dpokit's defaults against the best TRL configuration: the length ratio and the time per token."""
    ours = frontier(results["dpokit"]) if "dpokit" in results else None
    trls = [frontier(results[t]) for t in ("trl_default", "trl_memory") if t in results]
    trls = [f for f in trls if f["longest"]]
    if not ours or not ours["longest"] or not trls:
        return
    best = max(trls, key=lambda f: f["longest"])
    ratio = ours["longest"] / best["longest"]
    mine, theirs = ours["result"]["s_per_token"], best["result"]["s_per_token"]
    print(
        f"\ndpokit defaults: {ratio:.2f}x the longest TRL pair ({ours['longest']:,} vs {best['longest']:,} tokens), "
        f"{mine * 1e3:.3f} vs {theirs * 1e3:.3f} ms per token at those lengths (target: >= 2x at <= TRL's time per token: "
        f"{'met' if ratio >= 2 and mine <= theirs else 'not met'})"
    )
    same = results["dpokit"].get(best["longest"])
    if same and same["fits"]:
        print(f"at TRL's longest ({best['longest']:,} tokens) dpokit takes {same['s_per_token'] * 1e3:.3f} ms per token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=TOOLS)
    parser.add_argument("--model")
    parser.add_argument("--pairs")
    parser.add_argument("--length", type=int)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--cap-gib", type=float, default=4.0, help="kill an attempt whose RSS passes this")
    parser.add_argument("--start", type=int, default=2048, help="first length tried (tokens per pair, a multiple of 256)")
    parser.add_argument("--max-length", type=int, default=65536, help="longest length tried")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the doubling")
    parser.add_argument("--attempt-timeout", type=int, default=1200, help="seconds one attempt may take")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="cap 1.5 GiB, lengths 512..2,048, dpokit vs TRL defaults")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return
    if options.quick:
        options.cap_gib, options.start, options.max_length, options.refine = 1.5, 512, 2048, 0
        options.tools = ["dpokit", "trl_default"]
    if options.start % GRAIN or options.start < GRAIN:
        parser.error(f"--start must be a positive multiple of {GRAIN}")
    print(
        f"# Memory frontier -- {time.strftime('%Y-%m-%d %H:%M %Z')}; cap {options.cap_gib:g} GiB; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoTokenizer

        model = build_model(Path(tmp) / "model", max_positions=options.max_length)
        tokenizer = AutoTokenizer.from_pretrained(model)
        files: dict[int, Path] = {}

        def pairs_for(length: int) -> Path:
            if length not in files:
                files[length] = write_pairs(Path(tmp) / f"pairs-{length}.jsonl", tokenizer, length)
            return files[length]

        for tool in options.tools:
            results[tool] = search(tool, model, pairs_for, options)
    print_table(options, results)
    if options.json:
        Path(options.json).write_text(json.dumps({"options": vars(options), "results": results}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
