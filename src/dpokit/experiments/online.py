"""Online and self-labelling DPO on the sentiment task: does a policy learn from its own samples?

The DPO paper closes with a question: can training with self-labelling from the DPO policy make
effective use of unlabelled prompts? This experiment (``dpokit experiment online --mode full|quick``)
answers it on the miniature of the paper's controlled-sentiment task
(:mod:`dpokit.experiments.sentiment`: the cached SFT GPT-2, VADER as the ground-truth reward, pairs of
SFT samples labelled by it). Every arm starts from the same SFT model and takes the same number of
optimizer steps ``S`` (batch, learning rate, beta and the reference -- the SFT model -- shared):

* **(a) offline DPO** on all the labelled pairs;
* **(b) online DPO, ground truth**: ``dpokit online`` rounds from the SFT model -- K samples per
  prompt from the current policy, labelled by VADER (``reward:`` judge), best vs worst -- on the
  labelled set's prompts;
* **(c) self-labelled DPO**: DPO on 10% of the labelled pairs for ``S0`` steps, then ``S - S0``
  steps of online rounds on the prompts, labelled by that 10% policy's implicit reward
  ``r = beta * log pi_10 / pi_sft`` (``implicit:`` judge on a frozen copy of the 10% policy);
  **(c')** the same with the policy being trained as its own judge (``judge: self``, r = beta * log pi / pi_sft
  from the log-probs sampling computes);
* **(d) the fair baseline**: the same 10% start continued on its 10% pairs for the remaining
  ``S - S0`` steps (one DPO run of ``S`` steps on the 10%; its step-``S0`` checkpoint is (c)'s start).

Every checkpoint is evaluated on the reward-KL frontier (:func:`dpokit.analysis.frontier.estimate_reward_kl`,
KL to the SFT model). The final policies get the mean reward with a 95% confidence interval over
evaluation prompts (each prompt's samples averaged, normal interval), and (c) is compared with (d)
sample by sample -- same prompts, same sampling seed -- as a win rate under the ground-truth reward
(ties half, Wilson interval, :mod:`dpokit.judges.stats`) and as a paired mean reward difference.
The intervals cover the evaluation's sampling, not the training seed.

Outputs in ``out_dir``: ``frontier.png``, ``results.json`` (every point, the arms, the comparison,
timings) and ``results.md``; each arm's run directory under ``runs/`` (the online arms' rounds --
prompts, completions, judgments, pairs -- under ``runs/<arm>/rounds/``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.analysis.frontier import find_checkpoints, write_results
from dpokit.errors import ConfigError
from dpokit.experiments.lm import LMSettings
from dpokit.experiments.preferences import make_preference_pairs, write_jsonl
from dpokit.experiments.sentiment import (
    DEFAULT_CACHE_DIR,
    DEFAULT_THREADS,
    Experiment,
    ExperimentSettings,
    _trainer_config,
    resolve_mode,
    torch_threads,
)
from dpokit.experiments.sentiment import MODES as SENTIMENT_MODES
from dpokit.judges.stats import Z95, wilson_interval

VADER_JUDGE = "reward:dpokit.experiments.reward:vader_reward"
ARM_LABELS = {
    "reference": "SFT (reference)",
    "offline": "(a) offline DPO, all pairs",
    "online-gt": "(b) online DPO, ground-truth judge",
    "self-label": "(c) 10% DPO + self-labelled rounds (frozen 10% policy)",
    "self-label-current": "(c') 10% DPO + self-labelled rounds (current policy)",
    "ten-percent": "(d) 10% DPO only (baseline)",
}
SELF_JUDGES = ("frozen", "current")  # who self-labels: a frozen copy of the 10% policy, or the policy being trained


@dataclass(frozen=True)
class OnlineExperimentSettings:
    """Every knob of the experiment; :data:`MODES` holds the presets."""

    lm: LMSettings = field(default_factory=LMSettings)
    # The labelled pairs, as in the sentiment experiment: K SFT samples for each training prompt, every
    # pair with different rewards.
    num_train_prompts: int = 800
    completions_per_prompt: int = 4
    require_eos: bool = True
    labelled_fraction: float = 0.1  # (c) and (d) see this fraction of the pairs
    # Training, shared by every arm.
    beta: float = 0.1
    total_steps: int = 160  # S: optimizer steps of every arm
    start_steps: int = 32  # S0: steps of DPO on the labelled fraction before (c) turns to its own labels
    batch_size: int = 32
    lr: float = 5e-5
    warmup_steps: int = 10
    # Online rounds: prompts_per_round prompts x samples_per_prompt samples, best vs worst,
    # steps_per_round optimizer steps on the round's pairs.
    prompts_per_round: int = 128
    samples_per_prompt: int = 4
    steps_per_round: int = 8
    temperature: float = 1.0
    self_judges: tuple[str, ...] = SELF_JUDGES  # (c) with the frozen 10% policy's implicit reward, (c') the current one's
    # Evaluation.
    num_eval_prompts: int = 256
    eval_samples_per_prompt: int = 2
    max_new_tokens: int = 48
    checkpoints_per_run: int = 5
    heldout_prompts: int = 64  # held-out labelled pairs for the online runs' reward accuracy per round
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.start_steps < self.total_steps:
            raise ConfigError(f"start_steps must be in (0, total_steps={self.total_steps}), got {self.start_steps}")
        for name in ("total_steps", "start_steps"):
            if getattr(self, name) % self.steps_per_round:
                raise ConfigError(f"{name}={getattr(self, name)} must be a multiple of steps_per_round={self.steps_per_round}")
        every = max(1, self.total_steps // self.checkpoints_per_run)
        if self.start_steps % every:
            raise ConfigError(f"start_steps={self.start_steps} must be a multiple of the checkpoint interval {every}")
        if not self.self_judges or set(self.self_judges) - set(SELF_JUDGES):
            raise ConfigError(f"self_judges must be a non-empty subset of {SELF_JUDGES}, got {self.self_judges}")
        if not 0 < self.labelled_fraction <= 1:
            raise ConfigError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}")

    def sentiment(self) -> ExperimentSettings:
        """The sentiment experiment's settings for the shared pieces (SFT model, prompts, pairs, trainer)."""
        return ExperimentSettings(
            lm=self.lm,
            methods=("dpo",),
            num_train_prompts=self.num_train_prompts,
            completions_per_prompt=self.completions_per_prompt,
            require_eos=self.require_eos,
            num_eval_prompts=self.num_eval_prompts,
            eval_samples_per_prompt=self.eval_samples_per_prompt,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            checkpoints_per_run=self.checkpoints_per_run,
            seed=self.seed,
        )


