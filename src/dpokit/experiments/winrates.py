"""The sentiment experiment's win-rate stage (the paper's Figure 2, right), over public win-rate APIs.

Every trained model (and Best-of-N of the SFT model's samples) is compared with the SFT model's samples at
each temperature, judged pairwise by the ground-truth reward, through
:func:`dpokit.analysis.winrate.run_winrate`; Best-of-N has no weights, so its samples are picked here and
handed over with :func:`dpokit.analysis.winrate.store_samples`. Then each DPO policy's implicit reward is
checked as a judge (:func:`dpokit.analysis.winrate.run_judge_check`) on held-out pairs labelled by the
ground truth. Outputs go to the stage's directory: ``winrate.png``, ``results.json``, ``results.md``.

On a vLLM server (``WinrateSetup.server``, the experiment's ``--engine vllm``) every model, the SFT
baseline and Best-of-N's pool included, is loaded into the server in turn and sampled there, its samples
stored apart from the dpokit engine's; the server gets the SFT model's weights back at the end. The
held-out pairs of the implicit-judge check are SFT samples drawn by dpokit's seeded generator on either
engine (data, like the training pairs), and the implicit rewards are computed here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.analysis.frontier import CheckpointServer, restoring
from dpokit.analysis.winrate import (
    JudgeCheckJob,
    WinrateJob,
    format_stat,
    run_judge_check,
    run_winrate,
    sample_model,
    store_samples,
)
from dpokit.experiments.preferences import make_preference_pairs, write_jsonl
from dpokit.generation import EngineOptions
from dpokit.scoring import RewardFn

VADER_JUDGE = "reward:dpokit.experiments.reward:vader_reward"


@dataclass(frozen=True)
class WinrateStage:
    """The stage's rows (:func:`dpokit.analysis.winrate.run_winrate`'s ``results``) and the DPO policies'
    checks as implicit-reward judges."""

    results: list[dict[str, Any]]
    implicit_judges: list[dict[str, Any]]


@dataclass(frozen=True)
class WinrateSetup:
    """What the stage compares and how: the SFT model (the baseline, and Best-of-N's pool), the first
    ``num_prompts`` evaluation prompts at each of ``temperatures``, Best-of-``best_of_n`` (None: left out),
    and ``judge_check_prompts`` held-out prompts for the implicit-judge check. ``server``: the vLLM server
    serving the SFT model (``engine`` names it) that samples every model instead of dpokit's engine (module docstring)."""

    out: Path
    sft_dir: Path
    sft_model: torch.nn.Module
    tokenizer: Any
    eval_prompts: Sequence[str]
    reward_fn: RewardFn
    temperatures: tuple[float, ...]
    num_prompts: int
    best_of_n: int | None
    judge_check_prompts: int
    max_new_tokens: int
    require_eos: bool
    seed: int
    engine: EngineOptions = field(default_factory=EngineOptions)  # who samples, as the job records it
    server: CheckpointServer | None = None


def run_winrate_stage(
    setup: WinrateSetup, models: list[tuple[str, str]], log: Callable[[str], None] | None = None
) -> WinrateStage:
    """Win rates of ``models`` (``(name, model directory)``) and Best-of-N against the SFT model's samples,
    then the implicit-judge check of the DPO models (those named ``DPO ...``)."""
    prompts = list(setup.eval_prompts[: setup.num_prompts])
    prompts_path = setup.out / "prompts.txt"
    prompts_path.parent.mkdir(parents=True, exist_ok=True)
    prompts_path.write_text("\n".join(prompts) + "\n")
    job = WinrateJob(
        models=list(models),
        judge=VADER_JUDGE,
        prompts=str(prompts_path),
        baseline=str(setup.sft_dir),
        temperatures=list(setup.temperatures),
        max_new_tokens=setup.max_new_tokens,
        seed=setup.seed + 23,
        out=str(setup.out),
        ci="wilson",
        progress=False,
        title="Win rate vs the SFT model (judge: VADER, the ground-truth reward)",
        engine=setup.engine,
    )
    with restoring(setup.server):
        if setup.best_of_n is not None:
            job.models.append(_best_of_n_samples(setup, setup.best_of_n, job, prompts))
        results = run_winrate(job, log=log, server=setup.server)
    stage = WinrateStage(results=results["results"], implicit_judges=implicit_judge_check(setup, models))
    results["implicit_judges"] = stage.implicit_judges
    (setup.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    with open(setup.out / "results.md", "a", encoding="utf-8") as handle:
        handle.write(implicit_markdown(stage.implicit_judges))
    return stage


def _best_of_n_samples(setup: WinrateSetup, n: int, job: WinrateJob, prompts: list[str]) -> tuple[str, str]:
    """Best-of-``n`` of the SFT model's samples at each temperature, stored where the win-rate run reads a
    model's samples; returns the model's ``(name, path)`` (a path of its own: nothing is loaded from it)."""
    pool_job = dataclasses.replace(job, samples_per_prompt=n * job.samples_per_prompt)
    seed = job.seed + 17
    pools = sample_model("sft-pool", str(setup.sft_dir), prompts, pool_job, seed=seed, advance=lambda: None, server=setup.server)
    name, path = f"Best-of-{n}", f"{setup.sft_dir}#best-of-{n}"
    best: dict[float, list[list[str]]] = {}
    for temperature, grouped in pools.items():
        flat_prompts = [p for p, group in zip(prompts, grouped, strict=True) for _ in group]
        rewards = setup.reward_fn(prompts=flat_prompts, completions=[c for group in grouped for c in group])
        best[temperature] = []
        for index, group in enumerate(grouped):
            scored = list(zip(rewards[index * len(group) : (index + 1) * len(group)], group, strict=True))
            chunks = [scored[j * n : (j + 1) * n] for j in range(job.samples_per_prompt)]
            best[temperature].append([max(chunk, key=lambda rc: rc[0])[1] for chunk in chunks])
    store_samples(name, path, prompts, job, best, seed=job.seed, server=setup.server)
    return name, path


def implicit_judge_check(setup: WinrateSetup, models: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Each DPO policy's implicit reward as a judge (``implicit:``) on held-out pairs labelled by the
    ground truth (SFT samples for evaluation prompts, not trained on): agreement, position bias."""
    rows, _ = make_preference_pairs(
        setup.sft_model,
        setup.tokenizer,
        setup.eval_prompts[: setup.judge_check_prompts],
        setup.reward_fn,
        completions_per_prompt=2,
        max_new_tokens=setup.max_new_tokens,
        require_eos=setup.require_eos,
        seed=setup.seed + 29,
    )
    if not rows:
        return []
    data = write_jsonl(rows, setup.out / "heldout_pairs.jsonl")
    reports = []
    for name, path in models:
        if name.startswith("DPO"):
            job = JudgeCheckJob(judge=f"implicit:{path}", data=str(data), cache=str(setup.out / "judgments.jsonl"))
            report = run_judge_check(job)
            reports.append({"model": name, "num_pairs": report["num_pairs"], **report["results"][0]})
    return reports


def implicit_markdown(reports: list[dict[str, Any]]) -> str:
    """The implicit-judge check as a markdown table (appended to the win-rate ``results.md``)."""
    lines = [
        "",
        "DPO policies as implicit-reward judges on held-out pairs labelled by the ground truth:",
        "",
        "| judge | pairs | agreement | agreement (ties ½) [95% Wilson CI] | W / T / L | consistency | position bias |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        ci = f"{format_stat(r['agreement_ties_half'])} [{format_stat(r['ci_low'])}, {format_stat(r['ci_high'])}]"
        lines.append(
            f"| implicit: {r['model']} | {r['num_pairs']} | {format_stat(r['agreement'])} | {ci} "
            f"| {r['wins']} / {r['ties']} / {r['losses']} "
            f"| {format_stat(r['position_consistency'], 2)} | {format_stat(r['position_bias'], 2)} |"
        )
    return "\n".join(lines) + "\n"
