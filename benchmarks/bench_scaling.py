"""How one DPO training step's cost grows: dpokit defaults vs TRL 1.16 defaults, vs sequence length and
vs vocabulary, on this machine's memory. The tools include ``dpokit_shared`` (``data.layout=shared_prompt``:
one ``[prompt | chosen | rejected]`` row per pair under a dense (rows, 1, T, T) mask) and ``dpokit_padded``
(``data.layout=padded``: one row per response, SDPA's causal kernel, no mask) to tell the layout's share
of the cost from the step's; ``data.layout: auto`` picks between the two.

Each point is one fresh process per tool that trains ``STEPS`` optimizer steps on ``--batch-pairs``
(default 1) identical-length pairs (the model of ``benchmarks/fixtures.py``: Llama, hidden 256, 4 layers, float32,
random init, with the point's vocabulary and 8,192 positions; the 4,096-token fixture tokenizer, so only
the output layer's size changes with the vocabulary). A pair of L tokens is a prompt of L/4 tokens and
two responses of 3L/8 each (prompt + chosen + rejected = L); both tools get ``max_length`` = 5L/8 per
sequence, so neither truncates. Step 1 is the warm-up; after it glibc's cached free memory is given
back (``malloc_trim``), the process's RSS is the idle baseline and the kernel's high-water mark is reset
(``/proc/self/clear_refs``), so

* ``step peak`` = the RSS high-water mark during step 2 above the idle baseline (activations, logits,
  gradients' transients);
* ``process peak`` = the whole process's high-water mark (weights, optimizer state, reference, data);
* ``tokens/s`` = batch-pairs x L / the time of step 2.

The parent polls each child's RSS (psutil, every 0.1 s) and kills it above ``--limit-gib`` (default 22;
use less while other work shares the machine): that point "does not fit".

    python benchmarks/bench_scaling.py                              # lengths 512..8k at vocab 32k, vocab 4k..256k at 1k
    python benchmarks/bench_scaling.py --lengths 512 1024 --vocabs 4096 --limit-gib 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TOOLS = ("dpokit", "dpokit_shared", "dpokit_padded", "trl_default")
NAMES = {
    "dpokit": "dpokit defaults",
    "dpokit_shared": "dpokit, data.layout=shared_prompt",
    "dpokit_padded": "dpokit, data.layout=padded",
    "trl_default": "TRL 1.16 defaults",
}
STEPS = 2
LR = 1e-6
BETA = 0.1
MAX_POSITIONS = 8192


def exact_text(tokenizer, rng, tokens: int) -> str:
    """English-like text of (about) exactly ``tokens`` tokens: generated long, cut in token ids, decoded."""
    import fixtures

    ids = tokenizer(fixtures.english_like_words(rng, tokens), add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def build_point(root: Path, *, length: int, vocab: int, pairs: int) -> Path:
    """Model of ``vocab`` outputs + tokenizer in ``root/model``, ``pairs`` rows of ``length`` tokens."""
    import random

    import torch
    from transformers import LlamaForCausalLM

    import fixtures

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = fixtures.train_bpe_tokenizer(4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(fixtures.llama_config(vocab, max_positions=MAX_POSITIONS, attn_implementation="sdpa"))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    prompt, response = length // 4, 3 * length // 8
    rows = [
        {
            "prompt": exact_text(tokenizer, rng, prompt),
            "chosen": " " + exact_text(tokenizer, rng, response - 1),  # + EOS
            "rejected": " " + exact_text(tokenizer, rng, response - 1),
        }
        for _ in range(pairs)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------------
# Worker: one tool, one point.
# ------------------------------------------------------------------------------------------------


def rss_and_peak() -> tuple[int, int]:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _unit = line.split()
                values[key[:-1]] = int(amount) * 1024
    return values["VmRSS"], values["VmHWM"]


def release_free_heap() -> None:
    """Give glibc's cached free memory back to the system (``malloc_trim(0)``; a no-op elsewhere), so
    RSS after step 1 counts live allocations and step 2's high-water mark above it is that step's own
    peak, not what happens to exceed the memory step 1 left cached."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


