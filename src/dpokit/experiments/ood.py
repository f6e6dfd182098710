"""Out-of-distribution generalisation: the sentiment experiment's DPO and RLOO policies on a shifted domain.

The DPO paper evaluated its summarisation policies, trained on Reddit TL;DR, on news articles (CNN/DailyMail)
and found DPO ahead of PPO there too. This experiment (``dpokit experiment ood --mode full|quick``) asks the
same question of the miniature sentiment task: the policies are trained on prompts that are prefixes of
generated movie reviews (:mod:`dpokit.experiments.sentiment`), and evaluated both on held-out review
prefixes (in distribution) and on prefixes of generated news reports (:func:`dpokit.experiments.corpus.make_news_corpus`:
another grammar, another vocabulary, never seen by the SFT model or the policies), with the same ground
truth (VADER on prompt + completion).

1. **Policies** -- the SFT model, DPO over the sentiment experiment's beta sweep and RLOO (TRL, on the
   ground-truth reward) for each of its KL weights, trained exactly as the sentiment experiment trains
   them (same settings; its in-distribution points go to the same store, ``<out>/points/``). A run is reused
   when its points on both distributions are stored and its last checkpoint is on disk, trained again
   otherwise.
2. **Frontier on both distributions** -- every checkpoint's mean reward and KL(pi || pi_sft) from samples
   for the held-out review prompts and for as many news prompts (prefixes of 2-8 whole words, at most 16
   tokens, the trainer's prompt limit: the review tokenizer splits the news words into pieces, and 2-8
   tokens, the in-distribution prompts' length, would often end inside the first word), each with a 95%
   normal interval over the samples (:class:`dpokit.experiments.results.FrontierEvaluation`).
3. **Win rates on both distributions** -- each final policy against the SFT model's samples, and each DPO
   policy against each RLOO policy, at ``winrate_temperatures``, judged by the ground-truth reward through
   :func:`dpokit.analysis.winrate.run_winrate` (Wilson intervals), with the length-controlled win rate
   (the win rate at equal length) and the fitted length effect beside each.

With ``--engine vllm`` (a running vLLM server serving the SFT model) every sample of the evaluation is drawn
on the server -- both distributions' frontier samples and the win rates' samples, each model loaded into it
in turn -- as in the sentiment experiment; the stored shifted-domain points are keyed by the engine.

Outputs in ``out_dir``: ``ood.png`` (the two frontiers and the win rates, dated, with the machine),
``results.json`` and ``results.md``; the win-rate runs under ``winrate/<distribution>/<comparison>/``.
Each run's shifted-domain points are stored under ``<out>/ood-points/`` keyed by the settings, so an
interrupted experiment picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit.analysis.frontier import FrontierPoint, find_checkpoints, restoring
from dpokit.errors import ConfigError
from dpokit.experiments.overoptimisation import machine_description, normal_interval
from dpokit.experiments.preferences import make_prompts
from dpokit.experiments.results import ResultStore, StoredRun, remove_checkpoints
from dpokit.experiments.sentiment import (
    DEFAULT_CACHE_DIR,
    DEFAULT_THREADS,
    KEEP_SAMPLES,
    METHOD_LABELS,
    Experiment,
    ExperimentSettings,
    SftModel,
    resolve_mode,
    store_key,
    torch_threads,
)
from dpokit.experiments.sentiment import MODES as SENTIMENT_MODES
from dpokit.experiments.winrates import VADER_JUDGE
from dpokit.generation import EngineOptions

Log = Callable[[str], None]
SHIFTED_PROMPT_SEED = 3003  # the news reports the shifted prompts are cut from (+ the settings' seed)
STORE_LAYOUT = 1  # enters the stored points' key
MAX_PROMPT_TOKENS = 16  # the shifted prompts' token limit: the sentiment trainer's data.max_prompt_length
DISTRIBUTIONS = ("in-distribution", "shifted")


@dataclass(frozen=True)
class OodSettings:
    """The policies (``sentiment``: the sentiment experiment's settings, its DPO and RL methods; ``dpo_betas``
    and ``rl_betas``: which of its runs, None for all), the shifted ``domain`` (a name in
    :data:`dpokit.experiments.corpus.DOMAINS`) and the win rates: the first ``winrate_prompts`` prompts of
    each distribution, ``winrate_samples`` samples per prompt, at each of ``winrate_temperatures``. The
    run selection leaves the sentiment settings, and so their stored runs' key, alone."""

    sentiment: ExperimentSettings
    dpo_betas: tuple[float, ...] | None = None
    rl_betas: tuple[float, ...] | None = None
    domain: str = "news"
    winrate_temperatures: tuple[float, ...] = (0.25, 1.0)
    winrate_prompts: int = 256
    winrate_samples: int = 2

    def runs(self) -> list[tuple[str, str, float]]:
        """``(run, method, beta)`` of the selected runs, DPO first, each a run of the sentiment experiment."""
        s = self.sentiment
        for chosen, among, name in ((self.dpo_betas, s.dpo_betas, "dpo_betas"), (self.rl_betas, s.rl_betas, "rl_betas")):
            if chosen is not None and not set(chosen) <= set(among):
                raise ConfigError(f"{name} {list(chosen)} must be among the sentiment experiment's {name} {list(among)}")
        dpo = s.dpo_betas if self.dpo_betas is None else self.dpo_betas
        rl = s.rl_betas if self.rl_betas is None else self.rl_betas
        return [(f"dpo-beta{b:g}", "dpo", b) for b in dpo] + [(f"rloo-beta{b:g}", "rl", b) for b in rl]

    def key(self) -> str:
        """Hash of every setting that shapes the stored shifted-domain points (the run selection only picks
        which runs happen; the win rates are measured afterwards and cached by
        :func:`dpokit.analysis.winrate.run_winrate` itself)."""
        settings = {
            "sentiment": self.sentiment.key(),
            "domain": self.domain,
            "prompts": [SHIFTED_PROMPT_SEED, MAX_PROMPT_TOKENS],
            "store_layout": STORE_LAYOUT,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _policies(base: ExperimentSettings, **changes: Any) -> ExperimentSettings:
    return dataclasses.replace(base, methods=("dpo", "rl"), winrate_temperatures=(), **changes)


MODES: dict[str, OodSettings] = {
    # The reported run: the sentiment experiment's full mode (SFT model, pairs, training), three of its runs to
    # fit 40 minutes of a shared 2-core CPU: DPO beta=0.5 and RLOO beta=0.05, which end at about the same KL
    # there (2.6 and 2.4 nats), and DPO beta=0.05, its most optimised run.
    "full": OodSettings(sentiment=_policies(SENTIMENT_MODES["full"]), dpo_betas=(0.05, 0.5), rl_betas=(0.05,)),
    # The sentiment experiment's quick mode.
    "quick": OodSettings(sentiment=_policies(SENTIMENT_MODES["quick"]), winrate_prompts=128),
    # Tests: seconds.
    "smoke": OodSettings(
        sentiment=_policies(SENTIMENT_MODES["smoke"], warmup_steps=0, rl_steps=1),
        winrate_temperatures=(1.0,),
        winrate_prompts=6,
        winrate_samples=1,
    ),
}


@dataclass(frozen=True)
class Policy:
    """One trained policy: its run, label, KL weight, the model directory of its last evaluated
    checkpoint, and its checkpoints' points on each distribution (``points[distribution]``)."""

    run: str
    label: str
    method: str
    beta: float
    model_dir: str
    points: dict[str, list[FrontierPoint]]


@dataclass(frozen=True)
class OodResult:
    """The reference and the policies on both distributions, and the win-rate rows."""

    reference: dict[str, FrontierPoint]
    policies: list[Policy]
    winrates: list[dict[str, Any]]
    samples: dict[str, Any]
    settings: OodSettings
    timings_seconds: dict[str, float]
    torch_threads: int
    date: str
    machine: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "machine": self.machine,
            "settings": asdict(self.settings),
            "reference": {d: p.to_dict() for d, p in self.reference.items()},
            "policies": [
                {**asdict(p), "points": {d: [q.to_dict() for q in points] for d, points in p.points.items()}}
                for p in self.policies
            ],
            "finals": final_rows(self),
            "winrates": self.winrates,
            "samples": self.samples,
            "timings_seconds": self.timings_seconds,
            "torch_threads": self.torch_threads,
        }


