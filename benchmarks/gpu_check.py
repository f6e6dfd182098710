"""GPU readiness check (``make gpu-check``): one command that trains dpokit on the GPUs present and writes
``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``runs/gpu_check``).

Sections (each runs in child processes, so a CUDA out-of-memory error, a crash or a hang in one is
recorded as that section's failure and the others still run):

* ``environment``  -- GPUs (name, memory, driver), CUDA and torch versions, bf16 support, the attention
  back-ends available (SDPA flash / memory-efficient / cuDNN, FlexAttention, flash-attn), and the
  versions of TRL, peft, bitsandbytes and vLLM;
* ``steps.*``      -- a ~1B-parameter Llama built from config (hidden 2048, 16 layers, 32 heads, 8 KV heads,
  intermediate 8192, vocabulary 32,000, random init, bfloat16): DPO steps with SDPA (``data.layout: auto``)
  and with FlexAttention on the packed layout, and TRL 1.16's ``DPOTrainer`` defaults on the same model
  and pairs. Per run: median step time after the warm-up steps, tokens/s, MFU (model FLOPs of the step --
  policy forward and backward plus one reference forward, the attention counted causally and over the
  prompt once -- against the GPU's dense bf16 peak from :data:`BF16_PEAK`), peak GPU memory; dpokit /
  TRL ratios;
* ``frontier.*``   -- the longest pair (prompt L/4, two responses 3L/8) that trains at batch 1, found by
  doubling L, each attempt in its own process, for dpokit and for TRL, within a time budget;
* ``distributed.*`` -- ``torchrun`` on every GPU present (NCCL): DDP steps, FSDP2 steps with a checkpoint
  after step 2, and that checkpoint resumed in a fresh run directory, whose step-3 loss must equal the
  uninterrupted run's;
* ``lora``, ``qlora`` -- LoRA steps; 4-bit QLoRA steps (``model.quantization: 4bit``, bitsandbytes) where
  bitsandbytes is installed, else "not installed";
* ``vllm``         -- vLLM's generation tokens/s on the same model if vllm is importable, else "not installed"
  (vLLM itself, in this process's environment);
* ``engines``      -- the time of one online DPO round and the reward reached after equal rounds with each
  sampling engine on the same model: dpokit's generator, a vLLM server colocated on the trainer's GPU,
  and a vLLM server on a GPU of its own (where there is a second one) -- ``benchmarks/bench_online.py
  --part engines`` with the model above, the server from ``--vllm-python`` (default ``.venv-vllm``, else
  this interpreter when vllm is importable). Skipped with ``--cpu`` (the CPU figures come from
  ``bench_online.py --part engines --lm quick``, docs/vllm.md) and, saying so, without a vLLM environment.

The process exits 1 and names the failed sections when any section fails (a GPU run without a GPU
fails in ``environment``). ``--cpu --tiny`` runs every section on the CPU with a tiny model, gloo
instead of NCCL and 2 processes, in about a minute: the suite runs it (``tests/test_gpu_check.py``)
so this script keeps working between GPU runs; ``--no-trl`` leaves the TRL runs out.

    python benchmarks/gpu_check.py                      # on a GPU machine (< 8 minutes on one H100)
    python benchmarks/gpu_check.py --cpu --tiny --out /tmp/check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, most specific first.
BF16_PEAK = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)
LR = 1e-6
BETA = 0.1


@dataclasses.dataclass
class Plan:
    """What one check runs: sizes for the GPU run or the tiny CPU run."""

    cpu: bool
    out: Path
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompt: int  # tokens of every prompt in the step runs
    response: int  # tokens of each response (its EOS included)
    batch: int  # pairs per optimizer step
    steps: int
    warmup: int
    frontier_start: int
    frontier_max: int
    frontier_budget_s: float
    nproc: int
    trl: bool
    timeout_s: int
    vllm_python: str | None = None

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    @property
    def dtype(self) -> str:
        return "float32" if self.cpu else "bfloat16"

    @property
    def pair_tokens(self) -> int:
        return self.prompt + 2 * self.response


def make_plan(options: argparse.Namespace) -> Plan:
    out = Path(options.out)
    if options.tiny:
        sizes = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=4096, prompt=32, response=32)
        sizes |= dict(batch=2, steps=3, warmup=1, frontier_start=64, frontier_max=128, frontier_budget_s=60.0)
    else:
        sizes = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000, prompt=512, response=768)
        sizes |= dict(batch=8, steps=8, warmup=3, frontier_start=8192, frontier_max=131072, frontier_budget_s=100.0)
    nproc = options.nproc or (2 if options.cpu else max(1, _cuda_count()))
    return Plan(
        cpu=options.cpu,
        out=out,
        nproc=nproc,
        trl=not options.no_trl,
        timeout_s=options.section_timeout,
        vllm_python=getattr(options, "vllm_python", None),
        **sizes,
    )


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ------------------------------------------------------------------------------------------------
# Assets: the model, the tokenizer, pairs of exact lengths, training configs.
# ------------------------------------------------------------------------------------------------


def build_model(plan: Plan, root: Path) -> Path:
    """The Llama of ``plan`` (random init, seed 0) in ``plan.dtype`` and the fixture tokenizer in ``root``."""
    import torch
    from transformers import LlamaForCausalLM

    import fixtures

    config = fixtures.llama_config(
        plan.vocab,
        max_positions=plan.frontier_max,
        hidden_size=plan.hidden,
        intermediate_size=plan.intermediate,
        num_hidden_layers=plan.layers,
        num_attention_heads=plan.heads,
        num_key_value_heads=plan.kv_heads,
    )
    torch.manual_seed(0)
    with torch.device(plan.device):  # initialised on the GPU: seconds instead of a minute for 1B on the CPU
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, plan.dtype)).save_pretrained(root)
    fixtures.train_bpe_tokenizer(4096).save_pretrained(root)
    return root


def write_pairs(path: Path, tokenizer: Any, n: int, prompt: int, response: int) -> Path:
    """``n`` rows whose prompt has ``prompt`` tokens and each response ``response`` tokens with its EOS."""
    import random

    from bench_scaling import exact_text

    rng = random.Random(0)
    rows = [
        {
            "prompt": exact_text(tokenizer, rng, prompt),
            "chosen": " " + exact_text(tokenizer, rng, response - 1),
            "rejected": " " + exact_text(tokenizer, rng, response - 1),
        }
        for _ in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def model_shape(plan: Plan) -> dict[str, int]:
    """Parameter counts of the plan's model: the decoder body (without embeddings and output layer) and all."""
    h, i, kv = plan.hidden, plan.intermediate, plan.hidden * plan.kv_heads // plan.heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    body = plan.layers * per_layer + h
    return {"body": body, "total": body + 2 * plan.vocab * h}


