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

**Length control** of the self-labelled arms (the plain implicit reward, a sum over tokens, prefers
longer completions): ``self_reward`` / ``length_penalty`` give (c') a length-regularized or
length-normalized self-label (``online.self_reward``, :mod:`dpokit.online.labelling`; (c)'s frozen
``implicit:`` judge has no such form, so these settings run (c') alone), and ``prefer_shorter_within``
gives (c) and (c') the length-aware pair choice (``online.prefer_shorter_within``). The arms' labels say
which; settings at their defaults leave the stored results' key unchanged.

Every checkpoint is evaluated on the reward-KL frontier (:func:`dpokit.analysis.frontier.estimate_reward_kl`,
KL to the SFT model). The final policies get the mean reward with a 95% confidence interval over
evaluation prompts (each prompt's samples averaged, normal interval), and (c) is compared with (d)
sample by sample -- same prompts, same sampling seed -- as a win rate under the ground-truth reward
(ties half, Wilson interval, :mod:`dpokit.judges.stats`) and as a paired mean reward difference.
The intervals cover the evaluation's sampling, not the training seed.

With ``--engine vllm`` (a running vLLM server serving the SFT model) the online arms' rounds sample on the
server (``online.sampling.engine=vllm``: the policy's weights are loaded into it before each round) and every
checkpoint's evaluation samples are drawn there as in the sentiment experiment; the labelled pairs stay
SFT samples from dpokit's seeded generator; the stored arms are keyed by the engine.

Outputs in ``out_dir``: ``frontier.png``, ``results.json`` (every point, the arms, the comparison,
timings) and ``results.md``; each arm's run directory under ``runs/`` (the online arms' rounds --
prompts, completions, judgments, pairs -- under ``runs/<arm>/rounds/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dpokit.analysis.frontier import FrontierPoint, restoring, write_results
from dpokit.analysis.winrate import length_control_cells
from dpokit.errors import ConfigError
from dpokit.experiments.lm import LMSettings
from dpokit.experiments.preferences import make_preference_pairs, write_jsonl
from dpokit.experiments.results import ResultStore, Sample, StoredRun, remove_checkpoints
from dpokit.experiments.sentiment import (
    DEFAULT_CACHE_DIR,
    DEFAULT_THREADS,
    Experiment,
    ExperimentSettings,
    SftModel,
    resolve_mode,
    torch_threads,
    trainer_config,
)
from dpokit.experiments.sentiment import MODES as SENTIMENT_MODES
from dpokit.generation import EngineOptions
from dpokit.judges.stats import Z95, length_controlled, t_interval, wilson_interval

if TYPE_CHECKING:
    from dpokit.config import TrainConfig

Log = Callable[[str], None]

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
SELF_ARMS = ("self-label", "self-label-current")
# Length-control settings at these values are left out of the stored results' key (results from before they existed stay valid).
LENGTH_CONTROL_DEFAULTS: dict[str, Any] = {"self_reward": "implicit", "length_penalty": 0.0, "prefer_shorter_within": None}


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
    # Length control of the self-labelled arms (see the module docstring): (c')'s label form, alpha per
    # token for length_regularized, and the length-aware pair choice of (c) and (c') (None = off).
    self_reward: str = "implicit"
    length_penalty: float = 0.0
    prefer_shorter_within: float | None = None
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
        self.validate_length_control()

    def validate_length_control(self) -> None:
        """The length-control settings, by the online loop's own validation, before any arm trains."""
        from dpokit.config import TrainConfig, validate_config

        if self.self_reward != "implicit" and "frozen" in self.self_judges:
            raise ConfigError(
                f"self_reward={self.self_reward} shapes the labels of the policy being trained (c'); the frozen 10% "
                "policy's implicit: judge (c) has no length form: set self_judges=('current',)"
            )
        cfg = TrainConfig()
        cfg.online.judge, cfg.online.self_reward = "self", self.self_reward  # type: ignore[assignment]
        cfg.online.length_penalty, cfg.online.prefer_shorter_within = self.length_penalty, self.prefer_shorter_within
        validate_config(cfg)

    def length_control_note(self) -> str:
        """How the self-labelled arms control length, for their labels ("" when they do not)."""
        parts = []
        if self.self_reward != "implicit":
            alpha = f", alpha={self.length_penalty:g}" if self.self_reward == "length_regularized" else ""
            parts.append(f"{self.self_reward.replace('_', '-')} reward{alpha}")
        if self.prefer_shorter_within is not None:
            parts.append(f"shortest within {self.prefer_shorter_within:g} of the best chosen")
        return f" [{'; '.join(parts)}]" if parts else ""

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
    # Smaller everything, the quick sentiment model.
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
    paired mean reward difference with a 95% interval over prompts. When the samples carry their
    ``completion``, also the length-controlled win rate -- the win rate at equal length, from a logistic
    fit of each pair's outcome on its length difference in characters
    (:func:`dpokit.judges.stats.length_controlled`, bootstrap over prompts) -- and the fitted length
    effect (> 0: the longer completion tends to win), each with its 95% interval."""
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
        **_length_control(ours, theirs),
    }


def _length_control(ours: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`compare_samples`'s length-controlled win rate and length effect ({} without completions)."""
    if not all("completion" in sample for sample in [*ours, *theirs]):
        return {}
    pairs = list(zip(ours, theirs, strict=True))
    outcomes = ["win" if a["reward"] > b["reward"] else "loss" if a["reward"] < b["reward"] else "tie" for a, b in pairs]
    lengths = [float(len(a["completion"]) - len(b["completion"])) for a, b in pairs]
    control = length_controlled(outcomes, lengths, [a["prompt_index"] for a in ours])
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(control).items()}


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------


STORE_LAYOUT = 2  # enters the stored points' key: arms stored in an older layout are run again


@dataclass(frozen=True)
class OnlineExperimentResult:
    """What the experiment measured: every point of the frontier, the final policies (``arms``: rewards and
    KLs with 95% intervals, time, round statistics) and the sample-by-sample ``comparisons``."""

    points: list[FrontierPoint]
    arms: dict[str, dict[str, Any]]
    comparisons: dict[str, dict[str, Any]]
    labelled_pairs: dict[str, int]
    settings: OnlineExperimentSettings
    sft_dir: Path
    timings_seconds: dict[str, float]
    torch_threads: int
    date: str

    def summary(self) -> dict[str, Any]:
        """``results.json``'s fields beside the points (what :func:`summary_markdown` reads)."""
        return {
            "date": self.date,
            "settings": asdict(self.settings),
            "sft_dir": str(self.sft_dir),
            "labelled_pairs": self.labelled_pairs,
            "arms": self.arms,
            "comparisons": self.comparisons,
            "timings_seconds": self.timings_seconds,
            "torch_threads": self.torch_threads,
        }


class OnlineExperiment:
    """The four arms in ``out_dir``; the shared pieces come from the sentiment experiment. Progress goes
    to ``log``, one line at a time. ``engine`` and ``sft``: as :class:`~dpokit.experiments.sentiment.Experiment`
    takes them (on a vLLM server the online rounds sample there too)."""

    def __init__(
        self,
        settings: OnlineExperimentSettings,
        out_dir: str | Path,
        cache_dir: str | Path,
        *,
        keep_checkpoints: bool = False,
        log: Log | None = None,
        engine: EngineOptions | None = None,
        sft: SftModel | None = None,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self.keep_checkpoints = keep_checkpoints
        self.log: Log = log or (lambda line: None)
        self.engine = engine or EngineOptions()
        self.engine.validate()
        self.sft = sft
        self.store = ResultStore(self.out_dir / "points", self.key(), self.log)
        self.timings: dict[str, float] = {}
        self.finals: dict[str, tuple[FrontierPoint, list[Sample]]] = {}  # arm -> its last point and all its samples
        self.online_stats: dict[str, list[dict[str, Any]]] = {}

    @property
    def checkpoint_every(self) -> int:
        """Checkpoint interval of every run; (c) starts from the 10% run's checkpoint at ``start_steps``."""
        return max(1, self.settings.total_steps // self.settings.checkpoints_per_run)

    def key(self) -> str:
        """Hash of every setting (and of the stored points' layout): what the stored arms are valid for; the
        sampling engine other than dpokit's and an SFT model given instead of the cached one are part of it."""
        settings = {**asdict(self.settings), "store_layout": STORE_LAYOUT}
        settings = {k: v for k, v in settings.items() if k not in LENGTH_CONTROL_DEFAULTS or v != LENGTH_CONTROL_DEFAULTS[k]}
        if self.engine.engine != "dpokit":
            settings["engine"] = self.engine.engine
        if self.sft is not None:
            settings["sft_dir"] = str(Path(self.sft[2]).resolve())
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]

    def label(self, arm: str) -> str:
        """The arm's label; a self-labelled arm's names its length control."""
        return ARM_LABELS[arm] + (self.settings.length_control_note() if arm in SELF_ARMS else "")

    # -- shared pieces ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """SFT model, prompts and labelled pairs (the sentiment experiment's), the labelled fraction,
        the prompt file of the online rounds, and held-out labelled pairs for their reward accuracy."""
        s = self.settings
        self.base = Experiment(s.sentiment(), self.out_dir, self.cache_dir, log=self.log, engine=self.engine, sft=self.sft)
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

    @property
    def all_samples(self) -> int:
        """Evaluation samples of one model: every one is kept for the final policies' statistics."""
        return self.settings.num_eval_prompts * self.settings.eval_samples_per_prompt

    def _indexed(self, samples: list[Sample]) -> list[Sample]:
        """``samples`` (prompt by prompt, ``eval_samples_per_prompt`` each) with their ``prompt_index``."""
        per_prompt = self.settings.eval_samples_per_prompt
        return [{**sample, "prompt_index": index // per_prompt} for index, sample in enumerate(samples)]

    def reference_point(self) -> FrontierPoint:
        """The SFT model on the frontier (KL 0), every sample kept as the reference arm's final."""
        point, samples = self.base.frontier.estimate(
            self.base.sft_model, method=ARM_LABELS["reference"], run="sft", step=0, keep_samples=self.all_samples
        )
        self.finals["reference"] = (point, self._indexed(samples))
        self.log(f"SFT reference: reward {point.reward_mean:.3f}  KL 0")
        return point

    # -- runs ------------------------------------------------------------------------------------

    def _config(self, run_dir: Path, train_path: Path, num_pairs: int) -> TrainConfig:
        """The sentiment experiment's DPO trainer config, for ``total_steps`` steps with checkpoints
        every ``checkpoint_every``."""
        s = self.settings
        cfg = trainer_config(
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

    def _stored(self, arm: str) -> list[FrontierPoint] | None:
        """The stored points of ``arm`` under these settings (its final samples, time and rounds restored)."""
        stored = self.store.load(arm)
        if stored is None:
            return None
        self.timings[arm] = stored.seconds
        self.finals[arm] = (stored.points[-1], stored.samples)
        self.online_stats[arm] = stored.rounds
        self.log(f"{arm}: stored")
        return stored.points

    def _evaluate_run(
        self, arm: str, run_dir: Path, start: float, offset: int = 0, keep: Sequence[int] = ()
    ) -> list[FrontierPoint]:
        """Every checkpoint of ``run_dir`` on the frontier (steps counted from the SFT model: + ``offset``),
        stored with the time since ``start``; checkpoints are removed afterwards unless kept, or their step
        is in ``keep``."""
        points, samples = self.base.frontier.checkpoints(
            run_dir, method=self.label(arm), run=arm, step_offset=offset, keep_samples=self.all_samples, log=self.log
        )
        self.finals[arm] = (points[-1], self._indexed(samples))
        if not self.keep_checkpoints:
            remove_checkpoints(run_dir, keep_steps=keep)
        self.timings[arm] = time.time() - start
        stored = StoredRun(points, self.timings[arm], samples=self.finals[arm][1], rounds=self.online_stats.get(arm, []))
        self.store.save(arm, stored)
        return points

    def run_offline(self, arm: str, train_path: Path, num_pairs: int, keep: Sequence[int] = ()) -> list[FrontierPoint]:
        """(a) or (d): DPO from the SFT model on ``train_path`` for ``total_steps`` steps."""
        stored = self._stored(arm)
        if stored is not None:
            return stored
        from dpokit.training.trainer import run as train_run

        start = time.time()
        run_dir = self.out_dir / "runs" / arm
        shutil.rmtree(run_dir, ignore_errors=True)
        self.log(f"{arm}: DPO on {num_pairs} pairs, {self.settings.total_steps} steps")
        train_run(self._config(run_dir, train_path, num_pairs))
        return self._evaluate_run(arm, run_dir, start, keep=keep)

    def _online_config(
        self, run_dir: Path, model_dir: Path, judge: str, steps: int, train_path: Path, num_pairs: int
    ) -> TrainConfig:
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
        if self.engine.engine == "vllm":  # the rounds sample on the server, given the policy before each round
            online.sampling.engine, online.sampling.url = "vllm", self.engine.url
            online.sampling.api_key_env = self.engine.api_key_env
        return cfg

    def run_online(self, arm: str, model_dir: Path, judge: str, steps: int, offset: int = 0) -> list[FrontierPoint]:
        """(b) or (c): ``steps`` steps of online rounds from ``model_dir``, labelled by ``judge``."""
        stored = self._stored(arm)
        if stored is not None:
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
        cfg = self._online_config(run_dir, model_dir, judge, steps, self.few_path, self.few_pairs)
        if arm in SELF_ARMS:
            cfg.online.prefer_shorter_within = s.prefer_shorter_within
            if judge == "self":
                cfg.online.self_reward, cfg.online.length_penalty = s.self_reward, s.length_penalty  # type: ignore[assignment]
        result = run_online(cfg)
        if self.base.server is not None:
            self.base.server.changed = True  # the rounds left the policy's weights in the server
        self.online_stats[arm] = result.rounds
        return self._evaluate_run(arm, run_dir, start, offset=offset)

    def run_self_labelling(self, start_dir: Path, start_point: FrontierPoint) -> list[FrontierPoint]:
        """(c) and (c'): from the 10% policy, rounds labelled by its own implicit reward against the SFT
        model -- of a frozen copy of the 10% policy (``implicit:`` judge), or of the policy being trained
        (``self``: the log-probs the generation stage computes)."""
        s = self.settings
        judges = {
            "frozen": ("self-label", f"implicit:{start_dir},reference={self.sft_dir},beta={s.beta:g}"),
            "current": ("self-label-current", "self"),
        }
        points: list[FrontierPoint] = []
        for name in s.self_judges:
            arm, judge = judges[name]
            points.append(start_point.relabelled(method=self.label(arm), run=arm))
            points += self.run_online(arm, start_dir, judge, s.total_steps - s.start_steps, offset=s.start_steps)
        return points

    # -- the whole thing -------------------------------------------------------------------------

    def run(self) -> OnlineExperimentResult:
        """Prepare, run the arms; write ``frontier.png``, ``results.json`` and ``results.md`` into ``out_dir``."""
        start = time.time()
        self.prepare()
        with restoring(self.base.server):
            points = self.run_arms()
        self.timings["total"] = time.time() - start
        result = self.result(points)
        summary = result.summary()
        write_results(
            points,
            self.out_dir,
            title="Online and self-labelling DPO (sentiment miniature): reward vs KL",
            extra=summary,
        )
        with open(self.out_dir / "results.md", "a", encoding="utf-8") as handle:
            handle.write("\n" + summary_markdown(summary))
        self.log(f"done in {self.timings['total'] / 60:.1f} min: {self.out_dir / 'frontier.png'}")
        return result

    def run_arms(self) -> list[FrontierPoint]:
        """The reference and every arm's points, in the order the arms depend on each other."""
        s = self.settings
        points = [self.reference_point()]
        points += self.run_offline("offline", self.base.train_path, self.all_pairs)
        points += self.run_offline("ten-percent", self.few_path, self.few_pairs, keep=(s.start_steps,))
        points += self.run_online("online-gt", self.sft_dir, VADER_JUDGE, s.total_steps)
        start_dir = self.out_dir / "runs" / "ten-percent" / f"checkpoint-{s.start_steps}" / "model"
        if not (start_dir / "config.json").exists():
            raise ConfigError(
                f"the 10% policy's step-{s.start_steps} checkpoint is missing ({start_dir}); "
                f"delete {self.out_dir / 'points'} and rerun"
            )
        start_point = next(p for p in points if p.run == "ten-percent" and p.step == s.start_steps)
        return points + self.run_self_labelling(start_dir, start_point)

    def result(self, points: list[FrontierPoint]) -> OnlineExperimentResult:
        """The final policies' rewards and KLs with 95% intervals, and (c) against (d) and the start."""
        arms = {}
        for arm, (point, samples) in self.finals.items():
            arms[arm] = {
                "label": self.label(arm),
                "step": point.step,
                "reward": mean_interval(prompt_means(samples, "reward")),
                "kl": mean_interval(prompt_means(samples, "kl")),
                "mean_length": point.mean_length,
                "seconds": round(self.timings.get(arm, 0.0), 1),
                "rounds": self.online_stats.get(arm, []),
            }
        comparisons = {}
        pairs = [("self-label", "ten-percent"), ("self-label-current", "ten-percent"), ("online-gt", "offline")]
        for ours, theirs in pairs + [("self-label", "offline"), ("self-label-current", "offline")]:
            if ours in self.finals and theirs in self.finals:
                comparisons[f"{ours} vs {theirs}"] = compare_samples(self.finals[ours][1], self.finals[theirs][1])
        return OnlineExperimentResult(
            points=points,
            arms=arms,
            comparisons=comparisons,
            labelled_pairs={"all": self.all_pairs, "fraction": self.few_pairs},
            settings=self.settings,
            sft_dir=self.sft_dir,
            timings_seconds={k: round(v, 1) for k, v in self.timings.items()},
            torch_threads=torch.get_num_threads(),
            date=time.strftime("%Y-%m-%d"),
        )


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
    lc = any("lc_win_rate" in c for c in summary["comparisons"].values())
    lines += [
        "| comparison | wins / ties / losses | win rate [95% Wilson CI] | reward difference [95% CI] |"
        + (" LC win rate [95% CI] | length effect [95% CI] |" if lc else ""),
        "|---|---|---|---|" + ("---|---|" if lc else ""),
    ]

    def label(arm: str) -> str:
        return str(summary["arms"].get(arm, {}).get("label", ARM_LABELS[arm]))

    for name, c in summary["comparisons"].items():
        ours, theirs = name.split(" vs ")
        low, high = c["win_rate_ci"]
        lines.append(
            f"| {label(ours)} vs {label(theirs)} | {c['wins']} / {c['ties']} / {c['losses']} "
            f"| {c['win_rate']:.3f} [{low:.3f}, {high:.3f}] | {_interval(c['reward_difference'])} |"
            + (length_control_cells(c) if lc else "")
        )
    if lc:
        lines += [
            "",
            "LC: the win rate at equal length (lengths in characters); length effect > 0: the longer sample tends to win.",
        ]
    return "\n".join(lines) + "\n"


def run_online_experiment(
    mode: str | OnlineExperimentSettings = "full",
    out_dir: str | Path = "runs/online",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    threads: int = DEFAULT_THREADS,
    keep_checkpoints: bool = False,
    log: Log | None = None,
    engine: EngineOptions | None = None,
) -> OnlineExperimentResult:
    """Run the experiment with a named mode (``full``, ``quick``, ``smoke``) or explicit settings, on
    ``threads`` torch threads, sampling with ``engine`` (see :class:`OnlineExperiment` for the rest)."""
    with torch_threads(threads):
        settings = resolve_mode(mode, MODES)
        experiment = OnlineExperiment(settings, out_dir, cache_dir, keep_checkpoints=keep_checkpoints, log=log, engine=engine)
        return experiment.run()


# ------------------------------------------------------------------------------------------------
# Several training seeds
# ------------------------------------------------------------------------------------------------


def across_seeds(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The experiment's results over training seeds (``summaries``: each seed's ``results.json`` fields):
    each arm's final reward, KL and mean length, and each comparison's paired reward difference and win
    rate, with the length-controlled win rate and the length effect where every seed has them -- the
    per-seed values (each the mean over that seed's evaluation), their mean and a 95% Student-t interval
    across seeds. An arm or comparison missing from a seed is left out of that seed."""
    arms: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(a for s in summaries for a in s["arms"]):
        rows = [s["arms"][arm] for s in summaries if arm in s["arms"]]
        arms[arm] = {"label": rows[0]["label"], "seeds": len(rows)}
        for name in ("reward", "kl"):
            arms[arm][name] = {**t_interval([r[name]["mean"] for r in rows]), "per_seed": [r[name]["mean"] for r in rows]}
        lengths = [float(r["mean_length"]) for r in rows if r.get("mean_length") is not None]
        arms[arm]["mean_length"] = t_interval(lengths) if lengths else None
    comparisons: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(c for s in summaries for c in s["comparisons"]):
        rows = [s["comparisons"][name] for s in summaries if name in s["comparisons"]]
        differences = [r["reward_difference"]["mean"] for r in rows]
        comparisons[name] = {
            "seeds": len(rows),
            "reward_difference": {**t_interval(differences), "per_seed": differences},
            "win_rate": {**t_interval([r["win_rate"] for r in rows]), "per_seed": [r["win_rate"] for r in rows]},
        }
        for field_name in ("lc_win_rate", "length_effect"):
            values = [r.get(field_name) for r in rows]
            if all(v is not None for v in values):
                comparisons[name][field_name] = {**t_interval(values), "per_seed": values}
    return {"seeds": [s["settings"]["seed"] for s in summaries], "arms": arms, "comparisons": comparisons}


def seeds_markdown(aggregate: dict[str, Any]) -> str:
    """:func:`across_seeds` as two tables: the arms, then the comparisons (per-seed values listed)."""
    seeds = aggregate["seeds"]
    lines = [
        f"Over training seeds {', '.join(str(s) for s in seeds)}: mean across seeds [95% Student-t interval across seeds].",
        "",
        "| arm | reward | KL nats | mean length |",
        "|---|---|---|---|",
    ]
    for row in aggregate["arms"].values():
        length = "–" if row["mean_length"] is None else _interval(row["mean_length"], 1)
        lines.append(f"| {row['label']} | {_interval(row['reward'])} | {_interval(row['kl'], 1)} | {length} |")
    lc = any("lc_win_rate" in c for c in aggregate["comparisons"].values())
    lines += [
        "",
        "| comparison | reward difference | per seed | win rate | per seed |"
        + (" LC win rate | per seed | length effect | per seed |" if lc else ""),
        "|---|---|---|---|---|" + ("---|---|---|---|" if lc else ""),
    ]

    def label(arm: str) -> str:
        return str(aggregate["arms"].get(arm, {}).get("label", ARM_LABELS.get(arm, arm)))

    def cells(value: dict[str, Any] | None, signed: bool = False) -> str:
        if value is None:
            return " – | – |"
        each = ", ".join(f"{v:+.3f}" if signed else f"{v:.3f}" for v in value["per_seed"])
        return f" {_interval(value)} | {each} |"

    for name, c in aggregate["comparisons"].items():
        ours, theirs = name.split(" vs ")
        row = f"| {label(ours)} vs {label(theirs)} |" + cells(c["reward_difference"], signed=True) + cells(c["win_rate"])
        lines.append(row + (cells(c.get("lc_win_rate")) + cells(c.get("length_effect"), signed=True) if lc else ""))
    if lc:
        lines += [
            "",
            "LC: the win rate at equal length (lengths in characters); length effect > 0: the longer sample tends to win.",
        ]
    return "\n".join(lines) + "\n"


def run_online_seeds(
    mode: str | OnlineExperimentSettings,
    seeds: Sequence[int],
    out_dir: str | Path,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    threads: int = DEFAULT_THREADS,
    keep_checkpoints: bool = False,
    log: Log | None = None,
    engine: EngineOptions | None = None,
) -> dict[str, Any]:
    """The experiment once per training seed, each in ``out_dir/seed-<seed>`` (a finished seed's stored
    arms are reused), then :func:`across_seeds` written to ``out_dir/seeds.json`` and ``seeds.md``."""
    settings = resolve_mode(mode, MODES)
    summaries = []
    for seed in seeds:
        result = run_online_experiment(
            dataclasses.replace(settings, seed=seed),
            Path(out_dir) / f"seed-{seed}",
            cache_dir,
            threads=threads,
            keep_checkpoints=keep_checkpoints,
            log=log,
            engine=engine,
        )
        summaries.append(result.summary())
    aggregate = across_seeds(summaries)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "seeds.json").write_text(json.dumps(aggregate, indent=2) + "\n", encoding="utf-8")
    Path(out_dir, "seeds.md").write_text(seeds_markdown(aggregate), encoding="utf-8")
    return aggregate
