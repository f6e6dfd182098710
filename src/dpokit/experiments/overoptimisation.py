"""Reward over-optimisation in DPO: the paper's Figure 3 (right) question, on the sentiment miniature.

The DPO paper asks how reward over-optimisation shows up in direct preference optimisation, and whether
the slight fall of its win rates late in training is an instance of it. Over-optimisation (Gao et al.
2022) is a proxy reward that keeps rising while the ground-truth reward peaks and falls. In DPO the proxy
is the policy's implicit reward ``r(x, y) = beta * log pi(y|x) / pi_ref(y|x)``. This experiment
(``dpokit experiment overoptimisation --mode full|quick``) trains DPO longer than the sentiment
experiment does, for several beta, and measures at **every checkpoint**:

* the **ground-truth reward** -- VADER on the policy's samples for held-out prompts, with a 95% interval
  over those samples (the frontier's evaluation, :class:`dpokit.experiments.results.FrontierEvaluation`);
* the **implicit reward of the policy's own samples**, the proxy the policy climbs: the mean of
  ``beta * (log pi(y|x) - log pi_ref(y|x))`` over the same samples, which is ``beta`` times the sampled
  sequence KL by definition (the two columns are one measurement in two units);
* the **implicit reward on held-out labelled pairs**: its mean margin ``r(x, y_w) - r(x, y_l)`` with a 95%
  interval, and its agreement with VADER (the fraction of pairs it ranks as VADER does, Wilson interval),
  on pairs of SFT samples for evaluation prompts never trained on -- whether the proxy still ranks what
  the ground truth ranks (:func:`dpokit.analysis.evaluate.run_eval`);
* the **KL** to the SFT model and the mean completion length.

It does the same for the online experiment's ground-truth arm (:mod:`dpokit.experiments.online`, arm
(b): online DPO whose rounds are labelled by VADER itself), with more checkpoints than that experiment
takes, and keeps its round records (the VADER score and KL of each round's training samples, length,
EOS rate). For every run the summary names the checkpoint where the ground-truth reward peaks and the
change from that peak to the end of training, with a 95% interval.

With ``--engine vllm`` (a running vLLM server serving the SFT model) every checkpoint's samples are drawn
on the server as in the sentiment experiment and the online arm's rounds sample there; the held-out
labelled pairs stay SFT samples from dpokit's seeded generator and the implicit rewards are computed here
(teacher-forced, no sampling); the stored curves are keyed by the engine.

Outputs in ``out_dir``: ``overoptimisation.png`` (the DPO beta sweep), ``overoptimisation-online.png``
(the online arm), ``results.json`` (every checkpoint's measurements, the summaries, settings, timings)
and ``results.md`` (the tables). Each run's measurements are stored under ``<out>/curves/`` keyed by the
settings, so an interrupted experiment picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit.analysis.frontier import FrontierPoint, find_checkpoints, restoring
from dpokit.experiments.online import MODES as ONLINE_MODES
from dpokit.experiments.online import VADER_JUDGE, OnlineExperiment, OnlineExperimentSettings
from dpokit.experiments.preferences import make_preference_pairs, write_jsonl
from dpokit.experiments.results import ResultStore, StoredRun, remove_checkpoints
from dpokit.experiments.sentiment import (
    DEFAULT_CACHE_DIR,
    DEFAULT_THREADS,
    Experiment,
    ExperimentSettings,
    SftModel,
    resolve_mode,
    store_key,
    torch_threads,
)
from dpokit.experiments.sentiment import MODES as SENTIMENT_MODES
from dpokit.generation import EngineOptions
from dpokit.judges.stats import Z95, wilson_interval

Log = Callable[[str], None]
Interval = dict[str, float]  # {"mean", "ci_low", "ci_high"}
HELDOUT_SEED = 29  # the held-out pairs' sampling seed (the sentiment experiment's implicit-judge check uses the same)
STORE_LAYOUT = 1  # enters the stored curves' key


@dataclass(frozen=True)
class OveroptimisationSettings:
    """The DPO sweep (``dpo``: its ``dpo_betas``, ``epochs`` and ``checkpoints_per_run``; its
    ``judge_check_prompts`` evaluation prompts give the held-out labelled pairs) and the online
    ground-truth arm (``online``; None leaves it out)."""

    dpo: ExperimentSettings
    online: OnlineExperimentSettings | None

    def key(self) -> str:
        """Hash of every setting: what the stored curves are valid for."""
        online = None if self.online is None else asdict(self.online)
        settings = {"dpo": asdict(self.dpo), "online": online, "store_layout": STORE_LAYOUT}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _dpo_sweep(base: ExperimentSettings, **changes: Any) -> ExperimentSettings:
    return dataclasses.replace(base, methods=("dpo",), winrate_temperatures=(), **changes)


MODES: dict[str, OveroptimisationSettings] = {
    # The reported run: the sentiment experiment's full SFT model and pairs, DPO for 6 epochs (3 times the
    # sentiment experiment's) with a checkpoint every half epoch; the online experiment's full (b) arm with
    # a checkpoint every 2 rounds.
    "full": OveroptimisationSettings(
        dpo=_dpo_sweep(SENTIMENT_MODES["full"], dpo_betas=(0.05, 0.1, 0.5), epochs=6, checkpoints_per_run=12),
        online=dataclasses.replace(ONLINE_MODES["full"], checkpoints_per_run=10),
    ),
    # Smaller everything: the quick SFT model and pairs, two beta.
    "quick": OveroptimisationSettings(
        dpo=_dpo_sweep(SENTIMENT_MODES["quick"], dpo_betas=(0.1, 0.5), epochs=6, checkpoints_per_run=6, judge_check_prompts=64),
        online=dataclasses.replace(ONLINE_MODES["quick"], checkpoints_per_run=8),
    ),
    # Tests: seconds.
    "smoke": OveroptimisationSettings(
        dpo=_dpo_sweep(SENTIMENT_MODES["smoke"], epochs=2, checkpoints_per_run=2, warmup_steps=0),
        online=ONLINE_MODES["smoke"],
    ),
}


# ------------------------------------------------------------------------------------------------
# Measurements and their summary
# ------------------------------------------------------------------------------------------------


def normal_interval(mean: float, sem: float) -> Interval:
    """``mean`` with its 95% normal interval from a standard error (NaN bounds when there is none).

    >>> {k: round(v, 3) for k, v in normal_interval(0.5, 0.1).items()}
    {'mean': 0.5, 'ci_low': 0.304, 'ci_high': 0.696}
    """
    half = Z95 * sem if math.isfinite(sem) else float("nan")
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def heldout_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The implicit reward on held-out labelled pairs from per-pair eval records (``rewards/margins``):
    the mean margin with a 95% normal interval, and the agreement with the labels -- pairs with a positive
    margin, ties (a zero margin) counted half -- with a Wilson interval.

    >>> s = heldout_summary([{"rewards/margins": m} for m in (1.0, 3.0, -1.0, 0.0)])
    >>> s["margin"]["mean"], s["agreement"]["mean"], s["pairs"]
    (0.75, 0.625, 4)
    """
    margins = [float(r["rewards/margins"]) for r in records if r.get("rewards/margins") is not None]
    n = len(margins)
    if n == 0:
        return {"pairs": 0, "margin": None, "agreement": None}
    mean = sum(margins) / n
    sem = math.sqrt(sum((m - mean) ** 2 for m in margins) / (n - 1) / n) if n > 1 else float("nan")
    agreed = sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)
    low, high = wilson_interval(agreed, n)
    return {"pairs": n, "margin": normal_interval(mean, sem), "agreement": {"mean": agreed / n, "ci_low": low, "ci_high": high}}


