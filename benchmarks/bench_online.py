"""Online DPO on a CPU: generation speed, and one online run against TRL's experimental online DPO.

Generation is most of an online round on a CPU, so it is measured first. Everything runs on the
sentiment experiment's SFT model (a GPT-2 of about 2M parameters and its 1,024-token BPE, trained
from scratch on the generated review corpus and cached by ``dpokit experiment``; ``--lm quick`` takes
the smaller one) with one torch thread, the experiment's setting.

1. ``--part generation`` -- completion tokens per second for ``--prompts`` review prefixes x
   ``--samples`` completions, at most ``--max-new-tokens`` tokens, temperature 1, no top-k/top-p:

   * ``dpokit``     -- :func:`dpokit.generation.generate`: all rows left-padded in batches of
                       ``--batch-rows``, the prompt run once, then one token per step on the KV cache;
   * ``hf-loop``    -- a plain ``model.generate`` loop, one call per prompt (its ``--samples``
                       completions as ``num_return_sequences``), the way a script without batching does it;
   * ``hf-batched`` -- ``model.generate`` on the same left-padded batches of ``--batch-rows`` rows.

   Tokens are the completions' own (up to and including EOS, pads not counted). Each worker generates
   once untimed, then times one pass over all prompts.

2. ``--part online`` -- online DPO from the SFT model with the ground-truth reward (VADER) as judge:
   ``--steps`` optimizer steps, each on ``--batch-prompts`` prompts x 2 fresh samples, the pair
   labelled best vs worst, sigmoid loss with beta 0.1, AdamW at ``--lr``, the reference fixed at the
   SFT model:

   * ``dpokit`` -- ``dpokit online`` in its per-step mode (one generate -> judge -> update cycle per step);
   * ``trl``    -- ``trl.experimental.online_dpo.OnlineDPOTrainer`` (TRL 1.16) with the same reward
                   function, prompts, batch, sampling and optimizer.

   Reported: seconds per step (= per round), and the reward and KL(pi || pi_sft) reached after the
   last step, measured the same way for both (:func:`dpokit.analysis.frontier.estimate_reward_kl`,
   ``--eval-prompts`` held-out prompts x 2 samples).

Each measurement runs in a fresh subprocess; the contenders alternate, ``--repeats`` times; the
figures are medians (with the range), and ratios against dpokit measured in the same run.

    python benchmarks/bench_online.py                        # both parts, 3 repeats
    python benchmarks/bench_online.py --part generation --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GENERATORS = ("dpokit", "hf-loop", "hf-batched")
ONLINE = ("dpokit", "trl")
PROMPT_SEED = 3003  # held-out review prefixes, a corpus seed neither the SFT model nor the experiment's prompts use
EVAL_SEED = 2002  # the sentiment experiment's evaluation prompts


def _sft(options: argparse.Namespace) -> tuple[Any, Any, Path]:
    from dpokit.experiments.lm import load_or_pretrain
    from dpokit.experiments.sentiment import MODES

    model, tokenizer, model_dir = load_or_pretrain(MODES[options.lm].lm, options.cache_dir, log=None)
    return model, tokenizer, model_dir


# ------------------------------------------------------------------------------------------------
# Part 1: generation
# ------------------------------------------------------------------------------------------------


def _count_tokens(rows: Any, eos_id: int, pad_id: int) -> int:
    """Completion tokens of ``model.generate`` output rows (B, T): up to and including the first EOS."""
    total = 0
    for row in rows.tolist():
        count = 0
        for token in row:
            if token == pad_id and token != eos_id:
                break
            count += 1
            if token == eos_id:
                break
        total += count
    return total


def _hf_generate(model: Any, tokenizer: Any, prompts: list[str], options: argparse.Namespace) -> int:
    import torch

    kwargs = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=options.max_new_tokens,
        num_return_sequences=options.samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokens = 0
    with torch.no_grad():
        if options.worker == "hf-loop":
            for prompt in prompts:
                encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
                out = model.generate(**encoded, **kwargs)
                tokens += _count_tokens(out[:, encoded["input_ids"].shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id)
        else:
            per_batch = max(1, options.batch_rows // options.samples)
            for start in range(0, len(prompts), per_batch):
                encoded = tokenizer(
                    prompts[start : start + per_batch],
                    return_tensors="pt",
                    padding=True,
                    padding_side="left",
                    add_special_tokens=False,
                )
                out = model.generate(**encoded, **kwargs)
                tokens += _count_tokens(out[:, encoded["input_ids"].shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id)
    return tokens


def _dpokit_generate(model: Any, tokenizer: Any, prompts: list[str], options: argparse.Namespace) -> int:
    from dpokit.generation import SamplingConfig, encode_prompts, generate, stop_token_ids
    from dpokit.models import pad_id_of

    _, prompt_ids = encode_prompts(tokenizer, prompts)
    sampling = SamplingConfig(
        max_new_tokens=options.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=options.samples, seed=options.seed
    )
    completions = generate(
        model,
        prompt_ids,
        sampling,
        stop_token_ids=stop_token_ids(tokenizer),
        pad_token_id=pad_id_of(tokenizer),
        batch_size=options.batch_rows,
    )
    return sum(len(c.token_ids) for c in completions)


def generation_worker(options: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from dpokit.experiments.preferences import make_prompts

    transformers.logging.set_verbosity_error()
    model, tokenizer, _ = _sft(options)
    model.eval()
    prompts = make_prompts(tokenizer, options.prompts, PROMPT_SEED)
    run = _dpokit_generate if options.worker == "dpokit" else _hf_generate
    torch.manual_seed(options.seed)
    run(model, tokenizer, prompts[: max(1, len(prompts) // 8)], options)  # warm-up
    start = time.perf_counter()
    tokens = run(model, tokenizer, prompts, options)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


# ------------------------------------------------------------------------------------------------
# Part 2: an online DPO run, dpokit against TRL
# ------------------------------------------------------------------------------------------------


def _trl_online(model_dir: Path, prompts: list[str], out_dir: Path, options: argparse.Namespace) -> tuple[Any, list[float]]:
    """TRL's OnlineDPOTrainer on the SFT model; returns the trained model and the end time of every step."""
    import warnings

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from dpokit.experiments.reward import vader_reward
    from dpokit.models import load_policy

    loaded = load_policy(model_dir, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "left"
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

    config = OnlineDPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=options.batch_prompts,
        gradient_accumulation_steps=1,
        max_steps=options.steps,
        max_new_tokens=options.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=[0.1],
        loss_type="sigmoid",
        learning_rate=options.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        save_strategy="no",
        logging_steps=max(1, options.steps // 4),
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=options.seed,
        data_seed=options.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = OnlineDPOTrainer(
            model=model,
            reward_funcs=vader_reward,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            callbacks=[StepTimes()],
        )
        trainer.remove_callback(PrinterCallback)
        step_ends.append(time.perf_counter())
        trainer.train()
    trained: torch.nn.Module = trainer.model
    return trained, step_ends


def online_worker(options: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import transformers

    from dpokit.analysis.frontier import estimate_reward_kl
    from dpokit.experiments.preferences import make_prompts
    from dpokit.experiments.reward import vader_reward

    transformers.logging.set_verbosity_error()
    sft_model, tokenizer, model_dir = _sft(options)
    prompts = make_prompts(tokenizer, options.steps * options.batch_prompts, PROMPT_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        run = _trl_online if options.worker == "trl" else _dpokit_online
        policy, step_ends = run(model_dir, prompts, Path(tmp), options)
    step_s = [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)]
    eval_prompts = make_prompts(tokenizer, options.eval_prompts, EVAL_SEED)
    estimate = estimate_reward_kl(
        policy.eval(),
        sft_model,
        tokenizer,
        eval_prompts,
        vader_reward,
        num_samples=2,
        max_new_tokens=options.max_new_tokens,
        seed=7,
    )
    return {
        "steps": len(step_s),
        "step_s": step_s,
        "total_s": step_ends[-1] - step_ends[0],
        "reward": estimate["reward_mean"],
        "reward_sem": estimate["reward_sem"],
        "kl": estimate["kl_mean"],
        "mean_length": estimate["mean_length"],
    }


def _sft_reward(options: argparse.Namespace) -> float:
    from dpokit.analysis.frontier import estimate_reward_kl
    from dpokit.experiments.preferences import make_prompts
    from dpokit.experiments.reward import vader_reward

    sft_model, tokenizer, _ = _sft(options)
    eval_prompts = make_prompts(tokenizer, options.eval_prompts, EVAL_SEED)
    estimate = estimate_reward_kl(
        sft_model, sft_model, tokenizer, eval_prompts, vader_reward, num_samples=2, max_new_tokens=options.max_new_tokens, seed=7
    )
    return float(estimate["reward_mean"])


def _dpokit_online(model_dir: Path, prompts: list[str], out_dir: Path, options: argparse.Namespace) -> tuple[Any, list[float]]:
    """``dpokit online`` in its per-step mode on the SFT model; returns the trained model and step end times."""
    from dpokit.config import config_from_dict
    from dpokit.models import load_policy
    from dpokit.online import run_online

    prompts_path = out_dir / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(model_dir), "dtype": "float32", "device": "cpu"},
            "data": {"max_length": 96, "max_prompt_length": 16, "cache_dir": str(out_dir / "cache")},
            "loss": {"beta": 0.1, "terms": [{"name": "sigmoid"}]},
            "reference": {"strategy": "copy"},
            "optim": {
                "optimizer": "adamw",
                "lr": options.lr,
                "warmup_steps": 0,
                "schedule": "constant",
                "batch_size": options.batch_prompts,
                "grad_accumulation": 1,
                "max_grad_norm": 1.0,
                "weight_decay": 0.0,
                "seed": options.seed,
            },
            "eval": {"every_steps": 0},
            "logging": {"run_dir": str(out_dir / "run"), "tensorboard": False, "plot": False, "progress_bar": False},
            "checkpoint": {"every_steps": 0},
            "online": {
                "prompts_path": str(prompts_path),
                "rounds": options.steps,
                "prompts_per_round": options.batch_prompts,
                "samples_per_prompt": 2,
                "steps_per_round": 1,
                "pairs": "best_vs_worst",
                "judge": "reward:dpokit.experiments.reward:vader_reward",
                "sampling": {"max_new_tokens": options.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
            },
        }
    )
    step_ends = [time.perf_counter()]
    result = run_online(cfg, on_step=lambda step, metrics: step_ends.append(time.perf_counter()) and None)
    if result.output_dir is None:
        raise SystemExit(f"dpokit online stopped early: {result.stop_reason}")
    return load_policy(result.output_dir, dtype="float32", device="cpu").model, step_ends


def parent_online(options: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in ONLINE}
    for repeat in range(options.repeats):
        for contender in ONLINE:
            record = launch("online", contender, options)
            results[contender].append(record)
            print(
                f"repeat {repeat + 1} {contender:6s} {record['steps']} steps, "
                f"median {statistics.median(record['step_s']):.2f} s/step, "
                f"reward {record['reward']:.3f}  KL {record['kl']:.2f}",
                flush=True,
            )
    print(
        f"\nonline DPO, VADER as judge: {options.steps} steps of {options.batch_prompts} prompts x 2 samples, "
        f"at most {options.max_new_tokens} new tokens, beta 0.1, AdamW lr {options.lr:g}; evaluation on {options.eval_prompts} "
        f"held-out prompts x 2 samples; {options.repeats} repeats; the SFT model's reward {_sft_reward(options):.3f}\n"
    )
    dpokit = statistics.median(statistics.median(r["step_s"]) for r in results["dpokit"])
    print(
        "| trainer | s per step (= round), median (range) | dpokit's speed-up | reward after the last step | KL (nats) | length |"
    )
    print("|---|---|---|---|---|---|")
    labels = {"dpokit": "dpokit online, per-step mode", "trl": "TRL 1.16 `OnlineDPOTrainer` (experimental)"}
    for contender, records in results.items():
        per_step = [statistics.median(r["step_s"]) for r in records]
        rewards = [r["reward"] for r in records]
        kls = [r["kl"] for r in records]
        lengths = [r["mean_length"] for r in records]
        print(
            f"| {labels[contender]} | {_median_range(per_step, 2)} | {statistics.median(per_step) / dpokit:.2f}x "
            f"| {_median_range(rewards, 3)} | {_median_range(kls, 2)} | {statistics.median(lengths):.1f} |"
        )


# ------------------------------------------------------------------------------------------------
# Launching, alternating, reporting
# ------------------------------------------------------------------------------------------------


def launch(part: str, contender: str, options: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; returns its RESULT record."""
    command = [sys.executable, __file__, "--part", part, "--worker", contender]
    for name in ("lm", "cache_dir", "prompts", "samples", "max_new_tokens", "batch_rows", "threads", "seed"):
        command += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    for name in ("steps", "batch_prompts", "lr", "eval_prompts"):
        command += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(options.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{part}/{contender} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def _median_range(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def parent_generation(options: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, Any]]] = {g: [] for g in GENERATORS}
    for repeat in range(options.repeats):
        for generator in GENERATORS:
            record = launch("generation", generator, options)
            results[generator].append(record)
            print(
                f"repeat {repeat + 1} {generator:10s} {record['tokens_per_s']:8.1f} tokens/s ({record['tokens']} tokens)",
                flush=True,
            )
    print(
        f"\ngeneration: {options.prompts} prompts x {options.samples} samples, at most {options.max_new_tokens} new tokens, "
        f"temperature 1, batches of {options.batch_rows} rows, {options.repeats} repeats\n"
    )
    dpokit = statistics.median(r["tokens_per_s"] for r in results["dpokit"])
    print("| generator | completion tokens/s, median (range) | dpokit's speed-up |")
    print("|---|---|---|")
    labels = {
        "dpokit": "dpokit `generate` (batched, KV cache)",
        "hf-loop": "`model.generate`, one call per prompt",
        "hf-batched": "`model.generate`, same batches",
    }
    for generator, records in results.items():
        speeds = [r["tokens_per_s"] for r in records]
        ratio = dpokit / statistics.median(speeds)
        print(f"| {labels[generator]} | {_median_range(speeds)} | {ratio:.2f}x |")


def main() -> None:
    from bench_train import load_average, machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["generation", "online", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lm", choices=["full", "quick"], default="full", help="which sentiment SFT model")
    parser.add_argument("--cache-dir", default=".dpokit_cache/sentiment")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-prompts", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker")
    options = parser.parse_args()
    if options.worker:
        import torch

        torch.set_num_threads(options.threads)
        worker = generation_worker if options.part == "generation" else online_worker
        print("RESULT " + json.dumps(worker(options)), flush=True)
        return
    started = time.time()
    _sft(options)  # pretrain and cache the SFT model once, outside any measurement
    print(f"{time.strftime('%Y-%m-%d')}, {machine()}, {options.threads} torch thread(s), load average {load_average()}\n")
    if options.part in ("generation", "all"):
        parent_generation(options)
    if options.part in ("online", "all"):
        parent_online(options)
    print(f"\nload average at the end {load_average()}; total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
