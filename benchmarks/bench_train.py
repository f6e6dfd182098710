"""DPO training end to end: dpokit vs TRL 1.16 ``DPOTrainer``, side by side on CPU, on every fixture.

Fixtures (generated deterministically, see ``benchmarks/fixtures.py``; ``--fixtures`` chooses, and
``--pairs``, ``--prompt-tokens``, ``--response-tokens`` and ``--seed`` change the mix of all chosen):

* ``short``          -- 512 pairs, prompts ~95 tokens, responses 60-160 (the original fixture);
* ``response_heavy`` -- 256 pairs, prompts ~40 tokens, responses 150-350;
* ``conversational`` -- 256 pairs, 1-3 user turns rendered through a ChatML chat template (the same
                        message lists go to dpokit and to TRL), responses 60-200.

The model: Llama architecture from config (hidden 256, intermediate 688, 4 layers, 4 heads, 2 KV
heads, vocabulary 4,096, random init, float32), a 4,096-token byte-level BPE. Batch 8 pairs, sigmoid
loss, beta 0.1, AdamW lr 1e-6, clipping 1.0, one epoch, 2 threads, each tool's defaults otherwise.

Systems, each in a fresh subprocess, alternated, ``--repeats`` times, medians reported:

* ``dpokit``              -- ``dpokit.training.run`` with its defaults (``reference.strategy: auto``);
* ``dpokit_precomputed``  -- ``reference.strategy=precomputed``;
* ``dpokit_live``         -- ``reference.strategy=copy`` (the live reference: a frozen copy forwarded in
                             every step), to check that the precomputed pass is never the slower one;
* ``dpokit_compile``      -- ``model.compile=true``, empty caches (first run: compile time included);
* ``dpokit_compile_warm`` -- the same with the compile cache (``<data.cache_dir>/compile``) left by the
                             previous ``dpokit_compile`` run of that fixture copied in (data cache cold);
                             skipped, and said so, when dpokit left no such cache;
* ``trl_default``         -- ``DPOTrainer`` defaults: a reference copy, gradient checkpointing;
* ``trl_fast``            -- ``precompute_ref_log_probs=True``, gradient checkpointing off.

Measured per run: wall time of the whole process (spawn to exit: interpreter, imports, loading,
tokenizing, reference pass, training, saving), time to the first optimizer step (spawn to the end of
step 1, via dpokit's ``on_step`` and a TRL ``TrainerCallback``) and where it went, steady pairs/s
(after ``WARMUP_STEPS`` steps), peak RSS of the process.

Model-FLOPs utilisation counts the work any exact DPO step must do, per pair with prompt length P and
response lengths C, R (the prompt once):

    F_fwd = 2 N_body (P + C + R) + 2 V d (C + R) + 4 L d A,   A = P(P+1)/2 + sum_r [r P + r(r+1)/2]

(N_body = parameters without the input embedding and output layer; the output layer of V x d only on
scored tokens; attention: QK^T and AV, 2 d FLOPs each per attended (query, key) pair, causal, the
responses seeing the prompt and their own past). The epoch's useful work is 3 F_fwd (policy forward
and backward) + F_fwd (one reference forward). Epoch MFU = that / wall / R; steady MFU = mean F_fwd
per pair x pairs/s x (3, plus 1 if the reference runs inside the step) / R, where R is the float32
2048^3 matmul rate measured on the same threads between runs. Below ``--mfu-target`` one step of
dpokit's default is profiled with ``torch.profiler`` (self CPU time per op, matmul FLOPs) per fixture.

    python benchmarks/bench_train.py                          # all fixtures, 3 repeats (~1.5 h on 2 cores)
    python benchmarks/bench_train.py --fixtures response_heavy --repeats 1 --systems dpokit trl_fast
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SYSTEMS = ("dpokit", "dpokit_precomputed", "dpokit_live", "dpokit_compile", "dpokit_compile_warm", "trl_default", "trl_fast")
NAMES = {
    "dpokit": "dpokit defaults",
    "dpokit_precomputed": "dpokit, precomputed reference",
    "dpokit_live": "dpokit, live reference (copy)",
    "dpokit_compile": "dpokit + model.compile, 1st run",
    "dpokit_compile_warm": "dpokit + model.compile, 2nd run (cache warm)",
    "trl_default": "TRL 1.16 defaults",
    "trl_fast": "TRL 1.16 precompute, no GC",
}
WARMUP_STEPS = 3
BATCH_PAIRS = 8
LR = 1e-6
BETA = 0.1
# Model sizes (``--models``): overrides of ``fixtures.llama_config`` (vocabulary 4,096, untied output layer).
MODELS: dict[str, dict[str, int]] = {
    "5m": {},  # hidden 256, intermediate 688, 4 layers, 4 heads / 2 KV heads: 4.7M parameters
    "57m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4),
    "98m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4),
}
FLOP_STEPS = 3  # optimizer steps run under torch's FLOP counter (--flops)
MAX_LENGTH = 1024
MAX_PROMPT_LENGTH = 512
PROFILE_STEP = 3


# ------------------------------------------------------------------------------------------------
# Fixture and measurements shared by parent and workers.
# ------------------------------------------------------------------------------------------------


def build_fixture(root: Path, spec, vocab_size: int = 4096, model: str = "5m") -> Path:
    """Model of size ``model`` (:data:`MODELS`; random init, seed 0) + tokenizer (chat variant for
    conversational data) in ``root/model``, the rows of ``spec`` in ``root/pairs.jsonl``."""
    import torch
    from transformers import LlamaForCausalLM

    import fixtures

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = fixtures.train_bpe_tokenizer(4096, chat=spec.conversational)
    torch.manual_seed(0)
    network = LlamaForCausalLM(fixtures.llama_config(vocab_size, attn_implementation="sdpa", **MODELS[model]))
    network.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    fixtures.write_pairs(spec, root / "pairs.jsonl")
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


def peak_rss() -> int:
    """VmHWM (the process's resident-set high-water mark) in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def forward_flops(prompt: int, responses: list[int], *, body: int, vocab: int, hidden: int, layers: int) -> float:
    """F_fwd of one example (see the module docstring): the prompt once, each response after it."""
    attended = prompt * (prompt + 1) / 2 + sum(r * prompt + r * (r + 1) / 2 for r in responses)
    scored = sum(responses)
    return 2 * body * (prompt + scored) + 2 * vocab * hidden * scored + 4 * layers * hidden * attended


def fixture_work(fixture: Path) -> dict:
    """Tokens and F_fwd summed over the fixture as dpokit tokenizes it (chat template included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.data import PrepareOptions, prepare_dataset

    tokenizer = AutoTokenizer.from_pretrained(fixture / "model")
    model = AutoModelForCausalLM.from_pretrained(fixture / "model")
    config = model.config
    embed, head = model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embed - head
    shape = dict(body=body, vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_dataset(
            fixture / "pairs.jsonl",
            tokenizer,
            PrepareOptions(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH),
            cache_dir=tmp,
        )
        items = [(len(item["prompt_ids"]), [len(r) for r in item["response_ids"]]) for item in data.items]
    flops = sum(forward_flops(p, rs, **shape) for p, rs in items)
    return {
        "pairs": len(items),
        "tokens": sum(p + sum(rs) for p, rs in items),
        "prompt_mean": statistics.mean(p for p, _ in items),
        "response_mean": statistics.mean(r for _, rs in items for r in rs),
        "forward_flops": flops,
        "forward_flops_per_pair": flops / len(items),
        "params_body": body,
        "params": body + embed + head,
    }


# ------------------------------------------------------------------------------------------------
# Workers (one system per fresh process).
# ------------------------------------------------------------------------------------------------


class StepClock:
    """Wall-clock (epoch) time of every optimizer step and of named start-up phases."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def tick(self, step: int) -> None:
        self.steps.append(time.time())


class FlopTally:
    """The FLOPs ``torch.utils.flop_counter`` counts (matrix products and attention, forward, backward and
    any recomputation) up to the end of every optimizer step: what a system executes, padding included.
    The CPU's fused attention kernel is counted with the counter's own SDPA formulas (full, not causal,
    query x key products, as the counter counts every attention kernel and as the dense-mask path runs)."""

    def __init__(self) -> None:
        import torch
        from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

        def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

        def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)

        aten = torch.ops.aten
        cpu_attention = {
            aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
        }
        self.mode = FlopCounterMode(display=False, custom_mapping=cpu_attention)
        self.at_steps: list[int] = []

    def tick(self) -> None:
        self.at_steps.append(self.mode.get_total_flops())


