"""Run every benchmark and print its tables (``make bench``).

1. ``bench_tokenize.py`` -- data preparation, dpokit vs TRL 1.16, 50,000 pairs;
2. ``bench_logprobs.py`` -- peak memory of the chunked output layer vs full logits;
3. ``bench_train.py``    -- DPO training end to end on every fixture (short responses, response-heavy,
   conversational): whole-process wall time, time to the first optimizer step and where it goes, steady
   pairs/s, peak RSS, MFU against the matmul rate of the same run (a profiled step where it is below 60%),
   dpokit defaults / precomputed reference / compiled (first and second run) vs TRL 1.16 defaults and
   its fastest configuration;
4. ``bench_scaling.py``  -- one training step's peak memory and tokens/s vs sequence length (512-8,192
   tokens per pair) and vocabulary (4k-256k), dpokit vs TRL 1.16 defaults; writes ``docs/scaling.png``;
5. ``bench_online.py``   -- online DPO: generation tokens/s of dpokit's generator vs ``model.generate``, and
   an online run's time per step and reward reached vs TRL 1.16's experimental ``OnlineDPOTrainer`` (its
   third part, ``--part engines``, the same run with each sampling engine, needs ``.venv-vllm`` and runs
   on its own: docs/vllm.md);
6. ``bench_vlm.py``      -- vision-language DPO on a tiny LLaVA and the shapes task (LoRA on the language
   model): whole-process wall time and step time vs TRL 1.16 defaults, and the language-model positions
   and images each forwards per pair.

Each runs in its own process, one after another (they time things, so never in parallel).
``--quick`` runs smaller versions (for a smoke check, not for the README).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["tokenize", "logprobs", "train", "scaling", "online", "vlm"],
        default=["tokenize", "logprobs", "train", "scaling", "online", "vlm"],
    )
    options = parser.parse_args()
    runs = {
        "tokenize": ["bench_tokenize.py"] + (["--pairs", "5000", "--repeats", "1"] if options.quick else []),
        "logprobs": ["bench_logprobs.py"] + (["--repeats", "1"] if options.quick else []),
        "train": ["bench_train.py"] + (["--pairs", "32", "--repeats", "1", "--no-profile"] if options.quick else []),
        "scaling": ["bench_scaling.py"]
        + (["--lengths", "512", "1024", "--vocabs", "4096", "--vocab-length", "512", "--plot", ""] if options.quick else []),
        "online": ["bench_online.py"]
        + (["--repeats", "1", "--prompts", "16", "--steps", "4", "--eval-prompts", "32"] if options.quick else []),
        "vlm": ["bench_vlm.py"] + (["--repeats", "1", "--pairs", "16", "--max-steps", "2"] if options.quick else []),
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    failed = []
    for name in options.only:
        print(f"\n=== {name}: {' '.join(runs[name])} ({time.strftime('%Y-%m-%d %H:%M')}) ===\n", flush=True)
        if subprocess.run([sys.executable, str(HERE / runs[name][0]), *runs[name][1:]], env=env).returncode != 0:
            failed.append(name)
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