MODES: dict[str, OnlineExperimentSettings] = {
    # The reported run, on the sentiment experiment's full SFT model and pairs.
    # (The defaults: 160 steps of batch 32; rounds of 128 prompts x 4 samples, 8 steps -- two passes over
    # a round's at most 128 pairs.)
    "full": OnlineExperimentSettings(lm=SENTIMENT_MODES["full"].lm),
    # Smaller everything, the quick sentiment model: 6.7 minutes measured on 2 busy CPU cores (load average 5).
    "quick": OnlineExperimentSettings(
        lm=SENTIMENT_MODES["quick"].lm,
        num_train_prompts=300,
        total_steps=64,
        start_steps=16,
        batch_size=16,
        lr=1e-4,
        prompts_per_round=64,
        steps_per_round=4,
        num_eval_prompts=96,
        checkpoints_per_run=4,
        heldout_prompts=32,
    ),
    # Tests: seconds.
    "smoke": OnlineExperimentSettings(
        lm=SENTIMENT_MODES["smoke"].lm,
        num_train_prompts=16,
        completions_per_prompt=3,
        require_eos=False,
        labelled_fraction=0.5,
        total_steps=2,
        start_steps=1,
        batch_size=4,
        lr=1e-3,
        warmup_steps=0,
        prompts_per_round=8,
        samples_per_prompt=4,
        steps_per_round=1,
        num_eval_prompts=6,
        eval_samples_per_prompt=2,
        max_new_tokens=10,
        checkpoints_per_run=2,
        heldout_prompts=4,
    ),
}


# ------------------------------------------------------------------------------------------------
# Statistics of the final policies
# ------------------------------------------------------------------------------------------------


def prompt_means(samples: Sequence[dict[str, Any]], key: str) -> list[float]:
    """``key`` averaged over each prompt's samples (prompts in first-seen order)."""
    groups: dict[str, list[float]] = {}
    for sample in samples:
        groups.setdefault(sample["prompt_index"], []).append(float(sample[key]))
    return [sum(values) / len(values) for values in groups.values()]