def executed_flops(at_steps: list[int], steps: int) -> dict[str, float]:
    """A whole run's executed FLOPs from the first optimizer steps' cumulative counts: the mean step
    (steps 2 onwards) and the work before it (the up-front reference pass, if any, is in step 1's count)."""
    step = (at_steps[-1] - at_steps[0]) / (len(at_steps) - 1)
    before = max(at_steps[0] - step, 0.0)
    return {"step": step, "before": before, "total": before + steps * step}


class StepProfiler:
    """Profiles optimizer step ``PROFILE_STEP`` (started when step ``PROFILE_STEP - 1`` ends)."""

    def __init__(self) -> None:
        self.profile = None
        self.summary: dict | None = None

    def __call__(self, step: int) -> None:
        import torch

        if step == PROFILE_STEP - 1:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True)
            self.profile.__enter__()
        elif step == PROFILE_STEP and self.profile is not None:
            self.profile.__exit__(None, None, None)
            self.summary = summarize_profile(self.profile)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ATTENTION_MARK = "scaled_dot_product"


def op_category(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if ATTENTION_MARK in name or "flash_attention" in name:
        return "attention"
    if "adam" in name.lower() or "_foreach" in name:
        return "optimizer"
    return "other (element-wise, copies, reductions, framework)"


def summarize_profile(profile) -> dict:
    """Self CPU time by op and by category; the FLOP rate the matmuls themselves reached."""
    events = profile.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    categories: dict[str, float] = {}
    matmul_flops = matmul_time = 0.0
    for e in events:
        category = op_category(e.key)
        categories[category] = categories.get(category, 0.0) + e.self_cpu_time_total
        if category == "matmul":
            matmul_flops += e.flops or 0
            matmul_time += e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "step_self_cpu_s": total / 1e6,
        "categories": {k: v / total for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "matmul_flops_per_s": matmul_flops / (matmul_time / 1e6) if matmul_time else None,
        "top_ops": [(e.key, e.self_cpu_time_total / total, e.count) for e in top],
    }


def dpokit_overrides(system: str, fixture: Path, work: Path, max_steps: int | None, batch_pairs: int) -> list[str]:
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
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
    ]
    if max_steps:
        overrides.append(f"optim.max_steps={max_steps}")
    if system == "dpokit_precomputed":
        overrides.append("reference.strategy=precomputed")
    if system == "dpokit_live":
        overrides.append("reference.strategy=copy")
    if system.startswith("dpokit_compile"):
        overrides.append("model.compile=true")
    return overrides