class StepMemory:
    """After step 1: idle baseline, high-water mark reset. After step 2: the step's peak and time."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.baseline = 0
        self.process_peak = 0
        self.step_peak = 0

    def __call__(self, step: int) -> None:
        self.times.append(time.perf_counter())
        rss, peak = rss_and_peak()
        self.process_peak = max(self.process_peak, peak)
        if step == 1:
            release_free_heap()  # so the baseline is what the idle trainer holds, not what malloc keeps cached
            rss, _peak = rss_and_peak()
            self.baseline = rss
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        elif step == 2:
            self.step_peak = peak - self.baseline


def run_dpokit(point: Path, work: Path, options, on_step) -> None:
    from dpokit.config import load_config
    from dpokit.training import run

    overrides = [
        f"model.name_or_path={point / 'model'}",
        "model.device=cpu",
        f"data.train_path={point / 'pairs.jsonl'}",
        f"data.cache_dir={work / 'cache'}",
        f"data.max_length={5 * options.length // 8}",
        f"data.max_prompt_length={options.length // 4}",
        f"logging.run_dir={work / 'run'}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        f"optim.lr={LR}",
        f"optim.batch_size={options.batch_pairs}",
        f"optim.max_steps={STEPS}",
        f"loss.beta={BETA}",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
    ]
    if options.worker == "dpokit_padded":  # one row per response: causal attention without a mask
        overrides.append("data.layout=padded")
    if options.worker == "dpokit_shared":  # one row per pair: a dense (rows, 1, T, T) mask
        overrides.append("data.layout=shared_prompt")
    run(load_config(None, overrides), on_step=lambda step, metrics: on_step(step))


def run_trl(point: Path, work: Path, options, on_step) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on_step(state.global_step)

    args = DPOConfig(
        output_dir=str(work / "trl"),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=options.batch_pairs,
        max_steps=STEPS,
        learning_rate=LR,
        beta=BETA,
        max_length=5 * options.length // 8,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(point / "model"),
        ref_model=AutoModelForCausalLM.from_pretrained(point / "model"),
        args=args,
        train_dataset=datasets.load_dataset(
            "json", data_files=str(point / "pairs.jsonl"), split="train", cache_dir=str(work / "hf")
        ),
        processing_class=AutoTokenizer.from_pretrained(point / "model"),
        callbacks=[Clock()],
    )
    trainer.train()


def worker(options) -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    memory = StepMemory()
    with tempfile.TemporaryDirectory() as tmp:
        runner = run_dpokit if options.worker.startswith("dpokit") else run_trl
        runner(Path(options.point), Path(tmp), options, memory)
    step_s = memory.times[1] - memory.times[0]
    result = {
        "step_peak": memory.step_peak,
        "process_peak": memory.process_peak,
        "step_s": step_s,
        "tokens_per_s": options.batch_pairs * options.length / step_s,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent: points, watchdog, table, plot.
# ------------------------------------------------------------------------------------------------


def watch(command: list[str], env: dict, limit: int) -> tuple[int, str, int, bool]:
    """Run ``command``; kill it when its RSS (with children) passes ``limit`` bytes.
    Returns (exit code, stdout, the largest RSS seen, killed)."""
    import psutil

    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        handle, largest, killed = psutil.Process(child.pid), 0, False
        while child.poll() is None:
            try:
                rss = handle.memory_info().rss + sum(c.memory_info().rss for c in handle.children(recursive=True))
            except psutil.Error:
                rss = 0
            largest = max(largest, rss)
            if rss > limit:
                child.kill()
                killed = True
                break
            time.sleep(0.1)
        code = child.wait()
        out.seek(0)
        return code, out.read(), largest, killed


def measure(tool: str, point: Path, length: int, options) -> dict:
    command = [sys.executable, __file__, "--worker", tool, "--point", str(point), "--length", str(length)]
    command += ["--threads", str(options.threads), "--batch-pairs", str(options.batch_pairs)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(options.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    code, output, largest, killed = watch(command, env, int(options.limit_gib * 2**30))
    if killed:
        return {"fits": False, "why": f"killed above {options.limit_gib:g} GiB", "largest_rss": largest}
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not lines:
        last = output.strip().splitlines()[-1:] or ["no output"]
        why = "out of memory" if "MemoryError" in output or code == -9 else f"exit {code}: {last[0][:200]}"
        return {"fits": False, "why": why, "largest_rss": largest}
    return {"fits": True, **json.loads(lines[-1][len("RESULT ") :])}


def sweep(options) -> dict:
    points = [("length", length, 32000) for length in options.lengths]
    points += [("vocab", options.vocab_length, vocab) for vocab in options.vocabs]
    results: dict = {"length": {}, "vocab": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for axis, length, vocab in points:
            if axis == "vocab" and vocab == 32000 and length in results["length"]:
                results[axis][vocab] = results["length"][length]  # the same point, measured once
                continue
            point = build_point(Path(tmp) / f"{length}-{vocab}", length=length, vocab=vocab, pairs=options.batch_pairs * STEPS)
            key = length if axis == "length" else vocab
            results[axis][key] = {}
            for tool in options.tools:
                result = measure(tool, point, length, options)
                results[axis][key][tool] = result
                print(
                    f"  {axis} point L={length} V={vocab} {tool:<12} {describe(result)} (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    return results


def describe(result: dict) -> str:
    if not result["fits"]:
        return f"does not fit ({result['why']})"
    return (
        f"step peak {result['step_peak'] / 2**20:6.0f} MiB, process peak {result['process_peak'] / 2**20:6.0f} MiB, "
        f"{result['tokens_per_s']:7.0f} tokens/s"
    )


def cell(result: dict | None) -> str:
    if result is None:
        return "n/a"
    if not result["fits"]:
        return "does not fit"
    return f"{result['step_peak'] / 2**20:.0f} / {result['process_peak'] / 2**20:.0f} / {result['tokens_per_s']:.0f}"


def print_tables(options, results: dict) -> None:
    print(
        f"\nStep peak above idle / whole-process peak (MiB) / tokens per s; batch {options.batch_pairs} pairs, "
        f"limit {options.limit_gib:g} GiB\n"
    )
    for axis, label in (
        ("length", "tokens per pair (vocab 32,000)"),
        ("vocab", f"vocabulary ({options.vocab_length} tokens per pair)"),
    ):
        print("| " + label + " | " + " | ".join(NAMES[t] for t in options.tools) + " | step peak dpokit / TRL |")
        print("|---|" + "---|" * (len(options.tools) + 1))
        for key, by_tool in results[axis].items():
            both = [by_tool.get(t) for t in ("dpokit", "trl_default")]
            ratio = f"{both[0]['step_peak'] / both[1]['step_peak']:.2f}x" if all(r and r["fits"] for r in both) else "-"
            print(f"| {key:,} | " + " | ".join(cell(by_tool.get(t)) for t in options.tools) + f" | {ratio} |")
        print()
    print_growth(results)


def print_growth(results: dict) -> None:
    """Step peak per extra token (length axis) and per extra vocabulary entry (vocab axis), dpokit."""
    lengths = [(k, v["dpokit"]) for k, v in results["length"].items() if v.get("dpokit", {}).get("fits")]
    if len(lengths) >= 2:
        slopes = [
            (b[1]["step_peak"] - a[1]["step_peak"]) / (b[0] - a[0]) / 1024 for a, b in zip(lengths, lengths[1:], strict=False)
        ]
        print(
            "dpokit step peak per extra token of a pair, between successive lengths (KiB): "
            + ", ".join(f"{s:.0f}" for s in slopes)
        )
    vocabs = [(k, v["dpokit"]) for k, v in results["vocab"].items() if v.get("dpokit", {}).get("fits")]
    if len(vocabs) >= 2:
        (v0, r0), (v1, r1) = vocabs[0], vocabs[-1]
        growth = (r1["step_peak"] - r0["step_peak"]) / 2**20
        weight = (v1 - v0) * 256 * 4 / 2**20  # one float32 output-layer weight (hidden 256) per extra entry
        print(
            f"dpokit step peak from vocab {v0:,} to {v1:,}: {growth:+.0f} MiB; one float32 copy of the extra output-layer "
            f"weights is {weight:.0f} MiB (the weight gradient)"
        )


def plot(options, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for number, tool in enumerate(options.tools):
        style = {"fmt": ("o-", "^:", "d-.", "s--")[number % 4], "color": f"C{number}"}  # one colour per tool on every panel
        for index, axis in enumerate(("length", "vocab")):
            keys = [k for k, v in results[axis].items() if v.get(tool, {}).get("fits")]
            axes[index].plot(
                keys,
                [results[axis][k][tool]["step_peak"] / 2**30 for k in keys],
                style["fmt"],
                color=style["color"],
                label=f"{NAMES[tool]}, step",
            )
            axes[index].plot(
                keys,
                [results[axis][k][tool]["process_peak"] / 2**30 for k in keys],
                style["fmt"],
                color=style["color"],
                alpha=0.35,
                label=f"{NAMES[tool]}, process",
            )
        keys = [k for k, v in results["length"].items() if v.get(tool, {}).get("fits")]
        axes[2].plot(
            keys,
            [results["length"][k][tool]["tokens_per_s"] for k in keys],
            style["fmt"],
            color=style["color"],
            label=NAMES[tool],
        )
    for ax, xlabel, ylabel in zip(
        axes,
        (
            "tokens per pair (vocab 32,000)",
            f"vocabulary ({options.vocab_length} tokens per pair)",
            "tokens per pair (vocab 32,000)",
        ),
        ("peak memory (GiB)", "peak memory (GiB)", "tokens / s (one step)"),
        strict=True,
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].axhline(options.limit_gib, color="grey", linewidth=0.8)
    axes[1].axhline(options.limit_gib, color="grey", linewidth=0.8)
    figure.suptitle(
        f"One DPO step, batch {options.batch_pairs} pairs, float32 CPU; missing points did not fit in {options.limit_gib:g} GiB"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=TOOLS)
    parser.add_argument("--point")
    parser.add_argument("--length", type=int)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=["dpokit", "dpokit_shared", "trl_default"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[4096, 32000, 128000, 256000])
    parser.add_argument("--vocab-length", type=int, default=1024, help="tokens per pair on the vocabulary axis")
    parser.add_argument("--batch-pairs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-gib", type=float, default=22.0, help="kill a point's process above this RSS")
    parser.add_argument("--plot", default=str(HERE.parent / "docs" / "scaling.png"), help="'' for no plot")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return
    print(f"# Scaling benchmark -- {time.strftime('%Y-%m-%d %H:%M %Z')}; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = sweep(options)
    print_tables(options, results)
    if options.json:
        Path(options.json).write_text(json.dumps({"options": vars(options), "results": results}, indent=1), encoding="utf-8")
    if options.plot:
        plot(options, results, Path(options.plot))
        print(f"plot: {options.plot}")


if __name__ == "__main__":
    main()
