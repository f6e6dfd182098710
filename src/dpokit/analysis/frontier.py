"""The reward-KL frontier: how much reward a policy gains per nat of divergence from its reference.

This is the evaluation of the DPO paper's Figure 2 (left). For a policy ``pi``, a reference
``pi_ref``, prompts ``x`` and a ground-truth reward ``r(x, y)``:

* reward: ``E_x E_{y ~ pi(.|x)} r(x, y)``;
* sequence-level KL: ``KL(pi || pi_ref) = E_x E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)]``,
  where ``log pi(y|x)`` sums the token log-probs of the completion (up to and including EOS).

Both are estimated from the *same* samples ``y ~ pi(.|x)``. Sampling is plain ancestral sampling at
temperature 1 with no top-k / top-p, so the samples come from exactly the distribution whose
log-probs are summed and the KL estimate is unbiased (any truncation of the sampler would make
``log pi`` the wrong density). A completion cut at ``max_new_tokens`` without EOS is scored as the
prefix it is: the estimate is then the KL between the two distributions over ``max_new_tokens``-long
prefixes, which is what the samples' quality is judged on. Individual terms can be negative; their
mean is not (up to sampling error), and it is exactly 0 when ``pi`` is ``pi_ref``.

Entry points: :func:`estimate_reward_kl` (one policy), :func:`plot_frontier` /
:func:`write_results` (many points), and :func:`frontier_main` behind ``dpokit frontier``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dpokit.errors import ConfigError, DataError

RewardFn = Callable[..., Sequence[float]]


# --------------------------------------------------------------------------------------------------
# Sampling and log-probs
# --------------------------------------------------------------------------------------------------


def _left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) ids and 0/1 mask, rows aligned to the right edge (so generation appends at column T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding gets position 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    batch_size: int = 128,
) -> tuple[list[list[int]], list[float]]:
    """Ancestral sampling ``y ~ pi(.|x)``: each token from the full softmax(logits / temperature).

    Returns the completions (token ids, ending with EOS when one was sampled, at most
    ``max_new_tokens`` long) and, per completion, ``sum_t log pi(y_t | x, y_<t)`` as computed while
    sampling (at ``temperature``). Uses the model's KV cache when it returns one and re-runs the
    whole prefix otherwise (e.g. a hand-built module returning only ``logits``).
    """
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    completions: list[list[int]] = []
    sample_logps: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = prompt_ids[start:start + batch_size]
        ids, mask = _left_padded(rows, pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        n = ids.shape[0]
        generated = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        logp_sum = torch.zeros(n, dtype=torch.float64, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
        cache = getattr(out, "past_key_values", None)
        logits = out.logits[:, -1, :]
        for t in range(max_new_tokens):
            log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
            # The sampler's generator lives on the CPU so results do not depend on the device.
            next_tokens = torch.multinomial(log_probs.exp().cpu(), 1, generator=generator).squeeze(1).to(device)
            alive = ~done
            next_tokens = torch.where(alive, next_tokens, torch.full_like(next_tokens, pad_token_id))
            logp_sum += torch.where(alive, log_probs.gather(1, next_tokens[:, None]).squeeze(1).double(), 0.0)
            generated[:, t] = next_tokens
            lengths += alive.long()
            if eos_token_id is not None:
                done = done | (alive & (next_tokens == eos_token_id))
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, alive.long()[:, None]], dim=1)
            if cache is not None:
                position = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
                out = model(
                    input_ids=next_tokens[:, None], attention_mask=mask, position_ids=position,
                    past_key_values=cache, use_cache=True,
                )
                cache = out.past_key_values
            else:
                ids = torch.cat([ids, next_tokens[:, None]], dim=1)
                out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
            logits = out.logits[:, -1, :]
        for i in range(n):
            completions.append(generated[i, : int(lengths[i])].tolist())
        sample_logps.extend(logp_sum.tolist())
    return completions, sample_logps


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    pad_token_id: int,
    batch_size: int = 128,
) -> torch.Tensor:
    """``log pi(y|x) = sum_t log softmax(logits)[y_t]`` over completion tokens, shape (N,), float64.

    Rows are ``[pad ... prompt | completion ... pad]`` (prompt left-padded to a common width P,
    completion right-padded), so the logit at column ``P - 1 + t`` predicts completion token ``t``
    in every row. An empty completion has log-prob 0.
    """
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    results = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start:start + batch_size]
        completions = completion_ids[start:start + batch_size]
        prompt_block, prompt_mask = _left_padded(prompts, pad_token_id)
        width = max(1, max(len(c) for c in completions))
        completion_block = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, c in enumerate(completions):
            completion_block[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            completion_mask[i, : len(c)] = 1
        ids = torch.cat([prompt_block, completion_block], dim=1).to(device)
        mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        p = prompt_block.shape[1]
        predicting = logits[:, p - 1: p - 1 + width, :].float().log_softmax(-1)  # (N, C, V)
        token_logps = predicting.gather(2, completion_block.to(device)[:, :, None]).squeeze(2)
        results.append((token_logps.double() * completion_mask.to(device)).sum(-1).cpu())
    return torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)


def _mean_sem(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def sample_with_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator,
    batch_size: int = 128,
) -> tuple[list[list[int]], torch.Tensor]:
    """Sample ``y_i ~ pi(.|x_i)`` and return the completions and ``log pi(y_i|x_i) - log pi_ref(y_i|x_i)`` (N,).

    Both log-probs are recomputed by one teacher-forced forward each over the same padded rows, so
    the two terms differ only by the model. The mean of the returned vector estimates the
    sequence-level KL(pi || pi_ref); when ``reference is policy`` every term is exactly 0.
    """
    was_training = (policy.training, reference.training)
    policy.eval()
    reference.eval()
    try:
        completion_ids, _ = sample_completions(
            policy, prompt_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, generator=generator, batch_size=batch_size,
        )
        policy_logps = completion_logps(policy, prompt_ids, completion_ids, pad_token_id=pad_token_id, batch_size=batch_size)
        if reference is policy:
            reference_logps = policy_logps
        else:
            reference_logps = completion_logps(
                reference, prompt_ids, completion_ids, pad_token_id=pad_token_id, batch_size=batch_size
            )
    finally:
        policy.train(was_training[0])
        reference.train(was_training[1])
    return completion_ids, policy_logps - reference_logps


def estimate_reward_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    num_samples: int = 1,
    max_new_tokens: int = 24,
    seed: int = 0,
    *,
    batch_size: int = 128,
    keep_samples: int = 0,
) -> dict[str, Any]:
    """Mean ground-truth reward and sequence KL(pi || pi_ref) from samples of ``policy``.

    For each prompt draw ``num_samples`` completions ``y ~ pi(.|x)`` (temperature 1, full softmax),
    score them with ``reward_fn(prompts=[x...], completions=[y...]) -> list[float]`` (decoded text,
    special tokens dropped) and compute ``kl_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i)``.

    Returns ``reward_mean``, ``reward_sem``, ``kl_mean``, ``kl_sem`` (standard errors of the means),
    ``num_samples`` (total), ``mean_length`` (completion tokens) and, when ``keep_samples > 0``,
    ``samples``: the first few ``{"prompt", "completion", "reward", "kl"}``.
    """
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_texts = [p for p in prompts for _ in range(num_samples)]
    prompt_ids = [list(ids) for ids in tokenizer(list(prompt_texts))["input_ids"]]
    completion_ids, kl_values = sample_with_kl(
        policy, reference, prompt_ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id, generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
    )
    kls = kl_values.tolist()
    completion_texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    rewards = [float(r) for r in reward_fn(prompts=prompt_texts, completions=completion_texts)]
    if len(rewards) != len(completion_texts):
        raise ConfigError(f"the reward function returned {len(rewards)} rewards for {len(completion_texts)} completions")
    reward_mean, reward_sem = _mean_sem(rewards)
    kl_mean, kl_sem = _mean_sem(kls)
    result: dict[str, Any] = {
        "reward_mean": reward_mean,
        "reward_sem": reward_sem,
        "kl_mean": kl_mean,
        "kl_sem": kl_sem,
        "num_samples": len(rewards),
        "mean_length": sum(len(c) for c in completion_ids) / max(1, len(completion_ids)),
    }
    if keep_samples:
        result["samples"] = [
            {"prompt": p, "completion": c, "reward": r, "kl": k}
            for p, c, r, k in list(zip(prompt_texts, completion_texts, rewards, kls))[:keep_samples]
        ]
    return result


def best_of_n_kl(n: int) -> float:
    """Analytic KL of best-of-n sampling from its base policy: ``log n - (n - 1) / n`` nats.

    Exact for continuous rewards (no ties) and an upper bound otherwise (Stiennon et al. 2020,
    Beirami et al. 2024); best-of-n has no tractable density, so its KL cannot be sampled directly.
    """
    return math.log(n) - (n - 1) / n


# --------------------------------------------------------------------------------------------------
# Points, plot, tables
# --------------------------------------------------------------------------------------------------


def plot_frontier(points: list[dict[str, Any]], out_png: str | Path, title: str | None = None) -> Path:
    """Reward against KL, one colour per ``method``; points of one ``run`` joined in ``step`` order.

    Each point is a dict with ``method``, ``run``, ``kl_mean``, ``reward_mean`` and optionally
    ``kl_sem``/``reward_sem`` (error bars), ``beta`` (annotated at the run's last point) and ``step``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(p["method"] for p in points))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>pPX*h"
    figure, axis = plt.subplots(figsize=(8, 5.5))
    for m_index, method in enumerate(methods):
        color = colors[m_index % len(colors)]
        marker = markers[m_index % len(markers)]
        method_points = [p for p in points if p["method"] == method]
        runs = list(dict.fromkeys(p.get("run", method) for p in method_points))
        for r_index, run in enumerate(runs):
            run_points = sorted(
                (p for p in method_points if p.get("run", method) == run), key=lambda p: (p.get("step") or 0, p["kl_mean"])
            )
            xs = [p["kl_mean"] for p in run_points]
            ys = [p["reward_mean"] for p in run_points]
            axis.plot(xs, ys, "-", color=color, alpha=0.35, linewidth=1)
            axis.errorbar(
                xs, ys,
                xerr=[p.get("kl_sem") or 0.0 for p in run_points], yerr=[p.get("reward_sem") or 0.0 for p in run_points],
                fmt=marker, color=color, markersize=5, alpha=0.85, elinewidth=0.6, capsize=0,
                label=method if r_index == 0 else None,
            )
            last = run_points[-1]
            if last.get("beta") is not None:
                axis.annotate(
                    f"β={last['beta']:g}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7, color=color,
                )
    axis.set_xlabel("KL(π ‖ π_ref)  [nats per completion]")
    axis.set_ylabel("mean ground-truth reward")
    axis.set_title(title or "Reward vs KL frontier")
    axis.grid(alpha=0.3)
    axis.set_xlim(left=min(-0.2, min(p["kl_mean"] for p in points) - 0.2))
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(out_png, dpi=130)
    plt.close(figure)
    return out_png


def frontier_envelope(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The upper-left envelope: (kl, best reward reached by any point with KL <= kl), KL ascending."""
    envelope: list[tuple[float, float]] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: p["kl_mean"]):
        if p["reward_mean"] > best:
            best = p["reward_mean"]
            envelope.append((p["kl_mean"], best))
    return envelope


def dominance_summary(points: list[dict[str, Any]], method: str) -> dict[str, dict[str, Any]]:
    """For every other method: how many of its points ``method`` matches or beats at no more KL.

    A point (k, r) is dominated when some ``method`` point has KL <= k and reward >= r. Returns
    ``{other_method: {"points": n, "dominated": d, "best_reward_gap": ...}}`` where the gap is the
    largest ``r - best method reward at KL <= k`` over the other method's points (positive = the
    other method is ahead somewhere; ``None`` when ``method`` has no point at that KL).
    """
    ours = [p for p in points if p["method"] == method]
    summary: dict[str, dict[str, Any]] = {}
    for other in dict.fromkeys(p["method"] for p in points):
        if other == method:
            continue
        dominated, gaps = 0, []
        theirs = [p for p in points if p["method"] == other]
        for p in theirs:
            reachable = [q["reward_mean"] for q in ours if q["kl_mean"] <= p["kl_mean"]]
            if reachable:
                gaps.append(p["reward_mean"] - max(reachable))
                dominated += max(reachable) >= p["reward_mean"]
        summary[other] = {
            "points": len(theirs),
            "dominated": dominated,
            "best_reward_gap": max(gaps) if gaps else None,
        }
    return summary


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def results_markdown(points: list[dict[str, Any]]) -> str:
    """A markdown table, one row per point: method, run, beta, step, reward ± sem, KL ± sem."""
    lines = [
        "| method | run | β | step | reward (mean ± s.e.) | KL nats (mean ± s.e.) |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['method']} | {p.get('run', '')} | {_fmt(p.get('beta'), 2) if p.get('beta') is not None else '–'} "
            f"| {_fmt(p.get('step'))} | {p['reward_mean']:.3f} ± {_fmt(p.get('reward_sem'))} "
            f"| {p['kl_mean']:.2f} ± {_fmt(p.get('kl_sem'), 2)} |"
        )
    return "\n".join(lines) + "\n"


def write_results(points: list[dict[str, Any]], out_dir: str | Path, *, title: str | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``frontier.png``, ``results.json`` (points + ``extra``) and ``results.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in p.items() if k != "samples"} for p in points]
    (out_dir / "results.json").write_text(json.dumps({**(extra or {}), "points": clean}, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(clean))
    png = plot_frontier(clean, out_dir / "frontier.png", title=title)
    return {"png": png, "json": out_dir / "results.json", "md": out_dir / "results.md"}


# --------------------------------------------------------------------------------------------------
# Loading: rewards, checkpoints, prompts
# --------------------------------------------------------------------------------------------------


def load_reward(spec: str) -> RewardFn:
    """A reward from ``module:function`` or from a sequence-classification model directory.

    ``module:function`` must accept ``prompts=[...]`` and ``completions=[...]`` (lists of strings)
    and return one float per pair (the same signature TRL's online trainers use). A directory is
    loaded with ``AutoModelForSequenceClassification`` and scores ``prompt + completion``: a
    single-label head gives its logit; otherwise the probability of the label named ``positive``
    (any case), or of the last label when none is, as the paper's p(positive | x, y).
    """
    path = Path(spec)
    if path.is_dir():
        return _classifier_reward(path)
    if ":" not in spec:
        raise ConfigError(
            f"reward {spec!r} is neither a directory nor 'module:function' (e.g. dpokit.experiments.reward:vader_reward)"
        )
    module_name, function_name = spec.rsplit(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward {spec!r}: cannot import module {module_name!r} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward {spec!r}: module {module_name!r} has no callable {function_name!r}")
    return function


def _classifier_reward(model_dir: Path) -> RewardFn:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    labels = {int(k): str(v).lower() for k, v in (model.config.id2label or {}).items()}
    positive = next((i for i, name in labels.items() if name == "positive"), model.config.num_labels - 1)

    @torch.no_grad()
    def reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
        scores: list[float] = []
        texts = [p + c for p, c in zip(prompts, completions)]
        for start in range(0, len(texts), 64):
            inputs = tokenizer(texts[start:start + 64], return_tensors="pt", padding=True, truncation=True)
            logits = model(**inputs).logits.float()
            if logits.shape[-1] == 1:
                scores.extend(logits[:, 0].tolist())
            else:
                scores.extend(logits.softmax(-1)[:, positive].tolist())
        return scores

    return reward


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


_STEP_NAME = re.compile(r"^(?:checkpoint|step|ckpt)[-_]?(\d+)$")


def _step_of(path: Path) -> int | None:
    """``checkpoint-100`` / ``step_100`` -> 100, also for a model folder inside one (``checkpoint-100/model``)."""
    for name in (path.name, path.parent.name):
        match = _STEP_NAME.match(name)
        if match:
            return int(match.group(1))
    return None


def find_checkpoints(run_dir: str | Path) -> list[tuple[int | None, Path]]:
    """Model directories in a run, as ``(step, path)``, by step (a final export without a step last).

    A model directory holds ``config.json`` (full weights) or ``adapter_config.json`` (a LoRA
    adapter). The run directory itself counts, and so does any sub-directory up to two levels down
    (``checkpoint-100/model`` as ``dpokit train`` writes, ``final``, ...). The step comes from a
    ``checkpoint-N`` / ``step-N`` name of the directory or its parent.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    found = [run_dir] if _is_model_dir(run_dir) else []
    for child in sorted(run_dir.glob("*")) + sorted(run_dir.glob("*/*")):
        if child.is_dir() and _is_model_dir(child):
            found.append(child)
    if not found:
        raise ConfigError(
            f"no model directory (config.json or adapter_config.json) in {run_dir} or its sub-directories"
        )
    with_steps = [(_step_of(p), p) for p in dict.fromkeys(found)]
    return sorted(with_steps, key=lambda sp: (sp[0] is None, sp[0] or 0, str(sp[1])))


def load_causal_lm(path: str | Path) -> torch.nn.Module:
    """A causal LM from a model directory, or a LoRA adapter directory applied to its base model."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path).eval()
    return AutoModelForCausalLM.from_pretrained(path).eval()


def read_prompts(path: str | Path) -> list[str]:
    """Text prompts from a ``.txt`` file (one per line) or JSONL/JSON rows with a ``prompt`` field, read
    as ``dpokit generate`` reads them; the frontier samples raw continuations, so chat-message prompts
    are refused."""
    from dpokit.generation import read_prompts as read_generation_prompts

    prompts = read_generation_prompts(path)
    if not prompts:
        raise DataError(f"prompts file {path} has no prompts")
    for number, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, str):
            raise DataError(f"{path}: prompt {number} is a list of chat messages; the frontier needs text prompts")
    return prompts


# --------------------------------------------------------------------------------------------------
# Command line: dpokit frontier
# --------------------------------------------------------------------------------------------------


FRONTIER_DESCRIPTION = (
    "Sample completions from every checkpoint of each run, score them with a reward, estimate "
    "KL(policy || reference) from the same samples, and write frontier.png, results.json and results.md."
)
FRONTIER_EPILOG = """examples:
  dpokit frontier runs/dpo-b0.1 runs/dpo-b0.5 sft=runs/sft --reference models/sft --prompts prompts.txt \\
      --reward dpokit.experiments.reward:vader_reward --out frontier/
  dpokit frontier runs/dpo --reference models/sft --prompts eval.jsonl --reward models/sentiment-classifier"""


def add_frontier_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``dpokit frontier`` (run by :func:`frontier_main`)."""
    parser.add_argument("runs", nargs="+", help="run or model directories; NAME=DIR sets the series name")
    parser.add_argument("--reference", required=True, help="reference model directory (pi_ref)")
    parser.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl with 'prompt'")
    parser.add_argument("--reward", required=True,
                        help="'module:function' (prompts=, completions= -> list of floats) or a sequence-classification model dir")
    parser.add_argument("--out", default="frontier", help="output directory (default: ./frontier)")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="longest completion sampled per prompt, in tokens (default 32)")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed; every model samples the same prompts with it (default 0)")
    parser.add_argument("--beta", action="append", default=[], metavar="NAME=BETA",
                        help="annotate a series with its beta (repeatable)")
    parser.add_argument("--title", default=None, help="title of frontier.png (default: reward vs KL)")


def _parse_run(spec: str) -> tuple[str, Path]:
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, Path(path)
    return Path(spec).name, Path(spec)


def frontier_main(args: argparse.Namespace) -> int:
    """``dpokit frontier``: evaluate every checkpoint of every run and write the figure and tables."""
    from transformers import AutoTokenizer

    reward_fn = load_reward(args.reward)
    prompts = read_prompts(args.prompts)[: args.max_prompts]
    reference = load_causal_lm(args.reference)
    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    betas = {}
    for item in args.beta:
        name, _, value = item.partition("=")
        try:
            betas[name] = float(value)
        except ValueError as error:
            raise ConfigError(f"--beta {item!r}: expected NAME=NUMBER") from error
    points: list[dict[str, Any]] = []
    base = estimate_reward_kl(reference, reference, tokenizer, prompts, reward_fn, args.num_samples,
                              args.max_new_tokens, args.seed)
    points.append({"method": "reference", "run": "reference", "step": 0, **base})
    print(f"reference: reward {base['reward_mean']:.3f}  KL 0", file=sys.stderr)
    for spec in args.runs:
        name, run_dir = _parse_run(spec)
        for step, checkpoint in find_checkpoints(run_dir):
            policy = load_causal_lm(checkpoint)
            estimate = estimate_reward_kl(policy, reference, tokenizer, prompts, reward_fn, args.num_samples,
                                          args.max_new_tokens, args.seed)
            points.append({"method": name, "run": name, "step": step, "checkpoint": str(checkpoint),
                           "beta": betas.get(name), **estimate})
            print(f"{name} {checkpoint.name}: reward {estimate['reward_mean']:.3f}  KL {estimate['kl_mean']:.2f}",
                  file=sys.stderr)
    paths = write_results(points, args.out, title=args.title)
    print(results_markdown(points))
    print(f"wrote {paths['png']}, {paths['json']}, {paths['md']}")
    return 0
