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

3. ``--part engines`` -- the online run of part 2 (``dpokit online``, per-step mode) with each sampling
   engine (``online.sampling.engine``), everything else equal:

   * ``dpokit``         -- dpokit's generator, in the training process;
   * ``vllm-colocated`` -- a vLLM server on the trainer's own machine and resources (on a CPU: the same
                           cores, which the trainer and the server share; on a GPU: the trainer's GPU, the
                           server holding ``--gpu-memory-utilization`` of it);
   * ``vllm-server``    -- a vLLM server with resources of its own, as a cluster runs generation on other
                           machines (on a CPU: the server pinned to its own cores and the trainer to the
                           rest; on a GPU: another GPU, where there is one).

   The server is started for each run (not timed) on the start model, from ``--vllm-python`` (the
   ``.venv-vllm`` environment, docs/vllm.md), with the weight-sync settings dpokit's rounds need; it gets
   the policy's weights before every round's sampling. Reported: seconds per round (median over the run's
   rounds after the first), of which sampling and weight sync, and the reward and KL reached after the
   last round, measured the same way for every mode. The model is part 2's SFT model, or ``--model DIR``
   (any saved causal LM, e.g. the GPU check's ~1B Llama). The vLLM CPU build supports attention head
   sizes 32, 64, 80, ...: the quick SFT model (``--lm quick``, head size 32) runs on it, the full one
   (head size 48) does not.

Each measurement runs in a fresh subprocess; the contenders alternate (which goes first rotates each
repeat in part 3), ``--repeats`` times; the figures are medians (with the range), and ratios against
dpokit measured in the same run.

    python benchmarks/bench_online.py                        # parts 1 and 2, 3 repeats
    python benchmarks/bench_online.py --part generation --repeats 5
    nice -n 5 python benchmarks/bench_online.py --part engines --lm quick --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
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
ENGINE_MODES = ("dpokit", "vllm-colocated", "vllm-server")
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # the vLLM CPU build's attention kernels
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
    from dpokit.models import LoadOptions, load_policy

    loaded = load_policy(model_dir, LoadOptions(dtype="float32", device="cpu"))
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
    """``dpokit online`` in its per-step mode on the SFT model; returns the trained model and step end times.
    Part 3 (``--engine-url``) samples through the vLLM server there (``online.sampling.engine=vllm``)."""
    from dpokit.config import config_from_dict
    from dpokit.models import LoadOptions, load_policy
    from dpokit.online import run_online

    prompts_path = out_dir / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(model_dir), "dtype": options.dtype, "device": options.device},
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
                "sampling": {
                    "max_new_tokens": options.max_new_tokens,
                    "temperature": 1.0,
                    "top_p": 1.0,
                    "top_k": 0,
                    **({"engine": "vllm", "url": options.engine_url} if options.engine_url else {}),
                },
            },
        }
    )
    step_ends = [time.perf_counter()]
    result = run_online(cfg, on_step=lambda step, metrics: step_ends.append(time.perf_counter()) and None)
    if result.output_dir is None:
        raise SystemExit(f"dpokit online stopped early: {result.stop_reason}")
    return load_policy(result.output_dir, LoadOptions(dtype=options.dtype, device=options.device)).model, step_ends


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
# Part 3: one online round with each sampling engine
# ------------------------------------------------------------------------------------------------


def _start_model(options: argparse.Namespace) -> Path:
    """The online runs' start model: ``--model`` or the sentiment SFT model."""
    return Path(options.model) if options.model else _sft(options)[2]