def mean_interval(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95% normal interval of ``values`` (one per evaluation prompt).

    >>> {k: round(v, 4) for k, v in mean_interval([0.0, 1.0, 0.0, 1.0]).items()}
    {'mean': 0.5, 'ci_low': -0.0658, 'ci_high': 1.0658}
    """
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    half = Z95 * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def compare_samples(ours: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sample i of one policy against sample i of another (same prompt, same sampling seed) under the
    ground-truth reward: wins / ties / losses, win rate (ties half) with a Wilson interval, and the
    paired mean reward difference with a 95% interval over prompts."""
    if len(ours) != len(theirs) or any(a["prompt"] != b["prompt"] for a, b in zip(ours, theirs, strict=True)):
        raise ConfigError("the two policies' evaluation samples do not answer the same prompts in the same order")
    wins = sum(a["reward"] > b["reward"] for a, b in zip(ours, theirs, strict=True))
    losses = sum(a["reward"] < b["reward"] for a, b in zip(ours, theirs, strict=True))
    ties = len(ours) - wins - losses
    low, high = wilson_interval(wins + 0.5 * ties, len(ours))
    differences = [{"prompt_index": a["prompt_index"], "d": a["reward"] - b["reward"]} for a, b in zip(ours, theirs, strict=True)]
    return {
        "n": len(ours),
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": (wins + 0.5 * ties) / len(ours),
        "win_rate_ci": [low, high],
        "reward_difference": mean_interval(prompt_means(differences, "d")),
    }


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------


class OnlineExperiment:
    """The four arms in ``out_dir``; the shared pieces come from the sentiment experiment."""

    def __init__(
        self,
        settings: OnlineExperimentSettings,
        out_dir: str | Path,
        cache_dir: str | Path,
        *,
        keep_checkpoints: bool = False,
        log: Callable[[str], None] | None = print,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self.keep_checkpoints = keep_checkpoints
        self.log = log or (lambda line: None)
        self.timings: dict[str, float] = {}
        self.finals: dict[str, dict[str, Any]] = {}  # arm -> its last point's full evaluation (all samples)
        self.online_stats: dict[str, list[dict[str, Any]]] = {}

    @property
    def checkpoint_every(self) -> int:
        """Checkpoint interval of every run; (c) starts from the 10% run's checkpoint at ``start_steps``."""
        return max(1, self.settings.total_steps // self.settings.checkpoints_per_run)

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self.settings), sort_keys=True).encode()).hexdigest()[:10]

    # -- shared pieces ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """SFT model, prompts and labelled pairs (the sentiment experiment's), the labelled fraction,
        the prompt file of the online rounds, and held-out labelled pairs for their reward accuracy."""
        s = self.settings
        self.base = Experiment(s.sentiment(), self.out_dir, self.cache_dir, log=self.log)
        self.base.prepare()
        self.sft_dir = self.base.sft_dir
        rows = [json.loads(line) for line in self.base.train_path.read_text().splitlines() if line.strip()]
        self.all_pairs = len(rows)
        self.few_pairs = max(1, round(s.labelled_fraction * len(rows)))  # the rows are shuffled already
        data = self.out_dir / "data"
        self.few_path = write_jsonl(rows[: self.few_pairs], data / "labelled-fraction.jsonl")
        self.prompts_path = write_jsonl([{"prompt": p} for p in self.base.train_prompts], data / "prompts.jsonl")
        heldout, _ = make_preference_pairs(
            self.base.sft_model,
            self.base.tokenizer,
            self.base.eval_prompts[: s.heldout_prompts],
            self.base.reward_fn,
            completions_per_prompt=2,
            max_new_tokens=s.max_new_tokens,
            require_eos=s.require_eos,
            seed=s.seed + 31,
        )
        self.heldout_path = write_jsonl(heldout, data / "heldout.jsonl") if heldout else None
        self.log(f"labelled pairs: {self.all_pairs} (a), {self.few_pairs} for the {s.labelled_fraction:.0%} start (c, d)")

    def evaluate(self, policy: torch.nn.Module) -> dict[str, Any]:
        """Reward and KL to the SFT model from the fixed evaluation prompts and seed, every sample kept."""
        s = self.settings
        total = s.num_eval_prompts * s.eval_samples_per_prompt
        estimate = self.base.evaluate(policy, keep_samples=total)
        for index, sample in enumerate(estimate["samples"]):
            sample["prompt_index"] = index // s.eval_samples_per_prompt
        return estimate

    # -- runs ------------------------------------------------------------------------------------

    def _config(self, run_dir: Path, train_path: Path, num_pairs: int) -> Any:
        """The sentiment experiment's DPO trainer config, for ``total_steps`` steps with checkpoints
        every ``checkpoint_every``."""
        s = self.settings
        cfg = _trainer_config(
            s.sentiment(),
            sft_dir=self.sft_dir,
            train_path=train_path,
            run_dir=run_dir,
            terms=[{"name": "sigmoid"}],
            beta=s.beta,
            num_pairs=num_pairs,
            cache_dir=self.cache_dir,
        )
        cfg.optim.max_steps = s.total_steps
        cfg.checkpoint.every_steps = self.checkpoint_every
        cfg.eval.every_steps = self.checkpoint_every
        return cfg

    def _stored(self, arm: str) -> list[dict[str, Any]] | None:
        path = self.out_dir / "points" / f"{arm}.json"
        if not path.exists():
            return None
        stored = json.loads(path.read_text())
        if stored.get("settings_key") != self.key():
            return None
        self.timings[arm] = stored["seconds"]
        self.finals[arm] = stored["final"]
        self.online_stats[arm] = stored.get("rounds", [])
        points: list[dict[str, Any]] = stored["points"]
        return points

    def _store(self, arm: str, points: list[dict[str, Any]], seconds: float) -> None:
        path = self.out_dir / "points" / f"{arm}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.timings[arm] = seconds
        payload = {"settings_key": self.key(), "points": points, "seconds": seconds, "final": self.finals[arm]}
        path.write_text(json.dumps({**payload, "rounds": self.online_stats.get(arm, [])}, indent=2) + "\n")

    def _evaluate_run(self, arm: str, run_dir: Path, offset: int = 0, keep: Sequence[int] = ()) -> list[dict[str, Any]]:
        """Every checkpoint of ``run_dir`` on the frontier (steps counted from the SFT model: + ``offset``);
        checkpoints are removed afterwards unless kept, or their step is in ``keep``."""
        from dpokit.models import load_policy

        points = []
        checkpoints = [(step, path) for step, path in find_checkpoints(run_dir) if step is not None]
        for index, (step, path) in enumerate(checkpoints):
            policy = load_policy(path, dtype="float32", device="cpu").model
            estimate = self.evaluate(policy)
            samples = estimate.pop("samples")
            if index == len(checkpoints) - 1:
                self.finals[arm] = {**estimate, "step": step + offset, "samples": samples}
            points.append({"method": ARM_LABELS[arm], "run": arm, "beta": None, "step": step + offset, **estimate})
            self.log(f"  {arm} step {step + offset}: reward {estimate['reward_mean']:.3f}  KL {estimate['kl_mean']:.2f}")
        if not self.keep_checkpoints:
            for step, path in checkpoints:
                if step not in keep:
                    shutil.rmtree(path.parent if path.name == "model" else path, ignore_errors=True)
        return points

    def run_offline(self, arm: str, train_path: Path, num_pairs: int, keep: Sequence[int] = ()) -> list[dict[str, Any]]:
        """(a) or (d): DPO from the SFT model on ``train_path`` for ``total_steps`` steps."""
        stored = self._stored(arm)
        if stored is not None:
            self.log(f"{arm}: stored")
            return stored
        from dpokit.training.trainer import run as train_run

        start = time.time()
        run_dir = self.out_dir / "runs" / arm
        shutil.rmtree(run_dir, ignore_errors=True)
        self.log(f"{arm}: DPO on {num_pairs} pairs, {self.settings.total_steps} steps")
        train_run(self._config(run_dir, train_path, num_pairs))
        points = self._evaluate_run(arm, run_dir, keep=keep)
        self._store(arm, points, time.time() - start)
        return points

    def _online_config(self, run_dir: Path, model_dir: Path, judge: str, steps: int, train_path: Path, num_pairs: int) -> Any:
        """``dpokit online`` from ``model_dir`` for ``steps`` optimizer steps, the SFT model as the fixed
        reference, ``judge`` labelling each round's samples best vs worst."""
        s = self.settings
        cfg = self._config(run_dir, train_path, num_pairs)
        cfg.model.name_or_path = str(model_dir)
        cfg.reference.strategy = "copy"
        cfg.reference.name_or_path = str(self.sft_dir)
        cfg.optim.max_steps = None
        cfg.data.eval_split_fraction = 0.0
        cfg.eval.every_steps = 0
        online = cfg.online
        online.prompts_path = str(self.prompts_path)
        online.rounds = steps // s.steps_per_round
        online.prompts_per_round = s.prompts_per_round
        online.samples_per_prompt = s.samples_per_prompt
        online.steps_per_round = s.steps_per_round
        online.pairs = "best_vs_worst"
        online.judge = judge
        online.reference = "fixed"
        online.heldout_path = None if self.heldout_path is None else str(self.heldout_path)
        online.sampling.max_new_tokens = s.max_new_tokens
        online.sampling.temperature = s.temperature
        online.sampling.batch_size = 256
        return cfg

    def run_online(self, arm: str, model_dir: Path, judge: str, steps: int, offset: int = 0) -> list[dict[str, Any]]:
        """(b) or (c): ``steps`` steps of online rounds from ``model_dir``, labelled by ``judge``."""
        stored = self._stored(arm)
        if stored is not None:
            self.log(f"{arm}: stored")
            return stored
        from dpokit.online import run_online

        start = time.time()
        run_dir = self.out_dir / "runs" / arm
        shutil.rmtree(run_dir, ignore_errors=True)
        s = self.settings
        self.log(
            f"{arm}: {steps // s.steps_per_round} rounds of {s.prompts_per_round} prompts x {s.samples_per_prompt} samples, "
            f"{s.steps_per_round} steps each, judge {judge}"
        )
        result = run_online(self._online_config(run_dir, model_dir, judge, steps, self.few_path, self.few_pairs))
        self.online_stats[arm] = result.rounds
        points = self._evaluate_run(arm, run_dir, offset=offset)
        self._store(arm, points, time.time() - start)
        return points

    def run_self_labelling(self, start_dir: Path, start_point: dict[str, Any]) -> list[dict[str, Any]]:
        """(c) and (c'): from the 10% policy, rounds labelled by its own implicit reward against the SFT
        model -- of a frozen copy of the 10% policy (``implicit:`` judge), or of the policy being trained
        (``self``: the log-probs the generation stage computes)."""
        s = self.settings
        judges = {
            "frozen": ("self-label", f"implicit:{start_dir},reference={self.sft_dir},beta={s.beta:g}"),
            "current": ("self-label-current", "self"),
        }
        points: list[dict[str, Any]] = []
        for name in s.self_judges:
            arm, judge = judges[name]
            points.append({**start_point, "method": ARM_LABELS[arm], "run": arm})
            points += self.run_online(arm, start_dir, judge, s.total_steps - s.start_steps, offset=s.start_steps)
        return points

    # -- the whole thing -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        s = self.settings
        start = time.time()
        self.prepare()
        reference = self.evaluate(self.base.sft_model)
        self.finals["reference"] = {**reference, "step": 0}
        samples = reference.pop("samples")
        points = [{"method": ARM_LABELS["reference"], "run": "sft", "beta": None, "step": 0, **reference}]
        self.finals["reference"]["samples"] = samples
        self.log(f"SFT reference: reward {reference['reward_mean']:.3f}  KL 0")
        points += self.run_offline("offline", self.base.train_path, self.all_pairs)
        points += self.run_offline("ten-percent", self.few_path, self.few_pairs, keep=(s.start_steps,))
        points += self.run_online("online-gt", self.sft_dir, VADER_JUDGE, s.total_steps)
        start_dir = self.out_dir / "runs" / "ten-percent" / f"checkpoint-{s.start_steps}" / "model"
        if not (start_dir / "config.json").exists():
            raise ConfigError(
                f"the 10% policy's step-{s.start_steps} checkpoint is missing ({start_dir}); "
                f"delete {self.out_dir / 'points'} and rerun"
            )
        points += self.run_self_labelling(
            start_dir, next(p for p in points if p["run"] == "ten-percent" and p["step"] == s.start_steps)
        )
        self.timings["total"] = time.time() - start
        summary = self.summary()
        write_results(
            points, self.out_dir, title="Online and self-labelling DPO (sentiment miniature): reward vs KL", extra=summary
        )
        with open(self.out_dir / "results.md", "a", encoding="utf-8") as handle:
            handle.write("\n" + summary_markdown(summary))
        self.log(f"done in {self.timings['total'] / 60:.1f} min: {self.out_dir / 'frontier.png'}")
        return {"points": points, **summary}

    def summary(self) -> dict[str, Any]:
        """The final policies' rewards and KLs with 95% intervals, and (c) against (d) and the start."""
        s = self.settings
        arms = {}
        for arm, final in self.finals.items():
            samples = final["samples"]
            arms[arm] = {
                "label": ARM_LABELS[arm],
                "step": final["step"],
                "reward": mean_interval(prompt_means(samples, "reward")),
                "kl": mean_interval(prompt_means(samples, "kl")),
                "mean_length": final.get("mean_length"),
                "seconds": round(self.timings.get(arm, 0.0), 1),
                "rounds": self.online_stats.get(arm, []),
            }
        comparisons = {}
        pairs = [("self-label", "ten-percent"), ("self-label-current", "ten-percent"), ("online-gt", "offline")]
        for ours, theirs in pairs + [("self-label", "offline"), ("self-label-current", "offline")]:
            if ours in self.finals and theirs in self.finals:
                comparisons[f"{ours} vs {theirs}"] = compare_samples(self.finals[ours]["samples"], self.finals[theirs]["samples"])
        return {
            "date": time.strftime("%Y-%m-%d"),
            "settings": asdict(s),
            "sft_dir": str(self.sft_dir),
            "labelled_pairs": {"all": self.all_pairs, "fraction": self.few_pairs},
            "arms": arms,
            "comparisons": comparisons,
            "timings_seconds": {k: round(v, 1) for k, v in self.timings.items()},
            "torch_threads": torch.get_num_threads(),
        }


