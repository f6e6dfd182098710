"""Sequence parallelism on CPU: one DPO policy step's activation memory per rank and step time, rows
split over C ranks (gloo) vs one process.

The model is a Llama built from config (hidden 256, 4 layers, 8 heads / 4 key-value heads, 32,000-entry
vocabulary, float32, random init, seed 0). A pair of L tokens is a prompt of L/4 and two responses of
3L/8 (``bench_scaling.py``'s shape), in the padded layout: two rows of 5L/8 tokens. A step is the policy's
forward and backward through :class:`dpokit.training.parallel.LogpsModule` (split over the group when
C > 1) and the DPO sigmoid loss against fixed reference log-probs; the reference pass, the gradient
all-reduce and the optimizer are left out (the same in both). Each rank runs one torch thread.

Reported per rank: the resident memory before the first long step (model, weights' gradients after a
short warm-up step, libraries) and the peak above it during three long steps (``ru_maxrss``), and the
mean time of steps 2-3.

    python benchmarks/bench_sequence_parallel.py --length 8192              # C = 1 and C = 2
    python benchmarks/bench_sequence_parallel.py --length 8192 --checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(length: int, checkpointing: bool) -> tuple[torch.nn.Module, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpokit.data.collate import PaddedCollator

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max(2048, length),
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompt, response = length // 4, 3 * length // 8
    generator = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 32000, (n,), generator=generator).tolist()

    item = {"example_id": 0, "prompt_ids": tokens(prompt), "response_ids": [tokens(response), tokens(response)]}
    return model, PaddedCollator(0)([item])


def step(module: torch.nn.Module, batch: object) -> float:
    import torch.nn.functional as F

    module.zero_grad(set_to_none=False)
    started = time.perf_counter()
    logps = module(batch).logps  # (1, 2): chosen, rejected
    loss = -F.logsigmoid(0.1 * (logps[:, 0] - logps[:, 1])).mean()
    loss.backward()
    return time.perf_counter() - started


def worker(length: int, checkpointing: bool, out: Path) -> None:
    import torch.distributed as dist

    from dpokit.training.parallel import LogpsModule
    from dpokit.training.sequence_parallel import SequenceGroup

    torch.set_num_threads(1)
    sequence = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        size = dist.get_world_size()
        sequence = SequenceGroup(dist.new_group(list(range(size))), dist.get_rank(), size)
    model, batch = build(length, checkpointing)
    module = LogpsModule(model.train(), chunk_size=1024, sequence=sequence)
    _, short = build(64, False)
    step(module, short)  # warm-up: kernels, the weights' gradients, the one-time checks
    base = current_rss()
    times = [step(module, batch) for _ in range(3)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"rank": sequence.rank if sequence else 0, "base": base, "peak_above": peak - base, "step_s": sum(times[1:]) / 2}
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if sequence is not None:
        dist.destroy_process_group()


def launch(ranks: int, length: int, checkpointing: bool, out: Path) -> list[dict]:
    args = [__file__, "--worker", "--length", str(length), "--out", str(out)] + (["--checkpointing"] if checkpointing else [])
    if ranks > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]
        command = [sys.executable, *launcher, *args]
    else:
        command = [sys.executable, *args]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192, help="tokens per pair (prompt + chosen + rejected)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.length, args.checkpointing, args.out)
        return
    mib = 2**20
    print(f"pair of {args.length} tokens (rows of {5 * args.length // 8}), checkpointing {'on' if args.checkpointing else 'off'}")
    print("| ranks C | rank | resident before (MiB) | peak above it (MiB) | step (s) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            records = launch(ranks, args.length, args.checkpointing, Path(tmp) / f"c{ranks}.jsonl")
            for r in sorted(records, key=lambda x: x["rank"]):
                print(f"| {ranks} | {r['rank']} | {r['base'] / mib:.0f} | {r['peak_above'] / mib:.0f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