class OodExperiment:
    """The policies and their evaluation on both distributions in ``out_dir``, on the sentiment experiment's
    pieces. Progress goes to ``log``, one line at a time. ``engine`` and ``sft``: as
    :class:`~dpokit.experiments.sentiment.Experiment` takes them (on a vLLM server the win rates sample there too)."""

    def __init__(
        self,
        settings: OodSettings,
        out_dir: str | Path,
        cache_dir: str | Path,
        *,
        keep_checkpoints: bool = False,
        log: Log | None = None,
        engine: EngineOptions | None = None,
        sft: SftModel | None = None,
    ) -> None:
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self.keep_checkpoints = keep_checkpoints
        self.log: Log = log or (lambda line: None)
        self.engine = engine or EngineOptions()
        self.engine.validate()
        self.sft = sft
        self.store = ResultStore(self.out_dir / "ood-points", store_key(settings.key(), self.engine, sft), self.log)
        self.timings: dict[str, float] = {}
        self.samples: dict[str, Any] = {}

    def prepare(self) -> None:
        """The sentiment experiment's pieces (checkpoints kept until evaluated here) and the shifted prompts,
        sampled and scored as the in-distribution ones are."""
        s = self.settings.sentiment
        self.base = Experiment(
            s, self.out_dir, self.cache_dir, keep_checkpoints=True, log=self.log, engine=self.engine, sft=self.sft
        )
        self.base.prepare()
        prompts = make_prompts(
            self.base.tokenizer,
            s.num_eval_prompts,
            SHIFTED_PROMPT_SEED + s.seed,
            domain=self.settings.domain,
            whole_words_within=MAX_PROMPT_TOKENS,
        )
        (self.out_dir / "data" / "shifted_prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        self.frontiers = {
            "in-distribution": self.base.frontier,
            "shifted": dataclasses.replace(self.base.frontier, prompts=prompts),
        }
        self.log(f"shifted prompts ({self.settings.domain}): {len(prompts)}, e.g. {prompts[0]!r}")

    def reference(self) -> dict[str, FrontierPoint]:
        """The SFT model on both distributions (KL 0)."""
        points = {}
        for name, frontier in self.frontiers.items():
            points[name], self.samples[f"sft/{name}"] = frontier.estimate(
                self.base.sft_model, method=METHOD_LABELS["reference"], run="sft", step=0, keep_samples=KEEP_SAMPLES
            )
            self.log(f"SFT on {name} prompts: reward {points[name].reward_mean:.3f}")
        return points

    def policy(self, run: str, method: str, beta: float) -> Policy:
        """One run of the sentiment experiment (``method`` dpo or rl at ``beta``): trained unless its points on
        both distributions are stored and its last checkpoint is on disk; then its checkpoints on the shifted
        prompts; all checkpoints but the last removed unless kept."""
        label = f"{METHOD_LABELS[method].split(' (')[0]} β={beta:g}"
        run_dir = self.out_dir / "runs" / run
        stored, in_distribution = self.store.load(run), self.base.store.load(run)
        if stored is not None and in_distribution is not None and stored.measures:
            model_dir = Path(stored.measures[0]["model_dir"])
            if (model_dir / "config.json").exists():
                self.timings[run] = stored.seconds
                self.samples[f"{run}/shifted"] = stored.samples
                self.log(f"{run}: stored")
                return Policy(
                    run,
                    label,
                    method,
                    beta,
                    str(model_dir),
                    {"in-distribution": in_distribution.points, "shifted": stored.points},
                )
        start = time.time()
        self.base.store.path(run).unlink(missing_ok=True)  # its checkpoints are needed again
        points = self.base.run_trainer(run, "dpo", [{"name": "sigmoid"}], beta) if method == "dpo" else self.base.run_rl(beta)
        shifted, samples = self.frontiers["shifted"].checkpoints(
            run_dir, method=METHOD_LABELS[method], run=run, beta=beta, keep_samples=KEEP_SAMPLES, log=self.log
        )
        last_step, model_dir = [(step, path) for step, path in find_checkpoints(run_dir) if step is not None][-1]
        if not self.keep_checkpoints:
            remove_checkpoints(run_dir, keep_steps=[last_step])
        self.timings[run] = time.time() - start
        self.samples[f"{run}/shifted"] = samples
        self.store.save(run, StoredRun(shifted, self.timings[run], samples=samples, measures=[{"model_dir": str(model_dir)}]))
        return Policy(run, label, method, beta, str(model_dir), {"in-distribution": points, "shifted": shifted})

    def winrates(self, policies: list[Policy]) -> list[dict[str, Any]]:
        """Every policy against the SFT model and every DPO policy against every RLOO policy, on both
        distributions: :func:`dpokit.analysis.winrate.run_winrate`'s rows, each with its ``distribution``
        and ``baseline``."""
        from dpokit.analysis.winrate import WinrateJob, run_winrate

        s = self.settings
        if not s.winrate_temperatures:
            return []
        start = time.time()
        dpo = [(p.label, p.model_dir) for p in policies if p.method == "dpo"]
        comparisons = [("SFT", "vs-sft", str(self.base.sft_dir), [(p.label, p.model_dir) for p in policies])]
        comparisons += [(p.label, f"vs-{p.run}", p.model_dir, dpo) for p in policies if p.method == "rl" and dpo]
        rows = []
        for distribution, frontier in self.frontiers.items():
            prompts_path = self.out_dir / "winrate" / distribution / "prompts.txt"
            prompts_path.parent.mkdir(parents=True, exist_ok=True)
            prompts_path.write_text("\n".join(frontier.prompts[: s.winrate_prompts]) + "\n", encoding="utf-8")
            for baseline, name, baseline_dir, models in comparisons:
                job = WinrateJob(
                    models=models,
                    judge=VADER_JUDGE,
                    prompts=str(prompts_path),
                    baseline=baseline_dir,
                    temperatures=list(s.winrate_temperatures),
                    samples_per_prompt=s.winrate_samples,
                    max_new_tokens=s.sentiment.max_new_tokens,
                    seed=s.sentiment.seed + 41,
                    out=str(self.out_dir / "winrate" / distribution / name),
                    ci="wilson",
                    progress=False,
                    title=f"Win rate vs {baseline}, {distribution} prompts (judge: VADER)",
                    engine=self.engine,
                )
                for row in run_winrate(job, log=self.log, server=self.base.server)["results"]:
                    rows.append({"distribution": distribution, "baseline": baseline, **row})
        self.timings["winrate"] = time.time() - start
        return rows

    def run(self) -> OodResult:
        """Prepare, train or reuse every policy, measure; write ``ood.png``, ``results.json`` and ``results.md``."""
        runs = self.settings.runs()
        start = time.time()
        self.prepare()
        with restoring(self.base.server):
            reference = self.reference()
            policies = [self.policy(run, method, beta) for run, method, beta in runs]
            winrates = self.winrates(policies)
        self.timings["total"] = time.time() - start
        result = OodResult(
            reference=reference,
            policies=policies,
            winrates=winrates,
            samples=self.samples,
            settings=self.settings,
            timings_seconds={k: round(v, 1) for k, v in self.timings.items()},
            torch_threads=torch.get_num_threads(),
            date=time.strftime("%Y-%m-%d"),
            machine=machine_description(),
        )
        write_outputs(result, self.out_dir)
        self.log(f"done in {self.timings['total'] / 60:.1f} min: {self.out_dir / 'ood.png'}")
        return result


