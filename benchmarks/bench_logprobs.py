"""Peak memory of response log-probs: dpokit's chunked output layer vs the naive full-logits path.

Setting (defaults): one sequence of 2,048 scored tokens, hidden size 512, vocabulary 128,000 -- a
Llama-3-sized vocabulary. Both methods compute sum_m log softmax(h_m W^T)[y_m] and back-propagate
into the hidden states and the output weight (forward + backward, float32, CPU):

* naive:   ``log_softmax(hidden @ W.T).gather(...)`` -- what ``model(...).logits`` + log_softmax does;
* chunked: :func:`dpokit.logprobs.chunked_token_logps` with ``chunk_size`` tokens per chunk.

How memory is measured, and why this way: PyTorch's CPU allocations are invisible to
``tracemalloc``, so each run is a fresh Python subprocess that allocates its inputs, records its
resident set size (RSS), runs forward + backward once, and reports the kernel's high-water mark
(``getrusage`` ``ru_maxrss``) minus that RSS. Large tensors are ``mmap``-ed and returned to the OS
when freed, so the high-water mark is the true peak of live memory, including allocator and library
scratch space. Methods alternate (naive, chunked, naive, ...) to spread machine noise evenly; the
medians are reported. Inputs and parameter gradients (the same for both methods) are excluded.

Run: ``python benchmarks/bench_logprobs.py [--repeats 3] [--vocab 128000] [--tokens 2048]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

WORKER = r"""
import json, resource, sys, time
import psutil, torch
from dpokit.logprobs import chunked_token_logps

method, vocab, tokens, hidden_size, chunk_size, threads = sys.argv[1:7]
vocab, tokens, hidden_size, chunk_size, threads = int(vocab), int(tokens), int(hidden_size), int(chunk_size), int(threads)
torch.set_num_threads(threads)

def token_logps_of(hidden, weight, targets):
    if method == "naive":
        return torch.log_softmax(hidden @ weight.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    return chunked_token_logps(hidden, weight, targets, chunk_size=chunk_size)

# Warm up on a tiny problem first, so lazily loaded kernels and thread pools are in the baseline.
small_hidden, small_weight = torch.randn(8, hidden_size, requires_grad=True), torch.randn(64, hidden_size, requires_grad=True)
token_logps_of(small_hidden, small_weight, torch.zeros(8, dtype=torch.long)).sum().backward()
del small_hidden, small_weight
torch.manual_seed(0)
hidden = (torch.randn(tokens, hidden_size) * 0.5).requires_grad_(True)
weight = (torch.randn(vocab, hidden_size) * 0.02).requires_grad_(True)
targets = torch.randint(0, vocab, (tokens,))
# Pre-allocate the parameter gradients both methods produce, so they are not counted as "extra".
hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
baseline = psutil.Process().memory_info().rss
start = time.perf_counter()
token_logps = token_logps_of(hidden, weight, targets)
token_logps.sum().backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
print(json.dumps({"peak_extra_bytes": peak - baseline, "seconds": seconds, "value": token_logps.sum().item()}))
"""


def run_once(method: str, args: argparse.Namespace, chunk_size: int) -> dict:
    command = [
        sys.executable,
        "-c",
        WORKER,
        method,
        str(args.vocab),
        str(args.tokens),
        str(args.hidden),
        str(chunk_size),
        str(args.threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128_000)
    parser.add_argument("--tokens", type=int, default=2_048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    methods = [("naive", 0)] + [("chunked", c) for c in args.chunk_sizes]
    runs: dict[str, list[dict]] = {f"{m}" if m == "naive" else f"chunked/{c}": [] for m, c in methods}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for method, chunk_size in methods:  # alternate methods within each repeat
            key = "naive" if method == "naive" else f"chunked/{chunk_size}"
            runs[key].append(run_once(method, args, chunk_size))

    naive_value = statistics.median(r["value"] for r in runs["naive"])
    naive_peak = statistics.median(r["peak_extra_bytes"] for r in runs["naive"])
    gib = 2**30
    print(
        f"vocab {args.vocab:,}, {args.tokens:,} scored tokens, hidden {args.hidden}, float32, forward + backward, "
        f"{args.threads} threads, median of {args.repeats} alternating runs"
    )
    print(f"{'method':<16}{'peak extra memory':>20}{'vs naive':>10}{'time':>10}{'|sum diff|':>12}")
    summary = {}
    for key, results in runs.items():
        peak = statistics.median(r["peak_extra_bytes"] for r in results)
        seconds = statistics.median(r["seconds"] for r in results)
        value = statistics.median(r["value"] for r in results)
        summary[key] = {"peak_extra_gib": peak / gib, "ratio_to_naive": peak / naive_peak, "seconds": seconds}
        print(f"{key:<16}{peak / gib:>16.3f} GiB{peak / naive_peak:>10.3f}{seconds:>9.1f}s{abs(value - naive_value):>12.2e}")
    print(f"(benchmark wall time {time.perf_counter() - started:.0f}s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "results": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
