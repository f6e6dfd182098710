"""Tokenizing preference pairs: dpokit's ``prepare_dataset`` vs TRL 1.16 ``DPOTrainer`` dataset preparation.

Both tokenize the same generated pairs (``benchmarks/fixtures.py``: English-like text, prompts ~95
tokens, responses ~60-160) with the same 4,096-token byte-level BPE tokenizer in one process:

* dpokit: ``prepare_dataset(jsonl_file, tokenizer, cache_dir=<empty dir>)`` -- a *cold* cache, and the
  time includes reading + validating the JSONL file, hashing it, tokenizing (``encode_texts``: each
  distinct word encoded once, see ``dpokit/data/encode.py``) and writing the cache entry. A warm
  (cache-hit) run is timed too.
* TRL: ``DPOTrainer._prepare_dataset`` on an in-memory ``datasets.Dataset`` (built before the clock
  starts), exactly the preparation a ``DPOTrainer`` runs in its constructor: add EOS, then three
  tokenizer calls per row (prompt, prompt+chosen, prompt+rejected) through ``Dataset.map`` with
  ``dataset_num_proc=None`` (one process).

Runs alternate (dpokit, TRL, dpokit, TRL, ...) and medians are reported. The token ids of both are
compared on every row (they agree when prompts end on a token boundary, as here).

    python benchmarks/bench_tokenize.py               # 50,000 pairs, 3 alternating repeats
    python benchmarks/bench_tokenize.py --pairs 5000 --repeats 1
    python benchmarks/bench_tokenize.py --indented   # every sentence on its own line, indented 4 spaces

``--indented`` is the hard case for dpokit's word cache: a space after a newline is no safe cut, so
every line start is glued to the previous line's last word and far fewer words repeat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402  (benchmarks/fixtures.py: English-like text, 4,096-token BPE, pair generator)


def time_dpokit(path: Path, tokenizer, cache_dir: Path):
    from dpokit.data import PrepareOptions, prepare_dataset

    start = time.perf_counter()
    dataset = prepare_dataset(path, tokenizer, PrepareOptions(max_length=512, max_prompt_length=256), cache_dir=cache_dir)
    return time.perf_counter() - start, dataset


def build_trl_trainer(tokenizer, output_dir: str, rows: list[dict[str, str]]):
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=512)
    model, ref_model = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    args = DPOConfig(
        output_dir=output_dir,
        report_to=[],
        dataset_num_proc=None,
        max_length=512,
        logging_strategy="no",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    return DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows[:8]), processing_class=tokenizer
    )


def time_trl(trainer, dataset, tokenizer):
    start = time.perf_counter()
    prepared = trainer._prepare_dataset(dataset, tokenizer, trainer.args, "train")
    return time.perf_counter() - start, prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--indented", action="store_true", help="put each sentence on its own line, indented by 4 spaces")
    options = parser.parse_args()

    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.disable_caching()
    transformers.logging.set_verbosity_error()
    logging.getLogger("dpokit").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    rows = fixtures.generate_pairs(options.pairs)
    if options.indented:
        rows = [{key: text.replace(". ", ".\n    ") for key, text in row.items()} for row in rows]
    tokenizer = fixtures.train_bpe_tokenizer(4096)
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        path = work_dir / "pairs.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        trainer = build_trl_trainer(tokenizer, str(work_dir / "trl"), rows)
        in_memory = datasets.Dataset.from_list(rows)

        dpokit_times, trl_times = [], []
        for repeat in range(options.repeats):
            seconds, dataset = time_dpokit(path, tokenizer, work_dir / f"cache-{repeat}")
            dpokit_times.append(seconds)
            seconds, trl_dataset = time_trl(trainer, in_memory, tokenizer)
            trl_times.append(seconds)
            print(f"  repeat {repeat + 1}: dpokit {dpokit_times[-1]:.2f} s, TRL {trl_times[-1]:.2f} s", flush=True)
        warm_times = [time_dpokit(path, tokenizer, work_dir / "cache-0")[0] for _ in range(3)]
        assert all(time_dpokit(path, tokenizer, work_dir / "cache-0")[1].from_cache for _ in range(1))

        trl_rows = trl_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
        agree = sum(
            item["prompt_ids"] == t["prompt_ids"] and item["response_ids"] == [t["chosen_ids"], t["rejected_ids"]]
            for item, t in zip(dataset.items, trl_rows, strict=True)
        )

    dpokit_median, trl_median, warm_median = map(statistics.median, (dpokit_times, trl_times, warm_times))
    threads = os.environ.get("RAYON_NUM_THREADS") or os.environ.get("RAYON_RS_NUM_CPUS") or f"default ({os.cpu_count()} cores)"
    print()
    print(f"Tokenizing {options.pairs:,} preference pairs, {options.repeats} alternating repeats, medians")
    print(
        f"(byte-level BPE, vocab {len(tokenizer)}, one process; tokenizer threads: {threads}"
        f"{'; indented text' if options.indented else ''})"
    )
    print()
    print(f"| {'pipeline':<44} | {'seconds':>8} | {'pairs/s':>9} | {'vs TRL':>7} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 11}|{'-' * 9}|")
    for name, seconds in [
        ("TRL 1.16 DPOTrainer._prepare_dataset", trl_median),
        ("dpokit prepare_dataset (cold cache)", dpokit_median),
        ("dpokit prepare_dataset (warm cache)", warm_median),
    ]:
        print(f"| {name:<44} | {seconds:>8.2f} | {options.pairs / seconds:>9,.0f} | {trl_median / seconds:>6.1f}x |")
    print()
    print(f"speed-up, cold cache: {trl_median / dpokit_median:.1f}x   identical token ids on {agree:,}/{options.pairs:,} pairs")


if __name__ == "__main__":
    main()