def step_flops(plan: Plan, prompt: int, response: int, pairs: int) -> float:
    """Model FLOPs of one DPO step on ``pairs`` pairs: 3 forward-equivalents for the policy (forward and
    backward) and one for the reference, each as ``bench_train.forward_flops`` counts it."""
    from bench_train import forward_flops

    shape = model_shape(plan)
    one = forward_flops(
        prompt, [response, response], body=shape["body"], vocab=plan.vocab, hidden=plan.hidden, layers=plan.layers
    )
    return 4 * one * pairs


def dpokit_config(
    plan: Plan, *, model: Path, pairs: Path, work: Path, prompt: int, response: int, batch: int, steps: int
) -> dict:
    """A dpokit training config (as YAML would give it) for ``steps`` optimizer steps of ``batch`` pairs."""
    return {
        "model": {"name_or_path": str(model), "device": plan.device, "dtype": plan.dtype, "attn_implementation": "sdpa"},
        "data": {
            "train_path": str(pairs),
            "cache_dir": str(work / "cache"),
            "max_length": prompt + response,
            "max_prompt_length": prompt,
        },
        "loss": {"beta": BETA},
        "optim": {
            "optimizer": "adamw",
            "lr": LR,
            "warmup_steps": 0,
            "batch_size": batch,
            "grad_accumulation": 1,
            "max_steps": steps,
        },
        "eval": {"every_steps": 0},
        "logging": {"run_dir": str(work / "run"), "log_every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
        "checkpoint": {"every_steps": 0},
    }


VARIANTS: dict[str, dict[str, Any]] = {
    "sdpa": {},
    "flex_packed": {"model": {"attn_implementation": "flex_attention"}, "data": {"layout": "packed"}},
    "lora": {"model": {"lora": {"enabled": True, "r": 16}}, "optim": {"lr": 1e-4}},
    "qlora": {"model": {"quantization": "4bit", "lora": {"enabled": True, "r": 16}}, "optim": {"lr": 1e-4}},
}


def merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s keys laid over it, section by section."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


# ------------------------------------------------------------------------------------------------
# Workers: one training run in this process, its measurements printed as one RESULT line.
# ------------------------------------------------------------------------------------------------


def peak_memory(device: str) -> int:
    """Peak bytes: allocated GPU memory on CUDA, the process's RSS high-water mark on the CPU."""
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_dpokit_worker(config: dict) -> list[float]:
    """Train with ``config``; the wall-clock time at the end of every optimizer step."""
    import yaml

    from dpokit.config import load_config
    from dpokit.training import run

    times: list[float] = []

    def tick(step: int, metrics: dict) -> bool:
        times.append(time.perf_counter())
        return False

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    try:
        run(load_config(handle.name, []), on_step=tick)
    finally:
        os.unlink(handle.name)
    return times


def run_trl_worker(config: dict) -> list[float]:
    """TRL 1.16 ``DPOTrainer`` with its defaults on the model and pairs of ``config`` (same batch, steps,
    lr, beta, max_length); bf16 mixed precision on the GPU (its default), float32 on the CPU."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            times.append(time.perf_counter())

    cpu = config["model"]["device"] == "cpu"
    work = Path(config["logging"]["run_dir"]).parent
    model_dir, optim = config["model"]["name_or_path"], config["optim"]
    args = DPOConfig(
        output_dir=str(work / "trl"),
        report_to=[],
        use_cpu=cpu,
        **({"bf16": False} if cpu else {}),
        per_device_train_batch_size=optim["batch_size"],
        max_steps=optim["max_steps"],
        learning_rate=optim["lr"],
        beta=config["loss"]["beta"],
        max_length=config["data"]["max_length"],
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=datasets.load_dataset(
            "json", data_files=config["data"]["train_path"], split="train", cache_dir=str(work / "hf")
        ),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[Clock()],
    )
    trainer.train()
    return times


def worker(options: argparse.Namespace) -> None:
    """``--worker dpokit|trl --config FILE``: train, print ``RESULT {"times": [...], "peak_memory": ...}``."""
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    config = json.loads(Path(options.config).read_text(encoding="utf-8"))
    if config["model"]["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = (run_dpokit_worker if options.worker == "dpokit" else run_trl_worker)(config)
    print("RESULT " + json.dumps({"times": times, "peak_memory": peak_memory(config["model"]["device"])}), flush=True)


def vllm_worker(options: argparse.Namespace) -> None:
    """``--worker vllm --config FILE``: vLLM's generation tokens/s on the model (64 prompts x 256 new tokens)."""
    from vllm import LLM, SamplingParams

    config = json.loads(Path(options.config).read_text(encoding="utf-8"))
    llm = LLM(model=config["model"]["name_or_path"], dtype="bfloat16", gpu_memory_utilization=0.5, enforce_eager=False)
    params = SamplingParams(max_tokens=256, min_tokens=256, temperature=1.0, seed=0)
    prompts = [f"Question {i}: what happened next in the story?" for i in range(64)]
    llm.generate(prompts[:4], params)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("RESULT " + json.dumps({"tokens": generated, "seconds": seconds}), flush=True)


# ------------------------------------------------------------------------------------------------
# The parent: sections, each recorded whatever happens.
# ------------------------------------------------------------------------------------------------


class SectionFailed(Exception):
    """A section could not do what it checks; the message says what went wrong."""


def child_env(plan: Plan) -> dict[str, str]:
    src = str(HERE.parent / "src")
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    if plan.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_child(plan: Plan, command: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """``command`` with the check's environment, in its own process group; past ``timeout`` (default
    ``plan.timeout_s``) the group is killed and the time-out is a :class:`SectionFailed`."""
    limit = timeout or plan.timeout_s
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with subprocess.Popen(command, **pipes, env=child_env(plan), cwd=HERE.parent, start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=limit)
        except subprocess.TimeoutExpired as error:
            os.killpg(child.pid, signal.SIGKILL)  # the whole group: torchrun's workers too
            child.communicate()
            raise SectionFailed(f"timed out after {limit:.0f} s: {' '.join(command[:6])} ...") from error
    return subprocess.CompletedProcess(command, child.returncode, out, err)


def child_result(result: subprocess.CompletedProcess) -> dict:
    """The RESULT line of a worker, or :class:`SectionFailed` with the end of its output."""
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        tail = (result.stdout + result.stderr).strip().splitlines()
        reason = "out of memory" if any("OutOfMemoryError" in line or "MemoryError" in line for line in tail) else "failed"
        raise SectionFailed(f"{reason} (exit {result.returncode}): " + " | ".join(tail[-6:])[-1500:])
    return json.loads(lines[-1][len("RESULT ") :])


def train_child(plan: Plan, tool: str, config: dict, work: Path, timeout: float | None = None) -> dict:
    """One training run (``tool`` = dpokit or trl) in a child process; its RESULT."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return child_result(run_child(plan, [sys.executable, __file__, "--worker", tool, "--config", str(path)], timeout))


def step_figures(plan: Plan, result: dict, *, prompt: int, response: int, batch: int, peak: float | None) -> dict:
    """Median step time after the warm-up, tokens/s, MFU, peak memory from a worker's RESULT."""
    times = result["times"]
    if len(times) <= plan.warmup:
        raise SectionFailed(f"only {len(times)} optimizer steps ran; expected {plan.steps}")
    steps = [b - a for a, b in zip(times[plan.warmup - 1 :], times[plan.warmup :], strict=False)] if plan.warmup else []
    step_s = statistics.median(steps) if steps else times[-1] - times[0]
    flops = step_flops(plan, prompt, response, batch)
    return {
        "step_s": step_s,
        "tokens_per_s": batch * (prompt + 2 * response) / step_s,
        "mfu": flops / step_s / peak if peak else None,
        "peak_memory_gib": result["peak_memory"] / 2**30,
        "steps_timed": len(steps),
    }


def environment(plan: Plan) -> dict:
    """GPUs, driver, CUDA, torch, attention back-ends and the optional packages."""
    import importlib.metadata
    import importlib.util

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "trl", "peft", "bitsandbytes", "vllm", "flash-attn"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["flex_attention"] = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    if plan.cpu:
        info["device"] = f"CPU ({os.cpu_count()} cores), torch threads {torch.get_num_threads()}"
        return info
    if not torch.cuda.is_available():
        raise SectionFailed("no CUDA GPU visible to torch (torch.cuda.is_available() is False); use --cpu for the CPU mode")
    info["gpus"] = [
        {"name": torch.cuda.get_device_name(i), "memory_gib": torch.cuda.get_device_properties(i).total_memory / 2**30}
        for i in range(torch.cuda.device_count())
    ]
    info["driver"] = nvidia_smi("driver_version")
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
    info["sdpa_backends"] = {
        "flash": torch.backends.cuda.is_flash_attention_available() and torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cudnn": torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled(),
    }
    info["nccl"] = torch.distributed.is_nccl_available()
    return info


def nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (nvidia-smi not found)"


def peak_flops(plan: Plan, env: dict) -> tuple[float | None, str]:
    """The peak the MFU is measured against and its name: dense bf16 by GPU name, or the CPU's measured
    float32 matmul rate."""
    if plan.cpu:
        from bench_train import matmul_flops_per_second

        return matmul_flops_per_second(1, size=512, repeats=4), "float32 512^3 matmul rate measured on 1 thread"
    name = (env.get("gpus") or [{"name": ""}])[0]["name"]
    for key, peak in BF16_PEAK:
        if key in name:
            return peak, f"{key} dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
    return None, f"no bf16 peak known for '{name}' (add it to BF16_PEAK)"


@dataclasses.dataclass
class Assets:
    """What every section trains on: the model directory and pairs files, made once."""

    model: Path
    tokenizer: Any
    step_pairs: Path
    peak: float | None
    peak_name: str
    pair_files: dict[int, Path] = dataclasses.field(default_factory=dict)

    def pairs_of_length(self, length: int, root: Path) -> Path:
        """Two pairs of ``length`` tokens (prompt L/4, responses 3L/8), written on first use."""
        if length not in self.pair_files:
            self.pair_files[length] = write_pairs(root / f"pairs-{length}.jsonl", self.tokenizer, 2, length // 4, 3 * length // 8)
        return self.pair_files[length]


def step_config(plan: Plan, assets: Assets, work: Path, variant: str = "sdpa") -> dict:
    base = dpokit_config(
        plan,
        model=assets.model,
        pairs=assets.step_pairs,
        work=work,
        prompt=plan.prompt,
        response=plan.response,
        batch=plan.batch,
        steps=plan.steps,
    )
    if variant == "flex_packed":  # four pairs per packed row
        base["data"]["pack_tokens"] = 4 * plan.pair_tokens
    config = merged(base, VARIANTS[variant])
    if variant == "flex_packed" and plan.cpu:  # FlexAttention has no backward on the CPU: the packed layout on SDPA
        config["model"]["attn_implementation"] = "sdpa"
    return config


def steps_section(plan: Plan, assets: Assets, variant: str, tool: str = "dpokit") -> dict:
    work = plan.out / "work" / f"steps-{tool}-{variant}"
    config = step_config(plan, assets, work, variant)
    result = train_child(plan, tool, config, work)
    figures = step_figures(plan, result, prompt=plan.prompt, response=plan.response, batch=plan.batch, peak=assets.peak)
    setup = {"attention": config["model"]["attn_implementation"], "layout": config["data"].get("layout", "auto")}
    return {"batch_pairs": plan.batch, "pair_tokens": plan.pair_tokens, **setup, **figures}


def frontier_section(plan: Plan, assets: Assets, tool: str) -> dict:
    """Double the pair length from ``plan.frontier_start`` while 2 steps at batch 1 complete, each attempt in
    its own process, until ``plan.frontier_max`` or ``plan.frontier_budget_s``."""
    attempts: list[dict] = []
    deadline = time.monotonic() + plan.frontier_budget_s
    length, longest, stopped = plan.frontier_start, None, "reached the largest length tried"
    while length <= plan.frontier_max:
        if time.monotonic() > deadline:
            stopped = f"time budget of {plan.frontier_budget_s:.0f} s spent"
            break
        work = plan.out / "work" / f"frontier-{tool}-{length}"
        pairs = assets.pairs_of_length(length, plan.out / "work")
        config = dpokit_config(
            plan, model=assets.model, pairs=pairs, work=work, prompt=length // 4, response=3 * length // 8, batch=1, steps=2
        )
        try:
            result = train_child(plan, tool, config, work)
        except SectionFailed as error:
            attempts.append({"length": length, "fits": False, "why": str(error)[:300]})
            timed_out = str(error).startswith("timed out")
            stopped = f"the attempt at {length:,} tokens {'timed out' if timed_out else 'did not train'}"
            break
        finally:
            shutil.rmtree(work, ignore_errors=True)
        attempts.append({"length": length, "fits": True, "peak_memory_gib": result["peak_memory"] / 2**30})
        longest, length = length, length * 2
    if longest is None:
        raise SectionFailed(f"not even {plan.frontier_start:,} tokens trained: {attempts[-1]['why'] if attempts else stopped}")
    return {"longest_pair_tokens": longest, "stopped": stopped, "attempts": attempts}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(plan: Plan, config: dict, work: Path, *, resume: bool = False) -> list[dict]:
    """``torchrun --nproc_per_node N -m dpokit train`` on ``config``; the run's train records."""
    from dpokit.training.tracking import read_metrics

    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(plan.nproc)]
    command += ["--master_port", str(free_port()), "-m", "dpokit", "train", str(path)] + (
        ["--resume", "latest"] if resume else []
    )
    result = run_child(plan, command)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()
        raise SectionFailed(f"torchrun exit {result.returncode}: " + " | ".join(tail[-8:])[-1500:])
    return read_metrics(Path(config["logging"]["run_dir"]), split="train")


def distributed_config(plan: Plan, assets: Assets, work: Path, strategy: str, **checkpoint: int) -> dict:
    config = step_config(plan, assets, work)
    config["optim"]["batch_size"] = max(1, plan.batch // plan.nproc)
    config["optim"]["max_steps"] = 3
    config["distributed"] = {"strategy": strategy, "backend": "gloo" if plan.cpu else "nccl"}
    config["checkpoint"] = {"every_steps": 0, **checkpoint}
    return config


def distributed_section(plan: Plan, assets: Assets, strategy: str) -> dict:
    """3 steps under torchrun; the FSDP2 run also saves a checkpoint after step 2 (resumed by
    :func:`resume_section`)."""
    work = plan.out / "work" / f"torchrun-{strategy}"
    checkpoint = {"every_steps": 2, "keep_last": 5} if strategy == "fsdp" else {}
    config = distributed_config(plan, assets, work, strategy, **checkpoint)
    start = time.perf_counter()
    records = torchrun(plan, config, work)
    if [r["step"] for r in records] != [1, 2, 3]:
        raise SectionFailed(f"expected train records for steps 1-3, got {[r['step'] for r in records]}")
    (work / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return {"processes": plan.nproc, "losses": [r["loss"] for r in records], "wall_s": time.perf_counter() - start}


def resume_section(plan: Plan, fsdp: dict | None) -> dict:
    """The FSDP2 run's checkpoint after step 2, resumed under torchrun in a fresh run directory, must give
    the uninterrupted run's step-3 loss."""
    if fsdp is None:
        raise SectionFailed("not run: distributed.fsdp, whose checkpoint it resumes, failed")
    work = plan.out / "work" / "torchrun-fsdp"
    config = json.loads((work / "config.json").read_text(encoding="utf-8"))
    checkpoint = Path(config["logging"]["run_dir"]) / "checkpoint-2"
    if not checkpoint.is_dir():
        raise SectionFailed(f"no checkpoint at {checkpoint} after an FSDP run with checkpoint.every_steps=2")
    again = work / "resumed"
    again.mkdir()
    shutil.copytree(checkpoint, again / "checkpoint-2")
    shutil.copy(Path(config["logging"]["run_dir"]) / "metrics.jsonl", again / "metrics.jsonl")
    config["logging"]["run_dir"] = str(again)
    resumed = torchrun(plan, config, work / "resume-launch", resume=True)
    expected, got = fsdp["losses"][-1], resumed[-1]["loss"]
    tolerance = 1e-5 if plan.cpu else 2e-2  # bf16 kernels on the GPU need not be bit-identical across launches
    if resumed[-1]["step"] != 3 or abs(got - expected) > tolerance * max(1.0, abs(expected)):
        raise SectionFailed(
            f"resumed step {resumed[-1]['step']} loss {got:.6f}; the uninterrupted run's step 3 loss was {expected:.6f}"
        )
    return {"checkpoint": str(checkpoint), "step3_loss": expected, "resumed_step3_loss": got}


def qlora_section(plan: Plan, assets: Assets, env: dict) -> dict:
    if plan.cpu:
        return {"status": "skipped", "why": "4-bit QLoRA (model.quantization=4bit) needs a CUDA GPU"}
    if env.get("bitsandbytes") == "not installed":
        return {"status": "not installed", "why": "bitsandbytes is not installed (`pip install bitsandbytes`)"}
    return steps_section(plan, assets, "qlora")


def vllm_section(plan: Plan, assets: Assets, env: dict) -> dict:
    if env.get("vllm") == "not installed":
        return {"status": "not installed", "why": "vllm is not importable"}
    if plan.cpu:
        return {"status": "skipped", "why": "the vLLM measurement needs a CUDA GPU"}
    work = plan.out / "work" / "vllm"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.json"
    path.write_text(json.dumps({"model": {"name_or_path": str(assets.model)}}), encoding="utf-8")
    result = child_result(run_child(plan, [sys.executable, __file__, "--worker", "vllm", "--config", str(path)]))
    return {"tokens_per_s": result["tokens"] / result["seconds"], "note": "vLLM itself (the engines section: dpokit on vLLM)"}


def vllm_python(plan: Plan, env: dict) -> str | None:
    """The interpreter that runs a vLLM server: ``--vllm-python``, ``.venv-vllm``, else this one if vllm imports."""
    if plan.vllm_python:
        return plan.vllm_python if Path(plan.vllm_python).is_file() else None
    venv = HERE.parent / ".venv-vllm" / "bin" / "python"
    if venv.is_file():
        return str(venv)
    return sys.executable if env.get("vllm") not in (None, "not installed") else None


def engines_section(plan: Plan, assets: Assets, env: dict) -> dict:
    """One online round per sampling engine (``bench_online.py --part engines``) on the check's model."""
    python = vllm_python(plan, env)
    if python is None:
        return {"status": "not installed", "why": "no vLLM environment (.venv-vllm, --vllm-python, or vllm importable)"}
    if plan.cpu:
        why = "the engine round check runs on the GPU; on a CPU: bench_online.py --part engines --lm quick (docs/vllm.md)"
        return {"status": "skipped", "why": why}
    work = plan.out / "work" / "engines"
    work.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / "bench_online.py"), "--part", "engines", "--model", str(assets.model)]
    command += ["--device", "cuda", "--dtype", plan.dtype, "--vllm-python", python, "--repeats", "1", "--steps", "8"]
    command += ["--batch-prompts", "32", "--max-new-tokens", "64", "--eval-prompts", "64", "--threads", "4"]
    command += ["--json", str(work / "engines.json"), "--server-log", str(work / "server.log")]
    result = run_child(plan, command, timeout=max(plan.timeout_s, 900))
    if result.returncode != 0 or not (work / "engines.json").is_file():
        tail = (result.stdout + result.stderr).strip().splitlines()
        raise SectionFailed(f"failed (exit {result.returncode}): " + " | ".join(tail[-6:])[-1500:])
    summary = json.loads((work / "engines.json").read_text())["summary"]
    figures: dict[str, Any] = {}
    for mode, row in summary.items():
        if "skipped" in row:
            figures[mode] = f"not run: {row['skipped']}"
        else:
            figures[mode] = {
                "round_s": statistics.median(row["round_s"]),
                "sampling_s": statistics.median(row["generation_s"]),
                "sync_s": statistics.median(row["sync_s"]),
                "reward": statistics.median(row["reward"]),
                "logp_gap": row["logp_gap"],
            }
    return figures


# ------------------------------------------------------------------------------------------------
# Running the sections and writing the reports.
# ------------------------------------------------------------------------------------------------


def record(report: dict, name: str, action: Callable[[], dict]) -> dict | None:
    """Run one section; its outcome goes into ``report["sections"][name]`` whatever happens."""
    print(f"[gpu-check] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        outcome = action()
        entry = {"status": "ok", **outcome} if "status" not in outcome else dict(outcome)
    except SectionFailed as error:
        entry, outcome = {"status": "failed", "error": str(error)}, None
    except Exception as error:  # noqa: BLE001 -- any failure of a section is reported, and the others still run
        entry, outcome = (
            {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]},
            None,
        )
    entry["seconds"] = round(time.perf_counter() - start, 1)
    report["sections"][name] = entry
    said = entry.get("error", entry.get("why")) if entry["status"] != "ok" else None
    print(f"[gpu-check] {name}: {entry['status']}" + (f" -- {said[:300]}" if said else ""), flush=True)
    return outcome


def make_assets(plan: Plan, env: dict) -> Assets:
    from transformers import AutoTokenizer

    root = plan.out / "work"
    model = build_model(plan, root / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = write_pairs(root / "pairs.jsonl", tokenizer, plan.batch * plan.steps, plan.prompt, plan.response)
    peak, peak_name = peak_flops(plan, env)
    return Assets(model=model, tokenizer=tokenizer, step_pairs=pairs, peak=peak, peak_name=peak_name)


def run_sections(plan: Plan) -> dict:
    """Every section in order; a failed one is recorded and the rest go on (those that need its output
    are marked failed naming it)."""
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "plan": plan_summary(plan), "sections": {}}
    env = record(report, "environment", lambda: environment(plan))
    assets_box: dict[str, Assets] = {}

    def assets() -> dict:
        assets_box["a"] = make_assets(plan, env or {})
        shape = model_shape(plan)
        return {"parameters": shape["total"], "mfu_peak": assets_box["a"].peak_name}

    if env is not None:
        record(report, "assets", assets)
    if "a" not in assets_box:
        for name in section_names(plan):
            report["sections"][name] = {"status": "failed", "error": "not run: the environment or assets section failed"}
        return report
    a = assets_box["a"]
    record(report, "steps.dpokit_sdpa", lambda: steps_section(plan, a, "sdpa"))
    record(report, "steps.dpokit_flex_packed", lambda: steps_section(plan, a, "flex_packed"))
    optional_trl(report, plan, "steps.trl_default", lambda: steps_section(plan, a, "sdpa", tool="trl"))
    report["ratios"] = step_ratios(report["sections"])
    record(report, "frontier.dpokit", lambda: frontier_section(plan, a, "dpokit"))
    optional_trl(report, plan, "frontier.trl_default", lambda: frontier_section(plan, a, "trl"))
    record(report, "distributed.ddp", lambda: distributed_section(plan, a, "ddp"))
    fsdp = record(report, "distributed.fsdp", lambda: distributed_section(plan, a, "fsdp"))
    record(report, "distributed.fsdp_resume", lambda: resume_section(plan, fsdp))
    record(report, "lora", lambda: steps_section(plan, a, "lora"))
    record(report, "qlora", lambda: qlora_section(plan, a, env or {}))
    record(report, "vllm", lambda: vllm_section(plan, a, env or {}))
    record(report, "engines", lambda: engines_section(plan, a, env or {}))
    return report


def optional_trl(report: dict, plan: Plan, name: str, action: Callable[[], dict]) -> None:
    if plan.trl:
        record(report, name, action)
    else:
        report["sections"][name] = {"status": "skipped", "why": "--no-trl"}


def section_names(plan: Plan) -> list[str]:
    return [
        "steps.dpokit_sdpa",
        "steps.dpokit_flex_packed",
        "steps.trl_default",
        "frontier.dpokit",
        "frontier.trl_default",
        "distributed.ddp",
        "distributed.fsdp",
        "distributed.fsdp_resume",
        "lora",
        "qlora",
        "vllm",
        "engines",
    ]


def step_ratios(sections: dict) -> dict:
    """dpokit over TRL: tokens/s (higher is better) and peak memory (lower is better), where both ran."""
    trl = sections.get("steps.trl_default", {})
    ratios = {}
    for name in ("steps.dpokit_sdpa", "steps.dpokit_flex_packed"):
        ours = sections.get(name, {})
        if ours.get("status") == "ok" and trl.get("status") == "ok":
            ratios[name] = {
                "tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
                "peak_memory": ours["peak_memory_gib"] / trl["peak_memory_gib"],
            }
    return ratios


def plan_summary(plan: Plan) -> dict:
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(plan).items()}
    summary.update(parameters=model_shape(plan)["total"], device=plan.device, dtype=plan.dtype, pair_tokens=plan.pair_tokens)
    return summary


def failed_sections(report: dict) -> list[str]:
    return [name for name, entry in report["sections"].items() if entry["status"] == "failed"]


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(report: dict) -> str:
    """The report as a Markdown page: environment, step table, ratios, frontier, the other sections."""
    sections, plan = report["sections"], report["plan"]
    lines = [f"# dpokit GPU check, {report['started']}", ""]
    failed = failed_sections(report)
    lines += [f"**{'FAILED: ' + ', '.join(failed) if failed else 'All sections passed or were skipped as stated.'}**", ""]
    env = sections.get("environment", {})
    lines += ["## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, dict | list) else v} |" for k, v in env.items() if k != "traceback"]
    lines += ["", f"Model: Llama from config, {plan['parameters']:,} parameters, {plan['dtype']}, "]
    lines[-1] += (
        f"hidden {plan['hidden']}, {plan['layers']} layers; pairs of {plan['pair_tokens']} tokens, batch {plan['batch']} pairs."
    )
    lines += [
        "",
        "## Training steps",
        "",
        "| run | status | step (s) | tokens/s | MFU | peak memory (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("steps.dpokit_sdpa", "steps.dpokit_flex_packed", "steps.trl_default", "lora", "qlora"):
        e = sections.get(name, {})
        mfu = f"{e['mfu']:.1%}" if e.get("mfu") is not None else "-"
        row = [
            name,
            e.get("status", "-"),
            fmt(e.get("step_s"), 3),
            fmt(e.get("tokens_per_s"), 0),
            mfu,
            fmt(e.get("peak_memory_gib")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    mfu_peak = sections.get("assets", {}).get("mfu_peak", "-")
    lines += ["", f"MFU against: {mfu_peak}."]
    for name, ratio in report.get("ratios", {}).items():
        lines.append(f"- {name} / TRL: {ratio['tokens_per_s']:.2f}x the tokens/s, {ratio['peak_memory']:.2f}x the peak memory")
    lines += [
        "",
        "## Longest pair at batch 1",
        "",
        "| tool | status | longest pair (tokens) | stopped because |",
        "|---|---|---|---|",
    ]
    for name in ("frontier.dpokit", "frontier.trl_default"):
        e = sections.get(name, {})
        lines.append(f"| {name} | {e.get('status', '-')} | {fmt(e.get('longest_pair_tokens'))} | {e.get('stopped', '-')} |")
    lines += ["", "## Other sections", "", "| section | status | details |", "|---|---|---|"]
    for name, e in sections.items():
        if name.startswith(("distributed", "vllm", "qlora", "engines")) or e["status"] != "ok":
            details = (
                e.get("error") or e.get("why") or {k: v for k, v in e.items() if k not in ("status", "seconds", "traceback")}
            )
            lines.append(f"| {name} | {e['status']} | {str(details).replace('|', '/')[:400]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo instead of NCCL)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and lengths (with --cpu: the suite's smoke run)")
    parser.add_argument("--no-trl", action="store_true", help="leave the TRL comparison runs out")
    parser.add_argument("--out", default="runs/gpu_check", help="where gpu_check.json, gpu_check.md and work/ go")
    parser.add_argument("--nproc", type=int, default=0, help="torchrun processes (default: the GPUs present; 2 with --cpu)")
    parser.add_argument("--section-timeout", type=int, default=300, help="seconds any one child process may run")
    parser.add_argument("--keep-work", action="store_true", help="keep the model, data and runs under OUT/work")
    parser.add_argument("--vllm-python", help="the interpreter of the vLLM server (default .venv-vllm, else this one)")
    parser.add_argument("--worker", choices=("dpokit", "trl", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker == "vllm":
        vllm_worker(options)
        return
    if options.worker:
        worker(options)
        return
    plan = make_plan(options)
    plan.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(plan.out / "work", ignore_errors=True)
    started = time.perf_counter()
    report = run_sections(plan)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (plan.out / "gpu_check.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (plan.out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")
    if not options.keep_work:
        shutil.rmtree(plan.out / "work", ignore_errors=True)
    failed = failed_sections(report)
    print(f"[gpu-check] {report['seconds']:.0f} s; reports: {plan.out / 'gpu_check.md'}, {plan.out / 'gpu_check.json'}")
    if failed:
        print(f"[gpu-check] FAILED sections: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