def head_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    hidden = config.get("hidden_size") or config.get("n_embd")
    heads = config.get("num_attention_heads") or config.get("n_head")
    return int(config.get("head_dim") or hidden // heads)


def engines_worker(options: argparse.Namespace) -> dict[str, Any]:
    """One online run of part 3 (the engine named by ``--engine-url``, else dpokit's); per-round figures
    from the rounds' records, and the reward and KL reached."""
    import tempfile

    import transformers

    from dpokit.analysis.frontier import estimate_reward_kl
    from dpokit.experiments.preferences import make_prompts
    from dpokit.experiments.reward import vader_reward
    from dpokit.models import LoadOptions, load_policy

    transformers.logging.set_verbosity_error()
    if options.cores:
        os.sched_setaffinity(0, {int(c) for c in options.cores.split(",")})
    model_dir = _start_model(options)
    start = load_policy(model_dir, LoadOptions(dtype=options.dtype, device=options.device))
    prompts = make_prompts(start.tokenizer, options.steps * options.batch_prompts, PROMPT_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        policy, step_ends = _dpokit_online(model_dir, prompts, Path(tmp), options)
        rounds = sorted((Path(tmp) / "run" / "rounds").glob("round-*/round.json"))
        stats = [json.loads(path.read_text()).get("completions", {}) for path in rounds]
    step_s = [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)]
    eval_prompts = make_prompts(start.tokenizer, options.eval_prompts, EVAL_SEED)
    estimate = estimate_reward_kl(
        policy.eval(), start.model, start.tokenizer, eval_prompts, vader_reward, 2, options.max_new_tokens, seed=7
    )
    return {
        "steps": len(step_s),
        "step_s": step_s,
        "generation_s": [float(r.get("time/generation_s", math.nan)) for r in stats],
        "sync_s": [float(r.get("engine/sync_s", 0.0)) for r in stats],
        "logp_gaps": [r.get("engine/logp_gap_per_token") for r in stats],  # per round (None: the engine reports none)
        "reward": estimate["reward_mean"],
        "kl": estimate["kl_mean"],
        "mean_length": estimate["mean_length"],
    }


def engine_placement(mode: str, options: argparse.Namespace) -> dict[str, Any] | str:
    """Where ``mode`` runs the trainer and the vLLM server: ``trainer_cores`` (None: all), the server's
    ``cores``, ``env`` and extra ``args``; or why the mode cannot run here (a string)."""
    if options.device == "cuda":
        import torch

        if mode == "vllm-colocated":
            return {"trainer_cores": None, "cores": None, "env": {}, "args": ["--gpu-memory-utilization", "0.3"]}
        if torch.cuda.device_count() < 2:
            return "one GPU: a server with a GPU of its own needs a second one"
        return {"trainer_cores": None, "cores": None, "env": {"CUDA_VISIBLE_DEVICES": "1"}, "args": []}
    cores = sorted(os.sched_getaffinity(0))  # the cores this process may use
    every = ",".join(map(str, cores))
    if mode == "vllm-colocated":
        return {"trainer_cores": None, "cores": None, "env": {"VLLM_CPU_OMP_THREADS_BIND": every}, "args": []}
    if len(cores) < 2:
        return "one CPU core: a server with cores of its own needs a second one"
    trainer, server = cores[: max(1, len(cores) // 2)], cores[max(1, len(cores) // 2) :]
    bind = ",".join(map(str, server))
    return {"trainer_cores": set(trainer), "cores": set(server), "env": {"VLLM_CPU_OMP_THREADS_BIND": bind}, "args": []}


def run_engine_mode(mode: str, model_dir: Path, options: argparse.Namespace) -> dict[str, Any]:
    """One online run with ``mode``'s engine (its vLLM server started first, not timed, and stopped after)."""
    from bench_engines import start_server, stop_server

    if mode == "dpokit":
        return launch("engines", mode, options)
    placement = engine_placement(mode, options)
    if isinstance(placement, str):
        return {"skipped": placement}
    config = json.loads((model_dir / "config.json").read_text())
    length = config.get("max_position_embeddings") or config.get("n_positions") or 1024
    args = ["--max-model-len", str(min(int(length), 1024)), *placement["args"]]
    if options.device == "cuda":
        args += ["--dtype", options.dtype]
    env = {"VLLM_SERVER_DEV_MODE": "1", **placement["env"]}  # dpokit's full-weight sync: /collective_rpc
    log = Path(options.server_log or (HERE / "out" / "online" / f"server-{mode}.log"))
    server, url = start_server(model_dir, Path(options.vllm_python), args=args, env=env, cores=placement["cores"], log_path=log)
    try:
        extra = ["--engine-url", url]
        if placement["trainer_cores"]:
            extra += ["--cores", ",".join(map(str, sorted(placement["trainer_cores"])))]
        return launch("engines", mode, options, extra)
    finally:
        stop_server(server)


def engines_summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over the repeats of each mode's median round time (rounds after the first: the first
    round's sampling includes each engine's start-up work), sampling and sync time, reward and KL."""
    summary: dict[str, Any] = {}
    for mode, records in results.items():
        ran = [r for r in records if "skipped" not in r]
        if not ran:
            summary[mode] = {"skipped": records[0]["skipped"] if records else "not run"}
            continue

        def per_run(key: str, records: list[dict[str, Any]] = ran) -> list[float]:
            return [statistics.median(r[key][1:] or r[key]) for r in records]

        summary[mode] = {
            "runs": len(ran),
            "round_s": per_run("step_s"),
            "generation_s": per_run("generation_s"),
            "sync_s": per_run("sync_s"),
            "reward": [r["reward"] for r in ran],
            "kl": [r["kl"] for r in ran],
            "logp_gap": max((g for r in ran for g in r["logp_gaps"] if g is not None), default=None),
            "logp_gap_first_round": max((r["logp_gaps"][0] for r in ran if r["logp_gaps"][0] is not None), default=None),
        }
    return summary


def engines_markdown(summary: dict[str, Any]) -> str:
    labels = {
        "dpokit": "dpokit generator (in the trainer)",
        "vllm-colocated": "vLLM colocated (server sharing the trainer's resources)",
        "vllm-server": "vLLM server (resources of its own)",
    }
    lines = [
        "| engine | s per round, median (range) | of which sampling | of which weight sync | round time / dpokit "
        "| reward after the last round | KL (nats) | largest log-prob gap per token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = statistics.median(summary["dpokit"]["round_s"]) if "round_s" in summary.get("dpokit", {}) else None
    for mode, row in summary.items():
        if "skipped" in row:
            lines.append(f"| {labels[mode]} | not run: {row['skipped']} | | | | | | |")
            continue
        ratio = f"{statistics.median(row['round_s']) / base:.2f}x" if base else "n/a"
        gap = "n/a" if row["logp_gap"] is None else f"{row['logp_gap']:.1e}"
        lines.append(
            f"| {labels[mode]} | {_median_range(row['round_s'], 2)} | {statistics.median(row['generation_s']):.2f} "
            f"| {statistics.median(row['sync_s']):.2f} | {ratio} | {_median_range(row['reward'], 3)} "
            f"| {_median_range(row['kl'], 2)} | {gap} |"
        )
    return "\n".join(lines)


def parent_engines(options: argparse.Namespace) -> dict[str, Any]:
    """Part 3: the modes alternate (the first rotates each repeat); prints and returns the summary."""
    model_dir = _start_model(options)
    if options.device == "cpu" and head_size(model_dir) not in VLLM_CPU_HEAD_SIZES:
        raise SystemExit(
            f"{model_dir}: attention head size {head_size(model_dir)}, which the vLLM CPU build does not support "
            f"({', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); use --lm quick (head size 32) or another --model"
        )
    if not Path(options.vllm_python).is_file():
        raise SystemExit(f"no vLLM environment at {options.vllm_python}: run 'make vllm-env' or give --vllm-python")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in ENGINE_MODES}
    for repeat in range(options.repeats):
        order = ENGINE_MODES[repeat % 3 :] + ENGINE_MODES[: repeat % 3]
        for mode in order:
            record = run_engine_mode(mode, model_dir, options)
            results[mode].append(record)
            if options.json:  # every finished run kept, should a later one fail
                Path(options.json).write_text(json.dumps({"runs": results}, indent=2))
            if "skipped" in record:
                print(f"repeat {repeat + 1} {mode:14s} not run: {record['skipped']}", flush=True)
                continue
            print(
                f"repeat {repeat + 1} {mode:14s} {record['steps']} rounds, median {statistics.median(record['step_s'][1:]):.2f} "
                f"s/round (sampling {statistics.median(record['generation_s'][1:]):.2f} s), reward {record['reward']:.3f}  "
                f"KL {record['kl']:.2f}",
                flush=True,
            )
    summary = engines_summary(results)
    print(
        f"\nonline DPO rounds by sampling engine: {options.steps} rounds of {options.batch_prompts} prompts x 2 samples, "
        f"at most {options.max_new_tokens} new tokens, one optimizer step per round, {options.device} {options.dtype}, "
        f"{options.threads} torch thread(s) in the trainer; evaluation on {options.eval_prompts} held-out prompts x 2 "
        f"samples; {options.repeats} repeats, modes alternating; model {model_dir}\n"
    )
    print(engines_markdown(summary))
    if options.json:
        Path(options.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    return summary


# ------------------------------------------------------------------------------------------------
# Launching, alternating, reporting
# ------------------------------------------------------------------------------------------------


def launch(part: str, contender: str, options: argparse.Namespace, extra: list[str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (with ``extra`` arguments); returns its RESULT record."""
    command = [sys.executable, __file__, "--part", part, "--worker", contender, *(extra or [])]
    for name in ("lm", "cache_dir", "prompts", "samples", "max_new_tokens", "batch_rows", "threads", "seed"):
        command += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    for name in ("steps", "batch_prompts", "lr", "eval_prompts", "device", "dtype"):
        command += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    if options.model:
        command += ["--model", options.model]
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
    parser.add_argument(
        "--part", choices=["generation", "online", "engines", "all"], default="all", help="all: generation and online"
    )
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
    parser.add_argument("--model", help="engines: a saved causal LM to start from instead of the sentiment SFT model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="engines: where the trainer runs")
    parser.add_argument("--dtype", default="float32", help="engines: the trainer's and the server's dtype")
    parser.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--server-log", help="engines: the vLLM server's log (default benchmarks/out/online/)")
    parser.add_argument("--json", help="engines: also write the summary and every run's figures to this file")
    parser.add_argument("--worker")
    parser.add_argument("--engine-url", help=argparse.SUPPRESS)
    parser.add_argument("--cores", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        import torch

        torch.set_num_threads(options.threads)
        workers = {"generation": generation_worker, "online": online_worker, "engines": engines_worker}
        worker = workers[options.part]
        print("RESULT " + json.dumps(worker(options)), flush=True)
        return
    started = time.time()
    if options.part == "engines" and hasattr(os, "sched_getaffinity"):
        # The cores this process may use (taskset, a container's limit) are the ones the modes split; the
        # benchmark never widens them. With one core the server mode says why it cannot run.
        print(f"cores: {sorted(os.sched_getaffinity(0))}")
    if not options.model:
        _sft(options)  # pretrain and cache the SFT model once, outside any measurement
    print(f"{time.strftime('%Y-%m-%d')}, {machine()}, {options.threads} torch thread(s), load average {load_average()}\n")
    if options.part in ("generation", "all"):
        parent_generation(options)
    if options.part in ("online", "all"):
        parent_online(options)
    if options.part == "engines":
        parent_engines(options)
    print(f"\nload average at the end {load_average()}; total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
