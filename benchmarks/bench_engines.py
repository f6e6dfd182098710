"""Sampling engines side by side: completion tokens per second of the ``dpokit`` engine (its own batched
generator, in this process) and the ``vllm`` engine (a vLLM OpenAI-compatible server on 127.0.0.1, run
from ``.venv-vllm``, reached over HTTP), on the same model and the same prompts.

The model is the benchmarks' Llama (:func:`fixtures.llama_config`: hidden 256, 4 layers, about 5M
parameters, random init) with the 4,096-token BPE of :func:`fixtures.train_bpe_tokenizer`, saved once
to ``benchmarks/out/engines/model``. Prompts are the first 24 tokens of English-like sentences. Each
measurement samples one completion of ``--max-new-tokens`` tokens (temperature 1, no top-k/top-p) for
each of B prompts, B in ``--batches`` (1, 16, 256), through ``engine.sample`` -- the call the online
loop makes. Tokens are the completions' own (a stop token included). Both engines are warmed up once;
then every repeat runs every batch size with the engines alternating (which goes first flips each
repeat). Reported: medians with the range, and vLLM / dpokit.

The vLLM server is started by the benchmark (``--url`` uses a running one instead) with the same
settings as the tests' (float32, eager mode); it uses every core, and the dpokit engine gets as many
torch threads (``--threads``, default: all cores).

    python benchmarks/bench_engines.py                 # 3 repeats, batches 1, 16, 256
    python benchmarks/bench_engines.py --repeats 5 --url http://127.0.0.1:8000
    python benchmarks/bench_engines.py --model path/to/a-1B-model   # e.g. on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
OUT = HERE / "out" / "engines"
ENGINES = ("dpokit", "vllm")
PROMPT_TOKENS = 24


def model_dir() -> Path:
    """The benchmark model and tokenizer, saved once."""
    target = OUT / "model"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import LlamaForCausalLM

    from fixtures import llama_config, train_bpe_tokenizer

    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer()
    model = LlamaForCausalLM(llama_config(len(tokenizer)))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """``count`` prompts of PROMPT_TOKENS tokens each (English-like text, deterministic)."""
    from fixtures import english_like_text

    ids: list[list[int]] = []
    for line in english_like_text(num_lines=4 * count, seed=7):
        tokens = tokenizer(line, add_special_tokens=False)["input_ids"]
        if len(tokens) >= PROMPT_TOKENS:
            ids.append(tokens[:PROMPT_TOKENS])
        if len(ids) == count:
            return ids
    raise RuntimeError("not enough long sentences for the prompts")


def start_server(
    directory: Path,
    python: Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cores: set[int] | None = None,
    log_path: Path | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """A vLLM server on 127.0.0.1 (a free port) serving ``directory`` in float32, eager mode, with ``args``
    added and ``env`` over this environment; ``cores``: the CPU cores it may run on (default: all).
    Returns the process and its URL once ``/v1/models`` answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory), "--dtype", "float32"]
    command += ["--enforce-eager", "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port), *args]
    log_path = log_path or OUT / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, preexec_fn=pin)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return process, url
        except OSError:
            time.sleep(1)
    process.terminate()
    raise RuntimeError("the vLLM server did not start")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=60)


def measure(engine: Any, ids: list[list[int]], max_new_tokens: int) -> tuple[float, int]:
    """Seconds and completion tokens of one ``engine.sample`` call."""
    from dpokit.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=1, seed=0)
    started = time.perf_counter()
    completions = engine.sample(ids, sampling)
    return time.perf_counter() - started, sum(len(c.token_ids) for c in completions)


def run(options: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.generation import build_engine

    torch.set_num_threads(options.threads)
    directory = Path(options.model) if options.model else model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    server, url = (None, options.url) if options.url else start_server(directory, Path(options.vllm_python))
    try:
        engines = {
            "dpokit": build_engine("dpokit", model=model, tokenizer=tokenizer, batch_size=max(options.batches)),
            "vllm": build_engine("vllm", tokenizer=tokenizer, url=url),
        }
        ids = prompts(tokenizer, max(options.batches))
        for engine in engines.values():  # warm-up
            measure(engine, ids[:16], 8)
        results: dict[str, dict[int, list[float]]] = {name: {b: [] for b in options.batches} for name in ENGINES}
        for repeat in range(options.repeats):
            order = ENGINES if repeat % 2 == 0 else ENGINES[::-1]
            for batch in options.batches:
                for name in order:
                    seconds, tokens = measure(engines[name], ids[:batch], options.max_new_tokens)
                    results[name][batch].append(tokens / seconds)
                    print(
                        f"repeat {repeat} batch {batch:>3} {name:>6}: {tokens / seconds:8.0f} tokens/s ({tokens} tokens)",
                        flush=True,
                    )
    finally:
        if server is not None:
            stop_server(server)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "model": options.model or "Llama hidden 256, 4 layers, vocab 4096 (about 5M parameters), float32",
        "max_new_tokens": options.max_new_tokens,
        "threads": options.threads,
        "tokens_per_s": {name: {str(b): v for b, v in by_batch.items()} for name, by_batch in results.items()},
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['date']}, {report['machine']}; {report['model']}; {report['max_new_tokens']} new tokens per prompt",
        "",
        "| prompts per call | dpokit tokens/s (median, range) | vLLM server tokens/s (median, range) | vLLM / dpokit |",
        "|---:|---:|---:|---:|",
    ]
    for batch, dpokit in report["tokens_per_s"]["dpokit"].items():
        vllm = report["tokens_per_s"]["vllm"][batch]
        d, v = statistics.median(dpokit), statistics.median(vllm)
        ranges = f"({min(dpokit):,.0f}-{max(dpokit):,.0f})", f"({min(vllm):,.0f}-{max(vllm):,.0f})"
        lines.append(f"| {batch} | {d:,.0f} {ranges[0]} | {v:,.0f} {ranges[1]} | {v / d:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", help="a saved model directory to use instead of the 5M-parameter benchmark Llama")
    parser.add_argument("--url", help="a running vLLM server serving benchmarks/out/engines/model (default: start one)")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    options = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    report = run(options)
    (OUT / "results.json").write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