# ------------------------------------------------------------------------------------------------
# Tables and figure
# ------------------------------------------------------------------------------------------------


def gain(point: FrontierPoint, reference: FrontierPoint) -> dict[str, float]:
    """``point``'s reward minus the reference's, with a 95% normal interval (the two sets of samples taken as
    independent).

    >>> a = FrontierPoint("DPO", "r", 1, 0.5, 0.03, 2.0, 0.1, 100)
    >>> b = FrontierPoint("SFT", "s", 0, 0.1, 0.04, 0.0, 0.0, 100)
    >>> {k: round(v, 3) for k, v in gain(a, b).items()}
    {'mean': 0.4, 'ci_low': 0.302, 'ci_high': 0.498}
    """
    return normal_interval(point.reward_mean - reference.reward_mean, math.hypot(point.reward_sem, reference.reward_sem))


def final_rows(result: OodResult) -> list[dict[str, Any]]:
    """Each policy's last checkpoint on both distributions: reward, KL and gain over the SFT model, with 95%
    intervals, and the shifted gain as a fraction of the in-distribution gain."""
    rows = []
    for policy in result.policies:
        row: dict[str, Any] = {"label": policy.label, "run": policy.run, "beta": policy.beta}
        for distribution in DISTRIBUTIONS:
            point, reference = policy.points[distribution][-1], result.reference[distribution]
            row[distribution] = {
                "step": point.step,
                "reward": normal_interval(point.reward_mean, point.reward_sem),
                "kl": normal_interval(point.kl_mean, point.kl_sem),
                "gain": gain(point, reference),
                "mean_length": point.mean_length,
            }
        inside = row["in-distribution"]["gain"]["mean"]
        row["gain_kept"] = row["shifted"]["gain"]["mean"] / inside if inside else None
        rows.append(row)
    return rows