class RecordHandler:
    """Keeps the messages of dpokit's INFO log records (which reference strategy ran, and why)."""

    def __init__(self) -> None:
        import logging

        self.messages: list[str] = []
        self.handler = logging.Handler(logging.INFO)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())  # type: ignore[method-assign]


def run_dpokit(system: str, fixture: Path, work: Path, clock: StepClock, options, on_step) -> dict:
    import logging

    from dpokit.config import load_config
    from dpokit.training import run

    clock.mark("imports")
    records = RecordHandler()
    package_logger = logging.getLogger("dpokit")
    package_logger.addHandler(records.handler)
    package_logger.setLevel(logging.INFO)
    cfg = load_config(None, dpokit_overrides(system, fixture, work, options.max_steps, options.batch_pairs))
    result = run(cfg, on_step=lambda step, metrics: on_step(step))
    startup_file = Path(result.run_dir) / "startup.json"
    startup = json.loads(startup_file.read_text()) if startup_file.exists() else None
    reference_lines = [m for m in records.messages if "reference" in m.lower()]
    compile_cache = work / "cache" / "compile"
    return {
        "startup": startup,
        "reference_log": reference_lines[:4],
        "reference_live": reference_is_live(system, reference_lines, startup),
        "compile_cache_files": sum(1 for p in compile_cache.rglob("*") if p.is_file()) if compile_cache.exists() else 0,
    }


def reference_is_live(system: str, reference_lines: list[str], startup: dict | None) -> bool:
    """Whether the reference forward runs inside each step (copy / adapters off) or before training."""
    if system in ("dpokit_precomputed", "dpokit_live"):
        return system == "dpokit_live"
    text = " ".join(reference_lines) + json.dumps(startup or {})
    return "precomputed" not in text and "cached reference log-probs" not in text