def checkpoint_row(point: FrontierPoint, beta: float, heldout: dict[str, Any] | None) -> dict[str, Any]:
    """One checkpoint's measurements: ground-truth reward, KL, the implicit reward of its own samples
    (``beta`` times the KL), the held-out implicit reward (None for the reference) and mean length."""
    return {
        "step": point.step,
        "reward": normal_interval(point.reward_mean, point.reward_sem),
        "kl": normal_interval(point.kl_mean, point.kl_sem),
        "implicit_reward": normal_interval(beta * point.kl_mean, beta * point.kl_sem),
        "heldout": heldout,
        "mean_length": point.mean_length,
    }


def summarise_curve(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where the ground-truth reward peaks over ``rows`` (checkpoints in step order, the reference first
    when present) and what changed from there to the last checkpoint: the reward's change with a 95%
    interval (the two checkpoints' samples taken as independent), and the implicit reward, KL and
    held-out agreement at the peak and at the end. ``peaked`` is true when the reward at the end is below
    the peak by more than its interval (the upper bound of the change is below 0).

    >>> rows = [{"step": s, "reward": normal_interval(r, 0.01), "kl": normal_interval(k, 0.1),
    ...          "implicit_reward": normal_interval(k / 10, 0.01), "heldout": None} for s, r, k in
    ...         [(0, 0.1, 0.0), (10, 0.8, 2.0), (20, 0.6, 5.0)]]
    >>> s = summarise_curve(rows)
    >>> s["peak_step"], s["peaked"], round(s["reward_change"]["mean"], 2)
    (10, True, -0.2)
    """
    peak = max(rows, key=lambda row: row["reward"]["mean"])
    last = rows[-1]
    sems = [(row["reward"]["ci_high"] - row["reward"]["mean"]) / Z95 for row in (peak, last)]
    change = last["reward"]["mean"] - peak["reward"]["mean"]
    half = Z95 * math.sqrt(sems[0] ** 2 + sems[1] ** 2) if peak is not last else 0.0
    return {
        "peak_step": peak["step"],
        "last_step": last["step"],
        "peak_reward": peak["reward"],
        "last_reward": last["reward"],
        "reward_change": {"mean": change, "ci_low": change - half, "ci_high": change + half},
        "peaked": peak is not last and change + half < 0,
        "implicit_reward": {"peak": peak["implicit_reward"]["mean"], "last": last["implicit_reward"]["mean"]},
        "kl": {"peak": peak["kl"]["mean"], "last": last["kl"]["mean"]},
        "margin": {name: _heldout(row, "margin") for name, row in (("peak", peak), ("last", last))},
        "agreement": {name: _heldout(row, "agreement") for name, row in (("peak", peak), ("last", last))},
    }


def _heldout(row: dict[str, Any], name: str) -> float | None:
    heldout = row.get("heldout")
    return None if not heldout or heldout.get(name) is None else float(heldout[name]["mean"])


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OveroptimisationResult:
    """Every run's checkpoint rows (``curves``: run -> ``{"label", "beta", "rows", "summary"}``, the
    online arm's with its ``rounds``) and what ``results.json`` holds beside them."""

    curves: dict[str, dict[str, Any]]
    settings: OveroptimisationSettings
    heldout_pairs: int
    timings_seconds: dict[str, float]
    torch_threads: int
    date: str
    machine: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "machine": self.machine,
            "settings": asdict(self.settings),
            "heldout_pairs": self.heldout_pairs,
            "curves": self.curves,
            "timings_seconds": self.timings_seconds,
            "torch_threads": self.torch_threads,
        }


class OveroptimisationExperiment:
    """The DPO sweep and the online ground-truth arm in ``out_dir``, on the sentiment experiment's pieces
    (SFT model, prompts, pairs, frontier evaluation). Progress goes to ``log``, one line at a time.
    ``engine`` and ``sft``: as :class:`~dpokit.experiments.sentiment.Experiment` takes them (on a vLLM server
    the online arm's rounds sample there too)."""

    def __init__(
        self,
        settings: OveroptimisationSettings,
        out_dir: str | Path,
        cache_dir: str | Path,
        *,
        keep_checkpoints: bool = False,
        log: Log | None = None,
        engine: EngineOptions | None = None,
        sft: SftModel | None = None,
    ) -> None:
        if settings.online is not None:
            settings.online.validate()
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self.keep_checkpoints = keep_checkpoints
        self.log: Log = log or (lambda line: None)
        self.engine = engine or EngineOptions()
        self.engine.validate()
        self.sft = sft
        self.store = ResultStore(self.out_dir / "curves", store_key(settings.key(), self.engine, sft), self.log)
        self.timings: dict[str, float] = {}

    def prepare(self) -> None:
        """The sentiment experiment's pieces (its checkpoints kept until measured here), and the held-out
        labelled pairs: two SFT samples for each of the first ``judge_check_prompts`` evaluation prompts,
        labelled by VADER, ties dropped."""
        s = self.settings.dpo
        self.base = Experiment(
            s, self.out_dir, self.cache_dir, keep_checkpoints=True, log=self.log, engine=self.engine, sft=self.sft
        )
        self.base.prepare()
        rows, _ = make_preference_pairs(
            self.base.sft_model,
            self.base.tokenizer,
            self.base.eval_prompts[: s.judge_check_prompts],
            self.base.reward_fn,
            completions_per_prompt=2,
            max_new_tokens=s.max_new_tokens,
            require_eos=s.require_eos,
            seed=s.seed + HELDOUT_SEED,
        )
        self.heldout_pairs = len(rows)
        self.heldout_path = write_jsonl(rows, self.out_dir / "data" / "heldout_pairs.jsonl") if rows else None
        self.log(f"held-out labelled pairs: {self.heldout_pairs}")

    def heldout(self, model_dir: Path, beta: float) -> dict[str, Any] | None:
        """The implicit reward of ``model_dir`` (against the SFT model, at ``beta``) on the held-out pairs."""
        if self.heldout_path is None:
            return None
        from dpokit.analysis.evaluate import EvalJob, run_eval

        job = EvalJob(
            model=str(model_dir),
            reference=str(self.base.sft_dir),
            data=str(self.heldout_path),
            loss="sigmoid",
            beta=beta,
            batch_size=64,
            cache_dir=str(self.out_dir / "data" / "cache"),
        )
        return heldout_summary(run_eval(job).result.per_example)

    def measure(self, run: str, run_dir: Path, points: list[FrontierPoint], beta: float) -> list[dict[str, Any]]:
        """One row per evaluated checkpoint of ``run_dir`` (``points``: the frontier's, same steps), then
        the checkpoints removed unless kept."""
        checkpoints = {step: path for step, path in find_checkpoints(run_dir) if step is not None}
        rows = []
        for point in points:
            heldout = self.heldout(checkpoints[point.step], beta) if point.step in checkpoints else None
            rows.append(checkpoint_row(point, beta, heldout))
            if heldout is not None and heldout["agreement"] is not None:
                self.log(
                    f"  {run} step {point.step}: held-out margin {heldout['margin']['mean']:.3f}  "
                    f"agreement {heldout['agreement']['mean']:.3f}"
                )
        if not self.keep_checkpoints:
            remove_checkpoints(run_dir)
        return rows

    def run_dpo(self, beta: float) -> dict[str, Any]:
        """DPO at ``beta`` for ``epochs`` epochs through the sentiment experiment's trainer run; every
        checkpoint measured."""
        run = f"dpo-beta{beta:g}"
        label = f"DPO β={beta:g}"
        stored = self.store.load(run)
        if stored is None:
            start = time.time()
            self.base.store.path(run).unlink(missing_ok=True)  # its checkpoints are needed again
            points = self.base.run_trainer(run, "dpo", [{"name": "sigmoid"}], beta)
            rows = self.measure(run, self.out_dir / "runs" / run, points, beta)
            stored = StoredRun(points=points, seconds=time.time() - start, measures=[self.sft_row, *rows])
            self.store.save(run, stored)
        self.timings[run] = stored.seconds
        rows = stored.measures
        return {"label": label, "beta": beta, "rows": rows, "summary": summarise_curve(rows)}

    def run_online_gt(self) -> dict[str, Any] | None:
        """The online experiment's ground-truth arm (b) from the SFT model, every checkpoint measured."""
        s = self.settings.online
        if s is None:
            return None
        arm = "online-gt"
        stored = self.store.load(arm)
        if stored is None:
            start = time.time()
            if self.base.server is not None:
                self.base.server.restore()  # the online experiment's own handle on the server starts from the SFT model
            online = OnlineExperiment(
                s, self.out_dir / "online", self.cache_dir, keep_checkpoints=True, log=self.log, engine=self.engine, sft=self.sft
            )
            online.prepare()
            with restoring(online.base.server):
                sft_row = checkpoint_row(online.reference_point(), s.beta, None)  # the online experiment's evaluation prompts
                online.store.path(arm).unlink(missing_ok=True)  # its checkpoints are needed again
                points = online.run_online(arm, online.sft_dir, VADER_JUDGE, s.total_steps)
            rows = self.measure(arm, self.out_dir / "online" / "runs" / arm, points, s.beta)
            rounds = online.online_stats.get(arm, [])
            stored = StoredRun(points, time.time() - start, rounds=rounds, measures=[sft_row, *rows])
            self.store.save(arm, stored)
        self.timings[arm] = stored.seconds
        rows = stored.measures
        label = f"online DPO, VADER judge (β={s.beta:g})"
        return {"label": label, "beta": s.beta, "rows": rows, "summary": summarise_curve(rows), "rounds": stored.rounds}

    def run(self) -> OveroptimisationResult:
        """Prepare, run the sweep and the online arm; write the figures, ``results.json`` and ``results.md``."""
        start = time.time()
        self.prepare()
        with restoring(self.base.server):
            point, _ = self.base.frontier.estimate(self.base.sft_model, method="SFT (reference)", run="sft", step=0)
            self.sft_row = checkpoint_row(point, 0.0, None)  # step 0: KL and implicit reward 0 by definition
            curves = {f"dpo-beta{beta:g}": self.run_dpo(beta) for beta in self.settings.dpo.dpo_betas}
            online = self.run_online_gt()
        if online is not None:
            curves["online-gt"] = online
        self.timings["total"] = time.time() - start
        result = OveroptimisationResult(
            curves=curves,
            settings=self.settings,
            heldout_pairs=self.heldout_pairs,
            timings_seconds={k: round(v, 1) for k, v in self.timings.items()},
            torch_threads=torch.get_num_threads(),
            date=time.strftime("%Y-%m-%d"),
            machine=machine_description(),
        )
        write_outputs(result, self.out_dir)
        self.log(f"done in {self.timings['total'] / 60:.1f} min: {self.out_dir / 'overoptimisation.png'}")
        return result


# ------------------------------------------------------------------------------------------------
# Figures and tables
# ------------------------------------------------------------------------------------------------


def machine_description() -> str:
    """The CPU model (Linux: /proc/cpuinfo), core count, memory and torch version, for the figures."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        meminfo = Path("/proc/meminfo").read_text(encoding="utf-8").split()
        memory = f", {int(meminfo[meminfo.index('MemTotal:') + 1]) / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        memory = ""
    return f"{os.cpu_count()}-core {cpu}{memory}, torch {torch.__version__}"


def _value(row: dict[str, Any], name: str) -> float:
    if name in ("margin", "agreement"):
        heldout = row.get("heldout") or {}
        value = heldout.get(name)
        return float("nan") if value is None else float(value["mean"])
    return float(row[name]["mean"])


def _band(row: dict[str, Any], name: str) -> tuple[float, float]:
    source = (row.get("heldout") or {}).get(name) if name in ("margin", "agreement") else row[name]
    return (float("nan"), float("nan")) if source is None else (float(source["ci_low"]), float(source["ci_high"]))


PANELS = (
    ("reward", "ground-truth reward (VADER)", "step"),
    ("implicit_reward", "implicit reward: own samples β·KL (solid),\nheld-out margin (dashed)", "step"),
    ("agreement", "implicit reward's agreement with VADER\non held-out pairs", "step"),
    ("reward", "ground-truth reward (VADER)", "kl"),
)


def _draw(axis: Any, curve: dict[str, Any], panel: tuple[str, str, str], color: str) -> None:
    """One curve in one panel: its points joined, 95% intervals as a band (error bars against the KL), the
    held-out margin beside the implicit reward, and the ground-truth peak as a star."""
    name, _, x_name = panel
    rows = curve["rows"]
    xs = [row["step"] if x_name == "step" else row["kl"]["mean"] for row in rows]
    ys = [_value(row, name) for row in rows]
    bands = [_band(row, name) for row in rows]
    if x_name == "step":
        axis.plot(xs, ys, "o-", color=color, markersize=3.5, linewidth=1.2, label=curve["label"])
        axis.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands], color=color, alpha=0.15, linewidth=0)
    else:
        errors = [[y - b[0] for y, b in zip(ys, bands, strict=True)], [b[1] - y for y, b in zip(ys, bands, strict=True)]]
        axis.errorbar(xs, ys, yerr=errors, fmt="o-", color=color, markersize=3.5, linewidth=1.2, elinewidth=0.7)
    if name == "implicit_reward":
        axis.plot(xs, [_value(row, "margin") for row in rows], "s--", color=color, markersize=3, linewidth=1)
    if name == "reward":
        peak = next(row for row in rows if row["step"] == curve["summary"]["peak_step"])
        px = peak["step"] if x_name == "step" else peak["kl"]["mean"]
        axis.plot([px], [peak["reward"]["mean"]], "*", color=color, markersize=13, markeredgecolor="black")


def _draw_rounds(axes: Any, rounds: Sequence[dict[str, Any]], steps_per_round: int, beta: float) -> None:
    """An online run's round records: the VADER score and beta x KL of each round's training samples,
    at the step the round started from."""
    xs = [record["round"] * steps_per_round for record in rounds]
    axes.flat[0].plot(xs, [r["judge/score_mean"] for r in rounds], ":", color="grey", label="each round's training samples")
    axes.flat[1].plot(xs, [beta * r["kl"] for r in rounds], ":", color="grey")


def plot_curves(
    curves: Sequence[dict[str, Any]],
    out_png: str | Path,
    title: str,
    *,
    steps_per_round: int | None = None,
    footer: str | None = None,
) -> Path:
    """Four panels over the checkpoints of every curve, 95% intervals as bands: the ground-truth reward,
    the implicit reward (of the policy's own samples, and its margin on held-out pairs) and the implicit
    reward's held-out agreement against the step, and the ground-truth reward against the KL; each curve's
    ground-truth peak marked with a star. With ``steps_per_round``, a curve's online ``rounds`` are drawn too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, curve in enumerate(curves):
        for axis, panel in zip(axes.flat, PANELS, strict=True):
            _draw(axis, curve, panel, colors[index % len(colors)])
        if steps_per_round and curve.get("rounds"):
            _draw_rounds(axes, curve["rounds"], steps_per_round, curve["beta"])
    for axis, (_, ylabel, x_name) in zip(axes.flat, PANELS, strict=True):
        axis.set_ylabel(ylabel, fontsize=9)
        axis.set_xlabel("optimizer step" if x_name == "step" else "KL(π ‖ π_sft)  [nats per completion]", fontsize=9)
        axis.grid(alpha=0.3)
    axes.flat[2].axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.flat[0].legend(fontsize=8, loc="lower right")
    figure.suptitle(title + "  (★ = peak of the ground-truth reward; bands: 95% intervals)", fontsize=10)
    if footer:
        figure.text(0.99, 0.005, footer, ha="right", va="bottom", fontsize=7, color="grey")
    figure.tight_layout(rect=(0, 0.015, 1, 1))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=120)
    plt.close(figure)
    return out_png


def _ci(value: dict[str, float] | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if math.isnan(value["ci_low"]):
        return f"{value['mean']:.{digits}f}"
    return f"{value['mean']:.{digits}f} [{value['ci_low']:.{digits}f}, {value['ci_high']:.{digits}f}]"


def summary_markdown(curves: dict[str, dict[str, Any]]) -> str:
    """One row per run: the ground-truth reward's peak and last checkpoint, the change between them with
    its 95% interval and whether it peaked, and the implicit reward (on its own samples and as the held-out
    margin), KL and held-out agreement at both."""
    lines = [
        "| run | peak step / last step | reward at peak [95% CI] | reward at last [95% CI] | change, last − peak [95% CI] "
        "| peaked | implicit reward (β·KL) peak → last | held-out margin peak → last | KL nats peak → last "
        "| held-out agreement peak → last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def arrow(pair: dict[str, float | None], digits: int) -> str:
        return " → ".join("–" if v is None else f"{v:.{digits}f}" for v in pair.values())

    for curve in curves.values():
        s = curve["summary"]
        lines.append(
            f"| {curve['label']} | {s['peak_step']} / {s['last_step']} | {_ci(s['peak_reward'])} | {_ci(s['last_reward'])} "
            f"| {_ci(s['reward_change'])} | {'yes' if s['peaked'] else 'no'} | {arrow(s['implicit_reward'], 2)} "
            f"| {arrow(s['margin'], 2)} | {arrow(s['kl'], 1)} | {arrow(s['agreement'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def checkpoints_markdown(curve: dict[str, Any]) -> str:
    """Every checkpoint of one run with its 95% intervals."""
    lines = [
        f"**{curve['label']}**",
        "",
        "| step | reward [95% CI] | implicit reward β·KL [95% CI] | held-out margin [95% CI] "
        "| held-out agreement [95% Wilson CI] | KL nats [95% CI] | mean length |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in curve["rows"]:
        heldout = row.get("heldout") or {}
        length = row.get("mean_length")
        lines.append(
            f"| {row['step']} | {_ci(row['reward'])} | {_ci(row['implicit_reward'])} | {_ci(heldout.get('margin'))} "
            f"| {_ci(heldout.get('agreement'))} | {_ci(row['kl'], 2)} | {'–' if length is None else f'{length:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(result: OveroptimisationResult, out_dir: Path) -> None:
    """``overoptimisation.png``, ``overoptimisation-online.png`` (when the online arm ran), ``results.json``
    and ``results.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dpo = [curve for run, curve in result.curves.items() if run != "online-gt"]
    footer = f"measured {result.date} on {result.machine} ({result.torch_threads} torch thread(s))"
    plot_curves(dpo, out_dir / "overoptimisation.png", "DPO over training (sentiment miniature)", footer=footer)
    if "online-gt" in result.curves:
        curve = result.curves["online-gt"]
        steps = None if result.settings.online is None else result.settings.online.steps_per_round
        title = "Online DPO labelled by VADER"
        plot_curves([curve], out_dir / "overoptimisation-online.png", title, steps_per_round=steps, footer=footer)
    (out_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    text = [f"Measured {result.date} on {result.machine}; {result.heldout_pairs} held-out labelled pairs.", ""]
    text += [summary_markdown(result.curves)]
    text += [checkpoints_markdown(curve) for curve in result.curves.values()]
    (out_dir / "results.md").write_text("\n".join(text), encoding="utf-8")


def run_overoptimisation_experiment(
    mode: str | OveroptimisationSettings = "full",
    out_dir: str | Path = "runs/overoptimisation",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    threads: int = DEFAULT_THREADS,
    keep_checkpoints: bool = False,
    log: Log | None = None,
    engine: EngineOptions | None = None,
) -> OveroptimisationResult:
    """Run the experiment with a named mode (``full``, ``quick``, ``smoke``) or explicit settings, on
    ``threads`` torch threads, sampling with ``engine`` (see :class:`OveroptimisationExperiment`)."""
    with torch_threads(threads):
        experiment = OveroptimisationExperiment(
            resolve_mode(mode, MODES), out_dir, cache_dir, keep_checkpoints=keep_checkpoints, log=log, engine=engine
        )
        return experiment.run()