def _ci(value: dict[str, float], digits: int = 3) -> str:
    return f"{value['mean']:.{digits}f} [{value['ci_low']:.{digits}f}, {value['ci_high']:.{digits}f}]"


def finals_markdown(result: OodResult) -> str:
    """The SFT model and each policy's last checkpoint on both distributions."""
    lines = [
        "| policy | reward, in-distribution [95% CI] | KL nats | reward, shifted [95% CI] | KL nats "
        "| gain over SFT, in-distribution | gain over SFT, shifted | shifted gain / in-distribution gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = {d: normal_interval(p.reward_mean, p.reward_sem) for d, p in result.reference.items()}
    lines.append(f"| SFT (reference) | {_ci(ref['in-distribution'])} | 0 | {_ci(ref['shifted'])} | 0 | – | – | – |")
    for row in final_rows(result):
        inside, shifted = row["in-distribution"], row["shifted"]
        kept = "–" if row["gain_kept"] is None else f"{row['gain_kept']:.2f}"
        lines.append(
            f"| {row['label']} | {_ci(inside['reward'])} | {_ci(inside['kl'], 2)} | {_ci(shifted['reward'])} "
            f"| {_ci(shifted['kl'], 2)} | {_ci(inside['gain'])} | {_ci(shifted['gain'])} | {kept} |"
        )
    return "\n".join(lines) + "\n"


def _rate(row: dict[str, Any] | None, prefix: str = "") -> str:
    if row is None or row.get(f"{prefix}win_rate") is None:
        return "–"
    return f"{row[f'{prefix}win_rate']:.3f} [{row[f'{prefix}ci_low']:.3f}, {row[f'{prefix}ci_high']:.3f}]"


def winrates_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per comparison and temperature: the win rate and the length-controlled win rate with 95%
    intervals on each distribution, and the fitted length effect."""
    lines = [
        "| policy | vs | T | win rate, in-distribution [95% CI] | LC win rate, in-distribution [95% CI] "
        "| win rate, shifted [95% CI] | LC win rate, shifted [95% CI] | length effect in / shifted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["model"], r["baseline"], r["temperature"]) for r in rows))
    for model, baseline, temperature in keys:
        cells = {
            r["distribution"]: r for r in rows if (r["model"], r["baseline"], r["temperature"]) == (model, baseline, temperature)
        }
        inside, shifted = cells.get("in-distribution"), cells.get("shifted")
        effects = " / ".join(
            "–" if r is None or r.get("length_effect") is None else f"{r['length_effect']:.2f}" for r in (inside, shifted)
        )
        lines.append(
            f"| {model} | {baseline} | {temperature:g} | {_rate(inside)} | {_rate(inside, 'lc_')} "
            f"| {_rate(shifted)} | {_rate(shifted, 'lc_')} | {effects} |"
        )
    return "\n".join(lines) + "\n"


def plot_ood(result: OodResult, out_png: str | Path) -> Path:
    """Three panels: the reward-KL frontier on in-distribution and on shifted prompts (every checkpoint, 95%
    error bars, the same scales), and the win rates at the highest temperature on both distributions, raw
    (filled) and length-controlled (open); dated, with the machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpokit.analysis.frontier import draw_frontier

    figure, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    axes[1].sharex(axes[0])  # the same scales on both distributions
    axes[1].sharey(axes[0])
    for axis, distribution in zip(axes[:2], DISTRIBUTIONS, strict=True):
        points = [result.reference[distribution]]
        points += [p for policy in result.policies for p in policy.points[distribution]]
        bars = [dataclasses.replace(p, reward_sem=1.96 * p.reward_sem, kl_sem=1.96 * p.kl_sem) for p in points]  # 95%
        draw_frontier(axis, bars, title=f"{distribution} prompts")
    top = max((r["temperature"] for r in result.winrates), default=None)
    rows = [r for r in result.winrates if r["temperature"] == top]
    names = list(dict.fromkeys(f"{r['model']}\nvs {r['baseline']}" for r in rows))
    for offset, (distribution, marker) in zip((-0.15, 0.15), zip(DISTRIBUTIONS, "os", strict=True), strict=True):
        for prefix, fill in (("", "full"), ("lc_", "none")):
            picked = [r for r in rows if r["distribution"] == distribution]
            xs = [names.index(f"{r['model']}\nvs {r['baseline']}") + offset + (0.06 if prefix else 0) for r in picked]
            ys = [r[f"{prefix}win_rate"] for r in picked]
            errors = [
                [y - r[f"{prefix}ci_low"] for y, r in zip(ys, picked, strict=True)],
                [r[f"{prefix}ci_high"] - y for y, r in zip(ys, picked, strict=True)],
            ]
            color = "tab:blue" if distribution == "in-distribution" else "tab:red"
            axes[2].errorbar(
                xs,
                ys,
                yerr=errors,
                fmt=marker,
                color=color,
                fillstyle=fill,
                markersize=5,
                elinewidth=0.8,
                label=f"{distribution}{' (length-controlled)' if prefix else ''}",
            )
    axes[2].axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes[2].set_xticks(range(len(names)), names, fontsize=7)
    axes[2].set_ylabel("win rate (judge: VADER), 95% CI")
    axes[2].set_title(f"win rates at T={top:g}" if top is not None else "win rates")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    figure.suptitle(f"Sentiment policies on review prompts and on {result.settings.domain} prompts (shifted domain)", fontsize=11)
    footer = f"measured {result.date} on {result.machine} ({result.torch_threads} torch thread(s))"
    figure.text(0.99, 0.005, footer, ha="right", va="bottom", fontsize=7, color="grey")
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=120)
    plt.close(figure)
    return out_png


