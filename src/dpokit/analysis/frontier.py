"""The reward-KL frontier: how much reward a policy gains per nat of divergence from its reference.

This is the evaluation of the DPO paper's Figure 2 (left). For a policy ``pi``, a reference
``pi_ref``, prompts ``x`` and a ground-truth reward ``r(x, y)``:

* reward: ``E_x E_{y ~ pi(.|x)} r(x, y)``;
* sequence-level KL: ``KL(pi || pi_ref) = E_x E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)]``,
  where ``log pi(y|x)`` sums the token log-probs of the completion (up to and including its stop
  token: EOS, or a chat template's end-of-turn token when the vocabulary has one).

Both are estimated from the *same* samples ``y ~ pi(.|x)``. Sampling is plain ancestral sampling at
temperature 1 with no top-k / top-p, so the samples come from exactly the distribution whose
log-probs are summed and the KL estimate is unbiased (any truncation of the sampler would make
``log pi`` the wrong density). A completion cut at ``max_new_tokens`` without a stop is scored as the
prefix it is: the estimate is then the KL between the two distributions over ``max_new_tokens``-long
prefixes, which is what the samples' quality is judged on. Individual terms can be negative; their
mean is not (up to sampling error), and it is exactly 0 when ``pi`` is ``pi_ref``.

Sampling and scoring go through :mod:`dpokit.generation` (:func:`~dpokit.generation.sample_with_kl`).
With a sampling engine (``dpokit frontier --engine vllm``: a vLLM server, :class:`CheckpointServer`)
the engine draws the samples from the same distribution (temperature 1, no truncation) and both
log-probs are teacher-forced here on the same sampled token ids; each point then also records
``engine_logp_gap``, the largest per-token difference between the log-probs the engine reported and
the policy's here -- the check that the server sampled from the checkpoint being evaluated.

Prompts with images (a vision-language reference and checkpoints; rows with ``images`` as ``dpokit generate``
reads them, chat prompts with image parts allowed): each prompt is encoded with the reference's processor (each
image as its tokens), every model samples it with its images and both log-probs are teacher-forced with them, and
the reward function gets ``images=`` (per completion, its prompt's images) -- it must name an ``images``
parameter, as a judge's must (e.g. ``dpokit.experiments.shapes:colour_reward``). The dpokit engine only.

Entry points: :func:`estimate_reward_kl` (one policy), :func:`plot_frontier` /
:func:`write_results` (many points), and :func:`run_frontier` (a :class:`FrontierJob`, behind
``dpokit frontier``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.data.prompts import Prompt, PromptRow, read_prompt_rows
from dpokit.errors import ConfigError, DataError
from dpokit.generation import (
    EngineOptions,
    SamplingConfig,
    SamplingEngine,
    VllmEngine,
    decode_completions,
    encode_prompts,
    sample_with_kl,
    stop_token_ids,
)
from dpokit.generation.engines import engine_logp_gap, policy_logps
from dpokit.judges.reward import takes_images
from dpokit.models import LoadOptions, pad_id_of
from dpokit.scoring import RewardFn, load_reward

Images = Sequence[Sequence[bytes]]  # per prompt, its images (encoded files)
IMAGE_ENGINE = "prompts with images are sampled with the dpokit engine only (--engine dpokit), not vLLM"


def _mean_sem(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def estimate_reward_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    reward_fn: RewardFn,
    num_samples: int,
    max_new_tokens: int,
    seed: int = 0,
    *,
    batch_size: int = 128,
    keep_samples: int = 0,
    engine: SamplingEngine | None = None,
    images: Images | None = None,
    processor: Any = None,
) -> dict[str, Any]:
    """Mean ground-truth reward and sequence KL(pi || pi_ref) from samples of ``policy``.

    For each prompt draw ``num_samples`` completions ``y ~ pi(.|x)`` (temperature 1, full softmax,
    at most ``max_new_tokens`` tokens, ending at a stop token), score them with
    ``reward_fn(prompts=[x...], completions=[y...]) -> list[float]`` (decoded text, special tokens
    dropped) and compute ``kl_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i)``.

    ``engine``: the sampling engine that draws the samples instead of ``policy`` here (it must be
    sampling from ``policy``'s weights: a vLLM server that loaded them); ``policy`` and ``reference``
    then score the sampled token ids, and ``engine_logp_gap`` is added when the engine reports log-probs.

    ``images`` (per prompt) with the models' ``processor``: the prompts are encoded with each image as its
    tokens, sampled and teacher-forced with the images (the dpokit engine only), and ``reward_fn`` is also
    given ``images=`` (per completion, its prompt's). Chat prompts are formatted with the chat template;
    ``reward_fn`` gets the formatted text.

    Returns ``reward_mean``, ``reward_sem``, ``kl_mean``, ``kl_sem`` (standard errors of the means),
    ``num_samples`` (total), ``mean_length`` (completion tokens) and, when ``keep_samples > 0``,
    ``samples``: the first few ``{"prompt", "completion", "reward", "kl"}``.
    """
    pictured = images if images is not None and any(images) else None
    if pictured is not None and engine is not None:
        raise ConfigError(IMAGE_ENGINE)
    texts, prompt_ids = encode_prompts(tokenizer, prompts, images=pictured, processor=processor)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=num_samples, seed=seed
    )
    image_processor = getattr(processor, "image_processor", None)
    pictures = {"images": pictured, "image_processor": image_processor} if pictured is not None else {}
    if engine is None:
        indices, lengths, completion_texts, kls, extra = _sample_here(
            policy, reference, tokenizer, prompt_ids, sampling, batch_size, **pictures
        )
    else:
        indices, lengths, completion_texts, kls, extra = _sample_on_engine(
            engine, policy, reference, tokenizer, prompt_ids, sampling, batch_size
        )
    prompt_texts = [texts[i] for i in indices]
    given = {"images": [pictured[i] for i in indices]} if pictured is not None else {}
    rewards = [float(r) for r in reward_fn(prompts=prompt_texts, completions=completion_texts, **given)]
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
        "mean_length": sum(lengths) / max(1, len(lengths)),
        **extra,
    }
    if keep_samples:
        result["samples"] = [
            {"prompt": p, "completion": c, "reward": r, "kl": k}
            for p, c, r, k in list(zip(prompt_texts, completion_texts, rewards, kls, strict=True))[:keep_samples]
        ]
    return result


Sampled = tuple[list[int], list[int], list[str], list[float], dict[str, Any]]  # prompt index, length, text, KL; extras


def _sample_here(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    batch_size: int,
    images: Images | None = None,
    image_processor: Any = None,
) -> Sampled:
    """The policy's samples drawn here, both log-probs teacher-forced on the same rows (with the images)."""
    completions, kls = sample_with_kl(
        policy,
        reference,
        prompt_ids,
        max_new_tokens=sampling.max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer),
        pad_token_id=pad_id_of(tokenizer),
        seed=sampling.seed,
        num_samples=sampling.num_samples,
        batch_size=batch_size,
        images=images,
        image_processor=image_processor,
    )
    texts = decode_completions(tokenizer, completions)
    return [c.prompt_index for c in completions], [len(c.token_ids) for c in completions], texts, kls.tolist(), {}


def _sample_on_engine(
    engine: SamplingEngine,
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    batch_size: int,
) -> Sampled:
    """The engine's samples, both log-probs teacher-forced here on its sampled ids (and the engine's gap)."""
    sampled = engine.sample(prompt_ids, sampling)
    rows, ids = [prompt_ids[c.prompt_index] for c in sampled], [c.token_ids for c in sampled]
    logps = policy_logps(policy, rows, ids, tokenizer=tokenizer, batch_size=batch_size)
    reference_logps = policy_logps(reference, rows, ids, tokenizer=tokenizer, batch_size=batch_size)
    kls = [p - r for p, r in zip(logps, reference_logps, strict=True)]
    indices, lengths = [c.prompt_index for c in sampled], [len(i) for i in ids]
    return indices, lengths, [c.text for c in sampled], kls, {"engine_logp_gap": engine_logp_gap(sampled, logps)}


class CheckpointServer:
    """A vLLM server that samples the models a frontier evaluates, one at a time (``--engine vllm``).

    The server must serve the reference model (its served name, or the directory it loaded it from:
    :func:`~dpokit.generation.open_sampler`); the tokenizer is read from that directory here. Each other
    model is loaded into the server before it is sampled (:func:`dpokit.online.sync.serve_saved_model`: a
    LoRA adapter at run time, full weights reloaded in place -- the server needs
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` / ``VLLM_SERVER_DEV_MODE=1`` for them), and :meth:`restore`
    gives it the reference's weights back. The server must see the checkpoints' directories."""

    def __init__(self, reference: str, options: EngineOptions, load: LoadOptions | None = None) -> None:
        from dpokit.generation import open_sampler

        opened = open_sampler(reference, options, load)
        assert isinstance(opened.engine, VllmEngine)  # open_sampler with the vllm engine
        self.engine: VllmEngine = opened.engine
        self.tokenizer = opened.tokenizer
        self.reference = Path(reference)
        self.changed = False

    def serve(self, path: str | Path, name: str) -> VllmEngine:
        """The engine, sampling from the model saved at ``path`` (loaded into the server as ``name``)."""
        from dpokit.online.sync import serve_saved_model

        self.changed = True
        serve_saved_model(self.engine, path, name)
        return self.engine

    def restore(self, *, force: bool = False) -> None:
        """The reference's weights back in the server (and no adapter of ours), if anything was loaded; ``force``:
        also when this handle loaded nothing (something else may have: a run stopped mid-evaluation, online rounds)."""
        if self.changed or force:
            self.serve(self.reference, "reference")
            self.changed = False


@contextlib.contextmanager
def restoring(server: CheckpointServer | None) -> Iterator[None]:
    """Run the block, then give ``server`` (when there is one) the reference's weights back, also on error."""
    try:
        yield
    finally:
        if server is not None:
            server.restore()


def best_of_n_kl(n: int) -> float:
    """Analytic KL of best-of-n sampling from its base policy: ``log n - (n - 1) / n`` nats.

    Exact for continuous rewards (no ties) and an upper bound otherwise (Stiennon et al. 2020,
    Beirami et al. 2024); best-of-n has no tractable density, so its KL cannot be sampled directly.
    """
    return math.log(n) - (n - 1) / n


@dataclass(frozen=True)
class FrontierPoint:
    """One model on the reward-KL frontier: means and standard errors over its evaluation samples.

    ``step`` counts optimizer steps from the SFT model (best-of-n: its ``n``; None for a final export
    without a step); ``beta`` annotates the run's last point in the figure; ``n`` is best-of-n's and None
    elsewhere; ``checkpoint`` is the evaluated model's directory where it was read from one;
    ``engine_logp_gap`` the sampling engine's largest log-prob gap to the policy (a vLLM engine's).
    """

    method: str
    run: str
    step: int | None
    reward_mean: float
    reward_sem: float
    kl_mean: float
    kl_sem: float
    num_samples: int
    beta: float | None = None
    mean_length: float | None = None
    n: int | None = None
    checkpoint: str | None = None
    engine_logp_gap: float | None = None

    @classmethod
    def from_estimate(
        cls,
        estimate: Mapping[str, Any],
        *,
        method: str,
        run: str,
        step: int | None,
        beta: float | None = None,
        checkpoint: str | None = None,
    ) -> FrontierPoint:
        """A point from :func:`estimate_reward_kl`'s result (its samples left out)."""
        return cls(
            method=method,
            run=run,
            step=step,
            beta=beta,
            reward_mean=float(estimate["reward_mean"]),
            reward_sem=float(estimate["reward_sem"]),
            kl_mean=float(estimate["kl_mean"]),
            kl_sem=float(estimate["kl_sem"]),
            num_samples=int(estimate["num_samples"]),
            mean_length=None if estimate.get("mean_length") is None else float(estimate["mean_length"]),
            checkpoint=checkpoint,
            engine_logp_gap=estimate.get("engine_logp_gap"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``method, run, beta, step, [n], reward_mean, reward_sem, kl_mean, kl_sem,
        num_samples, [mean_length, checkpoint, engine_logp_gap]`` (the bracketed ones only where known)."""
        data: dict[str, Any] = {"method": self.method, "run": self.run, "beta": self.beta, "step": self.step}
        if self.n is not None:
            data["n"] = self.n
        data |= {
            "reward_mean": self.reward_mean,
            "reward_sem": self.reward_sem,
            "kl_mean": self.kl_mean,
            "kl_sem": self.kl_sem,
            "num_samples": self.num_samples,
        }
        for name in ("mean_length", "checkpoint", "engine_logp_gap"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FrontierPoint:
        """A point from its JSON form (``beta``, ``mean_length`` and ``n`` may be absent); a KeyError,
        TypeError or ValueError names what is missing or malformed."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def relabelled(self, *, method: str, run: str) -> FrontierPoint:
        """The same measurement under another method and run name (an arm that starts from it)."""
        return dataclasses.replace(self, method=method, run=run)


# --------------------------------------------------------------------------------------------------
# Points, plot, tables
# --------------------------------------------------------------------------------------------------


def plot_frontier(points: Sequence[FrontierPoint], out_png: str | Path, title: str | None = None) -> Path:
    """Reward against KL, one colour per ``method``; points of one ``run`` joined in ``step`` order.

    Standard errors are drawn as error bars; ``beta`` is annotated at a run's last point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(8, 5.5))
    draw_frontier(axis, points, title=title)
    figure.tight_layout()
    figure.savefig(out_png, dpi=130)
    plt.close(figure)
    return out_png


def draw_frontier(axis: Any, points: Sequence[FrontierPoint], *, title: str | None = None) -> None:
    """:func:`plot_frontier`'s drawing on a matplotlib ``axis`` (one panel of a larger figure)."""
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(p.method for p in points))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>pPX*h"
    for m_index, method in enumerate(methods):
        color = colors[m_index % len(colors)]
        marker = markers[m_index % len(markers)]
        method_points = [p for p in points if p.method == method]
        runs = list(dict.fromkeys(p.run for p in method_points))
        for r_index, run in enumerate(runs):
            run_points = sorted((p for p in method_points if p.run == run), key=lambda p: (p.step or 0, p.kl_mean))
            xs = [p.kl_mean for p in run_points]
            ys = [p.reward_mean for p in run_points]
            axis.plot(xs, ys, "-", color=color, alpha=0.35, linewidth=1)
            axis.errorbar(
                xs,
                ys,
                xerr=[p.kl_sem for p in run_points],
                yerr=[p.reward_sem for p in run_points],
                fmt=marker,
                color=color,
                markersize=5,
                alpha=0.85,
                elinewidth=0.6,
                capsize=0,
                label=method if r_index == 0 else None,
            )
            last = run_points[-1]
            if last.beta is not None:
                axis.annotate(
                    f"β={last.beta:g}",
                    (xs[-1], ys[-1]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                    color=color,
                )
    axis.set_xlabel("KL(π ‖ π_ref)  [nats per completion]")
    axis.set_ylabel("mean ground-truth reward")
    axis.set_title(title or "Reward vs KL frontier")
    axis.grid(alpha=0.3)
    axis.set_xlim(left=min(-0.2, min(p.kl_mean for p in points) - 0.2))
    axis.legend(loc="lower right", fontsize=8)


def frontier_envelope(points: Sequence[FrontierPoint]) -> list[tuple[float, float]]:
    """The upper-left envelope: (kl, best reward reached by any point with KL <= kl), KL ascending."""
    envelope: list[tuple[float, float]] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: p.kl_mean):
        if p.reward_mean > best:
            best = p.reward_mean
            envelope.append((p.kl_mean, best))
    return envelope


def dominance_summary(points: Sequence[FrontierPoint], method: str) -> dict[str, dict[str, Any]]:
    """For every other method: how many of its points ``method`` matches or beats at no more KL.

    A point (k, r) is dominated when some ``method`` point has KL <= k and reward >= r. Returns
    ``{other_method: {"points": n, "dominated": d, "best_reward_gap": ...}}`` where the gap is the
    largest ``r - best method reward at KL <= k`` over the other method's points (positive = the
    other method is ahead somewhere; ``None`` when ``method`` has no point at that KL).
    """
    ours = [p for p in points if p.method == method]
    summary: dict[str, dict[str, Any]] = {}
    for other in dict.fromkeys(p.method for p in points):
        if other == method:
            continue
        dominated, gaps = 0, []
        theirs = [p for p in points if p.method == other]
        for p in theirs:
            reachable = [q.reward_mean for q in ours if q.kl_mean <= p.kl_mean]
            if reachable:
                gaps.append(p.reward_mean - max(reachable))
                dominated += max(reachable) >= p.reward_mean
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


def results_markdown(points: Sequence[FrontierPoint]) -> str:
    """A markdown table, one row per point: method, run, beta, step, reward ± sem, KL ± sem."""
    lines = [
        "| method | run | β | step | reward (mean ± s.e.) | KL nats (mean ± s.e.) |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.method} | {p.run} | {_fmt(p.beta, 2) if p.beta is not None else '–'} "
            f"| {_fmt(p.step)} | {p.reward_mean:.3f} ± {_fmt(p.reward_sem)} "
            f"| {p.kl_mean:.2f} ± {_fmt(p.kl_sem, 2)} |"
        )
    return "\n".join(lines) + "\n"


def write_results(
    points: Sequence[FrontierPoint], out_dir: str | Path, *, title: str | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``frontier.png``, ``results.json`` (points + ``extra``) and ``results.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = [p.to_dict() for p in points]
    (out_dir / "results.json").write_text(json.dumps({**(extra or {}), "points": data}, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(points))
    png = plot_frontier(points, out_dir / "frontier.png", title=title)
    return {"png": png, "json": out_dir / "results.json", "md": out_dir / "results.md"}


# --------------------------------------------------------------------------------------------------
# Loading: rewards, checkpoints, prompts
# --------------------------------------------------------------------------------------------------


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
        raise ConfigError(f"no model directory (config.json or adapter_config.json) in {run_dir} or its sub-directories")
    with_steps = [(_step_of(p), p) for p in dict.fromkeys(found)]
    return sorted(with_steps, key=lambda sp: (sp[0] is None, sp[0] or 0, str(sp[1])))


def read_frontier_prompts(path: str | Path) -> list[PromptRow]:
    """The frontier's prompts, read and checked as ``dpokit generate`` reads them: text prompts from a ``.txt``
    file (one per line) or rows with a ``prompt`` field (the frontier samples raw continuations, so chat-message
    prompts are refused), and rows with images for a vision-language model (their prompts may be chat messages
    with image parts, formatted with the chat template)."""
    rows = read_prompt_rows(path, images=True)
    if not rows:
        raise DataError(f"prompts file {path} has no prompts")
    for row in rows:
        if not isinstance(row.prompt, str) and not row.images:
            raise DataError(
                f"{row.where}: the prompt is a list of chat messages; the frontier needs text prompts (chat messages "
                "only in rows with images, for a vision-language model)"
            )
    return rows


# --------------------------------------------------------------------------------------------------
# A whole frontier: dpokit frontier
# --------------------------------------------------------------------------------------------------


@dataclass
class FrontierJob:
    """What ``dpokit frontier`` evaluates: every checkpoint of every run against one reference.

    ``runs`` are ``(series name, run or model directory)``; ``betas`` annotate series by name.
    ``num_samples`` completions of at most ``max_new_tokens`` tokens are sampled per prompt (the
    first ``max_prompts`` of the ``prompts`` file), with the same ``seed`` for every model, by the
    sampling ``engine`` (``--engine``: dpokit's generator here, or a vLLM server serving the reference
    that each checkpoint is loaded into, :class:`CheckpointServer`).
    """

    runs: list[tuple[str, str]]
    reference: str
    prompts: str
    reward: str
    out: str = "frontier"
    num_samples: int = 1
    max_new_tokens: int = 32
    max_prompts: int | None = None
    seed: int = 0
    betas: dict[str, float] = field(default_factory=dict)
    title: str | None = None
    load: LoadOptions = field(default_factory=LoadOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)


def run_frontier(job: FrontierJob, *, log: Callable[[str], None] | None = None) -> tuple[list[FrontierPoint], dict[str, Path]]:
    """Evaluate the reference and every checkpoint of every run; write the figure and tables into
    ``job.out``. Returns the points and the written paths (``png``, ``json``, ``md``)."""
    from dpokit.models import load_policy

    say = log or (lambda line: None)
    rows = read_frontier_prompts(job.prompts)[: job.max_prompts]
    prompts = [row.prompt for row in rows]
    images = [list(row.images) for row in rows] if any(row.images for row in rows) else None
    job.engine.validate()
    if images is not None and job.engine.engine != "dpokit":
        raise ConfigError(IMAGE_ENGINE)
    reward_fn = load_reward(job.reward, device=job.load.device)
    if images is not None and not takes_images(reward_fn):
        where = next(row.where for row in rows if row.images)
        raise ConfigError(
            f"{where}: the prompt has images but reward {job.reward} reads text only (it names no 'images' parameter); "
            "give a reward function that takes images= (per completion, its prompt's images), e.g. "
            "dpokit.experiments.shapes:colour_reward"
        )
    reference = load_policy(job.reference, job.load)
    server = CheckpointServer(job.reference, job.engine, job.load) if job.engine.engine == "vllm" else None

    def estimate(policy: torch.nn.Module, engine: SamplingEngine | None = None) -> dict[str, Any]:
        return estimate_reward_kl(
            policy,
            reference.model,
            reference.tokenizer,
            prompts,
            reward_fn,
            job.num_samples,
            job.max_new_tokens,
            job.seed,
            engine=engine,
            images=images,
            processor=reference.processor,
        )

    try:
        base = estimate(reference.model, server.engine if server else None)
        points = [FrontierPoint.from_estimate(base, method="reference", run="reference", step=0)]
        say(f"reference: reward {base['reward_mean']:.3f}  KL 0")
        for name, run_dir in job.runs:
            for step, checkpoint in find_checkpoints(run_dir):
                engine = server.serve(checkpoint, f"frontier-{name}-{step}") if server else None
                result = estimate(load_policy(checkpoint, job.load).model, engine)
                points.append(
                    FrontierPoint.from_estimate(
                        result, method=name, run=name, step=step, beta=job.betas.get(name), checkpoint=str(checkpoint)
                    )
                )
                where = f"step {step}" if step is not None else checkpoint.name
                say(f"{name} {where}: reward {result['reward_mean']:.3f}  KL {result['kl_mean']:.2f}")
    finally:
        if server is not None:
            server.restore()
    sampled_by = {"engine": job.engine.engine, **({"url": job.engine.url} if server else {})}
    return points, write_results(points, job.out, title=job.title, extra=sampled_by)
