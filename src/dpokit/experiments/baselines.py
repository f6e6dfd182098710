"""Baselines of the sentiment experiment that do not go through dpokit's preference trainer.

* Best-of-N: sample N completions from the SFT model, keep the one the ground-truth reward likes
  best. Its reward is measured; its KL from the SFT model is the analytic ``log N - (N-1)/N``
  (:func:`dpokit.analysis.frontier.best_of_n_kl`), as a best-of-N policy has no tractable density.
* RL with the ground-truth reward: TRL's ``RLOOTrainer`` (REINFORCE with a leave-one-out baseline,
  Ahmadian et al. 2024) -- a maintained implementation that, like the paper's PPO, maximises
  ``r(x, y) - beta_rl * [log pi(y|x) - log pi_ref(y|x)]`` with the KL penalty folded into the
  sequence reward. It needs the ``experiment`` extra (``pip install 'dpokit[experiment]'``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dpokit.analysis.frontier import FrontierPoint, best_of_n_kl
from dpokit.errors import ConfigError
from dpokit.generation import (
    SamplingConfig,
    SamplingEngine,
    decode_completions,
    encode_prompts,
    sample_completions,
    stop_token_ids,
)
from dpokit.models import LoadOptions, load_policy, pad_id_of


def best_of_n_points(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: Callable[..., Sequence[float]],
    ns: Sequence[int],
    *,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 256,
    engine: SamplingEngine | None = None,
) -> list[FrontierPoint]:
    """Reward of best-of-n for every ``n`` in ``ns``, from one pool of ``max(ns)`` samples per prompt.

    Best-of-n for prompt ``x`` takes the first ``n`` samples of the pool (i.i.d., so any ``n`` of
    them are a fair draw) and keeps the highest reward. Returns one point per ``n`` with
    ``reward_mean``/``reward_sem`` over prompts and ``kl_mean = log n - (n-1)/n`` (``kl_sem`` 0).
    ``engine``: a sampling engine serving ``model`` that draws the pool instead (temperature 1, no truncation).
    """
    pool = max(ns)
    _, prompt_ids = encode_prompts(tokenizer, prompts)
    if engine is not None:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=pool, seed=seed)
        sampled = engine.sample(prompt_ids, sampling)
        return _best_of_n([prompts[c.prompt_index] for c in sampled], [c.text for c in sampled], reward_fn, ns, len(prompts))
    completions = sample_completions(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer),
        pad_token_id=pad_id_of(tokenizer),
        seed=seed,
        num_samples=pool,
        batch_size=batch_size,
    )
    prompt_texts = [prompts[c.prompt_index] for c in completions]
    return _best_of_n(prompt_texts, decode_completions(tokenizer, completions), reward_fn, ns, len(prompts))


def _best_of_n(
    prompt_texts: list[str], texts: list[str], reward_fn: Callable[..., Sequence[float]], ns: Sequence[int], num_prompts: int
) -> list[FrontierPoint]:
    """:func:`best_of_n_points` from the pool's texts (prompt-major, ``max(ns)`` per prompt)."""
    rewards = torch.tensor([float(r) for r in reward_fn(prompts=prompt_texts, completions=texts)]).view(num_prompts, max(ns))
    points = []
    for n in ns:
        best = rewards[:, :n].max(dim=1).values
        sem = best.std().item() / math.sqrt(len(best)) if len(best) > 1 else float("nan")
        points.append(
            FrontierPoint(
                method="Best-of-N",
                run="best-of-n",
                step=n,
                n=n,
                reward_mean=best.mean().item(),
                reward_sem=sem,
                kl_mean=best_of_n_kl(n),
                kl_sem=0.0,
                num_samples=len(best),
            )
        )
    return points


def train_rloo(
    sft_dir: str | Path,
    prompts: Sequence[str],
    out_dir: str | Path,
    reward_fn: Callable[..., Sequence[float]],
    *,
    beta: float,
    steps: int,
    save_every: int,
    prompts_per_step: int = 16,
    num_generations: int = 4,
    max_new_tokens: int = 32,
    lr: float = 3e-4,
    seed: int = 0,
) -> Path:
    """Fine-tune the SFT model with TRL's RLOOTrainer on ``reward_fn``; checkpoints in ``out_dir``.

    Each step samples ``num_generations`` completions (temperature 1, no top-k/top-p) for
    ``prompts_per_step`` prompts, scores them, and takes one policy-gradient step on
    ``advantage = [r - beta kl] - leave-one-out mean``. Checkpoints land in
    ``out_dir/checkpoint-<step>`` (full model + tokenizer), as :func:`dpokit.analysis.frontier.find_checkpoints` expects.
    """
    try:
        from datasets import Dataset
        from trl.trainer.rloo_config import RLOOConfig
        from trl.trainer.rloo_trainer import RLOOTrainer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ConfigError("the RL baseline needs TRL: pip install 'dpokit[experiment]' (or skip it with --methods)") from error
    os.environ.setdefault("WANDB_DISABLED", "true")
    out_dir = Path(out_dir)
    sft = load_policy(sft_dir, LoadOptions(dtype="float32", device="cpu"))  # TRL moves it where it trains
    tokenizer, model = sft.tokenizer, sft.model
    tokenizer.padding_side = "left"
    repeats = math.ceil(steps * prompts_per_step / max(1, len(prompts))) + 1
    dataset = Dataset.from_dict({"prompt": list(prompts) * repeats})
    # TRL 1.16 still uses transformers' old "gradient checkpointing" names, which 5.x deprecates with a
    # FutureWarning each time; TRL's business, nothing for a user to act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)
        config = _rloo_config(
            RLOOConfig,
            out_dir,
            prompts_per_step=prompts_per_step,
            num_generations=num_generations,
            max_new_tokens=max_new_tokens,
            beta=beta,
            lr=lr,
            steps=steps,
            save_every=save_every,
            seed=seed,
        )
        trainer = RLOOTrainer(
            model=model,
            reward_funcs=reward_fn,  # type: ignore[arg-type]  # TRL asks for list[float | None]; ours give a list[float]
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # its per-step dicts would drown the experiment's log
        trainer.train()
    for checkpoint in out_dir.glob("checkpoint-*"):
        tokenizer.save_pretrained(checkpoint)
    return out_dir


def _rloo_config(
    config_class: Any,
    out_dir: Path,
    *,
    prompts_per_step: int,
    num_generations: int,
    max_new_tokens: int,
    beta: float,
    lr: float,
    steps: int,
    save_every: int,
    seed: int,
) -> Any:
    """TRL's ``RLOOConfig``: sampling at temperature 1 with no top-k/top-p (as the frontier measures),
    a constant learning rate, a checkpoint every ``save_every`` steps, CPU unless CUDA is there."""
    return config_class(
        output_dir=str(out_dir),
        per_device_train_batch_size=prompts_per_step * num_generations,
        num_generations=num_generations,
        max_completion_length=max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=beta,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_steps=steps,
        save_steps=save_every,
        save_strategy="steps",
        save_only_model=True,
        logging_steps=max(1, steps // 10),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