def summary_markdown(result: OodResult) -> str:
    """``results.md``: when and where, the final policies' table and the win rates' table."""
    return "\n".join(
        [
            f"Measured {result.date} on {result.machine}; {result.reference['shifted'].num_samples} samples per "
            f"model and distribution for the frontier ({result.settings.domain} prompts for the shifted one).",
            "",
            finals_markdown(result),
            winrates_markdown(result.winrates) if result.winrates else "",
        ]
    )


def write_outputs(result: OodResult, out_dir: Path) -> None:
    """``ood.png``, ``results.json`` and ``results.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_ood(result, out_dir / "ood.png")
    (out_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(summary_markdown(result), encoding="utf-8")


def run_ood_experiment(
    mode: str | OodSettings = "full",
    out_dir: str | Path = "runs/ood",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    threads: int = DEFAULT_THREADS,
    keep_checkpoints: bool = False,
    log: Log | None = None,
    engine: EngineOptions | None = None,
) -> OodResult:
    """Run the experiment with a named mode (``full``, ``quick``, ``smoke``) or explicit settings, on
    ``threads`` torch threads, sampling with ``engine`` (see :class:`OodExperiment`)."""
    with torch_threads(threads):
        settings = resolve_mode(mode, MODES)
        experiment = OodExperiment(settings, out_dir, cache_dir, keep_checkpoints=keep_checkpoints, log=log, engine=engine)
        return experiment.run()