def _interval(value: dict[str, float], digits: int = 3) -> str:
    return f"{value['mean']:.{digits}f} [{value['ci_low']:.{digits}f}, {value['ci_high']:.{digits}f}]"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The final policies as a table, then the comparisons (``results.md`` and the README)."""
    s = summary["settings"]
    lines = [
        f"Final policies after {s['total_steps']} optimizer steps (batch {s['batch_size']}, beta {s['beta']:g}); "
        f"{s['num_eval_prompts']} evaluation prompts x {s['eval_samples_per_prompt']} samples; 95% intervals over prompts:",
        "",
        "| arm | labelled pairs | reward [95% CI] | KL nats [95% CI] | mean length | seconds |",
        "|---|---|---|---|---|---|",
    ]
    pairs = summary["labelled_pairs"]
    used = {
        "reference": 0,
        "offline": pairs["all"],
        "online-gt": 0,
        "self-label": pairs["fraction"],
        "self-label-current": pairs["fraction"],
        "ten-percent": pairs["fraction"],
    }
    for arm, row in summary["arms"].items():
        length = row.get("mean_length")
        lines.append(
            f"| {row['label']} | {used.get(arm, '–')} | {_interval(row['reward'])} | {_interval(row['kl'], 2)} "
            f"| {'–' if length is None else f'{length:.1f}'} | {row['seconds']:.0f} |"
        )
    lines += ["", "Sample against sample (same prompt, same sampling seed), judged by the ground-truth reward:", ""]
    lines += [
        "| comparison | wins / ties / losses | win rate [95% Wilson CI] | reward difference [95% CI] |",
        "|---|---|---|---|",
    ]
    for name, c in summary["comparisons"].items():
        ours, theirs = name.split(" vs ")
        low, high = c["win_rate_ci"]
        lines.append(
            f"| {ARM_LABELS[ours]} vs {ARM_LABELS[theirs]} | {c['wins']} / {c['ties']} / {c['losses']} "
            f"| {c['win_rate']:.3f} [{low:.3f}, {high:.3f}] | {_interval(c['reward_difference'])} |"
        )
    return "\n".join(lines) + "\n"


def run_online_experiment(
    mode: str | OnlineExperimentSettings = "full",
    out_dir: str | Path = "runs/online",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    threads: int = DEFAULT_THREADS,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run the experiment with a named mode (``full``, ``quick``, ``smoke``) or explicit settings, on
    ``threads`` torch threads; ``kwargs`` go to :class:`OnlineExperiment`."""
    with torch_threads(threads):
        return OnlineExperiment(resolve_mode(mode, MODES), out_dir, cache_dir, **kwargs).run()