def run_trl(fixture: Path, work: Path, clock: StepClock, options, on_step, fast: bool) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    clock.mark("imports")
    reference_pass = {"s": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):  # the up-front reference pass of trl_fast, timed
        start = time.time()
        out = original(self, *args, **kwargs)
        reference_pass["s"] += time.time() - start
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.mark("train_begin")

        def on_step_end(self, args, state, control, **kwargs):
            on_step(state.global_step)

    tokenizer = AutoTokenizer.from_pretrained(fixture / "model")
    model = AutoModelForCausalLM.from_pretrained(fixture / "model")
    ref_model = None if fast else AutoModelForCausalLM.from_pretrained(fixture / "model")
    clock.mark("model_load")
    dataset = datasets.load_dataset("json", data_files=str(fixture / "pairs.jsonl"), split="train", cache_dir=str(work / "hf"))
    clock.mark("data_load")
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=trl_args(work, options, fast), train_dataset=dataset, processing_class=tokenizer
    )
    trainer.add_callback(Clock())
    clock.mark("trainer_init")
    trainer.train()
    trainer.save_model(str(work / "trl" / "final"))
    return {"reference_pass_s": reference_pass["s"], "reference_live": not fast}


def trl_args(work: Path, options, fast: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(work / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=options.batch_pairs,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_steps=options.max_steps or -1,
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


def worker(options: argparse.Namespace) -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    clock = StepClock()
    clock.mark("torch")
    profiler = StepProfiler() if options.profile else None

    def on_step(step: int) -> None:
        clock.tick(step)
        if profiler is not None:
            profiler(step)

    tally = FlopTally() if options.count_flops else None

    def counted(step: int) -> None:  # returns None: a true value from on_step asks dpokit to stop
        on_step(step)
        if tally is not None:
            tally.tick()

    work = Path(options.work)
    with tally.mode if tally is not None else contextlib.nullcontext():
        if options.worker.startswith("dpokit"):
            extra = run_dpokit(options.worker, Path(options.fixture), work, clock, options, counted)
        else:
            extra = run_trl(Path(options.fixture), work, clock, options, counted, fast=options.worker == "trl_fast")
    if tally is not None:
        extra["flops_at_steps"] = tally.at_steps
    clock.mark("end")
    steady = clock.steps[WARMUP_STEPS - 1 :] if len(clock.steps) > WARMUP_STEPS + 1 else clock.steps
    pairs_per_second = (len(steady) - 1) * options.batch_pairs / (steady[-1] - steady[0]) if len(steady) > 1 else float("nan")
    step_seconds = [b - a for a, b in itertools.pairwise(clock.steps)]
    result = {
        "system": options.worker,
        "steps": len(clock.steps),
        "pairs_per_s": pairs_per_second,
        "median_step_s": statistics.median(step_seconds) if step_seconds else float("nan"),
        "peak_rss": peak_rss(),
        "first_step": clock.steps[0] if clock.steps else None,
        "marks": clock.marks,
        "profile": profiler.summary if profiler else None,
        **extra,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent: fixtures, alternating runs, tables.
# ------------------------------------------------------------------------------------------------


def launch(
    system: str,
    fixture: Path,
    work: Path,
    options,
    *,
    profile: bool = False,
    count_flops: bool = False,
    max_steps: int | None = None,
    script: str = __file__,
) -> dict:
    """Run one system in a fresh process (``script --worker system ...``, this file's worker by default);
    wall time and time to first step are measured from the spawn."""
    command = [sys.executable, script, "--worker", system, "--fixture", str(fixture), "--work", str(work)]
    command += ["--threads", str(options.threads), "--batch-pairs", str(options.batch_pairs)]
    if profile:
        command.append("--profile")
    if count_flops:
        command.append("--count-flops")
    if max_steps or options.max_steps:
        command += ["--max-steps", str(max_steps or options.max_steps)]
    env = {
        **{k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"},  # dpokit's own: <data.cache_dir>/compile
        "OMP_NUM_THREADS": str(options.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    spawned = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    ended = time.time()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{system} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = ended - spawned
    result["first_step_s"] = result["first_step"] - spawned if result["first_step"] else float("nan")
    result["phases"] = startup_phases(result, spawned)
    return result


def startup_phases(result: dict, spawned: float) -> dict[str, float]:
    """Seconds from spawn to the first step, by phase (from the worker's marks; dpokit's own
    ``startup.json`` breakdown is kept separately in ``result['startup']`` when present)."""
    marks = result["marks"]
    points = [("python + torch import", marks.get("torch")), ("tool imports", marks.get("imports"))]
    if result["system"].startswith("trl"):
        points += [
            ("model load", marks.get("model_load")),
            ("dataset load", marks.get("data_load")),
            ("trainer init (tokenize, reference pass)", marks.get("trainer_init")),
            ("train() set-up", marks.get("train_begin")),
        ]
    points.append(("to end of step 1", result["first_step"]))
    phases, previous = {}, spawned
    for name, at in points:
        if at is not None:
            phases[name] = at - previous
            previous = at
    if result.get("reference_pass_s"):
        phases["  of which reference pass"] = result["reference_pass_s"]
    return phases


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
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{name}, {os.cpu_count()} cores, {memory:.0f} GiB"


def chosen_specs(options) -> list:
    import fixtures

    specs = []
    for name in options.fixtures:
        spec = fixtures.FIXTURES[name]
        changes = {"seed": options.seed}
        for field in ("pairs", "prompt_tokens", "response_tokens"):
            value = getattr(options, field)
            if value is not None:
                changes[field] = tuple(value) if isinstance(value, list) else value
        specs.append(dataclasses.replace(spec, **changes))
    return specs


def run_one(system, name, fixture, root, options, compile_cache, repeat) -> dict | None:
    """One run of ``system`` in its own work directory; keeps/uses the compile cache of the fixture."""
    work = root / "work" / f"{name}-{system}-{repeat}"
    if system == "dpokit_compile_warm":
        if name not in compile_cache:
            print(f"  {name} {system}: skipped (no compile cache from a previous dpokit_compile run)", flush=True)
            return None
        shutil.copytree(compile_cache[name], work / "cache" / "compile")
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = launch(system, fixture, work, options)
    except SystemExit as failure:  # report it, keep the other systems' numbers
        print(f"  repeat {repeat + 1} {name} {system}: FAILED\n{failure}", flush=True)
        return None
    if system == "dpokit_compile" and result["compile_cache_files"]:
        target = root / "compile_cache" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(work / "cache" / "compile", target)
        compile_cache[name] = target
    shutil.rmtree(work, ignore_errors=True)
    result["load"] = load_average().split()[0]
    print(
        f"  repeat {repeat + 1} {name:<15} {system:<20} wall {result['wall_s']:6.1f} s  "
        f"first step {result['first_step_s']:5.1f} s  "
        f"steady {result['pairs_per_s']:5.2f} pairs/s  peak RSS {result['peak_rss'] / 2**20:5.0f} MiB  (load {result['load']})",
        flush=True,
    )
    return result


def parent(options: argparse.Namespace) -> None:
    import torch

    print(
        f"# DPO training benchmark -- {time.strftime('%Y-%m-%d %H:%M %Z')} -- {machine()}, torch {torch.__version__}, "
        f"{options.threads} threads per run; load average before: {load_average()}",
        flush=True,
    )
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "torch": torch.__version__, "fixtures": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entries = [(entry_name(spec, model, options), spec, model) for model in options.models for spec in chosen_specs(options)]
        paths, results = {}, {name: {s: [] for s in options.systems} for name, _, _ in entries}
        for name, spec, model in entries:
            paths[name] = build_fixture(root / name, spec, model=model)
            work = fixture_work(paths[name])
            report["fixtures"][name] = {"spec": dataclasses.asdict(spec), "model": model, "work": work}
            print(
                f"fixture {name}: {work['params'] / 1e6:.1f}M parameters, {work['pairs']} pairs, "
                f"prompt {work['prompt_mean']:.0f} / response {work['response_mean']:.0f} "
                f"tokens on average, {work['tokens']:,} tokens (prompt once), forward {work['forward_flops'] / 1e12:.2f} TFLOP",
                flush=True,
            )
        matmul_rates, compile_cache = [], {}
        for repeat in range(options.repeats):
            order = options.systems if repeat % 2 == 0 else list(reversed(options.systems))
            for name, _, _ in entries:
                for system in order:
                    matmul_rates.append(matmul_flops_per_second(options.threads))
                    result = run_one(system, name, paths[name], root, options, compile_cache, repeat)
                    if result is not None:
                        results[name][system].append(result)
        matmul_rates.append(matmul_flops_per_second(options.threads))
        report["matmul_flops_per_s"] = statistics.median(matmul_rates)
        for name, _, _ in entries:
            report["fixtures"][name]["results"] = results[name]
            if options.flops:
                report["fixtures"][name]["flops"] = count_flops(name, paths[name], root, options, results[name])
            report["fixtures"][name]["profile"] = maybe_profile(name, paths[name], root, options, report)
    report["load_after"] = load_average()
    print_report(options, report)
    if options.json:
        Path(options.json).write_text(json.dumps(report, indent=1), encoding="utf-8")


def entry_name(spec, model: str, options) -> str:
    """The fixture's name, with the model size when more than one size runs."""
    return spec.name if options.models == ["5m"] else f"{spec.name}@{model}"


def count_flops(name: str, fixture: Path, root: Path, options, results: dict[str, list[dict]]) -> dict[str, dict]:
    """Executed FLOPs of each system's whole run (:func:`executed_flops`), from one run of its first
    ``FLOP_STEPS`` steps under the FLOP counter. dpokit's default runs with the reference strategy its timed
    runs chose (``auto`` would weigh a live reference differently for a shortened run)."""
    out = {}
    for system, runs in results.items():
        if not runs or system.startswith("dpokit_compile"):
            continue
        as_system = system
        if system == "dpokit":
            as_system = "dpokit_live" if runs[0]["reference_live"] else "dpokit_precomputed"
        work = root / "work" / f"{name}-{system}-flops"
        work.mkdir(parents=True, exist_ok=True)
        try:
            counted = launch(as_system, fixture, work, options, count_flops=True, max_steps=FLOP_STEPS)
        except SystemExit as failure:
            print(f"  FLOP count {name} {system}: FAILED\n{failure}", flush=True)
            continue
        shutil.rmtree(work, ignore_errors=True)
        steps = runs[0]["steps"]
        if len(counted["flops_at_steps"]) < 2:
            print(f"  FLOP count {name} {system}: FAILED (counts at {counted['flops_at_steps']})", flush=True)
            continue
        out[system] = executed_flops(counted["flops_at_steps"], steps)
        print(
            f"  FLOP count {name:<15} {system:<20} {out[system]['total'] / 1e12:8.2f} TFLOP executed ({steps} steps)", flush=True
        )
    return out


def medians(runs: list[dict]) -> dict:
    keys = ("wall_s", "pairs_per_s", "peak_rss", "median_step_s", "first_step_s")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["reference_live"] = runs[0]["reference_live"]
    phases = {}
    for name in runs[0]["phases"]:
        phases[name] = statistics.median(r["phases"].get(name, 0.0) for r in runs)
    out["phases"] = phases
    out["startup"] = runs[0].get("startup")
    out["reference_log"] = runs[0].get("reference_log")
    return out


def mfu(m: dict, work: dict, matmul: float) -> tuple[float, float]:
    """(epoch MFU, steady MFU) as defined in the module docstring."""
    epoch = 4 * work["forward_flops"] / m["wall_s"] / matmul
    steady = work["forward_flops_per_pair"] * m["pairs_per_s"] * (4 if m["reference_live"] else 3) / matmul
    return epoch, steady


def maybe_profile(name: str, fixture: Path, root: Path, options, report: dict) -> dict | None:
    """Profile one step of dpokit's default when its steady MFU is below the target."""
    runs = report["fixtures"][name]["results"].get("dpokit")
    if not runs or options.no_profile:
        return None
    _, steady = mfu(medians(runs), report["fixtures"][name]["work"], report["matmul_flops_per_s"])
    if steady >= options.mfu_target:
        return None
    work = root / "work" / f"{name}-profile"
    work.mkdir(parents=True, exist_ok=True)
    try:
        return launch("dpokit", fixture, work, options, profile=True, max_steps=PROFILE_STEP + 1)["profile"]
    except SystemExit as failure:
        print(f"  profile {name}: FAILED\n{failure}", flush=True)
        return None


def print_report(options, report: dict) -> None:
    matmul = report["matmul_flops_per_s"]
    print(
        f"\nMedians of {options.repeats} alternating runs; float32 2048^3 matmul rate {matmul / 1e9:.1f} GFLOP/s "
        f"({options.threads} threads, measured between runs); load average after: {report['load_after']}"
    )
    for name, entry in report["fixtures"].items():
        med = {s: medians(runs) for s, runs in entry["results"].items() if runs}
        work = entry["work"]
        print(
            f"\n## {name}: {work['pairs']} pairs, prompt {work['prompt_mean']:.0f} / response {work['response_mean']:.0f} "
            f"tokens on average\n"
        )
        print_speed_table(med, work, matmul)
        print_flops(entry.get("flops"), med, matmul)
        print_startup_table(med)
        print_profile(entry.get("profile"), matmul)
        print_targets(name, med, work, matmul, options.mfu_target)
    print_scaling(report)
    print(
        "\nwall: whole process, spawn to exit. MFU: useful work (policy 3 F_fwd + reference F_fwd per pair, prompt "
        "once, attention counted) / time / matmul rate; steady MFU counts the reference forward only when it "
        "runs inside the step."
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def print_speed_table(med: dict, work: dict, matmul: float) -> None:
    baselines = [b for b in ("trl_default", "trl_fast") if b in med]
    print(
        "| system | wall (s) | first step (s) | steady pairs/s | step (s) | peak RSS (MiB) | MFU epoch / steady | "
        + " | ".join(f"vs {b}: wall / pairs/s / RSS" for b in baselines)
        + " |"
    )
    print("|" + "---|" * (7 + len(baselines)))
    for system, m in med.items():
        epoch_mfu, steady_mfu = mfu(m, work, matmul)
        cells = [
            NAMES[system],
            f"{m['wall_s']:.1f}",
            f"{m['first_step_s']:.1f}",
            f"{m['pairs_per_s']:.2f}",
            f"{m['median_step_s']:.2f}",
            f"{m['peak_rss'] / 2**20:.0f}",
            f"{epoch_mfu:.0%} / {steady_mfu:.0%}",
        ]
        for b in baselines:
            base = med[b]
            cells.append(
                f"{ratio(base['wall_s'], m['wall_s'])} / {ratio(m['pairs_per_s'], base['pairs_per_s'])} / "
                f"{ratio(m['peak_rss'], base['peak_rss'])}"
            )
        print("| " + " | ".join(cells) + " |")


def ceilings(flops: dict, baseline: str) -> tuple[float, float]:
    """(whole run, steady step): the speed-up over ``baseline`` that executed FLOPs alone allow dpokit."""
    ours, theirs = flops["dpokit"], flops[baseline]
    return theirs["total"] / ours["total"], theirs["step"] / ours["step"]


def print_flops(flops: dict | None, med: dict, matmul: float) -> None:
    """Executed FLOPs per system, the ceiling they set against TRL and the hardware utilisation reached."""
    if not flops:
        return
    print("\nExecuted FLOPs (torch.utils.flop_counter, first steps counted, whole run extrapolated):\n")
    for system, f in flops.items():
        line = (
            f"- {NAMES[system]}: {f['total'] / 1e12:.2f} TFLOP = {f['before'] / 1e12:.2f} before step 1 + "
            f"{f['step'] / 1e12:.3f} per step; {f['total'] / med[system]['wall_s'] / matmul:.0%} of the matmul rate over the run"
        )
        if system != "dpokit" and "dpokit" in flops:
            run, step = ceilings(flops, system)
            line += f"; FLOP ceiling for dpokit vs this: {run:.2f}x whole run, {step:.2f}x per step"
        print(line)


def print_scaling(report: dict) -> None:
    """One row per fixture and model size: measured ratios beside the FLOP ceilings."""
    rows = [(name, entry) for name, entry in report["fixtures"].items() if "@" in name]
    if not rows:
        return
    print(
        "\n## How the ratios move with model size\n\n| fixture @ model | parameters | dpokit wall (s) | "
        "vs TRL defaults: wall / steady (ceiling) | vs TRL fastest: wall / steady (ceiling) | dpokit MFU epoch / steady |"
    )
    print("|---|---|---|---|---|---|")
    matmul = report["matmul_flops_per_s"]
    for name, entry in rows:
        med = {s: medians(runs) for s, runs in entry["results"].items() if runs}
        if "dpokit" not in med:
            continue
        cells = [name, f"{entry['work']['params'] / 1e6:.1f}M", f"{med['dpokit']['wall_s']:.1f}"]
        for baseline in ("trl_default", "trl_fast"):
            if baseline not in med:
                cells.append("n/a")
                continue
            wall = med[baseline]["wall_s"] / med["dpokit"]["wall_s"]
            steady = med["dpokit"]["pairs_per_s"] / med[baseline]["pairs_per_s"]
            flops = entry.get("flops") or {}
            limit = ceilings(flops, baseline) if "dpokit" in flops and baseline in flops else None
            cells.append(f"{wall:.2f}x / {steady:.2f}x" + (f" ({limit[0]:.2f}x / {limit[1]:.2f}x)" if limit else ""))
        epoch, steady_mfu = mfu(med["dpokit"], entry["work"], matmul)
        cells.append(f"{epoch:.0%} / {steady_mfu:.0%}")
        print("| " + " | ".join(cells) + " |")


def print_startup_table(med: dict) -> None:
    print("\nTime to the first optimizer step (s, spawn to the end of step 1), by phase:\n")
    for system, m in med.items():
        phases = ", ".join(f"{k} {v:.1f}" for k, v in m["phases"].items())
        print(f"- {NAMES[system]}: {m['first_step_s']:.1f} = {phases}")
        if m.get("startup"):
            print(f"  dpokit startup.json: {json.dumps(m['startup'])}")
        if m.get("reference_log") and system == "dpokit":
            print(f"  reference: {' | '.join(m['reference_log'])}")


def print_profile(profile: dict | None, matmul: float) -> None:
    if not profile:
        return
    shares = ", ".join(f"{k} {v:.0%}" for k, v in profile["categories"].items())
    rate = profile["matmul_flops_per_s"]
    rate_text = f"; the matmuls ran at {rate / 1e9:.0f} GFLOP/s = {rate / matmul:.0%} of the 2048^3 rate" if rate else ""
    print(f"\nProfile of one dpokit step ({profile['step_self_cpu_s']:.2f} s self CPU): {shares}{rate_text}")
    for op, share, count in profile["top_ops"]:
        print(f"    {share:5.1%}  {op} (x{count})")


def print_targets(name: str, med: dict, work: dict, matmul: float, mfu_target: float) -> None:
    if "dpokit" not in med:
        return
    checks = []
    if "trl_default" in med:
        value = med["trl_default"]["wall_s"] / med["dpokit"]["wall_s"]
        checks.append(f"end to end vs TRL defaults {value:.2f}x (target 2.5x: {'met' if value >= 2.5 else 'MISSED'})")
    if "trl_fast" in med:
        value = med["trl_fast"]["wall_s"] / med["dpokit"]["wall_s"]
        checks.append(f"vs TRL fastest {value:.2f}x (target 2x: {'met' if value >= 2 else 'MISSED'})")
    steady = mfu(med["dpokit"], work, matmul)[1]
    checks.append(f"steady MFU {steady:.0%} (target {mfu_target:.0%}: {'met' if steady >= mfu_target else 'MISSED'})")
    print(f"\nTargets on {name} (dpokit defaults): " + "; ".join(checks))


def main() -> None:
    import fixtures

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=SYSTEMS)
    parser.add_argument("--fixture")
    parser.add_argument("--work")
    parser.add_argument("--profile", action="store_true", help="worker: profile optimizer step 3")
    parser.add_argument("--count-flops", action="store_true", help="worker: count FLOPs (torch.utils.flop_counter)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["5m"], help="model sizes (default: 5m)")
    parser.add_argument(
        "--flops",
        action="store_true",
        help=f"also run each system once for {FLOP_STEPS} steps under torch's FLOP counter: executed FLOPs and the ceiling",
    )
    parser.add_argument("--fixtures", nargs="+", choices=list(fixtures.FIXTURES), default=list(fixtures.FIXTURES))
    parser.add_argument("--pairs", type=int, default=None, help="pairs per fixture (default: the fixture's own)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    parser.add_argument("--response-tokens", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-pairs", type=int, default=BATCH_PAIRS)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--mfu-target", type=float, default=0.60)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    options = parser.parse_args()
    if options.worker:
        worker(options)
    else:
        parent(options)


if __name__ == "__main__":
    main()
